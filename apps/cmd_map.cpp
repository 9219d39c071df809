// qcowmap map: the allocation map, in qemu-img map's JSON schema or as a table.
#include "cli.hpp"

#include <qcowmap/bitmap.hpp>
#include <qcowmap/map.hpp>

#include <fmt/format.h>

#include <cerrno>
#include <charconv>
#include <cstring>
#include <type_traits>

namespace qcowmap::cli {
namespace {

/// Appends one entry in qemu-img map --output=json's form: same keys, order and spacing
/// (qemu 8.2+ adds "compressed"). Built with to_chars, not a format call per entry: a
/// fragmented disk has tens of thousands of entries and this is most of `map`'s own time.
void append_json_entry(std::string& out, const MapEntry& e) {
    // `key` carries the separator before the name: "{ " first, ", " after.
    auto field = [&](const char* key, auto value) {
        out += key;
        if constexpr (std::is_same_v<decltype(value), bool>) {
            out += value ? "true" : "false";
        } else {
            char digits[24];
            auto end = std::to_chars(digits, digits + sizeof digits, value).ptr;
            out.append(digits, end);
        }
    };
    field("{ \"start\": ", e.start);
    field(", \"length\": ", e.length);
    field(", \"depth\": ", std::uint64_t{e.depth});
    field(", \"present\": ", e.present);
    field(", \"zero\": ", e.zero);
    field(", \"data\": ", e.data);
    field(", \"compressed\": ", e.compressed);
    if (e.offset)
        field(", \"offset\": ", *e.offset);
    out += "}";
}

/// `map --bitmap=NAME --bitmap-only`: the range as merged dirty/clean runs.
int print_bitmap_ranges(const DirtyBitmap& bitmap, std::uint64_t start, std::uint64_t end,
                        bool json) {
    std::string out = json ? "[" : fmt::format("{:<16}{:<16}{}\n", "Offset", "Length", "Dirty");
    bool first = true;
    for (const BitmapRange& r : bitmap.ranges(start, end)) {
        if (json) {
            if (!first)
                out += ",\n";
            out += fmt::format("{{\"start\": {}, \"length\": {}, \"dirty\": {}}}", r.offset,
                               r.length, r.dirty);
        } else {
            out += fmt::format("{:<#16x}{:<#16x}{}\n", r.offset, r.length, r.dirty);
        }
        first = false;
        if (out.size() > (1 << 16)) {
            std::fwrite(out.data(), 1, out.size(), stdout);
            out.clear();
        }
    }
    if (json)
        out += "]\n";
    std::fwrite(out.data(), 1, out.size(), stdout);
    if (std::fflush(stdout) != 0) {
        return report("<stdout>", std::strerror(errno), kExitOutputError);
    }
    return kExitOk;
}

/// A hexadecimal column as qemu-img's "%#-16" PRIx64 prints it: "0" for zero (no "0x").
std::string hex_column(std::uint64_t value) {
    return fmt::format("{:<16}", value == 0 ? std::string("0") : fmt::format("{:#x}", value));
}

} // namespace

Command add_map(CLI::App& app) {
    auto* command = app.add_subcommand(
        "map", "Print the allocation map (--output=json matches qemu-img map --output=json)");
    auto args = std::make_shared<ImageArgs>();
    auto output = std::make_shared<OutputOption>();
    auto start = std::make_shared<std::string>("0");
    auto max_length = std::make_shared<std::string>();
    args->add_to(*command);
    output->add_to(*command, "qemu-img map --output=json's entries");
    command->add_option("--start-offset", *start, "Start of the range (bytes; k/M/G/T suffixes)")
        ->option_text("SIZE");
    command->add_option("--max-length", *max_length, "Length of the range (bytes; suffixes)")
        ->option_text("SIZE");
    auto bitmap = std::make_shared<std::string>();
    auto bitmap_only = std::make_shared<bool>(false);
    command
        ->add_option("--bitmap", *bitmap,
                     "Map only the ranges this persistent dirty bitmap marks dirty")
        ->option_text("NAME");
    command->add_flag("--bitmap-only", *bitmap_only,
                      "With --bitmap: print the whole range as dirty/clean ranges instead "
                      "({\"start\", \"length\", \"dirty\"} in JSON)");
    return {command, [=] {
                const std::uint64_t start_offset = size_option("--start-offset", *start);
                const std::uint64_t length =
                    max_length->empty() ? UINT64_MAX : size_option("--max-length", *max_length);
                if (*bitmap_only && bitmap->empty()) {
                    throw UsageError("--bitmap-only needs --bitmap=NAME");
                }
                auto image = open_or_report(*args);
                if (!image)
                    return static_cast<int>(kExitImageError);
                std::optional<DirtyBitmap> dirty;
                if (!bitmap->empty()) {
                    auto found = DirtyBitmap::open(*image, *bitmap);
                    if (!found) {
                        return report_error(args->path, found.error(), kExitImageError);
                    }
                    dirty = std::move(*found);
                }
                const std::uint64_t end =
                    length > UINT64_MAX - start_offset ? UINT64_MAX : start_offset + length;
                const bool json = output->json();
                if (*bitmap_only) {
                    return print_bitmap_ranges(*dirty, start_offset, end, json);
                }
                MapOptions options;
                options.start = start_offset;
                options.length = length;
                std::string out;
                bool first = true;
                if (json) {
                    out += "[";
                } else {
                    out += fmt::format("{:<16}{:<16}{:<16}{}\n", "Offset", "Length", "Mapped to",
                                       "File");
                }
                auto flush = [&] {
                    std::fwrite(out.data(), 1, out.size(), stdout);
                    out.clear();
                };
                // The File column: the file holding each layer's bytes, looked up once per layer.
                std::vector<std::optional<std::string>> files;
                auto file_of = [&](std::uint32_t depth) -> const std::string& {
                    if (files.size() <= depth)
                        files.resize(depth + 1);
                    if (!files[depth])
                        files[depth] = printable(map_file(*image, depth).string());
                    return *files[depth];
                };
                auto sink = [&](const MapEntry& e) -> Result<void> {
                    if (json) {
                        if (!first)
                            out += ",\n";
                        append_json_entry(out, e);
                    } else if (e.data && !e.zero) {
                        // Like qemu-img's human output (qemu-img.c dump_map_entry): data ranges,
                        // where they live, and in which file (a backing layer's, a data file).
                        out += hex_column(e.start);
                        out += hex_column(e.length);
                        out +=
                            e.offset ? hex_column(*e.offset) : fmt::format("{:<16}", "compressed");
                        out += file_of(e.depth);
                        out += '\n';
                    }
                    first = false;
                    if (out.size() > (1 << 16))
                        flush();
                    return {};
                };
                Result<void> result = dirty ? map_dirty(*image, *dirty, options, sink)
                                            : map_image(*image, options, sink);
                if (!result) {
                    flush();
                    std::fflush(stdout);
                    return report_error(args->path, result.error(), kExitImageError);
                }
                if (json && first && !dirty) {
                    // An empty range (--start-offset at or past the end, --max-length=0):
                    // qemu-img map prints one empty entry where the range starts.
                    MapEntry empty;
                    empty.start = start_offset;
                    append_json_entry(out, empty);
                }
                if (json)
                    out += "]\n";
                flush();
                if (std::fflush(stdout) != 0) {
                    return report("<stdout>", std::strerror(errno), kExitOutputError);
                }
                return static_cast<int>(kExitOk);
            }};
}

} // namespace qcowmap::cli

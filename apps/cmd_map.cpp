// qcowmap map: the allocation map, in qemu-img map's JSON schema or as a table.
#include "cli.hpp"

#include <qcowmap/bitmap.hpp>
#include <qcowmap/map.hpp>

#include <fmt/format.h>

#include <charconv>
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

} // namespace

Command add_map(CLI::App& app) {
    auto* command = app.add_subcommand(
        "map", "Print the allocation map (--output=json matches qemu-img map --output=json)");
    auto args = std::make_shared<ImageArgs>();
    auto output = std::make_shared<std::string>("human");
    auto start = std::make_shared<std::string>("0");
    auto max_length = std::make_shared<std::string>();
    args->add_to(*command);
    command->add_option("--output", *output, "human (default) or json")
        ->check(CLI::IsMember({"human", "json"}));
    command->add_option("--start-offset", *start, "Start of the range (bytes; k/M/G/T suffixes)");
    command->add_option("--max-length", *max_length, "Length of the range (bytes; suffixes)");
    auto bitmap = std::make_shared<std::string>();
    auto bitmap_only = std::make_shared<bool>(false);
    command->add_option("--bitmap", *bitmap,
                        "Map only the ranges this persistent dirty bitmap marks dirty");
    command->add_flag("--bitmap-only", *bitmap_only,
                      "With --bitmap: print the whole range as dirty/clean ranges instead "
                      "({\"start\", \"length\", \"dirty\"} in JSON)");
    return {command, [=] {
                auto start_offset = parse_size(*start);
                if (!start_offset) {
                    return report(args->path, fmt::format("invalid --start-offset '{}'", *start),
                                  kExitUsage);
                }
                std::optional<std::uint64_t> length = UINT64_MAX;
                if (!max_length->empty()) {
                    length = parse_size(*max_length);
                    if (!length) {
                        return report(args->path,
                                      fmt::format("invalid --max-length '{}'", *max_length),
                                      kExitUsage);
                    }
                }
                if (*bitmap_only && bitmap->empty()) {
                    return report(args->path, "--bitmap-only needs --bitmap=NAME", kExitUsage);
                }
                auto image = open_or_report(*args);
                if (!image)
                    return static_cast<int>(kExitImageError);
                std::optional<DirtyBitmap> dirty;
                if (!bitmap->empty()) {
                    auto found = DirtyBitmap::open(*image, *bitmap);
                    if (!found) {
                        return report(args->path, found.error().message, kExitImageError);
                    }
                    dirty = std::move(*found);
                }
                const std::uint64_t end =
                    *length > UINT64_MAX - *start_offset ? UINT64_MAX : *start_offset + *length;
                if (*bitmap_only) {
                    return print_bitmap_ranges(*dirty, *start_offset, end, *output == "json");
                }
                MapOptions options;
                options.start = *start_offset;
                options.length = *length;
                const bool json = *output == "json";
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
                auto sink = [&](const MapEntry& e) -> Result<void> {
                    if (json) {
                        if (!first)
                            out += ",\n";
                        append_json_entry(out, e);
                    } else if (e.data && !e.zero) {
                        // Like qemu-img's human output: data ranges and where they live.
                        std::string where =
                            e.offset ? fmt::format("{:#x}", *e.offset) : std::string("compressed");
                        out += fmt::format("{:<#16x}{:<#16x}{:<16}{}\n", e.start, e.length, where,
                                           args->path);
                    }
                    first = false;
                    if (out.size() > (1 << 16))
                        flush();
                    return {};
                };
                Result<void> result;
                if (dirty) {
                    // One map walk from the first dirty byte, its entries clipped to the dirty
                    // ranges (a merge join of two ordered streams). Clipping a merged entry gives
                    // what mapping each dirty range on its own would (offsets continue inside an
                    // entry), without redoing map_image's per-walk setup for every range.
                    BitmapRanges ranges = dirty->dirty_ranges(*start_offset, end);
                    auto next_range = ranges.begin();
                    BitmapRange range;
                    bool have = next_range != std::default_sentinel;
                    if (have)
                        range = *next_range;
                    bool done = !have;
                    if (have) {
                        options.start = range.offset;
                        options.length = end - range.offset;
                        result = map_image(*image, options, [&](const MapEntry& e) -> Result<void> {
                            const std::uint64_t e_end = e.start + e.length;
                            while (have && range.offset < e_end) {
                                const std::uint64_t r_end = range.offset + range.length;
                                const std::uint64_t from = std::max(range.offset, e.start);
                                const std::uint64_t to = std::min(r_end, e_end);
                                if (from < to) {
                                    MapEntry clipped = e;
                                    clipped.start = from;
                                    clipped.length = to - from;
                                    if (clipped.offset)
                                        *clipped.offset += from - e.start;
                                    if (auto ok = sink(clipped); !ok)
                                        return ok;
                                }
                                if (r_end > e_end)
                                    break;
                                ++next_range;
                                have = next_range != std::default_sentinel;
                                if (have)
                                    range = *next_range;
                            }
                            if (!have) {
                                done = true; // nothing dirty is left: stop the walk
                                return Error{ErrorCode::out_of_range, "end of dirty ranges"};
                            }
                            return {};
                        });
                        if (!result && done)
                            result = {};
                    }
                } else {
                    result = map_image(*image, options, sink);
                }
                if (!result) {
                    flush();
                    std::fflush(stdout);
                    return report(args->path, result.error().message, kExitImageError);
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

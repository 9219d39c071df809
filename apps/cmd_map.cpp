// qcowmap map: the allocation map, in qemu-img map's JSON schema or as a table.
#include "cli.hpp"

#include <qcowmap/map.hpp>

#include <fmt/format.h>

namespace qcowmap::cli {
namespace {

std::string json_entry(const MapEntry& e) {
    // Same keys, order and spacing as qemu-img map --output=json (qemu 8.2+ adds "compressed").
    std::string line = fmt::format(
        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, "
        "\"data\": {}, \"compressed\": {}",
        e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed);
    if (e.offset) {
        line += fmt::format(", \"offset\": {}", *e.offset);
    }
    line += "}";
    return line;
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
                auto image = open_or_report(*args);
                if (!image) return static_cast<int>(kExitImageError);
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
                auto result = map_image(*image, options, [&](const MapEntry& e) -> Result<void> {
                    if (json) {
                        if (!first) out += ",\n";
                        out += json_entry(e);
                    } else if (e.data && !e.zero) {
                        // Like qemu-img's human output: data ranges and where they live.
                        std::string where = e.offset ? fmt::format("{:#x}", *e.offset)
                                                     : std::string("compressed");
                        out += fmt::format("{:<#16x}{:<#16x}{:<16}{}\n", e.start, e.length, where,
                                           args->path);
                    }
                    first = false;
                    if (out.size() > (1 << 16)) flush();
                    return {};
                });
                if (!result) {
                    flush();
                    std::fflush(stdout);
                    return report(args->path, result.error().message, kExitImageError);
                }
                if (json) out += "]\n";
                flush();
                if (std::fflush(stdout) != 0) {
                    return report("<stdout>", std::strerror(errno), kExitOutputError);
                }
                return static_cast<int>(kExitOk);
            }};
}

} // namespace qcowmap::cli

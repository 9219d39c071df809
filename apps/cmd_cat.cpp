// qcowmap cat: the whole virtual disk, raw, to stdout: the library's export_raw, written in
// order (into a pipe, mapped data and zeros by vmsplice).
#include "cli.hpp"

#include <qcowmap/export.hpp>

#include <unistd.h>

namespace qcowmap::cli {

Command add_cat(CLI::App& app) {
    auto* command = app.add_subcommand("cat", "Write the virtual disk, raw, to stdout");
    auto args = std::make_shared<ImageArgs>();
    auto start = std::make_shared<std::string>("0");
    auto max_length = std::make_shared<std::string>();
    auto force = std::make_shared<bool>(false);
    args->add_to(*command);
    command
        ->add_option("--start-offset", *start,
                     "Write from this offset of the disk (bytes; k/M/G/T suffixes)")
        ->option_text("SIZE");
    command->add_option("--max-length", *max_length, "Write at most this many bytes (suffixes)")
        ->option_text("SIZE");
    command->add_flag("--force", *force, "Write to a terminal too");
    add_salvage_option(*command, args->salvage);
    return {command, [=] {
                const std::uint64_t from = size_option("--start-offset", *start);
                const std::uint64_t length =
                    max_length->empty() ? UINT64_MAX : size_option("--max-length", *max_length);
                if (!*force && ::isatty(STDOUT_FILENO)) {
                    return report("<stdout>",
                                  "is a terminal: refusing to write a disk image to it (redirect "
                                  "the output, or use --force)",
                                  kExitOutputError);
                }
                auto image = open_or_report(*args);
                if (!image)
                    return static_cast<int>(kExitImageError);
                if (from >= image->size())
                    return static_cast<int>(kExitOk); // nothing of the disk lies there
                ExportOptions options;
                options.sequential = true;
                options.start = from;
                options.end = length > UINT64_MAX - from ? UINT64_MAX : from + length;
                // cat has no --io: always the mapping, made present ahead (and into a pipe,
                // handed over by reference).
                options.data_access = DataAccess::mapping;
                auto result = export_raw(*image, STDOUT_FILENO, options);
                if (!result) {
                    return result.error().origin == ErrorOrigin::target
                               ? report("<stdout>", result.error().message, kExitOutputError)
                               : report_error(args->path, result.error(), kExitImageError);
                }
                return salvage_exit(*image, kExitOk);
            }};
}

} // namespace qcowmap::cli

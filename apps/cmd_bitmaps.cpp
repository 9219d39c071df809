// qcowmap bitmaps: the persistent dirty bitmaps of an image and whether they can be trusted.
#include "cli.hpp"

#include <qcowmap/bitmap.hpp>

#include <fmt/format.h>

namespace qcowmap::cli {
namespace {

std::string json_bitmap(const BitmapSummary& s) {
    std::string flags = "[";
    for (const std::string& f : bitmap_flag_names(s.entry.flags)) {
        flags += (flags.size() > 1 ? ", " : "") + json_string(f);
    }
    flags += "]";
    return fmt::format(
        "{{ \"name\": {}, \"granularity\": {}, \"flags\": {}, \"enabled\": {}, \"in-use\": {}, "
        "\"consistent\": {}, \"usable\": {}, \"error\": {}, \"dirty-bytes\": {} }}",
        json_string(s.entry.name), s.entry.granularity(), flags, s.entry.enabled(),
        s.entry.in_use(), s.entry.consistent(), !s.error.has_value(),
        s.error ? json_string(s.error->message) : "null",
        s.dirty_bytes ? std::to_string(*s.dirty_bytes) : "null");
}

} // namespace

/// The "bitmaps" lines of `qcowmap info` (human form): one line per bitmap.
std::string describe_bitmap(const BitmapEntry& e) {
    std::vector<std::string> flags = bitmap_flag_names(e.flags);
    std::string joined;
    for (const std::string& f : flags)
        joined += (joined.empty() ? "" : ",") + f;
    return fmt::format("{} (granularity {}, flags {}, {})", printable(e.name), e.granularity(),
                       joined.empty() ? "none" : joined,
                       e.consistent() ? "consistent" : "inconsistent: " + e.inconsistent_reason);
}

Command add_bitmaps(CLI::App& app) {
    auto* command = app.add_subcommand(
        "bitmaps",
        "List the persistent dirty bitmaps: granularity, flags, consistency, dirty bytes");
    auto args = std::make_shared<ImageArgs>();
    auto output = std::make_shared<OutputOption>();
    command->add_option("IMAGE", args->path, "The qcow2 image file (or block device)")->required();
    output->add_to(*command, "an array of {name, granularity, flags, enabled, in-use, "
                             "consistent, usable, error, dirty-bytes}");
    add_untrusted_option(*command, args->untrusted);
    add_force_share_option(*command, args->force_share);
    return {command, [args, output] {
                const bool json = output->json();
                // Bitmaps belong to the image itself: its backing chain is not needed.
                args->backing = "none";
                auto image = open_or_report(*args);
                if (!image)
                    return static_cast<int>(kExitImageError);
                const auto& ext = image->info().bitmaps;
                if (ext && !ext->directory_error.empty()) {
                    // Not fatal: qemu too ignores a stale extension (autoclear bit 0 clear).
                    report(args->path,
                           "warning: stale bitmaps extension (autoclear bit 0 clear) whose "
                           "directory does not parse: " +
                               ext->directory_error,
                           kExitOk);
                }
                std::vector<BitmapSummary> bitmaps = list_bitmaps(*image);
                std::string out;
                if (json) {
                    out += "[";
                    for (std::size_t i = 0; i < bitmaps.size(); ++i) {
                        out += (i ? ",\n" : "") + json_bitmap(bitmaps[i]);
                    }
                    out += "]\n";
                } else {
                    out += fmt::format("{:<24} {:>11} {:<28} {:>14}  {}\n", "NAME", "GRANULARITY",
                                       "FLAGS", "DIRTY", "STATUS");
                    for (const BitmapSummary& s : bitmaps) {
                        std::string flags;
                        for (const std::string& f : bitmap_flag_names(s.entry.flags)) {
                            flags += (flags.empty() ? "" : ",") + f;
                        }
                        out += fmt::format(
                            "{:<24} {:>11} {:<28} {:>14}  {}\n", printable(s.entry.name),
                            s.entry.granularity(), flags.empty() ? "-" : flags,
                            s.dirty_bytes ? std::to_string(*s.dirty_bytes) : "-",
                            s.error ? "unusable: " + s.error->message : std::string("consistent"));
                    }
                }
                std::fwrite(out.data(), 1, out.size(), stdout);
                return static_cast<int>(kExitOk);
            }};
}

} // namespace qcowmap::cli

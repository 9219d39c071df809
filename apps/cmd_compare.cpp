// qcowmap compare: are two disks the same? Same output and exit codes as qemu-img compare.
#include "cli.hpp"

#include <qcowmap/compare.hpp>
#include <qcowmap/format.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <cstdio>

namespace qcowmap::cli {
namespace {

// qemu-img compare's exit codes (qemu-img.c, img_compare).
constexpr int kCompareDifferent = 1;
constexpr int kCompareOpenError = 2;
constexpr int kCompareAllocationError = 3;
constexpr int kCompareReadError = 4;

struct CompareArgs {
    std::string first, second;
    std::string format1, format2;
    bool strict = false;
    bool quiet = false;
    bool progress = false;
    bool untrusted = false;
    bool force_share = false;
    std::string io = "auto";
};

std::optional<Image> open_side(const std::string& path, const std::string& format,
                               const CompareArgs& given) {
    ImageArgs args;
    args.path = path;
    args.format = format; // empty: probed as qemu-img probes (the qcow magic, else raw)
    args.untrusted = given.untrusted;
    args.force_share = given.force_share;
    args.warn_raw_probe = false; // qemu-img compare probes silently; its output is compared
    OpenOptions options = args.open_options();
    // A file shrinking under its mapping is a read error (4), not "images differ" (1).
    guard_against_shrinking(path, kCompareReadError);
    auto image = Image::open(path, options);
    if (!image) {
        report_error(path, image.error(), kCompareOpenError);
        return std::nullopt;
    }
    return std::move(*image);
}

} // namespace

Command add_compare(CLI::App& app) {
    auto* command = app.add_subcommand(
        "compare", "Compare two disks like qemu-img compare (exit 0 identical, 1 different, "
                   "2 open error, 3 allocation-check error, 4 read error)");
    auto args = std::make_shared<CompareArgs>();
    command->add_option("IMAGE1", args->first, "First image (qcow2 or raw)")->required();
    command->add_option("IMAGE2", args->second, "Second image (qcow2 or raw)")->required();
    command->add_option("-f", args->format1, "Format of IMAGE1: qcow2 or raw (default: probed)")
        ->check(one_of({"qcow2", "raw"}))
        ->option_text("FMT");
    command->add_option("-F", args->format2, "Format of IMAGE2: qcow2 or raw (default: probed)")
        ->check(one_of({"qcow2", "raw"}))
        ->option_text("FMT");
    command->add_flag("-p,--progress", args->progress, "Show progress on stderr");
    command->add_flag("-s,--strict", args->strict,
                      "Strict: sizes and allocation status must match too");
    command->add_flag("-q,--quiet", args->quiet, "Print nothing; only the exit code tells");
    add_io_option(*command, args->io);
    add_untrusted_option(*command, args->untrusted);
    add_force_share_option(*command, args->force_share);
    return {
        command, [args] {
            auto a = open_side(args->first, args->format1, *args);
            if (!a)
                return kCompareOpenError;
            auto b = open_side(args->second, args->format2, *args);
            if (!b)
                return kCompareOpenError;
            // From here on a fault may come from either file: name both.
            guard_against_shrinking(args->first + ", " + args->second, kCompareReadError);
            CompareOptions options;
            options.strict = args->strict;
            options.data_access = data_access(args->io);
            Progress meter(args->progress, std::max(a->size(), b->size()));
            options.progress = meter.callback();
            Result<CompareResult> result = Error{ErrorCode::io_error, ""};
            try {
                result = compare_images(*a, *b, options);
            } catch (const std::exception& e) { // out of memory: a read error, never "different"
                return report(args->first, e.what(), kCompareReadError);
            }
            if (!result) {
                const Error& error = result.error();
                const std::string& path = error.path == b->path() ? args->second : args->first;
                return report_error(path, error,
                                    error.stage == ErrorStage::read ? kCompareReadError
                                                                    : kCompareAllocationError);
            }
            meter.finish();
            auto say = [&](const std::string& line) {
                if (!args->quiet)
                    fmt::print("{}\n", line);
            };
            using Outcome = CompareResult::Outcome;
            if (result->outcome == Outcome::size_mismatch) {
                say("Strict mode: Image size mismatch!");
                return kCompareDifferent;
            }
            if (result->outcome == Outcome::status_mismatch) {
                say(fmt::format("Strict mode: Offset {} block status mismatch!", result->offset));
                return kCompareDifferent;
            }
            if (result->size_warning)
                say("Warning: Image size mismatch!");
            if (result->outcome == Outcome::content_mismatch) {
                say(fmt::format("Content mismatch at offset {}!", result->offset));
                return kCompareDifferent;
            }
            say("Images are identical.");
            return static_cast<int>(kExitOk);
        }};
}

} // namespace qcowmap::cli

// qcowmap compare: are two disks the same? Same output and exit codes as qemu-img compare.
#include "cli.hpp"

#include <qcowmap/compare.hpp>

#include <fmt/format.h>

#include <cstdio>
#include <fcntl.h>
#include <unistd.h>

namespace qcowmap::cli {
namespace {

// qemu-img compare's exit codes (qemu-img.c, img_compare).
constexpr int kCompareDifferent = 1;
constexpr int kCompareOpenError = 2;
constexpr int kCompareAllocationError = 3;
constexpr int kCompareReadError = 4;

/// "qcow2" when the file starts with the qcow magic ("QFI\xfb", versions 1-3), else "raw":
/// qemu-img probes the same way and falls back to raw.
std::string probe_format(const std::string& path) {
    unsigned char magic[4] = {};
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return "qcow2"; // let open() name the problem
    ssize_t n = ::read(fd, magic, sizeof magic);
    ::close(fd);
    const bool qcow =
        n == 4 && magic[0] == 'Q' && magic[1] == 'F' && magic[2] == 'I' && magic[3] == 0xfb;
    return qcow ? "qcow2" : "raw";
}

struct CompareArgs {
    std::string first, second;
    std::string format1, format2;
    bool strict = false;
    bool quiet = false;
    DataAccess io = DataAccess::automatic;
};

std::optional<Image> open_side(const std::string& path, const std::string& format) {
    ImageArgs args;
    args.path = path;
    OpenOptions options = args.open_options();
    options.format = format.empty() ? probe_format(path) : format;
    // A file shrinking under its mapping is a read error (4), not "images differ" (1).
    guard_against_shrinking(path, kCompareReadError);
    auto image = Image::open(path, options);
    if (!image) {
        report(path, image.error().message, kCompareOpenError);
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
        ->check(CLI::IsMember({"qcow2", "raw"}));
    command->add_option("-F", args->format2, "Format of IMAGE2: qcow2 or raw (default: probed)")
        ->check(CLI::IsMember({"qcow2", "raw"}));
    command->add_flag("-s,--strict", args->strict,
                      "Strict: sizes and allocation status must match too");
    command->add_flag("-q,--quiet", args->quiet, "Print nothing; only the exit code tells");
    add_io_option(*command, args->io);
    return {
        command, [args] {
            auto a = open_side(args->first, args->format1);
            if (!a)
                return kCompareOpenError;
            auto b = open_side(args->second, args->format2);
            if (!b)
                return kCompareOpenError;
            // From here on a fault may come from either file: name both.
            guard_against_shrinking(args->first + ", " + args->second, kCompareReadError);
            CompareOptions options;
            options.strict = args->strict;
            options.data_access = args->io;
            CompareError detail;
            Result<CompareResult> result = Error{ErrorCode::io_error, ""};
            try {
                result = compare_images(*a, *b, options, &detail);
            } catch (const std::exception& e) { // out of memory: a read error, never "different"
                return report(args->first, e.what(), kCompareReadError);
            }
            if (!result) {
                const std::string& path = detail.image == 0 ? args->first : args->second;
                return report(path, result.error().message,
                              detail.read_error ? kCompareReadError : kCompareAllocationError);
            }
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

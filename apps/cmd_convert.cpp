// qcowmap convert: the virtual disk written out, raw (-O raw) or in a format registered by
// another file (apps/convert_*.cpp). The raw writing itself is the library's export_raw.
#include "cli.hpp"

#include <qcowmap/bitmap.hpp>
#include <qcowmap/export.hpp>

#include <fmt/format.h>

#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <map>
#include <sys/stat.h>
#include <unistd.h>

namespace qcowmap::cli {
namespace {

std::map<std::string, OutputFormat>& output_formats() {
    static std::map<std::string, OutputFormat> formats;
    return formats;
}

/// Output formats qcowmap will write but this build does not (yet).
constexpr const char* kPlannedFormats[] = {"qcow2"};

/// Closes `fd` on scope exit unless it is standard output.
struct FdCloser {
    int fd = -1;
    ~FdCloser() {
        if (fd > STDERR_FILENO)
            ::close(fd);
    }
};

/// Reports an export failure on the side it came from: the target (exit 3) or the image (1).
int report_export(const ConvertJob& job, const Error& error) {
    const std::string target = job.target == "-" ? "<stdout>" : job.target;
    return error.origin == ErrorOrigin::target
               ? report(target, error.message, kExitOutputError)
               : report_error(job.source.path, error, kExitImageError);
}

/// Opens TARGET for a raw write. A new file is created; an existing regular file needs
/// --force; block and character devices (/dev/sdX, an LVM volume, /dev/null) are written as
/// they are; a directory is refused. Returns -1 after reporting.
int open_target(const ConvertJob& job) {
    if (job.target == "-") {
        if (!job.force && ::isatty(STDOUT_FILENO)) {
            report("<stdout>",
                   "is a terminal: refusing to write a disk image to it (redirect the output, or "
                   "use --force)",
                   kExitOutputError);
            return -1;
        }
        return STDOUT_FILENO;
    }
    struct stat st {};
    const bool exists = ::stat(job.target.c_str(), &st) == 0;
    if (exists && S_ISDIR(st.st_mode)) {
        report(job.target, "is a directory (convert writes one file: name it)", kExitOutputError);
        return -1;
    }
    const bool device = exists && (S_ISBLK(st.st_mode) || S_ISCHR(st.st_mode));
    // No O_TRUNC: the target may turn out to be the image itself (or one of its layers),
    // which export_raw refuses before a single byte of it is lost.
    int flags = O_WRONLY | O_CLOEXEC;
    if (!device)
        flags |= O_CREAT | (job.force ? 0 : O_EXCL);
    int fd = ::open(job.target.c_str(), flags, 0644);
    if (fd < 0) {
        std::string why =
            errno == EEXIST ? "already exists (use --force to overwrite)" : std::strerror(errno);
        report(job.target, why, kExitOutputError);
    }
    return fd;
}

int convert_raw(const ConvertJob& job) {
    FdCloser target{open_target(job)};
    if (target.fd < 0)
        return kExitOutputError;
    Progress meter(job.progress, job.image.size());
    ExportOptions options;
    options.zero_block = job.sparse_size;
    options.data_access = job.io;
    options.sequential = job.target == "-";
    options.progress = meter.callback();
    auto result = export_raw(job.image, target.fd, options);
    if (!result) {
        return report_export(job, result.error());
    }
    if (target.fd != STDOUT_FILENO) {
        int fd = target.fd;
        target.fd = -1;
        if (::close(fd) != 0)
            return report(job.target, std::strerror(errno), kExitOutputError);
    }
    meter.finish();
    return kExitOk;
}

/// `convert --bitmap=NAME IMAGE TARGET`: an incremental sync of an existing raw copy.
int convert_incremental(const ConvertJob& job, const std::string& bitmap_name) {
    auto bitmap = DirtyBitmap::open(job.image, bitmap_name);
    if (!bitmap) {
        return report_error(job.source.path, bitmap.error(), kExitImageError);
    }
    FdCloser target{::open(job.target.c_str(), O_WRONLY | O_CLOEXEC)};
    if (target.fd < 0) {
        std::string why = errno == ENOENT ? "does not exist (convert --bitmap updates an existing "
                                            "copy of the disk; make one with convert first)"
                                          : std::strerror(errno);
        return report(job.target, why, kExitOutputError);
    }
    Progress meter(job.progress, bitmap->dirty_bytes());
    ExportOptions options;
    options.progress = meter.callback();
    auto result = export_dirty(job.image, *bitmap, target.fd, options);
    if (!result) {
        return report_export(job, result.error());
    }
    int fd = target.fd;
    target.fd = -1;
    if (::close(fd) != 0)
        return report(job.target, std::strerror(errno), kExitOutputError);
    meter.finish();
    return kExitOk;
}

} // namespace

bool register_output_format(OutputFormat format) {
    std::string name = format.name;
    return output_formats().emplace(std::move(name), std::move(format)).second;
}

Command add_convert(CLI::App& app) {
    auto* command = app.add_subcommand(
        "convert", "Write the virtual disk to TARGET (-O raw: zero runs become holes)");
    auto args = std::make_shared<ImageArgs>();
    auto target = std::make_shared<std::string>();
    auto output_format = std::make_shared<std::string>("raw");
    auto progress = std::make_shared<bool>(false);
    auto force = std::make_shared<bool>(false);
    args->add_to(*command);
    command->add_option("TARGET", *target, "Output file, block device, or - for standard output")
        ->required();
    command->add_option("-O", *output_format, "Output format: raw (the default) or qcow2")
        ->option_text("FMT");
    add_salvage_option(*command, args->salvage);
    command->add_flag("-p,--progress", *progress, "Show progress on stderr");
    command->add_flag("--force", *force,
                      "Overwrite TARGET if it is an existing file (devices need no --force)");
    auto sparse_size = std::make_shared<std::string>("4k");
    command
        ->add_option("-S,--sparse-size", *sparse_size,
                     "Also leave holes for data blocks of this size that hold only zeros "
                     "(like qemu-img convert -S: a multiple of 512 up to 16M; default 4k, 0 "
                     "disables)")
        ->option_text("SIZE");
    auto io = std::make_shared<std::string>("auto");
    add_io_option(*command, *io);
    auto bitmap = std::make_shared<std::string>();
    command
        ->add_option("--bitmap", *bitmap,
                     "Incremental: with -O raw apply only the ranges this dirty bitmap marks "
                     "dirty onto TARGET, an existing raw copy of the same size; with -O qcow2 "
                     "write only the clusters around them, over -B BACKING")
        ->option_text("NAME");
    register_output_format({"raw", {}, convert_raw, {}});
    for (auto& [name, format] : output_formats()) {
        if (format.add_options)
            format.add_options(*command);
    }
    return {command, [=] {
                auto format = output_formats().find(*output_format);
                if (format == output_formats().end()) {
                    std::string known;
                    for (const auto& [name, f] : output_formats())
                        known += (known.empty() ? "" : ", ") + name;
                    for (const char* planned : kPlannedFormats) {
                        if (*output_format == planned) {
                            throw UsageError(fmt::format("-O {} is not supported yet (this "
                                                         "build writes: {})",
                                                         planned, known));
                        }
                    }
                    throw UsageError(
                        fmt::format("-O: '{}' is not one of {}", printable(*output_format), known));
                }
                const std::uint64_t sparse = size_option("-S", *sparse_size);
                if (sparse % 512 != 0 || sparse > (16u << 20)) {
                    throw UsageError(fmt::format("invalid -S '{}': the sparse size must be a "
                                                 "multiple of 512 up to 16M (or 0 to turn zero "
                                                 "detection off)",
                                                 printable(*sparse_size)));
                }
                // Options of other output formats (-c, -o, -B, -F belong to -O qcow2).
                for (const auto& [name, other] : output_formats()) {
                    if (name == *output_format || !other.given_options)
                        continue;
                    if (std::string given = other.given_options(); !given.empty()) {
                        throw UsageError(
                            fmt::format("{} need{} -O {}", given,
                                        given.find(' ') == std::string::npos ? "s" : "", name));
                    }
                }
                if (!bitmap->empty() && *output_format == "raw" && *target == "-") {
                    throw UsageError("--bitmap with -O raw updates an existing raw copy: it "
                                     "needs a TARGET file or device");
                }
                auto image = open_or_report(*args);
                if (!image)
                    return static_cast<int>(kExitImageError);
                const ConvertJob job{*image,    *args,  *target,          *force,
                                     *progress, sparse, data_access(*io), *bitmap};
                // --salvage: a conversion that completed but read damaged ranges as zeros says
                // so with exit status 4.
                if (!bitmap->empty() && *output_format == "raw")
                    return salvage_exit(*image, convert_incremental(job, *bitmap));
                return salvage_exit(*image, format->second.run(job));
            }};
}

} // namespace qcowmap::cli

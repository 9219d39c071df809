// qcowmap convert: the virtual disk written out, raw (-O raw) or in a format registered by
// another file (apps/convert_*.cpp). The raw writing itself is the library's export_raw.
#include "cli.hpp"

#include <qcowmap/bitmap.hpp>
#include <qcowmap/export.hpp>
#include <qcowmap/format.hpp>
#include <qcowmap/lifecycle.hpp>

#include <fmt/format.h>

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
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

/// SIGINT, SIGTERM, SIGHUP: the hidden temporary an atomic output (a file TARGET on a file
/// system without O_TMPFILE) is being written under goes first, then the signal's default
/// action ends the process as it would have.
extern "C" void on_termination(int signal) {
    remove_temporary_files();
    ::signal(signal, SIG_DFL);
    ::raise(signal);
}

/// Installed by convert only: `mount` leaves these signals to libfuse, which installs its own
/// handlers only where none is set.
void remove_temporaries_on_termination() {
    for (int signal : {SIGINT, SIGTERM, SIGHUP}) {
        struct sigaction current {};
        // A signal the caller ignores (nohup) stays ignored.
        if (::sigaction(signal, nullptr, &current) != 0 || current.sa_handler == SIG_IGN)
            continue;
        struct sigaction action {};
        action.sa_handler = on_termination;
        sigemptyset(&action.sa_mask);
        ::sigaction(signal, &action, nullptr);
    }
}

/// Reports an export failure on the side it came from: the target (exit 3) or the image (1).
int report_export(const ConvertJob& job, const Error& error) {
    const std::string target = job.target == "-" ? "<stdout>" : job.target;
    return error.origin == ErrorOrigin::target
               ? report(target, error.message, kExitOutputError)
               : report_error(job.source.path, error, kExitImageError);
}

/// Opens TARGET, a device or a pipe (regular files go to export_raw_file), for a raw write:
/// block and character devices (/dev/sdX, an LVM volume, /dev/null) and FIFOs are written as
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

/// True when TARGET is (or would be) a regular file: a new name, an existing regular file, or a
/// symlink to either. Those are written atomically (export_raw_file); devices, pipes and
/// standard output are written in place.
bool regular_file_target(const ConvertJob& job) {
    if (job.target == "-")
        return false;
    struct stat st {};
    if (::stat(job.target.c_str(), &st) != 0)
        return errno == ENOENT; // a new file (or a dangling link to one)
    return S_ISREG(st.st_mode);
}

int convert_raw(const ConvertJob& job) {
    if (regular_file_target(job)) {
        // Under a temporary in the target's directory, named TARGET only once complete (as
        // -O qcow2): an interrupted run never leaves a plausible-looking TARGET.
        Progress meter(job.progress, job.image.size());
        ExportOptions options;
        options.zero_block = job.sparse_size;
        options.data_access = job.io;
        options.progress = meter.callback();
        Digest digest;
        options.digest = job.digest;
        options.digest_out = &digest;
        auto result = export_raw_file(job.image, job.target, options, job.force);
        if (!result)
            return report_export(job, result.error());
        meter.finish();
        return job.digest ? deliver_digest(job, digest) : kExitOk;
    }
    FdCloser target{open_target(job)};
    if (target.fd < 0)
        return kExitOutputError;
    Progress meter(job.progress, job.image.size());
    ExportOptions options;
    options.zero_block = job.sparse_size;
    options.data_access = job.io;
    options.sequential = job.target == "-";
    options.progress = meter.callback();
    Digest digest;
    options.digest = job.digest;
    options.digest_out = &digest;
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
    return job.digest ? deliver_digest(job, digest) : kExitOk;
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

/// `convert --bitmap=NAME IMAGE TARGET` where TARGET is an existing qcow2 image: the dirty
/// ranges written into it in place (apply_dirty), the copy staying a valid qcow2 image.
int convert_incremental_qcow2(const ConvertJob& job, const std::string& bitmap_name) {
    auto bitmap = DirtyBitmap::open(job.image, bitmap_name);
    if (!bitmap) {
        return report_error(job.source.path, bitmap.error(), kExitImageError);
    }
    Progress meter(job.progress, bitmap->dirty_bytes());
    ApplyDirtyOptions options;
    options.data_access = job.io;
    options.progress = meter.callback();
    auto result = apply_dirty(job.image, *bitmap, job.target, options);
    if (!result) {
        const Error& error = result.error();
        return error.origin == ErrorOrigin::target
                   ? report_error(job.target, error, kExitOutputError, ImageAccess::write)
                   : report_error(job.source.path, error, kExitImageError);
    }
    meter.finish();
    return kExitOk;
}

/// Whether TARGET of an incremental convert is an existing qcow2 image (written in place)
/// rather than a raw copy: the file probed as qemu-img probes an image given without -f.
bool is_existing_qcow2(const std::string& target) {
    if (target == "-")
        return false;
    auto format = probe_format(target);
    return format && *format == "qcow2";
}

} // namespace

int deliver_digest(const ConvertJob& job, const Digest& digest) {
    if (!job.digest)
        return kExitOk;
    if (job.digest_file.empty()) {
        std::fflush(stdout);
        const std::string line = digest_line(digest, *job.digest, job.target, false);
        std::fwrite(line.data(), 1, line.size(), stderr);
        std::fflush(stderr);
        return kExitOk;
    }
    // Complete or absent: written beside its final name, then renamed over it.
    const std::string line = digest_line(digest, *job.digest, job.target, true);
    std::string temp = job.digest_file + ".XXXXXX";
    const int fd = ::mkostemp(temp.data(), O_CLOEXEC);
    if (fd < 0)
        return report(job.digest_file, std::strerror(errno), kExitOutputError);
    bool ok = write_all(fd, line.data(), line.size());
    int error = ok ? 0 : errno;
    if (ok && ::fchmod(fd, 0644) != 0) {
        ok = false;
        error = errno;
    }
    if (::close(fd) != 0 && ok) {
        ok = false;
        error = errno;
    }
    if (ok && ::rename(temp.c_str(), job.digest_file.c_str()) != 0) {
        ok = false;
        error = errno;
    }
    if (!ok) {
        ::unlink(temp.c_str());
        return report(job.digest_file, std::strerror(error), kExitOutputError);
    }
    return kExitOk;
}

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
    auto* output_format_option =
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
                     "(like qemu-img convert -S: a multiple of 512 up to 16M; default 4k; 0: "
                     "no holes at all, a fully allocated file, as qemu-img -S 0)")
        ->option_text("SIZE");
    auto io = std::make_shared<std::string>("auto");
    add_io_option(*command, *io);
    auto digest = std::make_shared<std::string>();
    auto* digest_option =
        command
            ->add_option("--digest", *digest,
                         "Also print the digest of the disk written (as `qcowmap hash "
                         "--algo=ALGO TARGET` gives it), taken from the same pass over the "
                         "source: `HEX  TARGET` on stderr (any --algo of hash)")
            ->check(one_of_hash_algorithms())
            ->option_text("ALGO");
    auto digest_file = std::make_shared<std::string>();
    command
        ->add_option("--digest-file", *digest_file,
                     "Write that digest to this file instead, as `ALGO (TARGET) = HEX`, which "
                     "`qcowmap hash --check` verifies (sha256 unless --digest says)")
        ->option_text("PATH");
    auto bitmap = std::make_shared<std::string>();
    command
        ->add_option("--bitmap", *bitmap,
                     "Incremental: apply only the ranges this dirty bitmap marks dirty onto "
                     "TARGET, an existing copy of the same size (a raw file or device, or a qcow2 "
                     "image written in place); with -O qcow2 -B BACKING write a new image of only "
                     "the clusters around them, over BACKING")
        ->option_text("NAME");
    auto stream = std::make_shared<StreamArgs>();
    stream->add_to(*command);
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
                // --bitmap onto an existing qcow2 copy: written in place, so no -O qcow2
                // option applies (-B makes a new image of the dirty clusters instead).
                const bool qcow2_options_given = [&] {
                    auto qcow2 = output_formats().find("qcow2");
                    return qcow2 != output_formats().end() && qcow2->second.given_options &&
                           !qcow2->second.given_options().empty();
                }();
                const bool in_place_incremental =
                    !bitmap->empty() && !qcow2_options_given && args->path != "-" &&
                    (output_format_option->count() == 0 || *output_format == "qcow2") &&
                    is_existing_qcow2(*target);
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
                std::optional<HashAlgorithm> digest_algorithm;
                if (digest_option->count() > 0 || !digest_file->empty())
                    digest_algorithm = parse_hash_algorithm(digest->empty() ? "sha256" : *digest);
                if (digest_algorithm && !bitmap->empty()) {
                    throw UsageError("--digest takes the digest of a whole disk written out: "
                                     "not with --bitmap (an incremental update)");
                }
                remove_temporaries_on_termination();
                if (args->path == "-") { // read from standard input (apps/stream_input.cpp)
                    if (!bitmap->empty())
                        throw UsageError("--bitmap cannot read a stream's bitmaps");
                    if (digest_algorithm && *output_format == "raw") {
                        throw UsageError("--digest with - as SOURCE needs -O qcow2 for now (the "
                                         "raw copy of a stream takes none: hash it with "
                                         "`qcowmap hash -f raw`)");
                    }
                    StreamConvert job{*target, *force, *progress, sparse, {}};
                    if (*output_format != "raw") {
                        job.write_other = [=](const Image& image) {
                            const ConvertJob other{image,
                                                   *args,
                                                   *target,
                                                   *force,
                                                   *progress,
                                                   sparse,
                                                   data_access(*io),
                                                   {},
                                                   digest_algorithm,
                                                   *digest_file};
                            return format->second.run(other);
                        };
                    }
                    return convert_from_stream(*args, *stream, job);
                }
                if (stream->given())
                    throw UsageError("--max-spool, --expect-checksum and --stream-stats need - "
                                     "(standard input) as SOURCE");
                auto image = open_or_report(*args);
                if (!image)
                    return static_cast<int>(kExitImageError);
                const ConvertJob job{*image,           *args,       *target,          *force,
                                     *progress,        sparse,      data_access(*io), *bitmap,
                                     digest_algorithm, *digest_file};
                // --salvage: a conversion that completed but read damaged ranges as zeros says
                // so with exit status 4.
                if (in_place_incremental)
                    return salvage_exit(*image, convert_incremental_qcow2(job, *bitmap));
                if (!bitmap->empty() && *output_format == "raw")
                    return salvage_exit(*image, convert_incremental(job, *bitmap));
                return salvage_exit(*image, format->second.run(job));
            }};
}

} // namespace qcowmap::cli

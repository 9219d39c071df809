// qcowmap cat: the whole virtual disk, raw, to stdout.
#include "cli.hpp"

#include <fmt/format.h>

#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

namespace qcowmap::cli {

namespace {

/// Zeros reused for every zero run (never materialised per run).
alignas(4096) const std::byte kZeroChunk[1 << 20] = {};

/// Writes to stdout. Into a pipe, bytes that stay unchanged while we run (the image's mapping,
/// the zero chunk) are vmspliced: the pipe takes references to the pages instead of a copy,
/// which saves one of the two copies a pipe costs. Everything else, and any other kind of
/// stdout, goes through write().
class Output {
  public:
    Output() {
        struct stat st {};
        splice_ = ::fstat(STDOUT_FILENO, &st) == 0 && S_ISFIFO(st.st_mode);
        if (splice_) {
            // A bigger pipe means fewer round trips with the reader; refused is fine.
            (void)::fcntl(STDOUT_FILENO, F_SETPIPE_SZ, 1 << 20);
        }
    }

    /// False with errno set on failure.
    bool put(std::span<const std::byte> bytes, bool immutable) {
        if (!(splice_ && immutable))
            return write_all(STDOUT_FILENO, bytes.data(), bytes.size());
        while (!bytes.empty()) {
            iovec iov{const_cast<std::byte*>(bytes.data()), bytes.size()};
            ssize_t n = ::vmsplice(STDOUT_FILENO, &iov, 1, 0);
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                if (errno == EINVAL || errno == ENOSYS) { // not splice-able after all
                    splice_ = false;
                    return write_all(STDOUT_FILENO, bytes.data(), bytes.size());
                }
                return false;
            }
            bytes = bytes.subspan(static_cast<std::size_t>(n));
        }
        return true;
    }

    /// True when mapped bytes go to the pipe by reference (the kernel never reads them).
    bool splices() const { return splice_; }

  private:
    bool splice_ = false;
};

} // namespace

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
                const std::uint64_t to = length > UINT64_MAX - from ? UINT64_MAX : from + length;
                bool write_failed = false;
                Output output;
                auto result = image->visit(
                    from, to,
                    [&](const Run& run) -> Result<void> {
                        std::uint64_t run_length = run.length;
                        if (!run.bytes.empty()) {
                            if (!output.put(run.bytes, run.mapped)) {
                                // The kernel reading our mapping for write() faults with EFAULT
                                // when the image was truncated under us.
                                if (errno == EFAULT) {
                                    return Error{ErrorCode::io_error, kImageChanged};
                                }
                                write_failed = true;
                                return Error{ErrorCode::io_error, std::strerror(errno)};
                            }
                            return {};
                        }
                        while (run_length > 0) {
                            std::size_t n = std::min<std::uint64_t>(run_length, sizeof kZeroChunk);
                            if (!output.put({kZeroChunk, n}, true)) {
                                write_failed = true;
                                return Error{ErrorCode::io_error, std::strerror(errno)};
                            }
                            run_length -= n;
                        }
                        return {};
                    },
                    // The workers map the pages ahead; write() reads them, vmsplice does not.
                    VisitOptions{worker_threads(), DataAccess::mapping,
                                 output.splices() ? Prefetch::populate : Prefetch::touch});
                if (!result) {
                    return write_failed
                               ? report("<stdout>", result.error().message, kExitOutputError)
                               : report_error(args->path, result.error(), kExitImageError);
                }
                return salvage_exit(*image, kExitOk);
            }};
}

} // namespace qcowmap::cli

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

/// One page of zeros reused for every zero run (never materialised per run).
extern const std::byte kZeroChunk[1 << 20];
alignas(4096) const std::byte kZeroChunk[1 << 20] = {};

namespace {

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
    auto* command = app.add_subcommand("cat", "Write the whole virtual disk, raw, to stdout");
    auto args = std::make_shared<ImageArgs>();
    args->add_to(*command);
    return {command, [args] {
                auto image = open_or_report(*args);
                if (!image)
                    return static_cast<int>(kExitImageError);
                bool write_failed = false;
                Output output;
                auto result = image->visit(
                    0, UINT64_MAX,
                    [&](const Run& run) -> Result<void> {
                        std::uint64_t length = run.length;
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
                        while (length > 0) {
                            std::size_t n = std::min<std::uint64_t>(length, sizeof kZeroChunk);
                            if (!output.put({kZeroChunk, n}, true)) {
                                write_failed = true;
                                return Error{ErrorCode::io_error, std::strerror(errno)};
                            }
                            length -= n;
                        }
                        return {};
                    },
                    // The workers map the pages ahead; write() reads them, vmsplice does not.
                    VisitOptions{worker_threads(), DataAccess::mapping,
                                 output.splices() ? Prefetch::populate : Prefetch::touch});
                if (!result) {
                    return write_failed
                               ? report("<stdout>", result.error().message, kExitOutputError)
                               : report(args->path, result.error().message, kExitImageError);
                }
                return static_cast<int>(kExitOk);
            }};
}

} // namespace qcowmap::cli

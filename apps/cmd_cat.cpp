// qcowmap cat: the whole virtual disk, raw, to stdout.
#include "cli.hpp"

#include <fmt/format.h>

#include <cerrno>
#include <cstring>
#include <unistd.h>

namespace qcowmap::cli {

/// One page of zeros reused for every zero run (never materialised per run).
extern const std::byte kZeroChunk[1 << 20];
alignas(4096) const std::byte kZeroChunk[1 << 20] = {};

Command add_cat(CLI::App& app) {
    auto* command = app.add_subcommand("cat", "Write the whole virtual disk, raw, to stdout");
    auto args = std::make_shared<ImageArgs>();
    args->add_to(*command);
    return {command, [args] {
                auto image = open_or_report(*args);
                if (!image) return static_cast<int>(kExitImageError);
                bool write_failed = false;
                auto result = image->visit_runs_parallel(
                    0, UINT64_MAX, worker_threads(),
                    [&](std::uint64_t, std::uint64_t length,
                        std::span<const std::byte> bytes) -> Result<void> {
                        if (!bytes.empty()) {
                            if (!write_all(STDOUT_FILENO, bytes.data(), bytes.size())) {
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
                            if (!write_all(STDOUT_FILENO, kZeroChunk, n)) {
                                write_failed = true;
                                return Error{ErrorCode::io_error, std::strerror(errno)};
                            }
                            length -= n;
                        }
                        return {};
                    });
                if (!result) {
                    return write_failed
                               ? report("<stdout>", result.error().message, kExitOutputError)
                               : report(args->path, result.error().message, kExitImageError);
                }
                return static_cast<int>(kExitOk);
            }};
}

} // namespace qcowmap::cli

// Internals of the qcow2 writer shared by writer.cpp and the white-box tests.
#pragma once

#include "writer_layout.hpp"

#include <qcowmap/image.hpp>
#include <qcowmap/writer.hpp>

#include <cstddef>
#include <cstdint>
#include <fcntl.h>
#include <span>
#include <string_view>
#include <vector>

namespace qcowmap::detail::writer {

/// An io_error about the output: ErrorOrigin::target, message starting with kWriteTargetError
/// (target_errno: strerror(error), the errno kept).
Error target_error(std::string_view what);
Error target_errno(int error);

/// True when every byte is zero; stops at the first that is not.
bool all_zero(std::span<const std::byte> bytes);

/// The guest clusters the output holds, in disk order: the selection widened to whole
/// clusters; with `scan`, data clusters whose bytes are all zero count as zero (left out of a
/// flattened image, zero clusters in an overlay). Errors: those of the extent walk and of
/// opening the bitmap.
Result<std::vector<PlanRun>> make_plan(const Image& image, const Geometry& geometry,
                                       const WriteOptions& options, bool scan);

/// The target descriptor: a regular file (written by position from 0, holes for zeros), a
/// block device (by position, zeros written), a pipe (written in order, data spliced from the
/// source file) or another stream (written in order, data sent with sendfile). Small writes
/// are gathered into a 1 MiB buffer.
class Output {
  public:
    static Result<Output> open(int fd);

    bool seekable() const { return kind_ == Kind::file || kind_ == Kind::device; }
    bool sparse() const { return kind_ == Kind::file; }
    /// Bytes written so far (the position of the next sequential write).
    std::uint64_t position() const { return flushed_ + buffer_.size(); }

    /// Appends `bytes`.
    Result<void> write(std::span<const std::byte> bytes);
    /// Appends `length` zero bytes (a hole in a regular file).
    Result<void> zeros(std::uint64_t length);
    /// Appends `bytes`, which are the file contents at `from`: copied inside the kernel where
    /// the two ends allow it, else written from memory.
    Result<void> copy(const FilePosition& from, std::span<const std::byte> bytes);
    /// Seekable targets: appends `bytes` at `offset` (at or past the current position).
    Result<void> write_at(std::span<const std::byte> bytes, std::uint64_t offset) {
        if (offset != position()) {
            if (auto ok = seek_to(offset); !ok)
                return ok;
        }
        return write(bytes);
    }
    /// Seekable targets: the next sequential write goes to `offset`.
    Result<void> seek_to(std::uint64_t offset) {
        if (auto ok = flush(); !ok)
            return ok;
        flushed_ = offset;
        return {};
    }
    /// Seekable targets: writes `bytes` at `offset` now, outside the sequential stream.
    Result<void> pwrite_at(std::span<const std::byte> bytes, std::uint64_t offset);
    /// Flushes and, for a regular file, sets its size.
    Result<void> finish(std::uint64_t size);
    /// Hands the gathered small writes to the kernel.
    Result<void> flush();
    /// When the image will be synced at the end (the safe file target), starts writing back
    /// `[offset, offset + length)` (0, 0: the whole file) now, so that the final fsync does not
    /// find the whole image dirty. Best effort: errors show at the fsync.
    void start_writeback(std::uint64_t offset, std::uint64_t length) {
        if (early_writeback_ && kind_ == Kind::file)
            (void)::sync_file_range(fd_, static_cast<off64_t>(offset), static_cast<off64_t>(length),
                                    SYNC_FILE_RANGE_WRITE);
    }
    void set_early_writeback(bool on) { early_writeback_ = on; }
    /// Seekable targets: another writer of the same descriptor whose sequential writes start
    /// at `offset` (for writing separate parts of the file from several threads).
    Output clone_at(std::uint64_t offset) const {
        Output other;
        other.fd_ = fd_;
        other.kind_ = kind_;
        other.flushed_ = offset;
        other.in_kernel_failed_ = in_kernel_failed_;
        other.early_writeback_ = early_writeback_;
        return other;
    }

  private:
    enum class Kind : std::uint8_t { file, device, pipe, stream };
    static constexpr std::size_t kBufferBytes = 1 << 20;

    int fd_ = -1;
    Kind kind_ = Kind::stream;
    std::uint64_t flushed_ = 0; // bytes handed to the kernel (position of buffer_[0])
    std::vector<std::byte> buffer_;
    std::vector<std::byte> bounce_; // copies that the kernel could not do
    bool in_kernel_failed_ = false;
    bool early_writeback_ = false;
};

/// write_qcow2, with `early_writeback` for a target that is synced afterwards.
Result<WriteStats> write_image(const Image& source, int fd, const WriteOptions& options,
                               bool early_writeback);

Result<WriteStats> write_sequential(const Image& image, Output& out, const Geometry& geometry,
                                    const HeaderFields& fields, const WriteOptions& options);
Result<WriteStats> write_compressed(const Image& image, Output& out, const Geometry& geometry,
                                    const HeaderFields& fields, const WriteOptions& options);

} // namespace qcowmap::detail::writer

// Compresses one qcow2 cluster the way qemu's reader expects it (block/qcow2-threads.c).
#pragma once

#include <qcowmap/image.hpp>

#include <cstddef>
#include <memory>
#include <optional>
#include <span>

namespace qcowmap::detail {

/// One compressor per thread: holds the encoder state and scratch memory.
///
/// zlib clusters are raw deflate streams with a 4 KiB window, because qemu inflates them with
/// `inflateInit2(-12)`: a back-reference farther than 4 KiB would make qemu fail. They come
/// from ISA-L's igzip at level 1 with `hist_bits = 12` when the build has it (about 25x faster
/// than zlib here, same size), else from zlib's `deflateInit2(..., -12, 9, ...)` as qemu
/// compresses. zstd clusters are one frame each at zstd's default level (qemu's).
class ClusterCompressor {
  public:
    explicit ClusterCompressor(CompressionType type);
    ~ClusterCompressor();
    ClusterCompressor(ClusterCompressor&&) noexcept;
    ClusterCompressor& operator=(ClusterCompressor&&) noexcept;

    /// Compresses `in` into `out` and returns the stream's length, or nullopt when the stream
    /// does not fit in `out` (callers pass `cluster_size - 1` bytes, qemu's limit, and store the
    /// cluster uncompressed then) or the encoder failed.
    std::optional<std::size_t> compress(std::span<const std::byte> in, std::span<std::byte> out);

    /// Which deflate encoder this build uses for zlib clusters: "isa-l" or "zlib".
    static const char* deflate_engine();

  private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

} // namespace qcowmap::detail

// qcowmap — runs of the virtual disk as the extent iterator yields them.
#pragma once

#if !defined(__cplusplus) || __cplusplus < 202002L
#error "qcowmap needs C++20: compile with -std=c++20 (Meson: cpp_std=c++20)"
#endif

#include <qcowmap/result.hpp>
#include <qcowmap/walk_range.hpp>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string_view>

namespace qcowmap {

namespace detail {
struct ImageState;
}

/// How the bytes of an extent are obtained.
enum class ExtentKind : std::uint8_t {
    /// Allocated data: `Extent::bytes` holds exactly `length` bytes, straight from the mapping.
    data,
    /// Reads as zeros; no bytes. Covers zero clusters/subclusters and ranges no layer allocates
    /// (then `present` is false).
    zero,
    /// One compressed cluster (or the part of it inside the requested range): `Extent::bytes` is
    /// the compressed stream in the mapping; decompress it with a `Decompressor`.
    compressed,
};

/// "data", "zero" or "compressed" (the names the Python binding and JSON output use).
std::string_view to_string(ExtentKind kind);

/// Where bytes live in a file: lets a consumer read them with pread(2) or copy them inside the
/// kernel (copy_file_range(2), splice(2)) instead of touching the mapping.
struct FilePosition {
    int fd = -1;              ///< the layer's (or data file's) descriptor, owned by the Image
    std::uint64_t offset = 0; ///< file offset of the first byte
};

/// A run of the virtual disk `[offset, offset + length)` whose bytes are all obtained one way.
///
/// Spans point into the image's mapping and stay valid as long as any copy of the `Image` that
/// produced the extent is alive (and the file is not modified while mapped).
struct Extent {
    std::uint64_t offset = 0; ///< start in the virtual disk
    std::uint64_t length = 0; ///< bytes of the virtual disk covered, never 0
    ExtentKind kind = ExtentKind::zero;
    /// False where no layer allocates the range (it reads as zeros). Mirrors qemu-img map's
    /// "present".
    bool present = false;
    /// Which layer supplied the range: 0 is the image itself. Ranges that no layer allocates
    /// report the bottom layer's depth, as qemu-img map does.
    std::uint32_t depth = 0;
    /// data: the `length` bytes of the run. compressed: the whole compressed stream of the
    /// cluster (possibly covering more than `length` bytes once decompressed). zero: empty.
    std::span<const std::byte> bytes;
    /// Where the run starts in its host file, when there is such a place: always for data, and
    /// for zero runs that keep a preallocated host cluster or lie in a hole of a raw layer.
    /// Never for compressed runs (their stream offset is `compressed_host_offset`). The host
    /// file is the layer's own file, or its external data file when it has one.
    std::optional<std::uint64_t> host_offset;
    /// compressed only: file offset of the compressed stream (not sector-aligned in general).
    std::uint64_t compressed_host_offset = 0;
    /// compressed only: where `offset` falls inside the decompressed cluster.
    std::uint64_t offset_in_cluster = 0;
    /// data only: the descriptor and offset of `bytes` in the file that holds them (the layer's
    /// file or its external data file), for pread, copy_file_range or splice. Use it with
    /// positioned calls only, never move the descriptor's file position; it stays open while
    /// the Image lives. nullopt for images opened from memory.
    std::optional<FilePosition> file;
};

namespace detail {

/// The machinery of `ExtentRange`: walks L1/L2 in place in the mapping and merges runs.
/// Library-internal; use `Image::extents()`.
class ExtentWalk {
  public:
    using value_type = Extent;
    ExtentWalk(std::shared_ptr<const ImageState> state, std::uint64_t start, std::uint64_t end);
    /// Produces the next extent into `out`. False at the end of the range or on error.
    bool next(Extent& out);
    const std::optional<Error>& error() const { return error_; }
    /// Where the next extent will start (the end of the range once it is done).
    std::uint64_t position() const { return position_; }

  private:
    bool fail(Error error);
    bool step(Extent& out); // next() inside the fault boundary

    std::shared_ptr<const ImageState> state_;
    std::uint64_t position_ = 0;
    std::uint64_t end_ = 0;
    std::optional<Error> error_;
    std::optional<Error> deferred_error_; // met while merging: reported after the good run
};

} // namespace detail

/// The extents of a range of the virtual disk, in order, as a single-pass input range
/// (`Image::extents`). Adjacent runs merge when they are of the same kind, presence and depth
/// and (where they have a host offset) continue contiguously in the file; each compressed
/// cluster is its own extent. After the loop, `error()` says whether the walk stopped early
/// (a malformed table or cluster descriptor); it then yields nothing more. A range keeps the
/// image's mapping alive, so the extents' spans stay valid as long as the range or any copy of
/// the Image lives.
using ExtentRange = WalkRange<detail::ExtentWalk>;

} // namespace qcowmap

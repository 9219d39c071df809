// qcowmap — runs of the virtual disk as the extent iterator yields them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>

namespace qcowmap {

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
};

} // namespace qcowmap

// qcowmap — the allocation map in qemu-img's terms.
#pragma once

#if !defined(__cplusplus) || __cplusplus < 202002L
#error "qcowmap needs C++20: compile with -std=c++20 (Meson: cpp_std=c++20)"
#endif

#include <qcowmap/image.hpp>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>

namespace qcowmap {

/// One range of `qemu-img map --output=json`, with the same meaning for each field.
struct MapEntry {
    std::uint64_t start = 0;
    std::uint64_t length = 0;
    std::uint32_t depth = 0;
    bool present = false;
    bool zero = false;
    bool data = false;
    bool compressed = false;
    std::optional<std::uint64_t> offset; ///< host offset, where the range is readable raw there

    bool operator==(const MapEntry&) const = default;
};

struct MapOptions {
    std::uint64_t start = 0;
    std::uint64_t length = UINT64_MAX; ///< clipped to the virtual size
    /// Report data clusters that sit in holes of the host file as `zero` (qemu does this for
    /// images it detects as metadata-preallocated, see `looks_metadata_preallocated`).
    /// Needs `Image::path()`; ignored for images opened from memory.
    bool probe_host_holes = true;
};

/// Calls `sink` with the map entries of the range in order, merged exactly as qemu-img merges
/// them (same flags and depth, and host offsets continuing contiguously). A sink returning an
/// error stops the walk and that error is returned.
Result<void> map_image(const Image& image, const MapOptions& options,
                       const std::function<Result<void>(const MapEntry&)>& sink);

class DirtyBitmap;

/// Like `map_image`, restricted to the ranges `bitmap` marks dirty: the entries
/// `map_image(image, {start, length})` gives for each dirty range of `[options.start,
/// options.start + options.length)` on its own (entries are clipped to the dirty ranges and
/// never cross their edges). One walk of the map from the first dirty byte; it ends at the last
/// dirty byte. Errors: those of `map_image`, or the sink's own.
Result<void> map_dirty(const Image& image, const DirtyBitmap& bitmap, const MapOptions& options,
                       const std::function<Result<void>(const MapEntry&)>& sink);

/// The file that holds the bytes of map entries of layer `depth` (0 = the image itself), the
/// file their `offset` points into: the layer's external data file when it has one, else the
/// layer's own file, named as opened (a relative backing name joined to the directory of the
/// image naming it, as qemu-img map's "File" column shows it). Empty for images opened from
/// memory and for depths below the bottom of the chain.
std::filesystem::path map_file(const Image& image, std::uint32_t depth);

/// qemu's heuristic (qcow2_detect_metadata_preallocation): the image references clearly more
/// clusters than its host file has allocated, so data clusters may be holes that read as zero.
bool looks_metadata_preallocated(const Image& image);

/// The reference count of host cluster `cluster_index`, from the refcount table and blocks.
/// Errors: invalid_table when a refcount block is unaligned or lies beyond the end of file.
Result<std::uint64_t> refcount_of(const Image& image, std::uint64_t cluster_index);

} // namespace qcowmap

// What an open Image holds: the mapping and the validated, decoded metadata. Immutable.
#pragma once

#include "bytes.hpp"
#include "mapped_file.hpp"

#include <qcowmap/image.hpp>

#include <optional>

namespace qcowmap::detail {

// L1 and standard L2 entry fields (spec "Cluster mapping").
inline constexpr std::uint64_t kL1OffsetMask = 0x00fffffffffffe00ULL;           // bits 9-55
inline constexpr std::uint64_t kL1ReservedMask = 0x7f000000000001ffULL;         // bits 0-8, 56-62
inline constexpr std::uint64_t kL2OffsetMask = 0x00fffffffffffe00ULL;           // bits 9-55
inline constexpr std::uint64_t kL2StandardReservedMask = 0x3f000000000001feULL; // bits 1-8, 56-61
inline constexpr std::uint64_t kL2ZeroFlag = 1ULL << 0;
inline constexpr std::uint64_t kL2CompressedFlag = 1ULL << 62;
inline constexpr std::uint64_t kL2CopiedFlag = 1ULL << 63;
inline constexpr std::uint64_t kV1CompressedFlag = 1ULL << 63; // qcow version 1 L2 entries
inline constexpr std::uint64_t kCompressedSectorSize = 512;
inline constexpr unsigned kSubclustersPerCluster = 32;

enum class LayerFormat { qcow2, raw };

/// One layer of a chain: a qcow2/qcow image or a raw file, with the layer below it.
struct ImageState {
    LayerFormat format = LayerFormat::qcow2;
    std::shared_ptr<const MappedFile> file; // null for open_bytes
    Bytes bytes;
    std::filesystem::path path;
    ImageInfo info;
    /// Size of the disk this layer presents: the header's, or the opened snapshot's, or the
    /// raw file's size.
    std::uint64_t disk_size = 0;
    /// Where guest data clusters live: `bytes`, or the external data file's mapping.
    std::shared_ptr<const MappedFile> data_file;
    Bytes data_bytes;
    /// The external data file as resolved (empty when the layer has none or names none), and
    /// why it could not be opened (only with OpenOptions::require_data_file false).
    std::filesystem::path data_file_path;
    std::optional<Error> data_file_error;
    /// The layer below (null at the bottom of the chain or with BackingMode::none).
    std::shared_ptr<const ImageState> backing;
    /// The internal snapshot opened instead of the active disk (name or ID as asked), if any.
    std::optional<std::string> snapshot;

    bool has_data_file() const { return (info.incompatible_features & kIncompatDataFile) != 0; }
    int fd() const { return file ? file->fd() : -1; }
    int data_fd() const { return data_file ? data_file->fd() : fd(); }

    // Derived geometry.
    unsigned cluster_bits = 16;
    std::uint64_t cluster_size = 0;
    unsigned l2_entry_bytes = 8;      // 16 with extended L2 entries
    unsigned l2_bits = 13;            // log2(entries per L2 table)
    unsigned subcluster_bits = 16;    // log2(subcluster size); == cluster_bits without extended L2
    std::uint64_t l2_table_bytes = 0; // one cluster, except in qcow version 1
    Bytes l1_table;                   // the active L1 table, already bounds-checked

    // Compressed cluster descriptor layout (spec "Compressed Clusters Descriptor").
    unsigned csize_shift = 0;       // x = 62 - (cluster_bits - 8)
    std::uint64_t csize_mask = 0;   // additional sector count field
    std::uint64_t coffset_mask = 0; // host offset field

    /// Parse encrypted images instead of refusing them (check reads only their metadata).
    bool allow_encrypted = false;

    std::uint64_t l2_coverage() const { return std::uint64_t{1} << (l2_bits + cluster_bits); }
};

/// The layer `depth` steps below `top` (0 is `top` itself), or null.
inline const ImageState* layer_at(const ImageState& top, std::uint32_t depth) {
    const ImageState* layer = &top;
    while (layer && depth-- > 0) {
        layer = layer->backing.get();
    }
    return layer;
}

/// Reads `out.size()` bytes at `position` with pread, retrying short reads and EINTR. A read
/// error or the end of the file (a file cut short under its mapping) is an io_error naming
/// the offset.
Result<void> read_exactly(const FilePosition& position, std::span<std::byte> out);

/// Points the state at snapshot `wanted` (ID first, then name): its L1 table and size.
Result<void> select_snapshot(ImageState& state, const std::string& wanted);

/// Parses and validates the header and L1 table of a qcow version 1 image (block/qcow.c).
Result<void> parse_v1_image(ImageState& state);

/// Parses and validates the header, extensions and active L1 table of `state.bytes` into
/// `state` (everything but `file`/`path`).
Result<void> parse_image(ImageState& state);

} // namespace qcowmap::detail

namespace qcowmap {
/// The state behind an Image, for the library's own modules (map, parallel visit).
const detail::ImageState& detail_state(const Image& image);
} // namespace qcowmap

// The one definition of the qcow2 format (QEMU's docs/interop/qcow2.txt; qemu's block/qcow2.h,
// block/qcow2-bitmap.c, block/qcow.c): on-disk constants, field offsets, qemu's limits, and each
// structure's decoder beside its encoder. The reader (header, extensions, snapshot table, bitmap
// directory, cluster lookup), the checker and the writer all go through this header, so that a
// field's offset or bit range is written down once. Public constants (feature bits, bitmap flags,
// header extension types) live in <qcowmap/info.hpp> and <qcowmap/format.hpp> and are used here.
#pragma once

#include "bytes.hpp"

#include <qcowmap/format.hpp>
#include <qcowmap/info.hpp>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

namespace qcowmap::detail {

inline constexpr std::uint64_t align_up8(std::uint64_t value) {
    return (value + 7) & ~std::uint64_t{7};
}

// ---------------------------------------------------------------------------------------------
// The header (spec "Header"). The magic "QFI\xfb" is shared by qcow2 and qcow version 1.
inline constexpr std::uint32_t kQcowMagic = 0x514649fb;

/// Field offsets of the version 2/3 header.
namespace header {
inline constexpr std::size_t kMagic = 0;
inline constexpr std::size_t kVersion = 4;
inline constexpr std::size_t kBackingFileOffset = 8;
inline constexpr std::size_t kBackingFileSize = 16;
inline constexpr std::size_t kClusterBits = 20;
inline constexpr std::size_t kSize = 24;
inline constexpr std::size_t kCryptMethod = 32;
inline constexpr std::size_t kL1Size = 36;
inline constexpr std::size_t kL1TableOffset = 40;
inline constexpr std::size_t kRefcountTableOffset = 48;
inline constexpr std::size_t kRefcountTableClusters = 56;
inline constexpr std::size_t kNbSnapshots = 60;
inline constexpr std::size_t kSnapshotsOffset = 64;
// Version 3 only.
inline constexpr std::size_t kIncompatibleFeatures = 72;
inline constexpr std::size_t kCompatibleFeatures = 80;
inline constexpr std::size_t kAutoclearFeatures = 88;
inline constexpr std::size_t kRefcountOrder = 96;
inline constexpr std::size_t kHeaderLength = 100;
/// Present when header_length > 104 (spec "Additional fields").
inline constexpr std::size_t kCompressionType = 104;
} // namespace header

inline constexpr std::uint32_t kV2HeaderLength = 72;
inline constexpr std::uint32_t kMinV3HeaderLength = 104;
/// What qemu writes for version 3: the compression type byte, padded to 8 (QCowHeader).
inline constexpr std::uint32_t kV3HeaderLength = 112;

/// The fixed part of a version 2/3 header as stored (no validation).
struct DiskHeader {
    std::uint32_t version = 3;
    std::uint64_t backing_file_offset = 0;
    std::uint32_t backing_file_size = 0;
    std::uint32_t cluster_bits = 16;
    std::uint64_t size = 0;
    std::uint32_t crypt_method = 0;
    std::uint32_t l1_size = 0;
    std::uint64_t l1_table_offset = 0;
    std::uint64_t refcount_table_offset = 0;
    std::uint32_t refcount_table_clusters = 0;
    std::uint32_t nb_snapshots = 0;
    std::uint64_t snapshots_offset = 0;
    // Version 3 (zero for version 2).
    std::uint64_t incompatible_features = 0;
    std::uint64_t compatible_features = 0;
    std::uint64_t autoclear_features = 0;
    std::uint32_t refcount_order = 4;
    std::uint32_t header_length = kV3HeaderLength;
    std::uint8_t compression_type = 0; ///< only when header_length > kCompressionType
};

/// Decodes the header in `h`, which holds at least kV2HeaderLength bytes (version 2) or
/// kMinV3HeaderLength bytes (version 3), plus the compression type byte when header_length
/// says it is there and `h` holds it.
inline DiskHeader decode_header(Bytes h) {
    DiskHeader f;
    f.version = load_be32(h, header::kVersion);
    f.backing_file_offset = load_be64(h, header::kBackingFileOffset);
    f.backing_file_size = load_be32(h, header::kBackingFileSize);
    f.cluster_bits = load_be32(h, header::kClusterBits);
    f.size = load_be64(h, header::kSize);
    f.crypt_method = load_be32(h, header::kCryptMethod);
    f.l1_size = load_be32(h, header::kL1Size);
    f.l1_table_offset = load_be64(h, header::kL1TableOffset);
    f.refcount_table_offset = load_be64(h, header::kRefcountTableOffset);
    f.refcount_table_clusters = load_be32(h, header::kRefcountTableClusters);
    f.nb_snapshots = load_be32(h, header::kNbSnapshots);
    f.snapshots_offset = load_be64(h, header::kSnapshotsOffset);
    if (f.version < 3) {
        f.refcount_order = 4; // version 2: 16-bit refcounts (spec)
        f.header_length = kV2HeaderLength;
        return f;
    }
    f.incompatible_features = load_be64(h, header::kIncompatibleFeatures);
    f.compatible_features = load_be64(h, header::kCompatibleFeatures);
    f.autoclear_features = load_be64(h, header::kAutoclearFeatures);
    f.refcount_order = load_be32(h, header::kRefcountOrder);
    f.header_length = load_be32(h, header::kHeaderLength);
    if (f.header_length > header::kCompressionType && h.size() > header::kCompressionType)
        f.compression_type = load_u8(h, header::kCompressionType);
    return f;
}

/// Encodes the header at `h`: version 2 its kV2HeaderLength bytes, version 3 its
/// `f.header_length` bytes (at least kV3HeaderLength).
inline void encode_header(const DiskHeader& f, std::byte* h) {
    store_be32(h + header::kMagic, kQcowMagic);
    store_be32(h + header::kVersion, f.version);
    store_be64(h + header::kBackingFileOffset, f.backing_file_offset);
    store_be32(h + header::kBackingFileSize, f.backing_file_size);
    store_be32(h + header::kClusterBits, f.cluster_bits);
    store_be64(h + header::kSize, f.size);
    store_be32(h + header::kCryptMethod, f.crypt_method);
    store_be32(h + header::kL1Size, f.l1_size);
    store_be64(h + header::kL1TableOffset, f.l1_table_offset);
    store_be64(h + header::kRefcountTableOffset, f.refcount_table_offset);
    store_be32(h + header::kRefcountTableClusters, f.refcount_table_clusters);
    store_be32(h + header::kNbSnapshots, f.nb_snapshots);
    store_be64(h + header::kSnapshotsOffset, f.snapshots_offset);
    if (f.version < 3)
        return; // the extension area starts here
    store_be64(h + header::kIncompatibleFeatures, f.incompatible_features);
    store_be64(h + header::kCompatibleFeatures, f.compatible_features);
    store_be64(h + header::kAutoclearFeatures, f.autoclear_features);
    store_be32(h + header::kRefcountOrder, f.refcount_order);
    store_be32(h + header::kHeaderLength, f.header_length);
    h[header::kCompressionType] = static_cast<std::byte>(f.compression_type);
}

// ---------------------------------------------------------------------------------------------
// qemu's limits (block/qcow2.h; checked by qcow2_do_open and the writer alike).
inline constexpr unsigned kMinClusterBits = 9;            // MIN_CLUSTER_BITS
inline constexpr unsigned kMaxClusterBits = 21;           // MAX_CLUSTER_BITS
inline constexpr unsigned kMinExtendedL2ClusterBits = 14; // subclusters of at least 512 bytes
inline constexpr unsigned kMaxRefcountOrder = 6;          // 64-bit refcounts
inline constexpr unsigned kMaxCryptMethod = 2;            // QCOW_CRYPT_LUKS
inline constexpr std::uint64_t kMaxL1Bytes = 32ULL << 20; // QCOW_MAX_L1_SIZE
inline constexpr std::uint64_t kMaxRefcountTableBytes = 8ULL << 20;  // QCOW_MAX_REFTABLE_SIZE
inline constexpr std::uint32_t kMaxSnapshots = 65536;                // QCOW_MAX_SNAPSHOTS
inline constexpr std::uint64_t kMaxSnapshotTableBytes = 64ULL << 20; // QCOW_MAX_SNAPSHOTS_SIZE
inline constexpr std::uint32_t kMaxSnapshotExtraData = 1024;         // QCOW_MAX_SNAPSHOT_EXTRA_DATA
inline constexpr std::uint32_t kMaxBitmaps = 65535;                  // QCOW2_MAX_BITMAPS
inline constexpr std::uint64_t kMaxBitmapDirectorySize = 1024ULL * kMaxBitmaps;
inline constexpr std::uint32_t kMaxBackingNameLength = 1023;      // inside the first cluster too
inline constexpr std::uint32_t kMaxBackingFormatLength = 15;      // qemu keeps it in char[16]
inline constexpr std::uint64_t kMaxHostOffset = (1ULL << 56) - 1; // QCOW_MAX_CLUSTER_OFFSET
/// qemu passes table offsets around as int64_t: a table must end below 2^63
/// (qcow2_validate_table).
inline constexpr std::uint64_t kMaxTableEnd = std::uint64_t{INT64_MAX};

// ---------------------------------------------------------------------------------------------
// Feature bits (the bits themselves: <qcowmap/info.hpp>) and their names.
inline constexpr std::uint64_t kKnownIncompatible = kIncompatDirty | kIncompatCorrupt |
                                                    kIncompatDataFile | kIncompatCompressionType |
                                                    kIncompatExtendedL2;

struct KnownFeature {
    FeatureName::Type type;
    std::uint8_t bit;
    std::string_view name;
};
/// The names qemu 7.2 writes into the feature name table (qcow2_update_header): `info` falls
/// back on them, the writer stores them.
inline constexpr std::array<KnownFeature, 8> kKnownFeatures = {{
    {FeatureName::Type::incompatible, 0, "dirty bit"},
    {FeatureName::Type::incompatible, 1, "corrupt bit"},
    {FeatureName::Type::incompatible, 2, "external data file"},
    {FeatureName::Type::incompatible, 3, "compression type"},
    {FeatureName::Type::incompatible, 4, "extended L2 entries"},
    {FeatureName::Type::compatible, 0, "lazy refcounts"},
    {FeatureName::Type::autoclear, 0, "bitmaps"},
    {FeatureName::Type::autoclear, 1, "raw external data"},
}};

// ---------------------------------------------------------------------------------------------
// Header extensions (spec "Header extensions"; the types: <qcowmap/format.hpp>): a 4-byte type,
// a 4-byte length, the data, zero padding to a multiple of 8. Type 0 ends the area.
inline constexpr std::uint32_t kExtensionEnd = 0x00000000;
inline constexpr std::size_t kExtensionHeaderSize = 8;

struct ExtensionName {
    std::uint32_t type;
    std::string_view name;
};
/// What `info` calls each known extension (header_extension_name).
inline constexpr std::array<ExtensionName, 5> kExtensionNames = {{
    {kExtensionBackingFormat, "backing file format"},
    {kExtensionFeatureNames, "feature name table"},
    {kExtensionBitmaps, "bitmaps"},
    {kExtensionEncryption, "full disk encryption header"},
    {kExtensionDataFile, "external data file"},
}};

struct ExtensionHeader {
    std::uint32_t type = 0;
    std::uint32_t length = 0;
};
/// `p` holds kExtensionHeaderSize bytes.
inline ExtensionHeader decode_extension_header(const std::byte* p) {
    return {load_be32(p), load_be32(p + 4)};
}
/// Writes an extension's type, length and `data` at `p`; returns the bytes taken, padding
/// included (the padding bytes must already be zero).
inline std::size_t encode_extension(std::byte* p, std::uint32_t type,
                                    std::span<const std::byte> data) {
    store_be32(p, type);
    store_be32(p + 4, static_cast<std::uint32_t>(data.size()));
    std::copy(data.begin(), data.end(), p + kExtensionHeaderSize);
    return kExtensionHeaderSize + align_up8(data.size());
}

/// Feature name table entries: type (1 byte), bit (1 byte), name (46 bytes, NUL padded).
inline constexpr std::size_t kFeatureNameEntrySize = 48;
inline constexpr std::size_t kFeatureNameLength = 46;
inline void encode_feature_name(std::byte* p, const KnownFeature& f) {
    p[0] = static_cast<std::byte>(f.type);
    p[1] = static_cast<std::byte>(f.bit);
    std::copy_n(reinterpret_cast<const std::byte*>(f.name.data()),
                std::min(f.name.size(), kFeatureNameLength), p + 2);
}

/// The bitmaps extension's data (spec "Bitmaps extension").
inline constexpr std::size_t kBitmapsExtensionSize = 24;
struct BitmapsExtensionFields {
    std::uint32_t nb_bitmaps = 0;
    std::uint32_t reserved = 0;
    std::uint64_t directory_size = 0;
    std::uint64_t directory_offset = 0;
};
/// `p` holds kBitmapsExtensionSize bytes.
inline BitmapsExtensionFields decode_bitmaps_extension(const std::byte* p) {
    return {load_be32(p), load_be32(p + 4), load_be64(p + 8), load_be64(p + 16)};
}

/// The full disk encryption header pointer's data (spec "Full disk encryption header pointer").
inline constexpr std::size_t kEncryptionExtensionSize = 16;
struct EncryptionExtensionFields {
    std::uint64_t offset = 0;
    std::uint64_t length = 0;
};
/// `p` holds kEncryptionExtensionSize bytes.
inline EncryptionExtensionFields decode_encryption_extension(const std::byte* p) {
    return {load_be64(p), load_be64(p + 8)};
}

// ---------------------------------------------------------------------------------------------
// L1 table entries (spec "Cluster mapping"): bits 9-55 the L2 table's offset, bit 63 COPIED,
// the rest reserved.
inline constexpr std::uint64_t kL1OffsetMask = 0x00fffffffffffe00ULL;   // bits 9-55
inline constexpr std::uint64_t kL1ReservedMask = 0x7f000000000001ffULL; // bits 0-8, 56-62
inline constexpr std::uint64_t kCopiedFlag = 1ULL << 63; // L1 and standard L2 entries

struct L1Entry {
    std::uint64_t raw = 0;
    std::uint64_t l2_offset() const { return raw & kL1OffsetMask; }
    std::uint64_t reserved_bits() const { return raw & kL1ReservedMask; }
    bool copied() const { return (raw & kCopiedFlag) != 0; }
};
inline L1Entry decode_l1(const std::byte* p) {
    return {load_be64(p)};
}
/// An L1 entry for the L2 table at `l2_offset`; `copied`: its refcount is exactly 1.
inline void encode_l1(std::byte* p, std::uint64_t l2_offset, bool copied) {
    store_be64(p, l2_offset | (copied ? kCopiedFlag : 0));
}

// ---------------------------------------------------------------------------------------------
// Standard L2 entries (spec "Standard Cluster Descriptor"): bit 0 "reads as zeros" (v3; unused
// with extended L2 entries), bits 9-55 the host cluster offset, bit 62 compressed, bit 63
// COPIED. Extended L2 entries (spec "Extended L2 Entries") add a 64-bit subcluster bitmap:
// bits 0-31 "allocated", bits 32-63 "reads as zeros", one bit per subcluster.
inline constexpr std::uint64_t kL2OffsetMask = 0x00fffffffffffe00ULL;           // bits 9-55
inline constexpr std::uint64_t kL2StandardReservedMask = 0x3f000000000001feULL; // bits 1-8, 56-61
inline constexpr std::uint64_t kL2ZeroFlag = 1ULL << 0;
inline constexpr std::uint64_t kL2CompressedFlag = 1ULL << 62;
inline constexpr std::uint64_t kL2CopiedFlag = kCopiedFlag;
inline constexpr std::uint64_t kSubclusterAllocMask = 0xffffffffULL;
inline constexpr std::uint64_t kSubclusterZeroMask = kSubclusterAllocMask << 32;
inline constexpr unsigned kSubclustersPerCluster = 32;

/// qemu's QCow2ClusterType (qcow2_get_cluster_type).
enum class ClusterType { unallocated, zero_plain, zero_alloc, normal, compressed };

struct L2Entry {
    std::uint64_t raw = 0;
    std::uint64_t bitmap = 0; ///< extended L2 entries only; 0 otherwise
    std::uint64_t host_offset() const { return raw & kL2OffsetMask; }
    std::uint64_t reserved_bits() const { return raw & kL2StandardReservedMask; }
    bool copied() const { return (raw & kL2CopiedFlag) != 0; }
    bool compressed() const { return (raw & kL2CompressedFlag) != 0; }
    std::uint32_t allocated_subclusters() const { return static_cast<std::uint32_t>(bitmap); }
    std::uint32_t zero_subclusters() const { return static_cast<std::uint32_t>(bitmap >> 32); }

    /// A data cluster at `host` with refcount 1 (COPIED), every subcluster allocated.
    static L2Entry data(std::uint64_t host) { return {host | kL2CopiedFlag, kSubclusterAllocMask}; }
    /// A cluster that reads as zeros without a host cluster: the zero flag, or with extended
    /// L2 entries (where bit 0 is reserved) every subcluster's zero bit.
    static L2Entry zero(bool extended) {
        return extended ? L2Entry{0, kSubclusterZeroMask} : L2Entry{kL2ZeroFlag, 0};
    }
    /// A compressed cluster (`descriptor` from encode_compressed); never COPIED, and its
    /// subcluster bitmap is zero (spec "Compressed Clusters Descriptor").
    static L2Entry compressed_cluster(std::uint64_t descriptor) {
        return {kL2CompressedFlag | descriptor, 0};
    }
};

/// The L2 entry at `p` (`extended`: a 16-byte entry with its subcluster bitmap).
inline L2Entry decode_l2(const std::byte* p, bool extended) {
    return {load_be64(p), extended ? load_be64(p + 8) : 0};
}
/// Writes `entry` at `p` (16 bytes with `extended`, else 8).
inline void encode_l2(std::byte* p, const L2Entry& entry, bool extended) {
    store_be64(p, entry.raw);
    if (extended)
        store_be64(p + 8, entry.bitmap);
}

/// qcow2_get_cluster_type: the zero flag counts only without subclusters; offset 0 means
/// unallocated, except with an external data file, where all clusters have refcount 1 and
/// COPIED marks a cluster allocated at data file offset 0.
inline ClusterType cluster_type(const L2Entry& e, bool extended, bool has_data_file) {
    if (e.compressed())
        return ClusterType::compressed;
    if ((e.raw & kL2ZeroFlag) && !extended)
        return e.host_offset() ? ClusterType::zero_alloc : ClusterType::zero_plain;
    if (!e.host_offset())
        return has_data_file && e.copied() ? ClusterType::normal : ClusterType::unallocated;
    return ClusterType::normal;
}

// ---------------------------------------------------------------------------------------------
// Compressed cluster descriptors (spec "Compressed Clusters Descriptor"): with x = 62 -
// (cluster_bits - 8), bits 0..x-1 the host offset of the stream, bits x..61 the number of
// additional 512-byte sectors. qcow version 1 (block/qcow.c) keeps the size in bytes in bits
// 63-cluster_bits..62 and the offset below, with bit 63 as the compressed flag.
inline constexpr std::uint64_t kCompressedSectorSize = 512; // QCOW2_COMPRESSED_SECTOR_SIZE
inline constexpr std::uint64_t kV1CompressedFlag = 1ULL << 63;

struct CompressedLayout {
    unsigned size_shift = 0;
    std::uint64_t size_mask = 0;
    std::uint64_t offset_mask = 0;
    bool v1 = false; ///< size in bytes (qcow version 1) instead of additional sectors

    static CompressedLayout for_v2(unsigned cluster_bits) {
        const unsigned shift = 62 - (cluster_bits - 8);
        return {shift, (std::uint64_t{1} << (cluster_bits - 8)) - 1,
                (std::uint64_t{1} << shift) - 1, false};
    }
    static CompressedLayout for_v1(unsigned cluster_bits) {
        const unsigned shift = 63 - cluster_bits;
        return {shift, (std::uint64_t{1} << cluster_bits) - 1, (std::uint64_t{1} << shift) - 1,
                true};
    }
};

struct CompressedDescriptor {
    std::uint64_t host_offset = 0;
    /// Bytes the descriptor covers from `host_offset`: for qcow2 the whole sectors counted
    /// from the first byte (qcow2_parse_compressed_l2_entry), for qcow v1 the stored size.
    std::uint64_t size = 0;
};

inline CompressedDescriptor decode_compressed(std::uint64_t entry, const CompressedLayout& l) {
    const std::uint64_t offset = entry & l.offset_mask;
    const std::uint64_t field = (entry >> l.size_shift) & l.size_mask;
    if (l.v1)
        return {offset, field};
    return {offset, (field + 1) * kCompressedSectorSize - (offset & (kCompressedSectorSize - 1))};
}

/// The qcow2 descriptor bits (without the compressed flag) of a stream of `size` bytes at
/// `host_offset`: the sectors after the first that the stream touches.
inline std::uint64_t encode_compressed(const CompressedLayout& l, std::uint64_t host_offset,
                                       std::uint64_t size) {
    const std::uint64_t sectors =
        (host_offset + size - 1) / kCompressedSectorSize - host_offset / kCompressedSectorSize;
    return (sectors << l.size_shift) | host_offset;
}

// ---------------------------------------------------------------------------------------------
// Refcounts (spec "Host cluster management"). Refcount table entries: bits 9-63 the refcount
// block's offset, bits 0-8 reserved. Refcount block entries are refcount_bits = 1 <<
// refcount_order wide; below 8 bits, entry 0 sits in the least significant bits of byte 0
// (qemu's get_refcount_ro0..2).
inline constexpr std::uint64_t kRefcountTableOffsetMask = 0xfffffffffffffe00ULL;
inline constexpr std::uint64_t kRefcountTableReservedMask = 0x1ffULL;
inline constexpr std::size_t kRefcountTableEntrySize = 8;

/// log2 of the entries of one refcount block: cluster_size * 8 / refcount_bits.
inline constexpr unsigned refcount_block_bits(unsigned cluster_bits, unsigned refcount_order) {
    return cluster_bits + 3 - refcount_order;
}
/// The largest refcount an entry of `refcount_order` holds.
inline constexpr std::uint64_t max_refcount(unsigned refcount_order) {
    return refcount_order == 6 ? UINT64_MAX : (std::uint64_t{1} << (1u << refcount_order)) - 1;
}

/// Entry `index` of the refcount block starting at `block` (which holds at least
/// `(index + 1) << refcount_order` bits).
inline std::uint64_t refcount_entry(const std::byte* block, std::uint64_t index,
                                    unsigned refcount_order) {
    switch (refcount_order) {
    case 0:
    case 1:
    case 2: {
        const unsigned width = 1u << refcount_order;
        const std::uint64_t bit = index * width;
        const unsigned byte = std::to_integer<unsigned>(block[bit / 8]);
        return (byte >> (bit % 8)) & ((1u << width) - 1);
    }
    case 3:
        return std::to_integer<unsigned>(block[index]);
    case 4:
        return load_be16(block + index * 2);
    case 5:
        return load_be32(block + index * 4);
    default:
        return load_be64(block + index * 8);
    }
}

/// Sets entry `index` of the refcount block at `block` to `value` (cut to the entry's width).
inline void set_refcount_entry(std::byte* block, std::uint64_t index, std::uint64_t value,
                               unsigned refcount_order) {
    const unsigned bits = 1u << refcount_order;
    if (bits < 8) {
        const std::uint64_t bit = index * bits;
        std::byte& byte = block[bit / 8];
        const unsigned shift = static_cast<unsigned>(bit % 8);
        const unsigned mask = ((1u << bits) - 1) << shift;
        byte = static_cast<std::byte>((std::to_integer<unsigned>(byte) & ~mask) |
                                      ((static_cast<unsigned>(value) << shift) & mask));
        return;
    }
    std::byte* p = block + index * (bits / 8);
    for (int i = static_cast<int>(bits / 8) - 1; i >= 0; --i, value >>= 8)
        p[i] = static_cast<std::byte>(value & 0xff);
}

// ---------------------------------------------------------------------------------------------
// Bitmap directory entries (spec "Bitmap directory"): a 24-byte fixed part, extra data, the
// name, then zero padding to a multiple of 8. Bitmap table entries (spec "Bitmap table"):
// bits 9-55 the data cluster's offset, bit 0 "all ones" (when the offset is 0), rest reserved.
inline constexpr std::size_t kBitmapDirectoryEntryFixed = 24;
inline constexpr std::uint64_t kBitmapTableOffsetMask = 0x00fffffffffffe00ULL;   // bits 9-55
inline constexpr std::uint64_t kBitmapTableReservedMask = 0xff000000000001feULL; // 1-8, 56-63
inline constexpr std::uint64_t kBitmapTableAllOnes = 1ULL << 0;
inline constexpr std::uint8_t kDirtyTrackingBitmap = 1; // the only bitmap type
// qemu's limits on a directory entry (block/qcow2-bitmap.c, BME_*).
inline constexpr std::uint32_t kMaxBitmapTableSize = 0x8000000;     // BME_MAX_TABLE_SIZE
inline constexpr std::uint64_t kMaxBitmapPhysicalSize = 0x20000000; // BME_MAX_PHYS_SIZE
inline constexpr unsigned kMinGranularityBits = 9;                  // BME_MIN_GRANULARITY_BITS
inline constexpr unsigned kMaxGranularityBits = 31;                 // BME_MAX_GRANULARITY_BITS
inline constexpr std::uint32_t kMaxBitmapNameSize = 1023;           // BME_MAX_NAME_SIZE
inline constexpr std::uint32_t kKnownBitmapFlags =
    kBitmapInUse | kBitmapAuto | kBitmapExtraDataCompatible;

struct BitmapFlagName {
    std::uint32_t flag;
    std::string_view name;
};
/// The flags' names as qemu-img info lists them ("flags": ["in-use", "auto"]).
inline constexpr std::array<BitmapFlagName, 3> kBitmapFlagNames = {{
    {kBitmapInUse, "in-use"},
    {kBitmapAuto, "auto"},
    {kBitmapExtraDataCompatible, "extra-data-compatible"},
}};

struct BitmapDirectoryFixed {
    std::uint64_t table_offset = 0;
    std::uint32_t table_size = 0;
    std::uint32_t flags = 0;
    std::uint8_t type = 0;
    std::uint8_t granularity_bits = 0;
    std::uint16_t name_size = 0;
    std::uint32_t extra_data_size = 0;
};
/// The fixed part of a directory entry; `p` holds kBitmapDirectoryEntryFixed bytes.
inline BitmapDirectoryFixed decode_bitmap_directory_entry(const std::byte* p) {
    return {load_be64(p),
            load_be32(p + 8),
            load_be32(p + 12),
            std::to_integer<std::uint8_t>(p[16]),
            std::to_integer<std::uint8_t>(p[17]),
            load_be16(p + 18),
            load_be32(p + 20)};
}

struct BitmapTableEntry {
    std::uint64_t raw = 0;
    std::uint64_t data_offset() const { return raw & kBitmapTableOffsetMask; }
    std::uint64_t reserved_bits() const { return raw & kBitmapTableReservedMask; }
    bool all_ones() const { return (raw & kBitmapTableAllOnes) != 0; }
};
inline BitmapTableEntry decode_bitmap_table_entry(const std::byte* p) {
    return {load_be64(p)};
}

// ---------------------------------------------------------------------------------------------
// Snapshot table entries (spec "Snapshots"): a 40-byte fixed part, extra data (bytes 0-7 the
// 64-bit VM state size, 8-15 the disk size, 16-23 the instruction count, -1 for none), the ID
// string and the name, each entry aligned to 8 bytes.
inline constexpr std::size_t kSnapshotEntryFixed = 40;
namespace snapshot_extra {
inline constexpr std::size_t kVmStateSize = 0;
inline constexpr std::size_t kDiskSize = 8;
inline constexpr std::size_t kIcount = 16;
} // namespace snapshot_extra

struct SnapshotFixed {
    std::uint64_t l1_table_offset = 0;
    std::uint32_t l1_size = 0;
    std::uint16_t id_size = 0;
    std::uint16_t name_size = 0;
    std::uint32_t date_seconds = 0;
    std::uint32_t date_nanoseconds = 0;
    std::uint64_t vm_clock_nanoseconds = 0;
    std::uint32_t vm_state_size = 0;
    std::uint32_t extra_data_size = 0;

    /// Bytes the entry takes before the padding to the next entry.
    std::uint64_t length() const {
        return kSnapshotEntryFixed + std::uint64_t{extra_data_size} + id_size + name_size;
    }
};
/// The fixed part of a snapshot table entry; `p` holds kSnapshotEntryFixed bytes.
inline SnapshotFixed decode_snapshot_entry(const std::byte* p) {
    return {load_be64(p),      load_be32(p + 8),  load_be16(p + 12),
            load_be16(p + 14), load_be32(p + 16), load_be32(p + 20),
            load_be64(p + 24), load_be32(p + 32), load_be32(p + 36)};
}

// ---------------------------------------------------------------------------------------------
// qcow version 1 (block/qcow.c QCowHeader): a 48-byte header, L2 tables of 1 << l2_bits plain
// 8-byte offsets.
namespace header_v1 {
inline constexpr std::size_t kBackingFileOffset = 8;
inline constexpr std::size_t kBackingFileSize = 16;
inline constexpr std::size_t kMtime = 20;
inline constexpr std::size_t kSize = 24;
inline constexpr std::size_t kClusterBits = 32;
inline constexpr std::size_t kL2Bits = 33;
inline constexpr std::size_t kCryptMethod = 36;
inline constexpr std::size_t kL1TableOffset = 40;
inline constexpr std::size_t kLength = 48;
} // namespace header_v1

} // namespace qcowmap::detail

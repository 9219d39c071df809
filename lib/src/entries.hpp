// One decoder per on-disk structure (QEMU's docs/interop/qcow2.txt; qemu's block/qcow2.h).
// The extent iterator, map, check, the bitmap code and the header parser all decode entries
// through these functions and constants, so that a field's bit range is written down once.
#pragma once

#include "bytes.hpp"

#include <cstddef>
#include <cstdint>

namespace qcowmap::detail {

// ---------------------------------------------------------------------------------------------
// Header extension types (spec "Header extensions").
inline constexpr std::uint32_t kExtEnd = 0x00000000;
inline constexpr std::uint32_t kExtBackingFormat = 0xe2792aca;
inline constexpr std::uint32_t kExtFeatureNames = 0x6803f857;
inline constexpr std::uint32_t kExtBitmaps = 0x23852875;
inline constexpr std::uint32_t kExtEncryption = 0x0537be77;
inline constexpr std::uint32_t kExtDataFile = 0x44415441;
/// One entry of the feature name table: type (1 byte), bit (1 byte), name (46 bytes).
inline constexpr std::size_t kFeatureNameEntrySize = 48;

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
};

/// The L2 entry at `p` (`extended`: a 16-byte entry with its subcluster bitmap).
inline L2Entry decode_l2(const std::byte* p, bool extended) {
    return {load_be64(p), extended ? load_be64(p + 8) : 0};
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
inline constexpr std::uint64_t kCompressedSectorSize = 512;
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

// ---------------------------------------------------------------------------------------------
// Refcount table entries (spec "Host cluster management"): bits 9-63 the refcount block's
// offset, bits 0-8 reserved. Refcount block entries are refcount_bits = 1 << refcount_order
// wide; below 8 bits, entry 0 sits in the least significant bits of byte 0.
inline constexpr std::uint64_t kRefcountTableOffsetMask = 0xfffffffffffffe00ULL;
inline constexpr std::uint64_t kRefcountTableReservedMask = 0x1ffULL;

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

// ---------------------------------------------------------------------------------------------
// Bitmap directory entries (spec "Bitmap directory"): a 24-byte fixed part, extra data, the
// name, then zero padding to a multiple of 8. Bitmap table entries (spec "Bitmap table"):
// bits 9-55 the data cluster's offset, bit 0 "all ones" (when the offset is 0), rest reserved.
inline constexpr std::size_t kBitmapDirectoryEntryFixed = 24;
inline constexpr std::uint64_t kBitmapTableOffsetMask = 0x00fffffffffffe00ULL;   // bits 9-55
inline constexpr std::uint64_t kBitmapTableReservedMask = 0xff000000000001feULL; // 1-8, 56-63
inline constexpr std::uint64_t kBitmapTableAllOnes = 1ULL << 0;

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

inline constexpr std::uint64_t align_up8(std::uint64_t value) {
    return (value + 7) & ~std::uint64_t{7};
}

} // namespace qcowmap::detail

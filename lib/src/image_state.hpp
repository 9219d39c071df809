// What an open Image holds: the mapping and the validated, decoded metadata. Immutable.
#pragma once

#include "bytes.hpp"
#include "mapped_file.hpp"

#include <qcowmap/image.hpp>

#include <optional>

namespace qcowmap::detail {

// L1 and standard L2 entry fields (spec "Cluster mapping").
inline constexpr std::uint64_t kL1OffsetMask = 0x00fffffffffffe00ULL;       // bits 9-55
inline constexpr std::uint64_t kL1ReservedMask = 0x7f000000000001ffULL;     // bits 0-8, 56-62
inline constexpr std::uint64_t kL2OffsetMask = 0x00fffffffffffe00ULL;       // bits 9-55
inline constexpr std::uint64_t kL2StandardReservedMask = 0x3f000000000001feULL; // bits 1-8, 56-61
inline constexpr std::uint64_t kL2ZeroFlag = 1ULL << 0;
inline constexpr std::uint64_t kL2CompressedFlag = 1ULL << 62;
inline constexpr std::uint64_t kL2CopiedFlag = 1ULL << 63;
inline constexpr std::uint64_t kV1CompressedFlag = 1ULL << 63; // qcow version 1 L2 entries
inline constexpr std::uint64_t kCompressedSectorSize = 512;
inline constexpr unsigned kSubclustersPerCluster = 32;

struct ImageState {
    std::optional<MappedFile> file; // absent for open_bytes
    Bytes bytes;
    std::filesystem::path path;
    ImageInfo info;

    // Derived geometry.
    unsigned cluster_bits = 16;
    std::uint64_t cluster_size = 0;
    unsigned l2_entry_bytes = 8;   // 16 with extended L2 entries
    unsigned l2_bits = 13;         // log2(entries per L2 table)
    unsigned subcluster_bits = 16; // log2(subcluster size); == cluster_bits without extended L2
    std::uint64_t l2_table_bytes = 0; // one cluster, except in qcow version 1
    Bytes l1_table;                // the active L1 table, already bounds-checked

    // Compressed cluster descriptor layout (spec "Compressed Clusters Descriptor").
    unsigned csize_shift = 0;            // x = 62 - (cluster_bits - 8)
    std::uint64_t csize_mask = 0;        // additional sector count field
    std::uint64_t coffset_mask = 0;      // host offset field

    std::uint64_t l2_coverage() const { return std::uint64_t{1} << (l2_bits + cluster_bits); }
};

/// Parses and validates the header and L1 table of a qcow version 1 image (block/qcow.c).
Result<void> parse_v1_image(ImageState& state, const OpenOptions& options);

/// Parses and validates the header, extensions and active L1 table of `state.bytes` into
/// `state` (everything but `file`/`path`).
Result<void> parse_image(ImageState& state, const OpenOptions& options);

} // namespace qcowmap::detail

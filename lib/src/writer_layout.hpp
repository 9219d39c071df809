// The layout of a qcow2 image being written: geometry, where each metadata structure goes, the
// header cluster and the L2 entries of the plan, encoded with qcow2_format.hpp's encoders.
// Pure functions over numbers and buffers: no I/O here.
#pragma once

#include "qcow2_format.hpp"

#include <qcowmap/result.hpp>
#include <qcowmap/writer.hpp>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace qcowmap::detail::writer {

// The format's constants, limits and encoders (qcow2_format.hpp) as the writer uses them.
using detail::kMaxHostOffset;
using detail::kMaxL1Bytes;
using detail::kMaxRefcountTableBytes;
using detail::store_be32;
using detail::store_be64;

/// The numbers every structure of the output derives from.
struct Geometry {
    std::uint32_t cluster_bits = 16;
    std::uint64_t cluster_size = 65536;
    bool extended_l2 = false;
    std::uint32_t refcount_order = 4;
    std::uint64_t virtual_size = 0;

    std::uint64_t l2_entry_bytes() const { return extended_l2 ? 16 : 8; }
    /// Entries (guest clusters) per L2 table.
    std::uint64_t l2_entries() const { return cluster_size / l2_entry_bytes(); }
    /// Guest clusters of the virtual disk (the last one may be partial).
    std::uint64_t guest_clusters() const {
        return (virtual_size + cluster_size - 1) >> cluster_bits;
    }
    std::uint64_t l1_size() const { return (guest_clusters() + l2_entries() - 1) / l2_entries(); }
    /// Refcount entries per refcount block.
    std::uint64_t refs_per_block() const {
        return std::uint64_t{1} << refcount_block_bits(cluster_bits, refcount_order);
    }
    std::uint64_t max_refcount() const { return detail::max_refcount(refcount_order); }
    std::uint64_t clusters_for(std::uint64_t bytes) const {
        return (bytes + cluster_size - 1) >> cluster_bits;
    }
};

/// Checks the options that shape the image and derives the geometry. Errors: invalid_argument
/// naming the option.
Result<Geometry> make_geometry(const WriteOptions& options, std::uint64_t virtual_size);

/// Where everything goes, in host clusters, in file order.
struct Layout {
    std::uint64_t reftable = 1, reftable_clusters = 1;
    std::uint64_t refblocks = 0, refblock_count = 0;
    std::uint64_t l1 = 0, l1_clusters = 0;
    std::uint64_t l2 = 0, l2_count = 0;
    std::uint64_t data = 0, data_clusters = 0;
    std::uint64_t total() const { return data + data_clusters; }
};

/// Lays out an image with `l2_tables` L2 tables and room for `data_clusters` data clusters:
/// the refcount blocks count every cluster, themselves and the refcount table included.
/// Errors: invalid_argument when the refcount table or an offset would pass qemu's limits.
Result<Layout> make_layout(const Geometry& geometry, std::uint64_t l2_tables,
                           std::uint64_t data_clusters);

/// What the header names besides the geometry.
struct HeaderFields {
    CompressionType compression_type = CompressionType::zlib;
    std::optional<std::string> backing_file;
    std::optional<std::string> backing_format;
    /// 3, or 2 (qemu's compat=0.10: a 72-byte header, no feature bits).
    std::uint32_t version = 3;
    bool lazy_refcounts = false;
    /// External data file name (header extension, incompatible bit 2) and data_file_raw
    /// (autoclear bit 1).
    std::optional<std::string> data_file;
    bool data_file_raw = false;
};

/// The header cluster (exactly one cluster): version 3 header of 112 bytes, the backing-format
/// and feature-name-table extensions (the latter left out when it would not fit a small
/// cluster), the end marker, then the backing file name. Errors: invalid_argument when the
/// backing name is longer than 1023 bytes or the header does not fit the cluster.
Result<std::vector<std::byte>> encode_header(const Geometry& geometry, const Layout& layout,
                                             const HeaderFields& fields);

/// What one L2 entry of the output says (encoded by encode_l2_entry).
struct L2Plan {
    enum class Kind : std::uint8_t { unallocated, data, zero, compressed } kind = Kind::unallocated;
    std::uint64_t host = 0;            ///< data: host cluster offset; compressed: stream offset
    std::uint64_t compressed_size = 0; ///< compressed: stream bytes
};

/// Writes entry `index` of an L2 table (standard or extended). Data clusters get the COPIED
/// flag (refcount 1); compressed ones never do (spec "Compressed Clusters Descriptor").
void encode_l2_entry(const Geometry& geometry, std::span<std::byte> table, std::uint64_t index,
                     const L2Plan& entry);

/// A run of guest clusters in the plan of an image: either stored from the source (`zero`
/// false: data clusters, or candidates for compression) or zero clusters (an L2 entry that
/// reads as zeros and hides a backing file). Guest clusters in no run stay unallocated.
struct PlanRun {
    std::uint64_t first = 0; ///< guest cluster index
    std::uint64_t count = 0;
    bool zero = false;
};

/// The L1 indices (ascending) whose L2 table holds an entry of some run of `plan`.
std::vector<std::uint64_t> l2_tables_of(const Geometry& geometry, const std::vector<PlanRun>& plan);

} // namespace qcowmap::detail::writer

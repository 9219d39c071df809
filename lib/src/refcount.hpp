// Refcounts (spec "Host cluster management"; qemu's block/qcow2-refcount.c): the geometry of the
// refcount table and blocks for any refcount_order, and the one lookup of a host cluster's
// stored refcount, used by map (refcount_of), check and, next, the in-place writer. Entries
// are decoded and encoded by qcow2_format.hpp (refcount_entry, set_refcount_entry).
#pragma once

#include "qcow2_format.hpp"

#include <qcowmap/info.hpp>

#include <cstdint>

namespace qcowmap::detail {

/// Where a host cluster's refcount lives: refcount_bits = 1 << refcount_order, one refcount
/// block per cluster_size * 8 / refcount_bits host clusters.
struct RefcountGeometry {
    unsigned cluster_bits = 16;
    unsigned refcount_order = 4;

    static RefcountGeometry of(const ImageInfo& info) {
        return {info.cluster_bits, info.refcount_order};
    }
    /// log2 of the entries (host clusters) one refcount block covers.
    unsigned block_bits() const { return refcount_block_bits(cluster_bits, refcount_order); }
    std::uint64_t entries_per_block() const { return std::uint64_t{1} << block_bits(); }
    /// The refcount table entry whose block covers host cluster `cluster`.
    std::uint64_t table_index(std::uint64_t cluster) const { return cluster >> block_bits(); }
    /// The entry of that block that is the cluster's refcount.
    std::uint64_t block_index(std::uint64_t cluster) const {
        return cluster & (entries_per_block() - 1);
    }
    std::uint64_t max_refcount() const { return detail::max_refcount(refcount_order); }
    /// Refcount blocks needed to count `clusters` host clusters.
    std::uint64_t blocks_for(std::uint64_t clusters) const {
        return (clusters >> block_bits()) + ((clusters & (entries_per_block() - 1)) != 0);
    }
    /// Refcount table entries that fit in `table_clusters` clusters.
    std::uint64_t table_entries(std::uint64_t table_clusters) const {
        return (table_clusters << cluster_bits) / kRefcountTableEntrySize;
    }
};

/// A host cluster's stored refcount, as qemu's qcow2_get_refcount finds it.
struct RefcountLookup {
    enum class Status : std::uint8_t {
        found,           ///< `refcount` is the stored value (0 where no block covers it)
        unaligned_block, ///< the covering refcount block is not cluster-aligned (qemu: EIO)
        block_past_eof,  ///< the covering refcount block lies (partly) beyond end of file
    };
    Status status = Status::found;
    std::uint64_t refcount = 0;
    std::uint64_t table_index = 0;  ///< the refcount table entry consulted
    std::uint64_t block_offset = 0; ///< the refcount block it names (0: none)
};

/// The stored refcount of host cluster `cluster` of the qcow2 image `file` described by
/// `info`. Refcount table entries past the table's size, or past the end of the file (only
/// `check` opens such images), and blocks at offset 0 count as refcount 0, as qemu's block
/// layer reads them.
inline RefcountLookup lookup_refcount(Bytes file, const ImageInfo& info, std::uint64_t cluster) {
    const RefcountGeometry g = RefcountGeometry::of(info);
    RefcountLookup found;
    found.table_index = g.table_index(cluster);
    if (found.table_index >= g.table_entries(info.refcount_table_clusters))
        return found;
    const std::uint64_t entry_at =
        info.refcount_table_offset + found.table_index * kRefcountTableEntrySize;
    if (!fits(file.size(), entry_at, kRefcountTableEntrySize))
        return found;
    found.block_offset = load_be64(file.data() + entry_at) & kRefcountTableOffsetMask;
    if (found.block_offset == 0)
        return found;
    const std::uint64_t cluster_size = std::uint64_t{1} << info.cluster_bits;
    if (found.block_offset & (cluster_size - 1)) {
        found.status = RefcountLookup::Status::unaligned_block;
        return found;
    }
    if (!fits(file.size(), found.block_offset, cluster_size)) {
        found.status = RefcountLookup::Status::block_past_eof;
        return found;
    }
    found.refcount = refcount_entry(file.data() + found.block_offset, g.block_index(cluster),
                                    info.refcount_order);
    return found;
}

} // namespace qcowmap::detail

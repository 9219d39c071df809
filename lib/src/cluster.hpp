// Cluster lookup (spec "Cluster mapping", "Extended L2 Entries"; qemu's block/qcow2-cluster.c):
// the L1 table's checks, the L1/L2 lookup of a guest offset and the classification of its L2
// entry (standard, extended with subclusters, compressed; qcow version 1; raw layers), through
// the backing chain. The extent walk, the salvage scan and, next, the in-place writer build on
// it.
#pragma once

#include "image_state.hpp"

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace qcowmap::detail {

/// One classified run starting at the requested position: a cluster and the following clusters
/// of its L2 table that read the same way (standard L2 entries), a run of like subclusters
/// inside one cluster (extended L2 entries), one compressed cluster, or the rest of an L2
/// table's range when its L1 entry is empty.
struct ClusterRun {
    ExtentKind kind = ExtentKind::zero;
    bool present = false;
    std::optional<std::uint64_t> host_offset;
    std::uint64_t length = 0;
    // compressed only
    std::uint64_t compressed_host_offset = 0;
    std::uint64_t compressed_size = 0;
    std::uint64_t offset_in_cluster = 0;
    // The layer that supplied the run and its depth in the chain (set by classify_chain).
    const ImageState* layer = nullptr;
    std::uint32_t depth = 0;
    // Salvage only: why the run reads as zeros (or unallocated) instead of failing the walk,
    // and, for a range that fell through a damaged layer, which layer that was.
    std::string damage;
    std::uint32_t damage_depth = 0;
    bool damage_falls_through = false;
};

/// An invalid_cluster error (a malformed cluster descriptor).
Error cluster_error(std::string message);

/// An L1 table (the active one or a snapshot's): within qemu's size cap, large enough for
/// `disk_size`, cluster-aligned and inside the file (with OpenOptions::salvage, the entries cut
/// off by the end of the file are left out: they read as unallocated).
Result<Bytes> l1_table(const ImageState& state, std::uint64_t offset, std::uint32_t entries,
                       std::uint64_t disk_size, std::string_view what);

/// Classifies `pos` through the chain from `s` (at `depth`) down: unallocated ranges fall
/// through to the backing layer, as qemu's bdrv_co_block_status does. Ranges past the end of
/// a shorter backing layer read as zeros and report the depth of the layer above it.
/// `salvage` (the top layer's, for images opened with OpenOptions::salvage) names the
/// compressed clusters that do not decompress; with it no error stops the walk.
Result<ClusterRun> classify_chain(const ImageState& s, std::uint32_t depth, std::uint64_t pos,
                                  std::uint64_t limit, const SalvageState* salvage);

/// classify_chain with the salvage state of `top`.
Result<ClusterRun> classify_chain(const ImageState& top, std::uint32_t depth, std::uint64_t pos,
                                  std::uint64_t limit);

} // namespace qcowmap::detail

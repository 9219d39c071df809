// What a WritableImage holds: the file opened read-write, the active L1 table and refcount
// table in memory, a write-back cache of L2 tables and refcount blocks, and the clusters whose
// refcount drops once the tables that stopped using them are on disk.
#pragma once

#include "image_state.hpp"
#include "qcow2_format.hpp"
#include "writable_io.hpp"

#include <qcowmap/writable.hpp>

#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace qcowmap::detail {

/// One cluster of metadata held in memory: an L2 table or a refcount block.
struct CachedTable {
    std::vector<std::byte> bytes;
    bool dirty = false;
};

/// A persistent bitmap the writer keeps honest: the granules set by this session.
struct TrackedBitmap {
    std::string name;
    std::uint64_t directory_entry_offset = 0; ///< file offset of its directory entry
    std::uint32_t flags = 0;                  ///< as on disk (with in_use while open)
    std::uint64_t table_offset = 0;
    std::uint32_t table_size = 0;
    unsigned granularity_bits = 0;
    /// The granules set by this session, by bitmap data cluster (index into the bitmap table):
    /// one bit per granule, only for clusters touched (memory follows the writes, not the
    /// disk size).
    std::unordered_map<std::uint64_t, std::vector<std::uint64_t>> set;
    bool changed = false;
};

} // namespace qcowmap::detail

namespace qcowmap {

struct WritableImage::State {
    std::mutex mutex;
    bool closed = false;
    std::filesystem::path path;
    WritableOptions options;
    /// The image as opened read-only (its header, snapshots, bitmaps; the chain below).
    std::optional<Image> opened;
    /// The layers below, read-only, for copy-on-write and reads of unallocated ranges.
    std::optional<Image> below;
    detail::FileIo file;
    detail::FileIo data_file; ///< external data file; not open without one
    bool has_data_file = false;
    bool data_file_raw = false;
    ImageInfo info;

    // Geometry (spec "Header"; qemu's BDRVQcow2State).
    unsigned cluster_bits = 16;
    std::uint64_t cluster_size = 65536;
    bool extended = false;
    unsigned entry_bytes = 8;
    unsigned l2_bits = 13;
    unsigned subcluster_bits = 16;
    unsigned refcount_order = 4;
    unsigned refblock_bits = 15; ///< log2(refcount entries per refcount block)
    std::uint64_t max_refcount = 0xffff;
    detail::CompressedLayout compressed_layout;
    std::uint64_t size = 0;

    // Active L1 table and refcount table, in memory, with the entries not yet on disk.
    std::vector<std::uint64_t> l1;
    std::uint64_t l1_offset = 0;
    std::set<std::uint64_t> l1_dirty;
    std::vector<std::uint64_t> reftable;
    std::uint64_t reftable_offset = 0;
    std::uint32_t reftable_clusters = 0;
    std::set<std::uint64_t> reftable_dirty;

    // The write-back cache: L2 tables by host offset, refcount blocks by index.
    std::unordered_map<std::uint64_t, detail::CachedTable> l2_cache;
    std::unordered_map<std::uint64_t, detail::CachedTable> refblock_cache;
    std::size_t cache_limit = 32u << 20;

    /// Host clusters to decrement once the entries that stopped referring to them are on disk
    /// (one decrement per element).
    std::vector<std::uint64_t> pending_frees;
    /// Where the search for a free cluster starts (qemu's free_cluster_index).
    std::uint64_t free_index = 0;
    /// One past the highest cluster known to be used (or the file's end).
    std::uint64_t end_cluster = 0;
    /// Clusters from here on are past every byte ever written: they read as zeros.
    std::uint64_t fresh_from = 0;
    /// Data written since the last sync (it must reach the disk before the tables that map it).
    bool data_unsynced = false;
    // External data file: guest clusters allocated this session, and its size at open (clusters
    // past it read as zeros until first written).
    std::unordered_set<std::uint64_t> data_clusters_written;
    std::uint64_t data_fresh_from = 0;

    std::vector<detail::TrackedBitmap> bitmaps;
    Decompressor decompressor;
    std::vector<std::byte> decompressed;
    std::uint64_t decompressed_entry = 0; ///< L2 entry of the cluster in `decompressed`; 0 none
    WritableImage::Stats stats;

    // Derived sizes.
    std::uint64_t l2_entries() const { return std::uint64_t{1} << l2_bits; }
    std::uint64_t subcluster_size() const { return std::uint64_t{1} << subcluster_bits; }
    std::uint64_t guest_clusters() const { return (size + cluster_size - 1) >> cluster_bits; }
    std::uint64_t cache_bytes() const {
        return (l2_cache.size() + refblock_cache.size()) * cluster_size;
    }
    detail::FileIo& data_io() { return has_data_file ? data_file : file; }
};

} // namespace qcowmap

namespace qcowmap::detail {

using WState = WritableImage::State;

// ---- writable_metadata.cpp: tables, refcounts, allocation and the write-back order ----------

/// The L2 table at `host_offset` (loaded into the cache on first use). Errors: invalid_table
/// when the offset is unaligned or past the file.
Result<CachedTable*> l2_table_at(WState& s, std::uint64_t host_offset);
/// The L2 entry of guest cluster `guest` (a zero entry when its L2 table is unallocated).
Result<L2Entry> l2_entry(WState& s, std::uint64_t guest);
/// The L2 table holding guest cluster `guest`, ready to be changed: allocated when missing,
/// copied when shared with a snapshot (its L1 entry lacks COPIED; qemu's l2_allocate).
Result<CachedTable*> writable_l2(WState& s, std::uint64_t guest);
/// Stores `entry` for guest cluster `guest` in `table` (from writable_l2) and marks it dirty.
void set_l2_entry(WState& s, CachedTable& table, std::uint64_t guest, const L2Entry& entry);

/// The refcount of host cluster `cluster` as the in-memory tables say.
Result<std::uint64_t> refcount_of(WState& s, std::uint64_t cluster);
/// Clusters handed out by allocate_clusters.
struct Allocation {
    std::uint64_t first = 0; ///< index of the first host cluster
    /// The clusters lie past every byte ever written to the file: they read as zeros without
    /// being written.
    bool fresh = false;
};
/// Finds `count` contiguous free clusters, sets their refcount to 1 (in memory) and returns
/// them. Grows the refcount structures as needed (new refcount blocks; a new, larger refcount
/// table). Errors: invalid_table (damaged refcount structures), io_error, invalid_argument
/// (qemu's limits: host offsets below 2^56, refcount table of 8 MiB).
Result<Allocation> allocate_clusters(WState& s, std::uint64_t count);
/// Queues the release of what an L2 entry pointed to (a data cluster, a preallocated zero
/// cluster, or the host clusters a compressed cluster touches): their refcounts drop after the
/// entry that replaced it is on disk (qemu's qcow2_free_any_cluster, ordered as qemu orders it
/// with qcow2_cache_set_dependency).
void free_entry_later(WState& s, const L2Entry& old);
/// Writes every dirty table in the crash-safe order and syncs (see writable_metadata.cpp).
Result<void> writeback(WState& s);
/// Writes back when the cache holds more than its limit, then drops clean tables.
Result<void> trim_cache(WState& s);
/// Writes `value` (big-endian, `width` bytes) into the header at `at`.
Result<void> write_header_field(WState& s, std::uint64_t at, std::uint64_t value, unsigned width);
/// Reads a host cluster's bytes (of the image file).
Result<void> read_host(WState& s, FileIo& io, std::span<std::byte> out, std::uint64_t offset);

// ---- writable_bitmaps.cpp --------------------------------------------------------------------

/// Finds the enabled, consistent persistent bitmaps and marks them in_use on disk (synced)
/// before anything else is written.
Result<void> start_bitmaps(WState& s);
/// Sets the granules of `[offset, offset + length)` in every tracked bitmap.
void mark_bitmaps(WState& s, std::uint64_t offset, std::uint64_t length);
/// Writes the tracked bitmaps' data, then clears in_use (each step synced).
Result<void> store_bitmaps(WState& s);

} // namespace qcowmap::detail

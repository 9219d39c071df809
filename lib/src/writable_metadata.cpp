// The in-place writer's metadata: L2 tables and refcount blocks in a write-back cache, cluster
// allocation, refcount growth, and the order in which all of it reaches the disk.
//
// Crash safety follows qemu (block/qcow2-cache.c qcow2_cache_set_dependency and
// qcow2_cache_depends_on_flush; block/qcow2-cluster.c qcow2_alloc_cluster_link_l2;
// block/qcow2-refcount.c update_refcount): a cluster's refcount is on disk before any table
// entry that points at it, guest data is on disk before the L2 entry that maps it, and a
// refcount drops only once the entry that used the cluster is gone from the disk. Tables
// are changed in memory and written by `writeback`, one kind after the other with a sync
// between them, so one flush costs a few syncs however many clusters it covers:
//
//   1. the file grows over every allocated cluster; guest data and the size are synced
//      (data before the L2 entries that map it);
//   2. refcount blocks (holding only increments at this point), sync
//      (refcounts before the references);
//   3. refcount table entries of new refcount blocks, sync (a block before its pointer);
//   4. L2 tables, sync;
//   5. L1 entries of new or copied L2 tables, sync (an L2 table before its pointer);
//   6. only now the refcounts of clusters the tables stopped using drop, sync; freed clusters
//      become free for reuse after this and their space is given back (hole punched).
//
// A crash between any two writes leaves every on-disk reference pointing at a cluster whose
// refcount is on disk and at data that is on disk: `qemu-img check` finds no corruption. It can
// find leaks: clusters whose refcount was raised (step 2) but whose references never made it
// (steps 4-5), or whose refcount had not dropped yet (step 6).
#include "writable_state.hpp"
#include "writer_layout.hpp"

#include <fmt/format.h>

#include <algorithm>

namespace qcowmap::detail {
namespace {

Error table_error(std::string message) {
    return Error{ErrorCode::invalid_table, std::move(message)};
}

bool aligned(const WState& s, std::uint64_t offset) {
    return (offset & (s.cluster_size - 1)) == 0;
}

/// Loads the cluster at `host_offset` into `cache[key]` (clean) unless it is there.
Result<CachedTable*> load(WState& s, std::unordered_map<std::uint64_t, CachedTable>& cache,
                          std::uint64_t key, std::uint64_t host_offset, std::string_view what) {
    if (auto it = cache.find(key); it != cache.end())
        return &it->second;
    if (host_offset == 0 || !aligned(s, host_offset)) {
        return table_error(fmt::format("{} offset {:#x} is not a non-zero multiple of the cluster "
                                       "size {:#x}",
                                       what, host_offset, s.cluster_size));
    }
    auto file_size = s.file.size();
    if (!file_size)
        return std::move(file_size).error();
    if (!fits(*file_size, host_offset, s.cluster_size)) {
        return table_error(fmt::format("{} at {:#x} (+{:#x}) lies beyond end of file ({:#x})", what,
                                       host_offset, s.cluster_size, *file_size));
    }
    CachedTable table;
    table.bytes.resize(s.cluster_size);
    if (auto ok = s.file.pread(table.bytes, host_offset); !ok)
        return std::move(ok).error();
    auto [it, inserted] = cache.emplace(key, std::move(table));
    return &it->second;
}

// ---------------------------------------------------------------------------------------------
// Refcounts (spec "Host cluster management"): refcount table entry b points at the block
// counting clusters [b << refblock_bits, (b + 1) << refblock_bits).

std::uint64_t block_offset(const WState& s, std::uint64_t block) {
    return block < s.reftable.size() ? s.reftable[block] & kRefcountTableOffsetMask : 0;
}

Result<void> grow_refcount_table(WState& s, std::uint64_t needed_entries);

/// The refcount block `block`, or null when it does not exist and `create` is false. A new
/// block is placed in the first cluster it counts and counts itself there (that cluster has no
/// refcount yet, so nothing uses it), as qemu's alloc_refcount_block prefers.
Result<CachedTable*> refcount_block(WState& s, std::uint64_t block, bool create) {
    if (block < s.reftable.size()) {
        const std::uint64_t raw = s.reftable[block];
        if (raw & kRefcountTableReservedMask) {
            return table_error(
                fmt::format("refcount table entry {} ({:#x}) has reserved bits set", block, raw));
        }
        if (const std::uint64_t offset = raw & kRefcountTableOffsetMask)
            return load(s, s.refblock_cache, block, offset, "refcount block");
    }
    if (!create)
        return nullptr;
    if (block == 0)
        return table_error("refcount block 0 is missing (the header cluster has no refcount)");
    if (block >= s.reftable.size()) {
        if (auto ok = grow_refcount_table(s, block + 1); !ok)
            return std::move(ok).error();
        if (block_offset(s, block) != 0) // the growth made it
            return load(s, s.refblock_cache, block, block_offset(s, block), "refcount block");
    }
    const std::uint64_t cluster = block << s.refblock_bits;
    if ((cluster << s.cluster_bits) >> s.cluster_bits != cluster ||
        (cluster << s.cluster_bits) > kMaxHostOffset - s.cluster_size) {
        return Error{ErrorCode::invalid_argument, "the image would pass qemu's largest host offset "
                                                  "(2^56)"};
    }
    CachedTable table;
    table.bytes.assign(s.cluster_size, std::byte{0});
    set_refcount_entry(table.bytes.data(), 0, 1, s.refcount_order);
    table.dirty = true;
    auto [it, inserted] = s.refblock_cache.insert_or_assign(block, std::move(table));
    s.reftable[block] = cluster << s.cluster_bits;
    s.reftable_dirty.insert(block);
    s.end_cluster = std::max(s.end_cluster, cluster + 1);
    s.fresh_from = std::max(s.fresh_from, cluster + 1);
    ++s.stats.allocated_clusters;
    return &it->second;
}

Result<void> set_refcount(WState& s, std::uint64_t cluster, std::uint64_t value) {
    auto block = refcount_block(s, cluster >> s.refblock_bits, true);
    if (!block)
        return std::move(block).error();
    const std::uint64_t index = cluster & ((std::uint64_t{1} << s.refblock_bits) - 1);
    set_refcount_entry((*block)->bytes.data(), index, value, s.refcount_order);
    (*block)->dirty = true;
    return {};
}

/// A new, larger refcount table, placed with the refcount blocks it needs for itself in fresh
/// clusters at the end of the image (qemu's qcow2_refcount_area): blocks and table are written
/// and synced, then one header write switches to it, then the old table is freed.
Result<void> grow_refcount_table(WState& s, std::uint64_t needed_entries) {
    const std::uint64_t per_cluster = s.cluster_size / 8;
    const std::uint64_t old_entries = s.reftable.size();
    std::uint64_t entries = std::max<std::uint64_t>(needed_entries, old_entries * 2);
    std::uint64_t table_clusters = (entries + per_cluster - 1) / per_cluster;
    const std::uint64_t area = s.end_cluster;
    std::vector<std::uint64_t> new_blocks; // block indices the area needs
    for (;;) {
        const std::uint64_t area_end = area + table_clusters + new_blocks.size();
        std::vector<std::uint64_t> missing;
        for (std::uint64_t b = area >> s.refblock_bits; b <= (area_end - 1) >> s.refblock_bits;
             ++b) {
            if (block_offset(s, b) == 0)
                missing.push_back(b);
        }
        const std::uint64_t last_block =
            (area + table_clusters + missing.size() - 1) >> s.refblock_bits;
        if (last_block >= table_clusters * per_cluster) {
            ++table_clusters;
            continue;
        }
        if (missing.size() == new_blocks.size()) {
            new_blocks = std::move(missing);
            break;
        }
        new_blocks = std::move(missing);
    }
    if (table_clusters * s.cluster_size > kMaxRefcountTableBytes) {
        return Error{ErrorCode::invalid_argument,
                     fmt::format("the image would need a refcount table of {} bytes, more than "
                                 "qemu accepts (8 MiB)",
                                 table_clusters * s.cluster_size)};
    }
    const std::uint64_t area_end = area + table_clusters + new_blocks.size();
    if ((area_end << s.cluster_bits) > kMaxHostOffset) {
        return Error{ErrorCode::invalid_argument, "the image would pass qemu's largest host offset "
                                                  "(2^56)"};
    }
    std::vector<std::uint64_t> table(table_clusters * per_cluster, 0);
    std::copy(s.reftable.begin(), s.reftable.end(), table.begin());
    for (std::size_t i = 0; i < new_blocks.size(); ++i) {
        const std::uint64_t at = area + table_clusters + i;
        CachedTable block;
        block.bytes.assign(s.cluster_size, std::byte{0});
        block.dirty = true;
        s.refblock_cache.insert_or_assign(new_blocks[i], std::move(block));
        table[new_blocks[i]] = at << s.cluster_bits;
    }
    const std::vector<std::uint64_t> old_table = std::exchange(s.reftable, std::move(table));
    const std::uint64_t old_offset = s.reftable_offset;
    const std::uint32_t old_clusters = s.reftable_clusters;
    // Count the area's clusters (the table and the new blocks) in whichever block counts them.
    for (std::uint64_t c = area; c < area_end; ++c) {
        if (auto ok = set_refcount(s, c, 1); !ok) {
            s.reftable = old_table;
            return ok;
        }
    }
    s.end_cluster = area_end;
    s.fresh_from = std::max(s.fresh_from, area_end);
    s.stats.allocated_clusters += area_end - area;
    // Blocks first (all dirty ones: they only hold increments), then the table, synced; then
    // the header points at the new table.
    auto size = s.file.size();
    if (!size)
        return std::move(size).error();
    if (*size < (area_end << s.cluster_bits)) {
        if (auto ok = s.file.truncate(area_end << s.cluster_bits); !ok)
            return ok;
    }
    for (auto& [index, block] : s.refblock_cache) {
        if (!block.dirty)
            continue;
        if (auto ok = s.file.pwrite(block.bytes, block_offset(s, index)); !ok)
            return ok;
        block.dirty = false;
    }
    std::vector<std::byte> encoded(s.reftable.size() * kRefcountTableEntrySize);
    for (std::size_t i = 0; i < s.reftable.size(); ++i)
        store_be64(encoded.data() + i * kRefcountTableEntrySize, s.reftable[i]);
    if (auto ok = s.file.pwrite(encoded, area << s.cluster_bits); !ok)
        return ok;
    if (auto ok = s.file.sync(); !ok)
        return ok;
    // refcount_table_offset (bytes 48-55) and refcount_table_clusters (56-59) in one write.
    std::byte header[header::kNbSnapshots - header::kRefcountTableOffset];
    store_be64(header, area << s.cluster_bits);
    store_be32(header + (header::kRefcountTableClusters - header::kRefcountTableOffset),
               static_cast<std::uint32_t>(table_clusters));
    if (auto ok = s.file.pwrite(header, header::kRefcountTableOffset); !ok)
        return ok;
    if (auto ok = s.file.sync(); !ok)
        return ok;
    s.reftable_offset = area << s.cluster_bits;
    s.reftable_clusters = static_cast<std::uint32_t>(table_clusters);
    s.info.refcount_table_offset = s.reftable_offset;
    s.info.refcount_table_clusters = s.reftable_clusters;
    s.reftable_dirty.clear();
    for (std::uint64_t c = 0; c < old_clusters; ++c)
        s.pending_frees.push_back((old_offset >> s.cluster_bits) + c);
    return {};
}

Result<void> write_dirty_refcount_blocks(WState& s, bool& wrote) {
    for (auto& [index, block] : s.refblock_cache) {
        if (!block.dirty)
            continue;
        if (auto ok = s.file.pwrite(block.bytes, block_offset(s, index)); !ok)
            return ok;
        block.dirty = false;
        wrote = true;
    }
    return {};
}

} // namespace

Result<void> read_host(WState&, FileIo& io, std::span<std::byte> out, std::uint64_t offset) {
    return io.pread(out, offset);
}

Result<void> write_header_field(WState& s, std::uint64_t at, std::uint64_t value, unsigned width) {
    std::byte bytes[8];
    if (width == 8)
        store_be64(bytes, value);
    else
        store_be32(bytes, static_cast<std::uint32_t>(value));
    return s.file.pwrite(std::span(bytes, width), at);
}

Result<CachedTable*> l2_table_at(WState& s, std::uint64_t host_offset) {
    return load(s, s.l2_cache, host_offset, host_offset, "L2 table");
}

Result<L2Entry> l2_entry(WState& s, std::uint64_t guest) {
    const std::uint64_t l1_index = guest >> s.l2_bits;
    if (l1_index >= s.l1.size())
        return L2Entry{};
    const L1Entry l1{s.l1[l1_index]};
    if (l1.reserved_bits()) {
        return table_error(
            fmt::format("L1 entry {} ({:#x}) has reserved bits set", l1_index, l1.raw));
    }
    if (l1.l2_offset() == 0)
        return L2Entry{};
    auto table = l2_table_at(s, l1.l2_offset());
    if (!table)
        return std::move(table).error();
    const std::uint64_t index = guest & (s.l2_entries() - 1);
    return decode_l2((*table)->bytes.data() + index * s.entry_bytes, s.extended);
}

Result<CachedTable*> writable_l2(WState& s, std::uint64_t guest) {
    const std::uint64_t l1_index = guest >> s.l2_bits;
    if (l1_index >= s.l1.size()) {
        return table_error(fmt::format("virtual offset {:#x} lies past the L1 table ({} entries)",
                                       guest << s.cluster_bits, s.l1.size()));
    }
    const L1Entry l1{s.l1[l1_index]};
    if (l1.reserved_bits()) {
        return table_error(
            fmt::format("L1 entry {} ({:#x}) has reserved bits set", l1_index, l1.raw));
    }
    if (l1.l2_offset() != 0 && l1.copied())
        return l2_table_at(s, l1.l2_offset());
    // A new table, or a copy of one shared with a snapshot (refcount > 1).
    std::vector<std::byte> bytes(s.cluster_size, std::byte{0});
    if (l1.l2_offset() != 0) {
        auto old = l2_table_at(s, l1.l2_offset());
        if (!old)
            return std::move(old).error();
        bytes = (*old)->bytes;
    }
    auto allocation = allocate_clusters(s, 1);
    if (!allocation)
        return std::move(allocation).error();
    const std::uint64_t offset = allocation->first << s.cluster_bits;
    auto [it, inserted] = s.l2_cache.insert_or_assign(offset, CachedTable{std::move(bytes), true});
    if (l1.l2_offset() != 0)
        s.pending_frees.push_back(l1.l2_offset() >> s.cluster_bits);
    s.l1[l1_index] = offset | kCopiedFlag;
    s.l1_dirty.insert(l1_index);
    return &it->second;
}

void set_l2_entry(WState& s, CachedTable& table, std::uint64_t guest, const L2Entry& entry) {
    std::byte* p = table.bytes.data() + (guest & (s.l2_entries() - 1)) * s.entry_bytes;
    encode_l2(p, entry, s.extended);
    table.dirty = true;
}

Result<std::uint64_t> refcount_of(WState& s, std::uint64_t cluster) {
    auto block = refcount_block(s, cluster >> s.refblock_bits, false);
    if (!block)
        return std::move(block).error();
    if (!*block)
        return std::uint64_t{0};
    const std::uint64_t index = cluster & ((std::uint64_t{1} << s.refblock_bits) - 1);
    return refcount_entry((*block)->bytes.data(), index, s.refcount_order);
}

Result<Allocation> allocate_clusters(WState& s, std::uint64_t count) {
    const std::uint64_t limit = kMaxHostOffset >> s.cluster_bits;
    std::uint64_t cluster = s.free_index;
    std::uint64_t run_start = 0, run = 0;
    std::optional<std::uint64_t> first_free;
    while (run < count) {
        if (cluster + (count - run) > limit) {
            return Error{ErrorCode::invalid_argument, "the image would pass qemu's largest host "
                                                      "offset (2^56)"};
        }
        // Make sure the block counting this cluster exists (a new one takes its first
        // cluster), then look at the cluster.
        if (auto block = refcount_block(s, cluster >> s.refblock_bits, true); !block)
            return std::move(block).error();
        auto refcount = refcount_of(s, cluster);
        if (!refcount)
            return std::move(refcount).error();
        if (*refcount == 0) {
            if (run == 0)
                run_start = cluster;
            ++run;
            if (!first_free)
                first_free = cluster;
        } else {
            run = 0;
        }
        ++cluster;
    }
    Allocation allocation{run_start, run_start >= s.fresh_from};
    for (std::uint64_t c = run_start; c < run_start + count; ++c) {
        if (auto ok = set_refcount(s, c, 1); !ok)
            return std::move(ok).error();
    }
    s.free_index = *first_free == run_start ? run_start + count : *first_free;
    s.end_cluster = std::max(s.end_cluster, run_start + count);
    if (allocation.fresh)
        s.fresh_from = run_start + count;
    s.stats.allocated_clusters += count;
    return allocation;
}

void free_entry_later(WState& s, const L2Entry& old) {
    const ClusterType type = cluster_type(old, s.extended, s.has_data_file);
    if (type == ClusterType::compressed) {
        const CompressedDescriptor d = decode_compressed(old.raw, s.compressed_layout);
        if (d.size == 0)
            return;
        for (std::uint64_t c = d.host_offset >> s.cluster_bits;
             c <= (d.host_offset + d.size - 1) >> s.cluster_bits; ++c) {
            s.pending_frees.push_back(c);
        }
        return;
    }
    const bool has_host = type == ClusterType::normal || type == ClusterType::zero_alloc;
    if (!has_host)
        return;
    if (s.has_data_file) {
        // Data file clusters have no refcounts, and sit at their guest offsets: the same place
        // is taken again by the next write there, so their space is not given back here.
        return;
    }
    s.pending_frees.push_back(old.host_offset() >> s.cluster_bits);
}

Result<void> writeback(WState& s) {
    ++s.stats.writebacks;
    // 1. The file covers every allocated cluster; data and size reach the disk.
    auto size = s.file.size();
    if (!size)
        return std::move(size).error();
    if (*size < (s.end_cluster << s.cluster_bits)) {
        if (auto ok = s.file.truncate(s.end_cluster << s.cluster_bits); !ok)
            return ok;
        s.data_unsynced = true;
    }
    if (s.data_unsynced) {
        if (auto ok = s.file.sync(); !ok)
            return ok;
        if (s.has_data_file) {
            if (auto ok = s.data_file.sync(); !ok)
                return ok;
        }
        s.data_unsynced = false;
    }
    // 2. Refcount blocks.
    bool wrote = false;
    if (auto ok = write_dirty_refcount_blocks(s, wrote); !ok)
        return ok;
    if (wrote) {
        if (auto ok = s.file.sync(); !ok)
            return ok;
    }
    // 3. Refcount table entries of new blocks.
    if (!s.reftable_dirty.empty()) {
        for (std::uint64_t index : s.reftable_dirty) {
            if (auto ok =
                    write_header_field(s, s.reftable_offset + index * 8, s.reftable[index], 8);
                !ok) {
                return ok;
            }
        }
        if (auto ok = s.file.sync(); !ok)
            return ok;
        s.reftable_dirty.clear();
    }
    // 4. L2 tables.
    wrote = false;
    for (auto& [offset, table] : s.l2_cache) {
        if (!table.dirty)
            continue;
        if (auto ok = s.file.pwrite(table.bytes, offset); !ok)
            return ok;
        table.dirty = false;
        wrote = true;
    }
    if (wrote) {
        if (auto ok = s.file.sync(); !ok)
            return ok;
    }
    // 5. L1 entries.
    if (!s.l1_dirty.empty()) {
        for (std::uint64_t index : s.l1_dirty) {
            if (auto ok = write_header_field(s, s.l1_offset + index * 8, s.l1[index], 8); !ok)
                return ok;
        }
        if (auto ok = s.file.sync(); !ok)
            return ok;
        s.l1_dirty.clear();
    }
    // 6. Refcounts of what the tables no longer use.
    if (!s.pending_frees.empty()) {
        std::vector<std::uint64_t> freed;
        for (std::uint64_t cluster : s.pending_frees) {
            auto refcount = refcount_of(s, cluster);
            if (!refcount)
                return std::move(refcount).error();
            if (*refcount == 0) {
                return table_error(fmt::format("cluster {:#x} is freed but its refcount is "
                                               "already 0",
                                               cluster << s.cluster_bits));
            }
            if (auto ok = set_refcount(s, cluster, *refcount - 1); !ok)
                return ok;
            if (*refcount == 1)
                freed.push_back(cluster);
        }
        s.pending_frees.clear();
        wrote = false;
        if (auto ok = write_dirty_refcount_blocks(s, wrote); !ok)
            return ok;
        if (auto ok = s.file.sync(); !ok)
            return ok;
        s.stats.freed_clusters += freed.size();
        // Give the space back, as qemu's discard passthrough does; the clusters are in
        // nobody's use and no longer fresh (their old bytes may read back as zeros or not).
        // One call per run of adjacent clusters: emptying a layer frees thousands, and each
        // fallocate costs milliseconds on some file systems.
        std::sort(freed.begin(), freed.end());
        for (std::size_t i = 0; i < freed.size();) {
            std::size_t j = i + 1;
            while (j < freed.size() && freed[j] == freed[j - 1] + 1)
                ++j;
            s.free_index = std::min(s.free_index, freed[i]);
            if (auto ok = s.file.zero_range(freed[i] << s.cluster_bits,
                                            static_cast<std::uint64_t>(j - i) << s.cluster_bits);
                !ok)
                return ok;
            i = j;
        }
    }
    return {};
}

Result<void> trim_cache(WState& s) {
    if (s.cache_bytes() <= s.cache_limit)
        return {};
    if (auto ok = writeback(s); !ok)
        return ok;
    std::erase_if(s.l2_cache, [](const auto& entry) { return !entry.second.dirty; });
    std::erase_if(s.refblock_cache, [](const auto& entry) { return !entry.second.dirty; });
    return {};
}

} // namespace qcowmap::detail

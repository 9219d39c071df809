// Refcount repair in place, as `qemu-img check -r leaks|all` repairs refcounts: qemu's
// qcow2_check_refcounts and compare_refcounts (block/qcow2-refcount.c) set every mismatching
// refcount to the references counted from the image's tables, and qcow2_co_check_locked
// (block/qcow2.c) clears the dirty and corrupt bits once nothing is left to repair.
//
// With -r all, OFLAG_COPIED flags that disagree with the repaired refcounts are rewritten
// (check_oflag_copied), and a damaged refcount structure (a refcount block unaligned, outside
// the image or shared with other data) or one whose table would have to grow is rebuilt from
// the references (rebuild_refcount_structure), and a preallocated zero cluster at an unaligned
// offset becomes a plain zero cluster (fix_l2_entry_by_zero). What else qemu repairs (other
// L1/L2 entries, the snapshot table) is refused before anything is written. Differences by
// design: for a referenced cluster with refcount 0 (a dirty image left by lazy refcounts) qemu
// rebuilds the whole refcount structure; here the refcount is raised in place, which leaves the
// same counts. For a refcount block past the end of the file qemu grows the file to reach it; here
// the structure is rebuilt (a crafted entry would otherwise make a file of any size). And an
// unaligned refcount block, which stops qemu's rebuild ("ERROR writing refblock"), is rebuilt.
//
// Crash safety, in the in-place writer's order (writable_metadata.cpp): every refcount that
// goes up (and every new refcount block, then the refcount table entry naming it) is written
// and synced before any refcount goes down, and the header flags are cleared last. A crash at
// any point leaves refcounts at least as high as the references: leaks at worst. A rebuild
// writes the new blocks and table into clusters nothing uses (neither data nor the old
// structure), syncs them, and only then points the header at the new table with one 12-byte
// write, synced: until then the old structure is what the image has. OFLAG_COPIED flags are
// cleared before any refcount is written and set only after every refcount is on disk.
#include "bytes.hpp"
#include "check_internal.hpp"
#include "errors.hpp"
#include "image_lock.hpp"
#include "qcow2_format.hpp"
#include "writable_io.hpp"

#include <qcowmap/check.hpp>
#include <qcowmap/info.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <map>
#include <set>
#include <sys/stat.h>
#include <unistd.h>

namespace qcowmap {
namespace {

using detail::RefcountMismatch;
using detail::RepairPlan;

Error refuse(const std::filesystem::path& /*path*/, std::string why) {
    return Error{ErrorCode::unsupported_feature,
                 fmt::format("not repaired (nothing written): {}; `qemu-img check -r all` "
                             "repairs this",
                             why)};
}

/// Why the plan cannot be carried out here, or nothing.
std::optional<Error> refusal(const std::filesystem::path& path, const RepairPlan& plan,
                             bool fix_errors) {
    // A rebuild makes good the damaged refcount blocks and the refcounts unreadable through
    // them; nothing else.
    const std::uint64_t rebuilt_corruptions =
        plan.rebuild ? plan.refcount_structure_corruptions : 0;
    const std::uint64_t rebuilt_errors = plan.rebuild ? plan.unreadable_refcounts : 0;
    if (plan.structural_check_errors || plan.check.check_errors > rebuilt_errors) {
        return refuse(path, fmt::format("{} check errors (refcounts or tables that cannot be "
                                        "read{}{})",
                                        plan.check.check_errors,
                                        plan.first_structural.empty() ? "" : "; first: ",
                                        plan.first_structural));
    }
    if (plan.structural_corruptions > rebuilt_corruptions) {
        // Tables, refcount structures, snapshot table or bitmaps are damaged: qemu repairs
        // some of these by rewriting entries or rebuilding the refcount structure, which is
        // not done here. With -r leaks too: the references counted from damaged tables may
        // miss clusters in use, and freeing them would lose data.
        return refuse(path, fmt::format("{} corruptions of the tables or refcount structures "
                                        "(first: {})",
                                        plan.structural_corruptions, plan.first_structural));
    }
    if (fix_errors && plan.overlapping_fixes) {
        return refuse(path, fmt::format("{} L1/L2 entries to fix lie in clusters that hold other "
                                        "metadata too (qemu-img's overlap check refuses such "
                                        "writes)",
                                        plan.overlapping_fixes));
    }
    if (!fix_errors && plan.refcount_zero_referenced) {
        // qemu-img check -r leaks: "ERROR need to rebuild refcount structures", then "Check
        // failed: Input/output error" (exit 1), nothing written.
        return Error{ErrorCode::invalid_table,
                     "need to rebuild refcount structures (a referenced cluster has refcount "
                     "0): repair with -r all"};
    }
    return std::nullopt;
}

template <typename... Args>
void message(RepairResult& r, std::size_t max, fmt::format_string<Args...> format, Args&&... args) {
    if (r.messages.size() < max)
        r.messages.push_back(fmt::format(format, std::forward<Args>(args)...));
    else
        ++r.messages_dropped;
}

/// Writes the fixed refcounts of `plan` into the file `io`, in the crash-safe order. With
/// `plan_only`, returns before the first write: whether it can be done (a refusal otherwise).
Result<void> write_refcounts(detail::FileIo& io, const RepairPlan& plan,
                             const std::filesystem::path& path, bool plan_only) {
    const ImageInfo& info = plan.info;
    const unsigned cluster_bits = info.cluster_bits;
    const std::uint64_t cluster_size = std::uint64_t{1} << cluster_bits;
    const unsigned block_bits = detail::refcount_block_bits(cluster_bits, info.refcount_order);
    const std::uint64_t block_mask = (std::uint64_t{1} << block_bits) - 1;

    std::vector<std::byte> table_bytes(std::uint64_t{info.refcount_table_clusters} << cluster_bits);
    if (auto ok = io.pread(table_bytes, info.refcount_table_offset); !ok)
        return ok;
    const std::uint64_t table_entries = table_bytes.size() / detail::kRefcountTableEntrySize;
    auto block_offset = [&](std::uint64_t block) -> std::uint64_t {
        return block < table_entries ? detail::load_be64(table_bytes.data() + block * 8) &
                                           detail::kRefcountTableOffsetMask
                                     : 0;
    };

    // Refcount blocks to allocate: those covering a cluster whose refcount goes up from a
    // block that does not exist. They go at the end of the file, past every cluster in use,
    // each counted by the block covering it (perhaps itself, perhaps another new one).
    std::uint64_t end_cluster = (plan.file_size + cluster_size - 1) >> cluster_bits;
    for (const RefcountMismatch& m : plan.mismatches)
        end_cluster = std::max(end_cluster, m.cluster + 1);
    std::map<std::uint64_t, std::uint64_t> new_blocks; // block index -> cluster
    std::vector<std::uint64_t> new_block_clusters;
    auto need_block = [&](std::uint64_t cluster) -> Result<void> {
        const std::uint64_t block = cluster >> block_bits;
        if (block_offset(block) != 0 || new_blocks.count(block))
            return {};
        if (block >= table_entries) {
            return refuse(path, fmt::format("cluster {} is counted by refcount block {}, past the "
                                            "refcount table ({} entries), which would have to "
                                            "grow",
                                            cluster, block, table_entries));
        }
        const std::uint64_t at = end_cluster + new_blocks.size();
        new_blocks.emplace(block, at);
        new_block_clusters.push_back(at);
        return {};
    };
    for (const RefcountMismatch& m : plan.mismatches) {
        if (m.fixed && m.references > m.stored) {
            if (auto ok = need_block(m.cluster); !ok)
                return ok;
        }
    }
    // The new blocks' own refcounts may need further new blocks (bounded: each block counts
    // thousands of clusters).
    for (std::size_t i = 0; i < new_block_clusters.size(); ++i) {
        if (auto ok = need_block(new_block_clusters[i]); !ok)
            return ok;
    }
    if ((end_cluster + new_blocks.size()) > (detail::kMaxHostOffset >> cluster_bits))
        return refuse(path, "new refcount blocks would pass qemu's largest host offset");
    if (plan_only)
        return {};

    // Refcount blocks in memory, by index: the existing ones read, the new ones zeroed.
    std::map<std::uint64_t, std::vector<std::byte>> blocks;
    auto block_of = [&](std::uint64_t cluster) -> Result<std::vector<std::byte>*> {
        const std::uint64_t block = cluster >> block_bits;
        auto it = blocks.find(block);
        if (it != blocks.end())
            return &it->second;
        std::vector<std::byte> bytes(cluster_size, std::byte{0});
        if (!new_blocks.count(block)) {
            if (auto ok = io.pread(bytes, block_offset(block)); !ok)
                return std::move(ok).error();
        }
        return &blocks.emplace(block, std::move(bytes)).first->second;
    };
    auto set = [&](std::uint64_t cluster, std::uint64_t value,
                   std::set<std::uint64_t>& touched) -> Result<void> {
        auto block = block_of(cluster);
        if (!block)
            return std::move(block).error();
        detail::set_refcount_entry((*block)->data(), cluster & block_mask, value,
                                   info.refcount_order);
        touched.insert(cluster >> block_bits);
        return {};
    };
    auto write_blocks = [&](const std::set<std::uint64_t>& touched) -> Result<void> {
        for (std::uint64_t block : touched) {
            const std::uint64_t at = new_blocks.count(block) ? new_blocks.at(block) << cluster_bits
                                                             : block_offset(block);
            if (auto ok = io.pwrite(blocks.at(block), at); !ok)
                return ok;
        }
        return {};
    };

    // 1. Refcounts that go up, new blocks counting themselves; synced.
    std::set<std::uint64_t> raised;
    for (const RefcountMismatch& m : plan.mismatches) {
        if (m.fixed && m.references > m.stored) {
            if (auto ok = set(m.cluster, m.references, raised); !ok)
                return ok;
        }
    }
    for (std::uint64_t cluster : new_block_clusters) {
        if (auto ok = set(cluster, 1, raised); !ok)
            return ok;
    }
    if (!raised.empty()) {
        if (!new_blocks.empty()) {
            const std::uint64_t end = (end_cluster + new_blocks.size()) << cluster_bits;
            auto size = io.size();
            if (!size)
                return std::move(size).error();
            if (*size < end) {
                if (auto ok = io.truncate(end); !ok)
                    return ok;
            }
        }
        if (auto ok = write_blocks(raised); !ok)
            return ok;
        if (auto ok = io.sync(); !ok)
            return ok;
    }
    // 2. Refcount table entries of the new blocks (a block before its pointer); synced.
    if (!new_blocks.empty()) {
        for (const auto& [block, cluster] : new_blocks) {
            std::byte entry[8];
            detail::store_be64(entry, cluster << cluster_bits);
            if (auto ok = io.pwrite(entry, info.refcount_table_offset + block * 8); !ok)
                return ok;
        }
        if (auto ok = io.sync(); !ok)
            return ok;
    }
    // 3. Refcounts that go down; synced; then the freed clusters' space is given back, as
    // qemu's update_refcount with QCOW2_DISCARD_ALWAYS discards them.
    std::set<std::uint64_t> lowered;
    std::vector<std::uint64_t> freed;
    for (const RefcountMismatch& m : plan.mismatches) {
        if (m.fixed && m.references < m.stored) {
            if (auto ok = set(m.cluster, m.references, lowered); !ok)
                return ok;
            if (m.references == 0)
                freed.push_back(m.cluster);
        }
    }
    if (!lowered.empty()) {
        if (auto ok = write_blocks(lowered); !ok)
            return ok;
        if (auto ok = io.sync(); !ok)
            return ok;
    }
    const std::uint64_t file_clusters = plan.file_size >> cluster_bits;
    for (std::uint64_t cluster : freed) {
        if (cluster < file_clusters) {
            if (auto ok = io.zero_range(cluster << cluster_bits, cluster_size); !ok)
                return ok;
        }
    }
    return {};
}

/// Rebuilds the refcount structure of `plan` (qemu's rebuild_refcount_structure): refcount
/// blocks and a table holding every cluster's references, written into clusters nothing uses,
/// then named by the header. The old table and blocks are left unreferenced (refcount 0) and
/// their space given back. With `plan_only`, returns before the first write: whether it can
/// be done (a refusal otherwise).
Result<void> rebuild_refcounts(detail::FileIo& io, const RepairPlan& plan,
                               const std::filesystem::path& path, bool plan_only) {
    const ImageInfo& info = plan.info;
    const unsigned cluster_bits = info.cluster_bits;
    const std::uint64_t cluster_size = std::uint64_t{1} << cluster_bits;
    const unsigned block_bits = detail::refcount_block_bits(cluster_bits, info.refcount_order);
    const std::uint64_t per_block = std::uint64_t{1} << block_bits;

    // The new refcounts: the references without the old structure's own.
    std::vector<std::uint32_t> counts(plan.references.begin(), plan.references.end());
    for (std::uint64_t k : plan.old_structure_clusters)
        --counts[k];
    // Clusters that may not hold the new structure: anything referenced now (the old
    // structure included, which stays in force until the header switches) and whatever the
    // old table names (a block past the end of the file would otherwise read our bytes).
    std::vector<bool> used(plan.references.size());
    for (std::size_t k = 0; k < plan.references.size(); ++k)
        used[k] = plan.references[k] != 0;
    const std::set<std::uint64_t> named(plan.old_refblock_targets.begin(),
                                        plan.old_refblock_targets.end());
    auto is_free = [&](std::uint64_t k) {
        return (k >= used.size() || !used[k]) && named.count(k) == 0;
    };
    auto mark = [&](std::uint64_t first, std::uint64_t count, bool in_use) {
        if (first + count > used.size()) {
            used.resize(first + count, false);
            counts.resize(first + count, 0);
        }
        for (std::uint64_t k = first; k < first + count; ++k) {
            used[k] = in_use;
            counts[k] = in_use ? 1 : 0;
        }
    };
    const std::uint64_t max_cluster = detail::kMaxHostOffset >> cluster_bits;
    // First fit of `count` free clusters in a row, as qemu's alloc_clusters_imrt.
    std::uint64_t first_free = 0;
    auto allocate = [&](std::uint64_t count) -> Result<std::uint64_t> {
        std::uint64_t start = first_free;
        std::uint64_t run = 0;
        bool gap_seen = false;
        for (std::uint64_t k = first_free; run < count; ++k) {
            if (k > max_cluster)
                return refuse(path, "a rebuilt refcount structure would pass qemu's largest "
                                    "host offset");
            if (is_free(k)) {
                if (!gap_seen) {
                    first_free = k;
                    gap_seen = true;
                }
                if (run++ == 0)
                    start = k;
            } else {
                run = 0;
            }
        }
        mark(start, count, true);
        return start;
    };

    // Blocks for every range of clusters with a refcount, then a table large enough for
    // them; the new clusters need counting too, so until nothing more is needed.
    std::map<std::uint64_t, std::uint64_t> block_cluster; // block index -> cluster
    std::uint64_t table_cluster = 0;
    std::uint64_t table_clusters = 0;
    for (bool changed = true; changed;) {
        changed = false;
        for (std::uint64_t first = 0; first < counts.size(); first += per_block) {
            const std::uint64_t block = first >> block_bits;
            if (block_cluster.count(block))
                continue;
            const auto begin = counts.begin() + static_cast<std::ptrdiff_t>(first);
            const auto end = counts.begin() + static_cast<std::ptrdiff_t>(std::min<std::uint64_t>(
                                                  counts.size(), first + per_block));
            if (std::all_of(begin, end, [](std::uint32_t c) { return c == 0; }))
                continue;
            auto at = allocate(1);
            if (!at)
                return std::move(at).error();
            block_cluster.emplace(block, *at);
            changed = true;
        }
        const std::uint64_t entries = block_cluster.empty() ? 1 : block_cluster.rbegin()->first + 1;
        if (entries * detail::kRefcountTableEntrySize > detail::kMaxRefcountTableBytes)
            return refuse(path, "a rebuilt refcount table would pass qemu's largest (8 MiB)");
        const std::uint64_t needed =
            (entries * detail::kRefcountTableEntrySize + cluster_size - 1) >> cluster_bits;
        if (needed != table_clusters) {
            if (table_clusters)
                mark(table_cluster, table_clusters, false);
            first_free = 0;
            auto at = allocate(needed);
            if (!at)
                return std::move(at).error();
            table_cluster = *at;
            table_clusters = needed;
            changed = true;
        }
    }

    if (plan_only)
        return {};
    // 1. The blocks and the table, synced.
    const std::uint64_t end = std::uint64_t{counts.size()} << cluster_bits;
    auto size = io.size();
    if (!size)
        return std::move(size).error();
    if (*size < end) {
        if (auto ok = io.truncate(end); !ok)
            return ok;
    }
    std::vector<std::byte> bytes(cluster_size);
    for (const auto& [block, cluster] : block_cluster) {
        std::fill(bytes.begin(), bytes.end(), std::byte{0});
        const std::uint64_t first = block << block_bits;
        for (std::uint64_t k = first; k < counts.size() && k < first + per_block; ++k) {
            if (counts[k])
                detail::set_refcount_entry(bytes.data(), k - first, counts[k], info.refcount_order);
        }
        if (auto ok = io.pwrite(bytes, cluster << cluster_bits); !ok)
            return ok;
    }
    std::vector<std::byte> table(table_clusters << cluster_bits, std::byte{0});
    for (const auto& [block, cluster] : block_cluster)
        detail::store_be64(table.data() + block * detail::kRefcountTableEntrySize,
                           cluster << cluster_bits);
    if (auto ok = io.pwrite(table, table_cluster << cluster_bits); !ok)
        return ok;
    if (auto ok = io.sync(); !ok)
        return ok;
    // 2. The header names the new table: one write of its offset and size, synced.
    std::byte fields[12];
    detail::store_be64(fields, table_cluster << cluster_bits);
    detail::store_be32(fields + 8, static_cast<std::uint32_t>(table_clusters));
    if (auto ok = io.pwrite(fields, detail::header::kRefcountTableOffset); !ok)
        return ok;
    if (auto ok = io.sync(); !ok)
        return ok;
    // 3. The old structure's clusters are free now: their space is given back, as qemu's
    // leak repair after a rebuild discards them.
    const std::uint64_t file_clusters = plan.file_size >> cluster_bits;
    for (std::uint64_t k : std::set<std::uint64_t>(plan.old_structure_clusters.begin(),
                                                   plan.old_structure_clusters.end())) {
        if (k < file_clusters && k < counts.size() && counts[k] == 0) {
            if (auto ok = io.zero_range(k << cluster_bits, cluster_size); !ok)
                return ok;
        }
    }
    return {};
}

/// Writes each of `fixes` (an entry with its bitmap in one write), then syncs.
Result<void> write_entries(detail::FileIo& io, const std::vector<RepairPlan::EntryFix>& fixes) {
    if (fixes.empty())
        return {};
    for (const RepairPlan::EntryFix& fix : fixes) {
        std::byte entry[16];
        detail::store_be64(entry, fix.value);
        detail::store_be64(entry + 8, fix.bitmap);
        if (auto ok =
                io.pwrite(std::span<const std::byte>(entry, fix.extended ? 16 : 8), fix.offset);
            !ok)
            return ok;
    }
    return io.sync();
}

/// Rewrites the L1 and L2 entries whose OFLAG_COPIED flag disagrees with the repaired
/// refcounts (qemu's check_oflag_copied repairing), synced: those that clear the flag
/// (`set` false) or those that set it.
Result<void> write_copied_flags(detail::FileIo& io, const RepairPlan& plan, bool set) {
    std::vector<RepairPlan::EntryFix> fixes;
    for (const RepairPlan::EntryFix& fix : plan.copied_fixes) {
        if (((fix.value & detail::kCopiedFlag) != 0) == set)
            fixes.push_back(fix);
    }
    return write_entries(io, fixes);
}

} // namespace

Result<RepairResult> repair_image(const std::filesystem::path& path, const RepairOptions& options) {
    const bool fix_errors = options.mode == RepairMode::all;
    int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        const int err = errno;
        return detail::errno_error(err,
                                   fmt::format("cannot open for writing: {}", std::strerror(err)));
    }
    detail::FileIo io(fd, path.string());
    // As a qemu writer (qemu-img check -r opens the image read-write): nobody else may write
    // or read it consistently meanwhile, and we refuse an image someone else holds.
    if (auto ok = detail::lock_image(fd, detail::kWriterLock); !ok)
        return std::move(ok).error();

    // Our own views of the file take no lock: ours is held on `fd`.
    CheckOptions check_options;
    check_options.max_messages = options.max_messages;
    check_options.untrusted = options.untrusted;
    check_options.force_share = true;
    auto plan = detail::plan_repair(path, fix_errors, check_options);
    if (!plan)
        return std::move(plan).error();
    {
        struct stat by_path {};
        struct stat by_fd {};
        if (::stat(path.c_str(), &by_path) != 0 || ::fstat(fd, &by_fd) != 0 ||
            by_path.st_dev != by_fd.st_dev || by_path.st_ino != by_fd.st_ino) {
            return Error{ErrorCode::image_changed, "the file was replaced while it was opened"};
        }
    }
    if (auto refused = refusal(path, *plan, fix_errors))
        return *refused;

    RepairResult result;
    result.before = plan->check;
    // L2 entries qemu fixes while counting references (calculate_refcounts), before the rest.
    for (const std::string& line : plan->zeroed_lines)
        message(result, options.max_messages, "{}", line);
    const std::uint64_t zeroed = plan->zeroed_entries.size();
    // The lines qemu prints (qcow2_check_refcounts): compare_refcounts without fixing, then,
    // when anything differs, again fixing what the mode fixes, then check_oflag_copied's.
    for (const RefcountMismatch& m : plan->mismatches) {
        if (plan->rebuild)
            break;
        message(result, options.max_messages, "{} cluster {} refcount={} reference={}",
                m.stored < m.references ? "ERROR" : "Leaked", m.cluster, m.stored, m.references);
    }
    std::uint64_t corruptions_left = 0;
    if (plan->rebuild) {
        // qcow2_check_refcounts: what calculate_refcounts and compare_refcounts found, then
        // the rebuild, after which every corruption and leak found so far counts as fixed
        // (the refcounts are recalculated from the references).
        for (std::size_t i = 0; i < plan->messages_before_copied; ++i)
            message(result, options.max_messages, "{}", plan->check.messages[i]);
        // Said even past the message cap: it is what happened.
        result.messages.push_back("Rebuilding refcount structure");
        result.refcounts_rebuilt = true;
        result.corruptions_fixed = plan->corruptions_before_copied + zeroed;
        result.leaks_fixed = plan->check.leaks;
    }
    if (!plan->rebuild)
        result.corruptions_fixed += zeroed;
    for (const RefcountMismatch& m : plan->mismatches) {
        if (plan->rebuild)
            break;
        if (m.fixed) {
            message(result, options.max_messages, "Repairing cluster {} refcount={} reference={}",
                    m.cluster, m.stored, m.references);
            ++(m.stored > m.references ? result.leaks_fixed : result.corruptions_fixed);
        } else {
            message(result, options.max_messages, "{} cluster {} refcount={} reference={}",
                    m.stored < m.references ? "ERROR" : "Leaked", m.cluster, m.stored,
                    m.references);
            if (m.stored < m.references)
                ++corruptions_left;
        }
    }
    // check_oflag_copied repairs the flags with -r all, and with -r leaks once no check error,
    // corruption or leak is left ("only safe if there are no other corruptions"); the leak
    // repair leaves no leak.
    const bool fix_copied = fix_errors || (plan->check.check_errors == 0 && corruptions_left == 0 &&
                                           plan->overlapping_fixes == 0);
    for (const std::string& line : plan->copied_after_lines)
        message(result, options.max_messages, "{} {}", fix_copied ? "Repairing" : "ERROR", line);
    if (fix_copied)
        result.corruptions_fixed += plan->copied_fixes.size();
    else
        corruptions_left += plan->copied_after;
    // qcow2_co_check_locked: with a repair asked for and neither check errors nor corruptions
    // left, the dirty bit (qcow2_mark_clean) and the corrupt bit (qcow2_mark_consistent) are
    // cleared.
    const std::uint64_t flags = kIncompatDirty | kIncompatCorrupt;
    const bool clear_flags = plan->info.version >= 3 && corruptions_left == 0 &&
                             (plan->info.incompatible_features & flags) != 0;

    if (result.leaks_fixed == 0 && result.corruptions_fixed == 0 && !clear_flags) {
        result.after = result.before; // nothing to write: the file stays as it is
        return result;
    }
    auto refcounts = [&](bool plan_only) {
        return plan->rebuild ? rebuild_refcounts(io, *plan, path, plan_only)
                             : write_refcounts(io, *plan, path, plan_only);
    };
    // Everything that may refuse is decided before the first write.
    if (auto ok = refcounts(true); !ok)
        return std::move(ok).error();
    // OFLAG_COPIED clears first: a flag missing only makes qemu copy on write (a leak at
    // worst), while one set on a cluster whose refcount is not yet 1 would let it write in
    // place. Then the zeroed entries: their clusters then have refcounts above their
    // references (leaks), which the refcounts written next lower. The flags set come last,
    // once the refcounts they stand for are on disk.
    if (fix_copied) {
        if (auto ok = write_copied_flags(io, *plan, false); !ok)
            return std::move(ok).error();
    }
    if (auto ok = write_entries(io, plan->zeroed_entries); !ok)
        return std::move(ok).error();
    if (auto ok = refcounts(false); !ok)
        return std::move(ok).error();
    if (fix_copied) {
        if (auto ok = write_copied_flags(io, *plan, true); !ok)
            return std::move(ok).error();
    }
    if (clear_flags) {
        // Last, once every refcount is on disk: the refcounts are now exact.
        std::byte field[8];
        detail::store_be64(field, plan->info.incompatible_features & ~flags);
        if (auto ok = io.pwrite(field, detail::header::kIncompatibleFeatures); !ok)
            return ok.error();
        if (auto ok = io.sync(); !ok)
            return ok.error();
        result.header_flags_cleared = true;
    }
    // "Double checking the fixed image now...", still under our lock.
    auto after = check_image(path, check_options);
    if (!after)
        return std::move(after).error();
    result.after = std::move(*after);
    result.double_checked = true;
    return result;
}

} // namespace qcowmap

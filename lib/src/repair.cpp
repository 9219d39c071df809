// Refcount repair in place, as `qemu-img check -r leaks|all` repairs refcounts: qemu's
// qcow2_check_refcounts and compare_refcounts (block/qcow2-refcount.c) set every mismatching
// refcount to the references counted from the image's tables, and qcow2_co_check_locked
// (block/qcow2.c) clears the dirty and corrupt bits once nothing is left to repair.
//
// What qemu repairs by other means (rebuilding the refcount structure when the table must
// grow or is damaged, fixing L1/L2 entries and OFLAG_COPIED flags, the snapshot table) is
// refused before anything is written. One difference by design: for a referenced cluster with
// refcount 0 (a dirty image left by lazy refcounts) qemu rebuilds the whole refcount
// structure; here the refcount is raised in place, which leaves the same counts.
//
// Crash safety, in the in-place writer's order (writable_metadata.cpp): every refcount that
// goes up (and every new refcount block, then the refcount table entry naming it) is written
// and synced before any refcount goes down, and the header flags are cleared last. A crash at
// any point leaves refcounts at least as high as the references: leaks at worst.
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
    if (plan.structural_check_errors || plan.check.check_errors) {
        return refuse(path, fmt::format("{} check errors (refcounts or tables that cannot be "
                                        "read{}{})",
                                        plan.check.check_errors,
                                        plan.first_structural.empty() ? "" : "; first: ",
                                        plan.first_structural));
    }
    if (plan.structural_corruptions) {
        // Tables, refcount structures, snapshot table or bitmaps are damaged: qemu repairs
        // some of these by rewriting entries or rebuilding the refcount structure, which is
        // not done here. With -r leaks too: the references counted from damaged tables may
        // miss clusters in use, and freeing them would lose data.
        return refuse(path, fmt::format("{} corruptions of the tables or refcount structures "
                                        "(first: {})",
                                        plan.structural_corruptions, plan.first_structural));
    }
    if (!fix_errors && plan.refcount_zero_referenced) {
        // qemu-img check -r leaks: "ERROR need to rebuild refcount structures", then "Check
        // failed: Input/output error" (exit 1), nothing written.
        return Error{ErrorCode::invalid_table,
                     "need to rebuild refcount structures (a referenced cluster has refcount "
                     "0): repair with -r all"};
    }
    if (fix_errors && plan.copied_after) {
        return refuse(path, fmt::format("{} OFLAG_COPIED flags of L1/L2 entries would stay "
                                        "wrong after the refcounts are repaired (first: {})",
                                        plan.copied_after, plan.copied_after_lines.front()));
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

/// Writes the fixed refcounts of `plan` into the file `io`, in the crash-safe order.
Result<void> write_refcounts(detail::FileIo& io, const RepairPlan& plan,
                             const std::filesystem::path& path) {
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
    // The lines qemu prints (qcow2_check_refcounts): compare_refcounts without fixing, then,
    // when anything differs, again fixing what the mode fixes, then check_oflag_copied's.
    for (const RefcountMismatch& m : plan->mismatches) {
        message(result, options.max_messages, "{} cluster {} refcount={} reference={}",
                m.stored < m.references ? "ERROR" : "Leaked", m.cluster, m.stored, m.references);
    }
    std::uint64_t corruptions_left = plan->copied_after;
    for (const RefcountMismatch& m : plan->mismatches) {
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
    for (const std::string& line : plan->copied_after_lines)
        message(result, options.max_messages, "{}", line);
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
    if (auto ok = write_refcounts(io, *plan, path); !ok)
        return std::move(ok).error();
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

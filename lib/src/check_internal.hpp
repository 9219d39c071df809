// What the refcount repair (repair.cpp) needs from the checker: the check itself, plus the
// clusters whose stored refcount differs from their references and whether anything else is
// wrong, split the way qemu's qcow2_check_refcounts decides what `-r` may repair.
#pragma once

#include <qcowmap/check.hpp>
#include <qcowmap/info.hpp>

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace qcowmap::detail {

/// One cluster whose stored refcount differs from the references to it.
struct RefcountMismatch {
    std::uint64_t cluster = 0;
    std::uint64_t stored = 0;
    std::uint64_t references = 0;
    /// The repair mode asked for fixes it (qemu's compare_refcounts with `fix`).
    bool fixed = false;
};

/// The check of an image, as the repair sees it.
struct RepairPlan {
    /// The check as check_image reports it.
    CheckResult check;
    ImageInfo info;
    std::uint64_t file_size = 0;
    /// Corruptions and check errors found before refcounts are compared (tables, refcount
    /// structures, snapshot table, bitmaps, overflows): nothing `repair_image` repairs.
    std::uint64_t structural_corruptions = 0;
    std::uint64_t structural_check_errors = 0;
    /// The first line of those.
    std::string first_structural;
    /// Clusters whose stored refcount differs from their references, in cluster order.
    std::vector<RefcountMismatch> mismatches;
    /// A referenced cluster has refcount 0 (qemu sets `rebuild` there).
    bool refcount_zero_referenced = false;
    /// OFLAG_COPIED mismatches (qemu's check_oflag_copied) against the refcounts as they will
    /// be once the fixed mismatches are written, and the first of them.
    std::uint64_t copied_after = 0;
    /// The first CheckOptions::max_messages lines of those, worded as check_oflag_copied
    /// without its first word ("ERROR" when left, "Repairing" when fixed).
    std::vector<std::string> copied_after_lines;
    /// The entries that fix those flags: the file offset of each L1 or L2 entry and its value
    /// with the flag set or cleared (qemu's check_oflag_copied repairing), in table order.
    struct EntryFix {
        std::uint64_t offset = 0;
        std::uint64_t value = 0;
        /// An extended L2 entry: its subcluster bitmap is written with it (one write).
        bool extended = false;
        std::uint64_t bitmap = 0;
    };
    std::vector<EntryFix> copied_fixes;
    /// With -r all, L2 entries of preallocated zero clusters at an unaligned offset, made
    /// plain zero clusters (qemu's fix_l2_entry_by_zero during calculate_refcounts; their
    /// clusters are then not counted as referenced), and qemu's "Repairing ..." line for each
    /// (at most CheckOptions::max_messages).
    std::vector<EntryFix> zeroed_entries;
    std::vector<std::string> zeroed_lines;
    /// Of those fixes, how many lie in a cluster that holds other metadata too (a refcount
    /// block read as an L2 table, say): qemu's overlap check refuses such writes, and so does
    /// the repair, before writing anything.
    std::uint64_t overlapping_fixes = 0;
    /// Corruptions found before the OFLAG_COPIED check (what qemu's rebuild counts as fixed),
    /// and how many of `check.messages` came before it (what qemu prints before rebuilding).
    std::uint64_t corruptions_before_copied = 0;
    std::size_t messages_before_copied = 0;

    /// The refcount structure must be rebuilt (qemu's rebuild_refcount_structure): with -r
    /// all, when a refcount block is unaligned, outside the image or shared with other data,
    /// or when a refcount that goes up lies past what the refcount table covers.
    bool rebuild = false;
    /// Of the structural corruptions and check errors, those a rebuild makes good: refcount
    /// blocks found damaged by check_refblocks, refcounts unreadable through them.
    std::uint64_t refcount_structure_corruptions = 0;
    std::uint64_t unreadable_refcounts = 0;
    /// With `rebuild`: every cluster's references (qemu's in-memory refcount table), counting
    /// the old refcount table and blocks too, which lie at `old_structure_clusters` (one entry
    /// per reference); and the clusters the old refcount table names, which a rebuild must
    /// not overwrite before the new structure takes over.
    std::vector<std::uint32_t> references;
    std::vector<std::uint64_t> old_structure_clusters;
    std::vector<std::uint64_t> old_refblock_targets;
};

/// Checks the image at `path` (opened as check_image opens it, with `options`) and returns
/// the plan for repairing it with `fix_errors` (RepairMode::all) or leaks only. Errors: those
/// of check_image.
Result<RepairPlan> plan_repair(const std::filesystem::path& path, bool fix_errors,
                               const CheckOptions& options);

} // namespace qcowmap::detail

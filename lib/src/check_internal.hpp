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
    /// The first CheckOptions::max_messages lines of those, worded as check_oflag_copied.
    std::vector<std::string> copied_after_lines;
};

/// Checks the image at `path` (opened as check_image opens it, with `options`) and returns
/// the plan for repairing it with `fix_errors` (RepairMode::all) or leaks only. Errors: those
/// of check_image.
Result<RepairPlan> plan_repair(const std::filesystem::path& path, bool fix_errors,
                               const CheckOptions& options);

} // namespace qcowmap::detail

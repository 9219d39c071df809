// qcowmap — a read-only consistency check of a qcow2 image, counted like `qemu-img check`.
#pragma once

#if !defined(__cplusplus) || __cplusplus < 202002L
#error "qcowmap needs C++20: compile with -std=c++20 (Meson: cpp_std=c++20)"
#endif

#include <qcowmap/result.hpp>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <vector>

namespace qcowmap {

/// What `check_image` found. The counters mean what the same-named fields of
/// `qemu-img check --output=json` mean (qemu's BdrvCheckResult).
struct CheckResult {
    /// Problems that can lose data: a refcount lower than the references to a cluster,
    /// misaligned or reserved-bit L1/L2/refcount-table entries, refcount overflow, a refcount
    /// block referenced more than once, unreadable bitmap metadata...
    std::uint64_t corruptions = 0;
    /// Clusters whose refcount is higher than the references to them (wasted space only).
    std::uint64_t leaks = 0;
    /// Refcounts that could not be read (e.g. through an unaligned refcount block).
    std::uint64_t check_errors = 0;
    /// One past the highest cluster that is referenced or has a non-zero refcount, in bytes.
    std::uint64_t image_end_offset = 0;
    /// Clusters of the virtual disk (virtual size / cluster size, rounded up).
    std::uint64_t total_clusters = 0;
    /// Clusters of the active disk that are allocated (data, preallocated zero, compressed).
    std::uint64_t allocated_clusters = 0;
    /// Allocated clusters not directly following the previous one of their L2 table (every
    /// compressed cluster counts, as in qemu).
    std::uint64_t fragmented_clusters = 0;
    /// Compressed clusters of the active disk.
    std::uint64_t compressed_clusters = 0;
    /// The first `CheckOptions::max_messages` findings, one line each, worded like qemu's
    /// ("Leaked cluster 5 refcount=1 reference=0", "ERROR cluster 3 refcount=0 reference=1"...).
    std::vector<std::string> messages;
    /// Findings beyond `max_messages` that were counted but not kept.
    std::uint64_t messages_dropped = 0;

    /// qemu-img check's exit status: 0 clean, 2 corruptions, 3 leaks only, 1 when some
    /// refcounts could not be read (check_errors).
    int exit_code() const { return check_errors ? 1 : corruptions ? 2 : leaks ? 3 : 0; }
};

struct CheckOptions {
    /// How many finding lines to keep in `CheckResult::messages`.
    std::size_t max_messages = 1000;
    /// Open the backing chain and data file as OpenOptions::untrusted does (path overload).
    bool untrusted = false;
    /// Path overload: as OpenOptions::force_share (qemu-img check -U): take no image locks, so
    /// an image a writer holds is checked anyway; if it changed meanwhile the check fails
    /// with image_changed rather than report the writer's half-done state as leaks.
    bool force_share = false;
};

/// Checks a qcow2 image (version 2 or 3) in memory without modifying it: rebuilds the
/// reference count of every cluster from the header cluster, the active and snapshot L1/L2
/// tables, the snapshot table, the refcount table and blocks, the bitmap directory, bitmap
/// tables and bitmap data, and the encryption header area, then compares them with the stored
/// refcounts (any refcount_order 0..6).
///
/// Memory: one counter per cluster of the real file (`bytes.size() / cluster size`) plus a
/// sparse record of references that point past the end of the file (at most
/// 1 Mi distinct clusters; more is reported as an error), never sized by header claims.
/// Encrypted images are checked too (only metadata is read). The image is opened as qemu-img
/// check opens it (BDRV_O_CHECK): one without a refcount table, or with one at offset 0, is
/// checked (its references are corruptions), and a snapshot table cut off by the end of the
/// buffer reads as zeros. In memory no backing file or data file is opened (neither holds
/// references of this image).
///
/// Errors (the image could not be checked at all, exit status 1 in qemu-img's terms): those
/// of `Image::open_bytes` for a header or table that cannot be parsed (not_qcow2,
/// unsupported_version, invalid_header, invalid_table, unsupported_feature), and
/// unsupported_feature for qcow version 1 images, which keep no refcounts.
Result<CheckResult> check_image(std::span<const std::byte> bytes, const CheckOptions& options = {});

/// Opens `path` as `Image::open` does and checks it like the overload above. As qemu-img
/// check, the backing chain and the external data file must open too: a missing backing file
/// or data file (or a data file bit without a name) is an error. Errors: also io_error for a
/// file that cannot be opened or mapped, and those of OpenOptions::untrusted with
/// `options.untrusted`; image_in_use when a writer holds the image (QEMU's image locks, see
/// OpenOptions::force_share); image_changed when a file changed while it was checked.
Result<CheckResult> check_image(const std::filesystem::path& path,
                                const CheckOptions& options = {});

/// What `repair_image` repairs, as `qemu-img check -r`.
enum class RepairMode {
    /// `-r leaks`: clusters whose refcount is higher than their references get the refcount of
    /// their references (0 frees them).
    leaks,
    /// `-r all`: leaks, and refcounts lower than the references raised to them (a missing
    /// refcount block is allocated); the dirty and corrupt bits are cleared once nothing is
    /// left to repair.
    all,
};

struct RepairOptions {
    RepairMode mode = RepairMode::leaks;
    /// How many finding lines to keep (RepairResult::messages and both checks' messages).
    std::size_t max_messages = 1000;
    /// Open the backing chain and data file as OpenOptions::untrusted does.
    bool untrusted = false;
};

/// What `repair_image` did. The counters mean what qemu-img check -r --output=json's
/// leaks-fixed and corruptions-fixed mean.
struct RepairResult {
    /// The check before anything was written.
    CheckResult before;
    /// Clusters whose refcount was lowered to their references.
    std::uint64_t leaks_fixed = 0;
    /// Clusters whose refcount was raised to their references.
    std::uint64_t corruptions_fixed = 0;
    /// The dirty bit (or the corrupt bit) was cleared.
    bool header_flags_cleared = false;
    /// The refcount structure was rebuilt from the references (RepairMode::all, when a
    /// refcount block was damaged or the refcount table had to grow).
    bool refcounts_rebuilt = false;
    /// The lines qemu-img check -r prints while repairing, in its order and words (qemu's
    /// compare_refcounts and check_oflag_copied): every mismatch found ("Leaked cluster 5
    /// refcount=1 reference=0"), then each again as repaired ("Repairing cluster 5 ...") or
    /// left ("ERROR cluster 7 refcount=1 reference=2"), then OFLAG_COPIED errors left; at most
    /// RepairOptions::max_messages.
    std::vector<std::string> messages;
    std::uint64_t messages_dropped = 0;
    /// The image checked again after the repair (qemu-img's "Double checking the fixed image
    /// now..."); the same as `before` when nothing was written.
    CheckResult after;
    /// True when `after` comes from a check run after writing.
    bool double_checked = false;

    /// qemu-img check -r's exit status: that of the state after the repair.
    int exit_code() const { return after.exit_code(); }
};

/// Repairs the refcounts of the qcow2 image at `path` in place, as `qemu-img check -r leaks`
/// or `-r all` repairs them (qemu's qcow2_check_refcounts, compare_refcounts and
/// qcow2_co_check_locked), then checks it again.
///
/// The image is opened for writing under QEMU's writer lock and checked first; nothing is
/// written unless every repair needed can be made. Writes follow the in-place writer's
/// crash-safe order: raised refcounts (and new refcount blocks, then their refcount table
/// entries) are written and synced before any refcount is lowered, and the dirty/corrupt bits
/// are cleared last, so a crash mid-repair leaves at most leaks, never a refcount lower than
/// the references. A clean image is not written at all.
///
/// With RepairMode::all, a damaged refcount structure (a refcount block unaligned, outside
/// the image or shared with other data) or one whose table would have to grow is rebuilt from
/// the references, as qemu's rebuild_refcount_structure: the new blocks and table go into
/// clusters nothing uses, are synced, and one synced header write then switches to them; the
/// old ones are freed. OFLAG_COPIED flags that disagree with the repaired refcounts are
/// rewritten last; a preallocated zero cluster at an unaligned offset becomes a plain zero
/// cluster first (fix_l2_entry_by_zero). What else qemu repairs is refused before writing
/// (unsupported_feature):
/// L1/L2 entries (reserved bits, alignment), snapshot table entries, bitmaps, a refcount table
/// entry with reserved bits. With RepairMode::leaks, an image whose tables or refcount blocks
/// are damaged is refused too (its references are incomplete, so "leaks" may be data), and
/// one with a referenced cluster of refcount 0 fails as qemu-img fails there ("need to rebuild
/// refcount structures", invalid_table). Where qemu rebuilds the whole refcount structure for
/// a referenced cluster of refcount 0 (`-r all`, e.g. a dirty image left by lazy refcounts),
/// the refcount is raised in place instead: the counts reported are the same.
///
/// Errors: those of `check_image`; io_error (cannot open for writing, a write or sync failed);
/// image_in_use (another program holds the image, QEMU's locks); unsupported_feature and
/// invalid_table as above; unsupported_version for qcow version 1.
Result<RepairResult> repair_image(const std::filesystem::path& path,
                                  const RepairOptions& options = {});

} // namespace qcowmap

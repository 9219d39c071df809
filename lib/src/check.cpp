// Read-only consistency check, counted the way qemu's qcow2_check_refcounts
// (block/qcow2-refcount.c) counts: rebuild an in-memory refcount table (IMRT) from every
// structure that references clusters, then compare it with the refcounts stored in the image.
// Nothing is written and nothing is repaired.
#include "check_internal.hpp"
#include "fault.hpp"
#include "image_state.hpp"
#include "mapped_file.hpp"
#include "refcount.hpp"

#include <qcowmap/check.hpp>

#include <algorithm>
#include <limits>
#include <map>
#include <set>
#include <string_view>

namespace qcowmap {
namespace {

using detail::Bytes;
using detail::fits;
using detail::ImageState;
using detail::load_be16;
using detail::load_be32;
using detail::load_be64;

using detail::ClusterType;
constexpr std::uint64_t kMaxL1Entries = detail::kMaxL1Bytes / 8; // QCOW_MAX_L1_SIZE / L1E_SIZE
constexpr std::uint64_t kMaxBitmapTableEntries = detail::kMaxBitmapTableSize;
// References past the end of the file are kept in a sparse map; more distinct clusters than
// this and the check gives up on them (an error), so memory stays bounded.
constexpr std::size_t kMaxClustersPastEnd = std::size_t{1} << 20;
// Table entries a check may visit beyond the (snapshots + 1) x (file size / 8) of a real image:
// room for L2 tables that end the file short of a full cluster.
constexpr std::uint64_t kVisitBudgetSlack = std::uint64_t{1} << 24;

class Checker {
  public:
    /// With `plan`, also records what a repair (`fix_errors`: -r all, else -r leaks) would do.
    Checker(const ImageState& state, const CheckOptions& options, CheckResult& result,
            detail::RepairPlan* plan = nullptr, bool fix_errors = false)
        : s_(state), info_(state.info), options_(options), r_(result), plan_(plan),
          fix_errors_(fix_errors),
          file_clusters_((state.bytes.size() >> state.cluster_bits) +
                         ((state.bytes.size() & (state.cluster_size - 1)) != 0)),
          counts_(file_clusters_, 0), metadata_(plan ? file_clusters_ : 0, 0) {
        const detail::RefcountGeometry refcounts = detail::RefcountGeometry::of(info_);
        refcount_max_ = refcounts.max_refcount();
        cap_ = std::min<std::uint64_t>(refcount_max_, std::numeric_limits<std::uint32_t>::max());
        refcount_table_entries_ = refcounts.table_entries(info_.refcount_table_clusters);
        refblock_bits_ = refcounts.block_bits();
        // A real image's L1 tables lie side by side in the file and each of them (the active
        // one and one per snapshot) points to an L2 table at most once, so the table entries
        // a check visits are bounded by (snapshots + 1) x (file size / 8). Crafted metadata
        // can point thousands of L1 entries at one L2 table, which qemu-img check rescans
        // each time (2^40 visits from a 36 MiB file); we stop there instead of spinning.
        const std::uint64_t tables = std::uint64_t{info_.snapshot_count} + 1;
        const std::uint64_t per_table = state.bytes.size() / 8;
        visit_budget_ = per_table > (UINT64_MAX - kVisitBudgetSlack) / tables
                            ? UINT64_MAX // saturate rather than wrap to a small budget
                            : tables * per_table + kVisitBudgetSlack;
    }

    void run() {
        // qemu's total_sectors is the virtual size in whole 512-byte sectors.
        const std::uint64_t disk = info_.virtual_size & ~std::uint64_t{511};
        r_.total_clusters = (disk >> s_.cluster_bits) + ((disk & (s_.cluster_size - 1)) != 0);

        inc(0, s_.cluster_size, "header"); // the header cluster
        check_l1(info_.l1_table_offset, info_.l1_size, /*active=*/true);
        check_snapshots();
        counting_old_structure_ = true;
        inc(info_.refcount_table_offset,
            std::uint64_t{info_.refcount_table_clusters} << info_.cluster_bits, "refcount table");
        counting_old_structure_ = false;
        check_encryption_header();
        check_bitmaps();
        check_refblocks();
        if (plan_) {
            plan_->structural_corruptions = r_.corruptions;
            plan_->structural_check_errors = r_.check_errors;
            plan_->first_structural = first_finding_;
        }
        compare();
        if (plan_) {
            plan_->corruptions_before_copied = r_.corruptions;
            plan_->messages_before_copied = r_.messages.size();
            plan_rebuild();
        }
        check_copied_flags();
        if (plan_)
            find_overlapping_fixes();
    }

  private:
    template <typename... Args> void finding(fmt::format_string<Args...> format, Args&&... args) {
        if (plan_ && first_finding_.empty())
            first_finding_ = fmt::format(format, std::forward<Args>(args)...);
        if (r_.messages.size() < options_.max_messages) {
            r_.messages.push_back(fmt::format(format, std::forward<Args>(args)...));
        } else {
            ++r_.messages_dropped;
        }
    }
    /// A corruption of the refcount structure that a rebuild makes good (check_refblocks).
    void refblock_corruption() {
        if (plan_)
            ++plan_->refcount_structure_corruptions;
    }

    template <typename... Args>
    void corruption(fmt::format_string<Args...> format, Args&&... args) {
        ++r_.corruptions;
        finding(format, std::forward<Args>(args)...);
    }

    /// qcow2_inc_refcounts_imrt: one more reference to every cluster touching
    /// [offset, offset + size). Callers pass sizes bounded by qemu's table limits.
    void inc(std::uint64_t offset, std::uint64_t size, const char* what) {
        if (size == 0)
            return;
        if (offset > UINT64_MAX - (size - 1)) {
            corruption("ERROR: range at offset={:#x} (+{:#x}) wraps around", offset, size);
            return;
        }
        // qemu 7.2 refuses to count a region that ends a cluster or more past the end of the
        // file (only the last cluster may be partly allocated) and calls it a corruption.
        const std::uint64_t file_size = s_.bytes.size();
        if (offset + size > file_size && offset + size - file_size >= s_.cluster_size) {
            corruption("ERROR: counting reference for region exceeding the end of the file by "
                       "one cluster or more: offset {:#x} size {:#x}",
                       offset, size);
            return;
        }
        const std::uint64_t first = offset >> s_.cluster_bits;
        const std::uint64_t last = (offset + size - 1) >> s_.cluster_bits;
        for (std::uint64_t k = first; k <= last; ++k) {
            std::uint32_t* count = nullptr;
            if (k < file_clusters_) {
                count = &counts_[k];
            } else {
                auto it = past_end_.find(k);
                if (it == past_end_.end()) {
                    if (past_end_.size() >= kMaxClustersPastEnd) {
                        if (!past_end_overflow_) {
                            past_end_overflow_ = true;
                            ++r_.check_errors;
                            finding("ERROR: more than {} clusters past the end of the file are "
                                    "referenced; the rest are not counted",
                                    kMaxClustersPastEnd);
                        }
                        return;
                    }
                    it = past_end_.emplace(k, 0).first;
                }
                count = &it->second;
            }
            if (*count == cap_) {
                if (cap_ == refcount_max_) {
                    corruption("ERROR: overflow cluster offset={:#x}", k << s_.cluster_bits);
                    // qemu prints this advice after every overflow (qcow2_inc_refcounts_imrt).
                    finding("Use qemu-img amend to increase the refcount entry width or qemu-img "
                            "convert to create a clean copy if the image cannot be opened for "
                            "writing");
                }
                continue;
            }
            ++*count;
            if (plan_) {
                if (counting_old_structure_)
                    plan_->old_structure_clusters.push_back(k);
                const std::string_view kind(what);
                if (k < metadata_.size() && metadata_[k] < 255 && kind != "L2 table" &&
                    kind != "data cluster" && kind != "compressed cluster" && kind != "bitmap data")
                    ++metadata_[k];
            }
        }
    }

    /// How many of a table's `count` entries of `size` bytes at `offset` lie inside the file
    /// (the loops stop at the end of the file; only these cost time).
    std::uint64_t entries_in_file(std::uint64_t offset, std::uint64_t count,
                                  std::uint64_t size) const {
        const std::uint64_t file_size = s_.bytes.size();
        return offset >= file_size ? 0 : std::min(count, (file_size - offset) / size);
    }

    /// Accounts for `entries` table entries about to be read; false (and one check error)
    /// once the metadata would make the check visit more than a real image could.
    bool spend_visits(std::uint64_t entries) {
        if (visit_budget_exceeded_)
            return false;
        if (entries > visit_budget_ - visits_) {
            visit_budget_exceeded_ = true;
            ++r_.check_errors;
            finding("ERROR: the L1/L2 tables reference each other more often than any real "
                    "image of {} bytes with {} snapshots can ({} table entries visited); "
                    "check stopped",
                    s_.bytes.size(), info_.snapshot_count, visits_);
            return false;
        }
        visits_ += entries;
        return true;
    }

    std::uint64_t computed(std::uint64_t cluster) const {
        if (cluster < file_clusters_)
            return counts_[cluster];
        auto it = past_end_.find(cluster);
        return it == past_end_.end() ? 0 : it->second;
    }

    /// An on-disk 64-bit entry; bytes past the end of the file read as zeros, as qemu's
    /// block layer reads them.
    std::uint64_t entry_at(std::uint64_t offset) const {
        return fits(s_.bytes.size(), offset, 8) ? load_be64(s_.bytes.data() + offset) : 0;
    }

    /// qcow2_get_refcount: the stored refcount, or nullopt when its refcount block is not
    /// cluster-aligned (qemu fails the read with EIO); a block past the end of the file reads
    /// as zeros.
    std::optional<std::uint64_t> stored(std::uint64_t cluster) const {
        const detail::RefcountLookup found = detail::lookup_refcount(s_.bytes, info_, cluster);
        if (found.status == detail::RefcountLookup::Status::unaligned_block)
            return std::nullopt;
        return found.refcount;
    }

    /// check_refcounts_l1: the L1 table, its L2 tables and every cluster they reference.
    void check_l1(std::uint64_t l1_offset, std::uint32_t l1_size, bool active) {
        using namespace detail;
        if (l1_size == 0)
            return;
        inc(l1_offset, std::uint64_t{l1_size} * 8, "L1 table");
        if (!spend_visits(entries_in_file(l1_offset, l1_size, 8)))
            return;
        for (std::uint64_t i = 0; i < l1_size; ++i) {
            if (!fits(s_.bytes.size(), l1_offset, (i + 1) * 8))
                break; // zeros past the end
            const L1Entry entry{entry_at(l1_offset + i * 8)};
            // qemu skips only an entry that is all zeros: one with flags but no offset (say
            // COPIED alone) names an L2 table at offset 0, the header cluster, and qemu-img
            // check counts and walks it so (check_refcounts_l1).
            if (!entry.raw)
                continue;
            if (entry.reserved_bits()) {
                corruption("ERROR found L1 entry with reserved bits set: {:x}", entry.raw);
            }
            const std::uint64_t l2_offset = entry.l2_offset();
            inc(l2_offset, s_.cluster_size, "L2 table");
            if (l2_offset & (s_.cluster_size - 1)) {
                corruption("ERROR l2_offset={:x}: Table is not cluster aligned; L1 entry "
                           "corrupted",
                           l2_offset);
            }
            check_l2(l2_offset, active);
        }
    }

    /// check_refcounts_l2.
    void check_l2(std::uint64_t l2_offset, bool active) {
        using namespace detail;
        const std::uint64_t entries = s_.cluster_size / s_.l2_entry_bytes;
        if (!spend_visits(entries_in_file(l2_offset, entries, s_.l2_entry_bytes)))
            return;
        std::uint64_t next_contiguous = 0;
        for (std::uint64_t i = 0; i < entries; ++i) {
            if (!fits(s_.bytes.size(), l2_offset, (i + 1) * s_.l2_entry_bytes))
                break;
            const std::uint64_t at = l2_offset + i * s_.l2_entry_bytes;
            // Entries past the end of the file read as zeros (qemu's block layer).
            const L2Entry l2{entry_at(at), info_.extended_l2 ? entry_at(at + 8) : 0};
            const ClusterType type = cluster_type(l2, info_.extended_l2, s_.has_data_file());
            if (type != ClusterType::compressed && l2.reserved_bits()) {
                corruption("ERROR found l2 entry with reserved bits set: {:x}", l2.raw);
            }
            switch (type) {
            case ClusterType::compressed:
                check_compressed(l2, i, active);
                break;
            case ClusterType::zero_alloc:
            case ClusterType::normal:
                check_host_cluster(l2, type, active, next_contiguous, at);
                break;
            case ClusterType::zero_plain:
                break;
            case ClusterType::unallocated:
                if (l2.allocated_subclusters()) {
                    corruption("ERROR: Unallocated cluster has non-zero subcluster allocation "
                               "map");
                }
                break;
            }
        }
    }

    /// A compressed cluster's L2 entry (entry `i` of its table).
    void check_compressed(const detail::L2Entry& l2, std::uint64_t i, bool active) {
        using namespace detail;
        std::uint64_t entry = l2.raw;
        const CompressedDescriptor d = decode_compressed(entry, s_.compressed_layout);
        if (l2.copied()) {
            corruption("ERROR: coffset={:#x}: copied flag must never be set for compressed "
                       "clusters",
                       d.host_offset);
            entry &= ~kL2CopiedFlag;
        }
        if (s_.has_data_file()) {
            corruption("ERROR compressed cluster {} with data file, entry={:#x}", i, entry);
            return;
        }
        if (l2.bitmap) {
            corruption("ERROR compressed cluster {} with non-zero subcluster allocation bitmap, "
                       "entry={:#x}",
                       i, entry);
            return;
        }
        // qcow2_parse_compressed_l2_entry: the stream's sectors, counted from the first byte
        // (spec "Compressed Clusters Descriptor").
        inc(d.host_offset, d.size, "compressed cluster");
        if (active) {
            ++r_.allocated_clusters;
            ++r_.compressed_clusters;
            ++r_.fragmented_clusters; // sub-sector data: fragmented by nature (qemu)
        }
    }

    /// A data cluster or a preallocated zero cluster: its alignment, subcluster bitmap,
    /// fragmentation (`next_contiguous`: where the previous one of the table ended) and refcount.
    /// The entry lies at file offset `at`.
    void check_host_cluster(const detail::L2Entry& l2, detail::ClusterType type, bool active,
                            std::uint64_t& next_contiguous, std::uint64_t at) {
        const std::uint64_t offset = l2.host_offset();
        if (l2.zero_subclusters() & l2.allocated_subclusters()) {
            corruption("ERROR offset={:x}: Allocated cluster has corrupted subcluster allocation "
                       "bitmap",
                       offset);
        }
        if (offset & (s_.cluster_size - 1)) {
            const bool contains_data = info_.extended_l2 ? l2.allocated_subclusters() != 0
                                                         : type == detail::ClusterType::normal;
            if (contains_data) {
                corruption("ERROR offset={:x}: Data cluster is not properly aligned; L2 entry "
                           "corrupted.",
                           offset);
            } else if (plan_ && fix_errors_ && zeroed_at_.count(at)) {
                // qemu reads the table again for every L1 entry naming it and finds the entry
                // fixed: nothing more to count.
                return;
            } else if (plan_ && fix_errors_) {
                // qemu fixes this one as it finds it (fix_l2_entry_by_zero): the entry reads as
                // zeros without a host cluster (with extended L2 entries, its allocated
                // subclusters become zero ones), counted as fixed, its cluster not counted.
                const bool extended = info_.extended_l2;
                plan_->zeroed_entries.push_back(
                    {at, extended ? 0 : detail::kL2ZeroFlag, extended,
                     (l2.bitmap | (l2.bitmap << 32)) & detail::kSubclusterZeroMask});
                zeroed_at_.insert(at);
                if (plan_->zeroed_lines.size() < options_.max_messages) {
                    plan_->zeroed_lines.push_back(
                        fmt::format("Repairing offset={:x}: Preallocated cluster is not properly "
                                    "aligned; L2 entry corrupted.",
                                    offset));
                }
                return;
            } else {
                corruption("ERROR offset={:x}: Preallocated cluster is not properly aligned; L2 "
                           "entry corrupted.",
                           offset);
            }
        }
        if (active) {
            ++r_.allocated_clusters;
            if (next_contiguous && offset != next_contiguous) {
                ++r_.fragmented_clusters;
            }
            next_contiguous = offset + s_.cluster_size;
        }
        // Clusters in an external data file are not refcounted.
        if (!s_.has_data_file()) {
            inc(offset, s_.cluster_size, "data cluster");
        }
    }

    /// Snapshot L1 tables (calculate_refcounts) and the snapshot table itself.
    void check_snapshots() {
        std::uint64_t at = info_.snapshots_offset;
        std::uint32_t index = 0;
        for (const Snapshot& sn : info_.snapshots) {
            // The table's extent, as qcow2_read_snapshots measures it (snapshots_size).
            at = ((at + 7) & ~std::uint64_t{7}) + 40 + sn.extra_data_size + sn.id.size() +
                 sn.name.size();
            if (info_.version >= 3 && sn.extra_data_size < 16) {
                // v3 requires vm_state_size_large and disk_size (qcow2_check_fix_snapshot_table).
                corruption("ERROR snapshot table entry {} is incomplete", index);
            }
            ++index;
            if (sn.l1_table_offset & (s_.cluster_size - 1)) {
                corruption("ERROR snapshot {} ({}) l1_offset={:#x}: L1 table is not cluster "
                           "aligned; snapshot table entry corrupted",
                           detail::printable(sn.id), detail::printable(sn.name),
                           sn.l1_table_offset);
                continue;
            }
            if (sn.l1_size > kMaxL1Entries) {
                corruption("ERROR snapshot {} ({}) l1_size={:#x}: L1 table is too large; "
                           "snapshot table entry corrupted",
                           detail::printable(sn.id), detail::printable(sn.name), sn.l1_size);
                continue;
            }
            check_l1(sn.l1_table_offset, sn.l1_size, /*active=*/false);
        }
        if (!info_.snapshots.empty()) {
            inc(info_.snapshots_offset, at - info_.snapshots_offset, "snapshot table");
        }
    }

    /// The LUKS header area named by the full disk encryption header pointer extension.
    void check_encryption_header() {
        if (!info_.encryption_header_offset || s_.encryption_header_length == 0)
            return;
        const std::uint64_t offset = *info_.encryption_header_offset;
        const std::uint64_t length = s_.encryption_header_length;
        if (!fits(s_.bytes.size(), offset, length)) {
            corruption("ERROR encryption header at {:#x} (+{:#x}) lies beyond the end of "
                       "the file ({:#x})",
                       offset, length, s_.bytes.size());
            return;
        }
        inc(offset, length, "encryption header");
    }

    /// qcow2_check_bitmaps_refcounts: the directory, each bitmap table and its data clusters.
    void check_bitmaps() {
        // With autoclear bit 0 clear the extension is stale: qemu does not load it
        // (nb_bitmaps stays 0) and counts nothing for it, so its clusters show up as leaks.
        if (!info_.bitmaps || !info_.bitmaps->consistent)
            return;
        const BitmapsExtension& ext = *info_.bitmaps;
        inc(ext.directory_offset, ext.directory_size, "bitmap directory");
        // The directory was parsed and validated at open (header.cpp): every entry is
        // complete, its table aligned and within qemu's size limit; only the table's place
        // in the file and its entries are left to check.
        for (std::size_t i = 0; i < ext.entries.size(); ++i) {
            const BitmapEntry& bitmap = ext.entries[i];
            const std::uint64_t table_bytes = std::uint64_t{bitmap.table_size} * 8;
            if (bitmap.table_size > kMaxBitmapTableEntries ||
                (bitmap.table_offset & (s_.cluster_size - 1)) ||
                !fits(s_.bytes.size(), bitmap.table_offset, table_bytes)) {
                corruption("ERROR bitmap {}: bitmap table at {:#x} of {} entries is unaligned, "
                           "too large or beyond the end of the file ({:#x})",
                           i, bitmap.table_offset, bitmap.table_size, s_.bytes.size());
                continue;
            }
            inc(bitmap.table_offset, table_bytes, "bitmap table");
            for (std::uint64_t j = 0; j < bitmap.table_size; ++j) {
                const detail::BitmapTableEntry e = detail::decode_bitmap_table_entry(
                    s_.bytes.data() + bitmap.table_offset + j * 8);
                const std::uint64_t offset = e.data_offset();
                if (e.reserved_bits() ||
                    (offset && (e.all_ones() || (offset & (s_.cluster_size - 1))))) {
                    corruption("ERROR bitmap {} table entry {}: invalid entry {:#x}", i, j, e.raw);
                    continue;
                }
                if (offset)
                    inc(offset, s_.cluster_size, "bitmap data");
            }
        }
    }

    std::uint64_t imrt_clusters() const {
        return past_end_.empty() ? file_clusters_
                                 : std::max(file_clusters_, past_end_.rbegin()->first + 1);
    }

    /// check_refblocks: each refcount block must be aligned, inside the image and referenced
    /// exactly once.
    void check_refblocks() {
        for (std::uint64_t i = 0; i < refcount_table_entries_; ++i) {
            const std::uint64_t raw = entry_at(info_.refcount_table_offset + i * 8);
            const std::uint64_t offset = raw & detail::kRefcountTableOffsetMask;
            const std::uint64_t cluster = offset >> s_.cluster_bits;
            if (plan_ && offset)
                plan_->old_refblock_targets.push_back(cluster);
            if (raw & detail::kRefcountTableReservedMask) {
                corruption("ERROR refcount table entry {} has reserved bits set", i);
                continue;
            }
            if (offset & (s_.cluster_size - 1)) {
                corruption("ERROR refcount block {} is not cluster aligned; refcount table "
                           "entry corrupted",
                           i);
                refblock_corruption();
                continue;
            }
            if (cluster >= imrt_clusters()) {
                corruption("ERROR refcount block {} is outside image", i);
                refblock_corruption();
                continue;
            }
            if (offset != 0) {
                counting_old_structure_ = true;
                inc(offset, s_.cluster_size, "refcount block");
                counting_old_structure_ = false;
                if (computed(cluster) != 1) {
                    corruption("ERROR refcount block {} refcount={}", i, computed(cluster));
                    refblock_corruption();
                }
            }
        }
    }

    void compare_one(std::uint64_t i, std::uint64_t& highest) {
        auto refcount = stored(i);
        if (!refcount) {
            ++r_.check_errors;
            if (plan_)
                ++plan_->unreadable_refcounts;
            finding("Can't get refcount for cluster {}: Input/output error", i);
            return;
        }
        const std::uint64_t references = computed(i);
        if (*refcount > 0 || references > 0)
            highest = i;
        if (*refcount == references)
            return;
        if (plan_) {
            // qemu's compare_refcounts: refcount 0 means rebuild; otherwise -r leaks fixes
            // higher refcounts, -r all lower ones too.
            if (*refcount == 0)
                plan_->refcount_zero_referenced = true;
            const bool fixed = *refcount > references || fix_errors_;
            plan_->mismatches.push_back({i, *refcount, references, fixed});
        }
        if (*refcount < references) {
            ++r_.corruptions;
            finding("ERROR cluster {} refcount={} reference={}", i, *refcount, references);
        } else {
            ++r_.leaks;
            finding("Leaked cluster {} refcount={} reference={}", i, *refcount, references);
        }
    }

    /// compare_refcounts over every cluster of the file, then over clusters past its end that
    /// are referenced or have a stored refcount (qemu grows its table to cover them).
    void compare() {
        std::uint64_t highest = 0;
        for (std::uint64_t i = 0; i < file_clusters_; ++i) {
            compare_one(i, highest);
        }
        const std::uint64_t end = imrt_clusters();
        if (end > file_clusters_) {
            // Past the end only referenced clusters and clusters of refcount blocks that lie
            // inside the file can differ from zero: visit just those.
            std::set<std::uint64_t> clusters;
            for (const auto& [k, count] : past_end_)
                clusters.insert(k);
            const std::uint64_t per_block = std::uint64_t{1} << refblock_bits_;
            for (std::uint64_t t = file_clusters_ >> refblock_bits_;
                 t < refcount_table_entries_ && (t << refblock_bits_) < end; ++t) {
                const std::uint64_t block = entry_at(info_.refcount_table_offset + t * 8) &
                                            detail::kRefcountTableOffsetMask;
                if (!block || (block & (s_.cluster_size - 1)) ||
                    !fits(s_.bytes.size(), block, s_.cluster_size)) {
                    continue;
                }
                for (std::uint64_t j = 0; j < per_block; ++j) {
                    const std::uint64_t k = (t << refblock_bits_) + j;
                    if (k >= file_clusters_ && k < end && stored(k).value_or(0) != 0) {
                        clusters.insert(k);
                    }
                }
            }
            for (std::uint64_t k : clusters)
                compare_one(k, highest);
        }
        r_.image_end_offset = (highest + 1) << s_.cluster_bits;
    }

    /// check_oflag_copied: the COPIED flag of active L1 and L2 entries says "refcount is 1".
    /// With a plan, also against the refcounts as the repair leaves them, and (-r all) the
    /// entries that fix what would still be wrong.
    void check_copied_flags() {
        using namespace detail;
        // check_l1 stopped (a check error): the active tables would cost as much again.
        if (visit_budget_exceeded_)
            return;
        const Bytes l1 = s_.l1_table;
        for (std::size_t i = 0; i + 8 <= l1.size(); i += 8) {
            const detail::L1Entry l1_entry = detail::decode_l1(l1.data() + i);
            const std::uint64_t l2_offset = l1_entry.l2_offset();
            if (!l2_offset)
                continue;
            const std::uint64_t l2_cluster = l2_offset >> s_.cluster_bits;
            auto refcount = stored(l2_cluster);
            if (auto planned = plan_ ? planned_refcount(l2_cluster, refcount) : std::nullopt;
                planned && (*planned == 1) != l1_entry.copied()) {
                copied_after(fmt::format("OFLAG_COPIED L2 cluster: l1_index={} l1_entry={:x} "
                                         "refcount={}",
                                         i / 8, l1_entry.raw, *planned),
                             info_.l1_table_offset + i, l1_entry.raw, *planned == 1);
            }
            if (refcount && (*refcount == 1) != l1_entry.copied()) {
                corruption("ERROR OFLAG_COPIED L2 cluster: l1_index={} l1_entry={:x} "
                           "refcount={}",
                           i / 8, l1_entry.raw, *refcount);
            }
            // qemu skips the table when the refcount of the table itself cannot be read; a
            // rebuilt structure reads them all.
            const bool check_now = refcount.has_value();
            const bool check_planned = plan_ && (check_now || plan_->rebuild);
            if (!check_now && !check_planned)
                continue;
            const std::uint64_t entries = s_.cluster_size / s_.l2_entry_bytes;
            for (std::uint64_t j = 0; j < entries; ++j) {
                if (!fits(s_.bytes.size(), l2_offset, (j + 1) * s_.l2_entry_bytes))
                    break;
                const std::uint64_t at = l2_offset + j * s_.l2_entry_bytes;
                const detail::L2Entry entry{entry_at(at), 0};
                const ClusterType type =
                    detail::cluster_type(entry, info_.extended_l2, s_.has_data_file());
                if (type != ClusterType::normal && type != ClusterType::zero_alloc)
                    continue;
                std::optional<std::uint64_t> data_refcount = std::uint64_t{1};
                std::optional<std::uint64_t> planned = std::uint64_t{1};
                if (!s_.has_data_file()) {
                    const std::uint64_t cluster = entry.host_offset() >> s_.cluster_bits;
                    data_refcount = stored(cluster);
                    planned = plan_ ? planned_refcount(cluster, data_refcount) : std::nullopt;
                }
                // An entry the repair zeroes has no COPIED flag left to fix (and writing one
                // would undo the zeroing).
                if (check_planned && planned && (*planned == 1) != entry.copied() &&
                    !zeroed_at_.count(at) && !copied_at_.count(at)) {
                    copied_after(fmt::format("OFLAG_COPIED data cluster: l2_entry={:x} "
                                             "refcount={}",
                                             entry.raw, *planned),
                                 at, entry.raw, *planned == 1);
                }
                if (check_now && data_refcount && (*data_refcount == 1) != entry.copied()) {
                    corruption("ERROR OFLAG_COPIED data cluster: l2_entry={:x} refcount={}",
                               entry.raw, *data_refcount);
                }
            }
        }
    }

    /// qemu's qcow2_pre_write_overlap_check: an entry the repair would write must not lie in a
    /// cluster that also holds other metadata (an L1 entry: only its own L1 table). Such
    /// fixes are counted for the refusal, which then writes nothing.
    void find_overlapping_fixes() {
        auto other_metadata = [&](std::uint64_t offset, std::uint8_t own) {
            const std::uint64_t k = offset >> s_.cluster_bits;
            return k < metadata_.size() && metadata_[k] > own;
        };
        const std::uint64_t l1_begin = info_.l1_table_offset;
        const std::uint64_t l1_end = l1_begin + s_.l1_table.size();
        for (const auto& fix : plan_->copied_fixes) {
            const bool in_l1 = fix.offset >= l1_begin && fix.offset < l1_end;
            if (other_metadata(fix.offset, in_l1 ? 1 : 0))
                ++plan_->overlapping_fixes;
        }
        for (const auto& fix : plan_->zeroed_entries) {
            if (other_metadata(fix.offset, 0))
                ++plan_->overlapping_fixes;
        }
    }

    /// The refcount of `cluster` once the planned repair is written (`stored_now`: its
    /// refcount now, if it can be read): its references when the structure is rebuilt.
    std::optional<std::uint64_t> planned_refcount(std::uint64_t cluster,
                                                  std::optional<std::uint64_t> stored_now) const {
        if (plan_->rebuild) {
            auto old = old_structure_count_.find(cluster);
            return computed(cluster) - (old == old_structure_count_.end() ? 0 : old->second);
        }
        if (!stored_now)
            return std::nullopt;
        return after_repair(cluster, *stored_now);
    }

    /// qemu's compare_refcounts sets `rebuild` for damaged refcount blocks; a refcount that
    /// must go up past the end of the refcount table needs a larger table, which only a
    /// rebuild gives here. Only with -r all (qemu rebuilds with BDRV_FIX_ERRORS).
    void plan_rebuild() {
        if (!fix_errors_)
            return;
        // As the in-place repair places them (repair.cpp): a new block for each missing one a
        // raised refcount needs, past the file and every raised cluster, each counted by a
        // block that may itself be missing.
        bool table_must_grow = false;
        std::set<std::uint64_t> missing;
        std::vector<std::uint64_t> new_clusters;
        std::uint64_t end_cluster = file_clusters_;
        for (const detail::RefcountMismatch& m : plan_->mismatches)
            end_cluster = std::max(end_cluster, m.cluster + 1);
        auto need_block = [&](std::uint64_t cluster) {
            const std::uint64_t block = cluster >> refblock_bits_;
            if (block >= refcount_table_entries_) {
                table_must_grow = true;
                return;
            }
            const std::uint64_t entry = entry_at(info_.refcount_table_offset + block * 8) &
                                        detail::kRefcountTableOffsetMask;
            if (entry == 0 && missing.insert(block).second)
                new_clusters.push_back(end_cluster + new_clusters.size());
        };
        for (const detail::RefcountMismatch& m : plan_->mismatches) {
            if (m.fixed && m.references > m.stored)
                need_block(m.cluster);
        }
        for (std::size_t i = 0; i < new_clusters.size() && !table_must_grow; ++i)
            need_block(new_clusters[i]);
        if (plan_->refcount_structure_corruptions == 0 && !table_must_grow)
            return;
        const std::uint64_t clusters = imrt_clusters();
        if (clusters - file_clusters_ > kMaxClustersPastEnd)
            return; // bounded: past_end_ holds at most that many
        plan_->rebuild = true;
        plan_->references.assign(counts_.begin(), counts_.end());
        plan_->references.resize(clusters, 0);
        for (const auto& [k, count] : past_end_)
            plan_->references[k] = count;
        for (std::uint64_t k : plan_->old_structure_clusters)
            ++old_structure_count_[k];
    }

    /// The refcount of `cluster` once the repair planned has written it (`stored` now).
    std::uint64_t after_repair(std::uint64_t cluster, std::uint64_t stored_now) const {
        const auto& m = plan_->mismatches;
        auto it = std::lower_bound(
            m.begin(), m.end(), cluster,
            [](const detail::RefcountMismatch& a, std::uint64_t c) { return a.cluster < c; });
        if (it != m.end() && it->cluster == cluster && it->fixed)
            return it->references;
        return stored_now;
    }
    void copied_after(std::string line, std::uint64_t entry_offset, std::uint64_t raw,
                      bool copied) {
        // qemu rewrites the table before it reads it again for the next L1 entry naming it:
        // each entry is fixed (and counted) once.
        copied_at_.insert(entry_offset);
        ++plan_->copied_after;
        if (plan_->copied_after_lines.size() < options_.max_messages)
            plan_->copied_after_lines.push_back(std::move(line));
        plan_->copied_fixes.push_back(
            {entry_offset, copied ? raw | detail::kCopiedFlag : raw & ~detail::kCopiedFlag});
    }

    const ImageState& s_;
    const ImageInfo& info_;
    const CheckOptions& options_;
    CheckResult& r_;
    detail::RepairPlan* plan_;
    bool fix_errors_;
    std::string first_finding_;
    std::uint64_t file_clusters_;
    std::vector<std::uint32_t> counts_;
    std::map<std::uint64_t, std::uint32_t> past_end_;
    bool past_end_overflow_ = false;
    /// While the old refcount table and blocks are counted (a plan records where they lie).
    bool counting_old_structure_ = false;
    std::map<std::uint64_t, std::uint32_t> old_structure_count_;
    /// File offsets of the L2 entries the plan zeroes, and of the entries whose OFLAG_COPIED
    /// flag it fixes.
    std::set<std::uint64_t> zeroed_at_;
    std::set<std::uint64_t> copied_at_;
    /// With a plan: per cluster of the file, how many references from metadata other than L2
    /// tables (header, L1 tables, refcount table and blocks, snapshot table, bitmap directory
    /// and tables, LUKS header), at most 255.
    std::vector<std::uint8_t> metadata_;
    std::uint64_t visits_ = 0;
    std::uint64_t visit_budget_ = 0;
    bool visit_budget_exceeded_ = false;
    std::uint64_t refcount_max_ = 0;
    std::uint64_t cap_ = 0;
    std::uint64_t refcount_table_entries_ = 0;
    unsigned refblock_bits_ = 0;
};

} // namespace

namespace {

/// Checks the top layer of a chain opened the way qemu-img check opens it (BDRV_O_CHECK).
Result<CheckResult> check_state(const detail::ImageState& state, const CheckOptions& options) {
    if (state.info.version < 2) {
        return Error{ErrorCode::unsupported_feature,
                     "qcow version 1 images keep no reference counts; there is nothing to check"};
    }
    CheckResult result;
    Checker(state, options, result).run();
    // Leaks or corruptions counted while a writer changed the file are not the image's.
    Error changed = detail::explain_change(state, Error{ErrorCode::io_error, {}});
    if (changed.code == ErrorCode::image_changed)
        return changed;
    return result;
}

/// qemu-img check's open: only metadata is read, so encrypted images are checked like any
/// other (qemu too checks them without the key); an image without a refcount table opens and
/// its missing tables read as zeros (qcow2_do_open with BDRV_O_CHECK).
detail::OpenMode check_mode() {
    detail::OpenMode mode;
    mode.parse.check = true;
    return mode;
}

} // namespace

Result<CheckResult> check_image(std::span<const std::byte> bytes, const CheckOptions& options) {
    // In memory there is no backing chain or data file to open; neither is needed to count
    // the image's own references.
    OpenOptions open;
    open.backing = BackingMode::none;
    detail::OpenMode mode = check_mode();
    mode.open_data_file = false;
    return detail::contain_faults({}, [&]() -> Result<CheckResult> {
        auto state = detail::open_chain(bytes, open, mode);
        if (!state) {
            return std::move(state).error();
        }
        return check_state(**state, options);
    });
}

Result<CheckResult> check_image(const std::filesystem::path& path, const CheckOptions& options) {
    // Opened as Image::open opens it, as qemu-img check does: a backing file or external data
    // file that cannot be opened means the image cannot be checked (exit 1 in qemu-img).
    OpenOptions open;
    open.untrusted = options.untrusted;
    open.force_share = options.force_share;
    return detail::contain_faults(path, [&]() -> Result<CheckResult> {
        auto state = detail::open_chain(path, open, check_mode());
        if (!state) {
            return std::move(state).error();
        }
        return check_state(**state, options);
    });
}

namespace detail {

Result<RepairPlan> plan_repair(const std::filesystem::path& path, bool fix_errors,
                               const CheckOptions& options) {
    OpenOptions open;
    open.untrusted = options.untrusted;
    open.force_share = options.force_share;
    return detail::contain_faults(path, [&]() -> Result<RepairPlan> {
        auto state = detail::open_chain(path, open, check_mode());
        if (!state) {
            return std::move(state).error();
        }
        const ImageState& s = **state;
        if (s.info.version < 2) {
            return Error{ErrorCode::unsupported_version,
                         "qcow version 1 images keep no reference counts; there is nothing to "
                         "repair"};
        }
        RepairPlan plan;
        plan.info = s.info;
        plan.file_size = s.bytes.size();
        Checker(s, options, plan.check, &plan, fix_errors).run();
        Error changed = detail::explain_change(s, Error{ErrorCode::io_error, {}});
        if (changed.code == ErrorCode::image_changed)
            return changed;
        return plan;
    });
}

} // namespace detail

} // namespace qcowmap

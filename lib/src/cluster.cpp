// Cluster lookup and classification (spec "Cluster mapping", "Extended L2 Entries"; qemu's
// block/qcow2-cluster.c and block/qcow.c get_cluster_offset): see cluster.hpp.
#include "cluster.hpp"

#include <algorithm>
#include <cerrno>
#include <unistd.h>

namespace qcowmap::detail {

Error cluster_error(std::string message) {
    return Error{ErrorCode::invalid_cluster, std::move(message)};
}

Result<Bytes> l1_table(const ImageState& state, std::uint64_t offset, std::uint32_t entries,
                       std::uint64_t disk_size, std::string_view what) {
    const std::uint64_t cluster_size = state.cluster_size;
    const std::uint64_t bytes = std::uint64_t{entries} * 8;
    if (bytes > kMaxL1Bytes) {
        return Error{ErrorCode::invalid_table,
                     fmt::format("{} of {} entries ({:#x} bytes) exceeds qemu's limit of {:#x} "
                                 "bytes",
                                 what, entries, bytes, kMaxL1Bytes)};
    }
    const std::uint64_t clusters =
        (disk_size >> state.cluster_bits) + ((disk_size & (cluster_size - 1)) != 0);
    const std::uint64_t needed =
        (clusters >> state.l2_bits) + ((clusters & ((std::uint64_t{1} << state.l2_bits) - 1)) != 0);
    if (needed > entries) {
        return Error{ErrorCode::invalid_table,
                     fmt::format("{} of {} entries is too small for the virtual size {} (needs {})",
                                 what, entries, disk_size, needed)};
    }
    if (entries == 0) {
        return Bytes{};
    }
    if (!is_aligned(offset, cluster_size) || offset == 0 || offset > kMaxTableEnd - bytes) {
        return Error{ErrorCode::invalid_table,
                     fmt::format("{} offset {:#x} is not a non-zero multiple of the cluster size "
                                 "{:#x}",
                                 what, offset, cluster_size)};
    }
    if (state.mode.stream) {
        return Bytes{}; // read by the stream decoder as it arrives
    }
    if (state.mode.salvage && !fits(state.bytes.size(), offset, bytes)) {
        // Salvage: the entries cut off by the end of the file read as zeros (unallocated), as
        // qemu reads them; the walk reports those ranges. Keep the whole entries in the file.
        const std::uint64_t present =
            offset >= state.bytes.size() ? 0 : (state.bytes.size() - offset) / 8 * 8;
        return state.bytes.subspan(offset >= state.bytes.size() ? 0 : offset, present);
    }
    return slice(state.bytes, offset, bytes, what);
}

namespace {

Error compressed_past_eof(std::uint64_t cluster_start, std::uint64_t coffset, std::uint64_t csize,
                          std::uint64_t file_size) {
    return cluster_error(fmt::format("compressed cluster for virtual offset {:#x} at host offset "
                                     "{:#x} (+{:#x}) lies beyond end of file ({:#x})",
                                     cluster_start, coffset, csize, file_size));
}

ClusterRun unallocated_to_table_end(const ImageState& s, std::uint64_t pos, std::uint64_t limit) {
    std::uint64_t table_end = (pos | (s.l2_coverage() - 1)) + 1;
    ClusterRun run;
    run.length = std::min(limit, table_end == 0 ? limit : table_end) - pos;
    return run;
}

/// Salvage: a data run whose host range leaves the file is cut at the end of the file (the
/// rest is classified by the next call), and one that starts past it reads as zeros, as qemu
/// reads a file cut short.
void clip_to_file(const ImageState& s, std::uint64_t pos, ClusterRun& run) {
    const std::uint64_t size = s.data_bytes.size();
    const std::uint64_t host = *run.host_offset;
    if (host < size) {
        run.length = std::min(run.length, size - host);
        return;
    }
    run.damage = fmt::format("data for virtual offset {:#x} at host offset {:#x} (+{:#x}) lies "
                             "beyond end of {} ({:#x})",
                             pos, host, run.length, s.data_file ? "the data file" : "file", size);
    run.kind = ExtentKind::zero;
    run.present = true;
    run.host_offset.reset();
}

/// qcow version 1 (block/qcow.c get_cluster_offset): plain offsets, no flags but bit 63.
Result<ClusterRun> classify_v1(const ImageState& s, std::uint64_t pos, std::uint64_t limit) {
    const std::uint64_t l1_index = pos >> (s.l2_bits + s.cluster_bits);
    const std::uint64_t l2_offset = load_be64(s.l1_table.data() + l1_index * 8);
    if (l2_offset == 0) {
        return unallocated_to_table_end(s, pos, limit);
    }
    auto l2_table = slice(s.bytes, l2_offset, s.l2_table_bytes, "L2 table");
    if (!l2_table) {
        return std::move(l2_table).error();
    }
    const std::uint64_t l2_index = (pos >> s.cluster_bits) & ((std::uint64_t{1} << s.l2_bits) - 1);
    const std::uint64_t entry = load_be64(l2_table->data() + l2_index * 8);
    const std::uint64_t cluster_start = pos & ~(s.cluster_size - 1);
    ClusterRun run;
    run.length = std::min(limit, cluster_start + s.cluster_size) - pos;
    if (entry & detail::kV1CompressedFlag) {
        const detail::CompressedDescriptor d =
            detail::decode_compressed(entry, s.compressed_layout);
        auto stream = slice(s.bytes, d.host_offset, d.size, "", ErrorCode::invalid_cluster);
        if (!stream) {
            return compressed_past_eof(cluster_start, d.host_offset, d.size, s.bytes.size());
        }
        run.kind = ExtentKind::compressed;
        run.present = true;
        run.compressed_host_offset = d.host_offset;
        run.compressed_size = d.size;
        run.offset_in_cluster = pos - cluster_start;
    } else if (entry != 0) {
        run.kind = ExtentKind::data;
        run.present = true;
        run.host_offset = entry + (pos - cluster_start);
        if (s.mode.salvage)
            clip_to_file(s, pos, run);
    }
    return run;
}

/// What find_l2_entry found for a position: its L2 entry (the table, its entries inside the
/// file: all of them, but for a table cut off by the end of the file when salvaging, and the
/// entry's index), or why there is no entry to classify.
struct L2Lookup {
    enum class Found : std::uint8_t {
        entry,
        no_table,      ///< the L1 entry is empty: unallocated to the table's end
        l1_cut_off,    ///< salvage: the L1 table ends (end of file) before this entry
        table_cut_off, ///< salvage: the L2 table ends (end of file) before this entry
    };
    Found found = Found::entry;
    const std::byte* table = nullptr;
    std::uint64_t index = 0;
    std::uint64_t available = 0;
    std::uint64_t l2_offset = 0;
};

/// The L1/L2 lookup of `pos` (qcow2_get_host_offset's first half). Errors: a bad L1 entry, an
/// unaligned or (but when salvaging) out-of-file L2 table. A small value on every path, so that
/// the caller builds its run in place (the walk of a sparse disk takes the no_table path once
/// per L1 entry).
Result<L2Lookup> find_l2_entry(const ImageState& s, std::uint64_t pos) {
    L2Lookup found;
    const std::uint64_t l1_index = pos >> (s.l2_bits + s.cluster_bits);
    // parse_image checked that L1 covers the whole virtual size and lies inside the file,
    // except for an image opened for check, whose entries past the end of the file read as 0,
    // and with salvage, whose L1 table may be cut off by the end of the file.
    if (l1_index >= s.l1_table.size() / 8) {
        found.found = L2Lookup::Found::l1_cut_off;
        return found;
    }
    const L1Entry l1 = decode_l1(s.l1_table.data() + l1_index * 8);
    if (l1.reserved_bits()) {
        return Error{ErrorCode::invalid_table,
                     fmt::format("L1 entry {} ({:#018x}) has reserved bits set", l1_index, l1.raw)};
    }
    found.l2_offset = l1.l2_offset();
    if (found.l2_offset == 0) {
        found.found = L2Lookup::Found::no_table;
        return found;
    }
    if (found.l2_offset & (s.cluster_size - 1)) {
        return Error{ErrorCode::invalid_table,
                     fmt::format("L2 table offset {:#x} (L1 index {}) is not aligned to the "
                                 "cluster size {:#x}",
                                 found.l2_offset, l1_index, s.cluster_size)};
    }
    found.index = (pos >> s.cluster_bits) & ((std::uint64_t{1} << s.l2_bits) - 1);
    found.available = std::uint64_t{1} << s.l2_bits;
    if (fits(s.bytes.size(), found.l2_offset, s.cluster_size)) {
        found.table = s.bytes.data() + found.l2_offset;
        return found;
    }
    if (!s.mode.salvage) {
        return slice(s.bytes, found.l2_offset, s.cluster_size, "L2 table").error();
    }
    // Salvage: the missing entries read as zeros (unallocated), as for qemu.
    found.available = found.l2_offset >= s.bytes.size()
                          ? 0
                          : (s.bytes.size() - found.l2_offset) / s.l2_entry_bytes;
    found.table = s.bytes.data() + std::min<std::uint64_t>(found.l2_offset, s.bytes.size());
    if (found.index >= found.available)
        found.found = L2Lookup::Found::table_cut_off;
    return found;
}

/// The run of a position find_l2_entry found no entry for.
ClusterRun run_without_entry(const ImageState& s, std::uint64_t pos, std::uint64_t limit,
                             const L2Lookup& l2) {
    if (l2.found == L2Lookup::Found::l1_cut_off) {
        // Every entry from here on is missing: one run to the end, whatever the header claims.
        ClusterRun run;
        run.length = limit - pos;
        const std::uint64_t cut = s.l1_table.size() / 8;
        run.damage = fmt::format("L1 table entries {} and on (from {:#x}) lie beyond end of file "
                                 "({:#x})",
                                 cut, s.info.l1_table_offset + cut * 8, s.bytes.size());
        return run;
    }
    // No L2 table: everything it would describe is unallocated.
    ClusterRun run = unallocated_to_table_end(s, pos, limit);
    if (l2.found == L2Lookup::Found::table_cut_off) {
        run.damage = slice(s.bytes, l2.l2_offset, s.cluster_size, "L2 table").error().message;
    }
    return run;
}

/// The cluster a classified position lies in.
struct ClusterSpan {
    std::uint64_t pos = 0;
    std::uint64_t start = 0;   ///< the cluster's first guest byte
    std::uint64_t in = 0;      ///< pos - start
    std::uint64_t run_end = 0; ///< the cluster's end, or `limit` when that comes first
};

/// A compressed cluster (spec "Compressed Clusters Descriptor").
Result<ClusterRun> classify_compressed(const ImageState& s, const L2Entry& entry,
                                       const ClusterSpan& c) {
    if (s.has_data_file()) {
        return cluster_error(fmt::format("compressed cluster at virtual offset {:#x} in an "
                                         "image with an external data file",
                                         c.start));
    }
    // The subcluster bitmap of a compressed cluster is unused: qemu's reads ignore it
    // (qcow2_get_subcluster_type; iotest 271), only its check reports it.
    const CompressedDescriptor d = decode_compressed(entry.raw, s.compressed_layout);
    // The descriptor counts whole 512-byte sectors; only the file's last, partial sector
    // may be cut short by the end of the file (qemu writes compressed data byte-exact).
    const std::uint64_t sectors_in_file =
        (s.bytes.size() + kCompressedSectorSize - 1) / kCompressedSectorSize;
    if (!fits(sectors_in_file * kCompressedSectorSize, d.host_offset, d.size) ||
        d.host_offset >= s.bytes.size()) {
        return compressed_past_eof(c.start, d.host_offset, d.size, s.bytes.size());
    }
    ClusterRun run;
    run.kind = ExtentKind::compressed;
    run.present = true;
    run.length = c.run_end - c.pos;
    run.compressed_host_offset = d.host_offset;
    // The last sector may be cut short by the end of the file; qemu reads such a tail as
    // zeros, and decompression stops once a cluster is produced.
    run.compressed_size = std::min<std::uint64_t>(d.size, s.bytes.size() - d.host_offset);
    run.offset_in_cluster = c.in;
    return run;
}

/// A standard L2 entry, and the following entries of its table that read the same way.
Result<ClusterRun> classify_standard(const ImageState& s, const L2Entry& entry, ClusterType type,
                                     const L2Lookup& l2, const ClusterSpan& c, std::uint64_t limit,
                                     std::optional<std::uint64_t> host_here) {
    const bool host_valid = host_here.has_value();
    ClusterRun run;
    run.length = c.run_end - c.pos;
    // The following entries of this L2 table that read the same way join the run here, in one
    // tight loop, instead of one classify call (and merge) per cluster: a sparse 1 TiB disk has
    // millions of empty entries. An entry joins only when it equals this one (no host offset)
    // or carries the same flags with the next host offset, so it would classify exactly like
    // this one: same validation outcome, same kind.
    // Not for a range that falls through to a backing layer: the layer below would cut the
    // run short, the next call would rescan the same entries, and a walk over an overlay of
    // empty tables would turn quadratic.
    const bool falls_through = type == ClusterType::unallocated && s.backing;
    const std::uint64_t entries_per_table = falls_through ? 0 : std::uint64_t{1} << s.l2_bits;
    const std::uint64_t flags = entry.raw & ~kL2OffsetMask;
    std::uint64_t next_host = entry.host_offset() + s.cluster_size;
    std::uint64_t next_start = c.start + s.cluster_size;
    for (std::uint64_t i = l2.index + 1;
         i < entries_per_table && i < l2.available && next_start < limit; ++i) {
        const std::uint64_t next = load_be64(l2.table + i * 8);
        if (host_valid ? ((next & ~kL2OffsetMask) != flags || (next & kL2OffsetMask) != next_host)
                       : next != entry.raw) {
            break;
        }
        run.length += std::min(limit, next_start + s.cluster_size) - next_start;
        next_start += s.cluster_size;
        next_host += s.cluster_size;
    }
    switch (type) {
    case ClusterType::zero_plain:
    case ClusterType::zero_alloc:
        if (s.info.version < 3) {
            return cluster_error(
                fmt::format("zero cluster at virtual offset {:#x} in a version 2 image", c.start));
        }
        run.kind = ExtentKind::zero;
        run.present = true;
        run.host_offset = host_here;
        break;
    case ClusterType::unallocated:
        run.kind = ExtentKind::zero;
        run.present = false;
        break;
    default:
        run.kind = ExtentKind::data;
        run.present = true;
        run.host_offset = host_here;
        if (s.mode.salvage)
            clip_to_file(s, c.pos, run);
        break;
    }
    return run;
}

/// An extended L2 entry: the run of subclusters from `c.pos` that read the same way (bits 0-31
/// allocated, bits 32-63 reads-as-zero, one bit per subcluster).
Result<ClusterRun> classify_extended(const ImageState& s, const L2Entry& entry,
                                     const ClusterSpan& c, std::optional<std::uint64_t> host_here) {
    const std::uint32_t allocated = entry.allocated_subclusters();
    const std::uint32_t zero = entry.zero_subclusters();
    if (allocated & zero) {
        return cluster_error(fmt::format("L2 entry for virtual offset {:#x}: subcluster bitmap "
                                         "{:#018x} marks subclusters both allocated and zero",
                                         c.start, entry.bitmap));
    }
    if (!host_here && allocated != 0) {
        return cluster_error(fmt::format("L2 entry for virtual offset {:#x}: subclusters are "
                                         "allocated (bitmap {:#018x}) but the host offset is 0",
                                         c.start, entry.bitmap));
    }
    auto type_of = [&](unsigned index) {
        std::uint32_t bit = std::uint32_t{1} << index;
        return (zero & bit) ? 2 : (allocated & bit) ? 1 : 0;
    };
    unsigned first = static_cast<unsigned>(c.in >> s.subcluster_bits);
    int sub_type = type_of(first);
    unsigned last = first + 1;
    while (last < kSubclustersPerCluster && type_of(last) == sub_type) {
        ++last;
    }
    std::uint64_t run_end =
        std::min(c.run_end, c.start + (std::uint64_t{last} << s.subcluster_bits));
    ClusterRun run;
    run.length = run_end - c.pos;
    run.host_offset = host_here;
    run.kind = sub_type == 1 ? ExtentKind::data : ExtentKind::zero;
    run.present = sub_type != 0;
    if (run.kind == ExtentKind::data && s.mode.salvage)
        clip_to_file(s, c.pos, run);
    return run;
}

/// A qcow2 layer's classification of `pos` (qcow2_get_host_offset, qcow2_get_subcluster_type).
Result<ClusterRun> classify(const ImageState& s, std::uint64_t pos, std::uint64_t limit) {
    if (s.info.version == 1) {
        return classify_v1(s, pos, limit);
    }
    auto found = find_l2_entry(s, pos);
    if (!found) {
        return std::move(found).error();
    }
    const L2Lookup& l2 = *found;
    if (l2.found != L2Lookup::Found::entry) {
        return run_without_entry(s, pos, limit, l2);
    }
    const bool extended = s.info.extended_l2;
    const L2Entry entry = decode_l2(l2.table + l2.index * s.l2_entry_bytes, extended);
    const ClusterType type = cluster_type(entry, extended, s.has_data_file());
    ClusterSpan c;
    c.pos = pos;
    c.start = pos & ~(s.cluster_size - 1);
    c.in = pos - c.start;
    c.run_end = std::min(limit, c.start + s.cluster_size);
    if (type == ClusterType::compressed) {
        return classify_compressed(s, entry, c);
    }
    // With extended L2 entries bit 0 "is always 0" (spec), but qemu ignores it there, and so
    // do we: the subcluster bitmap says what reads as zero.
    if (entry.reserved_bits()) {
        return cluster_error(fmt::format("L2 entry for virtual offset {:#x} ({:#018x}) has "
                                         "reserved bits set",
                                         c.start, entry.raw));
    }
    const std::uint64_t host = entry.host_offset();
    if (host & (s.cluster_size - 1)) {
        return cluster_error(fmt::format("L2 entry for virtual offset {:#x} has host offset {:#x} "
                                         "not aligned to the cluster size {:#x}",
                                         c.start, host, s.cluster_size));
    }
    // Offset 0 means unallocated, except with an external data file, where COPIED marks a
    // cluster allocated at data file offset 0 (cluster_type).
    std::optional<std::uint64_t> host_here;
    if (type == ClusterType::normal || type == ClusterType::zero_alloc) {
        host_here = host + c.in;
    }
    if (!extended) {
        return classify_standard(s, entry, type, l2, c, limit, host_here);
    }
    return classify_extended(s, entry, c, host_here);
}

/// A raw layer: data where the file has data, zeros in its holes (qemu's file-posix block
/// status, SEEK_DATA/SEEK_HOLE), both present and with a host offset equal to the position.
ClusterRun classify_raw(const ImageState& s, std::uint64_t pos, std::uint64_t limit) {
    ClusterRun run;
    run.present = true;
    run.host_offset = pos;
    run.kind = ExtentKind::data;
    run.length = limit - pos;
    const int fd = s.fd();
    if (fd < 0) {
        return run;
    }
    const off_t data = ::lseek(fd, static_cast<off_t>(pos), SEEK_DATA);
    if (data < 0) {
        if (errno == ENXIO) {
            run.kind = ExtentKind::zero; // only a hole remains up to the end of the file
        }
        return run;
    }
    if (static_cast<std::uint64_t>(data) > pos) {
        run.kind = ExtentKind::zero;
        run.length = std::min<std::uint64_t>(static_cast<std::uint64_t>(data), limit) - pos;
        return run;
    }
    const off_t hole = ::lseek(fd, static_cast<off_t>(pos), SEEK_HOLE);
    if (hole > static_cast<off_t>(pos)) {
        run.length = std::min<std::uint64_t>(static_cast<std::uint64_t>(hole), limit) - pos;
    }
    return run;
}

/// Salvage: an error met classifying `pos` in layer `s` becomes a damaged run that reads as
/// zeros: the cluster for a bad entry (invalid_cluster), the range of the L2 table for a bad
/// table (invalid_table).
ClusterRun damaged_run(const ImageState& s, std::uint64_t pos, std::uint64_t limit, Error error) {
    ClusterRun run;
    if (error.code == ErrorCode::invalid_table) {
        run = unallocated_to_table_end(s, pos, limit);
    } else {
        const std::uint64_t cluster_end = (pos | (s.cluster_size - 1)) + 1;
        run.length = std::min(limit, cluster_end == 0 ? limit : cluster_end) - pos;
    }
    run.kind = ExtentKind::zero;
    run.present = true;
    run.damage = std::move(error.message);
    return run;
}

} // namespace

Result<ClusterRun> classify_chain(const ImageState& s, std::uint32_t depth, std::uint64_t pos,
                                  std::uint64_t limit, const detail::SalvageState* salvage) {
    Result<ClusterRun> run = s.format == detail::LayerFormat::raw
                                 ? Result<ClusterRun>(classify_raw(s, pos, limit))
                                 : classify(s, pos, limit);
    if (!run && s.mode.salvage) {
        run = damaged_run(s, pos, limit, std::move(run).error());
    }
    if (!run) {
        return run;
    }
    if (salvage && run->kind == ExtentKind::compressed &&
        salvage->bad(depth, run->compressed_host_offset)) {
        run->kind = ExtentKind::zero;
        run->damage = "compressed cluster does not decompress";
    }
    run->layer = &s;
    run->depth = depth;
    if (run->present || !s.backing) {
        return run;
    }
    const ImageState& below = *s.backing;
    if (pos >= below.disk_size) {
        return run; // zeros beyond the backing file's end, not present
    }
    auto through = classify_chain(below, depth + 1, pos,
                                  std::min(pos + run->length, below.disk_size), salvage);
    if (through && !run->damage.empty()) {
        // Salvage: a cut-off table of this layer lets the layer below show through; the range
        // stays damaged (the scan reports it).
        through->damage = std::move(run->damage);
        through->damage_depth = depth;
        through->damage_falls_through = true;
    }
    return through;
}

Result<ClusterRun> classify_chain(const ImageState& top, std::uint32_t depth, std::uint64_t pos,
                                  std::uint64_t limit) {
    return classify_chain(top, depth, pos, limit, top.salvage.get());
}

} // namespace qcowmap::detail

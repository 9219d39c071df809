// The extent iterator: walks L1/L2 in place in the mapping and merges runs.
// Spec: docs/interop/qcow2.txt, "Cluster mapping" and "Extended L2 Entries".
#include "fault.hpp"
#include "image_state.hpp"

#include <algorithm>
#include <cerrno>
#include <set>
#include <unistd.h>
#include <utility>

namespace qcowmap {

using detail::Bytes;
using detail::ImageState;
using detail::load_be64;
using detail::slice;

namespace {

/// One classified run starting at the requested position: a cluster and the following clusters
/// of its L2 table that read the same way (standard L2 entries), a run of like subclusters
/// inside one cluster (extended L2 entries), one compressed cluster, or the rest of an L2
/// table's range when its L1 entry is empty.
struct Run {
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

Error cluster_error(std::string message) {
    return Error{ErrorCode::invalid_cluster, std::move(message)};
}

Error compressed_past_eof(std::uint64_t cluster_start, std::uint64_t coffset, std::uint64_t csize,
                          std::uint64_t file_size) {
    return cluster_error(fmt::format("compressed cluster for virtual offset {:#x} at host offset "
                                     "{:#x} (+{:#x}) lies beyond end of file ({:#x})",
                                     cluster_start, coffset, csize, file_size));
}

Run unallocated_to_table_end(const ImageState& s, std::uint64_t pos, std::uint64_t limit) {
    std::uint64_t table_end = (pos | (s.l2_coverage() - 1)) + 1;
    Run run;
    run.length = std::min(limit, table_end == 0 ? limit : table_end) - pos;
    return run;
}

/// Salvage: a data run whose host range leaves the file is cut at the end of the file (the
/// rest is classified by the next call), and one that starts past it reads as zeros, as qemu
/// reads a file cut short.
void clip_to_file(const ImageState& s, std::uint64_t pos, Run& run) {
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
Result<Run> classify_v1(const ImageState& s, std::uint64_t pos, std::uint64_t limit) {
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
    Run run;
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

Result<Run> classify(const ImageState& s, std::uint64_t pos, std::uint64_t limit) {
    using detail::ClusterType;
    if (s.info.version == 1) {
        return classify_v1(s, pos, limit);
    }
    const std::uint64_t cluster_mask = s.cluster_size - 1;
    const std::uint64_t l1_index = pos >> (s.l2_bits + s.cluster_bits);
    // parse_image checked that L1 covers the whole virtual size and lies inside the file,
    // except for an image opened for check, whose entries past the end of the file read as 0.
    if (l1_index >= s.l1_table.size() / 8) {
        // Salvage: the L1 table was cut off by the end of the file. Every entry from here on
        // is missing: one run to the end, whatever the header claims.
        Run run;
        run.length = limit - pos;
        const std::uint64_t cut = s.l1_table.size() / 8;
        run.damage = fmt::format("L1 table entries {} and on (from {:#x}) lie beyond end of file "
                                 "({:#x})",
                                 cut, s.info.l1_table_offset + cut * 8, s.bytes.size());
        return run;
    }
    const detail::L1Entry l1 = detail::decode_l1(s.l1_table.data() + l1_index * 8);
    if (l1.reserved_bits()) {
        return Error{ErrorCode::invalid_table,
                     fmt::format("L1 entry {} ({:#018x}) has reserved bits set", l1_index, l1.raw)};
    }
    const std::uint64_t l2_offset = l1.l2_offset();
    if (l2_offset == 0) {
        // No L2 table: everything it would describe is unallocated.
        return unallocated_to_table_end(s, pos, limit);
    }
    if (l2_offset & cluster_mask) {
        return Error{ErrorCode::invalid_table,
                     fmt::format("L2 table offset {:#x} (L1 index {}) is not aligned to the "
                                 "cluster size {:#x}",
                                 l2_offset, l1_index, s.cluster_size)};
    }
    const std::uint64_t l2_index = (pos >> s.cluster_bits) & ((std::uint64_t{1} << s.l2_bits) - 1);
    // Entries of the table inside the file: all of them, but for a table cut off by the end of
    // the file when salvaging, whose missing entries read as zeros (unallocated), as for qemu.
    std::uint64_t available = std::uint64_t{1} << s.l2_bits;
    auto l2_table = slice(s.bytes, l2_offset, s.cluster_size, "L2 table");
    if (!l2_table) {
        if (!s.mode.salvage) {
            return std::move(l2_table).error();
        }
        available =
            l2_offset >= s.bytes.size() ? 0 : (s.bytes.size() - l2_offset) / s.l2_entry_bytes;
        if (l2_index >= available) {
            Run run = unallocated_to_table_end(s, pos, limit);
            run.damage = l2_table.error().message;
            return run;
        }
        l2_table = s.bytes.subspan(l2_offset, available * s.l2_entry_bytes);
    }
    const bool extended = s.info.extended_l2;
    const detail::L2Entry entry =
        detail::decode_l2(l2_table->data() + l2_index * s.l2_entry_bytes, extended);
    const ClusterType type = detail::cluster_type(entry, extended, s.has_data_file());
    const std::uint64_t cluster_start = pos & ~cluster_mask;
    const std::uint64_t in_cluster = pos - cluster_start;
    const std::uint64_t cluster_run_end = std::min(limit, cluster_start + s.cluster_size);

    Run run;
    if (type == ClusterType::compressed) {
        if (s.has_data_file()) {
            return cluster_error(fmt::format("compressed cluster at virtual offset {:#x} in an "
                                             "image with an external data file",
                                             cluster_start));
        }
        // The subcluster bitmap of a compressed cluster is unused: qemu's reads ignore it
        // (qcow2_get_subcluster_type; iotest 271), only its check reports it.
        const detail::CompressedDescriptor d =
            detail::decode_compressed(entry.raw, s.compressed_layout);
        // The descriptor counts whole 512-byte sectors; only the file's last, partial sector
        // may be cut short by the end of the file (qemu writes compressed data byte-exact).
        const std::uint64_t sectors_in_file =
            (s.bytes.size() + detail::kCompressedSectorSize - 1) / detail::kCompressedSectorSize;
        if (!detail::fits(sectors_in_file * detail::kCompressedSectorSize, d.host_offset, d.size) ||
            d.host_offset >= s.bytes.size()) {
            return compressed_past_eof(cluster_start, d.host_offset, d.size, s.bytes.size());
        }
        run.kind = ExtentKind::compressed;
        run.present = true;
        run.length = cluster_run_end - pos;
        run.compressed_host_offset = d.host_offset;
        // The last sector may be cut short by the end of the file; qemu reads such a tail as
        // zeros, and decompression stops once a cluster is produced.
        run.compressed_size = std::min<std::uint64_t>(d.size, s.bytes.size() - d.host_offset);
        run.offset_in_cluster = in_cluster;
        return run;
    }

    // With extended L2 entries bit 0 "is always 0" (spec), but qemu ignores it there, and so
    // do we: the subcluster bitmap says what reads as zero.
    if (entry.reserved_bits()) {
        return cluster_error(fmt::format("L2 entry for virtual offset {:#x} ({:#018x}) has "
                                         "reserved bits set",
                                         cluster_start, entry.raw));
    }
    const std::uint64_t host = entry.host_offset();
    if (host & cluster_mask) {
        return cluster_error(fmt::format("L2 entry for virtual offset {:#x} has host offset {:#x} "
                                         "not aligned to the cluster size {:#x}",
                                         cluster_start, host, s.cluster_size));
    }
    // Offset 0 means unallocated, except with an external data file, where COPIED marks a
    // cluster allocated at data file offset 0 (cluster_type).
    const bool host_valid = type == ClusterType::normal || type == ClusterType::zero_alloc;
    std::optional<std::uint64_t> host_here;
    if (host_valid) {
        host_here = host + in_cluster;
    }

    if (!extended) {
        run.length = cluster_run_end - pos;
        // The following entries of this L2 table that read the same way join the run here,
        // in one tight loop, instead of one classify call (and merge) per cluster: a sparse
        // 1 TiB disk has millions of empty entries. An entry joins only when it equals this
        // one (no host offset) or carries the same flags with the next host offset, so it
        // would classify exactly like this one: same validation outcome, same kind.
        // Not for a range that falls through to a backing layer: the layer below would cut the
        // run short, the next call would rescan the same entries, and a walk over an overlay
        // of empty tables would turn quadratic.
        const bool falls_through = type == ClusterType::unallocated && s.backing;
        const std::uint64_t entries_per_table = falls_through ? 0 : std::uint64_t{1} << s.l2_bits;
        const std::uint64_t flags = entry.raw & ~detail::kL2OffsetMask;
        std::uint64_t next_host = host + s.cluster_size;
        std::uint64_t next_start = cluster_start + s.cluster_size;
        for (std::uint64_t i = l2_index + 1;
             i < entries_per_table && i < available && next_start < limit; ++i) {
            const std::uint64_t next = load_be64(l2_table->data() + i * 8);
            if (host_valid ? ((next & ~detail::kL2OffsetMask) != flags ||
                              (next & detail::kL2OffsetMask) != next_host)
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
                return cluster_error(fmt::format(
                    "zero cluster at virtual offset {:#x} in a version 2 image", cluster_start));
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
                clip_to_file(s, pos, run);
            break;
        }
        return run;
    }

    // Extended L2: bits 0-31 allocated, bits 32-63 reads-as-zero, one bit per subcluster.
    const std::uint32_t allocated = entry.allocated_subclusters();
    const std::uint32_t zero = entry.zero_subclusters();
    if (allocated & zero) {
        return cluster_error(fmt::format("L2 entry for virtual offset {:#x}: subcluster bitmap "
                                         "{:#018x} marks subclusters both allocated and zero",
                                         cluster_start, entry.bitmap));
    }
    if (!host_valid && allocated != 0) {
        return cluster_error(fmt::format("L2 entry for virtual offset {:#x}: subclusters are "
                                         "allocated (bitmap {:#018x}) but the host offset is 0",
                                         cluster_start, entry.bitmap));
    }
    auto type_of = [&](unsigned index) {
        std::uint32_t bit = std::uint32_t{1} << index;
        return (zero & bit) ? 2 : (allocated & bit) ? 1 : 0;
    };
    unsigned first = static_cast<unsigned>(in_cluster >> s.subcluster_bits);
    int sub_type = type_of(first);
    unsigned last = first + 1;
    while (last < detail::kSubclustersPerCluster && type_of(last) == sub_type) {
        ++last;
    }
    std::uint64_t run_end =
        std::min(cluster_run_end, cluster_start + (std::uint64_t{last} << s.subcluster_bits));
    run.length = run_end - pos;
    run.host_offset = host_here;
    run.kind = sub_type == 1 ? ExtentKind::data : ExtentKind::zero;
    run.present = sub_type != 0;
    if (run.kind == ExtentKind::data && s.mode.salvage)
        clip_to_file(s, pos, run);
    return run;
}

/// A raw layer: data where the file has data, zeros in its holes (qemu's file-posix block
/// status, SEEK_DATA/SEEK_HOLE), both present and with a host offset equal to the position.
Run classify_raw(const ImageState& s, std::uint64_t pos, std::uint64_t limit) {
    Run run;
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
Run damaged_run(const ImageState& s, std::uint64_t pos, std::uint64_t limit, Error error) {
    Run run;
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

/// Classifies `pos` through the chain from `s` (at `depth`) down: unallocated ranges fall
/// through to the backing layer, as qemu's bdrv_co_block_status does. Ranges past the end of
/// a shorter backing layer read as zeros and report the depth of the layer above it.
/// `salvage` (the top layer's, for images opened with OpenOptions::salvage) names the
/// compressed clusters that do not decompress; with it no error stops the walk.
Result<Run> classify_chain(const ImageState& s, std::uint32_t depth, std::uint64_t pos,
                           std::uint64_t limit, const detail::SalvageState* salvage) {
    Result<Run> run = s.format == detail::LayerFormat::raw
                          ? Result<Run>(classify_raw(s, pos, limit))
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

Result<Run> classify_chain(const ImageState& top, std::uint32_t depth, std::uint64_t pos,
                           std::uint64_t limit) {
    return classify_chain(top, depth, pos, limit, top.salvage.get());
}

} // namespace

namespace detail {

Result<std::shared_ptr<const SalvageState>> scan_for_salvage(const Image& image) {
    const ImageState& top = detail_state(image);
    auto out = std::make_shared<SalvageState>();
    SalvageReport& report = out->report;
    // Distinct bad streams: at most one per 512 bytes of the file, however often referenced.
    std::set<std::pair<std::uint32_t, std::uint64_t>> bad;
    Decompressor decompressor;
    std::vector<std::byte> cluster;
    auto add = [&](std::uint64_t offset, std::uint64_t length, std::uint32_t depth,
                   bool unallocated, bool falls_through, std::string reason) {
        report.damaged_bytes += length;
        if (!report.ranges.empty()) {
            DamagedRange& last = report.ranges.back();
            if (last.offset + last.length == offset && last.depth == depth &&
                last.unallocated == unallocated && last.falls_through == falls_through &&
                last.reason == reason) {
                last.length += length;
                return;
            }
        }
        if (report.ranges.size() >= kMaxListedDamagedRanges) {
            ++report.ranges_not_listed;
            return;
        }
        report.ranges.push_back(
            {offset, length, depth, unallocated, falls_through, std::move(reason)});
    };
    // The walk every reader will make (classify_chain in salvage mode never fails), with no
    // compressed cluster known bad yet: each one met is tried here.
    for (std::uint64_t pos = 0; pos < top.disk_size;) {
        auto run = classify_chain(top, 0, pos, top.disk_size, nullptr);
        if (!run) {
            return std::move(run).error();
        }
        if (!run->damage.empty()) {
            const bool through = run->damage_falls_through;
            add(pos, run->length, through ? run->damage_depth : run->depth,
                through || !run->present, through, std::move(run->damage));
        } else if (run->kind == ExtentKind::compressed) {
            const ImageState& layer = *run->layer;
            Extent extent;
            extent.offset = pos;
            extent.length = run->length;
            extent.kind = ExtentKind::compressed;
            extent.present = true;
            extent.depth = run->depth;
            extent.bytes = layer.bytes.subspan(run->compressed_host_offset, run->compressed_size);
            extent.compressed_host_offset = run->compressed_host_offset;
            extent.offset_in_cluster = run->offset_in_cluster;
            cluster.resize(layer.cluster_size);
            const std::pair key{run->depth, run->compressed_host_offset};
            if (bad.contains(key)) {
                add(pos, run->length, run->depth, false, false,
                    fmt::format("compressed cluster at host offset {:#x} does not decompress "
                                "(as above)",
                                key.second));
            } else if (auto ok = decompressor.decompress_cluster(image, extent, cluster); !ok) {
                bad.insert(key);
                add(pos, run->length, run->depth, false, false, std::move(ok).error().message);
            }
        }
        pos += run->length;
    }
    out->bad_compressed.assign(bad.begin(), bad.end());
    return std::shared_ptr<const SalvageState>(std::move(out));
}

} // namespace detail

namespace {

bool mergeable(const Extent& current, const Run& next) {
    if (current.kind != next.kind || current.kind == ExtentKind::compressed ||
        current.present != next.present || current.depth != next.depth) {
        return false;
    }
    if (current.host_offset.has_value() != next.host_offset.has_value()) {
        return false;
    }
    return !current.host_offset || *current.host_offset + current.length == *next.host_offset;
}

} // namespace

namespace detail {

ExtentWalk::ExtentWalk(std::shared_ptr<const ImageState> state, std::uint64_t start,
                       std::uint64_t end)
    : state_(std::move(state)), position_(start), end_(std::min(end, state_->disk_size)) {}

bool ExtentWalk::fail(Error error) {
    // A table beyond the mapped end, a bad entry: when the file changed under us, that is the
    // cause, not corruption.
    error_ = explain_change(*state_, std::move(error));
    deferred_error_.reset(); // the first error by position is the one that stays
    position_ = end_;
    return false;
}

bool ExtentWalk::next(Extent& out) {
    // The walk reads L1/L2 tables from the mapping: a fault there ends it with an io_error
    // (fault.hpp) like any other error, stickily. One boundary per extent (a few ns).
    FaultBoundary boundary;
    const bool produced = step(out);
    if (auto fault = boundary.finish(state_->path); fault && (produced || boundary.own_fault()))
        return fail(std::move(*fault));
    return produced;
}

bool ExtentWalk::step(Extent& out) {
    if (deferred_error_) {
        return fail(*std::exchange(deferred_error_, std::nullopt));
    }
    if (error_ || position_ >= end_) {
        return false;
    }
    const ImageState& top = *state_;
    auto first = classify_chain(top, 0, position_, end_);
    if (!first) {
        return fail(std::move(first).error());
    }
    const ImageState& s = *first->layer;
    Extent extent;
    extent.offset = position_;
    extent.length = first->length;
    extent.kind = first->kind;
    extent.present = first->present;
    extent.depth = first->depth;
    extent.host_offset = first->host_offset;
    if (first->kind == ExtentKind::compressed) {
        extent.bytes = s.bytes.subspan(first->compressed_host_offset, first->compressed_size);
        extent.compressed_host_offset = first->compressed_host_offset;
        extent.offset_in_cluster = first->offset_in_cluster;
    } else {
        std::uint64_t cursor = position_ + first->length;
        while (cursor < end_) {
            auto run = classify_chain(top, 0, cursor, end_);
            if (!run) {
                // Hand out the good run gathered so far; the error comes with the next call.
                deferred_error_ = std::move(run).error();
                break;
            }
            if (run->layer != first->layer || !mergeable(extent, *run)) {
                break;
            }
            extent.length += run->length;
            cursor += run->length;
        }
        if (extent.kind == ExtentKind::data) {
            auto bytes = slice(s.data_bytes, *extent.host_offset, extent.length, "",
                               ErrorCode::invalid_cluster);
            const std::uint64_t file_size = s.data_bytes.size();
            const std::uint64_t host = *extent.host_offset;
            if (!bytes && host < file_size) {
                // Merged clusters of which only the first lie inside a file cut short: hand
                // those out; the next call fails at the first cluster that does not fit,
                // naming its own virtual offset (not the merged run's start).
                const std::uint64_t fits = file_size - host;
                const std::uint64_t aligned =
                    s.cluster_size ? ((host + fits) & ~(s.cluster_size - 1)) : host + fits;
                if (aligned > host) {
                    extent.length = aligned - host;
                    deferred_error_.reset(); // found again, in order, from the cut on
                    bytes =
                        slice(s.data_bytes, host, extent.length, "", ErrorCode::invalid_cluster);
                }
            }
            if (!bytes) {
                return fail(cluster_error(fmt::format(
                    "data for virtual offset {:#x} at host offset {:#x} (+{:#x}) lies beyond end "
                    "of {} ({:#x})",
                    extent.offset, *extent.host_offset, extent.length,
                    s.data_file ? "the data file" : "file", s.data_bytes.size())));
            }
            extent.bytes = *bytes;
            if (s.data_fd() >= 0) {
                extent.file = FilePosition{s.data_fd(), *extent.host_offset};
            }
        }
    }
    position_ += extent.length;
    out = extent;
    return true;
}

} // namespace detail
} // namespace qcowmap

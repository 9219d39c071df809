// WritableImage: open for writing, read, write, write_zeroes, discard, flush, resize, close.
// How guest clusters change follows qemu's block/qcow2-cluster.c (handle_copied, handle_alloc,
// qcow2_alloc_cluster_link_l2, zero_in_l2_slice, discard_in_l2_slice) and block/qcow2.c
// (qcow2_co_pwrite_zeroes, qcow2_co_pdiscard); the order in which changes reach the disk is
// writable_metadata.cpp's.
//
// The image is opened read-only first (Image::open: header, extensions, snapshots, bitmaps and
// the chain below validated as for reading), then again read-write for the writer. After that
// the writer reads its own file with pread, not through that mapping: the file grows under the
// writer (a mapping keeps its size, and a page past the end of the file raises SIGBUS), and
// reads must see what the write-back cache holds before it reaches the file. The layers below
// are read through their own read-only Images (their files never change).
#include "image_lock.hpp"
#include "writable_state.hpp"
#include "writer_layout.hpp"

#include <qcowmap/check.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <deque>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace qcowmap {

using detail::CachedTable;
using detail::ClusterType;
using detail::L2Entry;
using detail::WState;

namespace {

Error closed_error() {
    return Error{ErrorCode::invalid_argument, "the image is closed"};
}

Error range_error(std::string_view what, std::uint64_t offset, std::uint64_t length,
                  std::uint64_t size) {
    return Error{ErrorCode::out_of_range,
                 fmt::format("{} of {:#x} bytes at offset {:#x} passes the end of the disk "
                             "({:#x})",
                             what, length, offset, size)};
}

std::uint64_t subcluster_mask(unsigned first, unsigned last) {
    const std::uint64_t upto = last >= 31 ? 0xffffffffULL : (std::uint64_t{1} << (last + 1)) - 1;
    return upto & ~((std::uint64_t{1} << first) - 1);
}

/// An entry's host cluster must be cluster-aligned and its reserved bits clear before the
/// writer relies on it (qemu's qcow2_get_host_offset checks, "Cluster allocation offset ...
/// unaligned"): otherwise the image is refused where the request goes, and nothing changes.
Result<void> check_entry(const WState& s, const L2Entry& e, std::uint64_t guest) {
    const ClusterType type = detail::cluster_type(e, s.extended, s.has_data_file);
    if (type == ClusterType::compressed)
        return {};
    if (e.reserved_bits() & ~detail::kL2ZeroFlag) {
        return Error{ErrorCode::invalid_cluster,
                     fmt::format("L2 entry for virtual offset {:#x} ({:#x}) has reserved bits set",
                                 guest << s.cluster_bits, e.raw)};
    }
    if (s.extended && (e.raw & detail::kL2ZeroFlag)) {
        return Error{ErrorCode::invalid_cluster,
                     fmt::format("extended L2 entry for virtual offset {:#x} ({:#x}) has bit 0 "
                                 "set",
                                 guest << s.cluster_bits, e.raw)};
    }
    if (e.host_offset() & (s.cluster_size - 1)) {
        return Error{ErrorCode::invalid_cluster,
                     fmt::format("cluster for virtual offset {:#x} at host offset {:#x} is not "
                                 "aligned to the cluster size",
                                 guest << s.cluster_bits, e.host_offset())};
    }
    // A host cluster the file cannot hold: never written through (a write there would grow
    // the file to that size). Data file clusters sit at their guest offsets.
    const std::uint64_t host_end =
        s.has_data_file ? std::max(s.data_fresh_from, s.guest_clusters()) : s.end_cluster;
    if ((type == ClusterType::normal || type == ClusterType::zero_alloc) &&
        (e.host_offset() >> s.cluster_bits) >= host_end) {
        return Error{ErrorCode::invalid_cluster,
                     fmt::format("cluster for virtual offset {:#x} at host offset {:#x} lies "
                                 "beyond the end of the file ({:#x})",
                                 guest << s.cluster_bits, e.host_offset(),
                                 host_end << s.cluster_bits)};
    }
    if (s.extended && (e.allocated_subclusters() & e.zero_subclusters())) {
        return Error{ErrorCode::invalid_cluster,
                     fmt::format("extended L2 entry for virtual offset {:#x} marks subclusters "
                                 "both allocated and zero ({:#x})",
                                 guest << s.cluster_bits, e.bitmap)};
    }
    return {};
}

/// Data writes gathered into one pwritev per run of contiguous host bytes.
class WriteBatch {
  public:
    explicit WriteBatch(WState& s) : s_(s) {}

    Result<void> add(detail::FileIo& io, std::uint64_t host, const std::byte* data,
                     std::size_t length) {
        if (length == 0)
            return {};
        if (io_ != &io || host != end_ || iov_.size() >= 512) {
            // Buffers stay: the one being added may have been made since the last flush.
            if (auto ok = write_pending(); !ok)
                return ok;
            io_ = &io;
            start_ = end_ = host;
        }
        iov_.push_back({const_cast<std::byte*>(data), length});
        end_ += length;
        return {};
    }

    /// A buffer that lives until the batch is flushed.
    std::span<std::byte> buffer(std::size_t length) {
        buffers_.emplace_back(length);
        return buffers_.back();
    }

    /// Writes everything added and releases the buffers.
    Result<void> flush() {
        auto ok = write_pending();
        if (ok)
            buffers_.clear();
        return ok;
    }

  private:
    Result<void> write_pending() {
        if (iov_.empty())
            return {};
        auto ok = io_->pwritev(iov_, start_);
        iov_.clear();
        io_ = nullptr;
        if (!ok)
            return ok;
        s_.data_unsynced = true;
        return {};
    }

  public:
  private:
    WState& s_;
    detail::FileIo* io_ = nullptr;
    std::uint64_t start_ = 0, end_ = 0;
    std::vector<iovec> iov_;
    std::deque<std::vector<std::byte>> buffers_;
};

/// An L2 entry change decided while planning a request, applied once its data is written.
struct EntryUpdate {
    CachedTable* table;
    std::uint64_t guest;
    L2Entry entry;
    std::optional<L2Entry> release; ///< what the old entry pointed to, freed after
};

/// What reads as the disk's content below this image's layer.
Result<void> read_below(WState& s, std::uint64_t offset, std::span<std::byte> out) {
    std::size_t done = 0;
    if (s.below && offset < s.below->size()) {
        auto n = s.below->read(out, offset);
        if (!n)
            return std::move(n).error();
        done = *n;
    }
    std::memset(out.data() + done, 0, out.size() - done);
    return {};
}

/// The decompressed cluster of compressed entry `e` (kept until another one is needed).
Result<std::span<const std::byte>> decompress(WState& s, const L2Entry& e) {
    if (s.decompressed_entry == e.raw && !s.decompressed.empty())
        return std::span<const std::byte>(s.decompressed);
    const detail::CompressedDescriptor d = detail::decode_compressed(e.raw, s.compressed_layout);
    auto file_size = s.file.size();
    if (!file_size)
        return std::move(file_size).error();
    if (d.host_offset == 0 || !detail::fits(*file_size, d.host_offset, d.size)) {
        return Error{ErrorCode::invalid_cluster,
                     fmt::format("compressed cluster at host offset {:#x} (+{:#x}) lies beyond "
                                 "end of file ({:#x})",
                                 d.host_offset, d.size, *file_size)};
    }
    std::vector<std::byte> stream(d.size);
    if (auto ok = s.file.pread(stream, d.host_offset); !ok)
        return std::move(ok).error();
    Extent extent;
    extent.kind = ExtentKind::compressed;
    extent.length = s.cluster_size;
    extent.bytes = stream;
    extent.compressed_host_offset = d.host_offset;
    s.decompressed.resize(s.cluster_size);
    s.decompressed_entry = 0;
    if (auto ok = s.decompressor.decompress_cluster(*s.opened, extent, s.decompressed); !ok)
        return std::move(ok).error();
    s.decompressed_entry = e.raw;
    return std::span<const std::byte>(s.decompressed);
}

/// Fills `out` with the bytes of guest cluster `guest` from `in_cluster` on, as its entry `e`
/// says (all inside the cluster).
/// The L2 entry of guest cluster `guest`, checked as check_entry does before the writer relies
/// on it.
Result<L2Entry> checked_l2_entry(WState& s, std::uint64_t guest) {
    auto current = detail::l2_entry(s, guest);
    if (!current)
        return std::move(current).error();
    if (auto ok = check_entry(s, *current, guest); !ok)
        return std::move(ok).error();
    return *current;
}

/// True for the entries that hold a host cluster of this image (plain, allocated zero or
/// compressed): what a zero write with unmap or a discard gives back.
bool holds_host_cluster(ClusterType type) {
    return type == ClusterType::normal || type == ClusterType::zero_alloc ||
           type == ClusterType::compressed;
}

Result<void> read_cluster_part(WState& s, const L2Entry& e, std::uint64_t guest,
                               std::uint64_t in_cluster, std::span<std::byte> out) {
    if (out.empty())
        return {};
    const std::uint64_t guest_offset = (guest << s.cluster_bits) + in_cluster;
    const ClusterType type = detail::cluster_type(e, s.extended, s.has_data_file);
    if (auto ok = check_entry(s, e, guest); !ok)
        return ok;
    switch (type) {
    case ClusterType::unallocated:
        return read_below(s, guest_offset, out);
    case ClusterType::zero_plain:
    case ClusterType::zero_alloc:
        std::memset(out.data(), 0, out.size());
        return {};
    case ClusterType::compressed: {
        auto cluster = decompress(s, e);
        if (!cluster)
            return std::move(cluster).error();
        std::memcpy(out.data(), cluster->data() + in_cluster, out.size());
        return {};
    }
    case ClusterType::normal:
        break;
    }
    if (!s.extended)
        return s.data_io().pread(out, e.host_offset() + in_cluster);
    // Extended L2: per subcluster, allocated / zero / unallocated (spec "Extended L2 Entries").
    std::uint64_t at = 0;
    while (at < out.size()) {
        const std::uint64_t position = in_cluster + at;
        const unsigned sc = static_cast<unsigned>(position >> s.subcluster_bits);
        const std::uint64_t sc_end = std::uint64_t{sc + 1} << s.subcluster_bits;
        const std::uint64_t n = std::min<std::uint64_t>(sc_end - position, out.size() - at);
        auto part = out.subspan(at, n);
        if (e.allocated_subclusters() & (1u << sc)) {
            if (auto ok = s.data_io().pread(part, e.host_offset() + position); !ok)
                return ok;
        } else if (e.zero_subclusters() & (1u << sc)) {
            std::memset(part.data(), 0, n);
        } else if (auto ok = read_below(s, (guest << s.cluster_bits) + position, part); !ok) {
            return ok;
        }
        at += n;
    }
    return {};
}

/// A host cluster for guest cluster `guest`: in the image file (allocated, refcount 1) or, with
/// an external data file, at the guest offset (qemu maps data file clusters 1:1).
Result<detail::Allocation> new_host_cluster(WState& s, std::uint64_t guest) {
    if (s.has_data_file) {
        const bool fresh = guest >= s.data_fresh_from && !s.data_clusters_written.contains(guest);
        s.data_clusters_written.insert(guest);
        return detail::Allocation{guest, fresh};
    }
    return detail::allocate_clusters(s, 1);
}

/// Plans the write of `data` into guest cluster `guest` at `in_cluster`: data and
/// copy-on-write fill go to `batch`, the entry change (if any) to `updates`.
Result<void> plan_write(WState& s, std::uint64_t guest, std::uint64_t in_cluster,
                        std::span<const std::byte> data, WriteBatch& batch,
                        std::vector<EntryUpdate>& updates) {
    auto current = checked_l2_entry(s, guest);
    if (!current)
        return std::move(current).error();
    const L2Entry e = *current;
    const ClusterType type = detail::cluster_type(e, s.extended, s.has_data_file);
    const std::uint64_t cs = s.cluster_size;
    detail::FileIo& io = s.data_io();
    // Clusters of a data file are never shared: they count as COPIED (qemu sets the flag).
    const bool owned = e.copied() || s.has_data_file;

    if (!s.extended) {
        if (type == ClusterType::normal && owned) // in place (handle_copied)
            return batch.add(io, e.host_offset() + in_cluster, data.data(), data.size());
        // A new cluster, or a preallocated zero cluster of ours reused (qemu keeps COPIED
        // zero clusters' host clusters: cluster_needs_new_alloc).
        const bool reuse = type == ClusterType::zero_alloc && owned;
        auto table = detail::writable_l2(s, guest);
        if (!table)
            return std::move(table).error();
        detail::Allocation host{e.host_offset() >> s.cluster_bits, false};
        if (!reuse) {
            auto allocation = new_host_cluster(s, guest);
            if (!allocation)
                return std::move(allocation).error();
            host = *allocation;
        }
        const std::uint64_t host_offset = host.first << s.cluster_bits;
        const bool below_zero = type == ClusterType::zero_plain ||
                                type == ClusterType::zero_alloc ||
                                (type == ClusterType::unallocated && !s.below);
        if (data.size() == cs || (below_zero && host.fresh)) {
            if (auto ok = batch.add(io, host_offset + in_cluster, data.data(), data.size()); !ok)
                return ok;
        } else if (below_zero) {
            // The rest of the cluster must read as zeros: zeroed in the file without writing
            // them (qemu's handle_alloc_space), before the data lands there.
            if (auto ok = io.zero_range(host_offset, cs); !ok)
                return ok;
            if (auto ok = batch.add(io, host_offset + in_cluster, data.data(), data.size()); !ok)
                return ok;
        } else {
            // Copy-on-write: the rest of the cluster as it reads now (qemu's perform_cow), the
            // part before the write and the part after it.
            auto cluster = batch.buffer(cs);
            const std::uint64_t tail = in_cluster + data.size();
            if (auto ok = read_cluster_part(s, e, guest, 0, cluster.first(in_cluster)); !ok)
                return ok;
            if (auto ok = read_cluster_part(s, e, guest, tail, cluster.subspan(tail)); !ok)
                return ok;
            std::memcpy(cluster.data() + in_cluster, data.data(), data.size());
            if (auto ok = batch.add(io, host_offset, cluster.data(), cs); !ok)
                return ok;
        }
        L2Entry next{host_offset | detail::kL2CopiedFlag, 0};
        std::optional<L2Entry> release;
        if (!reuse && type != ClusterType::unallocated && type != ClusterType::zero_plain)
            release = e;
        updates.push_back({*table, guest, next, release});
        return {};
    }

    // Extended L2 entries: a write allocates the cluster and marks only its subclusters.
    const unsigned first = static_cast<unsigned>(in_cluster >> s.subcluster_bits);
    const unsigned last =
        static_cast<unsigned>((in_cluster + data.size() - 1) >> s.subcluster_bits);
    const std::uint64_t touched = subcluster_mask(first, last);
    const std::uint64_t span_start = std::uint64_t{first} << s.subcluster_bits;
    const std::uint64_t span_end = std::uint64_t{last + 1} << s.subcluster_bits;
    const bool aligned = in_cluster == span_start && in_cluster + data.size() == span_end;
    const std::uint64_t alloc = e.allocated_subclusters();
    const std::uint64_t zero = e.zero_subclusters();

    if (type == ClusterType::normal && owned) {
        if ((touched & ~alloc) == 0)
            return batch.add(io, e.host_offset() + in_cluster, data.data(), data.size());
        if (aligned) {
            if (auto ok = batch.add(io, e.host_offset() + in_cluster, data.data(), data.size());
                !ok) {
                return ok;
            }
        } else {
            auto part = batch.buffer(span_end - span_start);
            if (auto ok = read_cluster_part(s, e, guest, span_start, part); !ok)
                return ok;
            std::memcpy(part.data() + (in_cluster - span_start), data.data(), data.size());
            if (auto ok = batch.add(io, e.host_offset() + span_start, part.data(), part.size());
                !ok) {
                return ok;
            }
        }
        auto table = detail::writable_l2(s, guest);
        if (!table)
            return std::move(table).error();
        L2Entry next{e.raw, ((zero & ~touched) << 32) | alloc | touched};
        updates.push_back({*table, guest, next, std::nullopt});
        return {};
    }

    auto table = detail::writable_l2(s, guest);
    if (!table)
        return std::move(table).error();
    auto allocation = new_host_cluster(s, guest);
    if (!allocation)
        return std::move(allocation).error();
    const std::uint64_t host_offset = allocation->first << s.cluster_bits;
    if (type == ClusterType::unallocated) {
        // Only the touched subclusters get content; the others keep their state.
        const bool below_zero = (touched & ~zero) == 0 || !s.below;
        if (aligned || (below_zero && allocation->fresh)) {
            if (auto ok = batch.add(io, host_offset + in_cluster, data.data(), data.size()); !ok)
                return ok;
        } else {
            auto part = batch.buffer(span_end - span_start);
            if (auto ok = read_cluster_part(s, e, guest, span_start, part); !ok)
                return ok;
            std::memcpy(part.data() + (in_cluster - span_start), data.data(), data.size());
            if (auto ok = batch.add(io, host_offset + span_start, part.data(), part.size()); !ok)
                return ok;
        }
        L2Entry next{host_offset | detail::kL2CopiedFlag, ((zero & ~touched) << 32) | touched};
        updates.push_back({*table, guest, next, std::nullopt});
        return {};
    }
    // Compressed, or shared with a snapshot: the whole cluster is copied.
    auto cluster = batch.buffer(cs);
    if (auto ok = read_cluster_part(s, e, guest, 0, cluster); !ok)
        return ok;
    std::memcpy(cluster.data() + in_cluster, data.data(), data.size());
    if (auto ok = batch.add(io, host_offset, cluster.data(), cs); !ok)
        return ok;
    const std::uint64_t new_alloc =
        type == ClusterType::compressed ? detail::kSubclusterAllocMask : (alloc | touched);
    const std::uint64_t new_zero = type == ClusterType::compressed ? 0 : (zero & ~touched);
    L2Entry next{host_offset | detail::kL2CopiedFlag, (new_zero << 32) | new_alloc};
    updates.push_back({*table, guest, next, e});
    return {};
}

void apply_updates(WState& s, std::vector<EntryUpdate>& updates) {
    for (EntryUpdate& u : updates) {
        detail::set_l2_entry(s, *u.table, u.guest, u.entry);
        if (u.release)
            detail::free_entry_later(s, *u.release);
    }
    updates.clear();
    s.decompressed_entry = 0; // a compressed cluster may have been replaced
}

Result<void> write_locked(WState& s, std::uint64_t offset, std::span<const std::byte> data) {
    WriteBatch batch(s);
    std::vector<EntryUpdate> updates;
    std::uint64_t done = 0;
    while (done < data.size()) {
        const std::uint64_t position = offset + done;
        const std::uint64_t guest = position >> s.cluster_bits;
        const std::uint64_t in_cluster = position & (s.cluster_size - 1);
        const std::uint64_t n =
            std::min<std::uint64_t>(s.cluster_size - in_cluster, data.size() - done);
        if (auto ok = plan_write(s, guest, in_cluster, data.subspan(done, n), batch, updates);
            !ok) {
            // What was planned before is written and linked: the request is partly done.
            if (batch.flush())
                apply_updates(s, updates);
            return ok;
        }
        done += n;
        // Bound the memory held by copy-on-write buffers and pending entries.
        if (updates.size() >= 256) {
            if (auto ok = batch.flush(); !ok)
                return ok;
            apply_updates(s, updates);
        }
    }
    if (auto ok = batch.flush(); !ok)
        return ok;
    apply_updates(s, updates);
    return {};
}

/// True when the cluster (or, with extended L2, the subclusters of `mask`) already reads as
/// zeros because of its entry alone (qemu's is_zero on block status).
bool reads_zero(const WState& s, const L2Entry& e, std::uint64_t mask) {
    const ClusterType type = detail::cluster_type(e, s.extended, s.has_data_file);
    if (!s.extended) {
        return type == ClusterType::zero_plain || type == ClusterType::zero_alloc ||
               (type == ClusterType::unallocated && !s.below);
    }
    if (type == ClusterType::compressed)
        return false;
    const std::uint64_t zero = e.zero_subclusters();
    const std::uint64_t alloc = type == ClusterType::normal ? e.allocated_subclusters() : 0;
    return (mask & alloc) == 0 && ((mask & ~zero) == 0 || !s.below);
}

/// Zeroes whole clusters/subclusters by their L2 entries (qemu's zero_in_l2_slice and
/// zero_l2_subclusters); `mask` selects subclusters with extended L2 entries.
Result<void> zero_entry(WState& s, std::uint64_t guest, std::uint64_t mask, bool unmap) {
    auto current = checked_l2_entry(s, guest);
    if (!current)
        return std::move(current).error();
    const L2Entry e = *current;
    const ClusterType type = detail::cluster_type(e, s.extended, s.has_data_file);
    const bool allocated = holds_host_cluster(type);
    L2Entry next = e;
    bool release = false;
    if (s.data_file_raw) {
        // The raw data file must read as the disk does (qemu's qcow2_subcluster_zeroize zeroes
        // it first); its clusters sit at their guest offsets.
        const std::uint64_t start = guest << s.cluster_bits;
        if (!s.extended || mask == detail::kSubclusterAllocMask) {
            const std::uint64_t n = std::min(s.cluster_size, s.size - start);
            if (auto ok = s.data_file.zero_range(start, n); !ok)
                return ok;
        } else {
            for (unsigned sc = 0; sc < detail::kSubclustersPerCluster; ++sc) {
                if (mask & (std::uint64_t{1} << sc)) {
                    const std::uint64_t at = start + (std::uint64_t{sc} << s.subcluster_bits);
                    if (at >= s.size)
                        break;
                    const std::uint64_t n = std::min(s.subcluster_size(), s.size - at);
                    if (auto ok = s.data_file.zero_range(at, n); !ok)
                        return ok;
                }
            }
        }
        unmap = false;
    }
    if (!s.extended) {
        release = type == ClusterType::compressed || (unmap && allocated);
        next.raw = (release ? 0 : e.raw) | detail::kL2ZeroFlag;
    } else if (mask == detail::kSubclusterAllocMask) {
        release = type == ClusterType::compressed || (unmap && allocated);
        next.raw = release ? 0 : e.raw;
        next.bitmap = detail::kSubclusterZeroMask;
    } else {
        // Part of a cluster: only its subclusters (a compressed cluster is written instead).
        next.bitmap = (e.bitmap | (mask << 32)) & ~mask;
    }
    if (next.raw == e.raw && next.bitmap == e.bitmap)
        return {};
    auto table = detail::writable_l2(s, guest);
    if (!table)
        return std::move(table).error();
    detail::set_l2_entry(s, **table, guest, next);
    if (release)
        detail::free_entry_later(s, e);
    s.decompressed_entry = 0;
    return {};
}

Result<void> write_zeroes_locked(WState& s, std::uint64_t offset, std::uint64_t length,
                                 bool unmap) {
    static const std::vector<std::byte> zeros(1 << 20);
    auto write_zero_bytes = [&](std::uint64_t at, std::uint64_t n) -> Result<void> {
        while (n > 0) {
            const std::uint64_t piece = std::min<std::uint64_t>(n, zeros.size());
            if (auto ok = write_locked(s, at, std::span(zeros).first(piece)); !ok)
                return ok;
            at += piece;
            n -= piece;
        }
        return {};
    };
    const std::uint64_t end = offset + length;
    // The granule of a zero write: a subcluster with extended L2 entries, else a cluster; the
    // last one may end at the end of the disk.
    const unsigned unit_bits = s.extended ? s.subcluster_bits : s.cluster_bits;
    const std::uint64_t unit = std::uint64_t{1} << unit_bits;
    std::uint64_t position = offset;
    while (position < end) {
        const std::uint64_t guest = position >> s.cluster_bits;
        const std::uint64_t cluster_start = guest << s.cluster_bits;
        const std::uint64_t cluster_end = std::min(cluster_start + s.cluster_size, s.size);
        const std::uint64_t piece_end = std::min(end, cluster_end);
        auto current = detail::l2_entry(s, guest);
        if (!current)
            return std::move(current).error();
        if (s.info.version < 3) {
            // No zero flag (spec: bit 0 is "reads as zeros" from version 3 on). Without anything
            // below, qemu discards whole clusters instead (qcow2_subcluster_zeroize), and an
            // unallocated one is zeros already; otherwise zeros are written, as qemu's fallback
            // does.
            const ClusterType type = detail::cluster_type(*current, false, s.has_data_file);
            const bool whole = position == cluster_start && piece_end == cluster_end;
            if (!s.below && type == ClusterType::unallocated) {
                // already zeros
            } else if (!s.below && whole && !s.has_data_file) {
                auto table = detail::writable_l2(s, guest);
                if (!table)
                    return std::move(table).error();
                detail::set_l2_entry(s, **table, guest, L2Entry{});
                detail::free_entry_later(s, *current);
                s.decompressed_entry = 0;
            } else if (auto ok = write_zero_bytes(position, piece_end - position); !ok) {
                return ok;
            }
            position = piece_end;
            continue;
        }
        // Whole units by the entry, the unaligned head and tail by writing zeros, unless their
        // unit already reads as zeros (qemu's qcow2_co_pwrite_zeroes).
        std::uint64_t head_end = std::min(piece_end, (position + unit - 1) & ~(unit - 1));
        if (head_end == position)
            head_end = position;
        std::uint64_t body_end = piece_end == cluster_end ? piece_end : piece_end & ~(unit - 1);
        if (body_end < head_end)
            body_end = head_end;
        auto partial = [&](std::uint64_t from, std::uint64_t to) -> Result<void> {
            if (from >= to)
                return {};
            // A unit that reads as zeros through its entry alone becomes a zero unit as a whole
            // (qemu: the rest of it reads as zeros and it is unallocated or zero); any other is
            // written with zeros.
            const std::uint64_t in = from - cluster_start;
            const unsigned sc = static_cast<unsigned>(in >> s.subcluster_bits);
            const std::uint64_t mask =
                s.extended ? subcluster_mask(sc, sc) : detail::kSubclusterAllocMask;
            if (reads_zero(s, *current, mask)) {
                if (auto ok = zero_entry(s, guest, mask, false); !ok)
                    return ok;
                auto updated = detail::l2_entry(s, guest);
                if (!updated)
                    return std::move(updated).error();
                current = *updated;
                return {};
            }
            return write_zero_bytes(from, to - from);
        };
        if (auto ok = partial(position, head_end); !ok)
            return ok;
        if (body_end > head_end) {
            std::uint64_t mask = detail::kSubclusterAllocMask;
            const bool whole_cluster = head_end == cluster_start && body_end == cluster_end;
            if (s.extended && !whole_cluster) {
                const unsigned first =
                    static_cast<unsigned>((head_end - cluster_start) >> s.subcluster_bits);
                const unsigned last =
                    static_cast<unsigned>((body_end - 1 - cluster_start) >> s.subcluster_bits);
                mask = subcluster_mask(first, last);
            }
            const ClusterType type = detail::cluster_type(*current, s.extended, s.has_data_file);
            if (s.extended && !whole_cluster && type == ClusterType::compressed) {
                if (auto ok = write_zero_bytes(head_end, body_end - head_end); !ok)
                    return ok;
            } else if (!s.extended && !whole_cluster) {
                if (auto ok = partial(head_end, body_end); !ok)
                    return ok;
            } else if (auto ok = zero_entry(s, guest, mask, unmap); !ok) {
                return ok;
            }
            current = detail::l2_entry(s, guest);
            if (!current)
                return std::move(current).error();
        }
        if (auto ok = partial(std::max(body_end, head_end), piece_end); !ok)
            return ok;
        position = piece_end;
    }
    return {};
}

Result<void> discard_locked(WState& s, std::uint64_t offset, std::uint64_t length) {
    // Whole clusters only; a partial last cluster counts when the range reaches the end of the
    // disk (qemu's qcow2_co_pdiscard).
    const std::uint64_t end = offset + length;
    std::uint64_t first = (offset + s.cluster_size - 1) >> s.cluster_bits;
    std::uint64_t last_end = end == s.size ? s.guest_clusters() : end >> s.cluster_bits;
    for (std::uint64_t guest = first; guest < last_end; ++guest) {
        auto current = checked_l2_entry(s, guest);
        if (!current)
            return std::move(current).error();
        const L2Entry e = *current;
        const ClusterType type = detail::cluster_type(e, s.extended, s.has_data_file);
        const bool allocated = holds_host_cluster(type);
        if (s.data_file_raw) {
            // The raw data file stays the disk: discarding is zeroing it.
            if (auto ok = zero_entry(s, guest, detail::kSubclusterAllocMask, false); !ok)
                return ok;
            continue;
        }
        // Version 2 over a backing file: a cluster can neither read as zeros nor fall through
        // to the backing file's different bytes; qemu leaves it as it is.
        if (s.info.version < 3 && s.below)
            continue;
        // qemu's discard_in_l2_slice: read as zeros (v3) when something lies below or the
        // cluster was allocated; otherwise simply unallocated.
        L2Entry next{};
        if (s.below || allocated) {
            if (s.extended)
                next.bitmap = detail::kSubclusterZeroMask;
            else if (s.info.version >= 3)
                next.raw = detail::kL2ZeroFlag;
        }
        if (next.raw == e.raw && next.bitmap == e.bitmap)
            continue;
        auto table = detail::writable_l2(s, guest);
        if (!table)
            return std::move(table).error();
        detail::set_l2_entry(s, **table, guest, next);
        if (allocated)
            detail::free_entry_later(s, e);
        s.decompressed_entry = 0;
    }
    return {};
}

Result<void> check_request(const WState& s, std::string_view what, std::uint64_t offset,
                           std::uint64_t length) {
    if (s.closed)
        return closed_error();
    if (offset > s.size || length > s.size - offset)
        return range_error(what, offset, length, s.size);
    return {};
}

Result<std::size_t> read_locked(WState& s, std::span<std::byte> dest, std::uint64_t offset) {
    if (s.closed)
        return closed_error();
    if (offset > s.size) {
        return Error{ErrorCode::out_of_range,
                     fmt::format("read at offset {:#x} is beyond the end of the disk ({:#x})",
                                 offset, s.size)};
    }
    const std::uint64_t length = std::min<std::uint64_t>(dest.size(), s.size - offset);
    std::uint64_t done = 0;
    while (done < length) {
        const std::uint64_t position = offset + done;
        const std::uint64_t guest = position >> s.cluster_bits;
        const std::uint64_t in_cluster = position & (s.cluster_size - 1);
        const std::uint64_t n = std::min<std::uint64_t>(s.cluster_size - in_cluster, length - done);
        auto e = detail::l2_entry(s, guest);
        if (!e)
            return std::move(e).error();
        if (auto ok = read_cluster_part(s, *e, guest, in_cluster, dest.subspan(done, n)); !ok)
            return std::move(ok).error();
        done += n;
    }
    return static_cast<std::size_t>(length);
}

Result<void> flush_locked(WState& s) {
    if (s.closed)
        return closed_error();
    return detail::writeback(s);
}

/// "cannot open PATH for writing: WHY"; `system_errno`: the errno of a failed system call.
Error open_error(const std::filesystem::path& path, ErrorCode code, std::string_view why,
                 int system_errno = 0) {
    Error error{code, fmt::format("cannot open {} for writing: {}", path.string(), why)};
    error.system_errno = system_errno;
    return error;
}

} // namespace

// ---------------------------------------------------------------------------------------------

WritableImage::WritableImage(std::unique_ptr<State> state) : state_(std::move(state)) {}
WritableImage::WritableImage(WritableImage&&) noexcept = default;
WritableImage& WritableImage::operator=(WritableImage&& other) noexcept {
    if (this != &other) {
        if (state_)
            (void)close();
        state_ = std::move(other.state_);
    }
    return *this;
}
WritableImage::~WritableImage() {
    if (state_)
        (void)close();
}

Result<WritableImage> WritableImage::open(const std::filesystem::path& path,
                                          const WritableOptions& options) {
    if (options.open.snapshot)
        return open_error(path, ErrorCode::invalid_argument,
                          "an internal snapshot cannot be "
                          "written");
    if (options.open.format && *options.open.format != "qcow2")
        return open_error(path, ErrorCode::unsupported_feature, "only qcow2 images are written");
    // Our own views of the file take no reader lock: the writer's lock below is ours (a
    // reader lock on another descriptor would deny the write we are about to take), and
    // snapshot_view and the check at open read the file under it.
    OpenOptions own_view = options.open;
    own_view.force_share = true;
    auto opened = Image::open(path, own_view);
    if (!opened)
        return std::move(opened).error();
    const detail::ImageState& top = detail_state(*opened);
    const ImageInfo& info = top.info;
    if (info.version == 1) {
        return open_error(path, ErrorCode::unsupported_version,
                          "qcow version 1 images are read-only here (convert it to qcow2 "
                          "with `qcowmap convert` or `qemu-img convert -O qcow2`)");
    }
    if (info.incompatible_features & kIncompatCorrupt) {
        return open_error(path, ErrorCode::unsupported_feature,
                          "the corrupt bit is set (qemu found its metadata damaged; repair it "
                          "with `qemu-img check -r all`)");
    }
    if (info.incompatible_features & kIncompatDirty) {
        return open_error(path, ErrorCode::unsupported_feature,
                          "the dirty bit is set (qemu was writing it with lazy refcounts and "
                          "did not close it; its refcounts may be stale: repair them with "
                          "`qemu-img check -r all`)");
    }
    if (info.backing_file && options.open.backing == BackingMode::none) {
        return open_error(path, ErrorCode::invalid_argument,
                          "its backing file is needed to write it (partial clusters are copied "
                          "up from it): open it with BackingMode::follow");
    }
    auto state = std::make_unique<State>();
    State& s = *state;
    s.path = path;
    s.options = options;
    s.options.open = own_view;
    s.info = info;
    int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        const int err = errno;
        return open_error(path, ErrorCode::io_error, std::strerror(err), err);
    }
    s.file = detail::FileIo(fd, path.string());
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !top.file ||
        top.file->identity() != std::pair<std::uint64_t, std::uint64_t>(st.st_dev, st.st_ino)) {
        return open_error(path, ErrorCode::io_error, "the file changed while it was opened");
    }
    if (options.lock) {
        if (auto ok = detail::lock_image(fd, detail::kWriterLock); !ok)
            return open_error(path, ok.error().code, ok.error().message, ok.error().system_errno);
    }
    if (options.check) {
        // Under our lock, so that nobody changes it between the check and the writes.
        auto checked = check_image(path, CheckOptions{1, options.open.untrusted, true});
        if (!checked)
            return std::move(checked).error();
        if (checked->corruptions || checked->check_errors) {
            return open_error(
                path, ErrorCode::invalid_table,
                fmt::format("its tables are damaged ({} corruptions, {} check errors{}{}): writing "
                            "could overwrite data; repair it with `qemu-img check -r all`",
                            checked->corruptions, checked->check_errors,
                            checked->messages.empty() ? "" : "; first: ",
                            checked->messages.empty() ? "" : checked->messages.front()));
        }
    }
    s.has_data_file = top.has_data_file();
    s.data_file_raw = s.has_data_file && (info.autoclear_features & kAutoclearDataFileRaw);
    if (s.has_data_file) {
        int data_fd = ::open(top.data_file_path.c_str(), O_RDWR | O_CLOEXEC);
        if (data_fd < 0) {
            const int err = errno;
            return open_error(
                path, ErrorCode::io_error,
                fmt::format("data file {}: {}", top.data_file_path.string(), std::strerror(err)),
                err);
        }
        s.data_file = detail::FileIo(data_fd, top.data_file_path.string());
        if (options.lock) {
            if (auto ok = detail::lock_image(data_fd, detail::kWriterLock); !ok) {
                return open_error(path, ok.error().code,
                                  fmt::format("data file {}: {}", top.data_file_path.string(),
                                              ok.error().message),
                                  ok.error().system_errno);
            }
        }
        auto data_size = s.data_file.size();
        if (!data_size)
            return std::move(data_size).error();
        s.data_fresh_from = (*data_size + top.cluster_size - 1) >> top.cluster_bits;
    }
    if (options.direct_data_writes) {
        if (auto ok = s.file.enable_direct_writes(); !ok)
            return open_error(path, ok.error().code, ok.error().message, ok.error().system_errno);
        if (s.has_data_file) {
            if (auto ok = s.data_file.enable_direct_writes(); !ok)
                return open_error(path, ok.error().code, ok.error().message,
                                  ok.error().system_errno);
        }
    }
    if (top.backing) {
        // The layers below, opened again read-only as the chain resolved them.
        const std::vector<LayerInfo> layers = opened->layers();
        OpenOptions below_options;
        below_options.format = layers[1].format == "raw" ? "raw" : "qcow2";
        below_options.untrusted = options.open.untrusted;
        // As qemu locks the backing files below a writer (image_lock.hpp): a reader's lock.
        below_options.force_share = !options.lock || options.open.force_share;
        auto below = Image::open(layers[1].path, below_options);
        if (!below)
            return std::move(below).error();
        s.below = std::move(*below);
    }

    s.cluster_bits = top.cluster_bits;
    s.cluster_size = top.cluster_size;
    s.extended = info.extended_l2;
    s.entry_bytes = top.l2_entry_bytes;
    s.l2_bits = top.l2_bits;
    s.subcluster_bits = top.subcluster_bits;
    s.refcount_order = info.refcount_order;
    s.refblock_bits = s.cluster_bits + 3 - s.refcount_order;
    s.max_refcount =
        s.refcount_order == 6 ? UINT64_MAX : (std::uint64_t{1} << (1u << s.refcount_order)) - 1;
    s.compressed_layout = top.compressed_layout;
    s.size = info.virtual_size;
    s.l1.resize(info.l1_size);
    for (std::size_t i = 0; i < s.l1.size(); ++i)
        s.l1[i] = detail::load_be64(top.l1_table.data() + i * 8);
    s.l1_offset = info.l1_table_offset;
    s.reftable_offset = info.refcount_table_offset;
    s.reftable_clusters = info.refcount_table_clusters;
    s.reftable.resize(std::uint64_t{s.reftable_clusters} << (s.cluster_bits - 3));
    {
        std::vector<std::byte> table(s.reftable.size() * 8);
        if (auto ok = s.file.pread(table, s.reftable_offset); !ok)
            return std::move(ok).error();
        for (std::size_t i = 0; i < s.reftable.size(); ++i)
            s.reftable[i] = detail::load_be64(table.data() + i * 8);
    }
    s.end_cluster = (top.bytes.size() + s.cluster_size - 1) >> s.cluster_bits;
    s.fresh_from = s.end_cluster;
    if (options.cache_bytes)
        s.cache_limit = std::max<std::size_t>(options.cache_bytes, 4 * s.cluster_size);
    s.opened = std::move(*opened);

    // Autoclear bits this writer does not know must be cleared before anything is written
    // (spec "autoclear_features"): a feature it cannot keep consistent stops being claimed.
    const std::uint64_t known_autoclear = kAutoclearBitmaps | kAutoclearDataFileRaw;
    if (info.version >= 3 && (info.autoclear_features & ~known_autoclear)) {
        s.info.autoclear_features &= known_autoclear;
        if (auto ok = detail::write_header_field(s, detail::header::kAutoclearFeatures,
                                                 s.info.autoclear_features, 8);
            !ok) {
            return std::move(ok).error();
        }
        if (auto ok = s.file.sync(); !ok)
            return std::move(ok).error();
    }
    if (auto ok = detail::start_bitmaps(s); !ok)
        return std::move(ok).error();
    return WritableImage(std::move(state));
}

std::uint64_t WritableImage::size() const {
    std::lock_guard lock(state_->mutex);
    return state_->size;
}

ImageInfo WritableImage::info() const {
    std::lock_guard lock(state_->mutex);
    ImageInfo info = state_->info;
    info.virtual_size = state_->size;
    info.l1_size = static_cast<std::uint32_t>(state_->l1.size());
    info.l1_table_offset = state_->l1_offset;
    return info;
}

const std::filesystem::path& WritableImage::path() const {
    return state_->path;
}

Result<std::size_t> WritableImage::read(std::span<std::byte> dest, std::uint64_t offset) {
    std::lock_guard lock(state_->mutex);
    auto n = read_locked(*state_, dest, offset);
    if (auto ok = detail::trim_cache(*state_); !ok)
        return std::move(ok).error();
    return n;
}

Result<void> WritableImage::write(std::uint64_t offset, std::span<const std::byte> data) {
    std::lock_guard lock(state_->mutex);
    State& s = *state_;
    if (auto ok = check_request(s, "write", offset, data.size()); !ok)
        return ok;
    if (data.empty())
        return {};
    detail::mark_bitmaps(s, offset, data.size());
    if (auto ok = write_locked(s, offset, data); !ok)
        return ok;
    return detail::trim_cache(s);
}

Result<void> WritableImage::write_zeroes(std::uint64_t offset, std::uint64_t length, bool unmap) {
    std::lock_guard lock(state_->mutex);
    State& s = *state_;
    if (auto ok = check_request(s, "zero write", offset, length); !ok)
        return ok;
    if (length == 0)
        return {};
    detail::mark_bitmaps(s, offset, length);
    if (auto ok = write_zeroes_locked(s, offset, length, unmap); !ok)
        return ok;
    return detail::trim_cache(s);
}

Result<void> WritableImage::discard(std::uint64_t offset, std::uint64_t length) {
    std::lock_guard lock(state_->mutex);
    State& s = *state_;
    if (auto ok = check_request(s, "discard", offset, length); !ok)
        return ok;
    if (length == 0)
        return {};
    detail::mark_bitmaps(s, offset, length);
    if (auto ok = discard_locked(s, offset, length); !ok)
        return ok;
    return detail::trim_cache(s);
}

Result<void> WritableImage::flush() {
    std::lock_guard lock(state_->mutex);
    return flush_locked(*state_);
}

Result<BlockStatus> WritableImage::block_status(std::uint64_t offset, std::uint64_t length) {
    std::lock_guard lock(state_->mutex);
    State& s = *state_;
    if (s.closed)
        return closed_error();
    if (offset >= s.size) {
        return Error{ErrorCode::out_of_range,
                     fmt::format("offset {:#x} is not inside the disk ({:#x})", offset, s.size)};
    }
    const std::uint64_t end = offset + std::min(length, s.size - offset);
    const unsigned unit_bits = s.extended ? s.subcluster_bits : s.cluster_bits;
    std::optional<BlockStatus> result;
    std::uint64_t position = offset;
    while (position < end) {
        const std::uint64_t guest = position >> s.cluster_bits;
        auto e = detail::l2_entry(s, guest);
        if (!e)
            return std::move(e).error();
        const ClusterType type = detail::cluster_type(*e, s.extended, s.has_data_file);
        const std::uint64_t unit_end = std::min(end, ((position >> unit_bits) + 1) << unit_bits);
        BlockStatus status{position, unit_end - position, false, false};
        switch (type) {
        case ClusterType::unallocated:
            status.zero = !s.below;
            break;
        case ClusterType::zero_plain:
        case ClusterType::zero_alloc:
            status.allocated = status.zero = true;
            break;
        case ClusterType::compressed:
            status.allocated = true;
            break;
        case ClusterType::normal:
            status.allocated = true;
            if (s.extended) {
                const unsigned sc =
                    static_cast<unsigned>((position & (s.cluster_size - 1)) >> s.subcluster_bits);
                if (e->zero_subclusters() & (1u << sc)) {
                    status.zero = true;
                } else if (!(e->allocated_subclusters() & (1u << sc))) {
                    status.allocated = false;
                    status.zero = !s.below;
                }
            }
            break;
        }
        if (!result) {
            result = status;
        } else if (result->allocated == status.allocated && result->zero == status.zero) {
            result->length += status.length;
        } else {
            break;
        }
        position = unit_end;
    }
    return *result;
}

Result<void> WritableImage::resize(std::uint64_t new_size) {
    std::lock_guard lock(state_->mutex);
    State& s = *state_;
    if (s.closed)
        return closed_error();
    if (new_size % 512 != 0) {
        return Error{ErrorCode::invalid_argument,
                     fmt::format("size {} is not a multiple of 512", new_size)};
    }
    if (!s.bitmaps.empty() || (s.info.bitmaps && !s.info.bitmaps->entries.empty())) {
        return Error{ErrorCode::invalid_argument,
                     "the image has persistent bitmaps: remove them before resizing (their "
                     "tables are sized for the disk)"};
    }
    if (new_size == s.size)
        return {};
    const std::uint64_t old_size = s.size;
    if (new_size < old_size) {
        // Only a tail that nothing is allocated in may go (qemu-img resize --shrink would
        // discard it; that is left to the caller: discard first).
        const std::uint64_t first = (new_size + s.cluster_size - 1) >> s.cluster_bits;
        for (std::uint64_t guest = first; guest < s.guest_clusters(); ++guest) {
            if ((guest & (s.l2_entries() - 1)) == 0 && (guest >> s.l2_bits) < s.l1.size() &&
                s.l1[guest >> s.l2_bits] == 0) {
                guest += s.l2_entries() - 1;
                continue;
            }
            auto e = detail::l2_entry(s, guest);
            if (!e)
                return std::move(e).error();
            if (detail::cluster_type(*e, s.extended, s.has_data_file) != ClusterType::unallocated ||
                e->bitmap != 0) {
                return Error{ErrorCode::invalid_argument,
                             fmt::format("cannot shrink to {} bytes: the range from {:#x} holds "
                                         "data (discard it first)",
                                         new_size, guest << s.cluster_bits)};
            }
        }
    }
    if (auto ok = detail::writeback(s); !ok)
        return ok;
    const std::uint64_t clusters = (new_size + s.cluster_size - 1) >> s.cluster_bits;
    const std::uint64_t l1_needed = (clusters + s.l2_entries() - 1) >> s.l2_bits;
    if (l1_needed * 8 > detail::kMaxL1Bytes) {
        return Error{ErrorCode::invalid_argument,
                     fmt::format("a disk of {} bytes needs an L1 table of {} entries, more than "
                                 "qemu accepts (32 MiB)",
                                 new_size, l1_needed)};
    }
    if (l1_needed > s.l1.size()) {
        // A new L1 table: allocated (refcounts synced), written and synced, then one header
        // write switches size, L1 offset and L1 size together (bytes 24-47), then the old
        // table is freed (qemu's qcow2_grow_l1_table).
        const std::uint64_t table_clusters = (l1_needed * 8 + s.cluster_size - 1) >> s.cluster_bits;
        auto allocation = detail::allocate_clusters(s, table_clusters);
        if (!allocation)
            return std::move(allocation).error();
        if (auto ok = detail::writeback(s); !ok)
            return ok;
        std::vector<std::byte> table(table_clusters << s.cluster_bits);
        for (std::size_t i = 0; i < s.l1.size(); ++i)
            detail::store_be64(table.data() + i * 8, s.l1[i]);
        const std::uint64_t new_offset = allocation->first << s.cluster_bits;
        if (auto ok = s.file.pwrite(table, new_offset); !ok)
            return ok;
        if (auto ok = s.file.sync(); !ok)
            return ok;
        namespace field = detail::header;
        std::byte header[field::kRefcountTableOffset - field::kSize];
        detail::store_be64(header, new_size);
        // crypt_method stays 0 (not encrypted)
        detail::store_be32(header + (field::kCryptMethod - field::kSize), 0);
        detail::store_be32(header + (field::kL1Size - field::kSize),
                           static_cast<std::uint32_t>(l1_needed));
        detail::store_be64(header + (field::kL1TableOffset - field::kSize), new_offset);
        if (auto ok = s.file.pwrite(header, field::kSize); !ok)
            return ok;
        if (auto ok = s.file.sync(); !ok)
            return ok;
        const std::uint64_t old_clusters = (s.l1.size() * 8 + s.cluster_size - 1) >> s.cluster_bits;
        if (s.l1_offset != 0 && !s.l1.empty()) {
            for (std::uint64_t c = 0; c < old_clusters; ++c)
                s.pending_frees.push_back((s.l1_offset >> s.cluster_bits) + c);
        }
        s.l1.resize(l1_needed, 0);
        s.l1_offset = new_offset;
        s.info.l1_size = static_cast<std::uint32_t>(l1_needed);
        s.info.l1_table_offset = new_offset;
    } else {
        if (auto ok = detail::write_header_field(s, detail::header::kSize, new_size, 8); !ok)
            return ok;
        if (auto ok = s.file.sync(); !ok)
            return ok;
    }
    s.size = new_size;
    s.info.virtual_size = new_size;
    if (new_size > old_size && s.below && old_size < s.below->size()) {
        // The new range reads as zeros, not as the backing file's bytes there (qemu's
        // bdrv_co_truncate zero-writes it when there is a backing file).
        if (auto ok = write_zeroes_locked(s, old_size, new_size - old_size, false); !ok)
            return ok;
    }
    if (s.has_data_file && s.data_file_raw) {
        auto data_size = s.data_file.size();
        if (data_size && *data_size < new_size) {
            if (auto ok = s.data_file.truncate(new_size); !ok)
                return ok;
        }
    }
    return detail::writeback(s);
}

Result<void> WritableImage::close() {
    std::lock_guard lock(state_->mutex);
    State& s = *state_;
    if (s.closed)
        return {};
    auto ok = detail::writeback(s);
    if (ok)
        ok = detail::store_bitmaps(s);
    s.closed = true;
    s.l2_cache.clear();
    s.refblock_cache.clear();
    s.file.close();
    s.data_file.close();
    s.below.reset();
    s.opened.reset();
    return ok;
}

Result<Image> WritableImage::snapshot_view() {
    std::lock_guard lock(state_->mutex);
    State& s = *state_;
    if (auto ok = flush_locked(s); !ok)
        return std::move(ok).error();
    return Image::open(s.path, s.options.open);
}

WritableImage::Stats WritableImage::stats() const {
    std::lock_guard lock(state_->mutex);
    Stats stats = state_->stats;
    stats.syncs = state_->file.syncs() + state_->data_file.syncs();
    return stats;
}

} // namespace qcowmap

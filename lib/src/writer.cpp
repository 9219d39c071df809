// Writing qcow2: the plan (which guest clusters the output holds), the two writers (one
// sequential pass with the layout decided up front; compressed clusters with the metadata
// written last), the output descriptor and the safe file target.
//
// The uncompressed writer lays the whole image out before writing a byte, so the output can be
// a pipe: header, refcount table, refcount blocks, L1, L2 tables, data. Which data clusters are
// stored depends on their bytes (a cluster that holds only zeros is not), so the plan is made
// by a pre-scan: the extent walk, plus a zero check of each data cluster straight from the
// mapping that stops at the first non-zero byte (for real data, one byte per cluster: the scan
// costs little more than the page faults, and leaves the pages cached for the copy).
// Compressed sizes are only known once compressed: that writer reserves the metadata for the
// upper bound (every candidate stored uncompressed), streams the compressed clusters after it
// and fills the metadata in last; a target that cannot seek gets the image spooled to an
// unlinked file in $TMPDIR first.
#include "atomic_file.hpp"
#include "fault.hpp"
#include "writer_internal.hpp"

#include "cluster_compressor.hpp"
#include "digest_tap.hpp"
#include "image_state.hpp"
#include "sys_io.hpp"
#include "workers.hpp"

#include <qcowmap/bitmap.hpp>
#include <qcowmap/format.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <unistd.h>

namespace qcowmap {

using namespace detail::writer;

namespace detail::writer {

Error target_error(std::string_view what) {
    Error error{ErrorCode::io_error, fmt::format("{}{}", kWriteTargetError, what)};
    error.origin = ErrorOrigin::target;
    return error;
}

Error target_errno(int error) {
    Error e = target_error(std::strerror(error));
    e.system_errno = error;
    return e;
}

bool all_zero(std::span<const std::byte> bytes) {
    // Most data clusters differ from zero in their first bytes: stop there.
    const std::size_t head = std::min<std::size_t>(bytes.size(), 16);
    for (std::size_t i = 0; i < head; ++i)
        if (bytes[i] != std::byte{0})
            return false;
    return bytes.size() <= head ||
           std::memcmp(bytes.data(), bytes.data() + 1, bytes.size() - 1) == 0;
}

// ---- The source: the only places that walk the image (kept few for the API 1.0 change). ----

template <typename F>
Result<void> for_each_extent(const Image& image, std::uint64_t start, std::uint64_t end, F&& f) {
    auto extents = image.extents(start, end);
    for (const Extent& extent : extents) {
        if (auto ok = f(extent); !ok)
            return ok;
    }
    if (extents.error())
        return *extents.error();
    return {};
}

/// The bytes of guest cluster range `[offset, offset + out.size())` into `out` (zeros past
/// the end of the disk): data read with pread from where it lives, compressed clusters
/// decompressed.
Result<void> read_source(const Image& image, std::uint64_t offset, std::span<std::byte> out,
                         Decompressor& decompressor) {
    const std::uint64_t end = std::min<std::uint64_t>(offset + out.size(), image.size());
    if (end < offset + out.size()) {
        const std::uint64_t from = end > offset ? end - offset : 0;
        std::memset(out.data() + from, 0, out.size() - from);
    }
    if (end <= offset)
        return {};
    return for_each_extent(image, offset, end, [&](const Extent& e) -> Result<void> {
        std::span<std::byte> dest = out.subspan(e.offset - offset, e.length);
        switch (e.kind) {
        case ExtentKind::zero:
            std::memset(dest.data(), 0, dest.size());
            return {};
        case ExtentKind::data:
            if (e.file)
                return detail::read_exactly(*e.file, dest);
            std::memcpy(dest.data(), e.bytes.data(), dest.size());
            return {};
        case ExtentKind::compressed: {
            auto bytes = decompressor.decompress(image, e);
            if (!bytes)
                return bytes.error();
            std::memcpy(dest.data(), bytes->data(), dest.size());
            return {};
        }
        }
        return {};
    });
}

/// True when the data bytes `bytes` (a piece of a data extent) are all zero. Read with pread
/// where they live in a file, a small piece first: real data differs from zero in its first
/// bytes, so a data cluster usually costs one 4 KiB read, and the mapping is never touched
/// (touching it would fault whole 64 KiB windows into the process: its RSS would grow with the
/// disk).
Result<bool> source_is_zero(std::span<const std::byte> bytes, std::optional<FilePosition> from,
                            std::vector<std::byte>& buffer) {
    if (!from)
        return all_zero(bytes);
    std::uint64_t done = 0;
    std::size_t want = std::min<std::size_t>(bytes.size(), 4096);
    while (done < bytes.size()) {
        want = static_cast<std::size_t>(std::min<std::uint64_t>(want, bytes.size() - done));
        if (buffer.size() < want)
            buffer.resize(std::max<std::size_t>(want, 256 * 1024));
        std::span<std::byte> piece(buffer.data(), want);
        if (auto ok = detail::read_exactly(FilePosition{from->fd, from->offset + done}, piece); !ok)
            return ok.error();
        if (!all_zero(piece))
            return false;
        done += want;
        want = 256 * 1024;
    }
    return true;
}

/// The runs of `[start, end)` for the data pass: `bytes` empty for zeros; `file` where the
/// bytes can be copied from inside the kernel.
template <typename F>
Result<void> visit_source(const Image& image, std::uint64_t start, std::uint64_t end,
                          unsigned threads, F&& f) {
    return image.visit(
        start, end,
        [&](const Run& run) -> Result<void> {
            return f(run.offset, run.length, run.bytes, run.file);
        },
        VisitOptions{threads, DataAccess::mapping});
}

// ---- The plan ----

namespace {

/// Appends guest clusters to the plan, merging with the last run.
void push(std::vector<PlanRun>& plan, std::uint64_t first, std::uint64_t count, bool zero) {
    if (count == 0)
        return;
    if (!plan.empty()) {
        PlanRun& last = plan.back();
        if (last.zero == zero && last.first + last.count == first) {
            last.count += count;
            return;
        }
    }
    plan.push_back({first, count, zero});
}

/// Classifies guest clusters `[first, last)` of the output: zero (reads as zeros: skipped in a
/// flattened image, a zero cluster in an overlay) or stored. With `scan`, data clusters are
/// checked for zeros; without (compression: the workers check), any data makes a candidate.
Result<void> classify(const Image& image, const Geometry& g, std::uint64_t first,
                      std::uint64_t last, bool scan, bool zeros_kept, std::vector<PlanRun>& plan) {
    const std::uint64_t c = g.cluster_size;
    std::uint64_t current = first; // the cluster being looked at
    bool stored = false;           // it has bytes that are not all zero (or might have)
    auto finish_current = [&] {
        if (stored)
            push(plan, current, 1, false);
        else if (zeros_kept)
            push(plan, current, 1, true);
        ++current;
        stored = false;
    };
    const std::uint64_t end = std::min(last * c, g.virtual_size);
    std::vector<std::byte> buffer;
    auto ok = for_each_extent(image, first * c, end, [&](const Extent& e) -> Result<void> {
        std::uint64_t pos = e.offset;
        const std::uint64_t e_end = e.offset + e.length;
        while (pos < e_end) {
            const std::uint64_t cluster = pos >> g.cluster_bits;
            while (current < cluster)
                finish_current();
            if (e.kind == ExtentKind::zero) {
                // Whole clusters of zeros at once: a 1 TiB hole costs one step.
                if (pos == cluster * c && !stored) {
                    const std::uint64_t whole = (e_end - pos) >> g.cluster_bits;
                    const bool to_end = e_end == g.virtual_size;
                    const std::uint64_t n = whole + (to_end && (e_end - pos) % c != 0 ? 1 : 0);
                    if (n > 0) {
                        if (zeros_kept)
                            push(plan, current, n, true);
                        current += n;
                        pos = std::min(e_end, current * c);
                        continue;
                    }
                }
                pos = std::min(e_end, (cluster + 1) * c);
                continue;
            }
            const std::uint64_t piece_end = std::min(e_end, (cluster + 1) * c);
            if (!stored) {
                if (e.kind == ExtentKind::compressed || !scan) {
                    stored = true; // compressed clusters are not decompressed to be scanned
                } else {
                    std::optional<FilePosition> from;
                    if (e.file)
                        from = FilePosition{e.file->fd, e.file->offset + (pos - e.offset)};
                    auto zero = source_is_zero(e.bytes.subspan(pos - e.offset, piece_end - pos),
                                               from, buffer);
                    if (!zero)
                        return zero.error();
                    stored = !*zero;
                }
            }
            pos = piece_end;
        }
        return {};
    });
    if (!ok)
        return ok;
    while (current < last)
        finish_current();
    return {};
}

/// The depth at which `image`'s chain holds `backing` itself (the same file, read in the same
/// format), or nullopt. Below that depth both read alike: the backing file's own chain is
/// opened from its header the same way by both.
std::optional<std::uint32_t> depth_of(const Image& image, const Image& backing) {
    const LayerInfo base = backing.layers().front();
    if (base.device == 0 && base.inode == 0)
        return std::nullopt; // in memory: no identity to go by
    const std::vector<LayerInfo> layers = image.layers();
    for (std::size_t depth = 1; depth < layers.size(); ++depth) {
        const LayerInfo& layer = layers[depth];
        if (layer.device == base.device && layer.inode == base.inode &&
            layer.format == base.format) {
            return static_cast<std::uint32_t>(depth);
        }
    }
    return std::nullopt;
}

/// The byte ranges of `[0, end)` where `image` may read other than zeros (data and compressed
/// extents), merged, in order.
Result<std::vector<std::pair<std::uint64_t, std::uint64_t>>> maybe_nonzero(const Image& image,
                                                                           std::uint64_t end) {
    std::vector<std::pair<std::uint64_t, std::uint64_t>> ranges;
    auto ok = for_each_extent(image, 0, end, [&](const Extent& e) -> Result<void> {
        if (e.kind == ExtentKind::zero)
            return {};
        if (!ranges.empty() && ranges.back().second == e.offset)
            ranges.back().second = e.offset + e.length;
        else
            ranges.emplace_back(e.offset, e.offset + e.length);
        return {};
    });
    if (!ok)
        return ok.error();
    return ranges;
}

/// Calls `add(offset, length)` for each output cluster of `image` whose bytes differ from
/// `backing`'s at the same offset (zeros past the backing file's end, as a reader of the
/// output sees them). Clusters where both sides are known to read as zeros are skipped
/// without reading; the others are read from both and compared.
template <typename Add>
Result<void> add_differences(const Image& image, const Image& backing, const Geometry& g,
                             Add&& add) {
    const std::uint64_t size = image.size();
    auto ours = maybe_nonzero(image, size);
    if (!ours)
        return ours.error();
    auto theirs = maybe_nonzero(backing, size);
    if (!theirs)
        return theirs.error();
    // Output clusters either side may hold non-zero bytes in, merged.
    std::vector<std::pair<std::uint64_t, std::uint64_t>> clusters;
    std::vector<std::pair<std::uint64_t, std::uint64_t>> all = std::move(*ours);
    all.insert(all.end(), theirs->begin(), theirs->end());
    std::sort(all.begin(), all.end());
    for (auto [start, end] : all) {
        const std::uint64_t first = start >> g.cluster_bits;
        const std::uint64_t last = g.clusters_for(std::min(end, size));
        if (!clusters.empty() && clusters.back().second >= first)
            clusters.back().second = std::max(clusters.back().second, last);
        else if (first < last)
            clusters.emplace_back(first, last);
    }
    // Compared a chunk of clusters at a time: two reads per MiB.
    const std::uint64_t c = g.cluster_size;
    const std::uint64_t chunk_clusters = std::max<std::uint64_t>(1, (1u << 20) >> g.cluster_bits);
    std::vector<std::byte> a(static_cast<std::size_t>(chunk_clusters * c));
    std::vector<std::byte> b(a.size());
    Decompressor decompressor;
    for (auto [first, last] : clusters) {
        for (std::uint64_t at = first; at < last; at += chunk_clusters) {
            const std::uint64_t n = std::min(chunk_clusters, last - at);
            const std::uint64_t offset = at * c;
            const std::uint64_t bytes = std::min(n * c, size - offset);
            const auto length = static_cast<std::size_t>(bytes);
            if (auto ok = read_source(image, offset, std::span(a).first(length), decompressor); !ok)
                return ok;
            if (auto ok = read_source(backing, offset, std::span(b).first(length), decompressor);
                !ok)
                return ok;
            for (std::uint64_t i = 0; i < n; ++i) {
                const std::size_t from = static_cast<std::size_t>(i * c);
                const std::size_t len =
                    std::min<std::size_t>(static_cast<std::size_t>(c), length - from);
                if (std::memcmp(a.data() + from, b.data() + from, len) != 0)
                    add(offset + from, len);
            }
        }
    }
    return {};
}

} // namespace

Result<std::vector<PlanRun>> make_plan(const Image& image, const Geometry& g,
                                       const WriteOptions& options, bool scan) {
    // The selected byte ranges, widened to whole output clusters and merged.
    std::vector<std::pair<std::uint64_t, std::uint64_t>> ranges; // guest clusters [first, last)
    auto add = [&](std::uint64_t start, std::uint64_t length) {
        const std::uint64_t first = start >> g.cluster_bits;
        const std::uint64_t last = g.clusters_for(start + length);
        if (!ranges.empty() && ranges.back().second >= first)
            ranges.back().second = std::max(ranges.back().second, last);
        else
            ranges.emplace_back(first, last);
    };
    switch (options.selection) {
    case WriteSelection::whole_disk:
        if (g.virtual_size > 0)
            add(0, g.virtual_size);
        break;
    case WriteSelection::top_layer: {
        auto ok = for_each_extent(image, 0, UINT64_MAX, [&](const Extent& e) -> Result<void> {
            if (e.present && e.depth == 0)
                add(e.offset, e.length);
            return {};
        });
        if (!ok)
            return ok.error();
        break;
    }
    case WriteSelection::differs_from_backing: {
        if (!options.backing_image) {
            return Error{ErrorCode::invalid_argument,
                         "writing the difference from a backing file needs that file opened "
                         "(WriteOptions::backing_image)"};
        }
        const Image& backing = *options.backing_image;
        if (auto depth = depth_of(image, backing)) {
            // The source is an overlay of the backing file itself: what the layers above it
            // allocate is all that can differ, known without reading.
            auto ok = for_each_extent(image, 0, UINT64_MAX, [&](const Extent& e) -> Result<void> {
                if (e.present && e.depth < *depth)
                    add(e.offset, e.length);
                return {};
            });
            if (!ok)
                return ok.error();
        } else if (auto ok = add_differences(image, backing, g, add); !ok) {
            return ok.error();
        }
        break;
    }
    case WriteSelection::bitmap_dirty: {
        auto bitmap = DirtyBitmap::open(image, options.bitmap);
        if (!bitmap)
            return bitmap.error();
        auto ranges = bitmap->dirty_ranges();
        for (const BitmapRange& range : ranges)
            add(range.offset, range.length);
        if (ranges.error())
            return *ranges.error();
        break;
    }
    }
    // An overlay must hide its backing file wherever it says "zeros"; a flattened image has
    // nothing below, so its zero clusters are simply left unallocated.
    const bool zeros_kept = options.selection != WriteSelection::whole_disk;
    std::vector<PlanRun> plan;
    for (auto [first, last] : ranges) {
        if (auto ok = classify(image, g, first, last, scan, zeros_kept, plan); !ok)
            return ok.error();
    }
    return plan;
}

// ---- The output ----

Result<Output> Output::open(int fd) {
    struct stat st {};
    if (::fstat(fd, &st) != 0)
        return target_errno(errno);
    Output out;
    out.fd_ = fd;
    const int flags = ::fcntl(fd, F_GETFL);
    if (S_ISREG(st.st_mode) && flags >= 0 && (flags & O_APPEND) != 0) {
        // pwrite ignores its offset under O_APPEND: write in order, as to a pipe.
        out.kind_ = Kind::stream;
    } else if (S_ISREG(st.st_mode)) {
        out.kind_ = Kind::file;
        // Holes are left for zeros: an old file's bytes must not show through them.
        if (st.st_size != 0 && ::ftruncate(fd, 0) != 0)
            return target_errno(errno);
    } else if (S_ISBLK(st.st_mode)) {
        out.kind_ = Kind::device;
    } else if (S_ISFIFO(st.st_mode)) {
        out.kind_ = Kind::pipe;
        // A larger pipe takes bigger splices; not fatal when refused (pipe-max-size).
        (void)::fcntl(fd, F_SETPIPE_SZ, 1 << 20);
    } else {
        out.kind_ = Kind::stream;
    }
    out.buffer_.reserve(kBufferBytes);
    return out;
}

Result<void> Output::flush() {
    const Transfer written = seekable() ? pwrite_full(fd_, buffer_.data(), buffer_.size(), flushed_)
                                        : write_full(fd_, buffer_.data(), buffer_.size());
    if (written.done < buffer_.size())
        return target_errno(transfer_errno(written));
    flushed_ += buffer_.size();
    buffer_.clear();
    return {};
}

Result<void> Output::write(std::span<const std::byte> bytes) {
    if (buffer_.size() + bytes.size() > kBufferBytes) {
        if (auto ok = flush(); !ok)
            return ok;
    }
    if (bytes.size() >= kBufferBytes) {
        // Large: straight from the caller's memory.
        const Transfer written = seekable() ? pwrite_full(fd_, bytes.data(), bytes.size(), flushed_)
                                            : write_full(fd_, bytes.data(), bytes.size());
        flushed_ += written.done;
        if (written.done < bytes.size())
            return target_errno(transfer_errno(written));
        return {};
    }
    buffer_.insert(buffer_.end(), bytes.begin(), bytes.end());
    return {};
}

Result<void> Output::zeros(std::uint64_t length) {
    if (kind_ == Kind::file) {
        // A hole: the final ftruncate gives the file its size.
        if (auto ok = flush(); !ok)
            return ok;
        flushed_ += length;
        return {};
    }
    static const std::vector<std::byte> zero_block(kBufferBytes);
    while (length > 0) {
        const std::uint64_t n = std::min<std::uint64_t>(length, zero_block.size());
        if (auto ok = write(std::span(zero_block).first(static_cast<std::size_t>(n))); !ok)
            return ok;
        length -= n;
    }
    return {};
}

Result<void> Output::copy(const FilePosition& from, std::span<const std::byte> bytes) {
    if (auto ok = flush(); !ok)
        return ok;
    std::uint64_t done = 0;
    const std::uint64_t length = bytes.size();
    // Inside the kernel where the two ends allow it: copy_file_range between files (shared
    // blocks on file systems with reflinks), splice into a pipe, sendfile to anything else.
    while (done < length && !in_kernel_failed_) {
        const std::size_t want =
            static_cast<std::size_t>(std::min<std::uint64_t>(length - done, detail::kChunkCap));
        if (kind_ != Kind::file && kind_ != Kind::pipe && kind_ != Kind::stream)
            break;
        const ssize_t n = retry_eintr([&]() -> ssize_t {
            loff_t in_at = static_cast<loff_t>(from.offset + done);
            if (kind_ == Kind::file) {
                loff_t out_at = static_cast<loff_t>(flushed_);
                return ::copy_file_range(from.fd, &in_at, fd_, &out_at, want, 0);
            }
            if (kind_ == Kind::pipe)
                return ::splice(from.fd, &in_at, fd_, nullptr, want, SPLICE_F_MORE);
            off_t at = static_cast<off_t>(from.offset + done);
            return ::sendfile(fd_, from.fd, &at, want);
        });
        if (n < 0 && (errno == EPIPE || errno == ENOSPC || errno == EIO || errno == EDQUOT ||
                      errno == EFBIG))
            return target_errno(errno); // the output's fault, not the method's
        if (n <= 0) {
            in_kernel_failed_ = true; // not supported between these two: write from memory
            break;
        }
        done += static_cast<std::uint64_t>(n);
        flushed_ += static_cast<std::uint64_t>(n);
    }
    // Through a buffer read with pread rather than from the mapping: touching the mapping would
    // fault its pages into the process (its RSS would grow with the disk).
    while (done < length) {
        const std::size_t want =
            static_cast<std::size_t>(std::min<std::uint64_t>(length - done, kBufferBytes));
        if (bounce_.size() < want)
            bounce_.resize(kBufferBytes);
        std::span<std::byte> piece(bounce_.data(), want);
        if (auto ok = detail::read_exactly(FilePosition{from.fd, from.offset + done}, piece); !ok)
            return ok;
        if (auto ok = write(piece); !ok)
            return ok;
        done += want;
    }
    return {};
}

Result<void> Output::pwrite_at(std::span<const std::byte> bytes, std::uint64_t offset) {
    const Transfer written = pwrite_full(fd_, bytes.data(), bytes.size(), offset);
    if (written.done < bytes.size())
        return target_errno(transfer_errno(written));
    return {};
}

Result<void> Output::finish(std::uint64_t size) {
    if (auto ok = flush(); !ok)
        return ok;
    if (kind_ == Kind::file && ::ftruncate(fd_, static_cast<off_t>(size)) != 0)
        return target_errno(errno);
    return {};
}

// ---- Metadata that both writers share ----

namespace {

/// Feeds refcounts in ascending host-cluster order and writes each refcount block once it is
/// complete (by pwrite, or into `sink` in order for the sequential writer).
class RefcountWriter {
  public:
    using Sink = std::function<Result<void>(std::uint64_t block, std::span<const std::byte>)>;
    RefcountWriter(const Geometry& g, const Layout& layout, Sink sink)
        : g_(g), layout_(layout), sink_(std::move(sink)), block_(g.cluster_size) {}

    Result<void> put(std::uint64_t cluster, std::uint64_t value) {
        const std::uint64_t block = cluster / g_.refs_per_block();
        if (block >= layout_.refblock_count) {
            return Error{ErrorCode::invalid_argument,
                         fmt::format("internal error: host cluster {} is beyond the {} refcount "
                                     "blocks laid out",
                                     cluster, layout_.refblock_count)};
        }
        while (current_ < block) {
            if (auto ok = emit(); !ok)
                return ok;
        }
        detail::set_refcount_entry(block_.data(), cluster % g_.refs_per_block(), value,
                                   g_.refcount_order);
        return {};
    }

    Result<void> finish() {
        while (current_ < layout_.refblock_count) {
            if (auto ok = emit(); !ok)
                return ok;
        }
        return {};
    }

  private:
    Result<void> emit() {
        if (auto ok = sink_(current_, block_); !ok)
            return ok;
        std::fill(block_.begin(), block_.end(), std::byte{0});
        ++current_;
        return {};
    }

    Geometry g_;
    Layout layout_;
    Sink sink_;
    std::vector<std::byte> block_;
    std::uint64_t current_ = 0;
};

/// The refcount table: one entry per refcount block.
std::vector<std::byte> encode_reftable(const Geometry& g, const Layout& layout) {
    std::vector<std::byte> table(layout.reftable_clusters * g.cluster_size);
    for (std::uint64_t i = 0; i < layout.refblock_count; ++i)
        store_be64(table.data() + i * 8, (layout.refblocks + i) << g.cluster_bits);
    return table;
}

/// The L1 table: `tables` are the L1 indices that have an L2 table, laid out in that order.
std::vector<std::byte> encode_l1(const Geometry& g, const Layout& layout,
                                 const std::vector<std::uint64_t>& tables) {
    std::vector<std::byte> l1(layout.l1_clusters * g.cluster_size);
    for (std::size_t k = 0; k < tables.size(); ++k)
        detail::encode_l1(l1.data() + tables[k] * 8, (layout.l2 + k) << g.cluster_bits, true);
    return l1;
}

/// The largest piece of data one thread copies at once in the parallel data pass.
constexpr std::uint64_t kParallelPiece = 8 << 20;

unsigned thread_count(const WriteOptions& options) {
    return detail::resolve_threads(options.threads);
}

} // namespace

// ---- The sequential writer (no compression) ----

Result<WriteStats> write_sequential(const Image& image, Output& out, const Geometry& g,
                                    const HeaderFields& fields, const WriteOptions& options) {
    auto planned = make_plan(image, g, options, /*scan=*/true);
    if (!planned)
        return planned.error();
    const std::vector<PlanRun>& plan = *planned;
    const std::vector<std::uint64_t> tables = l2_tables_of(g, plan);
    WriteStats stats;
    for (const PlanRun& run : plan) {
        (run.zero ? stats.zero_clusters : stats.data_clusters) += run.count;
    }
    stats.l2_tables = tables.size();
    auto laid = make_layout(g, tables.size(), stats.data_clusters);
    if (!laid)
        return laid.error();
    const Layout layout = *laid;
    auto header = encode_header(g, layout, fields);
    if (!header)
        return header.error();

    if (auto ok = out.write(*header); !ok)
        return ok.error();
    if (auto ok = out.write(encode_reftable(g, layout)); !ok)
        return ok.error();
    // Every cluster of this image is used exactly once: refcount 1 up to the end.
    RefcountWriter refcounts(g, layout, [&](std::uint64_t, std::span<const std::byte> block) {
        return out.write(block);
    });
    for (std::uint64_t cluster = 0; cluster < layout.total(); ++cluster) {
        if (auto ok = refcounts.put(cluster, 1); !ok)
            return ok.error();
    }
    if (auto ok = refcounts.finish(); !ok)
        return ok.error();
    if (auto ok = out.write(encode_l1(g, layout, tables)); !ok)
        return ok.error();

    // L2 tables, in L1 order, with data clusters numbered in disk order.
    std::vector<std::byte> table(g.cluster_size);
    std::size_t run_index = 0;
    std::uint64_t data_before_run = 0; // data clusters of the runs before plan[run_index]
    for (std::uint64_t t : tables) {
        std::fill(table.begin(), table.end(), std::byte{0});
        const std::uint64_t table_first = t * g.l2_entries();
        const std::uint64_t table_end = table_first + g.l2_entries();
        while (run_index < plan.size() && plan[run_index].first < table_end) {
            const PlanRun& run = plan[run_index];
            const std::uint64_t from = std::max(run.first, table_first);
            const std::uint64_t to = std::min(run.first + run.count, table_end);
            for (std::uint64_t c = from; c < to; ++c) {
                L2Plan entry;
                if (run.zero) {
                    entry.kind = L2Plan::Kind::zero;
                } else {
                    entry.kind = L2Plan::Kind::data;
                    entry.host = (layout.data + data_before_run + (c - run.first))
                                 << g.cluster_bits;
                }
                encode_l2_entry(g, table, c - table_first, entry);
            }
            if (run.first + run.count > table_end)
                break; // the run goes on in the next table
            if (!run.zero)
                data_before_run += run.count;
            ++run_index;
        }
        if (auto ok = out.write(table); !ok)
            return ok.error();
    }

    // The data, in disk order.
    std::uint64_t total = 0;
    for (const PlanRun& run : plan)
        if (!run.zero)
            total += run.count * g.cluster_size;
    stats.selected_bytes = 0;
    for (const PlanRun& run : plan)
        stats.selected_bytes += run.count * g.cluster_size;
    const unsigned threads = thread_count(options);
    // The digest takes the bytes of the data pass in disk order (the clusters the plan leaves
    // out read as zeros): the pass then runs on this thread.
    std::optional<DigestTap> tap;
    if (options.digest) {
        auto made = DigestTap::create(*options.digest, g.virtual_size, threads);
        if (!made)
            return made.error();
        tap.emplace(std::move(*made));
    }
    // One piece of the data pass: guest bytes [start, end) go to the output at `host`.
    auto copy_piece = [&](Output& to, std::uint64_t start, std::uint64_t end,
                          unsigned visit_threads) -> Result<void> {
        const std::uint64_t disk_end = std::min(end, g.virtual_size);
        auto ok = visit_source(
            image, start, disk_end, visit_threads,
            [&](std::uint64_t offset, std::uint64_t length, std::span<const std::byte> bytes,
                const std::optional<FilePosition>& file) -> Result<void> {
                if (bytes.empty())
                    return to.zeros(length);
                if (tap) {
                    // Bytes in a file lie in the image's mapping here (DataAccess::mapping):
                    // hashed in place, or read from the file where that costs less;
                    // decompressed ones are copied.
                    if (auto fed = tap->data(offset, bytes, file.has_value(), file); !fed)
                        return fed;
                }
                if (file)
                    return to.copy(*file, bytes);
                return to.write(bytes);
            });
        if (!ok)
            return ok;
        if (disk_end < end) // the last cluster's part past the end of the disk
            return to.zeros(end - disk_end);
        return {};
    };
    if (!out.seekable() || threads < 2 || total < 2 * kParallelPiece || tap) {
        std::uint64_t done = 0, written_back = 0;
        for (const PlanRun& run : plan) {
            if (run.zero)
                continue;
            const std::uint64_t start = run.first * g.cluster_size;
            const std::uint64_t end = (run.first + run.count) * g.cluster_size;
            if (auto ok = copy_piece(out, start, end, threads); !ok)
                return ok.error();
            done += end - start;
            if (done - written_back >= kParallelPiece) {
                out.start_writeback(0, 0);
                written_back = done;
            }
            if (options.progress)
                options.progress(done, total);
        }
    } else {
        // A seekable target: every data cluster's place is known, so the copy is shared out
        // in pieces of at most kParallelPiece among the threads (on this 2-core VM the
        // kernel's page-cache copy behind copy_file_range is the bottleneck; two copies at
        // once nearly halve it).
        if (auto ok = out.flush(); !ok)
            return ok.error();
        // Pieces of about kParallelPiece bytes of output: whole runs grouped (a fragmented
        // disk has many short ones), long runs cut. A piece's runs are contiguous in the output.
        struct Segment {
            std::uint64_t start, end; // guest bytes
        };
        struct Piece {
            std::uint64_t host; // where its first segment goes
            std::size_t first, last;
        };
        std::vector<Segment> segments;
        std::vector<Piece> pieces;
        std::uint64_t host = layout.data << g.cluster_bits, piece_bytes = 0;
        for (const PlanRun& run : plan) {
            if (run.zero)
                continue;
            const std::uint64_t run_end = (run.first + run.count) * g.cluster_size;
            for (std::uint64_t at = run.first * g.cluster_size; at < run_end;) {
                const std::uint64_t end = std::min(run_end, at + kParallelPiece - piece_bytes);
                if (piece_bytes == 0)
                    pieces.push_back({host, segments.size(), segments.size()});
                segments.push_back({at, end});
                pieces.back().last = segments.size();
                piece_bytes += end - at;
                if (piece_bytes >= kParallelPiece)
                    piece_bytes = 0;
                host += end - at;
                at = end;
            }
        }
        // Copies one piece with its own writer; returns the bytes done.
        auto run_piece = [&](const Piece& piece) -> std::pair<Result<void>, std::uint64_t> {
            Output to = out.clone_at(piece.host);
            std::uint64_t bytes = 0;
            for (std::size_t i = piece.first; i < piece.last; ++i) {
                if (auto ok = copy_piece(to, segments[i].start, segments[i].end, 1); !ok)
                    return {ok, bytes};
                bytes += segments[i].end - segments[i].start;
            }
            if (auto ok = to.flush(); !ok)
                return {ok, bytes};
            to.start_writeback(piece.host, bytes);
            return {Result<void>{}, bytes};
        };
        // The pieces go to the library's ordered worker ring (which joins its threads and
        // turns a worker's exception into that piece's error); progress follows them in order.
        struct CopyJob {
            std::size_t piece = 0;
            std::uint64_t bytes = 0; // done
        };
        using CopyWorkers = detail::OrderedWorkers<CopyJob>;
        CopyWorkers copiers(threads, 2 * static_cast<std::size_t>(threads),
                            [&]() -> Result<CopyWorkers::Work> {
                                return CopyWorkers::Work([&](CopyJob& job) -> Result<void> {
                                    auto [ok, bytes] = run_piece(pieces[job.piece]);
                                    job.bytes = bytes;
                                    return ok;
                                });
                            });
        std::uint64_t done = 0;
        std::size_t submitted = 0;
        for (std::size_t k = 0; k < pieces.size(); ++k) {
            if (copiers.started() == 0) { // no thread could be started: copy here
                auto [ok, bytes] = run_piece(pieces[k]);
                if (!ok)
                    return ok.error();
                done += bytes;
            } else {
                while (submitted < pieces.size() && !copiers.full()) {
                    copiers.next_slot().piece = submitted++;
                    copiers.submit();
                }
                auto job = copiers.front();
                if (!job)
                    return job.error(); // the ring's destructor stops and joins the copiers
                done += (*job)->bytes;
                copiers.release();
            }
            if (options.progress)
                options.progress(done, total);
        }
        if (options.progress)
            options.progress(total, total);
    }
    stats.file_size = layout.total() << g.cluster_bits;
    if (auto ok = out.finish(stats.file_size); !ok)
        return ok.error();
    if (tap) {
        auto digest = tap->finish();
        if (!digest)
            return digest.error();
        stats.digest = *digest;
    }
    return stats;
}

// ---- The compressed writer ----

namespace {

/// One candidate cluster of the plan: read, then compressed (or found zero, or kept plain).
struct CompressJob {
    enum class Kind : std::uint8_t { zero, compressed, raw } kind = Kind::zero;
    std::uint64_t cluster = 0;    // guest cluster number
    std::vector<std::byte> bytes; // compressed stream, or the cluster itself
    std::size_t size = 0;
    std::vector<std::byte> plain; // compressed, with a digest: the cluster itself
};

/// What a compressing thread keeps: its encoder, its decoder for compressed sources and two
/// cluster buffers, swapped with the job's (never copied).
class ClusterWork {
  public:
    ClusterWork(CompressionType type, std::uint64_t cluster_size, bool keep_plain)
        : compressor_(type), cluster_size_(static_cast<std::size_t>(cluster_size)),
          keep_plain_(keep_plain) {}

    Result<void> run(const Image& image, unsigned cluster_bits, CompressJob& job) {
        input_.resize(cluster_size_);
        scratch_.resize(cluster_size_);
        if (auto ok = read_source(image, job.cluster << cluster_bits, input_, decompressor_); !ok)
            return ok;
        if (all_zero(input_)) {
            job.kind = CompressJob::Kind::zero;
        } else if (auto n =
                       compressor_.compress(input_, std::span(scratch_).first(cluster_size_ - 1))) {
            // qemu's limit: a stream of cluster_size - 1 bytes at most, else stored plain.
            job.kind = CompressJob::Kind::compressed;
            job.size = *n;
            std::swap(job.bytes, scratch_);
            if (keep_plain_)
                std::swap(job.plain, input_); // for the digest, in disk order
        } else {
            job.kind = CompressJob::Kind::raw;
            job.size = cluster_size_;
            std::swap(job.bytes, input_);
        }
        return {};
    }

  private:
    ClusterCompressor compressor_;
    Decompressor decompressor_;
    std::size_t cluster_size_;
    bool keep_plain_;
    std::vector<std::byte> input_, scratch_;
};

/// The candidate clusters of the plan, read and compressed on all cores ahead of the caller,
/// who takes them back in disk order: the library's ordered worker ring
/// (detail::OrderedWorkers, which joins its threads and turns a worker's exception into that
/// job's error). Memory: 2 clusters per worker plus one per slot, whatever the disk size.
class CompressRing {
  public:
    CompressRing(const Image& image, const Geometry& g, const std::vector<PlanRun>& plan,
                 CompressionType type, unsigned threads, bool keep_plain)
        : image_(image), cluster_bits_(g.cluster_bits), plan_(plan),
          workers_(threads, 4 * static_cast<std::size_t>(threads),
                   [&image, bits = g.cluster_bits, size = g.cluster_size, type,
                    keep_plain]() -> Result<detail::OrderedWorkers<CompressJob>::Work> {
                       auto work = std::make_shared<ClusterWork>(type, size, keep_plain);
                       return detail::OrderedWorkers<CompressJob>::Work(
                           [&image, bits, work](CompressJob& job) -> Result<void> {
                               return work->run(image, bits, job);
                           });
                   }) {
        for (const PlanRun& run : plan_)
            if (!run.zero)
                left_ += run.count;
        if (workers_.started() == 0) // no thread could be started: the work is done here
            inline_.emplace(type, g.cluster_size, keep_plain);
    }

    /// The next candidate cluster in disk order, once read and compressed; it stays valid
    /// until release().
    Result<CompressJob*> next() {
        if (inline_) {
            inline_job_.cluster = next_cluster();
            if (auto ok = inline_->run(image_, cluster_bits_, inline_job_); !ok)
                return ok.error();
            return &inline_job_;
        }
        while (left_ > 0 && !workers_.full()) {
            workers_.next_slot().cluster = next_cluster();
            workers_.submit();
        }
        return workers_.front();
    }

    void release() {
        if (!inline_)
            workers_.release();
    }

  private:
    std::uint64_t next_cluster() {
        while (plan_[run_].zero || run_offset_ >= plan_[run_].count) {
            ++run_;
            run_offset_ = 0;
        }
        --left_;
        return plan_[run_].first + run_offset_++;
    }

    const Image& image_;
    unsigned cluster_bits_;
    const std::vector<PlanRun>& plan_;
    std::uint64_t left_ = 0; // candidates not yet handed out
    std::size_t run_ = 0;
    std::uint64_t run_offset_ = 0;
    std::optional<ClusterWork> inline_;
    CompressJob inline_job_;
    detail::OrderedWorkers<CompressJob> workers_; // destroyed (joined) first
};

/// Places the clusters of the compressed writer in the data area, as qemu's allocator does
/// (qcow2_alloc_bytes, qcow2_alloc_clusters): compressed streams are packed byte after byte
/// into an open host cluster, plain clusters take whole clusters after it, and the open
/// cluster keeps taking streams while they fit. A stream that does not fit spans into the
/// next cluster when that one is still free, else it starts a fresh cluster. So a plain
/// cluster between compressed ones wastes no space (aligning the stream instead would waste
/// up to a cluster at every change from compressible to incompressible data).
/// Refcounts are handed to the RefcountWriter in ascending order: those of plain clusters
/// placed after the open cluster wait until it is closed.
class DataPacker {
  public:
    DataPacker(const Geometry& g, Output& out, RefcountWriter& refcounts, std::uint64_t first)
        : g_(g), out_(out), refcounts_(refcounts), end_(first), file_end_(first * g.cluster_size),
          open_bytes_(g.cluster_size) {}

    /// Places a compressed stream (shorter than a cluster); returns its host offset.
    Result<std::uint64_t> add_compressed(std::span<const std::byte> stream) {
        const std::uint64_t c = g_.cluster_size, n = stream.size();
        if (open_ && fill_ + n <= c && count_ < g_.max_refcount()) {
            const std::uint64_t host = open_cluster_ * c + fill_;
            std::memcpy(open_bytes_.data() + fill_, stream.data(), n);
            fill_ += n;
            ++count_;
            if (fill_ == c) {
                if (auto ok = close_open(); !ok)
                    return ok.error();
            }
            return host;
        }
        if (open_ && open_cluster_ + 1 == end_ && count_ < g_.max_refcount()) {
            // The next cluster is free: the stream continues into it.
            const std::uint64_t host = open_cluster_ * c + fill_;
            const std::uint64_t head = c - fill_;
            std::memcpy(open_bytes_.data() + fill_, stream.data(), head);
            fill_ = c;
            ++count_;
            if (auto ok = close_open(); !ok)
                return ok.error();
            start_open();
            std::memcpy(open_bytes_.data(), stream.data() + head, n - head);
            fill_ = n - head;
            count_ = 1;
            return host;
        }
        if (open_) {
            if (auto ok = close_open(); !ok)
                return ok.error();
        }
        start_open();
        std::memcpy(open_bytes_.data(), stream.data(), n);
        fill_ = n;
        count_ = 1;
        return open_cluster_ * c;
    }

    /// Places a plain cluster; returns its host offset.
    Result<std::uint64_t> add_plain(std::span<const std::byte> cluster) {
        const std::uint64_t host = end_++ * g_.cluster_size;
        if (auto ok = out_.write_at(cluster, host); !ok)
            return ok.error();
        file_end_ = std::max(file_end_, host + g_.cluster_size);
        if (!open_) {
            if (auto ok = refcounts_.put(host >> g_.cluster_bits, 1); !ok)
                return ok.error();
        }
        return host;
    }

    /// Closes the open cluster; returns where the data ends (512-byte aligned: readers fetch
    /// whole sectors of a compressed stream).
    Result<std::uint64_t> finish() {
        if (open_) {
            if (auto ok = close_open(); !ok)
                return ok.error();
        }
        return file_end_;
    }

  private:
    void start_open() {
        open_ = true;
        open_cluster_ = end_++;
        fill_ = 0;
        count_ = 0;
    }

    Result<void> close_open() {
        const std::uint64_t c = g_.cluster_size;
        const std::uint64_t length =
            std::min<std::uint64_t>(c, (fill_ + 511) & ~std::uint64_t{511});
        std::fill(open_bytes_.begin() + static_cast<std::ptrdiff_t>(fill_),
                  open_bytes_.begin() + static_cast<std::ptrdiff_t>(length), std::byte{0});
        if (auto ok = out_.pwrite_at(std::span(open_bytes_).first(length), open_cluster_ * c); !ok)
            return ok;
        file_end_ = std::max(file_end_, open_cluster_ * c + length);
        if (auto ok = refcounts_.put(open_cluster_, count_); !ok)
            return ok;
        for (std::uint64_t k = open_cluster_ + 1; k < end_; ++k) { // plain clusters after it
            if (auto ok = refcounts_.put(k, 1); !ok)
                return ok;
        }
        open_ = false;
        return {};
    }

    Geometry g_;
    Output& out_;
    RefcountWriter& refcounts_;
    std::uint64_t end_;      // the next free host cluster
    std::uint64_t file_end_; // bytes of the file written so far
    bool open_ = false;
    std::uint64_t open_cluster_ = 0, fill_ = 0, count_ = 0;
    std::vector<std::byte> open_bytes_;
};

} // namespace

Result<WriteStats> write_compressed(const Image& image, Output& out, const Geometry& g,
                                    const HeaderFields& fields, const WriteOptions& options) {
    auto planned = make_plan(image, g, options, /*scan=*/false);
    if (!planned)
        return planned.error();
    const std::vector<PlanRun>& plan = *planned;
    const std::vector<std::uint64_t> tables = l2_tables_of(g, plan);
    std::uint64_t candidates = 0;
    WriteStats stats;
    for (const PlanRun& run : plan) {
        if (!run.zero)
            candidates += run.count;
        stats.selected_bytes += run.count * g.cluster_size;
    }
    stats.l2_tables = tables.size();
    // Room for the worst case, every candidate stored plain: compressed streams never take
    // more room than that (each is shorter than a cluster and a plain cluster after a partial
    // one only skips to the next boundary).
    auto laid = make_layout(g, tables.size(), candidates);
    if (!laid)
        return laid.error();
    const Layout layout = *laid;
    auto header = encode_header(g, layout, fields);
    if (!header)
        return header.error();

    RefcountWriter refcounts(g, layout, [&](std::uint64_t block, std::span<const std::byte> bytes) {
        return out.pwrite_at(bytes, (layout.refblocks + block) << g.cluster_bits);
    });
    for (std::uint64_t cluster = 0; cluster < layout.data; ++cluster) {
        if (auto ok = refcounts.put(cluster, 1); !ok)
            return ok.error();
    }
    const std::uint64_t c = g.cluster_size;
    if (auto ok = out.seek_to(layout.data << g.cluster_bits); !ok)
        return ok.error();
    DataPacker packer(g, out, refcounts, layout.data);
    std::vector<std::byte> table(c);
    std::size_t table_index = 0; // into `tables`
    bool table_dirty = false;
    auto flush_table = [&]() -> Result<void> {
        if (!table_dirty)
            return {};
        table_dirty = false;
        auto ok = out.pwrite_at(table, (layout.l2 + table_index) << g.cluster_bits);
        std::fill(table.begin(), table.end(), std::byte{0});
        return ok;
    };
    auto set_entry = [&](std::uint64_t cluster, const L2Plan& entry) -> Result<void> {
        const std::uint64_t t = cluster / g.l2_entries();
        if (!table_dirty || tables[table_index] != t) {
            if (table_dirty) {
                if (auto ok = flush_table(); !ok)
                    return ok;
            }
            while (tables[table_index] != t)
                ++table_index;
            table_dirty = true;
        }
        encode_l2_entry(g, table, cluster % g.l2_entries(), entry);
        return {};
    };

    const bool flattened = options.selection == WriteSelection::whole_disk;
    // The digest takes each cluster in disk order as the ring hands it back (clusters the
    // plan leaves out read as zeros).
    std::optional<DigestTap> tap;
    if (options.digest) {
        auto made = DigestTap::create(*options.digest, g.virtual_size, thread_count(options));
        if (!made)
            return made.error();
        tap.emplace(std::move(*made));
    }
    CompressRing ring(image, g, plan, fields.compression_type, thread_count(options),
                      tap.has_value());
    std::uint64_t done = 0;
    const std::uint64_t total_bytes = candidates * c;
    for (const PlanRun& run : plan) {
        for (std::uint64_t i = 0; i < run.count; ++i) {
            const std::uint64_t cluster = run.first + i;
            L2Plan entry;
            if (run.zero) {
                entry.kind = L2Plan::Kind::zero;
                ++stats.zero_clusters;
                if (auto ok = set_entry(cluster, entry); !ok)
                    return ok.error();
                continue;
            }
            auto job = ring.next();
            if (!job)
                return job.error();
            const CompressJob& slot = **job;
            if (tap && slot.kind != CompressJob::Kind::zero) {
                const auto& plain =
                    slot.kind == CompressJob::Kind::compressed ? slot.plain : slot.bytes;
                if (auto fed =
                        tap->data(cluster << g.cluster_bits, std::span(plain).first(c), false);
                    !fed)
                    return fed.error();
            }
            if (slot.kind == CompressJob::Kind::zero) {
                if (!flattened) {
                    entry.kind = L2Plan::Kind::zero;
                    ++stats.zero_clusters;
                }
            } else if (slot.kind == CompressJob::Kind::compressed) {
                auto host = packer.add_compressed(std::span(slot.bytes).first(slot.size));
                if (!host)
                    return host.error();
                entry.kind = L2Plan::Kind::compressed;
                entry.host = *host;
                entry.compressed_size = slot.size;
                ++stats.compressed_clusters;
            } else {
                auto host = packer.add_plain(std::span(slot.bytes).first(c));
                if (!host)
                    return host.error();
                entry.kind = L2Plan::Kind::data;
                entry.host = *host;
                ++stats.data_clusters;
            }
            ring.release();
            if (auto ok = set_entry(cluster, entry); !ok)
                return ok.error();
            done += c;
            if (done % (64u << 20) < c) {
                out.start_writeback(0, 0);
                if (options.progress)
                    options.progress(done, total_bytes);
            } else if (options.progress && done == total_bytes) {
                options.progress(done, total_bytes);
            }
        }
    }
    auto data_end = packer.finish();
    if (!data_end)
        return data_end.error();
    if (auto ok = refcounts.finish(); !ok)
        return ok.error();
    if (auto ok = flush_table(); !ok)
        return ok.error();
    if (auto ok = out.pwrite_at(*header, 0); !ok)
        return ok.error();
    if (auto ok = out.pwrite_at(encode_reftable(g, layout), layout.reftable << g.cluster_bits); !ok)
        return ok.error();
    if (auto ok = out.pwrite_at(encode_l1(g, layout, tables), layout.l1 << g.cluster_bits); !ok)
        return ok.error();
    stats.file_size = std::max(layout.data << g.cluster_bits, *data_end);
    if (auto ok = out.finish(stats.file_size); !ok)
        return ok.error();
    if (tap) {
        auto digest = tap->finish();
        if (!digest)
            return digest.error();
        stats.digest = *digest;
    }
    return stats;
}

} // namespace detail::writer

// ---- Entry points ----

namespace {

/// Copies the spooled image to the real target.
Result<void> copy_spool(int spool, std::uint64_t size, int fd) {
    std::uint64_t done = 0;
    bool in_kernel = true;
    std::vector<std::byte> buffer;
    while (done < size) {
        const std::size_t want =
            static_cast<std::size_t>(std::min<std::uint64_t>(size - done, detail::kChunkCap));
        if (in_kernel) {
            const ssize_t n = detail::retry_eintr([&] {
                off_t at = static_cast<off_t>(done);
                return ::sendfile(fd, spool, &at, want);
            });
            if (n > 0) {
                done += static_cast<std::uint64_t>(n);
                continue;
            }
            if (n < 0 && (errno == EPIPE || errno == ENOSPC || errno == EIO))
                return target_errno(errno);
            in_kernel = false;
            buffer.resize(1 << 20);
        }
        const ssize_t n =
            detail::pread_some(spool, buffer.data(), std::min(want, buffer.size()), done);
        if (n <= 0)
            return target_error("the spool file ended early");
        const detail::Transfer written =
            detail::write_full(fd, buffer.data(), static_cast<std::uint64_t>(n));
        if (written.done < static_cast<std::uint64_t>(n))
            return target_errno(detail::transfer_errno(written));
        done += static_cast<std::uint64_t>(n);
    }
    return {};
}

} // namespace

Result<void> check_write_options(const WriteOptions& options) {
    if (auto geometry = make_geometry(options, 0); !geometry)
        return geometry.error();
    if (options.selection != WriteSelection::whole_disk && !options.backing_file) {
        return Error{ErrorCode::invalid_argument,
                     "an image of the top layer or of a bitmap's dirty ranges needs a backing "
                     "file"};
    }
    if (options.selection == WriteSelection::bitmap_dirty && options.bitmap.empty()) {
        return Error{ErrorCode::invalid_argument, "no bitmap named for the dirty-range image"};
    }
    if (options.backing_format && *options.backing_format != "qcow2" &&
        *options.backing_format != "raw") {
        return Error{ErrorCode::invalid_argument,
                     fmt::format("backing format '{}' is not qcow2 or raw",
                                 detail::printable(*options.backing_format))};
    }
    if (options.backing_file && options.backing_file->empty()) {
        return Error{ErrorCode::invalid_argument, "the backing file name is empty"};
    }
    if (options.digest && options.selection != WriteSelection::whole_disk) {
        return Error{ErrorCode::invalid_argument,
                     "a digest is only taken of a whole-disk copy (an overlay holds part of "
                     "the disk)"};
    }
    return {};
}

Result<Image> open_output_backing(const WriteOptions& options, const std::filesystem::path& target,
                                  const OpenOptions& open) {
    if (!options.backing_file || options.backing_file->empty())
        return Error{ErrorCode::invalid_argument, "no backing file named"};
    // qemu resolves a relative backing file name against the directory of the image naming it
    // (bdrv_get_full_backing_filename): the output's, not ours.
    std::filesystem::path path(*options.backing_file);
    if (path.is_relative() && !target.empty())
        path = target.parent_path() / path;
    OpenOptions options_for_backing = open;
    options_for_backing.backing = BackingMode::follow;
    options_for_backing.backing_file.reset();
    options_for_backing.backing_format.reset();
    options_for_backing.snapshot.reset();
    options_for_backing.data_file.reset();
    options_for_backing.format = options.backing_format;
    if (!options_for_backing.format) {
        auto probed = probe_format(path);
        options_for_backing.format = probed ? *probed : "qcow2";
    }
    auto image = Image::open(path, options_for_backing);
    if (!image) {
        // qemu-img: "Could not open backing file: Could not open 'sub/sub/base.qcow2': No such
        // file or directory". Our errors name the path already.
        Error error = std::move(image).error();
        if (!(error.message_names_path && error.path == path.string()))
            error.message = fmt::format("{}: {}", detail::printable(path.string()), error.message);
        error.message = "Could not open backing file: " + error.message;
        error.message_names_path = false;
        return error;
    }
    return image;
}

static Result<WriteStats> write_qcow2_in_boundary(const Image& source, int fd,
                                                  const WriteOptions& options) {
    return detail::writer::write_image(source, fd, options, false);
}

Result<WriteStats> write_qcow2(const Image& source, int fd, const WriteOptions& options) {
    return detail::contain_faults(source.path(), [&]() -> Result<WriteStats> {
        return write_qcow2_in_boundary(source, fd, options);
    });
}

Result<WriteStats> detail::writer::write_image(const Image& source, int fd,
                                               const WriteOptions& options, bool early_writeback) {
    if (auto ok = check_write_options(options); !ok)
        return ok.error();
    auto geometry = make_geometry(options, source.size());
    if (!geometry)
        return geometry.error();
    if (options.selection == WriteSelection::differs_from_backing && !options.backing_image) {
        return Error{ErrorCode::invalid_argument,
                     "writing the difference from a backing file needs that file opened "
                     "(WriteOptions::backing_image, see open_output_backing)"};
    }
    if (options.backing_image && options.selection == WriteSelection::bitmap_dirty &&
        options.backing_image->size() != source.size()) {
        // The clusters left out read from the backing file: a previous backup of this disk
        // has its size (qemu resizes a disk's bitmaps with it).
        return Error{ErrorCode::invalid_argument,
                     fmt::format("backing file {} is {} bytes but the disk is {} bytes: not a "
                                 "backup of this disk",
                                 detail::printable(options.backing_image->path().string()),
                                 options.backing_image->size(), source.size())};
    }
    HeaderFields fields;
    fields.compression_type = options.compression_type;
    fields.backing_file = options.backing_file;
    fields.backing_format = options.backing_format;
    auto out = Output::open(fd);
    if (!out)
        return out.error();
    out->set_early_writeback(early_writeback);
    // An image read while someone wrote to it would mix two states: never handed out as good.
    auto unchanged = [&](Result<WriteStats> stats) -> Result<WriteStats> {
        if (!stats && !is_target_error(stats.error()))
            return source.explain(std::move(stats).error());
        if (!stats)
            return stats;
        if (auto ok = source.check_unchanged(); !ok)
            return std::move(ok).error();
        return stats;
    };
    if (!options.compress)
        return unchanged(write_sequential(source, *out, *geometry, fields, options));
    if (out->seekable())
        return unchanged(write_compressed(source, *out, *geometry, fields, options));
    // A pipe cannot take the metadata last: spool the image to an unlinked file, then copy.
    const char* tmpdir = std::getenv("TMPDIR");
    const std::string dir = tmpdir && *tmpdir ? tmpdir : "/tmp";
    int spool = ::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (spool < 0) {
        std::string name = dir + "/qcowmap-spool-XXXXXX";
        spool = ::mkostemp(name.data(), O_CLOEXEC);
        if (spool >= 0)
            ::unlink(name.c_str());
    }
    if (spool < 0) {
        const int err = errno;
        Error error = target_error(
            fmt::format("cannot create a spool file in {}: {}", dir, std::strerror(err)));
        error.system_errno = err;
        return error;
    }
    auto spooled = Output::open(spool);
    Result<WriteStats> stats = spooled
                                   ? write_compressed(source, *spooled, *geometry, fields, options)
                                   : Result<WriteStats>(spooled.error());
    if (!stats && is_target_error(stats.error())) {
        // The spool's own failure (a full $TMPDIR), not the output's: say which.
        std::string_view why = stats.error().message;
        why.remove_prefix(kWriteTargetError.size());
        stats = target_error(fmt::format("cannot write the spool file in {} ($TMPDIR; a pipe "
                                         "cannot take a compressed image's metadata last): {}",
                                         dir, why));
    }
    stats = unchanged(std::move(stats));
    if (stats) {
        if (auto ok = copy_spool(spool, stats->file_size, fd); !ok)
            stats = ok.error();
    }
    ::close(spool);
    return stats;
}

static Result<WriteStats> write_qcow2_file_in_boundary(const Image& source,
                                                       const std::filesystem::path& target,
                                                       const WriteOptions& options, bool replace) {
    struct stat st {};
    if (::stat(target.c_str(), &st) == 0 && source.maps_file(st.st_dev, st.st_ino)) {
        return target_error("is the image being read (or one of its layers or its data "
                            "file): refusing to overwrite it");
    }
    // Written under a temporary, named only once complete (detail::AtomicFile): unnamed where
    // the file system has O_TMPFILE, else hidden and removed on every error path; a symlink
    // is written through.
    auto file = detail::AtomicFile::create(target, replace);
    if (!file)
        return target_error(file.error().message);
    auto stats = detail::writer::write_image(source, file->fd(), options, true);
    if (!stats)
        return stats.error();
    if (auto named = file->commit(); !named)
        return target_error(named.error().message);
    return stats;
}

Result<WriteStats> write_qcow2_file(const Image& source, const std::filesystem::path& target,
                                    const WriteOptions& options, bool replace) {
    return detail::contain_faults(source.path(), [&]() -> Result<WriteStats> {
        return write_qcow2_file_in_boundary(source, target, options, replace);
    });
}

} // namespace qcowmap

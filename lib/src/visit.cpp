// Image::visit: the disk's runs in order, with bytes produced ahead on worker threads.
//
// The calling thread walks the extents and calls the visitor in order. Data runs come straight
// from the mapping (DataAccess::mapping) or are read with pread into buffers in pieces of
// kReadPieceBytes (DataAccess::read); compressed clusters are decompressed. With threads, the
// first extent whose bytes must be produced (a compressed cluster, a data run to read, or with
// VisitOptions::prefetch a mapped data run to make present) starts a second walk from there
// that runs ahead, queueing every such piece into the ordered job ring of
// detail::OrderedWorkers. Both walks meet the same extents in the same order and cut them into
// the same pieces, so the k-th job is the one the caller needs next. Data pieces, mapped or to
// read, are grouped into jobs of about kPrefetchWindowBytes (a fragmented image's 64 KiB runs
// would otherwise cost a hand-over, and a wake-up, each; file-contiguous pieces are read with
// one pread); a job's pages are dropped from the process by the worker that next takes its
// slot, which the ring frees only once the visitor is done with them. The whole visit is
// Image::runs stepped to the end (RunWalk), so callers that step the walk themselves get the
// same look-ahead.
#include "errors.hpp"
#include "fault.hpp"
#include "image_state.hpp"
#include "populate.hpp"
#include "sys_io.hpp"
#include "workers.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <unistd.h>
#include <vector>

namespace qcowmap {
namespace {

constexpr unsigned kMaxProducerThreads = 64;
// Pieces one job may group (64 KiB runs: 16 make a window).
constexpr std::size_t kMaxGroupedPieces = 64;

/// How the bytes of an extent reach the visitor.
enum class Delivery : std::uint8_t {
    direct,     // as they are: zero runs, and mapped data without prefetching
    compressed, // decompressed, one piece per cluster
    read,       // read with pread, in pieces of kReadPieceBytes
    mapped,     // from the mapping, in pieces of kPrefetchWindowBytes made present ahead
};

Delivery delivery_of(const VisitOptions& options, const Extent& extent) {
    if (extent.kind == ExtentKind::compressed)
        return Delivery::compressed;
    if (extent.kind != ExtentKind::data || !extent.file)
        return Delivery::direct; // zero, or bytes in memory rather than a file mapping
    if (options.data_access == DataAccess::read)
        return Delivery::read;
    return options.prefetch == Prefetch::none ? Delivery::direct : Delivery::mapped;
}

std::uint64_t piece_limit(Delivery source, const Extent& extent) {
    switch (source) {
    case Delivery::read:
        return kReadPieceBytes;
    case Delivery::mapped:
        return kPrefetchWindowBytes;
    default:
        return extent.length;
    }
}

/// One piece of a data run inside a job that groups several (mapped or read).
struct MappedPiece {
    std::uint64_t extent_offset = 0;
    std::uint64_t piece_offset = 0;
    std::uint64_t piece_length = 0;
};

/// One pread of a read group: file-contiguous pieces are read at once.
struct GroupRead {
    FilePosition from;
    std::uint64_t buffer_offset = 0;
    std::uint64_t length = 0;
};

/// One job of the ring: a group of pieces of one kind, about kPrefetchWindowBytes in all:
/// compressed clusters to decompress or data pieces to read into one buffer, or data pieces to
/// make present. A fragmented image's 64 KiB runs (or clusters) would otherwise cost a job, and
/// a wake-up, each.
struct Piece {
    Delivery source = Delivery::compressed;
    /// compressed and read. Shared: a caller of Image::runs may keep it (RunWalk::hold), and
    /// then the slot's next job gets a fresh one.
    std::shared_ptr<std::vector<std::byte>> buffer;
    std::vector<MappedPiece> pieces;     // the pieces (a compressed extent each), in order
    std::vector<std::uint64_t> piece_at; // compressed and read: where each starts in buffer
    std::vector<Extent> clusters;        // compressed: the extents to decompress
    /// compressed: a cluster that does not decompress fails only its own piece, when the
    /// caller takes it, so that the clusters before it in the group still arrive (in order,
    /// up to the first bad one); the rest of the group is not decompressed.
    std::optional<std::pair<std::size_t, Error>> cluster_error;
    std::vector<GroupRead> reads;                  // read
    std::vector<std::span<const std::byte>> pages; // mapped: the address ranges, merged
    /// The pages of the job that had this slot before, which the visitor is done with.
    std::vector<std::span<const std::byte>> release_first;
    Prefetch prefetch = Prefetch::none;
};

/// The walk that runs ahead of the visitor and keeps the job ring full.
class Prefetcher {
  public:
    Prefetcher(const Image& image, const VisitOptions& options, std::uint64_t start,
               std::uint64_t end)
        : image_(image), options_(options), ahead_(image.extents(start, end)),
          capacity_(4 * static_cast<std::size_t>(options.threads)), slot_pages_(capacity_) {
        workers_.emplace(
            options.threads, capacity_,
            [image]() -> Result<detail::OrderedWorkers<Piece>::Work> {
                auto decompressor = std::make_shared<Decompressor>();
                return detail::OrderedWorkers<Piece>::Work([image, decompressor](
                                                               Piece& piece) -> Result<void> {
                    for (const auto& pages : piece.release_first)
                        detail::release_pages(pages);
                    piece.release_first.clear();
                    switch (piece.source) {
                    case Delivery::read:
                        for (const GroupRead& read : piece.reads) {
                            auto into = std::span<std::byte>(*piece.buffer)
                                            .subspan(read.buffer_offset, read.length);
                            if (auto ok = detail::read_exactly(read.from, into); !ok)
                                return ok;
                        }
                        return {};
                    case Delivery::mapped:
                        for (const auto& pages : piece.pages)
                            detail::populate_pages(pages, piece.prefetch);
                        return {};
                    default:
                        for (std::size_t i = 0; i < piece.clusters.size(); ++i) {
                            const std::uint64_t end = i + 1 < piece.piece_at.size()
                                                          ? piece.piece_at[i + 1]
                                                          : piece.buffer->size();
                            auto cluster = std::span<std::byte>(*piece.buffer)
                                               .subspan(piece.piece_at[i], end - piece.piece_at[i]);
                            if (auto ok = decompressor->decompress_cluster(image, piece.clusters[i],
                                                                           cluster);
                                !ok) {
                                piece.cluster_error.emplace(i, std::move(ok).error());
                                break;
                            }
                        }
                        return {};
                    }
                });
            },
            image.path());
    }

    ~Prefetcher() {
        // Stop and join the workers first, then drop what the visitor left mapped.
        workers_.reset();
        for (const auto& slot : slot_pages_) {
            for (const auto& pages : slot)
                detail::release_pages(pages);
        }
    }

    Prefetcher(const Prefetcher&) = delete;
    Prefetcher& operator=(const Prefetcher&) = delete;

    /// True when no worker could be started: the caller produces the bytes itself.
    bool idle() const { return workers_->started() == 0; }

    /// Waits for the job holding the next piece in disk order, which must start at
    /// `piece_offset` inside `expected`, and returns the piece's bytes; they live until `done()`
    /// (mapped bytes as long as the Image), or as long as `*owner` (the job's buffer; nullptr
    /// for mapped bytes) when the caller keeps it.
    Result<std::span<const std::byte>> next(Delivery source, const Extent& expected,
                                            std::uint64_t piece_offset, std::uint64_t piece_length,
                                            std::shared_ptr<const void>& owner) {
        owner.reset();
        top_up();
        if (workers_->empty()) {
            // The look-ahead walk failed or ended before reaching this extent.
            if (ahead_.error())
                return *ahead_.error();
            return lost_place();
        }
        auto produced = workers_->front();
        if (!produced) {
            return std::move(produced).error();
        }
        const Piece& piece = **produced;
        if (piece.source != source)
            return lost_place();
        if (used_in_front_ >= piece.pieces.size())
            return lost_place();
        const MappedPiece& p = piece.pieces[used_in_front_];
        if (p.extent_offset != expected.offset || p.piece_offset != piece_offset ||
            p.piece_length != piece_length) {
            return lost_place();
        }
        if (source == Delivery::mapped)
            return expected.bytes.subspan(piece_offset - expected.offset, piece_length);
        owner = piece.buffer;
        const std::uint64_t at = piece.piece_at[used_in_front_];
        if (source == Delivery::read)
            return std::span<const std::byte>(*piece.buffer).subspan(at, piece_length);
        if (piece.clusters[used_in_front_].compressed_host_offset !=
            expected.compressed_host_offset) {
            return lost_place();
        }
        if (piece.cluster_error && piece.cluster_error->first == used_in_front_)
            return piece.cluster_error->second;
        return std::span<const std::byte>(*piece.buffer)
            .subspan(at + expected.offset_in_cluster, expected.length);
    }

    /// The visitor is done with the piece `next()` returned.
    void done() {
        auto front = workers_->front(); // already done: returns at once
        if (front && ++used_in_front_ < (*front)->pieces.size()) {
            return; // more pieces of this group to come
        }
        used_in_front_ = 0;
        workers_->release();
    }

  private:
    /// The two walks of the same metadata disagree: only a file changed under us does that.
    static Error lost_place() {
        return detail::image_changed("two walks of its metadata disagree");
    }

    /// Moves the look-ahead walk to the next extent whose bytes must be produced; false at the
    /// end (or on error: `ahead_.error()`).
    bool advance() {
        Extent extent;
        while (ahead_.next(extent)) {
            pending_source_ = delivery_of(options_, extent);
            if (pending_source_ != Delivery::direct) {
                pending_ = extent;
                pending_next_ = pending_->offset;
                return true;
            }
        }
        return false;
    }

    /// Fills `piece` with the next job: one compressed cluster, one piece to read, or mapped
    /// pieces up to a window's worth. False when the walk has nothing more.
    bool fill(Piece& piece) {
        std::uint64_t grouped = 0;
        piece.piece_at.clear();
        piece.reads.clear();
        piece.clusters.clear();
        piece.cluster_error.reset();
        for (;;) {
            if (!pending_ && !advance())
                break;
            const Extent& e = *pending_;
            if (pending_source_ == Delivery::mapped || pending_source_ == Delivery::read) {
                // Cut as the caller cuts (piece_limit), grouped up to a window per job.
                const std::uint64_t length = std::min<std::uint64_t>(
                    piece_limit(pending_source_, e), e.offset + e.length - pending_next_);
                if (!piece.pieces.empty() &&
                    (piece.source != pending_source_ || grouped + length > kPrefetchWindowBytes ||
                     piece.pieces.size() == kMaxGroupedPieces)) {
                    break; // this job is full; the piece starts the next one
                }
                piece.source = pending_source_;
                piece.prefetch = options_.prefetch;
                piece.pieces.push_back(MappedPiece{e.offset, pending_next_, length});
                if (pending_source_ == Delivery::mapped) {
                    auto bytes = e.bytes.subspan(pending_next_ - e.offset, length);
                    if (!piece.pages.empty() &&
                        piece.pages.back().data() + piece.pages.back().size() == bytes.data()) {
                        piece.pages.back() = {piece.pages.back().data(),
                                              piece.pages.back().size() + bytes.size()};
                    } else {
                        piece.pages.push_back(bytes);
                    }
                } else {
                    const FilePosition from{e.file->fd,
                                            e.file->offset + (pending_next_ - e.offset)};
                    piece.piece_at.push_back(grouped);
                    GroupRead* last = piece.reads.empty() ? nullptr : &piece.reads.back();
                    if (last && last->from.fd == from.fd &&
                        last->from.offset + last->length == from.offset) {
                        last->length += length; // file-contiguous: one pread
                    } else {
                        piece.reads.push_back(GroupRead{from, grouped, length});
                    }
                }
                grouped += length;
                pending_next_ += length;
                if (pending_next_ == e.offset + e.length)
                    pending_.reset();
                continue;
            }
            // A compressed cluster, decompressed whole; layers of a chain may differ in
            // cluster size.
            const std::uint64_t cluster =
                detail::layer_at(detail_state(image_), e.depth)->cluster_size;
            if (!piece.pieces.empty() &&
                (piece.source != Delivery::compressed || grouped + cluster > kPrefetchWindowBytes ||
                 piece.pieces.size() == kMaxGroupedPieces)) {
                break; // this job is full, or of another kind
            }
            piece.source = Delivery::compressed;
            piece.pieces.push_back(MappedPiece{e.offset, e.offset, e.length});
            piece.piece_at.push_back(grouped);
            piece.clusters.push_back(e);
            grouped += cluster;
            pending_.reset();
        }
        if (piece.pieces.empty())
            return false;
        if (piece.source != Delivery::mapped)
            fresh_buffer(piece).resize(grouped);
        return true;
    }

    /// The slot's buffer, or a new one where a caller of Image::runs kept the old (hold()).
    static std::vector<std::byte>& fresh_buffer(Piece& piece) {
        if (!piece.buffer || piece.buffer.use_count() != 1)
            piece.buffer = std::make_shared<std::vector<std::byte>>();
        return *piece.buffer;
    }

    // Queues the jobs the look-ahead walk finds into free slots.
    void top_up() {
        while (!workers_->full()) {
            Piece& piece = workers_->next_slot();
            // The job that had this slot was released: the visitor is done with its pages.
            std::vector<std::span<const std::byte>> previous = std::move(piece.pages);
            piece.pages.clear();
            piece.pieces.clear();
            if (!fill(piece)) {
                piece.pages = std::move(previous); // still to be dropped, at the end
                return;
            }
            piece.release_first.insert(piece.release_first.end(), previous.begin(), previous.end());
            slot_pages_[submitted_ % capacity_] = piece.pages;
            workers_->submit();
            ++submitted_;
        }
    }

    const Image& image_;
    const VisitOptions options_;
    ExtentRange ahead_;             // stepped by hand (next)
    std::optional<Extent> pending_; // an extent being cut into pieces
    Delivery pending_source_ = Delivery::direct;
    std::uint64_t pending_next_ = 0;
    std::size_t used_in_front_ = 0; // pieces of the front (mapped) job already visited
    const std::size_t capacity_;
    std::uint64_t submitted_ = 0;
    // The pages of each slot's latest job, to drop at the end; the workers drop them as they
    // reuse slots.
    std::vector<std::vector<std::span<const std::byte>>> slot_pages_;
    std::optional<detail::OrderedWorkers<Piece>> workers_; // reset first by the destructor
};

/// Produces bytes on the calling thread when there are no workers, into a buffer shared with
/// a caller that keeps it (RunWalk::hold; then the next piece gets a fresh one).
class InlineProducer {
  public:
    Result<std::span<const std::byte>> decompress(const Image& image, const Extent& extent,
                                                  std::shared_ptr<const void>& owner) {
        if (!decompressor_)
            decompressor_.emplace();
        auto& cluster = buffer(detail::layer_at(detail_state(image), extent.depth)->cluster_size);
        if (auto ok = decompressor_->decompress_cluster(image, extent, cluster); !ok)
            return std::move(ok).error();
        owner = buffer_;
        return std::span<const std::byte>(cluster).subspan(extent.offset_in_cluster, extent.length);
    }

    Result<std::span<const std::byte>> read(const FilePosition& position, std::size_t length,
                                            std::shared_ptr<const void>& owner) {
        auto out = std::span<std::byte>(buffer(kReadPieceBytes)).first(length);
        if (auto ok = detail::read_exactly(position, out); !ok)
            return std::move(ok).error();
        owner = buffer_;
        return std::span<const std::byte>(out);
    }

  private:
    std::vector<std::byte>& buffer(std::size_t size) {
        if (!buffer_ || buffer_.use_count() != 1)
            buffer_ = std::make_shared<std::vector<std::byte>>();
        buffer_->resize(size);
        return *buffer_;
    }

    std::optional<Decompressor> decompressor_;
    std::shared_ptr<std::vector<std::byte>> buffer_;
};

/// The walk's result once a read of the mapping faulted: the fault boundary replaces it with the
/// fault's own description; the rest of the disk is not worth reading.
Error stopped_by_fault() {
    return Error{ErrorCode::io_error, "a read of the image's files faulted"};
}

Run run_of(const Extent& extent) {
    Run run;
    run.offset = extent.offset;
    run.length = extent.length;
    run.kind = extent.kind;
    run.present = extent.present;
    run.depth = extent.depth;
    return run;
}

} // namespace

namespace detail {

Result<void> read_exactly(const FilePosition& position, std::span<std::byte> out) {
    const Transfer read = pread_full(position.fd, out.data(), out.size(), position.offset);
    if (read.error != 0) {
        return errno_error(read.error,
                           fmt::format("cannot read {} bytes at file offset {:#x}: {}",
                                       out.size() - read.done, position.offset + read.done,
                                       std::strerror(read.error)));
    }
    if (read.done < out.size()) {
        return Error{ErrorCode::io_error,
                     fmt::format("the file ends before offset {:#x}, inside its mapping "
                                 "(was it truncated while open?)",
                                 position.offset + read.done)};
    }
    return {};
}

} // namespace detail

Result<void> Image::visit(std::uint64_t start, std::uint64_t end, const RunVisitor& caller_visitor,
                          const VisitOptions& given) const {
    // Inside the fault boundary: the walk, the workers and (when the library itself visits:
    // read, hash, compare, export) the visitor. A visitor of the library's caller is the
    // caller's code, not built to be unwound from a fault: it runs outside the boundary.
    if (detail::in_fault_boundary())
        return visit_in_boundary(start, end, caller_visitor, given);
    const RunVisitor visitor = [&](const Run& run) -> Result<void> {
        detail::FaultBoundarySuspended callers_code;
        return caller_visitor(run);
    };
    return detail::contain_faults(path(),
                                  [&] { return visit_in_boundary(start, end, visitor, given); });
}

Result<void> Image::visit_in_boundary(std::uint64_t start, std::uint64_t end,
                                      const RunVisitor& visitor,
                                      const VisitOptions& options) const {
    detail::RunWalk walk(*this, start, end, options);
    Run run;
    while (walk.next(run)) {
        if (auto ok = visitor(run); !ok)
            return ok;
        if (detail::fault_pending())
            return stopped_by_fault();
    }
    if (walk.error())
        return *walk.error();
    return {};
}

RunRange Image::runs(std::uint64_t start, std::uint64_t end, const VisitOptions& options) const {
    return RunRange(detail::RunWalk(*this, start, end, options));
}

namespace detail {

/// The state of one walk between the caller's steps: the extent walk, the extent being cut into
/// pieces, and whoever produces the pieces' bytes (workers ahead, or this thread).
struct RunWalk::Impl {
    Impl(const Image& walked, std::uint64_t start, std::uint64_t walk_end,
         const VisitOptions& given)
        : image(walked), options(given), end(walk_end), extents(image.extents(start, walk_end)),
          no_threads(given.threads <= 1) {
        options.data_access = resolve(options.data_access);
        // More producers than this only add memory (4 jobs in flight per thread).
        options.threads = std::min(options.threads, kMaxProducerThreads);
    }

    ~Impl() { finish_previous(); }

    /// The caller is done with the run produced last.
    void finish_previous() {
        if (owe_done && prefetcher)
            prefetcher->done();
        owe_done = false;
        if (!owe_consumed.empty() && releaser)
            releaser->consumed(owe_consumed);
        owe_consumed = {};
        held.reset();
    }

    /// Moves to the next extent; false at the end of the range or on error.
    bool advance_extent() {
        if (!extents.next(extent))
            return false;
        source = delivery_of(options, extent);
        piece = extent.offset;
        cutting = true;
        return true;
    }

    /// Starts the workers at the first extent whose bytes must be produced (images without
    /// compressed clusters, read with the mapping and no prefetching, start none).
    void start_producers() {
        if (!prefetcher && !no_threads) {
            try {
                prefetcher.emplace(image, options, extent.offset, end);
                if (prefetcher->idle()) {
                    prefetcher.reset();
                    no_threads = true;
                }
            } catch (const std::exception&) {
                prefetcher.reset();
                no_threads = true;
            }
        }
        // Without workers, mapped pieces are still dropped behind the caller (in batches).
        if (source == Delivery::mapped && !prefetcher && !releaser)
            releaser.emplace(image);
    }

    Result<bool> step(Run& out) {
        finish_previous();
        if (!cutting) {
            if (!advance_extent()) {
                if (extents.error())
                    return *extents.error();
                return false;
            }
            if (source == Delivery::direct) {
                out = run_of(extent);
                if (extent.kind == ExtentKind::data) {
                    out.bytes = extent.bytes;
                    out.file = extent.file;
                    out.mapped = extent.file.has_value();
                }
                cutting = false;
                return true;
            }
            start_producers();
        }
        // A compressed cluster is one piece; data runs are cut into pieces.
        const std::uint64_t extent_end = extent.offset + extent.length;
        const std::uint64_t length =
            std::min<std::uint64_t>(piece_limit(source, extent), extent_end - piece);
        std::optional<FilePosition> piece_file;
        if (source != Delivery::compressed)
            piece_file =
                FilePosition{extent.file->fd, extent.file->offset + (piece - extent.offset)};
        Result<std::span<const std::byte>> bytes = std::span<const std::byte>{};
        if (prefetcher) {
            bytes = prefetcher->next(source, extent, piece, length, held);
            owe_done = true; // its slot is released at the next step, even after an error
        } else if (source == Delivery::read) {
            bytes = inline_producer.read(*piece_file, static_cast<std::size_t>(length), held);
        } else if (source == Delivery::mapped) {
            bytes = extent.bytes.subspan(piece - extent.offset, length);
            // What the workers would have done: a caller of Image::runs may then rely on every
            // mapped byte handed out with Prefetch::touch having been read inside the boundary.
            if (options.prefetch == Prefetch::touch)
                populate_pages(*bytes, Prefetch::touch);
        } else {
            bytes = inline_producer.decompress(image, extent, held);
        }
        if (!bytes) {
            owe_done = false; // the walk ends here
            // A short read or a cluster that no longer decompresses: the file changing under
            // us is the cause when it did.
            return image.explain(std::move(bytes).error());
        }
        out = run_of(extent);
        out.offset = piece;
        out.length = length;
        out.bytes = *bytes;
        out.file = piece_file;
        out.mapped = source == Delivery::mapped;
        if (out.mapped && !prefetcher)
            owe_consumed = out.bytes;
        piece += length;
        cutting = piece < extent_end;
        return true;
    }

    Image image;
    VisitOptions options;
    const std::uint64_t end;
    ExtentRange extents;                // stepped by hand (next)
    Extent extent;                      // the extent being cut (or handed out whole)
    Delivery source = Delivery::direct; // how its bytes are produced
    std::uint64_t piece = 0;            // where its next piece starts
    bool cutting = false;               // more pieces of `extent` to come
    std::optional<Prefetcher> prefetcher;
    InlineProducer inline_producer; // without threads, or when none could be started
    bool no_threads;
    std::optional<PageReleaser> releaser;
    bool owe_done = false;                   // the front job is the caller's run
    std::span<const std::byte> owe_consumed; // mapped bytes to drop once the caller is done
    std::shared_ptr<const void> held;        // the buffer of the caller's run
};

RunWalk::RunWalk(const Image& image, std::uint64_t start, std::uint64_t end,
                 const VisitOptions& options)
    : impl_(std::make_unique<Impl>(image, start, end, options)) {}
RunWalk::RunWalk(RunWalk&&) noexcept = default;
RunWalk& RunWalk::operator=(RunWalk&&) noexcept = default;
RunWalk::~RunWalk() = default;

bool RunWalk::next(Run& out) {
    if (error_ || !impl_)
        return false;
    // Each step inside the fault boundary (nested in a visit's own): the extent walk, the
    // mapped pages and the workers' jobs. The caller's use of the run is outside it.
    Result<bool> produced = contain_faults(impl_->image.path(), [&] { return impl_->step(out); });
    if (!produced) {
        // A fault of a worker's read ahead fails the step that sees it (what this thread read
        // meanwhile may have read zeros in its place); a file that changed is named as the cause.
        error_ = impl_->image.explain(std::move(produced).error());
        impl_.reset(); // stops and joins the workers now
        return false;
    }
    if (!*produced)
        impl_.reset();
    return *produced;
}

std::shared_ptr<const void> RunWalk::hold() const {
    if (!impl_)
        return nullptr;
    // The walk forgets its reference (held is reset at the next step); the buffer's use count
    // then says it is kept, and the next piece goes to a fresh one.
    return impl_->held;
}

const Extent& RunWalk::extent() const {
    static const Extent none;
    return impl_ ? impl_->extent : none;
}

} // namespace detail

} // namespace qcowmap

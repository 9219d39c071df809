// Image::visit: the disk's runs in order, with bytes produced ahead on worker threads.
//
// The calling thread walks the extents and calls the visitor in order. Data runs come straight
// from the mapping (DataAccess::mapping) or are read with pread into buffers in pieces of
// kReadPieceBytes (DataAccess::read); compressed clusters are decompressed. With threads, the
// first extent whose bytes must be produced (a compressed cluster, or a data run to read)
// starts a second walk from there that runs ahead, queueing every such piece into the ordered
// job ring of detail::OrderedWorkers. Both walks meet the same extents in the same order and cut
// them into the same pieces, so the k-th piece the caller needs is the k-th job.
#include "image_state.hpp"
#include "workers.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <unistd.h>
#include <vector>

namespace qcowmap {
namespace {

constexpr unsigned kMaxProducerThreads = 64;

/// Where a data extent's bytes are read from in DataAccess::read mode; nullopt when they come
/// straight from memory (mapping mode, or an image opened from memory).
std::optional<FilePosition> read_source(const VisitOptions& options, const Extent& extent) {
    if (options.data_access != DataAccess::read || extent.kind != ExtentKind::data) {
        return std::nullopt;
    }
    return extent.file;
}

/// One unit of produced bytes: a compressed cluster, or one piece of a data run to read.
struct Piece {
    Extent extent;
    std::uint64_t piece_offset = 0; // virtual offset of the piece (== extent.offset if compressed)
    std::uint64_t piece_length = 0;
    std::optional<FilePosition> read_from; // set for data pieces
    std::vector<std::byte> buffer;
};

/// The walk that runs ahead of the visitor and keeps the job ring full.
class Prefetcher {
  public:
    Prefetcher(const Image& image, const VisitOptions& options, std::uint64_t start,
               std::uint64_t end)
        : image_(image), options_(options), ahead_(image.extents(start, end)),
          workers_(
              options.threads, 4 * static_cast<std::size_t>(options.threads),
              [image]() -> Result<detail::OrderedWorkers<Piece>::Work> {
                  auto decompressor = std::make_shared<Decompressor>();
                  return detail::OrderedWorkers<Piece>::Work([image, decompressor](
                                                                 Piece& piece) -> Result<void> {
                      if (piece.read_from) {
                          return detail::read_exactly(
                              *piece.read_from,
                              std::span<std::byte>(piece.buffer).first(piece.piece_length));
                      }
                      return decompressor->decompress_cluster(image, piece.extent, piece.buffer);
                  });
              }) {}

    /// True when no worker could be started: the caller produces the bytes itself.
    bool idle() const { return workers_.started() == 0; }

    /// Waits for the next produced piece in disk order, which must start at `piece_offset`
    /// inside `expected`; the span lives until `release()`.
    Result<std::span<const std::byte>> next(const Extent& expected, std::uint64_t piece_offset,
                                            std::uint64_t piece_length) {
        top_up();
        if (workers_.empty()) {
            // The look-ahead walk failed or ended before reaching this extent.
            if (ahead_.error())
                return *ahead_.error();
            return lost_place();
        }
        auto produced = workers_.front();
        if (!produced) {
            return std::move(produced).error();
        }
        const Piece& piece = **produced;
        if (piece.extent.offset != expected.offset || piece.piece_offset != piece_offset ||
            piece.piece_length != piece_length ||
            piece.extent.compressed_host_offset != expected.compressed_host_offset) {
            return lost_place();
        }
        if (piece.read_from) {
            return std::span<const std::byte>(piece.buffer).first(piece_length);
        }
        return std::span<const std::byte>(piece.buffer)
            .subspan(expected.offset_in_cluster, expected.length);
    }

    void release() { workers_.release(); }

  private:
    /// The two walks of the same metadata disagree: only a file changed under us does that.
    static Error lost_place() {
        return Error{ErrorCode::io_error, "image changed while being read (two walks of its "
                                          "metadata disagree)"};
    }

    // Queues the pieces the look-ahead walk finds into free slots.
    void top_up() {
        while (!workers_.full()) {
            if (!pending_) {
                if (!started_) {
                    started_ = true;
                    cursor_ = ahead_.begin();
                } else if (cursor_ != std::default_sentinel) {
                    ++cursor_;
                }
                for (; cursor_ != std::default_sentinel; ++cursor_) {
                    pending_from_ = read_source(options_, *cursor_);
                    if (cursor_->kind == ExtentKind::compressed || pending_from_) {
                        break;
                    }
                }
                if (cursor_ == std::default_sentinel) {
                    return;
                }
                pending_ = *cursor_;
                pending_next_ = pending_->offset;
            }
            const Extent& e = *pending_;
            Piece& piece = workers_.next_slot();
            piece.extent = e;
            if (e.kind == ExtentKind::compressed) {
                // Layers of a chain may differ in cluster size.
                piece.buffer.resize(detail::layer_at(detail_state(image_), e.depth)->cluster_size);
                piece.piece_offset = e.offset;
                piece.piece_length = e.length;
                piece.read_from.reset();
                pending_.reset();
            } else {
                const std::uint64_t done = pending_next_ - e.offset;
                piece.piece_offset = pending_next_;
                piece.piece_length = std::min<std::uint64_t>(kReadPieceBytes, e.length - done);
                piece.buffer.resize(kReadPieceBytes);
                piece.read_from = FilePosition{pending_from_->fd, pending_from_->offset + done};
                pending_next_ += piece.piece_length;
                if (pending_next_ == e.offset + e.length) {
                    pending_.reset();
                }
            }
            workers_.submit();
        }
    }

    const Image& image_;
    const VisitOptions options_;
    ExtentRange ahead_;
    ExtentRange::iterator cursor_;
    bool started_ = false;
    std::optional<Extent> pending_; // a data extent being cut into pieces
    std::uint64_t pending_next_ = 0;
    std::optional<FilePosition> pending_from_; // where pending_'s bytes start in their file
    detail::OrderedWorkers<Piece> workers_;    // last: joined before the rest is destroyed
};

/// Produces bytes on the calling thread when there are no workers.
class InlineProducer {
  public:
    Result<std::span<const std::byte>> decompress(const Image& image, const Extent& extent) {
        if (!decompressor_)
            decompressor_.emplace();
        return decompressor_->decompress(image, extent);
    }

    Result<std::span<const std::byte>> read(const FilePosition& position, std::size_t length) {
        buffer_.resize(kReadPieceBytes);
        auto out = std::span<std::byte>(buffer_).first(length);
        if (auto ok = detail::read_exactly(position, out); !ok)
            return std::move(ok).error();
        return std::span<const std::byte>(out);
    }

  private:
    std::optional<Decompressor> decompressor_;
    std::vector<std::byte> buffer_;
};

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
    std::size_t done = 0;
    while (done < out.size()) {
        const ssize_t n = ::pread(position.fd, out.data() + done, out.size() - done,
                                  static_cast<off_t>(position.offset + done));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return Error{ErrorCode::io_error,
                         fmt::format("cannot read {} bytes at file offset {:#x}: {}",
                                     out.size() - done, position.offset + done,
                                     std::strerror(errno))};
        }
        if (n == 0) {
            return Error{ErrorCode::io_error,
                         fmt::format("the file ends before offset {:#x}, inside its mapping "
                                     "(was it truncated while open?)",
                                     position.offset + done)};
        }
        done += static_cast<std::size_t>(n);
    }
    return {};
}

} // namespace detail

Result<void> Image::visit(std::uint64_t start, std::uint64_t end, const RunVisitor& visitor,
                          const VisitOptions& given) const {
    VisitOptions options = given;
    // More producers than this only add memory (4 jobs in flight per thread).
    options.threads = std::min(options.threads, kMaxProducerThreads);
    const bool threaded = options.threads > 1;
    ExtentRange extents = this->extents(start, end);
    std::optional<Prefetcher> prefetcher;
    InlineProducer inline_producer; // without threads, or when none could be started
    bool no_threads = !threaded;
    for (const Extent& extent : extents) {
        const auto read_from = read_source(options, extent);
        Run run = run_of(extent);
        if (extent.kind != ExtentKind::compressed && !read_from) {
            if (extent.kind == ExtentKind::data) {
                run.bytes = extent.bytes;
                run.file = extent.file;
                run.mapped = extent.file.has_value();
            }
            if (auto ok = visitor(run); !ok) {
                return ok;
            }
            continue;
        }
        if (!prefetcher && !no_threads) {
            try {
                prefetcher.emplace(*this, options, extent.offset, end);
                if (prefetcher->idle()) {
                    prefetcher.reset();
                    no_threads = true;
                }
            } catch (const std::exception&) {
                prefetcher.reset();
                no_threads = true;
            }
        }
        // A compressed cluster is one piece; a data run to read is cut into pieces.
        std::uint64_t piece = extent.offset;
        const std::uint64_t extent_end = extent.offset + extent.length;
        do {
            const std::uint64_t length =
                read_from ? std::min<std::uint64_t>(kReadPieceBytes, extent_end - piece)
                          : extent.length;
            std::optional<FilePosition> piece_file;
            if (read_from) {
                piece_file =
                    FilePosition{read_from->fd, read_from->offset + (piece - extent.offset)};
            }
            Result<std::span<const std::byte>> bytes = std::span<const std::byte>{};
            if (prefetcher) {
                bytes = prefetcher->next(extent, piece, length);
            } else if (read_from) {
                bytes = inline_producer.read(*piece_file, static_cast<std::size_t>(length));
            } else {
                bytes = inline_producer.decompress(*this, extent);
            }
            if (!bytes) {
                return std::move(bytes).error();
            }
            run.offset = piece;
            run.length = length;
            run.bytes = *bytes;
            run.file = piece_file;
            auto ok = visitor(run);
            if (prefetcher) {
                prefetcher->release();
            }
            if (!ok) {
                return ok;
            }
            piece += length;
        } while (piece < extent_end);
    }
    if (extents.error()) {
        return *extents.error();
    }
    return {};
}

} // namespace qcowmap

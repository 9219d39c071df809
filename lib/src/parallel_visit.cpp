// Ordered visits of the disk's byte runs, with bytes produced ahead on worker threads.
//
// The calling thread walks the extents and calls the visitor in order. Data runs come straight
// from the mapping (DataAccess::mapping) or are read with pread into buffers in pieces of
// kReadPieceBytes (DataAccess::read); compressed clusters are decompressed. With threads, the
// first extent whose bytes must be produced (a compressed cluster, or a data run to read)
// starts a second iterator from there that runs ahead, queueing every such piece into a
// bounded ring of jobs that workers fill. Both iterators walk the same extents in the same
// order and cut them into the same pieces, so the k-th piece the caller needs is the k-th job.
#include "image_state.hpp"

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <system_error>
#include <thread>
#include <unistd.h>
#include <vector>

namespace qcowmap {
namespace {

constexpr unsigned kMaxProducerThreads = 64;

/// Where a data extent's bytes are read from in DataAccess::read mode; nullopt when they come
/// straight from memory (mapping mode, or an image opened from memory).
std::optional<FilePosition> read_source(const Image& image, const VisitOptions& options,
                                        const Extent& extent) {
    if (options.data_access != DataAccess::read || extent.kind != ExtentKind::data) {
        return std::nullopt;
    }
    return image.file_position(extent.bytes);
}

/// One unit of produced bytes: a compressed cluster, or one piece of a data run to read.
struct Job {
    Extent extent;
    std::uint64_t piece_offset = 0; // virtual offset of the piece (== extent.offset if compressed)
    std::uint64_t piece_length = 0;
    std::optional<FilePosition> read_from; // set for data pieces
    std::vector<std::byte> buffer;
    std::optional<Error> error;
    enum class State { free, queued, working, done } state = State::free;
};

class Prefetcher {
  public:
    Prefetcher(const Image& image, const VisitOptions& options, std::uint64_t start,
               std::uint64_t end)
        : image_(image), options_(options), ahead_(image.extents(start, end)),
          jobs_(4 * static_cast<std::size_t>(options.threads)) {
        try {
            workers_.reserve(options.threads);
            for (unsigned i = 0; i < options.threads; ++i) {
                workers_.emplace_back([this] { work(); });
            }
        } catch (const std::exception&) {
            // Out of threads (or of memory for them): carry on with those we have; with none,
            // the caller produces the bytes on its own thread.
            if (workers_.empty()) {
                throw;
            }
        }
    }

    ~Prefetcher() {
        {
            std::lock_guard lock(mutex_);
            stopping_ = true;
        }
        changed_.notify_all();
        for (std::thread& worker : workers_) {
            worker.join();
        }
    }

    /// Waits for the next produced piece in disk order, which must start at `piece_offset`
    /// inside `expected`; the span lives until `release()`.
    Result<std::span<const std::byte>> next(const Extent& expected, std::uint64_t piece_offset,
                                            std::uint64_t piece_length) {
        top_up();
        Job& job = jobs_[consumed_ % jobs_.size()];
        std::unique_lock lock(mutex_);
        if (job.state == Job::State::free) {
            // The look-ahead iterator failed or ended before reaching this extent.
            return ahead_.failed() ? ahead_.error() : lost_place();
        }
        changed_.wait(lock, [&] { return job.state == Job::State::done; });
        if (job.extent.offset != expected.offset || job.piece_offset != piece_offset ||
            job.piece_length != piece_length ||
            job.extent.compressed_host_offset != expected.compressed_host_offset) {
            return lost_place();
        }
        if (job.error) {
            return *job.error;
        }
        if (job.read_from) {
            return std::span<const std::byte>(job.buffer).first(piece_length);
        }
        return std::span<const std::byte>(job.buffer)
            .subspan(expected.offset_in_cluster, expected.length);
    }

    void release() {
        {
            std::lock_guard lock(mutex_);
            jobs_[consumed_ % jobs_.size()].state = Job::State::free;
        }
        ++consumed_;
    }

  private:
    /// The two walks of the same metadata disagree: only a file changed under us does that.
    static Error lost_place() {
        return Error{ErrorCode::io_error, "image changed while being read (two walks of its "
                                          "metadata disagree)"};
    }

    // Queues the pieces the look-ahead iterator finds into free jobs.
    void top_up() {
        bool queued = false;
        while (queued_ < consumed_ + jobs_.size()) {
            if (!pending_) {
                Extent e;
                bool found = false;
                while (ahead_.next(e)) {
                    pending_from_ = read_source(image_, options_, e);
                    if (e.kind == ExtentKind::compressed || pending_from_) {
                        found = true;
                        break;
                    }
                }
                if (!found) {
                    break;
                }
                pending_ = e;
                pending_next_ = e.offset;
            }
            const Extent& e = *pending_;
            Job& job = jobs_[queued_ % jobs_.size()];
            // The job is free, so no worker touches it now.
            if (e.kind == ExtentKind::compressed) {
                // Layers of a chain may differ in cluster size.
                job.buffer.resize(detail::layer_at(detail_state(image_), e.depth)->cluster_size);
                job.piece_offset = e.offset;
                job.piece_length = e.length;
                job.read_from.reset();
                pending_.reset();
            } else {
                const std::uint64_t done = pending_next_ - e.offset;
                job.piece_offset = pending_next_;
                job.piece_length = std::min<std::uint64_t>(kReadPieceBytes, e.length - done);
                job.buffer.resize(kReadPieceBytes);
                job.read_from = FilePosition{pending_from_->fd, pending_from_->offset + done};
                pending_next_ += job.piece_length;
                if (pending_next_ == e.offset + e.length) {
                    pending_.reset();
                }
            }
            {
                std::lock_guard lock(mutex_);
                job.extent = e;
                job.error.reset();
                job.state = Job::State::queued;
            }
            ++queued_;
            queued = true;
        }
        if (queued) {
            changed_.notify_all();
        }
    }

    void work() {
        Decompressor decompressor;
        std::size_t scan = 0;
        std::unique_lock lock(mutex_);
        for (;;) {
            Job* job = nullptr;
            changed_.wait(lock, [&] {
                if (stopping_)
                    return true;
                for (std::size_t i = 0; i < jobs_.size(); ++i) {
                    Job& candidate = jobs_[(scan + i) % jobs_.size()];
                    if (candidate.state == Job::State::queued) {
                        job = &candidate;
                        scan = (scan + i + 1) % jobs_.size();
                        return true;
                    }
                }
                return false;
            });
            if (stopping_)
                return;
            job->state = Job::State::working;
            lock.unlock();
            Result<void> ok;
            try {
                ok = job->read_from
                         ? detail::read_exactly(
                               *job->read_from,
                               std::span<std::byte>(job->buffer).first(job->piece_length))
                         : decompressor.decompress_cluster(image_, job->extent, job->buffer);
            } catch (const std::exception& e) {
                // Out of memory building a message or a decoder: an error, not std::terminate.
                ok = Error{ErrorCode::io_error, e.what()};
            }
            lock.lock();
            if (!ok)
                job->error = std::move(ok).error();
            job->state = Job::State::done;
            changed_.notify_all();
        }
    }

    const Image& image_;
    const VisitOptions options_;
    ExtentIterator ahead_;
    std::vector<Job> jobs_;
    std::vector<std::thread> workers_;
    std::mutex mutex_;
    std::condition_variable changed_;
    std::optional<Extent> pending_; // a data extent being cut into pieces (caller thread only)
    std::uint64_t pending_next_ = 0;
    std::optional<FilePosition> pending_from_; // where pending_'s bytes start in their file
    std::uint64_t queued_ = 0;                 // jobs handed to workers (caller thread only)
    std::uint64_t consumed_ = 0;               // jobs handed to the visitor (caller thread only)
    bool stopping_ = false;
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

Result<void> Image::visit_runs_parallel(std::uint64_t start, std::uint64_t end, unsigned threads,
                                        const RunVisitor& visitor) const {
    return visit_runs(start, end, VisitOptions{threads, DataAccess::mapping}, visitor);
}

Result<void> Image::visit_runs(std::uint64_t start, std::uint64_t end, const VisitOptions& given,
                               const RunVisitor& visitor) const {
    VisitOptions options = given;
    // More producers than this only add memory (4 jobs in flight per thread).
    options.threads = std::min(options.threads, kMaxProducerThreads);
    const bool threaded = options.threads > 1;
    ExtentIterator it = extents(start, end);
    std::optional<Prefetcher> prefetcher;
    InlineProducer inline_producer; // without threads, or when none could be started
    bool no_threads = !threaded;
    Extent extent;
    while (it.next(extent)) {
        const auto read_from = read_source(*this, options, extent);
        if (extent.kind != ExtentKind::compressed && !read_from) {
            auto bytes =
                extent.kind == ExtentKind::data ? extent.bytes : std::span<const std::byte>{};
            if (auto ok = visitor(extent.offset, extent.length, bytes); !ok) {
                return ok;
            }
            continue;
        }
        if (!prefetcher && !no_threads) {
            try {
                prefetcher.emplace(*this, options, extent.offset, end);
            } catch (const std::exception&) {
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
            Result<std::span<const std::byte>> bytes = std::span<const std::byte>{};
            if (prefetcher) {
                bytes = prefetcher->next(extent, piece, length);
            } else if (read_from) {
                bytes = inline_producer.read(
                    FilePosition{read_from->fd, read_from->offset + (piece - extent.offset)},
                    static_cast<std::size_t>(length));
            } else {
                bytes = inline_producer.decompress(*this, extent);
            }
            if (!bytes) {
                return std::move(bytes).error();
            }
            auto ok = visitor(piece, length, *bytes);
            if (prefetcher) {
                prefetcher->release();
            }
            if (!ok) {
                return ok;
            }
            piece += length;
        } while (piece < extent_end);
    }
    if (it.failed()) {
        return it.error();
    }
    return {};
}

} // namespace qcowmap

// Ordered visit with compressed clusters decompressed ahead on worker threads.
//
// The calling thread walks the extents and calls the visitor in order. When it meets the first
// compressed extent it starts a second iterator from there that runs ahead, queueing the next
// compressed extents into a bounded ring of jobs; workers decompress each job into the job's
// own one-cluster buffer. Both iterators walk the same extents in the same order, so the k-th
// compressed extent the caller meets is the k-th job. Data and zero runs are never copied.
#include "image_state.hpp"

#include <algorithm>
#include <condition_variable>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

namespace qcowmap {
namespace {

constexpr unsigned kMaxDecompressionThreads = 64;

struct Job {
    Extent extent;
    std::vector<std::byte> cluster;
    std::optional<Error> error;
    enum class State { free, queued, working, done } state = State::free;
};

class Prefetcher {
  public:
    Prefetcher(const Image& image, std::uint64_t start, std::uint64_t end, unsigned threads)
        : image_(image), ahead_(image.extents(start, end)),
          jobs_(4 * static_cast<std::size_t>(threads)) {
        try {
            workers_.reserve(threads);
            for (unsigned i = 0; i < threads; ++i) {
                workers_.emplace_back([this] { work(); });
            }
        } catch (const std::exception&) {
            // Out of threads (or of memory for them): carry on with those we have; with none,
            // the caller decompresses on its own thread.
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

    /// Waits for the next compressed cluster in disk order; the span lives until `release()`.
    Result<std::span<const std::byte>> next(const Extent& expected) {
        top_up();
        Job& job = jobs_[consumed_ % jobs_.size()];
        std::unique_lock lock(mutex_);
        if (job.state == Job::State::free) {
            // The look-ahead iterator failed or ended before reaching this extent.
            return ahead_.failed() ? ahead_.error()
                                   : Error{ErrorCode::invalid_argument, "prefetch lost its place"};
        }
        changed_.wait(lock, [&] { return job.state == Job::State::done; });
        if (job.extent.offset != expected.offset ||
            job.extent.compressed_host_offset != expected.compressed_host_offset) {
            return Error{ErrorCode::invalid_argument, "prefetch lost its place"};
        }
        if (job.error) {
            return *job.error;
        }
        return std::span<const std::byte>(job.cluster).subspan(expected.offset_in_cluster,
                                                               expected.length);
    }

    void release() {
        {
            std::lock_guard lock(mutex_);
            jobs_[consumed_ % jobs_.size()].state = Job::State::free;
        }
        ++consumed_;
    }

  private:
    // Queues compressed extents from the look-ahead iterator into free jobs.
    void top_up() {
        bool queued = false;
        while (queued_ < consumed_ + jobs_.size()) {
            Extent e;
            bool found = false;
            while (ahead_.next(e)) {
                if (e.kind == ExtentKind::compressed) {
                    found = true;
                    break;
                }
            }
            if (!found) {
                break;
            }
            Job& job = jobs_[queued_ % jobs_.size()];
            // Layers of a chain may differ in cluster size; the job is free, so no worker
            // touches its buffer now.
            job.cluster.resize(detail::layer_at(detail_state(image_), e.depth)->cluster_size);
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
                if (stopping_) return true;
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
            if (stopping_) return;
            job->state = Job::State::working;
            lock.unlock();
            auto ok = decompressor.decompress_cluster(image_, job->extent, job->cluster);
            lock.lock();
            if (!ok) job->error = std::move(ok).error();
            job->state = Job::State::done;
            changed_.notify_all();
        }
    }

    const Image& image_;
    ExtentIterator ahead_;
    std::vector<Job> jobs_;
    std::vector<std::thread> workers_;
    std::mutex mutex_;
    std::condition_variable changed_;
    std::uint64_t queued_ = 0;   // jobs handed to workers (caller thread only)
    std::uint64_t consumed_ = 0; // jobs handed to the visitor (caller thread only)
    bool stopping_ = false;
};

} // namespace

Result<void> Image::visit_runs_parallel(std::uint64_t start, std::uint64_t end, unsigned threads,
                                        const RunVisitor& visitor) const {
    if (threads <= 1) {
        return visit_runs(start, end, visitor);
    }
    // More decompressors than this only add memory (4 clusters in flight per thread).
    threads = std::min(threads, kMaxDecompressionThreads);
    ExtentIterator it = extents(start, end);
    std::optional<Prefetcher> prefetcher;
    std::optional<Decompressor> single_threaded; // when no thread could be started
    Extent extent;
    while (it.next(extent)) {
        if (extent.kind != ExtentKind::compressed) {
            auto bytes = extent.kind == ExtentKind::data ? extent.bytes : std::span<const std::byte>{};
            if (auto ok = visitor(extent.offset, extent.length, bytes); !ok) {
                return ok;
            }
            continue;
        }
        if (!prefetcher && !single_threaded) {
            try {
                prefetcher.emplace(*this, extent.offset, end, threads);
            } catch (const std::exception&) {
                single_threaded.emplace();
            }
        }
        auto bytes = prefetcher ? prefetcher->next(extent) : single_threaded->decompress(*this, extent);
        if (!bytes) {
            return std::move(bytes).error();
        }
        auto ok = visitor(extent.offset, extent.length, *bytes);
        if (prefetcher) {
            prefetcher->release();
        }
        if (!ok) {
            return ok;
        }
    }
    if (it.failed()) {
        return it.error();
    }
    return {};
}

} // namespace qcowmap

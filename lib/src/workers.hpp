// The library's one worker primitive: an ordered ring of jobs served by a few threads. Read-ahead
// and decompression (Image::visit), block hashing (hash_blocks) and compare's second reader all
// use it, so there is one place that starts, feeds, drains and joins threads.
#pragma once

#include "fault.hpp"

#include <qcowmap/result.hpp>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <thread>
#include <vector>

#include <sched.h>

namespace qcowmap::detail {

/// The cores this process may run on (its affinity mask: taskset, cpusets), which may be fewer
/// than the machine has.
inline unsigned usable_cores() noexcept {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
        const int count = CPU_COUNT(&set);
        if (count > 0)
            return static_cast<unsigned>(count);
    }
    const unsigned cores = std::thread::hardware_concurrency();
    return cores == 0 ? 1 : cores;
}

/// The worker threads to start for an options struct's `threads`: as asked, 0 meaning one per
/// usable core, and never more than 64.
inline unsigned resolve_threads(unsigned threads) noexcept {
    return std::min(threads != 0 ? threads : usable_cores(), 64u);
}

/// A ring of `capacity` job slots served by up to `threads` worker threads.
///
/// One owner thread fills the next free slot (`next_slot()`), submits it, and later takes the
/// results back strictly in submission order (`front()`, `release()`); workers run jobs in
/// parallel, in any order. At most `capacity` jobs exist at once, so memory is bounded whatever
/// the amount of work. Each worker makes its own state once (`MakeWork` runs on the worker
/// thread: a Decompressor, a Hasher), so no mutable state is shared.
///
/// Exception policy: nothing reaches std::terminate. An exception thrown by a job (out of memory
/// building a buffer or a message) becomes that job's Error; a failure to make a worker's state
/// becomes the Error of every job that worker takes. Jobs run inside the fault boundary
/// (fault.hpp): a read of a mapping that faults becomes the job's io_error, which names the
/// file unless it is `fault_top`. The destructor stops and joins every
/// worker, also when the owner leaves by an exception or an early return.
///
/// Waiting spins briefly before sleeping, but only when the owner and every worker can each
/// have a core of their own: pieces are small (a 64 KiB cluster), and a futex wake-up per
/// piece costs more than the parallelism wins. With more threads than cores a spinning waiter
/// takes the core of the thread it waits for, and spinning made compare and hash slower
/// (bench/compare-qemu.sh).
template <typename Job> class OrderedWorkers {
  public:
    using Work = std::function<Result<void>(Job&)>;
    using MakeWork = std::function<Result<Work>()>;

    /// Starts up to `threads` workers over a ring of `capacity` (>= 1) slots. Starting fewer
    /// threads than asked (the system refuses more) is not an error; `started()` says how many
    /// run, and with none the owner must do the work itself.
    OrderedWorkers(unsigned threads, std::size_t capacity, MakeWork make_work,
                   std::filesystem::path fault_top = {})
        : slots_(capacity), make_work_(std::move(make_work)), fault_top_(std::move(fault_top)),
          spin_rounds_(threads + 1 <= usable_cores() ? kSpinRounds : 0) {
        workers_.reserve(threads);
        for (unsigned i = 0; i < threads; ++i) {
            try {
                workers_.emplace_back([this] { serve(); });
            } catch (const std::exception&) {
                break; // out of threads or memory: carry on with those we have
            }
        }
    }

    ~OrderedWorkers() {
        {
            std::lock_guard lock(mutex_);
            stopping_.store(true, std::memory_order_release);
        }
        work_available_.notify_all();
        for (std::thread& worker : workers_) {
            worker.join();
        }
    }

    OrderedWorkers(const OrderedWorkers&) = delete;
    OrderedWorkers& operator=(const OrderedWorkers&) = delete;

    /// Worker threads running.
    unsigned started() const { return static_cast<unsigned>(workers_.size()); }
    std::size_t capacity() const { return slots_.size(); }
    /// Jobs submitted and not yet released.
    std::size_t in_flight() const { return static_cast<std::size_t>(submitted_ - released_); }
    bool full() const { return in_flight() == slots_.size(); }
    bool empty() const { return in_flight() == 0; }

    /// The slot the next `submit()` hands to the workers; only valid when `!full()`. No worker
    /// touches it until it is submitted.
    Job& next_slot() { return slots_[submitted_ % slots_.size()].job; }

    /// Hands the slot filled through `next_slot()` to the workers.
    void submit() {
        Slot& slot = slots_[submitted_ % slots_.size()];
        slot.error.reset();
        {
            std::lock_guard lock(mutex_);
            slot.state.store(State::queued, std::memory_order_release);
            submitted_shared_.store(submitted_ + 1, std::memory_order_release);
        }
        ++submitted_;
        work_available_.notify_one();
    }

    /// Waits for the oldest job not yet released and returns it, or its error. The job stays
    /// the owner's until `release()`. Only valid when `!empty()`.
    Result<Job*> front() {
        Slot& slot = slots_[released_ % slots_.size()];
        wait_until(job_done_,
                   [&] { return slot.state.load(std::memory_order_acquire) == State::done; });
        if (slot.error) {
            return *slot.error;
        }
        return &slot.job;
    }

    /// Frees the oldest job's slot for reuse.
    void release() {
        slots_[released_ % slots_.size()].state.store(State::free, std::memory_order_release);
        ++released_;
    }

  private:
    enum class State : std::uint8_t { free, queued, working, done };
    struct Slot {
        Job job{};
        std::optional<Error> error;
        std::atomic<State> state{State::free};
    };

    /// A few thousand `pause`s (tens to hundreds of microseconds, by CPU): about as long as a
    /// cluster's decompression or a window's read.
    static constexpr int kSpinRounds = 4000;

    template <typename Ready> void wait_until(std::condition_variable& signal, Ready ready) {
        for (int i = 0; i < spin_rounds_; ++i) {
            if (ready())
                return;
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
        }
        std::unique_lock lock(mutex_);
        signal.wait(lock, [&] { return ready(); });
    }

    /// Short enough for std::string's in-place buffer: building it allocates nothing, so it can
    /// be made where memory has just run out (a new thread's first malloc can fail under
    /// `ulimit -v` when glibc cannot map the thread's arena).
    static Error out_of_memory() noexcept {
        Error error{ErrorCode::io_error, "out of memory"};
        error.refusal = Refusal::out_of_memory;
        return error;
    }

    static Error error_of(std::exception_ptr failure) noexcept {
        try {
            std::rethrow_exception(failure);
        } catch (const std::bad_alloc&) {
            return out_of_memory();
        } catch (const std::exception& e) {
            try {
                return Error{ErrorCode::io_error, e.what()};
            } catch (...) {
                return out_of_memory();
            }
        } catch (...) {
            return Error{ErrorCode::io_error, "unknown error"};
        }
    }

    void serve() {
        std::optional<Work> work;
        std::optional<Error> make_error;
        try {
            auto made = make_work_();
            if (made) {
                work.emplace(std::move(*made));
            } else {
                make_error = std::move(made).error();
            }
        } catch (...) {
            make_error = error_of(std::current_exception());
        }
        for (;;) {
            // Claim the next submitted job, in submission order.
            wait_until(work_available_, [&] {
                return stopping_.load(std::memory_order_acquire) ||
                       claimed_.load(std::memory_order_acquire) <
                           submitted_shared_.load(std::memory_order_acquire);
            });
            std::uint64_t number = 0;
            {
                std::lock_guard lock(mutex_);
                if (stopping_.load(std::memory_order_acquire))
                    return;
                number = claimed_.load(std::memory_order_relaxed);
                if (number >= submitted_shared_.load(std::memory_order_relaxed))
                    continue; // another worker took it
                claimed_.store(number + 1, std::memory_order_release);
            }
            Slot& slot = slots_[number % slots_.size()];
            slot.state.store(State::working, std::memory_order_release);
            std::optional<Error> error;
            // A job that ran while another thread's fault made part of a mapping read as zeros
            // (another worker's job further on, as a rule) runs once more: jobs only produce
            // bytes into their slot, so they can, and its bytes are then its own.
            for (int attempt = 0; attempt < kFaultRetries; ++attempt) {
                error.reset();
                if (attempt > 0)
                    wait_for_faults_to_settle();
                try {
                    FaultBoundary boundary;
                    if (!work) {
                        error = make_error; // copying its message may itself run out of memory
                    } else if (auto ok = (*work)(slot.job); !ok) {
                        error = std::move(ok).error();
                    }
                    if (auto fault = boundary.finish(fault_top_)) {
                        if (!boundary.own_fault() && attempt + 1 < kFaultRetries && work)
                            continue;
                        if (!error || boundary.own_fault())
                            error = std::move(fault);
                    }
                } catch (...) {
                    error = error_of(std::current_exception());
                }
                break;
            }
            slot.error = std::move(error);
            {
                std::lock_guard lock(mutex_);
                slot.state.store(State::done, std::memory_order_release);
            }
            job_done_.notify_one(); // only the owner waits for jobs to finish
        }
    }

    std::vector<Slot> slots_;
    MakeWork make_work_;
    const std::filesystem::path fault_top_;
    const int spin_rounds_; // set before any worker starts
    std::vector<std::thread> workers_;
    std::mutex mutex_;
    std::condition_variable work_available_; // workers wait here
    std::condition_variable job_done_;       // the owner waits here
    std::atomic<bool> stopping_{false};
    std::atomic<std::uint64_t> submitted_shared_{0}; // what workers may claim
    std::atomic<std::uint64_t> claimed_{0};
    std::uint64_t submitted_ = 0; // owner thread only
    std::uint64_t released_ = 0;  // owner thread only
};

} // namespace qcowmap::detail

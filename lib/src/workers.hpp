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
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <thread>
#include <utility>
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

/// A ring of `capacity` job slots served by up to `threads` worker threads and by the owner.
///
/// One owner thread fills the next free slot (`next_slot()`), submits it, and later takes the
/// results back strictly in submission order (`front()`, `release()`); workers run jobs in
/// parallel, in any order. At most `capacity` jobs exist at once, so memory is bounded whatever
/// the amount of work. Each thread that runs jobs makes its own state once (`MakeWork` runs on
/// that thread: a Decompressor, a Hasher), so no mutable state is shared.
///
/// The owner runs jobs too: when `front()` finds the oldest job not yet claimed by any worker
/// (every worker asleep or busy waking up), the owner claims it, as a worker would, and runs
/// it on its own thread with its own state (made on the owner's thread the first time it is
/// needed) instead of waking a worker and sleeping until that worker is done. So the ring
/// makes progress even with no worker at all (`started() == 0`).
///
/// Wake-ups: a worker that finds nothing to claim sleeps, and the owner wakes one only when
/// that buys several jobs -- when a submit leaves at least half the ring unclaimed, or when the
/// owner itself is about to run the front job or to wait for it and jobs behind it wait
/// unclaimed -- never once per job. A futex wake-up per small job (a 64 KiB cluster to
/// decompress, a 256 KiB piece to read) cost more than the parallelism won on 2 cores.
///
/// Exception policy: nothing reaches std::terminate. An exception thrown by a job (out of memory
/// building a buffer or a message) becomes that job's Error; a failure to make a thread's state
/// becomes the Error of every job that thread takes. Jobs run inside the fault boundary
/// (fault.hpp), on the owner too: a read of a mapping that faults becomes the job's io_error,
/// which names the file unless it is `fault_top`. The destructor stops and joins every
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
    /// run, and with none `front()` runs every job on the owner's thread.
    OrderedWorkers(unsigned threads, std::size_t capacity, MakeWork make_work,
                   std::filesystem::path fault_top = {})
        : slots_(capacity), make_work_(std::move(make_work)), fault_top_(std::move(fault_top)),
          spin_rounds_(threads + 1 <= usable_cores() ? kSpinRounds : 0),
          wake_batch_(std::max<std::size_t>(1, (capacity + 1) / 2)) {
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

    /// For a Work that carries state from one job to the next (one digest stream, one worker):
    /// the owner never runs a job while a worker runs, so every job runs with the same Work.
    /// (With no worker started, the owner runs them all, with its one Work.) Call before the
    /// first `front()`.
    void keep_jobs_on_workers() { owner_runs_ = workers_.empty(); }

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

    /// Hands the slot filled through `next_slot()` to the workers. Wakes a sleeping worker only
    /// when at least half the ring waits unclaimed (a worker awake claims it anyway; the owner
    /// runs the front job itself when it gets there first).
    void submit() {
        Slot& slot = slots_[submitted_ % slots_.size()];
        slot.error.reset();
        bool wake = false;
        {
            std::lock_guard lock(mutex_);
            slot.state.store(State::queued, std::memory_order_release);
            submitted_shared_.store(submitted_ + 1, std::memory_order_release);
            wake = take_sleeper_locked(submitted_ + 1, wake_batch_);
        }
        ++submitted_;
        if (wake)
            work_available_.notify_one();
    }

    /// Returns the oldest job not yet released, or its error, once it has run: on the owner's
    /// thread, here, when no worker has claimed it yet; else waits for the worker running it.
    /// The job stays the owner's until `release()`. Only valid when `!empty()`.
    Result<Job*> front() {
        Slot& slot = slots_[released_ % slots_.size()];
        if (slot.state.load(std::memory_order_acquire) != State::done) {
            bool mine = false;
            bool wake = false;
            {
                std::lock_guard lock(mutex_);
                // Workers claim strictly in submission order, and every job before this one
                // is released: none is claimed when the next number to claim is this one's.
                if (owner_runs_ && released_ < submitted_ &&
                    claimed_.load(std::memory_order_relaxed) == released_) {
                    claimed_.store(released_ + 1, std::memory_order_release);
                    mine = true;
                }
                // The jobs behind it are for a sleeping worker: enough of them to be worth a
                // wake-up while the owner runs this one, or any while it waits for a worker.
                wake = take_sleeper_locked(submitted_, mine ? wake_batch_ : 1);
            }
            if (wake)
                work_available_.notify_one();
            if (mine) {
                run_on_owner(slot);
            } else {
                wait_until(job_done_, [&] {
                    return slot.state.load(std::memory_order_acquire) == State::done;
                });
            }
        }
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

    /// A thread's state for running jobs: its Work, or why it could not be made.
    struct Runner {
        std::optional<Work> work;
        std::optional<Error> make_error;
    };

    /// A few thousand `pause`s (tens to hundreds of microseconds, by CPU): about as long as a
    /// cluster's decompression or a window's read.
    static constexpr int kSpinRounds = 4000;

    static void pause() noexcept {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
    }

    template <typename Ready> void wait_until(std::condition_variable& signal, Ready ready) {
        for (int i = 0; i < spin_rounds_; ++i) {
            if (ready())
                return;
            pause();
        }
        std::unique_lock lock(mutex_);
        signal.wait(lock, [&] { return ready(); });
    }

    /// Under `mutex_`: whether to wake a sleeping worker for the jobs of [claimed_, submitted)
    /// -- when there are at least `batch` of them and a worker sleeps that no wake-up is on its
    /// way to yet. Counts the wake-up as on its way.
    bool take_sleeper_locked(std::uint64_t submitted, std::size_t batch) {
        if (sleepers_ <= waking_)
            return false;
        if (submitted - claimed_.load(std::memory_order_relaxed) < batch)
            return false;
        ++waking_;
        return true;
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

    /// Makes the calling thread's state for running jobs (MakeWork on this thread).
    void make_runner(Runner& runner) noexcept {
        try {
            auto made = make_work_();
            if (made) {
                runner.work.emplace(std::move(*made));
            } else {
                runner.make_error = std::move(made).error();
            }
        } catch (...) {
            runner.make_error = error_of(std::current_exception());
        }
    }

    /// Runs the job of `slot`, claimed by this thread, and leaves its error (if any) in the
    /// slot. The caller is outside any fault boundary (a worker; the owner suspends its own).
    void run_job(Slot& slot, const Runner& runner) noexcept {
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
                if (!runner.work) {
                    error = runner.make_error; // copying its message may itself run out of memory
                } else if (auto ok = (*runner.work)(slot.job); !ok) {
                    error = std::move(ok).error();
                }
                if (auto fault = boundary.finish(fault_top_)) {
                    if (!boundary.own_fault() && attempt + 1 < kFaultRetries && runner.work)
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
    }

    /// Runs the front job on the owner's thread, as a worker would run it. The owner may be
    /// inside a fault boundary of its own (the walk that feeds the ring): the job gets a
    /// boundary of its own, outermost as on a worker, and the owner's fault state is put back
    /// afterwards as if another thread had run the job -- a fault of the job is the job's
    /// error, and the owner's boundary sees it as another thread's.
    void run_on_owner(Slot& slot) noexcept {
        if (!owner_runner_) {
            owner_runner_.emplace(); // two empty optionals: allocates nothing
            make_runner(*owner_runner_);
        }
        const std::uintptr_t pending = std::exchange(t_fault_address, 0);
        const std::uint64_t own_events = t_fault_own_events;
        {
            FaultBoundarySuspended owners_boundary;
            run_job(slot, *owner_runner_);
        }
        t_fault_own_events = own_events;
        t_fault_address = pending;
        slot.state.store(State::done, std::memory_order_release);
    }

    void serve() {
        Runner runner;
        make_runner(runner);
        for (;;) {
            // Claim the next submitted job, in submission order.
            auto ready = [&] {
                return stopping_.load(std::memory_order_acquire) ||
                       claimed_.load(std::memory_order_acquire) <
                           submitted_shared_.load(std::memory_order_acquire);
            };
            for (int i = 0; i < spin_rounds_ && !ready(); ++i)
                pause();
            std::uint64_t number = 0;
            {
                std::unique_lock lock(mutex_);
                while (!ready()) {
                    ++sleepers_;
                    work_available_.wait(lock);
                    --sleepers_;
                    if (waking_ > 0)
                        --waking_;
                }
                if (stopping_.load(std::memory_order_acquire))
                    return;
                number = claimed_.load(std::memory_order_relaxed);
                claimed_.store(number + 1, std::memory_order_release);
            }
            Slot& slot = slots_[number % slots_.size()];
            run_job(slot, runner);
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
    const int spin_rounds_;        // set before any worker starts
    const std::size_t wake_batch_; // unclaimed jobs that are worth waking a worker for
    std::vector<std::thread> workers_;
    std::optional<Runner> owner_runner_; // the owner's state, made when it first runs a job
    bool owner_runs_ = true;             // owner thread only
    std::mutex mutex_;
    std::condition_variable work_available_; // workers wait here
    std::condition_variable job_done_;       // the owner waits here
    std::atomic<bool> stopping_{false};
    std::atomic<std::uint64_t> submitted_shared_{0}; // what workers may claim
    std::atomic<std::uint64_t> claimed_{0};
    unsigned sleepers_ = 0;       // under mutex_: workers waiting on work_available_
    unsigned waking_ = 0;         // under mutex_: of those, notified and not yet running
    std::uint64_t submitted_ = 0; // owner thread only
    std::uint64_t released_ = 0;  // owner thread only
};

} // namespace qcowmap::detail

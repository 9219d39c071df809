// The public API's shape: the walks are C++20 input ranges that compose with views
// and report their error after the loop; one visit whose runs carry their file positions; the
// version header; and the one worker primitive's exception policy — errors and exceptions from
// visitors, sinks and workers come back to the caller, never reach std::terminate, and leave no
// thread behind (run under ASan and TSan by scripts/test.sh).
#include "support.hpp"
#include "workers.hpp"

#include <qcowmap/bitmap.hpp>
#include <qcowmap/hash.hpp>
#include <qcowmap/image.hpp>
#include <qcowmap/version.hpp>

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <latch>
#include <map>
#include <mutex>
#include <ranges>
#include <stdexcept>
#include <thread>
#include <utility>
#include <vector>

namespace qcowmap {
namespace {

namespace fs = std::filesystem;
using test::run_ok;
using test::shell_quote;

static_assert(std::ranges::input_range<ExtentRange>);
static_assert(std::ranges::input_range<BitmapRanges>);
static_assert(std::ranges::input_range<DirtyExtentRange>);
static_assert(std::is_same_v<std::ranges::range_value_t<ExtentRange>, Extent>);
static_assert(std::is_same_v<std::ranges::range_reference_t<ExtentRange>, const Extent&>);
static_assert(std::movable<ExtentRange>);

/// A 4 MiB image: data, zeros, compressed clusters and unallocated ranges, with a bitmap.
class ApiImage : public ::testing::Test {
  protected:
    static void SetUpTestSuite() {
        dir_ = new test::TempDir();
        path_ = *dir_ / "api.qcow2";
        test::make_image(path_, "cluster_size=64k", "4M",
                         {"write -P 0x11 0 192k", "write -c -P 0x22 1M 64k",
                          "write -c -P 0x23 1088k 64k", "write -z 2M 64k",
                          "write -P 0x33 3M 128k"});
        run_ok("qemu-img bitmap --add " + shell_quote(path_.string()) + " daily");
        run_ok("qemu-io -c 'write -P 0x44 64k 64k' -c 'write -c -P 0x45 3200k 64k' " +
               shell_quote(path_.string()));
    }
    static void TearDownTestSuite() {
        delete dir_;
        dir_ = nullptr;
    }
    void SetUp() override {
        auto image = Image::open(path_);
        ASSERT_TRUE(image) << image.error().message;
        image_.emplace(std::move(*image));
    }

    static test::TempDir* dir_;
    static fs::path path_;
    std::optional<Image> image_;
};
test::TempDir* ApiImage::dir_ = nullptr;
fs::path ApiImage::path_;

TEST_F(ApiImage, ExtentsAreARangeThatViewsCompose) {
    auto extents = image_->extents();
    std::uint64_t covered = 0, data = 0;
    int compressed = 0;
    for (const Extent& e : extents) {
        EXPECT_EQ(e.offset, covered);
        covered += e.length;
        data += e.kind == ExtentKind::data ? e.length : 0;
        compressed += e.kind == ExtentKind::compressed;
    }
    EXPECT_FALSE(extents.error());
    EXPECT_EQ(covered, image_->size());
    EXPECT_EQ(data, (192u + 128u) * 1024);
    EXPECT_EQ(compressed, 3);

    // A filtered view over part of the disk sees the same extents the loop above saw there.
    auto part = image_->extents(0, image_->size() / 2);
    auto not_zero =
        part | std::views::filter([](const Extent& e) { return e.kind != ExtentKind::zero; });
    std::vector<std::uint64_t> starts;
    for (const Extent& e : not_zero)
        starts.push_back(e.offset);
    EXPECT_FALSE(part.error());
    EXPECT_EQ(starts, (std::vector<std::uint64_t>{0, 1u << 20, (1u << 20) + (64u << 10)}));

    // An rvalue range composes too (owned by the view), and transform works on it.
    std::uint64_t lengths = 0;
    for (std::uint64_t length : image_->extents(3u << 20) |
                                    std::views::transform([](const Extent& e) { return e.length; }))
        lengths += length;
    EXPECT_EQ(lengths, image_->size() - (3u << 20));
}

TEST_F(ApiImage, ARangeIsSinglePassAndBeginDoesNotRestart) {
    auto extents = image_->extents();
    auto first = extents.begin();
    ASSERT_NE(first, std::default_sentinel);
    const std::uint64_t first_length = first->length;
    ++first;
    ASSERT_NE(first, std::default_sentinel);
    // begin() again continues where the walk is, like istream_view.
    EXPECT_EQ(extents.begin()->offset, first_length);
}

TEST_F(ApiImage, ToStringNamesExtentKinds) {
    EXPECT_EQ(to_string(ExtentKind::data), "data");
    EXPECT_EQ(to_string(ExtentKind::zero), "zero");
    EXPECT_EQ(to_string(ExtentKind::compressed), "compressed");
}

TEST(Version, HeaderLibraryAndCliAgree) {
    EXPECT_EQ(version(), QCOWMAP_VERSION);
    EXPECT_EQ(std::to_string(QCOWMAP_VERSION_MAJOR) + "." + std::to_string(QCOWMAP_VERSION_MINOR) +
                  "." + std::to_string(QCOWMAP_VERSION_PATCH),
              QCOWMAP_VERSION);
    EXPECT_EQ(run_ok(shell_quote(test::qcowmap_bin()) + " --version"),
              std::string("qcowmap ") + QCOWMAP_VERSION + "\n");
}

TEST_F(ApiImage, BitmapWalksAreRanges) {
    auto bitmap = DirtyBitmap::open(*image_, "daily");
    ASSERT_TRUE(bitmap) << bitmap.error().message;
    std::vector<std::pair<std::uint64_t, std::uint64_t>> dirty;
    for (const BitmapRange& r : bitmap->dirty_ranges())
        dirty.emplace_back(r.offset, r.length);
    const std::uint64_t granule = bitmap->granularity();
    ASSERT_EQ(dirty.size(), 2u);
    EXPECT_EQ(dirty[0].first, 64u << 10);
    EXPECT_EQ(dirty[1].first, 3200u << 10);
    EXPECT_EQ(dirty[0].second % granule, 0u);

    auto extents = bitmap->dirty_extents();
    std::uint64_t covered = 0;
    for (const Extent& e : extents | std::views::filter([](const Extent& e) {
                               return e.kind == ExtentKind::compressed;
                           }))
        covered += e.length;
    EXPECT_FALSE(extents.error());
    EXPECT_EQ(covered, 64u << 10); // the compressed cluster written after the bitmap
}

TEST_F(ApiImage, VisitRunsCarryTheirFilePositions) {
    for (DataAccess access : {DataAccess::mapping, DataAccess::read}) {
        for (unsigned threads : {1u, 3u}) {
            SCOPED_TRACE(testing::Message() << "read mode " << (access == DataAccess::read) << ", "
                                            << threads << " threads");
            std::uint64_t covered = 0, data = 0;
            auto ok = image_->visit(
                0, UINT64_MAX,
                [&](const qcowmap::Run& run) -> Result<void> {
                    EXPECT_EQ(run.offset, covered);
                    covered += run.length;
                    if (run.kind == ExtentKind::data) {
                        data += run.length;
                        EXPECT_TRUE(run.file);
                        EXPECT_EQ(run.mapped, access == DataAccess::mapping);
                    } else {
                        EXPECT_FALSE(run.file);
                        EXPECT_FALSE(run.mapped);
                    }
                    return {};
                },
                VisitOptions{threads, access});
            ASSERT_TRUE(ok) << ok.error().message;
            EXPECT_EQ(covered, image_->size());
            EXPECT_EQ(data, (192u + 128u) * 1024);
        }
    }
}

// A visitor that returns an error or throws stops the walk on every path (inline, read-ahead
// workers, decompression workers); the exception reaches the caller and the workers are joined.
TEST_F(ApiImage, VisitorErrorsAndExceptionsReachTheCaller) {
    for (DataAccess access : {DataAccess::mapping, DataAccess::read}) {
        for (unsigned threads : {1u, 2u, 4u}) {
            for (int stop_at : {0, 1, 3, 5}) {
                SCOPED_TRACE(testing::Message() << threads << " threads, stop at run " << stop_at);
                int calls = 0;
                auto failing = [&](const qcowmap::Run&) -> Result<void> {
                    if (calls++ == stop_at)
                        return Error{ErrorCode::io_error, "visitor says stop"};
                    return {};
                };
                auto ok = image_->visit(0, UINT64_MAX, failing, VisitOptions{threads, access});
                ASSERT_FALSE(ok);
                EXPECT_EQ(ok.error().message, "visitor says stop");
                EXPECT_EQ(calls, stop_at + 1);

                calls = 0;
                auto throwing = [&](const qcowmap::Run&) -> Result<void> {
                    if (calls++ == stop_at)
                        throw std::runtime_error("visitor throws");
                    return {};
                };
                EXPECT_THROW(
                    (void)image_->visit(0, UINT64_MAX, throwing, VisitOptions{threads, access}),
                    std::runtime_error);
            }
        }
    }
}

TEST_F(ApiImage, HashBlockSinkErrorsAndExceptionsReachTheCaller) {
    for (unsigned threads : {1u, 2u, 4u}) {
        SCOPED_TRACE(testing::Message() << threads << " threads");
        BlockHashOptions options;
        options.block_size = 4096;
        options.threads = threads;
        int blocks = 0;
        auto ok = hash_blocks(*image_, options, [&](const BlockDigest&) -> Result<void> {
            if (++blocks == 700)
                return Error{ErrorCode::io_error, "sink says stop"};
            return {};
        });
        ASSERT_FALSE(ok);
        EXPECT_EQ(ok.error().message, "sink says stop");
        EXPECT_EQ(blocks, 700);
        // A defect once: a throwing sink left hashing threads unjoined.
        blocks = 0;
        EXPECT_THROW((void)hash_blocks(*image_, options,
                                       [&](const BlockDigest&) -> Result<void> {
                                           if (++blocks == 700)
                                               throw std::runtime_error("sink throws");
                                           return {};
                                       }),
                     std::runtime_error);
    }
}

// The primitive itself: results in submission order, job errors and exceptions as Errors, a
// worker whose state cannot be made fails its jobs, and leaving with jobs in flight joins.
TEST(OrderedWorkers, ResultsComeBackInOrderWithErrorsAndExceptions) {
    struct Job {
        int number = 0;
        int result = 0;
    };
    detail::OrderedWorkers<Job> workers(3, 5, []() -> Result<detail::OrderedWorkers<Job>::Work> {
        return detail::OrderedWorkers<Job>::Work([](Job& job) -> Result<void> {
            // Later jobs finish first: order must come from the ring, not from timing.
            std::this_thread::sleep_for(std::chrono::microseconds(50 * (7 - job.number % 7)));
            if (job.number % 10 == 4)
                return Error{ErrorCode::invalid_argument, "job " + std::to_string(job.number)};
            if (job.number % 10 == 7)
                throw std::runtime_error("job " + std::to_string(job.number) + " threw");
            job.result = job.number * job.number;
            return {};
        });
    });
    ASSERT_EQ(workers.started(), 3u);
    int submitted = 0;
    for (int taken = 0; taken < 40; ++taken) {
        while (submitted < 40 && !workers.full()) {
            workers.next_slot().number = submitted++;
            workers.submit();
        }
        EXPECT_LE(workers.in_flight(), 5u);
        auto job = workers.front();
        if (taken % 10 == 4) {
            ASSERT_FALSE(job);
            EXPECT_EQ(job.error().code, ErrorCode::invalid_argument);
            EXPECT_EQ(job.error().message, "job " + std::to_string(taken));
        } else if (taken % 10 == 7) {
            ASSERT_FALSE(job);
            EXPECT_EQ(job.error().code, ErrorCode::io_error);
            EXPECT_EQ(job.error().message, "job " + std::to_string(taken) + " threw");
        } else {
            ASSERT_TRUE(job) << job.error().message;
            EXPECT_EQ((*job)->number, taken);
            EXPECT_EQ((*job)->result, taken * taken);
        }
        workers.release();
    }
    EXPECT_TRUE(workers.empty());
}

TEST(OrderedWorkers, AWorkerWithoutStateFailsItsJobs) {
    struct Job {
        int value = 0;
    };
    detail::OrderedWorkers<Job> workers(2, 2, []() -> Result<detail::OrderedWorkers<Job>::Work> {
        return Error{ErrorCode::io_error, "no decoder for this worker"};
    });
    workers.next_slot().value = 1;
    workers.submit();
    auto job = workers.front();
    ASSERT_FALSE(job);
    EXPECT_EQ(job.error().message, "no decoder for this worker");
    workers.release();
}

// Every worker count (0: the owner runs every job) and ring size: results in submission order,
// an error or an exception of one job is that job's Error only, and the owner takes results
// back at every fill level (a full ring, or one job at a time).
TEST(OrderedWorkers, ResultsInOrderForEveryWorkerCountAndRingSize) {
    struct Job {
        int number = 0;
        long result = 0;
    };
    using Workers = detail::OrderedWorkers<Job>;
    constexpr int kJobs = 300;
    for (unsigned threads : {0u, 1u, 2u, 4u}) {
        for (std::size_t capacity = 1; capacity <= 8; ++capacity) {
            SCOPED_TRACE("threads " + std::to_string(threads) + ", capacity " +
                         std::to_string(capacity));
            Workers workers(threads, capacity, []() -> Result<Workers::Work> {
                return Workers::Work([](Job& job) -> Result<void> {
                    // Uneven jobs, without any clock: some yield a while.
                    for (int i = 0; i < job.number % 5; ++i)
                        std::this_thread::yield();
                    if (job.number % 13 == 6)
                        return Error{ErrorCode::invalid_argument,
                                     "job " + std::to_string(job.number)};
                    if (job.number % 17 == 9)
                        throw std::runtime_error("job " + std::to_string(job.number) + " threw");
                    job.result = 3L * job.number + 1;
                    return {};
                });
            });
            ASSERT_EQ(workers.started(), threads);
            int submitted = 0;
            for (int taken = 0; taken < kJobs; ++taken) {
                // Every third round tops up to full; the others submit one at most.
                const bool fill = taken % 3 == 0;
                while (submitted < kJobs && !workers.full()) {
                    workers.next_slot().number = submitted++;
                    workers.submit();
                    if (!fill)
                        break;
                }
                ASSERT_FALSE(workers.empty());
                ASSERT_LE(workers.in_flight(), capacity);
                auto job = workers.front();
                if (taken % 13 == 6) {
                    ASSERT_FALSE(job);
                    EXPECT_EQ(job.error().code, ErrorCode::invalid_argument);
                    EXPECT_EQ(job.error().message, "job " + std::to_string(taken));
                } else if (taken % 17 == 9) {
                    ASSERT_FALSE(job);
                    EXPECT_EQ(job.error().code, ErrorCode::io_error);
                    EXPECT_EQ(job.error().message, "job " + std::to_string(taken) + " threw");
                } else {
                    ASSERT_TRUE(job) << job.error().message;
                    EXPECT_EQ((*job)->number, taken);
                    EXPECT_EQ((*job)->result, 3L * taken + 1);
                }
                workers.release();
            }
            EXPECT_EQ(submitted, kJobs);
            EXPECT_TRUE(workers.empty());
        }
    }
}

// A worker that cannot start on its jobs (its state takes long to make: here it waits for the
// owner) does not hold the owner up: the owner claims the front job itself, runs it on its own
// thread with its own state (made once, there), and the worker joins in once it is ready.
TEST(OrderedWorkers, TheOwnerRunsTheFrontJobWhenNoWorkerHasClaimedIt) {
    struct Job {
        int number = 0;
        std::thread::id ran_on;
    };
    using Workers = detail::OrderedWorkers<Job>;
    const std::thread::id owner = std::this_thread::get_id();
    // Opened once the owner has taken kOwnerFirst jobs back, and in any case before the ring
    // joins its worker (an early return of a failed assertion).
    struct Gate {
        std::latch latch{1};
        bool opened = false;
        void open() {
            if (!std::exchange(opened, true))
                latch.count_down();
        }
    } worker_may_start;
    std::mutex made_mutex;
    std::map<std::thread::id, int> made; // MakeWork calls per thread
    constexpr int kJobs = 64;
    constexpr int kOwnerFirst = 12; // jobs the owner takes back before the worker may start
    std::vector<std::thread::id> ran_on;
    {
        Workers workers(1, 4, [&]() -> Result<Workers::Work> {
            {
                std::lock_guard lock(made_mutex);
                ++made[std::this_thread::get_id()];
            }
            if (std::this_thread::get_id() != owner)
                worker_may_start.latch.wait();
            return Workers::Work([](Job& job) -> Result<void> {
                job.ran_on = std::this_thread::get_id();
                return {};
            });
        });
        struct OpenOnExit {
            Gate& gate;
            ~OpenOnExit() { gate.open(); }
        } open_on_exit{worker_may_start};
        ASSERT_EQ(workers.started(), 1u);
        int submitted = 0;
        for (int taken = 0; taken < kJobs; ++taken) {
            if (taken == kOwnerFirst)
                worker_may_start.open();
            while (submitted < kJobs && !workers.full()) {
                workers.next_slot().number = submitted++;
                workers.submit();
            }
            auto job = workers.front();
            ASSERT_TRUE(job) << job.error().message;
            ASSERT_EQ((*job)->number, taken);
            ran_on.push_back((*job)->ran_on);
            workers.release();
        }
    }
    // The worker could claim nothing before it was let go: the first jobs ran on the owner.
    ASSERT_EQ(ran_on.size(), static_cast<std::size_t>(kJobs));
    for (int i = 0; i < kOwnerFirst; ++i)
        EXPECT_EQ(ran_on[i], owner) << "job " << i;
    // Each thread made its state once: the owner (lazily, on its first job) and the worker.
    std::lock_guard lock(made_mutex);
    ASSERT_EQ(made.size(), 2u);
    EXPECT_EQ(made.at(owner), 1);
    for (const auto& [thread, count] : made)
        EXPECT_EQ(count, 1);
}

// A Work that carries state from job to job (one digest stream): with keep_jobs_on_workers()
// every job runs on the one worker, with the one Work, even when the owner waits for them;
// with no worker started the owner runs them all, with its one Work.
TEST(OrderedWorkers, KeptOnWorkersEveryJobRunsWithTheSameWork) {
    struct Job {
        int number = 0;
        long running_sum = 0;
        std::thread::id ran_on;
    };
    using Workers = detail::OrderedWorkers<Job>;
    const std::thread::id owner = std::this_thread::get_id();
    for (unsigned threads : {0u, 1u}) {
        SCOPED_TRACE("threads " + std::to_string(threads));
        std::atomic<int> made{0};
        Workers workers(threads, 4, [&]() -> Result<Workers::Work> {
            ++made;
            auto sum = std::make_shared<long>(0);
            return Workers::Work([sum](Job& job) -> Result<void> {
                *sum += job.number;
                job.running_sum = *sum;
                job.ran_on = std::this_thread::get_id();
                return {};
            });
        });
        workers.keep_jobs_on_workers();
        ASSERT_EQ(workers.started(), threads);
        long expected = 0;
        int submitted = 0;
        for (int taken = 0; taken < 200; ++taken) {
            while (submitted < 200 && !workers.full()) {
                workers.next_slot().number = submitted++;
                workers.submit();
            }
            auto job = workers.front();
            ASSERT_TRUE(job) << job.error().message;
            expected += taken;
            EXPECT_EQ((*job)->running_sum, expected);
            if (threads == 0)
                EXPECT_EQ((*job)->ran_on, owner);
            else
                EXPECT_NE((*job)->ran_on, owner);
            workers.release();
        }
        EXPECT_EQ(made.load(), 1);
    }
}

// The owner's own state follows the workers' policy: when it cannot be made (an error, or an
// exception), every job the owner runs fails with that error, and the next ring starts afresh.
TEST(OrderedWorkers, TheOwnersStateThatCannotBeMadeFailsTheJobsItRuns) {
    struct Job {
        int value = 0;
    };
    using Workers = detail::OrderedWorkers<Job>;
    for (bool throws : {false, true}) {
        Workers workers(0, 3, [throws]() -> Result<Workers::Work> {
            if (throws)
                throw std::runtime_error("no state for you");
            return Error{ErrorCode::io_error, "no decoder for the owner"};
        });
        for (int round = 0; round < 5; ++round) {
            workers.next_slot().value = round;
            workers.submit();
            auto job = workers.front();
            ASSERT_FALSE(job);
            EXPECT_EQ(job.error().code, ErrorCode::io_error);
            EXPECT_EQ(job.error().message,
                      throws ? "no state for you" : "no decoder for the owner");
            workers.release();
        }
    }
}

TEST(OrderedWorkers, LeavingWithJobsInFlightJoinsTheWorkers) {
    struct Job {
        int value = 0;
    };
    std::atomic<int> ran{0};
    {
        detail::OrderedWorkers<Job> workers(
            2, 8, [&]() -> Result<detail::OrderedWorkers<Job>::Work> {
                return detail::OrderedWorkers<Job>::Work([&](Job&) -> Result<void> {
                    std::this_thread::sleep_for(std::chrono::milliseconds(2));
                    ++ran;
                    return {};
                });
            });
        for (int i = 0; i < 8; ++i) {
            workers.next_slot().value = i;
            workers.submit();
        }
        // Leaves without taking any result back: the destructor stops and joins.
    }
    EXPECT_LE(ran.load(), 8);
}

} // namespace
} // namespace qcowmap

// Crash safety of in-place writing (issue 27). A writer doing a small workload with periodic
// flushes is stopped (a) at every one of its file writes and syncs in turn by the fault
// injection of the I/O layer, as a killed process (nothing after reaches the file) and as a
// power cut (in addition, a random part of what was written since the last sync is undone),
// and (b) by SIGKILL at random moments. After each: no corruption (leaks are allowed), and
// every write completed before the last completed flush reads back; later writes may or may
// not be there, sector by sector.
#include "support.hpp"
#include "writable_io.hpp"

#include <qcowmap/check.hpp>
#include <qcowmap/image.hpp>
#include <qcowmap/writable.hpp>

#include <gtest/gtest.h>

#include <fmt/format.h>

#include <algorithm>
#include <csignal>
#include <cstdlib>
#include <memory>
#include <random>
#include <sys/wait.h>
#include <unistd.h>

namespace qcowmap::test {
namespace {

namespace fs = std::filesystem;
constexpr std::uint64_t kSector = 512;
// Under AddressSanitizer (CI's debug sanitizer pass) each step costs several times more: the
// loops take fewer samples there; the plain build stops the small workloads at every point.
#if defined(__SANITIZE_ADDRESS__)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif

struct Op {
    enum Kind { write, zero, zero_unmap, discard, flush } kind = write;
    std::uint64_t offset = 0, length = 0;
    std::uint8_t pattern = 0;
};

/// Sector-aligned requests (so that every sector holds one value), a flush every `every` ops.
std::vector<Op> workload(std::uint64_t seed, std::uint64_t size, std::uint64_t cluster, int count,
                         int every, std::uint64_t max_clusters = 3) {
    std::mt19937_64 random(seed);
    auto pick = [&](std::uint64_t n) { return random() % n; };
    std::vector<Op> ops;
    for (int i = 0; i < count; ++i) {
        Op op;
        const unsigned kind = static_cast<unsigned>(pick(10));
        op.kind = kind < 7   ? Op::write
                  : kind < 8 ? Op::zero
                  : kind < 9 ? Op::zero_unmap
                             : Op::discard;
        op.pattern = static_cast<std::uint8_t>(1 + pick(254));
        if (op.kind == Op::discard || pick(3) == 0) {
            op.offset = pick(size / cluster) * cluster;
            op.length = cluster * (1 + pick(max_clusters));
        } else {
            op.offset = pick(size / kSector) * kSector;
            op.length = kSector * (1 + pick(max_clusters * cluster / kSector));
        }
        op.length = std::min(op.length, size - op.offset);
        ops.push_back(op);
        if ((i + 1) % every == 0)
            ops.push_back(Op{Op::flush});
    }
    return ops;
}

Result<void> apply(WritableImage& image, const Op& op) {
    switch (op.kind) {
    case Op::write: {
        // Page-aligned, so that whole clusters can go out as direct writes (scenario direct).
        const std::size_t rounded = (op.length + 4095) / 4096 * 4096;
        std::unique_ptr<std::byte, decltype(&std::free)> data(
            static_cast<std::byte*>(std::aligned_alloc(4096, rounded)), &std::free);
        if (!data)
            return Error{ErrorCode::io_error, "out of memory"};
        std::fill_n(data.get(), op.length, std::byte{op.pattern});
        return image.write(op.offset, std::span<const std::byte>(data.get(), op.length));
    }
    case Op::zero:
        return image.write_zeroes(op.offset, op.length, false);
    case Op::zero_unmap:
        return image.write_zeroes(op.offset, op.length, true);
    case Op::discard:
        return image.discard(op.offset, op.length);
    case Op::flush:
        return image.flush();
    }
    return {};
}

/// The sectors an op sets and the value they read afterwards (discard: whole clusters only,
/// reading as zeros on a version 3 image).
void sectors_of(const Op& op, std::uint64_t cluster,
                const std::function<void(std::uint64_t, std::uint8_t)>& visit) {
    std::uint64_t start = op.offset, end = op.offset + op.length;
    std::uint8_t value = op.kind == Op::write ? op.pattern : 0;
    if (op.kind == Op::flush)
        return;
    if (op.kind == Op::discard) {
        start = (start + cluster - 1) / cluster * cluster;
        end = end / cluster * cluster;
    }
    for (std::uint64_t at = start; at < end; at += kSector)
        visit(at / kSector, value);
}

struct Scenario {
    std::string name;
    std::string create_options;
    std::uint64_t size;
    std::uint64_t cluster;
    std::string setup; ///< "", "backing", "snapshot", "compressed", "bitmap", "direct"
};

class Crash : public ::testing::TestWithParam<Scenario> {
  protected:
    void SetUp() override {
        const Scenario& s = GetParam();
        start_ = dir_ / "start.qcow2";
        std::string options = s.create_options;
        initial_.assign(s.size / kSector, 0);
        // The starting content, sector-aligned patterns the model knows.
        std::vector<Op> fill = workload(1000, s.size, s.cluster, 10, 1000);
        if (s.setup == "nearly-full") // the file ends just short of the refcount table's reach
            fill.insert(fill.begin(), Op{Op::write, 0, 1900 * 1024, 0x11});
        std::string io;
        for (const Op& op : fill) {
            if (op.kind != Op::write)
                continue;
            io += fmt::format(" -c 'write -P {} {} {}'", op.pattern, op.offset, op.length);
            sectors_of(op, s.cluster,
                       [&](std::uint64_t sector, std::uint8_t v) { initial_[sector] = v; });
        }
        fs::path filled = start_;
        if (s.setup == "backing") {
            filled = dir_ / "base.qcow2";
            run_ok("qemu-img create -q -f qcow2 " + q(filled) + " " + std::to_string(s.size));
            options += std::string(options.empty() ? "" : ",") + "backing_file=" + filled.string() +
                       ",backing_fmt=qcow2";
        }
        run_ok("qemu-img create -q -f qcow2 " +
               (options.empty() ? "" : "-o " + shell_quote(options)) + " " + q(start_) + " " +
               std::to_string(s.size));
        run_ok("qemu-io -f qcow2" + io + " " + q(filled) + " >/dev/null");
        if (s.setup == "compressed") {
            run_ok("qemu-img convert -c -O qcow2 -o cluster_size=" + std::to_string(s.cluster) +
                   " " + q(start_) + " " + q(dir_ / "c.qcow2") + " && mv " + q(dir_ / "c.qcow2") +
                   " " + q(start_));
        }
        if (s.setup == "snapshot")
            run_ok("qemu-img snapshot -c s1 " + q(start_));
        if (s.setup == "bitmap")
            run_ok("qemu-img bitmap --add -g 4k " + q(start_) + " b0");
        ops_ = workload(7, s.size, s.cluster, 24, 6, s.setup == "nearly-full" ? 128 : 3);
    }

    /// Scenario "direct": data written past the page cache (qemu's cache=none).
    WritableOptions writable_options() const {
        WritableOptions options;
        options.direct_data_writes = GetParam().setup == "direct";
        return options;
    }

    /// Copies the start image to the work image.
    fs::path fresh_copy() {
        const fs::path work = dir_ / "work.qcow2";
        fs::copy_file(start_, work, fs::copy_options::overwrite_existing);
        return work;
    }

    /// Checks `work` after a crash with `flushed` ops known durable: no corruption (our check,
    /// and qemu-img check when `with_qemu`), flushed data intact, later data per sector either
    /// way.
    void verify(const fs::path& work, std::size_t flushed, bool with_qemu,
                const std::string& what) {
        SCOPED_TRACE(what);
        auto checked = check_image(work);
        ASSERT_TRUE(checked) << checked.error().message;
        EXPECT_EQ(checked->corruptions, 0u)
            << (checked->messages.empty() ? "" : checked->messages[0]);
        EXPECT_EQ(checked->check_errors, 0u);
        if (with_qemu) {
            CommandResult check = run("qemu-img check -q " + q(work));
            EXPECT_TRUE(check.exit_code == 0 || check.exit_code == 3) << check.out << check.err;
        }
        const Scenario& s = GetParam();
        std::vector<std::uint8_t> expected = initial_;
        for (std::size_t i = 0; i < flushed; ++i)
            sectors_of(ops_[i], s.cluster,
                       [&](std::uint64_t sector, std::uint8_t v) { expected[sector] = v; });
        auto image = Image::open(work);
        ASSERT_TRUE(image) << image.error().message;
        std::vector<std::byte> disk(s.size);
        auto n = image->read(disk, 0);
        ASSERT_TRUE(n) << n.error().message;
        int reported = 0;
        for (std::uint64_t sector = 0; sector < s.size / kSector; ++sector) {
            const std::byte* p = disk.data() + sector * kSector;
            const auto value = std::to_integer<std::uint8_t>(p[0]);
            bool uniform = std::all_of(p, p + kSector, [&](std::byte b) { return b == p[0]; });
            bool allowed = value == expected[sector];
            for (std::size_t i = flushed; i < ops_.size() && !allowed; ++i)
                sectors_of(ops_[i], s.cluster, [&](std::uint64_t at, std::uint8_t v) {
                    allowed = allowed || (at == sector && v == value);
                });
            if ((!uniform || !allowed) && reported++ < 3) {
                ADD_FAILURE() << fmt::format("sector {} (offset {:#x}) reads {:#04x}{}; flushed "
                                             "value {:#04x} after {} ops",
                                             sector, sector * kSector, value,
                                             uniform ? "" : " (torn)", expected[sector], flushed);
            }
        }
    }

    /// Runs the workload on `work`; returns how many ops were durable (before the last flush
    /// that completed), stopping at the first failure.
    std::size_t run_workload(const fs::path& work, bool close) {
        auto image = WritableImage::open(work, writable_options());
        if (!image)
            return 0;
        std::size_t flushed = 0;
        for (std::size_t i = 0; i < ops_.size(); ++i) {
            if (!apply(*image, ops_[i]))
                return flushed;
            if (ops_[i].kind == Op::flush)
                flushed = i + 1;
        }
        if (close && image->close())
            flushed = ops_.size();
        return flushed;
    }

    TempDir dir_;
    fs::path start_;
    std::vector<std::uint8_t> initial_;
    std::vector<Op> ops_;
};

TEST_P(Crash, FaultAtEveryWriteAndSync) {
    // How many operations the whole workload takes.
    detail::arm_fault(UINT64_MAX);
    {
        const fs::path work = fresh_copy();
        EXPECT_EQ(run_workload(work, true), ops_.size());
    }
    const std::uint64_t total = detail::disarm_fault();
    ASSERT_GT(total, 10u);
    RecordProperty("operations", static_cast<int>(total));
    std::printf("[ info     ] %llu file writes and syncs in the workload\n",
                static_cast<unsigned long long>(total));
    if (GetParam().setup == "nearly-full") {
        // The workload outgrew the refcount table: it moved (a new one, bigger).
        EXPECT_NE(peek_be(dir_ / "work.qcow2", 48, 8), peek_be(start_, 48, 8));
    }
    // Every operation of the small workloads; the refcount growth workload (a few hundred
    // operations) every third one, in each mode at a different phase.
    const std::uint64_t stride = (total > 120 ? 3 : 1) * (kSanitized ? 3 : 1);
    for (auto mode : {detail::FaultMode::stop, detail::FaultMode::lose_unsynced}) {
        const std::uint64_t first = mode == detail::FaultMode::stop ? 1 : 1 + (stride - 1) / 2;
        for (std::uint64_t n = first; n <= total; n += stride) {
            const fs::path work = fresh_copy();
            detail::arm_fault(n, mode, n);
            std::size_t flushed = run_workload(work, true);
            EXPECT_TRUE(detail::fault_fired() || n == total + 1);
            detail::disarm_fault();
            verify(work, flushed, n % 16 == 1,
                   fmt::format("{} at operation {} of {}",
                               mode == detail::FaultMode::stop ? "stopped" : "power cut", n,
                               total));
            if (HasFailure())
                return;
        }
    }
}

TEST_P(Crash, SigkillAtRandomMoments) {
    // The time one run takes, to spread the kills over it.
    const auto begin = std::chrono::steady_clock::now();
    run_workload(fresh_copy(), true);
    const auto micros = std::chrono::duration_cast<std::chrono::microseconds>(
                            std::chrono::steady_clock::now() - begin)
                            .count();
    std::mt19937_64 random(42);
    constexpr int kKills = kSanitized ? 10 : 40;
    for (int round = 0; round < kKills; ++round) {
        const fs::path work = fresh_copy();
        int progress[2];
        ASSERT_EQ(::pipe(progress), 0);
        const pid_t child = ::fork();
        ASSERT_GE(child, 0);
        if (child == 0) {
            ::close(progress[0]);
            auto image = WritableImage::open(work, writable_options());
            if (!image)
                ::_exit(1);
            for (std::size_t i = 0; i < ops_.size(); ++i) {
                if (!apply(*image, ops_[i]))
                    ::_exit(2);
                if (ops_[i].kind == Op::flush) {
                    const std::uint32_t done = static_cast<std::uint32_t>(i + 1);
                    [[maybe_unused]] auto w = ::write(progress[1], &done, sizeof done);
                }
            }
            ::_exit(image->close() ? 0 : 3);
        }
        ::close(progress[1]);
        ::usleep(static_cast<useconds_t>(random() % static_cast<std::uint64_t>(micros + 1)));
        ::kill(child, SIGKILL);
        int status = 0;
        ::waitpid(child, &status, 0);
        std::uint32_t done = 0, last = 0;
        while (::read(progress[0], &done, sizeof done) == sizeof done)
            last = done;
        ::close(progress[0]);
        if (WIFEXITED(status)) {
            ASSERT_EQ(WEXITSTATUS(status), 0);
        }
        verify(work, last, round % 10 == 0,
               fmt::format("kill {} after {} flushed ops", round, last));
        if (HasFailure())
            return;
    }
}

std::string scenario_name(const ::testing::TestParamInfo<Scenario>& info) {
    return info.param.name;
}

INSTANTIATE_TEST_SUITE_P(
    Scenarios, Crash,
    ::testing::Values(Scenario{"Plain", "", 2 << 20, 65536, ""},
                      // Refcount blocks of 64 clusters, a table of 64 blocks (2 MiB of
                      // file): new blocks and a new table during the workload.
                      Scenario{"RefcountGrowth", "cluster_size=512,refcount_bits=64", 4 << 20, 512,
                               "nearly-full"},
                      Scenario{"BackingExtendedL2", "extended_l2=on,cluster_size=16k", 2 << 20,
                               16384, "backing"},
                      Scenario{"Snapshot", "cluster_size=4k", 1 << 20, 4096, "snapshot"},
                      Scenario{"Compressed", "", 2 << 20, 65536, "compressed"},
                      Scenario{"Bitmap", "cluster_size=4k", 1 << 20, 4096, "bitmap"},
                      // Whole clusters written with O_DIRECT, metadata buffered.
                      Scenario{"DirectWrites", "", 2 << 20, 65536, "direct"}),
    scenario_name);

} // namespace
} // namespace qcowmap::test

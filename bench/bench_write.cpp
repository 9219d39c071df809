// In-place writing benchmarks (issue 27): sequential 1 MiB and random 4 KiB writes through
// WritableImage into a new image, into a compressed one (every cluster written turns from
// compressed into normal) and into an overlay over a filled backing file (partial clusters
// copied up from below). Each iteration writes into a fresh copy and ends with close(), whose
// flush syncs everything: the figures include getting the data and metadata to disk, as
// `qemu-img bench -w` does when it closes its image.
//
// Two ways to run it:
//   bench_write [google benchmark flags]        the Google Benchmark table
//   bench_write run PATTERN IMAGE [COUNT]       one timed workload for bench/compare-qemu.sh,
//       PATTERN seq1m (COUNT writes of 1 MiB from offset 0, default 1024), rand4k (COUNT 4 KiB
//       writes at pseudo-random 4 KiB-aligned offsets, default 20000, seed 1), or step4k:STEP
//       (COUNT 4 KiB writes at offsets i * STEP modulo the disk size, the pattern of
//       `qemu-img bench -w -s 4k -S STEP`); prints the seconds taken, open to close included.
//   bench_write offsets SIZE COUNT               the rand4k offsets as qemu-io commands.
//
// Images are built at start-up with qemu-img/qemu-io in $QCOWMAP_BENCH_DIR (kept) or a
// temporary directory under /var/tmp (removed at exit).
#include <qcowmap/writable.hpp>

#include <benchmark/benchmark.h>
#include <fmt/format.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>
#include <unistd.h>
#include <vector>

namespace {

namespace fs = std::filesystem;
constexpr std::uint64_t kMiB = 1024 * 1024;
constexpr std::uint64_t kDisk = 4096 * kMiB;

fs::path g_dir;
bool g_owned = false;

[[noreturn]] void die(const std::string& message) {
    fmt::print(stderr, "bench_write: {}\n", message);
    if (g_owned)
        fs::remove_all(g_dir);
    std::exit(2);
}

void sh(const std::string& command) {
    if (std::system(command.c_str()) != 0)
        die("command failed: " + command);
}

std::string q(const fs::path& path) {
    return "'" + path.string() + "'";
}

/// The random 4 KiB offsets of rand4k: the same for every run and for qemu-io's script.
std::vector<std::uint64_t> random_offsets(std::uint64_t disk, std::uint64_t count) {
    std::mt19937_64 random(1);
    std::vector<std::uint64_t> offsets(count);
    for (auto& offset : offsets)
        offset = random() % (disk / 4096) * 4096;
    return offsets;
}

std::vector<std::uint64_t> pattern_offsets(const std::string& pattern, std::uint64_t disk,
                                           std::uint64_t count, std::uint64_t& size) {
    std::vector<std::uint64_t> offsets;
    if (pattern == "seq1m") {
        size = kMiB;
        for (std::uint64_t i = 0; i < count; ++i)
            offsets.push_back(i * kMiB % disk);
    } else if (pattern == "rand4k") {
        size = 4096;
        offsets = random_offsets(disk, count);
    } else if (pattern.starts_with("step4k:")) {
        size = 4096;
        const std::uint64_t step = std::stoull(pattern.substr(7));
        // qemu-img bench: offset += step, wrapping to 0 past the end of the image.
        std::uint64_t offset = 0;
        for (std::uint64_t i = 0; i < count; ++i) {
            offsets.push_back(offset);
            offset += step;
            if (offset + size > disk)
                offset = 0;
        }
    } else {
        die("unknown pattern " + pattern);
    }
    return offsets;
}

/// Opens `image`, writes `size` bytes at each offset, closes (flush included).
void write_all(const fs::path& image, const std::vector<std::uint64_t>& offsets,
               std::uint64_t size) {
    auto writable = qcowmap::WritableImage::open(image);
    if (!writable)
        die(writable.error().message);
    std::vector<std::byte> data(size, std::byte{0xa5});
    for (std::uint64_t offset : offsets) {
        if (auto ok = writable->write(offset, data); !ok)
            die(ok.error().message);
    }
    if (auto ok = writable->close(); !ok)
        die(ok.error().message);
}

int run_command(int argc, char** argv) {
    const std::string pattern = argv[2];
    const fs::path image = argv[3];
    std::uint64_t count = argc > 4 ? std::stoull(argv[4]) : pattern == "seq1m" ? 1024 : 20000;
    auto probe = qcowmap::WritableImage::open(image);
    if (!probe)
        die(probe.error().message);
    const std::uint64_t disk = probe->size();
    (void)probe->close();
    std::uint64_t size = 0;
    const auto offsets = pattern_offsets(pattern, disk, count, size);
    const auto begin = std::chrono::steady_clock::now();
    write_all(image, offsets, size);
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count();
    fmt::print("{:.6f}\n", seconds);
    return 0;
}

// ---------------------------------------------------------------------------------------------
// Google Benchmark.

struct Images {
    fs::path fresh, compressed, base, overlay;
};

const Images& images() {
    static const Images built = [] {
        Images i;
        i.fresh = g_dir / "fresh-4G.qcow2";
        i.compressed = g_dir / "compressed-1G.qcow2";
        i.base = g_dir / "base-1G.qcow2";
        i.overlay = g_dir / "overlay-1G.qcow2";
        if (!fs::exists(i.fresh))
            sh("qemu-img create -q -f qcow2 " + q(i.fresh) + " 4G");
        if (!fs::exists(i.compressed)) {
            // 1 GiB of compressible data (text-like runs), stored compressed.
            const fs::path raw = g_dir / "text-1G.raw";
            sh("yes 'qcowmap in-place writing benchmark line of text 0123456789' | head -c 1G > " +
               q(raw));
            sh("qemu-img convert -c -O qcow2 -f raw " + q(raw) + " " + q(i.compressed));
            fs::remove(raw);
        }
        if (!fs::exists(i.overlay)) {
            sh("qemu-img create -q -f qcow2 " + q(i.base) + " 1G");
            sh("qemu-io -f qcow2 -t writeback -c 'write -P 0x5a 0 1G' " + q(i.base) +
               " >/dev/null");
            sh("qemu-img create -q -f qcow2 -b " + q(i.base) + " -F qcow2 " + q(i.overlay));
        }
        return i;
    }();
    return built;
}

void run_benchmark(benchmark::State& state, const fs::path& source, const std::string& pattern,
                   std::uint64_t count) {
    const fs::path work = g_dir / "work.qcow2";
    std::uint64_t size = 0;
    auto probe = qcowmap::Image::open(source);
    if (!probe)
        die(probe.error().message);
    const auto offsets = pattern_offsets(pattern, probe->size(), count, size);
    for (auto _ : state) {
        state.PauseTiming();
        fs::copy_file(source, work, fs::copy_options::overwrite_existing);
        state.ResumeTiming();
        write_all(work, offsets, size);
    }
    state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * offsets.size() * size));
    state.counters["writes/s"] = benchmark::Counter(
        static_cast<double>(state.iterations() * offsets.size()), benchmark::Counter::kIsRate);
    fs::remove(work);
}

void BM_seq_1MiB_new(benchmark::State& state) {
    run_benchmark(state, images().fresh, "seq1m", 512);
}
void BM_rand_4KiB_new(benchmark::State& state) {
    run_benchmark(state, images().fresh, "rand4k", 20000);
}
void BM_seq_1MiB_compressed(benchmark::State& state) {
    run_benchmark(state, images().compressed, "seq1m", 512);
}
void BM_rand_4KiB_compressed(benchmark::State& state) {
    run_benchmark(state, images().compressed, "rand4k", 5000);
}
void BM_seq_1MiB_backed(benchmark::State& state) {
    run_benchmark(state, images().overlay, "seq1m", 512);
}
void BM_rand_4KiB_backed(benchmark::State& state) {
    run_benchmark(state, images().overlay, "rand4k", 5000);
}
BENCHMARK(BM_seq_1MiB_new)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_rand_4KiB_new)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_seq_1MiB_compressed)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_rand_4KiB_compressed)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_seq_1MiB_backed)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_rand_4KiB_backed)->Unit(benchmark::kMillisecond)->UseRealTime();

} // namespace

int main(int argc, char** argv) {
    if (argc >= 4 && std::string(argv[1]) == "run")
        return run_command(argc, argv);
    if (argc == 4 && std::string(argv[1]) == "offsets") {
        for (std::uint64_t offset : random_offsets(std::stoull(argv[2]), std::stoull(argv[3])))
            fmt::print("write -P 0xa5 {} 4096\n", offset);
        return 0;
    }
    if (const char* dir = std::getenv("QCOWMAP_BENCH_DIR")) {
        g_dir = dir;
        fs::create_directories(g_dir);
    } else {
        char pattern[] = "/var/tmp/qcowmap-bench-write-XXXXXX";
        if (!::mkdtemp(pattern))
            die("cannot make a temporary directory");
        g_dir = pattern;
        g_owned = true;
    }
    benchmark::Initialize(&argc, argv);
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    if (g_owned)
        fs::remove_all(g_dir);
    return 0;
}

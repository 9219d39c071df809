// qcowmap benchmarks: the extent walk, map_image, read(), Image::visit to
// /dev/null, through a pipe and into a sparse raw file, on images built at startup with
// qemu-img/qemu-io: dense (256 MiB, one data run), fragmented (1 GiB, 16384 runs), compressed
// (64 MiB, zlib) and sparse (1 TiB, 64 scattered clusters).
//
// Images live in $QCOWMAP_BENCH_DIR when it is set (kept afterwards and reused by later runs when
// they still look right), else in a fresh mkdtemp directory under /var/tmp removed at exit.
// Everything runs warm: the image files stay in the page cache, and the long-lived Image of each
// benchmark has its mapping populated before timing starts (open_read_1MiB maps afresh each time;
// streaming benchmarks with prefetching drop the pages behind them, as the CLI does, so their
// later iterations map the pages again). Convert outputs go to /dev/shm when it has room.
// hash, compare and convert run with each data access (_read, _mmap; no suffix: the measured
// default, which is printed at start). Run with --benchmark_repetitions=N for min/median/max.
#include <qcowmap/compare.hpp>
#include <qcowmap/export.hpp>
#include <qcowmap/hash.hpp>
#include <qcowmap/image.hpp>
#include <qcowmap/map.hpp>

#include <benchmark/benchmark.h>
#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>
#include <vector>

namespace {

namespace fs = std::filesystem;
using qcowmap::DataAccess;
using qcowmap::Extent;
using qcowmap::ExtentKind;
using qcowmap::Image;
using qcowmap::Result;
using qcowmap::Run;
using qcowmap::RunVisitor;
using qcowmap::VisitOptions;

constexpr std::uint64_t kKiB = 1024;
constexpr std::uint64_t kMiB = 1024 * kKiB;
constexpr std::uint64_t kGiB = 1024 * kMiB;

/// The temporary directory this process made, removed on exit (also by `die`).
fs::path g_owned_dir;

void remove_owned_dir() {
    if (!g_owned_dir.empty()) {
        std::error_code ec;
        fs::remove_all(g_owned_dir, ec);
        g_owned_dir.clear();
    }
}

[[noreturn]] void die(const std::string& message) {
    fmt::print(stderr, "bench_qcowmap: {}\n", message);
    remove_owned_dir();
    std::exit(2);
}

std::string quote(const std::string& s) {
    std::string out = "'";
    for (char c : s) {
        out += c == '\'' ? std::string("'\\''") : std::string(1, c);
    }
    return out + "'";
}

void run(const std::string& command) {
    int status = std::system(command.c_str());
    if (status == -1 || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        die(fmt::format("command failed (status {}): {}", status, command));
    }
}

/// One benchmark image: how to build it and what it must look like once built.
struct ImageSpec {
    std::string name; ///< short name used in benchmark names
    std::string file; ///< file name inside the bench directory
    std::uint64_t virtual_size;
    std::uint64_t extents; ///< expected number of extents (sanity check of the build)
    /// Too big to push every virtual byte through user space (read(), a pipe) per iteration.
    bool huge;
    std::function<void(const fs::path& dir, const fs::path& out)> build;
};

std::uint64_t count_extents(const Image& image) {
    auto it = image.extents();
    std::uint64_t n = 0;
    for ([[maybe_unused]] const Extent& e : it)
        ++n;
    if (it.error().has_value())
        die(fmt::format("{}: extent walk failed: {}", image.path().string(), it.error()->message));
    return n;
}

/// Opens `path` and checks it against `spec`; nullopt (with a reason on stderr) if it does not fit.
std::optional<Image> open_checked(const fs::path& path, const ImageSpec& spec, bool quiet) {
    auto image = Image::open(path);
    if (!image) {
        if (!quiet)
            fmt::print(stderr, "{}: {}\n", path.string(), image.error().message);
        return std::nullopt;
    }
    std::uint64_t n = count_extents(*image);
    if (image->size() != spec.virtual_size || n != spec.extents) {
        if (!quiet) {
            fmt::print(stderr, "{}: size {} / {} extents, expected {} / {}\n", path.string(),
                       image->size(), n, spec.virtual_size, spec.extents);
        }
        return std::nullopt;
    }
    return std::move(*image);
}

// DENSE: 256 MiB, every byte written in one go (one long data run).
constexpr std::uint64_t kDenseSize = 256 * kMiB;
// FRAGMENTED: 1 GiB of 64 KiB clusters, every other cluster written, in a scrambled order so the
// host file does not follow the virtual order: 8192 data + 8192 unallocated extents.
constexpr std::uint64_t kFragSize = 1 * kGiB;
constexpr std::uint64_t kFragCluster = 64 * kKiB;
constexpr std::uint64_t kFragDataClusters = kFragSize / kFragCluster / 2;
// COMPRESSED: 64 MiB of low-entropy bytes through `qemu-img convert -c`, one extent per cluster.
constexpr std::uint64_t kCompressedSize = 64 * kMiB;
// SPARSE: 1 TiB with 64 clusters of 64 KiB written, spread out and never adjacent nor at either
// end: 64 data extents between 65 unallocated ones. Almost all metadata is empty L1 entries.
constexpr std::uint64_t kSparseSize = 1024 * kGiB;
constexpr std::uint64_t kSparseWrites = 64;

void build_dense(const fs::path&, const fs::path& out) {
    run(fmt::format("qemu-img create -q -f qcow2 {} {}", quote(out), kDenseSize));
    run(fmt::format("qemu-io -t unsafe -f qcow2 -c 'write -P 0xab 0 {}' {} >/dev/null", kDenseSize,
                    quote(out)));
}

void build_fragmented(const fs::path& dir, const fs::path& out) {
    // qemu-io reads its commands from stdin when given no -c; one process for all 8192 writes.
    fs::path script = dir / "frag-commands.txt";
    {
        std::string text;
        for (std::uint64_t i = 0; i < kFragDataClusters; ++i) {
            // 5003 is prime, so i -> i * 5003 mod 8192 is a permutation.
            std::uint64_t j = (i * 5003) % kFragDataClusters;
            text += fmt::format("write -P {:#x} {} {}\n", 0x10 + j % 0xe0, 2 * j * kFragCluster,
                                kFragCluster);
        }
        std::FILE* f = std::fopen(script.c_str(), "w");
        if (!f || std::fwrite(text.data(), 1, text.size(), f) != text.size() || std::fclose(f)) {
            die(fmt::format("cannot write {}", script.string()));
        }
    }
    run(fmt::format("qemu-img create -q -f qcow2 -o cluster_size={} {} {}", kFragCluster,
                    quote(out), kFragSize));
    run(fmt::format("qemu-io -t unsafe -f qcow2 {} <{} >/dev/null", quote(out), quote(script)));
    fs::remove(script);
}

void build_compressed(const fs::path& dir, const fs::path& out) {
    fs::path raw = dir / "compressed-source.raw";
    {
        // 16 symbols, xorshift-chosen: compresses about 2:1, so zlib does real work.
        std::vector<std::uint8_t> data(kCompressedSize);
        std::uint64_t x = 0x9e3779b97f4a7c15ull;
        for (auto& b : data) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b = static_cast<std::uint8_t>('a' + (x & 15));
        }
        std::FILE* f = std::fopen(raw.c_str(), "w");
        if (!f || std::fwrite(data.data(), 1, data.size(), f) != data.size() || std::fclose(f)) {
            die(fmt::format("cannot write {}", raw.string()));
        }
    }
    run(fmt::format("qemu-img convert -c -f raw -O qcow2 {} {}", quote(raw), quote(out)));
    fs::remove(raw);
}

void build_sparse(const fs::path&, const fs::path& out) {
    std::string commands;
    const std::uint64_t clusters = kSparseSize / kFragCluster;
    for (std::uint64_t i = 0; i < kSparseWrites; ++i) {
        // Evenly spaced slots with a jitter well below the slot width.
        std::uint64_t cluster = 1 + i * (clusters / kSparseWrites) + (i * 7919) % 100000;
        commands += fmt::format(" -c 'write -P {:#x} {} {}'", 0x40 + i, cluster * kFragCluster,
                                kFragCluster);
    }
    run(fmt::format("qemu-img create -q -f qcow2 {} {}", quote(out), kSparseSize));
    run(fmt::format("qemu-io -t unsafe -f qcow2{} {} >/dev/null", commands, quote(out)));
}

std::vector<ImageSpec> image_specs() {
    return {
        {"dense", "dense-256M.qcow2", kDenseSize, 1, false, build_dense},
        {"fragmented", "fragmented-1G.qcow2", kFragSize, 2 * kFragDataClusters, false,
         build_fragmented},
        {"compressed", "compressed-64M.qcow2", kCompressedSize, kCompressedSize / kFragCluster,
         false, build_compressed},
        {"sparse", "sparse-1T.qcow2", kSparseSize, 2 * kSparseWrites + 1, true, build_sparse},
    };
}

struct BenchImage {
    std::string name;
    fs::path path;
    Image image;
    std::uint64_t extents;
    bool huge;
};

/// How a benchmark runs: 0 threads means a visit on the calling thread only, more means that
/// many producer threads (as the CLI's cat and convert do).
struct Setup {
    fs::path dir;
    unsigned threads = 0;
    DataAccess access = DataAccess::automatic;
    fs::path out_dir; ///< where convert writes
};

struct BenchDir {
    fs::path dir;
    std::vector<BenchImage> images;

    ~BenchDir() { remove_owned_dir(); }
};

void prepare(BenchDir& bench) {
    if (const char* env = std::getenv("QCOWMAP_BENCH_DIR"); env && *env) {
        bench.dir = env;
        fs::create_directories(bench.dir);
    } else {
        std::string tmpl = "/var/tmp/qcowmap-bench-XXXXXX";
        if (!::mkdtemp(tmpl.data()))
            die(fmt::format("mkdtemp: {}", std::strerror(errno)));
        bench.dir = tmpl;
        g_owned_dir = bench.dir;
    }
    for (const ImageSpec& spec : image_specs()) {
        fs::path path = bench.dir / spec.file;
        std::optional<Image> image;
        if (fs::exists(path)) {
            image = open_checked(path, spec, /*quiet=*/false);
            if (image)
                fmt::print(stderr, "reusing {}\n", path.string());
        }
        if (!image) {
            fmt::print(stderr, "building {}\n", path.string());
            fs::path tmp = path;
            tmp += ".tmp";
            fs::remove(tmp);
            spec.build(bench.dir, tmp);
            fs::rename(tmp, path);
            image = open_checked(path, spec, /*quiet=*/false);
            if (!image)
                die(fmt::format("{} does not have the expected layout", path.string()));
        }
        // Touch every page of the data once so that benchmarks on this long-lived Image start
        // with a populated mapping (open_read_1MiB measures a fresh mapping each iteration).
        std::uint64_t touched = 0;
        auto warm = image->visit(0, UINT64_MAX, [&](const Run& run) -> Result<void> {
            auto bytes = run.bytes;
            for (std::size_t i = 0; i < bytes.size(); i += 4096) {
                touched += std::to_integer<std::uint8_t>(bytes[i]);
            }
            return {};
        });
        if (!warm)
            die(fmt::format("{}: {}", path.string(), warm.error().message));
        benchmark::DoNotOptimize(touched);
        bench.images.push_back({spec.name, path, std::move(*image), spec.extents, spec.huge});
    }
}

void set_rates(benchmark::State& state, const BenchImage& b) {
    const auto iterations = static_cast<std::int64_t>(state.iterations());
    state.SetBytesProcessed(iterations * static_cast<std::int64_t>(b.image.size()));
    state.SetItemsProcessed(iterations * static_cast<std::int64_t>(b.extents));
    state.counters["extents"] = static_cast<double>(b.extents);
}

/// Walks the extents and sums their lengths: metadata only, no data bytes touched.
void bm_iterate(benchmark::State& state, const BenchImage& b, const Setup&) {
    for (auto _ : state) {
        auto it = b.image.extents();
        std::uint64_t n = 0, covered = 0;
        for (const Extent& e : it) {
            ++n;
            covered += e.length;
        }
        benchmark::DoNotOptimize(covered);
        if (it.error().has_value() || n != b.extents || covered != b.image.size()) {
            state.SkipWithError("extent walk gave a wrong result");
            break;
        }
    }
    set_rates(state, b);
}

/// Samples a few bytes of a buffer just written, so the copy has an observable consumer.
std::uint64_t sample(const std::byte* p, std::size_t n) {
    std::uint64_t sum = 0;
    for (std::size_t i = 0; i < n; i += 64 * kKiB) {
        sum += std::to_integer<std::uint8_t>(p[i]);
    }
    return sum + (n ? std::to_integer<std::uint8_t>(p[n - 1]) : 0);
}

std::uint64_t read_whole(const Image& image, std::vector<std::byte>& buffer,
                         benchmark::State& state) {
    std::uint64_t checksum = 0;
    for (std::uint64_t offset = 0; offset < image.size();) {
        auto got = image.read(buffer, offset);
        if (!got || *got == 0) {
            state.SkipWithError("read failed");
            return 0;
        }
        checksum += sample(buffer.data(), *got);
        offset += *got;
    }
    return checksum;
}

/// read() into a 1 MiB buffer over the whole disk, on an Image opened once (mapping warm).
void bm_read(benchmark::State& state, const BenchImage& b, const Setup&) {
    std::vector<std::byte> buffer(1 * kMiB);
    for (auto _ : state) {
        std::uint64_t checksum = read_whole(b.image, buffer, state);
        benchmark::DoNotOptimize(checksum);
        benchmark::ClobberMemory();
    }
    set_rates(state, b);
}

/// read() of 4 KiB at 16 384 pseudo-random offsets per iteration (mapping warm): small requests
/// as a server answers them, where a call's fixed cost shows (the fault boundary's, for one).
void bm_read_4k_random(benchmark::State& state, const BenchImage& b, const Setup&) {
    constexpr std::size_t kRequest = 4096;
    constexpr int kRequests = 16384;
    std::vector<std::byte> buffer(kRequest);
    const std::uint64_t slots = b.image.size() / kRequest;
    for (auto _ : state) {
        std::uint64_t x = 88172645463325252ull; // xorshift64: the same offsets every iteration
        std::uint64_t checksum = 0;
        for (int i = 0; i < kRequests; ++i) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            auto got = b.image.read(buffer, (x % slots) * kRequest);
            if (!got) {
                state.SkipWithError("read failed");
                return;
            }
            checksum += std::to_integer<std::uint8_t>(buffer[kRequest / 2]);
        }
        benchmark::DoNotOptimize(checksum);
    }
    state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()) * kRequests);
}

/// Image::open + read() of the whole disk per iteration: includes mapping the file and the page
/// faults on it, which is what every CLI invocation pays (page cache warm).
void bm_open_read(benchmark::State& state, const BenchImage& b, const Setup&) {
    std::vector<std::byte> buffer(1 * kMiB);
    for (auto _ : state) {
        auto image = Image::open(b.path);
        if (!image) {
            state.SkipWithError("open failed");
            break;
        }
        std::uint64_t checksum = read_whole(*image, buffer, state);
        benchmark::DoNotOptimize(checksum);
        benchmark::ClobberMemory();
    }
    set_rates(state, b);
}

/// `qcowmap cat`: the library's export_raw writing the disk in order to `fd`, as the CLI's cat
/// calls it (into a pipe, data of the mapping and zeros go by vmsplice). Returns the bytes
/// written (as its progress reports them), or nullopt on failure.
std::optional<std::uint64_t> cat_to(const Image& image, const Setup& setup, int fd) {
    qcowmap::ExportOptions options;
    options.sequential = true;
    options.threads = setup.threads == 0 ? 1 : setup.threads;
    options.data_access = setup.access;
    std::uint64_t written = 0;
    options.progress = [&](std::uint64_t done, std::uint64_t) { written = done; };
    if (!qcowmap::export_raw(image, fd, options))
        return std::nullopt;
    return written;
}

/// `qcowmap cat IMG >/dev/null`: the extent walk (and decompression) plus one write(2) per run or
/// zero chunk. /dev/null never reads the bytes, so data runs of the mapping are not copied.
void bm_cat_devnull(benchmark::State& state, const BenchImage& b, const Setup& setup) {
    int fd = ::open("/dev/null", O_WRONLY | O_CLOEXEC);
    if (fd < 0) {
        state.SkipWithError("cannot open /dev/null");
        return;
    }
    for (auto _ : state) {
        auto written = cat_to(b.image, setup, fd);
        if (!written || *written != b.image.size()) {
            state.SkipWithError("cat to /dev/null failed");
            break;
        }
        benchmark::DoNotOptimize(*written);
    }
    ::close(fd);
    set_rates(state, b);
}

/// `qcowmap cat IMG | consumer`: every byte goes through a 1 MiB pipe to a reader thread that
/// reads it into a buffer and samples it, so the data is really copied out of the mapping.
void bm_cat_pipe(benchmark::State& state, const BenchImage& b, const Setup& setup) {
    std::vector<std::byte> buffer(1 * kMiB);
    for (auto _ : state) {
        int fds[2];
        if (::pipe2(fds, O_CLOEXEC) != 0) {
            state.SkipWithError("pipe failed");
            break;
        }
        ::fcntl(fds[1], F_SETPIPE_SZ, static_cast<int>(1 * kMiB)); // best effort
        std::uint64_t received = 0, checksum = 0;
        std::thread reader([&] {
            for (;;) {
                ssize_t n = ::read(fds[0], buffer.data(), buffer.size());
                if (n < 0 && errno == EINTR)
                    continue;
                if (n <= 0)
                    break;
                checksum += sample(buffer.data(), static_cast<std::size_t>(n));
                received += static_cast<std::uint64_t>(n);
            }
        });
        auto written = cat_to(b.image, setup, fds[1]);
        ::close(fds[1]);
        reader.join();
        ::close(fds[0]);
        if (!written || received != b.image.size()) {
            state.SkipWithError("cat through a pipe failed");
            break;
        }
        benchmark::DoNotOptimize(checksum);
    }
    set_rates(state, b);
}

/// `qcowmap convert IMG OUT`: the library's export_raw, as the CLI calls it (default -S 4k
/// zero detection; data made present ahead from the mapping or read ahead with pread, as the
/// entry's data access says), into a new sparse raw file in the output directory. The output is
/// unlinked between iterations, outside the timed part. `threads` 0 (the serial entry) exports
/// on one thread. With `digest`, as `convert --digest=blkhash-sha256`: the digest taken from
/// the same pass.
template <bool digest = false>
void bm_convert_file(benchmark::State& state, const BenchImage& b, const Setup& setup) {
    const fs::path out =
        setup.out_dir / fmt::format("qcowmap-bench-{}-convert-{}.raw", ::getpid(), b.name);
    qcowmap::ExportOptions options;
    options.threads = setup.threads == 0 ? 1 : setup.threads;
    options.data_access = setup.access;
    qcowmap::Digest taken;
    if (digest)
        options.digest = qcowmap::HashAlgorithm::blkhash_sha256;
    options.digest_out = &taken;
    for (auto _ : state) {
        int fd = ::open(out.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
        if (fd < 0) {
            state.SkipWithError("cannot create the output file");
            break;
        }
        auto result = qcowmap::export_raw(b.image, fd, options);
        bool closed = ::close(fd) == 0;
        state.PauseTiming();
        fs::remove(out);
        state.ResumeTiming();
        if (!result || !closed) {
            state.SkipWithError("convert to a file failed");
            break;
        }
    }
    set_rates(state, b);
}

/// map_image as `qcowmap map` calls it, without the JSON formatting; items are map entries.
void bm_map(benchmark::State& state, const BenchImage& b, const Setup&) {
    std::uint64_t entries = 0;
    for (auto _ : state) {
        std::uint64_t n = 0, covered = 0;
        auto result =
            qcowmap::map_image(b.image, {}, [&](const qcowmap::MapEntry& e) -> Result<void> {
                ++n;
                covered += e.length;
                return {};
            });
        benchmark::DoNotOptimize(covered);
        if (!result || covered != b.image.size()) {
            state.SkipWithError("map_image failed");
            break;
        }
        entries = n;
    }
    const auto iterations = static_cast<std::int64_t>(state.iterations());
    state.SetBytesProcessed(iterations * static_cast<std::int64_t>(b.image.size()));
    state.SetItemsProcessed(iterations * static_cast<std::int64_t>(entries));
    state.counters["entries"] = static_cast<double>(entries);
}

/// hash_image, sha256 and xxh3-128: whole-disk digests straight from the mapping (zero runs
/// from a static zero block, so huge sparse disks are skipped: they cost their virtual size).
template <qcowmap::HashAlgorithm algorithm>
void bm_hash(benchmark::State& state, const BenchImage& b, const Setup& setup) {
    for (auto _ : state) {
        qcowmap::HashOptions options;
        options.algorithm = algorithm;
        options.threads = std::max(1u, setup.threads);
        options.data_access = setup.access;
        auto digest = qcowmap::hash_image(b.image, options);
        if (!digest) {
            state.SkipWithError("hash_image failed");
            break;
        }
        benchmark::DoNotOptimize(digest->bytes);
    }
    set_rates(state, b);
}

/// hash_blocks, sha256 with 64 KiB blocks, on setup.threads workers (1 when 0): the manifest
/// scaling figure (2 threads vs 1).
void bm_hash_blocks(benchmark::State& state, const BenchImage& b, const Setup& setup) {
    for (auto _ : state) {
        qcowmap::BlockHashOptions options;
        options.block_size = 65536;
        options.threads = std::max(1u, setup.threads);
        std::uint64_t blocks = 0;
        auto ok = qcowmap::hash_blocks(b.image, options,
                                       [&](const qcowmap::BlockDigest&) -> Result<void> {
                                           ++blocks;
                                           return {};
                                       });
        if (!ok) {
            state.SkipWithError("hash_blocks failed");
            break;
        }
        benchmark::DoNotOptimize(blocks);
    }
    set_rates(state, b);
}

/// compare_images of the image against a byte copy of its file (made once, beside it): every
/// data byte of both is compared.
void bm_compare_copy(benchmark::State& state, const BenchImage& b, const Setup& setup) {
    fs::path copy = b.path;
    copy += ".copy";
    if (!fs::exists(copy) || fs::file_size(copy) != fs::file_size(b.path)) {
        fs::copy_file(b.path, copy, fs::copy_options::overwrite_existing);
    }
    auto other = qcowmap::Image::open(copy);
    if (!other) {
        state.SkipWithError("cannot open the copy");
        return;
    }
    for (auto _ : state) {
        qcowmap::CompareOptions options;
        options.data_access = setup.access;
        options.threads = std::max(1u, setup.threads);
        auto r = qcowmap::compare_images(b.image, *other, options);
        if (!r || r->outcome != qcowmap::CompareResult::Outcome::identical) {
            state.SkipWithError("compare_images failed");
            break;
        }
    }
    set_rates(state, b);
}

/// compare_images of the image against a second opening of the same file: both extent walks
/// and the same-file shortcut, no data read (compare-qemu.sh times a real copy).
void bm_compare_self(benchmark::State& state, const BenchImage& b, const Setup&) {
    auto other = qcowmap::Image::open(b.path);
    if (!other) {
        state.SkipWithError("cannot reopen the image");
        return;
    }
    for (auto _ : state) {
        auto r = qcowmap::compare_images(b.image, *other);
        if (!r || r->outcome != qcowmap::CompareResult::Outcome::identical) {
            state.SkipWithError("compare_images failed");
            break;
        }
    }
    set_rates(state, b);
}

} // namespace

int main(int argc, char** argv) {
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv))
        return 1;

    BenchDir bench;
    prepare(bench);

    using Fn = void (*)(benchmark::State&, const BenchImage&, const Setup&);
    constexpr DataAccess automatic = DataAccess::automatic;
    constexpr DataAccess read = DataAccess::read;
    constexpr DataAccess mmap = DataAccess::mapping;
    struct Entry {
        const char* name;
        Fn fn;
        bool parallel;   ///< run with the CLI's worker count of producer threads
        bool every_byte; ///< moves every virtual byte through user space: not on huge images
        DataAccess access = DataAccess::mapping;
    };
    const Entry entries[] = {
        {"iterate", bm_iterate, false, false},
        {"map", bm_map, false, false},
        {"read_1MiB", bm_read, false, true},
        {"read_4k_random", bm_read_4k_random, false, false},
        {"open_read_1MiB", bm_open_read, false, true},
        {"cat_devnull", bm_cat_devnull, false, false},
        {"cat_devnull_parallel", bm_cat_devnull, true, false, mmap},
        {"cat_pipe", bm_cat_pipe, false, true},
        {"cat_pipe_parallel", bm_cat_pipe, true, true, mmap},
        {"convert_file", bm_convert_file<>, false, false},
        {"convert_file_parallel", bm_convert_file<>, true, false, automatic},
        {"convert_file_parallel_read", bm_convert_file<>, true, false, read},
        {"convert_file_parallel_mmap", bm_convert_file<>, true, false, mmap},
        {"convert_file_parallel_digest_blkhash", bm_convert_file<true>, true, false, automatic},
        {"hash_sha256", bm_hash<qcowmap::HashAlgorithm::sha256>, true, true, automatic},
        {"hash_sha256_read", bm_hash<qcowmap::HashAlgorithm::sha256>, true, true, read},
        {"hash_sha256_mmap", bm_hash<qcowmap::HashAlgorithm::sha256>, true, true, mmap},
        {"hash_xxh3_128", bm_hash<qcowmap::HashAlgorithm::xxh3_128>, true, true, automatic},
        // The block construction costs what the allocated data costs: huge thin images too.
        {"hash_blkhash_sha256", bm_hash<qcowmap::HashAlgorithm::blkhash_sha256>, true, false,
         automatic},
        {"hash_blocks_1thread", bm_hash_blocks, false, true},
        {"hash_blocks_parallel", bm_hash_blocks, true, true},
        {"compare_self", bm_compare_self, false, false},
        {"compare_copy", bm_compare_copy, true, false, automatic},
        {"compare_copy_read", bm_compare_copy, true, false, read},
        {"compare_copy_mmap", bm_compare_copy, true, false, mmap},
    };
    fmt::print(stderr, "automatic data access on this machine: {}\n",
               qcowmap::automatic_data_access() == read ? "read" : "mmap");
    // Convert outputs in memory when /dev/shm has room for the largest (1 GiB of data).
    fs::path out_dir = bench.dir;
    if (std::error_code ec; fs::space("/dev/shm", ec).available > (2ull << 30) && !ec &&
                            ::access("/dev/shm", W_OK) == 0) {
        out_dir = "/dev/shm";
    }
    // The CLI's worker_threads(): one per core.
    const unsigned cores = std::max(2u, std::thread::hardware_concurrency());
    for (const Entry& entry : entries) {
        const Fn fn = entry.fn;
        const Setup setup{bench.dir, entry.parallel ? cores : 0, entry.access, out_dir};
        for (const BenchImage& b : bench.images) {
            if (entry.every_byte && b.huge)
                continue;
            std::string full = fmt::format("{}/{}", entry.name, b.name);
            benchmark::RegisterBenchmark(
                full.c_str(), [fn, &b, setup](benchmark::State& state) { fn(state, b, setup); })
                ->Unit(benchmark::kMillisecond)
                ->UseRealTime()
                ->ComputeStatistics("min",
                                    [](const std::vector<double>& v) {
                                        return *std::min_element(v.begin(), v.end());
                                    })
                ->ComputeStatistics("max", [](const std::vector<double>& v) {
                    return *std::max_element(v.begin(), v.end());
                });
        }
    }
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return 0;
}

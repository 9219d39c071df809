// Image::visit with VisitOptions: data runs read with pread (DataAccess::read) give the same
// bytes, in the same order, as data taken from the mapping, for every kind of image and any
// number of producer threads; extents and runs carry the file and offset where their bytes
// live; a file cut short under an open image is an io_error in read mode (where the mapping
// would fault); the CLI's --io option; prefetching visits (pages made present ahead on the
// workers and dropped behind the visitor) give the same bytes with a bounded resident set, also
// where the kernel refuses MADV_POPULATE_READ.
#include "support.hpp"

#include <qcowmap/image.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstring>
#include <fcntl.h>
#include <fstream>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <set>
#include <span>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

namespace qcowmap {
namespace {

namespace fs = std::filesystem;
using test::run;
using test::run_ok;
using test::shell_quote;
using test::TempDir;

struct Piece {
    std::uint64_t offset = 0;
    std::uint64_t length = 0;
    bool zero = false;
};

/// The disk as the visit produced it, and the runs it handed out.
struct Visited {
    std::vector<std::byte> disk;
    std::vector<Piece> pieces;
};

Visited visit_all(const Image& image, const VisitOptions& options) {
    Visited v;
    v.disk.assign(static_cast<std::size_t>(image.size()), std::byte{0x5a});
    auto ok = image.visit(
        0, UINT64_MAX,
        [&](const qcowmap::Run& run) -> Result<void> {
            v.pieces.push_back({run.offset, run.length, run.bytes.empty()});
            if (run.bytes.empty()) {
                EXPECT_EQ(run.kind, ExtentKind::zero);
                std::memset(v.disk.data() + run.offset, 0, run.length);
            } else {
                EXPECT_EQ(run.bytes.size(), run.length);
                std::memcpy(v.disk.data() + run.offset, run.bytes.data(), run.length);
            }
            // Only data runs live in a file; only mapping mode hands out the mapping itself.
            EXPECT_EQ(run.file.has_value(), run.kind == ExtentKind::data && !image.path().empty());
            EXPECT_EQ(run.mapped, run.file && options.data_access == DataAccess::mapping);
            if (run.file) {
                std::vector<std::byte> via_pread(run.length);
                EXPECT_EQ(::pread(run.file->fd, via_pread.data(), via_pread.size(),
                                  static_cast<off_t>(run.file->offset)),
                          static_cast<ssize_t>(via_pread.size()));
                EXPECT_EQ(std::memcmp(via_pread.data(), run.bytes.data(), run.length), 0);
            }
            return {};
        },
        options);
    EXPECT_TRUE(ok) << ok.error().message;
    return v;
}

class Visit : public ::testing::Test {
  protected:
    /// Images of every kind the read path must handle: runs longer than one read piece,
    /// compressed clusters between data, a backing chain, an external data file, 512-byte
    /// clusters and extended L2 entries.
    std::vector<fs::path> images() {
        std::vector<fs::path> out;
        fs::path plain = dir_ / "plain.qcow2";
        test::make_image(plain, "cluster_size=64k", "6M",
                         {"write -P 0xab 0 1200k", "write -z 2M 512k", "write -P 0xcd 3M 1M",
                          "write -P 0x11 6080k 64k"});
        out.push_back(plain);

        fs::path compressed = dir_ / "compressed.qcow2";
        test::make_image(compressed, "cluster_size=64k", "4M",
                         {"write -P 0x21 0 512k", "write -c -P 0x22 512k 128k",
                          "write -P 0x23 640k 300k", "write -c -P 0x24 2M 64k"});
        out.push_back(compressed);

        fs::path base = dir_ / "base.qcow2";
        test::make_image(base, "cluster_size=64k", "4M", {"write -P 0x31 0 3M"});
        fs::path overlay = dir_ / "overlay.qcow2";
        run_ok("qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 " +
               shell_quote(overlay.string()));
        run_ok("qemu-io -c 'write -P 0x32 1M 700k' " + shell_quote(overlay.string()));
        out.push_back(overlay);

        fs::path external = dir_ / "external.qcow2";
        run_ok("qemu-img create -q -f qcow2 -o data_file=" +
               shell_quote((dir_ / "external.data").string()) + " " +
               shell_quote(external.string()) + " 3M");
        run_ok("qemu-io -c 'write -P 0x41 100k 1M' " + shell_quote(external.string()));
        out.push_back(external);

        fs::path small = dir_ / "small-clusters.qcow2";
        test::make_image(small, "cluster_size=512", "2M",
                         {"write -P 0x51 0 700k", "write -P 0x52 1M 3k"});
        out.push_back(small);

        fs::path subclusters = dir_ / "subclusters.qcow2";
        test::make_image(subclusters, "cluster_size=64k,extended_l2=on", "2M",
                         {"write -P 0x61 0 400k", "write -P 0x62 600k 6k"});
        out.push_back(subclusters);
        return out;
    }

    TempDir dir_;
};

TEST_F(Visit, ReadModeGivesTheMappingModesBytesForEveryImageKind) {
    for (const fs::path& path : images()) {
        auto image = Image::open(path);
        ASSERT_TRUE(image) << path << ": " << image.error().message;
        const std::vector<std::byte> expected = test::qemu_raw(path, dir_);
        Visited mapped = visit_all(*image, VisitOptions{1, DataAccess::mapping});
        EXPECT_EQ(mapped.disk, expected) << path;
        for (unsigned threads : {1u, 2u, 3u}) {
            Visited read = visit_all(*image, VisitOptions{threads, DataAccess::read});
            EXPECT_EQ(read.disk, expected) << path << " threads " << threads;
            // In order, contiguous, no data piece longer than one read buffer.
            std::uint64_t at = 0;
            for (const Piece& p : read.pieces) {
                EXPECT_EQ(p.offset, at) << path;
                EXPECT_GT(p.length, 0u) << path;
                if (!p.zero) {
                    EXPECT_LE(p.length, kReadPieceBytes) << path;
                }
                at = p.offset + p.length;
            }
            EXPECT_EQ(at, image->size()) << path;
        }
    }
}

TEST_F(Visit, LongRunsArriveInWholeReadPieces) {
    fs::path path = dir_ / "long.qcow2";
    test::make_image(path, "cluster_size=64k", "2M",
                     {"write -P 0x71 0 1M", "write -P 0x72 1M 100k"});
    auto image = Image::open(path);
    ASSERT_TRUE(image);
    Visited read = visit_all(*image, VisitOptions{2, DataAccess::read});
    // One contiguous data run of 1 MiB + two 64 KiB clusters (the 100 KiB write allocates
    // both) in the file: four full pieces and the rest.
    ASSERT_GE(read.pieces.size(), 5u);
    for (int i = 0; i < 4; ++i) {
        EXPECT_EQ(read.pieces[i].offset, i * kReadPieceBytes);
        EXPECT_EQ(read.pieces[i].length, kReadPieceBytes);
        EXPECT_FALSE(read.pieces[i].zero);
    }
    EXPECT_EQ(read.pieces[4].offset, 4 * kReadPieceBytes);
    EXPECT_EQ(read.pieces[4].length, 128u * 1024);
    EXPECT_FALSE(read.pieces[4].zero);
}

TEST_F(Visit, FileOfBackingAndDataFileExtentsIsTheirOwnFile) {
    fs::path base = dir_ / "base.qcow2";
    test::make_image(base, "cluster_size=64k", "1M", {"write -P 0xc1 0 128k"});
    fs::path overlay = dir_ / "overlay.qcow2";
    run_ok("qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 " + shell_quote(overlay.string()));
    run_ok("qemu-io -c 'write -P 0xc2 512k 64k' " + shell_quote(overlay.string()));
    fs::path external = dir_ / "external.qcow2";
    run_ok("qemu-img create -q -f qcow2 -o data_file=" +
           shell_quote((dir_ / "external.data").string()) + " " + shell_quote(external.string()) +
           " 1M");
    run_ok("qemu-io -c 'write -P 0xc3 192k 64k' " + shell_quote(external.string()));
    for (const fs::path& path : {overlay, external}) {
        auto image = Image::open(path);
        ASSERT_TRUE(image) << image.error().message;
        struct stat top {};
        ASSERT_EQ(::stat(path.c_str(), &top), 0);
        std::set<int> fds;
        int top_fd = -1;
        ExtentRange it = image->extents();
        for (const Extent& e : it) {
            if (e.kind != ExtentKind::data)
                continue;
            auto pos = e.file;
            ASSERT_TRUE(pos) << path;
            struct stat held {};
            ASSERT_EQ(::fstat(pos->fd, &held), 0);
            if (held.st_ino == top.st_ino && held.st_dev == top.st_dev)
                top_fd = pos->fd;
            fds.insert(pos->fd);
            std::vector<std::byte> via_pread(e.bytes.size());
            ASSERT_EQ(::pread(pos->fd, via_pread.data(), via_pread.size(),
                              static_cast<off_t>(pos->offset)),
                      static_cast<ssize_t>(via_pread.size()));
            EXPECT_EQ(std::memcmp(via_pread.data(), e.bytes.data(), e.bytes.size()), 0) << path;
        }
        if (path == overlay) {
            EXPECT_EQ(fds.size(), 2u); // the base's data and the overlay's own
        } else {
            ASSERT_EQ(fds.size(), 1u);
            EXPECT_EQ(top_fd, -1); // the data file, not the qcow2 file
        }
        EXPECT_FALSE(it.error()) << it.error()->message;
    }
}

TEST_F(Visit, ExtentFileNamesTheFileAndOffsetOfItsBytes) {
    fs::path path = dir_ / "pos.qcow2";
    test::make_image(path, "cluster_size=64k", "1M",
                     {"write -P 0x81 64k 128k", "write -c -P 0x82 512k 64k"});
    auto image = Image::open(path);
    ASSERT_TRUE(image);
    ExtentRange it = image->extents();
    int data_extents = 0;
    for (const Extent& e : it) {
        if (e.kind != ExtentKind::data) {
            EXPECT_FALSE(e.file); // zero runs have no bytes; compressed streams are decoded
            continue;
        }
        auto pos = e.file;
        ASSERT_TRUE(pos);
        EXPECT_GE(pos->fd, 0);
        {
            ++data_extents;
            EXPECT_EQ(pos->offset, *e.host_offset);
            std::vector<std::byte> via_pread(e.bytes.size());
            ASSERT_EQ(::pread(pos->fd, via_pread.data(), via_pread.size(),
                              static_cast<off_t>(pos->offset)),
                      static_cast<ssize_t>(via_pread.size()));
            EXPECT_EQ(std::memcmp(via_pread.data(), e.bytes.data(), e.bytes.size()), 0);
        }
    }
    EXPECT_EQ(data_extents, 1);
    // An image opened from memory has no file: read mode hands out spans of that memory.
    std::vector<std::byte> bytes = test::read_file(path);
    auto in_memory = Image::open_bytes(bytes);
    ASSERT_TRUE(in_memory);
    for (const Extent& e : in_memory->extents())
        EXPECT_FALSE(e.file);
    Visited read = visit_all(*in_memory, VisitOptions{2, DataAccess::read});
    EXPECT_EQ(read.disk, test::qemu_raw(path, dir_));
}

/// Truncates `path` to `size` bytes.
void truncate_file(const fs::path& path, std::uint64_t size) {
    ASSERT_EQ(::truncate(path.c_str(), static_cast<off_t>(size)), 0) << std::strerror(errno);
}

/// Cuts the file of `image` (at `path`) `keep` bytes into its first extent, a data run: the
/// metadata (header, L1, L2, refcounts) comes before it and survives.
void cut_inside_first_data_run(const Image& image, const fs::path& path, std::uint64_t keep) {
    ExtentRange extents = image.extents();
    Extent data;
    ASSERT_TRUE(extents.next(data));
    ASSERT_EQ(data.kind, ExtentKind::data);
    truncate_file(path, *data.host_offset + keep);
}

TEST_F(Visit, FileCutShortUnderAnOpenImageIsAnIoErrorInReadMode) {
    fs::path path = dir_ / "shrinks.qcow2";
    test::make_image(path, "cluster_size=64k", "4M", {"write -P 0x91 0 2M"});
    auto image = Image::open(path);
    ASSERT_TRUE(image);
    ASSERT_NO_FATAL_FAILURE(cut_inside_first_data_run(*image, path, 300 * 1024));
    for (unsigned threads : {1u, 2u}) {
        auto ok = image->visit(
            0, UINT64_MAX, [](const qcowmap::Run&) -> Result<void> { return {}; },
            VisitOptions{threads, DataAccess::read});
        ASSERT_FALSE(ok) << threads;
        // The cause, not the symptom (issue 25; was io_error "the file ends before offset").
        EXPECT_EQ(ok.error().code, ErrorCode::image_changed);
        EXPECT_NE(ok.error().message.find("image changed while being read (" + path.string() +
                                          " shrank from "),
                  std::string::npos)
            << ok.error().message;
    }
}

TEST_F(Visit, IoOptionIsCheckedAndBothModesGiveTheSameOutput) {
    fs::path path = dir_ / "io.qcow2";
    test::make_image(path, "cluster_size=64k", "3M",
                     {"write -P 0xb1 0 700k", "write -c -P 0xb2 1M 64k", "write -P 0 2M 64k"});
    const std::string bin = shell_quote(test::qcowmap_bin());
    const std::string img = shell_quote(path.string());
    EXPECT_EQ(run_ok(bin + " hash " + img), run_ok(bin + " hash --io=mmap " + img));
    EXPECT_EQ(run_ok(bin + " hash --block-size=64k " + img),
              run_ok(bin + " hash --block-size=64k --io=mmap " + img));
    const std::vector<std::byte> expected = test::qemu_raw(path, dir_);
    EXPECT_EQ(run_ok(bin + " hash " + img), run_ok(bin + " hash --io=read " + img));
    EXPECT_EQ(run_ok(bin + " hash " + img), run_ok(bin + " hash --io=auto " + img));
    for (std::string io : {"read", "mmap", "auto"}) {
        for (std::string sparse : {"", "-S 0 "}) {
            fs::path out = dir_ / ("out-" + io + ".raw");
            run_ok(bin + " convert --force --io=" + io + " " + sparse + img + " " +
                   shell_quote(out.string()));
            EXPECT_EQ(test::read_file(out), expected) << io << " " << sparse;
        }
    }
    auto bad = run(bin + " hash --io=fast " + img);
    EXPECT_EQ(bad.exit_code, 1) << bad.err;
    EXPECT_NE(bad.err.find("--io"), std::string::npos) << bad.err;
}

TEST_F(Visit, PrefetchingGivesTheSameBytesForEveryImageKind) {
    for (const fs::path& path : images()) {
        auto image = Image::open(path);
        ASSERT_TRUE(image) << path << ": " << image.error().message;
        const std::vector<std::byte> expected = test::qemu_raw(path, dir_);
        for (Prefetch prefetch : {Prefetch::populate, Prefetch::touch}) {
            for (unsigned threads : {1u, 2u, 3u}) {
                SCOPED_TRACE(path.string() + " prefetch " +
                             std::to_string(static_cast<int>(prefetch)) + " threads " +
                             std::to_string(threads));
                Visited v = visit_all(*image, VisitOptions{threads, DataAccess::mapping, prefetch});
                EXPECT_EQ(v.disk, expected);
                // In order, contiguous, no data piece longer than one prefetch window.
                std::uint64_t at = 0;
                for (const Piece& p : v.pieces) {
                    EXPECT_EQ(p.offset, at);
                    if (!p.zero) {
                        EXPECT_LE(p.length, kPrefetchWindowBytes);
                    }
                    at = p.offset + p.length;
                }
                EXPECT_EQ(at, image->size());
            }
        }
        // The measured choice gives the same bytes as both of its candidates.
        Visited automatic = visit_all(*image, VisitOptions{2, automatic_data_access()});
        EXPECT_EQ(automatic.disk, expected) << path;
    }
}

/// The options of the walks the caller drives (Image::runs): without threads and with, each
/// data access, with and without prefetching.
std::vector<VisitOptions> run_options() {
    return {VisitOptions{1, DataAccess::mapping, Prefetch::none},
            VisitOptions{1, DataAccess::mapping, Prefetch::touch},
            VisitOptions{3, DataAccess::mapping, Prefetch::touch},
            VisitOptions{1, DataAccess::read, Prefetch::none},
            VisitOptions{2, DataAccess::read, Prefetch::none},
            VisitOptions{3, DataAccess::read, Prefetch::touch}};
}

std::string describe(const VisitOptions& o) {
    return "threads " + std::to_string(o.threads) + " read " +
           std::to_string(o.data_access == DataAccess::read) + " prefetch " +
           std::to_string(static_cast<int>(o.prefetch));
}

TEST_F(Visit, RunsGiveTheVisitsRunsToACallerThatStepsAndKeepsTheirBytes) {
    for (const fs::path& path : images()) {
        auto image = Image::open(path);
        ASSERT_TRUE(image) << path << ": " << image.error().message;
        const std::vector<std::byte> expected = test::qemu_raw(path, dir_);
        for (const VisitOptions& options : run_options()) {
            SCOPED_TRACE(path.string() + " " + describe(options));
            const Visited visited = visit_all(*image, options);
            // Every run's bytes are kept until the walk is over: the buffers the walk reads
            // into would have been reused by then if hold() did not keep them.
            struct Kept {
                std::uint64_t offset;
                std::shared_ptr<const void> owner;
                std::span<const std::byte> bytes;
            };
            std::vector<Kept> kept;
            std::vector<Piece> pieces;
            {
                RunRange runs = image->runs(0, UINT64_MAX, options);
                for (const qcowmap::Run& run : runs) {
                    pieces.push_back({run.offset, run.length, run.bytes.empty()});
                    const Extent& from = runs.walk().extent();
                    EXPECT_LE(from.offset, run.offset);
                    EXPECT_GE(from.offset + from.length, run.offset + run.length);
                    EXPECT_EQ(from.kind, run.kind);
                    std::shared_ptr<const void> owner = runs.walk().hold();
                    // Only bytes outside the mapping need an owner.
                    EXPECT_EQ(owner == nullptr, run.mapped || run.kind == ExtentKind::zero);
                    if (!run.bytes.empty())
                        kept.push_back({run.offset, std::move(owner), run.bytes});
                }
                ASSERT_FALSE(runs.error()) << runs.error()->message;
            }
            ASSERT_EQ(pieces.size(), visited.pieces.size());
            for (std::size_t i = 0; i < pieces.size(); ++i) {
                EXPECT_EQ(pieces[i].offset, visited.pieces[i].offset) << i;
                EXPECT_EQ(pieces[i].length, visited.pieces[i].length) << i;
                EXPECT_EQ(pieces[i].zero, visited.pieces[i].zero) << i;
            }
            std::vector<std::byte> disk(expected.size(), std::byte{0});
            for (const Kept& k : kept)
                std::memcpy(disk.data() + k.offset, k.bytes.data(), k.bytes.size());
            EXPECT_EQ(disk, expected);
        }
    }
}

TEST_F(Visit, RunsLeftEarlyStopTheirWorkersAndAnotherRangeStartsAnywhere) {
    fs::path path = dir_ / "early.qcow2";
    test::make_image(path, "cluster_size=64k", "8M",
                     {"write -P 0xc1 0 3M", "write -c -P 0xc2 3M 1M", "write -P 0xc3 5M 2M"});
    auto image = Image::open(path);
    ASSERT_TRUE(image);
    const std::vector<std::byte> expected = test::qemu_raw(path, dir_);
    for (const VisitOptions& options : run_options()) {
        SCOPED_TRACE(describe(options));
        for (std::uint64_t start : {0ull, 777ull * 1024 + 5, 3ull * 1024 * 1024 + 4096}) {
            RunRange runs = image->runs(start, start + 2 * 1024 * 1024 + 3, options);
            std::uint64_t at = start;
            int steps = 0;
            for (const qcowmap::Run& run : runs) {
                EXPECT_EQ(run.offset, at);
                if (!run.bytes.empty()) {
                    EXPECT_EQ(
                        std::memcmp(run.bytes.data(), expected.data() + run.offset, run.length), 0);
                }
                at += run.length;
                if (++steps == 3)
                    break; // the range is dropped with jobs in flight
            }
            EXPECT_FALSE(runs.error());
            EXPECT_GT(at, start);
        }
    }
}

TEST_F(Visit, FileCutShortUnderRunsEndsTheWalkWithAnErrorNotAFault) {
    fs::path path = dir_ / "cut.qcow2";
    test::make_image(path, "cluster_size=64k", "8M", {"write -P 0xd1 0 6M"});
    auto image = Image::open(path);
    ASSERT_TRUE(image);
    ASSERT_NO_FATAL_FAILURE(cut_inside_first_data_run(*image, path, 2 * 1024 * 1024));
    // Only the walks that produce every byte inside the boundary: read, or mapped with touch
    // (without prefetching the caller's own reads of the mapping would fault).
    for (const VisitOptions& options : run_options()) {
        if (options.data_access == DataAccess::mapping && options.prefetch == Prefetch::none)
            continue;
        SCOPED_TRACE(describe(options));
        RunRange runs = image->runs(0, UINT64_MAX, options);
        std::uint64_t sum = 0;
        for (const qcowmap::Run& run : runs) {
            for (std::byte b : run.bytes)
                sum += static_cast<std::uint8_t>(b); // reads every byte handed out
        }
        ASSERT_TRUE(runs.error());
        // The cause: the file shrank (explain() names it whichever read met the end first).
        EXPECT_EQ(runs.error()->code, ErrorCode::image_changed) << runs.error()->message;
        EXPECT_NE(runs.error()->message.find("image changed while being read"), std::string::npos)
            << runs.error()->message;
        // The pieces before the cut came first, unless a worker reading ahead met the cut
        // during the very first step (its fault fails the step that sees it).
        if (options.threads <= 1) {
            EXPECT_GT(sum, 0u);
        }
    }
}

TEST_F(Visit, AutomaticDataAccessIsMeasuredOnceAndIsOneOfTheTwo) {
    const DataAccess first = automatic_data_access();
    EXPECT_TRUE(first == DataAccess::mapping || first == DataAccess::read);
    for (int i = 0; i < 3; ++i)
        EXPECT_EQ(automatic_data_access(), first);
}

/// This process's resident file-backed pages in KiB (RssFile in /proc/self/status).
std::uint64_t rss_file_kib() {
    std::ifstream status("/proc/self/status");
    std::string line;
    while (std::getline(status, line)) {
        if (line.starts_with("RssFile:"))
            return std::stoull(line.substr(8));
    }
    ADD_FAILURE() << "no RssFile in /proc/self/status";
    return 0;
}

TEST_F(Visit, PrefetchingDropsPagesBehindTheVisitor) {
    fs::path path = dir_ / "large.qcow2";
    // 128 MiB of data: one long run, then 64 KiB runs in every other cluster.
    std::vector<std::string> writes = {"write -P 0x21 0 64M"};
    for (int i = 0; i < 512; ++i)
        writes.push_back("write -P 0x22 " + std::to_string(64 + i * 0.125) + "M 64k");
    writes.push_back("write -P 0x23 128M 32M");
    test::make_image(path, "cluster_size=64k", "160M", writes);
    auto image = Image::open(path);
    ASSERT_TRUE(image);
    // Sampled every 8 MiB of visited data: the most the process held while visiting.
    auto peak_growth = [&](const VisitOptions& options) {
        const std::uint64_t before = rss_file_kib();
        std::uint64_t peak = before;
        std::uint64_t since_sample = 0;
        std::uint64_t checksum = 0;
        auto ok = image->visit(
            0, UINT64_MAX,
            [&](const qcowmap::Run& run) -> Result<void> {
                for (std::size_t i = 0; i < run.bytes.size(); i += 4096)
                    checksum += std::to_integer<unsigned>(run.bytes[i]);
                since_sample += run.bytes.size();
                if (since_sample >= (8u << 20)) {
                    since_sample = 0;
                    peak = std::max(peak, rss_file_kib());
                }
                return {};
            },
            options);
        EXPECT_TRUE(ok) << ok.error().message;
        EXPECT_EQ(checksum, (64u << 20) / 4096 * 0x21 + (32u << 20) / 4096 * 0x22 +
                                (32u << 20) / 4096 * 0x23);
        return (peak - before) / 1024; // MiB
    };
    for (unsigned threads : {1u, 2u}) {
        for (Prefetch prefetch : {Prefetch::populate, Prefetch::touch}) {
            // At most the ring's windows ahead (4 per thread) and a batch being dropped behind.
            EXPECT_LT(peak_growth(VisitOptions{threads, DataAccess::mapping, prefetch}), 48u)
                << threads << " " << static_cast<int>(prefetch);
        }
    }
    // Without prefetching the pages stay: the measurement sees them (and the Image keeps them
    // until it is closed).
    EXPECT_GT(peak_growth(VisitOptions{2, DataAccess::mapping, Prefetch::none}), 100u);
}

TEST_F(Visit, WithoutMadvPopulateReadPrefetchingFallsBackToTouching) {
    // A child process whose madvise(MADV_POPULATE_READ) fails with EINVAL, as on kernels older
    // than 5.14 (seccomp filter), visits every image kind with prefetching.
    std::vector<std::pair<fs::path, std::vector<std::byte>>> cases;
    for (const fs::path& path : images())
        cases.emplace_back(path, test::qemu_raw(path, dir_));
    fflush(nullptr);
    pid_t child = ::fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
        constexpr unsigned kPopulateRead = 22;
        sock_filter filter[] = {
            BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)),
            BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_madvise, 0, 3),
            BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, args[2])),
            BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, kPopulateRead, 0, 1),
            BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EINVAL),
            BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        };
        sock_fprog program{static_cast<unsigned short>(std::size(filter)), filter};
        if (::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 ||
            ::prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &program) != 0)
            ::_exit(10);
        static char probe[4096];
        errno = 0;
        if (::madvise(probe, sizeof probe, kPopulateRead) == 0 || errno != EINVAL)
            ::_exit(11); // the filter does not work: the test would prove nothing
        for (const auto& [path, expected] : cases) {
            auto image = Image::open(path);
            if (!image)
                ::_exit(12);
            for (Prefetch prefetch : {Prefetch::populate, Prefetch::touch}) {
                std::vector<std::byte> disk(expected.size(), std::byte{0x5a});
                auto ok = image->visit(
                    0, UINT64_MAX,
                    [&](const qcowmap::Run& run) -> Result<void> {
                        if (run.bytes.empty())
                            std::memset(disk.data() + run.offset, 0, run.length);
                        else
                            std::memcpy(disk.data() + run.offset, run.bytes.data(), run.length);
                        return {};
                    },
                    VisitOptions{2, DataAccess::mapping, prefetch});
                if (!ok || disk != expected)
                    ::_exit(13);
            }
        }
        ::_exit(0);
    }
    int status = 0;
    ASSERT_EQ(::waitpid(child, &status, 0), child);
    ASSERT_TRUE(WIFEXITED(status)) << status;
    EXPECT_EQ(WEXITSTATUS(status), 0);
}

} // namespace
} // namespace qcowmap

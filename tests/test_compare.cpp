// qcowmap compare against qemu-img compare: same exit code and same output (first differing
// offset, strict-mode messages) on identical, different and differently-allocated pairs,
// qcow2 and raw, strict and not; the library API; error exit codes.
#include "support.hpp"

#include <qcowmap/compare.hpp>

#include <gtest/gtest.h>

namespace qcowmap {
namespace {

using test::cli;

namespace fs = std::filesystem;
using test::CommandResult;
using test::run;
using test::run_ok;
using test::shell_quote;
using test::TempDir;

class Compare : public ::testing::Test {
  protected:
    fs::path image(const std::string& name, const std::string& options, const std::string& size,
                   const std::vector<std::string>& io = {}) {
        fs::path p = dir_ / name;
        test::make_image(p, options, size, io);
        return p;
    }
    fs::path raw_of(const fs::path& img) {
        fs::path raw = img;
        raw.replace_extension(".raw");
        run_ok("qemu-img convert -O raw " + shell_quote(img.string()) + " " +
               shell_quote(raw.string()));
        return raw;
    }

    /// qcowmap compare and qemu-img compare agree on A vs B (and B vs A), strict and not.
    /// Returns qemu-img's non-strict output for further checks.
    std::string expect_agree(const fs::path& a, const fs::path& b) {
        std::string first;
        for (std::string flags : {"", "-s"}) {
            for (int swap = 0; swap < 2; ++swap) {
                const fs::path& x = swap ? b : a;
                const fs::path& y = swap ? a : b;
                std::string args =
                    flags + " " + shell_quote(x.string()) + " " + shell_quote(y.string());
                CommandResult qemu = run("qemu-img compare " + args);
                // The measured default, data read into buffers, and straight from the mappings.
                for (std::string io : {"", "--io=read ", "--io=mmap "}) {
                    CommandResult ours = run(cli() + " compare " + io + args);
                    EXPECT_EQ(ours.exit_code, qemu.exit_code) << io << args << "\n"
                                                              << qemu.out << ours.out;
                    EXPECT_EQ(ours.out, qemu.out) << io << args;
                    EXPECT_EQ(ours.err, "") << io << args;
                }
                if (first.empty())
                    first = qemu.out;
            }
        }
        return first;
    }

    TempDir dir_;
};

TEST_F(Compare, IdenticalCopies) {
    fs::path a = image("a.qcow2", "cluster_size=64k", "4M",
                       {"write -P 0x11 0 100k", "write -z 1M 64k", "write -P 0x22 3M 512"});
    fs::path b = dir_ / "b.qcow2";
    fs::copy_file(a, b);
    EXPECT_EQ(expect_agree(a, b), "Images are identical.\n");
    EXPECT_EQ(expect_agree(a, a), "Images are identical.\n"); // same file: nothing is read
}

TEST_F(Compare, OneByteDifferenceAtSectorGranularity) {
    fs::path a = image("a.qcow2", "cluster_size=64k", "4M", {"write -P 0x11 0 2M"});
    fs::path b = image("b.qcow2", "cluster_size=64k", "4M",
                       {"write -P 0x11 0 2M", "write -P 0x12 1234567 1"});
    EXPECT_EQ(expect_agree(a, b), "Content mismatch at offset 1234432!\n");
    auto ia = Image::open(a);
    auto ib = Image::open(b);
    ASSERT_TRUE(ia && ib);
    for (DataAccess access : {DataAccess::read, DataAccess::mapping}) {
        CompareOptions options;
        options.data_access = access;
        auto r = compare_images(*ia, *ib, options);
        ASSERT_TRUE(r);
        EXPECT_EQ(r->outcome, CompareResult::Outcome::content_mismatch);
        EXPECT_EQ(r->offset, 1234432u); // 1234567 rounded down to 512, in the 2nd 1 MiB piece
    }
}

TEST_F(Compare, DifferentlyAllocatedSameContent) {
    // Data that is zeros vs a zero cluster vs unallocated: equal, except in strict mode.
    fs::path a = image("a.qcow2", "cluster_size=64k", "2M", {"write -P 0x33 0 64k"});
    fs::path b =
        image("b.qcow2", "cluster_size=64k", "2M", {"write -P 0x33 0 64k", "write -P 0 512k 64k"});
    fs::path c =
        image("c.qcow2", "cluster_size=64k", "2M", {"write -P 0x33 0 64k", "write -z 512k 128k"});
    EXPECT_EQ(expect_agree(a, b), "Images are identical.\n");
    EXPECT_EQ(expect_agree(a, c), "Images are identical.\n");
    EXPECT_EQ(expect_agree(b, c), "Images are identical.\n");
    CommandResult strict =
        run(cli() + " compare -s " + shell_quote(a.string()) + " " + shell_quote(b.string()));
    EXPECT_EQ(strict.exit_code, 1);
    EXPECT_EQ(strict.out, "Strict mode: Offset 65536 block status mismatch!\n");
}

TEST_F(Compare, DataAgainstUnallocated) {
    fs::path a = image("a.qcow2", "cluster_size=64k", "2M", {"write -P 0x33 0 64k"});
    fs::path b = image("b.qcow2", "cluster_size=64k", "2M",
                       {"write -P 0x33 0 64k", "write -P 0x44 700k 3000"});
    EXPECT_EQ(expect_agree(a, b), "Content mismatch at offset 716800!\n");
}

// Both sides compressed (zlib against zstd): their clusters are decompressed at once on two
// threads; the first difference sits in a late cluster, after many equal ones.
TEST_F(Compare, CompressedAgainstCompressed) {
    fs::path a = image("a.qcow2", "cluster_size=64k,compression_type=zlib", "4M");
    fs::path b = image("b.qcow2", "cluster_size=64k,compression_type=zstd", "4M");
    run_ok("qemu-io -c 'write -c -P 0x61 0 3M' " + shell_quote(a.string()));
    // (A compressed write cannot overwrite a compressed cluster: b is written around it.)
    run_ok("qemu-io -c 'write -c -P 0x61 0 2816k' -c 'write -c -P 0x62 2816k 64k' "
           "-c 'write -c -P 0x61 2880k 192k' " +
           shell_quote(b.string()));
    EXPECT_EQ(expect_agree(a, b), "Content mismatch at offset 2883584!\n");
    fs::path same = dir_ / "same.qcow2";
    run_ok("qemu-img convert -c -O qcow2 -o compression_type=zstd " + shell_quote(a.string()) +
           " " + shell_quote(same.string()));
    EXPECT_EQ(expect_agree(a, same), "Images are identical.\n");
}

TEST_F(Compare, CompressedAgainstPlain) {
    fs::path plain = image("p.qcow2", "cluster_size=64k", "2M",
                           {"write -P 0x51 0 256k", "write -P 0x52 1M 64k"});
    fs::path packed = dir_ / "c.qcow2";
    run_ok("qemu-img convert -c -O qcow2 " + shell_quote(plain.string()) + " " +
           shell_quote(packed.string()));
    EXPECT_EQ(expect_agree(plain, packed), "Images are identical.\n");
    fs::path other =
        image("o.qcow2", "cluster_size=64k", "2M",
              {"write -P 0x51 0 256k", "write -P 0x52 1M 64k", "write -P 0x53 200000 10"});
    EXPECT_EQ(expect_agree(packed, other), "Content mismatch at offset 199680!\n");
}

TEST_F(Compare, RawAgainstQcow2) {
    fs::path a =
        image("a.qcow2", "cluster_size=64k", "2M", {"write -P 0x61 0 128k", "write -P 0x62 1M 4k"});
    fs::path raw = raw_of(a);
    EXPECT_EQ(expect_agree(a, raw), "Images are identical.\n");
    fs::path b =
        image("b.qcow2", "cluster_size=64k", "2M", {"write -P 0x61 0 128k", "write -P 0x63 1M 4k"});
    EXPECT_EQ(expect_agree(b, raw), "Content mismatch at offset 1048576!\n");
    // Explicit formats work too.
    CommandResult r = run(cli() + " compare -f qcow2 -F raw " + shell_quote(a.string()) + " " +
                          shell_quote(raw.string()));
    EXPECT_EQ(r.exit_code, 0);
    EXPECT_EQ(r.out, "Images are identical.\n");
}

TEST_F(Compare, DifferentSizes) {
    fs::path small = image("s.qcow2", "cluster_size=64k", "1M", {"write -P 0x71 0 64k"});
    fs::path big_zero_tail =
        image("z.qcow2", "cluster_size=64k", "3M", {"write -P 0x71 0 64k", "write -z 2M 64k"});
    fs::path big_data_tail = image("d.qcow2", "cluster_size=64k", "3M",
                                   {"write -P 0x71 0 64k", "write -P 0x72 2100000 10"});
    EXPECT_EQ(expect_agree(small, big_zero_tail),
              "Warning: Image size mismatch!\nImages are identical.\n");
    EXPECT_EQ(expect_agree(small, big_data_tail),
              "Warning: Image size mismatch!\nContent mismatch at offset 2099712!\n");
    CommandResult strict = run(cli() + " compare -s " + shell_quote(small.string()) + " " +
                               shell_quote(big_zero_tail.string()));
    EXPECT_EQ(strict.exit_code, 1);
    EXPECT_EQ(strict.out, "Strict mode: Image size mismatch!\n");
}

TEST_F(Compare, BackingChainAgainstItsFlatCopy) {
    fs::path base = image("base.qcow2", "cluster_size=64k", "2M",
                          {"write -P 0x01 0 1M", "write -P 0x02 1536k 64k"});
    fs::path top = dir_ / "top.qcow2";
    run_ok("qemu-img create -q -f qcow2 -b " + shell_quote(base.string()) + " -F qcow2 " +
           shell_quote(top.string()));
    run_ok("qemu-io -f qcow2 -c 'write -P 0x09 128k 64k' -c 'write -z 512k 64k' " +
           shell_quote(top.string()));
    fs::path flat = dir_ / "flat.qcow2";
    run_ok("qemu-img convert -O qcow2 " + shell_quote(top.string()) + " " +
           shell_quote(flat.string()));
    EXPECT_EQ(expect_agree(top, flat), "Images are identical.\n");
    // The overlay against its own base: the shared ranges are the same bytes of the same file.
    EXPECT_EQ(expect_agree(top, base), "Content mismatch at offset 131072!\n");
}

TEST_F(Compare, StrictStatusMismatches) {
    fs::path a = image("a.qcow2", "cluster_size=64k", "1M", {"write -P 1 0 64k"});
    fs::path b = dir_ / "b.qcow2";
    fs::copy_file(a, b);
    run_ok("qemu-io -f qcow2 -c 'write -z 512k 64k' " + shell_quote(b.string()));
    expect_agree(a, b);
    fs::path raw = raw_of(a);
    expect_agree(a, raw);
    fs::path packed = dir_ / "c.qcow2";
    run_ok("qemu-img convert -c -O qcow2 " + shell_quote(a.string()) + " " +
           shell_quote(packed.string()));
    expect_agree(a, packed);
    auto ia = Image::open(a);
    auto ic = Image::open(packed);
    ASSERT_TRUE(ia && ic);
    CompareOptions strict;
    strict.strict = true;
    auto r = compare_images(*ia, *ic, strict);
    ASSERT_TRUE(r);
    EXPECT_EQ(r->outcome, CompareResult::Outcome::status_mismatch);
    EXPECT_EQ(r->offset, 0u);
}

TEST_F(Compare, ErrorsUseQemuImgExitCodes) {
    fs::path a = image("a.qcow2", "cluster_size=64k", "1M", {"write -P 1 0 64k"});
    fs::path missing = dir_ / "missing.qcow2";
    CommandResult r =
        run(cli() + " compare " + shell_quote(a.string()) + " " + shell_quote(missing.string()));
    EXPECT_EQ(r.exit_code, 2);
    EXPECT_EQ(r.err, "qcowmap: " + missing.string() + ": No such file or directory\n");
    EXPECT_EQ(
        run("qemu-img compare " + shell_quote(a.string()) + " " + shell_quote(missing.string()))
            .exit_code,
        2);

    // An L1 entry pointing beyond the file: an allocation-check error (3).
    fs::path bad = dir_ / "bad.qcow2";
    fs::copy_file(a, bad);
    auto bytes = test::read_file(bad);
    std::uint64_t l1 = 0;
    for (int i = 40; i < 48; ++i)
        l1 = (l1 << 8) | static_cast<std::uint8_t>(bytes[i]);
    const std::uint8_t entry[8] = {0x80, 0, 0, 0x7f, 0, 0, 0, 0};
    for (int i = 0; i < 8; ++i)
        bytes[l1 + i] = std::byte{entry[i]};
    test::write_file(bad, bytes);
    r = run(cli() + " compare " + shell_quote(a.string()) + " " + shell_quote(bad.string()));
    EXPECT_EQ(r.exit_code, 3);
    EXPECT_TRUE(r.err.starts_with("qcowmap: " + bad.string() + ": L2 table at 0x7f00000000"))
        << r.err;

    // A compressed cluster whose stream is garbage: a read error (4).
    fs::path packed = dir_ / "packed.qcow2";
    run_ok("qemu-img convert -c -O qcow2 " + shell_quote(a.string()) + " " +
           shell_quote(packed.string()));
    auto image = Image::open(packed);
    ASSERT_TRUE(image);
    Extent e;
    auto it = image->extents();
    ASSERT_TRUE(it.next(e));
    ASSERT_EQ(e.kind, ExtentKind::compressed);
    auto pbytes = test::read_file(packed);
    for (std::uint64_t i = 0; i < 64; ++i)
        pbytes[e.compressed_host_offset + i] = std::byte{0xff};
    test::write_file(packed, pbytes);
    r = run(cli() + " compare " + shell_quote(a.string()) + " " + shell_quote(packed.string()));
    EXPECT_EQ(r.exit_code, 4) << r.err;
    EXPECT_TRUE(r.err.starts_with("qcowmap: " + packed.string() + ": ")) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1);
    EXPECT_EQ(
        run("qemu-img compare " + shell_quote(a.string()) + " " + shell_quote(packed.string()))
            .exit_code,
        4);

    // Usage errors.
    EXPECT_EQ(run(cli() + " compare " + shell_quote(a.string())).exit_code, 1);
    EXPECT_EQ(
        run(cli() + " compare -f vmdk " + shell_quote(a.string()) + " " + shell_quote(a.string()))
            .exit_code,
        1);
}

TEST_F(Compare, QuietPrintsNothing) {
    fs::path a = image("a.qcow2", "", "1M", {"write -P 1 0 4k"});
    fs::path b = image("b.qcow2", "", "1M", {"write -P 2 0 4k"});
    CommandResult r =
        run(cli() + " compare -q " + shell_quote(a.string()) + " " + shell_quote(b.string()));
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_EQ(r.out, "");
}

// The library in every data access mode and thread count: the same answers. Fragmented data
// (64 KiB runs, grouped into prefetch jobs), long runs (cut into 1 MiB steps), compressed
// clusters against plain data, and a longer disk whose tail must be read.
// A damaged compressed cluster after the first difference: the difference is the answer on
// any number of threads (workers decompress clusters in groups; a cluster's error must surface
// only when the comparison reaches that cluster, and name its image).
TEST_F(Compare, DifferenceBeforeADamagedClusterWinsOnEveryThreadCount) {
    fs::path a = image("a.qcow2", "cluster_size=64k,compression_type=zstd", "1M",
                       {"write -c -P 0x11 0 64k", "write -c -P 0x22 64k 64k"});
    fs::path b = image("b.qcow2", "cluster_size=64k,compression_type=zstd", "1M",
                       {"write -c -P 0x33 0 64k", "write -c -P 0x22 64k 64k"});
    std::uint64_t host = 0;
    {
        auto opened = Image::open(b);
        ASSERT_TRUE(opened) << opened.error().message;
        for (const Extent& e : opened->extents()) {
            if (e.kind == ExtentKind::compressed && e.offset == 64 * 1024)
                host = e.compressed_host_offset;
        }
    }
    ASSERT_NE(host, 0u);
    std::vector<std::byte> bytes = test::read_file(b);
    for (std::uint64_t i = 0; i < 64 && host + i < bytes.size(); ++i)
        bytes[host + i] = std::byte(0xff - i);
    test::write_file(b, bytes);
    auto x = Image::open(a);
    auto y = Image::open(b);
    ASSERT_TRUE(x && y);
    for (unsigned threads : {1u, 2u, 3u}) {
        for (bool swapped : {false, true}) {
            SCOPED_TRACE(testing::Message() << "threads " << threads << " swapped " << swapped);
            CompareOptions options;
            options.threads = threads;
            auto r = swapped ? compare_images(*y, *x, options) : compare_images(*x, *y, options);
            ASSERT_TRUE(r) << r.error().message;
            EXPECT_EQ(r->outcome, CompareResult::Outcome::content_mismatch);
            EXPECT_EQ(r->offset, 0u);
        }
    }
    // Equal first clusters: the damaged one is the error, named on b's side.
    fs::path c = image("c.qcow2", "cluster_size=64k,compression_type=zstd", "1M",
                       {"write -c -P 0x33 0 64k", "write -c -P 0x22 64k 64k"});
    auto z = Image::open(c);
    ASSERT_TRUE(z);
    for (unsigned threads : {1u, 2u, 3u}) {
        SCOPED_TRACE(testing::Message() << "threads " << threads);
        CompareOptions options;
        options.threads = threads;
        auto r = compare_images(*z, *y, options);
        ASSERT_FALSE(r);
        EXPECT_EQ(r.error().code, ErrorCode::compressed_data) << r.error().message;
        EXPECT_EQ(r.error().origin, ErrorOrigin::image);
        EXPECT_EQ(r.error().path, y->path().string());
        EXPECT_NE(r.error().path, z->path().string());
        EXPECT_EQ(r.error().stage, ErrorStage::read);
    }
}

// Default threads on small files: the comparison starts on the calling thread and, once 8 MiB
// of compressed clusters were decompressed there, hands the rest to the workers mid-way (at a
// step where no side is inside a cluster already decompressed).
TEST_F(Compare, SmallCompressedFilesMoveToThreadsMidWay) {
    fs::path a = image("a.qcow2", "cluster_size=64k,compression_type=zstd", "32M",
                       {"write -c -P 0x41 0 24M"});
    fs::path b = image(
        "b.qcow2", "cluster_size=32k", "32M",
        {"write -c -P 0x41 0 20M", "write -c -P 0x42 20M 32k", "write -c -P 0x41 20512k 4064k"});
    fs::path same = dir_ / "same.qcow2";
    run_ok("qemu-img convert -c -O qcow2 -o cluster_size=32k " + shell_quote(a.string()) + " " +
           shell_quote(same.string()));
    auto x = Image::open(a);
    auto y = Image::open(b);
    auto z = Image::open(same);
    ASSERT_TRUE(x && y && z);
    for (DataAccess access : {DataAccess::mapping, DataAccess::read}) {
        CompareOptions options; // threads 0: the default
        options.data_access = access;
        auto r = compare_images(*x, *y, options);
        ASSERT_TRUE(r) << r.error().message;
        EXPECT_EQ(r->outcome, CompareResult::Outcome::content_mismatch);
        EXPECT_EQ(r->offset, 20u << 20);
        r = compare_images(*x, *z, options);
        ASSERT_TRUE(r) << r.error().message;
        EXPECT_EQ(r->outcome, CompareResult::Outcome::identical);
    }
}

TEST_F(Compare, EveryDataAccessAndThreadCountGivesTheSameAnswer) {
    std::vector<std::string> writes = {"write -P 0x71 0 3M"};
    for (int i = 0; i < 40; ++i)
        writes.push_back("write -P 0x72 " + std::to_string(3 * 1024 + i * 128) + "k 64k");
    fs::path a = image("a.qcow2", "cluster_size=64k", "10M", writes);
    writes.push_back("write -P 0x73 8200000 3");
    fs::path b = image("b.qcow2", "cluster_size=64k", "10M", writes);
    fs::path packed = dir_ / "packed.qcow2";
    run_ok("qemu-img convert -c -O qcow2 " + shell_quote(a.string()) + " " +
           shell_quote(packed.string()));
    // Compressed on both sides, in clusters of different sizes: the workers decompress clusters
    // of either side in groups, handed to the comparison one by one.
    fs::path packed_zstd = dir_ / "packed-zstd.qcow2";
    run_ok("qemu-img convert -c -O qcow2 -o compression_type=zstd,cluster_size=2M " +
           shell_quote(a.string()) + " " + shell_quote(packed_zstd.string()));
    fs::path packed_b = dir_ / "packed-b.qcow2";
    run_ok("qemu-img convert -c -O qcow2 -o cluster_size=32k " + shell_quote(b.string()) + " " +
           shell_quote(packed_b.string()));
    fs::path longer = dir_ / "longer.qcow2";
    run_ok("qemu-img convert -O qcow2 " + shell_quote(a.string()) + " " +
           shell_quote(longer.string()));
    run_ok("qemu-img resize -q " + shell_quote(longer.string()) + " 12M");
    fs::path longer_dirty = dir_ / "longer-dirty.qcow2";
    fs::copy_file(longer, longer_dirty);
    run_ok("qemu-io -c 'write -P 0x74 11M 1k' " + shell_quote(longer_dirty.string()));

    struct Pair {
        fs::path x, y;
        CompareResult::Outcome outcome;
        std::uint64_t offset;
        bool size_warning;
    };
    using O = CompareResult::Outcome;
    const std::vector<Pair> pairs = {
        {a, a, O::identical, 0, false},
        {a, b, O::content_mismatch, 8200000 / 512 * 512, false},
        {b, a, O::content_mismatch, 8200000 / 512 * 512, false},
        {a, packed, O::identical, 0, false},
        {packed, b, O::content_mismatch, 8200000 / 512 * 512, false},
        {packed, packed_zstd, O::identical, 0, false},
        {packed_zstd, packed_b, O::content_mismatch, 8200000 / 512 * 512, false},
        {packed_b, packed, O::content_mismatch, 8200000 / 512 * 512, false},
        {a, longer, O::identical, 0, true},
        {longer_dirty, a, O::content_mismatch, 11u << 20, true},
    };
    for (const Pair& p : pairs) {
        auto x = Image::open(p.x);
        auto y = Image::open(p.y);
        ASSERT_TRUE(x && y);
        for (DataAccess access : {DataAccess::mapping, DataAccess::read, DataAccess::automatic}) {
            for (unsigned threads : {1u, 2u, 3u}) {
                SCOPED_TRACE(p.x.filename().string() + " vs " + p.y.filename().string() +
                             " access " + std::to_string(static_cast<int>(access)) + " threads " +
                             std::to_string(threads));
                CompareOptions options;
                options.data_access = access;
                options.threads = threads;
                auto r = compare_images(*x, *y, options);
                ASSERT_TRUE(r) << r.error().message;
                EXPECT_EQ(r->outcome, p.outcome);
                EXPECT_EQ(r->offset, p.offset);
                EXPECT_EQ(r->size_warning, p.size_warning);
            }
        }
    }
}

} // namespace
} // namespace qcowmap

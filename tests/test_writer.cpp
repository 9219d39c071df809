// The qcow2 writer: qemu-img is the judge. Every image written is checked with
// `qemu-img check` (no errors, no leaks) and `qemu-img compare` against its source.
#include "support.hpp"

#include "cluster_compressor.hpp"
#include "writer_layout.hpp"

#include <qcowmap/image.hpp>
#include <qcowmap/writer.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <csignal>
#include <cstring>
#include <fcntl.h>
#include <functional>
#include <random>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>
#include <zlib.h>
#include <zstd.h>

namespace qcowmap::test {
namespace {

using test::cli;
using test::q;

namespace fs = std::filesystem;
using detail::writer::Geometry;

constexpr std::uint64_t kKiB = 1024, kMiB = 1024 * 1024;

/// `qemu-img check` of `image` finds no corruption and no leak (exit 0, JSON counts zero).
void expect_clean(const fs::path& image, const std::string& format = "qcow2") {
    CommandResult r = run("qemu-img check --output=json -f " + format + " " + q(image));
    EXPECT_EQ(r.exit_code, 0) << image << ": " << r.out << r.err;
    EXPECT_EQ(r.out.find("\"leaks\""), std::string::npos) << r.out;
    EXPECT_EQ(r.out.find("\"corruptions\""), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("\"check-errors\": 0"), std::string::npos) << r.out;
}

/// `qemu-img compare` says the two disks are identical.
void expect_same(const fs::path& a, const fs::path& b, const std::string& extra = "") {
    CommandResult r = run("qemu-img compare " + extra + " " + q(a) + " " + q(b));
    EXPECT_EQ(r.exit_code, 0) << a << " vs " << b << ": " << r.out << r.err;
    EXPECT_NE(r.out.find("Images are identical."), std::string::npos) << r.out;
}

/// What `qemu-img info --output=json` says, as text.
std::string info(const fs::path& image) {
    return run_ok("qemu-img info --output=json " + q(image));
}

/// Bytes the image itself (depth 0) holds as data, per qemu-img map.
std::uint64_t own_data_bytes(const fs::path& image) {
    std::string map = run_ok("qemu-img map --output=json " + q(image));
    std::uint64_t sum = 0;
    std::size_t at = 0;
    while ((at = map.find("{ \"start\"", at)) != std::string::npos) {
        std::size_t end = map.find('}', at);
        std::string entry = map.substr(at, end - at);
        at = end;
        if (entry.find("\"depth\": 0") == std::string::npos ||
            entry.find("\"data\": true") == std::string::npos)
            continue;
        std::size_t l = entry.find("\"length\": ") + 10;
        sum += std::stoull(entry.substr(l));
    }
    return sum;
}

/// Writes `source` with the CLI to `out` (extra options before SOURCE) and judges the result.
void convert_and_judge(const fs::path& source, const fs::path& out, const std::string& options = "",
                       const std::string& compare_extra = "") {
    run_ok(cli() + " convert -O qcow2 " + options + " " + q(source) + " " + q(out));
    expect_clean(out);
    expect_same(source, out, compare_extra);
    std::string text = info(out);
    EXPECT_NE(text.find("\"compat\": \"1.1\""), std::string::npos) << text; // version 3
    EXPECT_NE(text.find("\"corrupt\": false"), std::string::npos) << text;
    EXPECT_EQ(text.find("\"backing-filename\""), std::string::npos) << text; // flattened
}

/// The same through a pipe: `qcowmap convert -O qcow2 SRC - | cat > out`.
void pipe_and_judge(const fs::path& source, const fs::path& out, const std::string& options = "",
                    const std::string& compare_extra = "") {
    // The writer's exit code, which the pipe would hide, goes to a file.
    const fs::path rc = out.string() + ".rc";
    run_ok("{ " + cli() + " convert -O qcow2 " + options + " " + q(source) + " -; echo $? > " +
           q(rc) + "; } | cat > " + q(out));
    auto code = read_file(rc);
    EXPECT_EQ(std::string(reinterpret_cast<const char*>(code.data()), code.size()), "0\n");
    fs::remove(rc);
    expect_clean(out);
    expect_same(source, out, compare_extra);
}

/// Inflates every compressed cluster of `image` with zlib's raw inflate and a 4 KiB window
/// (qemu's inflateInit2(-12)), or with libzstd; returns how many there were.
std::size_t check_compressed_clusters(const fs::path& image) {
    auto opened = Image::open(image);
    EXPECT_TRUE(opened) << opened.error().message;
    if (!opened)
        return 0;
    const bool zstd = opened->info().compression_type == CompressionType::zstd;
    const std::uint64_t cluster = opened->info().cluster_size;
    std::vector<std::byte> out(cluster);
    std::vector<std::byte> expected(cluster);
    std::size_t count = 0;
    auto extents = opened->extents();
    Decompressor reference;
    for (const Extent& e : extents) {
        if (e.kind != ExtentKind::compressed)
            continue;
        ++count;
        if (zstd) {
            // The stream may end inside its last sector: one frame, then padding.
            std::size_t frame = ZSTD_findFrameCompressedSize(e.bytes.data(), e.bytes.size());
            EXPECT_FALSE(ZSTD_isError(frame)) << "cluster at " << e.offset;
            std::size_t n = ZSTD_decompress(out.data(), out.size(), e.bytes.data(), frame);
            EXPECT_FALSE(ZSTD_isError(n)) << "cluster at " << e.offset;
            EXPECT_EQ(n, cluster);
        } else {
            z_stream z{};
            EXPECT_EQ(inflateInit2(&z, -12), Z_OK);
            z.next_in = reinterpret_cast<Bytef*>(const_cast<std::byte*>(e.bytes.data()));
            z.avail_in = static_cast<uInt>(e.bytes.size());
            z.next_out = reinterpret_cast<Bytef*>(out.data());
            z.avail_out = static_cast<uInt>(out.size());
            int rc = inflate(&z, Z_FINISH);
            EXPECT_EQ(rc, Z_STREAM_END) << "cluster at " << e.offset << ": " << rc;
            EXPECT_EQ(z.avail_out, 0u) << "cluster at " << e.offset;
            inflateEnd(&z);
        }
        // And the bytes are those of the disk.
        Extent whole = e;
        auto ok = reference.decompress_cluster(*opened, whole, expected);
        EXPECT_TRUE(ok);
        EXPECT_EQ(std::memcmp(out.data(), expected.data(), cluster), 0) << e.offset;
    }
    EXPECT_FALSE(extents.error());
    return count;
}

/// A 6 MiB disk mixing random bytes, text, zeros written as data, zero clusters, a partial
/// cluster and a tail that is not cluster-aligned.
void make_mixed(const fs::path& path, const std::string& options = "cluster_size=64k") {
    TempDir scratch;
    std::vector<std::byte> raw(6 * kMiB);
    std::mt19937 rng(5);
    for (std::size_t i = 0; i < kMiB; ++i)
        raw[i] = static_cast<std::byte>(rng());
    const char* text = "qcow2 writes clusters, L2 tables and refcounts; ";
    for (std::size_t i = kMiB; i < 3 * kMiB; ++i)
        raw[i] = static_cast<std::byte>(text[i % std::strlen(text)]);
    for (std::size_t i = 4 * kMiB + 100; i < 4 * kMiB + 5000; ++i)
        raw[i] = std::byte{0x5a};
    write_file(scratch / "mixed.raw", raw);
    run_ok("qemu-img convert -f raw -O qcow2 -o " + shell_quote(options) + " " +
           q(scratch / "mixed.raw") + " " + q(path));
    run_ok("qemu-io -f qcow2 -c 'write -P 0 5M 128k' -c 'write -z 5500k 64k' " + q(path) +
           " >/dev/null");
}

// ---- Layout and encoders ----

TEST(WriterLayout, RefcountBlocksCoverEveryClusterIncludingThemselves) {
    for (std::uint32_t bits : {1u, 16u, 64u}) {
        for (std::uint32_t cluster : {512u, 65536u}) {
            WriteOptions options;
            options.cluster_size = cluster;
            options.refcount_bits = bits;
            auto g = detail::writer::make_geometry(options, 64 * kMiB);
            ASSERT_TRUE(g);
            for (std::uint64_t data : {0ull, 1ull, 5000ull, 300000ull}) {
                auto layout = detail::writer::make_layout(*g, 7, data);
                ASSERT_TRUE(layout);
                EXPECT_GE(layout->refblock_count * g->refs_per_block(), layout->total());
                EXPECT_LT((layout->refblock_count - 1) * g->refs_per_block(), layout->total() + 2)
                    << "more refcount blocks than needed";
                EXPECT_GE(layout->reftable_clusters * cluster / 8, layout->refblock_count);
                EXPECT_EQ(layout->data, layout->l2 + 7);
            }
        }
    }
}

TEST(WriterLayout, RefcountWidthsPackLikeQemu) {
    std::vector<std::byte> block(16);
    detail::set_refcount_entry(block.data(), 3, 1, 0); // 1 bit: bit 3 of byte 0
    EXPECT_EQ(block[0], std::byte{0x08});
    detail::set_refcount_entry(block.data(), 5, 2, 1); // 2 bits: bits 2-3 of byte 1
    EXPECT_EQ(block[1], std::byte{0x08});
    detail::set_refcount_entry(block.data(), 1, 0x1234, 4); // 16 bits, big-endian
    EXPECT_EQ(block[2], std::byte{0x12});
    EXPECT_EQ(block[3], std::byte{0x34});
    detail::set_refcount_entry(block.data(), 1, 7, 6); // 64 bits
    EXPECT_EQ(block[15], std::byte{7});
}

TEST(WriterLayout, CompressedDescriptorCountsExtraSectors) {
    Geometry g; // 64 KiB clusters: x = 62 - 8 = 54
    std::vector<std::byte> table(g.cluster_size);
    detail::writer::L2Plan entry{detail::writer::L2Plan::Kind::compressed, 0x30000 + 500, 100};
    detail::writer::encode_l2_entry(g, table, 0, entry);
    std::uint64_t word = 0;
    for (int i = 0; i < 8; ++i)
        word = word << 8 | std::to_integer<std::uint64_t>(table[i]);
    EXPECT_EQ(word & (1ull << 63), 0u) << "compressed clusters never carry COPIED";
    EXPECT_NE(word & (1ull << 62), 0u);
    EXPECT_EQ(word & ((1ull << 54) - 1), 0x30000u + 500);
    EXPECT_EQ((word >> 54) & 0xff, 1u) << "bytes 500..599 touch a second sector";
}

TEST(WriterLayout, BadOptionsAreNamed) {
    auto check = [](WriteOptions o, const std::string& text) {
        auto r = check_write_options(o);
        ASSERT_FALSE(r);
        EXPECT_EQ(r.error().code, ErrorCode::invalid_argument);
        EXPECT_NE(r.error().message.find(text), std::string::npos) << r.error().message;
    };
    WriteOptions o;
    o.cluster_size = 256;
    check(o, "cluster_size 256");
    o = {};
    o.cluster_size = 4 << 20;
    check(o, "cluster_size 4194304");
    o = {};
    o.extended_l2 = true;
    o.cluster_size = 4096;
    check(o, "extended_l2 needs");
    o = {};
    o.refcount_bits = 12;
    check(o, "refcount_bits 12");
    o = {};
    o.selection = WriteSelection::top_layer;
    check(o, "needs a backing file");
    o.backing_file = "base.qcow2";
    o.backing_format = "vmdk";
    check(o, "backing format 'vmdk'");
}

TEST(WriterLayout, DiskTooLargeForL1IsRefused) {
    WriteOptions o;
    o.cluster_size = 512;
    auto g = detail::writer::make_geometry(o, 1ull << 40);
    ASSERT_FALSE(g);
    EXPECT_NE(g.error().message.find("L1 table"), std::string::npos) << g.error().message;
}

TEST(ClusterCompressor, DeflateUsesA4KiBWindowAndRefusesWhatDoesNotShrink) {
    // 64 KiB whose second half repeats the first: a 32 KiB window would reach back, a 4 KiB one
    // cannot, and zlib's -12 inflate must still decode it exactly.
    std::vector<std::byte> in(64 * kKiB);
    std::mt19937 rng(1);
    for (std::size_t i = 0; i < in.size() / 2; ++i)
        in[i] = static_cast<std::byte>(rng() % 16);
    std::memcpy(in.data() + in.size() / 2, in.data(), in.size() / 2);
    detail::ClusterCompressor compressor(CompressionType::zlib);
    std::vector<std::byte> out(in.size() - 1);
    auto n = compressor.compress(in, out);
    ASSERT_TRUE(n);
    std::vector<std::byte> back(in.size());
    z_stream z{};
    ASSERT_EQ(inflateInit2(&z, -12), Z_OK);
    z.next_in = reinterpret_cast<Bytef*>(out.data());
    z.avail_in = static_cast<uInt>(*n);
    z.next_out = reinterpret_cast<Bytef*>(back.data());
    z.avail_out = static_cast<uInt>(back.size());
    EXPECT_EQ(inflate(&z, Z_FINISH), Z_STREAM_END);
    inflateEnd(&z);
    EXPECT_EQ(back, in);

    std::vector<std::byte> noise(64 * kKiB);
    for (auto& b : noise)
        b = static_cast<std::byte>(rng());
    EXPECT_FALSE(compressor.compress(noise, out)) << "random data does not fit cluster_size - 1";
    detail::ClusterCompressor zstd(CompressionType::zstd);
    EXPECT_FALSE(zstd.compress(noise, out));
    auto m = zstd.compress(in, out);
    ASSERT_TRUE(m);
    EXPECT_EQ(ZSTD_decompress(back.data(), back.size(), out.data(), *m), in.size());
}

// ---- Sources of every kind ----

struct SourceCase {
    std::string name;
    std::function<void(const TempDir&, fs::path&, std::string& convert_extra,
                       std::string& compare_extra)>
        build;
};

class WriterSources : public ::testing::TestWithParam<SourceCase> {};

TEST_P(WriterSources, FileAndPipeOutputsAreCleanAndIdentical) {
    TempDir dir;
    fs::path source;
    std::string convert_extra, compare_extra;
    GetParam().build(dir, source, convert_extra, compare_extra);
    convert_and_judge(source, dir / "out.qcow2", convert_extra, compare_extra);
    pipe_and_judge(source, dir / "piped.qcow2", convert_extra, compare_extra);
    // A file target and a pipe get the same image, byte for byte.
    EXPECT_EQ(read_file(dir / "out.qcow2"), read_file(dir / "piped.qcow2"));
}

std::vector<SourceCase> source_cases() {
    auto plain = [](const std::string& options, const std::string& size,
                    std::vector<std::string> io) {
        return [=](const TempDir& dir, fs::path& source, std::string&, std::string&) {
            source = dir / "src.qcow2";
            make_image(source, options, size, io);
        };
    };
    const std::vector<std::string> writes = {"write -P 0xab 0 100k", "write -z 256k 64k",
                                             "write -P 0 512k 64k",  "write -P 0x11 1M 4k",
                                             "write -c 2M 64k",      "write -P 0x22 3000k 300k"};
    std::vector<SourceCase> cases = {
        {"v3", plain("", "4M", writes)},
        {"v2", plain("compat=0.10", "4M", writes)},
        {"c512", plain("cluster_size=512", "4M", writes)},
        {"c2M", plain("cluster_size=2M", "8M",
                      {"write -P 0xab 0 100k", "write -z 2M 2M", "write -c 4M 2M",
                       "write -P 0x22 7M 4k"})},
        {"subclusters", plain("extended_l2=on,cluster_size=32k", "4M", writes)},
        {"odd_size", plain("", "3333333", {"write -P 0x77 3300000 33333", "write -P 1 0 10"})},
        {"prealloc", plain("preallocation=metadata", "4M", {"write -P 0x9 1M 64k"})},
        {"falloc", plain("preallocation=falloc", "2M", {"write -P 0x9 1M 64k"})},
        {"compressed_zstd", plain("compression_type=zstd", "4M", writes)},
    };
    cases.push_back(
        {"qcow_v1", [](const TempDir& dir, fs::path& source, std::string&, std::string&) {
             source = dir / "v1.qcow";
             run_ok("qemu-img create -q -f qcow " + q(source) + " 4M");
             run_ok("qemu-io -f qcow -c 'write -P 0x31 0 100k' -c 'write -P 0x32 "
                    "2M 64k' " +
                    q(source) + " >/dev/null");
         }});
    cases.push_back(
        {"chain_qcow2_over_raw",
         [](const TempDir& dir, fs::path& source, std::string&, std::string&) {
             run_ok("qemu-img create -q -f raw " + q(dir / "base.raw") + " 4M");
             run_ok("qemu-io -f raw -c 'write -P 0x41 0 2M' " + q(dir / "base.raw") +
                    " >/dev/null");
             run_ok("qemu-img create -q -f qcow2 -b base.raw -F raw " + q(dir / "mid.qcow2"));
             run_ok("qemu-io -f qcow2 -c 'write -P 0x42 1M 64k' -c 'write -z 100k 64k' " +
                    q(dir / "mid.qcow2") + " >/dev/null");
             source = dir / "top.qcow2";
             run_ok("qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 " + q(source) + " 6M");
             run_ok("qemu-io -f qcow2 -c 'write -P 0x43 5M 64k' -c 'discard 1M 64k' " + q(source) +
                    " >/dev/null");
         }});
    cases.push_back(
        {"data_file", [](const TempDir& dir, fs::path& source, std::string&, std::string&) {
             source = dir / "df.qcow2";
             make_image(source, "data_file=" + (dir / "df.data").string(), "4M",
                        {"write -P 0x51 64k 1M", "write -z 2M 64k"});
         }});
    return cases;
}

INSTANTIATE_TEST_SUITE_P(Kinds, WriterSources, ::testing::ValuesIn(source_cases()),
                         [](const auto& info) { return info.param.name; });

// ---- Output options ----

TEST(Writer, ClusterSizesExtendedL2AndCompression) {
    TempDir dir;
    fs::path source = dir / "mixed.qcow2";
    make_mixed(source);
    struct Case {
        std::string options;
        std::string expect_info;
        bool compressed;
    };
    const std::vector<Case> cases = {
        {"-o cluster_size=4k", "\"cluster-size\": 4096", false},
        {"-o cluster_size=2M", "\"cluster-size\": 2097152", false},
        {"-o cluster_size=512,refcount_bits=1", "\"refcount-bits\": 1", false},
        {"-o extended_l2=on", "\"extended-l2\": true", false},
        {"-c", "\"compression-type\": \"zlib\"", true},
        {"-c -o compression_type=zstd", "\"compression-type\": \"zstd\"", true},
        {"-c -o cluster_size=4k,extended_l2=off", "\"cluster-size\": 4096", true},
        {"-c -o cluster_size=2M,refcount_bits=64", "\"refcount-bits\": 64", true},
        {"-c -o extended_l2=on,cluster_size=16k,refcount_bits=2", "\"extended-l2\": true", true},
    };
    int n = 0;
    for (const Case& c : cases) {
        SCOPED_TRACE(c.options);
        fs::path out = dir / ("out" + std::to_string(n++) + ".qcow2");
        run_ok(cli() + " convert -O qcow2 " + c.options + " " + q(source) + " " + q(out));
        expect_clean(out);
        expect_same(source, out);
        EXPECT_NE(info(out).find(c.expect_info), std::string::npos) << info(out);
        std::size_t compressed = check_compressed_clusters(out);
        if (c.compressed) {
            EXPECT_GT(compressed, 0u);
            // Random data is stored plain, text compressed: the image is smaller than the data
            // (with 2 MiB clusters the five metadata clusters alone take 10 MiB).
            if (c.options.find("2M") == std::string::npos) {
                EXPECT_LT(fs::file_size(out), 4 * kMiB);
            }
        } else {
            EXPECT_EQ(compressed, 0u);
        }
    }
    // Through a pipe, compressed: spooled, same bytes as the file target.
    pipe_and_judge(source, dir / "piped.qcow2", "-c");
    EXPECT_EQ(read_file(dir / "piped.qcow2"), read_file(dir / "out4.qcow2"));
    EXPECT_GT(check_compressed_clusters(dir / "piped.qcow2"), 0u);
}

TEST(Writer, ZeroDataIsNotStored) {
    TempDir dir;
    fs::path source = dir / "zeros.qcow2";
    make_image(source, "", "8M",
               {"write -P 0 0 2M", "write -P 0x1 3M 4k", "write -z 4M 1M", "write -P 0 6M 64k"});
    fs::path out = dir / "out.qcow2";
    convert_and_judge(source, out);
    EXPECT_EQ(own_data_bytes(out), 64 * kKiB) << "only the cluster with the 4 KiB of 0x01";
    fs::path compressed = dir / "c.qcow2";
    convert_and_judge(source, compressed, "-c");
    EXPECT_LE(fs::file_size(compressed), 6 * 64 * kKiB);
}

TEST(Writer, RawSourceWithHoles) {
    TempDir dir;
    fs::path raw = dir / "disk.raw";
    run_ok("truncate -s 64M " + q(raw));
    run_ok("printf 'hello' | dd of=" + q(raw) + " bs=1 seek=1048576 conv=notrunc status=none");
    run_ok("head -c 200000 /dev/urandom | dd of=" + q(raw) +
           " bs=4096 seek=8000 conv=notrunc status=none");
    fs::path out = dir / "out.qcow2";
    run_ok(cli() + " convert -f raw -O qcow2 " + q(raw) + " " + q(out));
    expect_clean(out);
    expect_same(raw, out, "-f raw -F qcow2");
    // 5 bytes in one cluster, 200000 bytes over 4 clusters (not aligned to them): 5 clusters.
    EXPECT_EQ(own_data_bytes(out), 5 * 64 * kKiB);
    pipe_and_judge(raw, dir / "p.qcow2", "-f raw", "-f raw -F qcow2");
}

TEST(Writer, SnapshotSource) {
    TempDir dir;
    fs::path image = dir / "snap.qcow2";
    make_image(image, "", "4M", {"write -P 0x61 0 1M"});
    run_ok("qemu-img snapshot -c s1 " + q(image));
    run_ok("qemu-io -f qcow2 -c 'write -P 0x62 0 512k' " + q(image) + " >/dev/null");
    run_ok("qemu-img convert -l snapshot.name=s1 -O raw " + q(image) + " " + q(dir / "s1.raw"));
    fs::path out = dir / "out.qcow2";
    run_ok(cli() + " convert -O qcow2 --snapshot=s1 " + q(image) + " " + q(out));
    expect_clean(out);
    expect_same(dir / "s1.raw", out, "-f raw -F qcow2");
}

// ---- Incremental backups ----

TEST(Writer, FullBackupAndThreeIncrementalsRestoreEachPoint) {
    TempDir dir;
    fs::path vm = dir / "vm.qcow2";
    make_image(vm, "", "64M", {"write -P 0x11 0 8M", "write -P 0x12 30M 2M"});
    run_ok("qemu-img bitmap --add " + q(vm) + " daily");
    run_ok(cli() + " convert -O qcow2 " + q(vm) + " " + q(dir / "full.qcow2"));
    expect_clean(dir / "full.qcow2");
    expect_same(vm, dir / "full.qcow2");
    run_ok("qemu-img convert -O raw " + q(vm) + " " + q(dir / "point0.raw"));

    const std::vector<std::vector<std::string>> periods = {
        {"write -P 0x22 1M 64k", "write -z 4M 1M", "discard 6M 128k", "write -P 0x33 60M 4k"},
        {"write -P 0x44 100k 10k", "write -P 0 31M 64k", "discard 30M 128k", "write -z 1M 64k"},
        {"write -P 0x55 40M 3M", "write -z 40M 64k", "discard 0 64k", "write -P 0x66 63M 1M"},
    };
    std::string previous = "full.qcow2";
    for (std::size_t i = 0; i < periods.size(); ++i) {
        SCOPED_TRACE("incremental " + std::to_string(i + 1));
        std::string io = "qemu-io -f qcow2";
        for (const auto& c : periods[i])
            io += " -c " + shell_quote(c);
        run_ok(io + " " + q(vm) + " >/dev/null");
        const std::string inc = "inc" + std::to_string(i + 1) + ".qcow2";
        run_ok("cd " + q(dir.path()) + " && " + cli() + " convert -O qcow2 -B " + previous +
               " -F qcow2 --bitmap=daily vm.qcow2 " + inc);
        run_ok("qemu-img bitmap --clear " + q(vm) + " daily");
        expect_clean(dir / inc);
        // Restore: the chain inc -> ... -> full reads as the disk at this point.
        run_ok("qemu-img convert -O raw " + q(vm) + " " + q(dir / "now.raw"));
        run_ok("qemu-img convert -O raw " + q(dir / inc) + " " + q(dir / "restored.raw"));
        EXPECT_EQ(run("cmp " + q(dir / "now.raw") + " " + q(dir / "restored.raw")).exit_code, 0);
        std::string text = info(dir / inc);
        EXPECT_NE(text.find("\"backing-filename\": \"" + previous + "\""), std::string::npos)
            << text;
        EXPECT_NE(text.find("\"backing-filename-format\": \"qcow2\""), std::string::npos);
        // Only the clusters around the dirty ranges are allocated (data or zero).
        std::string map = run_ok("qemu-img map --output=json " + q(dir / inc));
        std::size_t at = 0;
        std::uint64_t own = 0;
        while ((at = map.find("{ \"start\"", at)) != std::string::npos) {
            std::size_t end = map.find('}', at);
            std::string entry = map.substr(at, end - at);
            at = end;
            if (entry.find("\"depth\": 0") != std::string::npos &&
                entry.find("\"present\": true") != std::string::npos)
                own += std::stoull(entry.substr(entry.find("\"length\": ") + 10));
        }
        const std::uint64_t expected[] = {64 * kKiB + kMiB + 128 * kKiB + 64 * kKiB,
                                          64 * kKiB + 64 * kKiB + 128 * kKiB + 64 * kKiB,
                                          3 * kMiB + 64 * kKiB + kMiB};
        EXPECT_EQ(own, expected[i]) << map;
        previous = inc;
    }
}

TEST(Writer, TopLayerOverlay) {
    TempDir dir;
    make_image(dir / "base.qcow2", "", "8M", {"write -P 0x1 0 8M"});
    run_ok("qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 " + q(dir / "top.qcow2"));
    run_ok("qemu-io -f qcow2 -c 'write -P 0x2 1M 100k' -c 'write -z 4M 64k' -c 'write -P 0 6M "
           "64k' " +
           q(dir / "top.qcow2") + " >/dev/null");
    run_ok("cd " + q(dir.path()) + " && " + cli() +
           " convert -O qcow2 -B base.qcow2 -F qcow2 top.qcow2 out.qcow2");
    expect_clean(dir / "out.qcow2");
    expect_same(dir / "top.qcow2", dir / "out.qcow2");
    // 100 KiB of data in two clusters; the zero write and the zero data become zero clusters.
    EXPECT_EQ(own_data_bytes(dir / "out.qcow2"), 128 * kKiB);
}

// ---- Failures ----

TEST(Writer, RefusesToOverwriteWithoutForce) {
    TempDir dir;
    fs::path source = dir / "src.qcow2";
    make_image(source, "", "1M", {"write -P 0x1 0 64k"});
    write_file(dir / "out.qcow2", std::vector<std::byte>(10, std::byte{'x'}));
    CommandResult r = run(cli() + " convert -O qcow2 " + q(source) + " " + q(dir / "out.qcow2"));
    EXPECT_EQ(r.exit_code, 3);
    EXPECT_EQ(r.err, "qcowmap: " + (dir / "out.qcow2").string() +
                         ": already exists (use --force to replace it)\n");
    EXPECT_EQ(fs::file_size(dir / "out.qcow2"), 10u);
    run_ok(cli() + " convert -O qcow2 --force " + q(source) + " " + q(dir / "out.qcow2"));
    expect_same(source, dir / "out.qcow2");
    r = run(cli() + " convert -O qcow2 --force " + q(source) + " " + q(source));
    EXPECT_EQ(r.exit_code, 3);
    EXPECT_NE(r.err.find("refusing to overwrite it"), std::string::npos) << r.err;
}

TEST(Writer, BadOptionsGetOneLineErrors) {
    TempDir dir;
    fs::path source = dir / "src.qcow2";
    make_image(source, "", "1M");
    const std::vector<std::pair<std::string, std::string>> cases = {
        {"-O qcow2 -o cluster_size=3k", "cluster_size 3072 is not a power of two"},
        {"-O qcow2 -o cluster_size=4M", "cluster_size 4194304"},
        {"-O qcow2 -o extended_l2=on,cluster_size=4k", "extended_l2 needs"},
        {"-O qcow2 -o refcount_bits=3", "refcount_bits 3"},
        {"-O qcow2 -o compression_type=lzo", "compression_type: 'lzo'"},
        {"-O qcow2 -o nonsense=1", "unknown option 'nonsense'"},
        {"-O qcow2 -B base.qcow2", "-B needs -F"},
        {"-O qcow2 -B base.qcow2 -F vmdk", "backing format 'vmdk'"},
        {"-O qcow2 --bitmap=b", "--bitmap with -O qcow2 needs -B"},
        {"-c", "-c needs -O qcow2"},
        {"-c -B b.qcow2", "-c, -B need -O qcow2"},
    };
    for (const auto& [options, message] : cases) {
        SCOPED_TRACE(options);
        CommandResult r =
            run(cli() + " convert " + options + " " + q(source) + " " + q(dir / "out.qcow2"));
        EXPECT_EQ(r.exit_code, 1);
        EXPECT_NE(r.err.find(message), std::string::npos) << r.err;
        EXPECT_EQ(r.err.rfind("qcowmap: ", 0), 0u) << r.err;
        EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
        EXPECT_FALSE(fs::exists(dir / "out.qcow2"));
    }
    // -u: B is not opened (without it the missing B is the first error, see test_trust).
    CommandResult r = run(cli() + " convert -O qcow2 -u -B b -F qcow2 --bitmap=nope " + q(source) +
                          " " + q(dir / "out.qcow2"));
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_EQ(r.err, "qcowmap: " + source.string() +
                         ": no bitmap named 'nope': the image has no bitmaps\n");
    EXPECT_FALSE(fs::exists(dir / "out.qcow2"));
}

TEST(Writer, CorruptSourceStopsWithTheReadersError) {
    TempDir dir;
    fs::path source = dir / "bad.qcow2";
    make_image(source, "", "1M", {"write -P 0x1 0 256k"});
    point_cluster_past_eof(source, 2);
    for (std::string options : {"", "-c"}) {
        SCOPED_TRACE(options);
        CommandResult r = run(cli() + " convert -O qcow2 " + options + " " + q(source) + " " +
                              q(dir / "out.qcow2"));
        EXPECT_EQ(r.exit_code, 1);
        EXPECT_NE(r.err.find("0x40000000000"), std::string::npos) << r.err;
        EXPECT_EQ(r.err.rfind("qcowmap: " + source.string() + ": ", 0), 0u) << r.err;
        EXPECT_FALSE(fs::exists(dir / "out.qcow2"));
    }
    EXPECT_EQ(std::distance(fs::directory_iterator(dir.path()), fs::directory_iterator()), 1)
        << "nothing but the source is left in the directory";
}

/// Kills a child process in the middle of writing (SIGKILL from the progress callback, after
/// the metadata and some data are out): no TARGET, and no other file, is left behind.
TEST(Writer, InterruptedWriteLeavesNoTarget) {
    TempDir dir;
    fs::path source = dir / "src.qcow2";
    make_image(source, "cluster_size=4k", "8M", {"write -P 0x1 0 2M", "write -P 0x2 4M 2M"});
    for (bool compress : {false, true}) {
        fs::path target = dir / "out.qcow2";
        pid_t child = ::fork();
        ASSERT_GE(child, 0);
        if (child == 0) {
            auto image = Image::open(source);
            if (!image)
                ::_exit(10);
            WriteOptions options;
            options.compress = compress;
            options.cluster_size = 4096;
            options.progress = [](std::uint64_t done, std::uint64_t) {
                if (done > 512 * kKiB)
                    ::raise(SIGKILL);
            };
            auto ok = write_qcow2_file(*image, target, options);
            ::_exit(ok ? 0 : 11);
        }
        int status = 0;
        ASSERT_EQ(::waitpid(child, &status, 0), child);
        ASSERT_TRUE(WIFSIGNALED(status)) << "the write finished before the kill: " << status;
        EXPECT_EQ(WTERMSIG(status), SIGKILL);
        EXPECT_FALSE(fs::exists(target));
        EXPECT_EQ(std::distance(fs::directory_iterator(dir.path()), fs::directory_iterator()), 1);
    }
}

// ---- The library ----

TEST(WriterLibrary, WritesToAPipeAndReportsStats) {
    TempDir dir;
    fs::path source = dir / "src.qcow2";
    make_image(source, "", "4M", {"write -P 0x1 0 128k", "write -P 0 1M 64k"});
    auto image = Image::open(source);
    ASSERT_TRUE(image);
    int fds[2];
    ASSERT_EQ(::pipe(fds), 0);
    std::vector<std::byte> received;
    std::thread reader([&] {
        std::byte buffer[65536];
        ssize_t n;
        while ((n = ::read(fds[0], buffer, sizeof buffer)) > 0)
            received.insert(received.end(), buffer, buffer + n);
    });
    std::uint64_t last_done = 0, last_total = 0;
    WriteOptions options;
    options.progress = [&](std::uint64_t done, std::uint64_t total) {
        last_done = done;
        last_total = total;
    };
    auto stats = write_qcow2(*image, fds[1], options);
    ::close(fds[1]);
    reader.join();
    ::close(fds[0]);
    ASSERT_TRUE(stats) << stats.error().message;
    EXPECT_EQ(stats->data_clusters, 2u);
    EXPECT_EQ(stats->compressed_clusters, 0u);
    EXPECT_EQ(stats->file_size, received.size());
    EXPECT_EQ(last_done, 128 * kKiB);
    EXPECT_EQ(last_total, 128 * kKiB);
    write_file(dir / "out.qcow2", received);
    expect_clean(dir / "out.qcow2");
    expect_same(source, dir / "out.qcow2");
}

TEST(WriterLibrary, ReadmeExampleRuns) {
    const char* example = std::getenv("QCOWMAP_WRITER_EXAMPLE");
    ASSERT_NE(example, nullptr) << "meson sets QCOWMAP_WRITER_EXAMPLE";
    TempDir dir;
    make_image(dir / "vm.qcow2", "", "16M", {"write -P 0x11 0 4M"});
    run_ok("qemu-img bitmap --add " + q(dir / "vm.qcow2") + " since-full");
    run_ok("cd " + q(dir.path()) + " && " + shell_quote(example) + " vm.qcow2 full.qcow2");
    run_ok("qemu-io -f qcow2 -c 'write -P 0x22 1M 64k' -c 'write -z 2M 64k' " +
           q(dir / "vm.qcow2") + " >/dev/null");
    run_ok("cd " + q(dir.path()) + " && " + shell_quote(example) +
           " vm.qcow2 inc1.qcow2 full.qcow2 since-full");
    expect_clean(dir / "full.qcow2");
    expect_clean(dir / "inc1.qcow2");
    expect_same(dir / "vm.qcow2", dir / "inc1.qcow2");
    EXPECT_EQ(own_data_bytes(dir / "inc1.qcow2"), 64 * kKiB);
}

TEST(WriterReadme, IncrementalBackupExample) {
    // The README's workflow, extracted and run as written (with the built qcowmap on PATH).
    const std::string script = readme_script("qcow2-backup-example");
    ASSERT_FALSE(script.empty()) << "README's qcow2-backup-example markers";
    TempDir dir;
    CommandResult r = run_script_in(dir.path(), script);
    EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
    EXPECT_NE(r.out.find("inc2.qcow2 restores the disk"), std::string::npos) << r.out << r.err;
    EXPECT_NE(
        r.out.find(
            R"({ "start": 62914560, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true)"),
        std::string::npos)
        << r.out;
    EXPECT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 2) << r.out;
    // Each point restores: inc1 is the disk before the 60M write.
    run_ok("qemu-io -f qcow2 -c 'write -P 0 60M 4k' " + q(dir / "vm.qcow2") + " >/dev/null");
    expect_same(dir / "vm.qcow2", dir / "inc1.qcow2");
    expect_clean(dir / "full.qcow2");
    expect_clean(dir / "inc1.qcow2");
}

TEST(Writer, CompressedOverlayAndProgress) {
    TempDir dir;
    make_image(dir / "base.qcow2", "", "8M", {"write -P 0x1 0 8M"});
    run_ok("qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 " + q(dir / "top.qcow2"));
    run_ok("qemu-io -f qcow2 -c 'write -P 0x2 1M 100k' -c 'write -z 4M 64k' -c 'write -P 0 6M "
           "64k' " +
           q(dir / "top.qcow2") + " >/dev/null");
    CommandResult r = run("cd " + q(dir.path()) + " && " + cli() +
                          " convert -p -c -O qcow2 -B base.qcow2 -F qcow2 top.qcow2 out.qcow2");
    EXPECT_EQ(r.exit_code, 0) << r.err;
    EXPECT_NE(r.err.find("100.00/100%"), std::string::npos) << r.err;
    expect_clean(dir / "out.qcow2");
    expect_same(dir / "top.qcow2", dir / "out.qcow2");
    EXPECT_EQ(check_compressed_clusters(dir / "out.qcow2"), 2u);
    // The zero write and the cluster of zero data are zero clusters hiding the base's 0x01.
    std::string map = run_ok("qemu-img map --output=json " + q(dir / "out.qcow2"));
    EXPECT_NE(
        map.find(
            R"({ "start": 4194304, "length": 65536, "depth": 0, "present": true, "zero": true)"),
        std::string::npos)
        << map;
    EXPECT_NE(
        map.find(
            R"({ "start": 6291456, "length": 65536, "depth": 0, "present": true, "zero": true)"),
        std::string::npos)
        << map;
}

TEST(WriterLibrary, ParallelCopyGivesTheSameImageAsOneThread) {
    // More than two pieces of 8 MiB of data: a file target is filled by several threads.
    TempDir dir;
    fs::path source = dir / "big.qcow2";
    make_image(source, "", "64M",
               {"write -P 0x5 0 20M", "write -z 5M 1M", "write -P 0 7M 64k", "write -P 0x6 30M 10M",
                "write -P 0x7 63M 4k"});
    auto image = Image::open(source);
    ASSERT_TRUE(image);
    std::vector<std::vector<std::byte>> outputs;
    for (unsigned threads : {1u, 2u, 3u}) {
        WriteOptions options;
        options.threads = threads;
        fs::path out = dir / ("t" + std::to_string(threads) + ".qcow2");
        auto stats = write_qcow2_file(*image, out, options);
        ASSERT_TRUE(stats) << stats.error().message;
        EXPECT_EQ(stats->data_clusters,
                  (20 * kMiB - kMiB - 64 * kKiB + 10 * kMiB) / (64 * kKiB) + 1);
        EXPECT_EQ(stats->file_size, fs::file_size(out));
        outputs.push_back(read_file(out));
    }
    EXPECT_EQ(outputs[0], outputs[1]);
    EXPECT_EQ(outputs[0], outputs[2]);
    expect_clean(dir / "t2.qcow2");
    expect_same(source, dir / "t2.qcow2");
}

} // namespace
} // namespace qcowmap::test

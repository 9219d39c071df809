// Issue 29: a qcow2 image read from a pipe, once, in file order (<qcowmap/stream_import.hpp>
// and `-` as the image of convert, hash, info and check). Every image is made by qemu-img and
// qemu-io (or our own writer) at test time and piped through `cat |`; qemu-img convert of the
// file is the oracle.
#include "stream_oracle.hpp"
#include "support.hpp"

#include "image_state.hpp"
#include "qcow2_format.hpp"

#include <qcowmap/hash.hpp>
#include <qcowmap/image.hpp>
#include <qcowmap/stream_import.hpp>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include <sys/mount.h>

namespace {

using namespace qcowmap;
namespace qt = qcowmap::test;
using Buffer = std::vector<std::byte>;

std::string cat_into(const std::filesystem::path& image, const std::string& args) {
    return "cat " + qt::q(image) + " | " + qt::cli() + " " + args;
}

std::string sha256_of(const std::filesystem::path& file) {
    return qt::run_ok("sha256sum < " + qt::q(file)).substr(0, 64);
}

/// The images of the issue: qemu-made (after snapshots, discards and rewrites, resizes, so that
/// clusters arrive out of order), compressed (zlib, zstd), extended L2, 2 MiB and 512 B
/// clusters, version 2, a size that is not a multiple of the cluster, and our own writer's.
struct Images {
    qt::TempDir dir;
    std::vector<std::filesystem::path> all;
    std::filesystem::path resized, snapshots, zlib;

    std::filesystem::path make(const std::string& name, const std::string& options,
                               const std::string& size, const std::vector<std::string>& io) {
        auto path = dir / name;
        qt::make_image(path, options, size, io);
        all.push_back(path);
        return path;
    }

    Images() {
        make("plain.qcow2", "", "64M",
             {"write -P 0xab 0 1M", "write -P 0x11 40M 3M", "write -z 2M 1M",
              "write -P 0x22 10M 64k"});
        // Freed clusters reused by a later table's data: data before its L2 table.
        make("reuse.qcow2", "cluster_size=4k", "64M",
             {"write -P 1 0 2M", "write -P 2 32M 64k", "discard 0 2M", "write -P 3 33M 1M",
              "write -P 4 40M 256k"});
        snapshots = make("snap.qcow2", "", "64M", {"write -P 6 0 8M", "write -P 7 20M 1M"});
        qt::run_ok("qemu-img snapshot -c s1 " + qt::q(snapshots));
        qt::run_ok("qemu-io -f qcow2 -c 'write -P 8 1M 1M' -c 'write -P 9 30M 1M' -c 'discard "
                   "4M 1M' " +
                   qt::q(snapshots) + " >/dev/null");
        qt::run_ok("qemu-img snapshot -c s2 " + qt::q(snapshots));
        qt::run_ok("qemu-io -f qcow2 -c 'write -P 10 5M 64k' " + qt::q(snapshots) + " >/dev/null");
        zlib = make("zlib.qcow2", "", "32M",
                    {"write -c -P 11 0 4M", "write -P 12 8M 1M", "write -c -P 13 16M 64k"});
        make("zstd.qcow2", "compression_type=zstd", "32M",
             {"write -c -P 14 0 4M", "write -c -P 15 20M 1M"});
        make("ext.qcow2", "extended_l2=on,cluster_size=128k", "32M",
             {"write -P 16 4k 8k", "write -z 64k 4k", "write -P 17 1M 200k", "discard 1M 4k"});
        make("ext-compressed.qcow2", "extended_l2=on", "8M",
             {"write -c -P 18 0 64k", "write -P 19 128k 4k"});
        make("big.qcow2", "cluster_size=2M", "64M", {"write -P 18 1M 5M", "write -P 19 40M 64k"});
        make("small.qcow2", "cluster_size=512", "8M",
             {"write -P 20 0 100k", "write -P 21 5M 3k", "write -z 6M 4k"});
        // The L1 table grows and moves to the end of the file: every table before it arrives
        // before the L1 entry naming it.
        resized = make("resized.qcow2", "cluster_size=4k", "16M", {"write -P 22 0 2M"});
        qt::run_ok("qemu-img resize -q " + qt::q(resized) + " 64M");
        qt::run_ok("qemu-io -f qcow2 -c 'write -P 23 60M 1M' " + qt::q(resized) + " >/dev/null");
        make("v2.qcow2", "compat=0.10", "16M", {"write -P 24 0 1M"});
        make("odd.qcow2", "cluster_size=4k", "1000000", {"write -P 25 0 999424"});
        // Our own writer's images (header, refcounts, L1, every L2, then data), plain and
        // compressed.
        auto ours = dir / "ours.qcow2";
        qt::run_ok(qt::cli() + " convert -O qcow2 " + qt::q(all.front()) + " " + qt::q(ours));
        all.push_back(ours);
        auto ours_compressed = dir / "ours-c.qcow2";
        qt::run_ok(qt::cli() + " convert -O qcow2 -c -o compression_type=zstd " + qt::q(snapshots) +
                   " " + qt::q(ours_compressed));
        all.push_back(ours_compressed);
    }
};

const Images& images() {
    static Images i;
    return i;
}

TEST(StreamImport, EveryImageKindPipedMatchesQemuImgConvert) {
    qt::TempDir dir;
    for (const auto& image : images().all) {
        SCOPED_TRACE(image.filename().string());
        const Buffer expected = qt::qemu_raw(image, dir);
        const auto out = dir / "out.raw";
        std::filesystem::remove(out);
        auto r = qt::run(cat_into(image, "convert --stream-stats - " + qt::q(out)));
        ASSERT_EQ(r.exit_code, 0) << r.err;
        EXPECT_EQ(qt::read_file(out), expected);
        EXPECT_NE(r.err.find("\"spooled-bytes\""), std::string::npos) << r.err;
        // The same disk in order, to a pipe and into the digest, for the images whose data
        // arrives out of disk order (and the odd sizes): the reordering spool.
        const std::string name = image.filename().string();
        if (name == "snap.qcow2" || name == "zlib.qcow2" || name == "ext.qcow2" ||
            name == "odd.qcow2" || name == "reuse.qcow2") {
            qt::write_file(dir / "ref.raw", expected);
            const std::string digest = sha256_of(dir / "ref.raw");
            EXPECT_EQ(qt::run_ok(cat_into(image, "convert - - | sha256sum")).substr(0, 64), digest);
            EXPECT_EQ(qt::run_ok(cat_into(image, "hash -")), digest + "  -\n");
        }
        // The library in odd pieces agrees with Image on the same bytes.
        qt::expect_stream_agrees(qt::read_file(image));
    }
}

TEST(StreamImport, OtherOutputsAndAlgorithms) {
    qt::TempDir dir;
    const auto& image = images().snapshots;
    const Buffer expected = qt::qemu_raw(image, dir);
    qt::write_file(dir / "ref.raw", expected);
    // -O qcow2 (through a temporary raw copy), judged by qemu-img.
    qt::run_ok(cat_into(image, "convert -O qcow2 -c - " + qt::q(dir / "out.qcow2")));
    qt::run_ok("qemu-img check -q " + qt::q(dir / "out.qcow2"));
    qt::run_ok("qemu-img compare -q " + qt::q(image) + " " + qt::q(dir / "out.qcow2"));
    // Every algorithm, and block manifests, equal those of the file.
    for (const char* algo : {"sha256", "sha512", "blake2b512", "xxh3-128"}) {
        const std::string file = qt::run_ok(qt::cli() + " hash --algo=" + algo + " " +
                                            qt::q(dir / "ref.raw") + " -f raw");
        const std::string streamed =
            qt::run_ok(cat_into(image, fmt::format("hash --algo={} -", algo)));
        EXPECT_EQ(streamed.substr(0, streamed.find(' ')), file.substr(0, file.find(' '))) << algo;
    }
    auto strip_name = [](const std::string& manifest) {
        return manifest.substr(manifest.find('\n'));
    };
    EXPECT_EQ(strip_name(qt::run_ok(cat_into(image, "hash --block-size=1M -"))),
              strip_name(qt::run_ok(qt::cli() + " hash --block-size=1M " + qt::q(image))));
}

/// The spool the layout needs: every L2 table that lies before the L1 entry naming it, and
/// every data cluster that lies before the point where its L2 table is read (the later of the
/// table and its L1 entry). Valid for images without compressed clusters; all-zero clusters
/// are not spooled.
std::uint64_t spool_needed(const std::filesystem::path& path) {
    auto image = Image::open(path);
    EXPECT_TRUE(image) << image.error().message;
    const detail::ImageState& s = detail_state(*image);
    const Buffer file = qt::read_file(path);
    auto zero_cluster = [&](std::uint64_t host) {
        const std::size_t end = std::min<std::size_t>(file.size(), host + s.cluster_size);
        return std::all_of(file.begin() + static_cast<std::ptrdiff_t>(host),
                           file.begin() + static_cast<std::ptrdiff_t>(end),
                           [](std::byte b) { return b == std::byte{0}; });
    };
    std::uint64_t needed = 0;
    const std::uint64_t entries = std::uint64_t{1} << s.l2_bits;
    for (std::uint64_t i = 0; i * s.l2_coverage() < s.disk_size; ++i) {
        const std::uint64_t l2 = detail::decode_l1(s.l1_table.data() + i * 8).l2_offset();
        if (l2 == 0)
            continue;
        const std::uint64_t entry_at = s.info.l1_table_offset + i * 8;
        const std::uint64_t entry_cluster_end = (entry_at | (s.cluster_size - 1)) + 1;
        if (l2 < entry_cluster_end && !zero_cluster(l2))
            needed += s.cluster_size;
        const std::uint64_t read_at = std::max(l2 + s.cluster_size, entry_cluster_end);
        for (std::uint64_t j = 0; j < entries; ++j) {
            const std::uint64_t guest = i * s.l2_coverage() + j * s.cluster_size;
            if (guest >= s.disk_size)
                break;
            const detail::L2Entry e = detail::decode_l2(file.data() + l2 + j * 8, false);
            if (detail::cluster_type(e, false, false) != detail::ClusterType::normal)
                continue;
            if (e.host_offset() < read_at && !zero_cluster(e.host_offset()))
                needed += std::min(s.cluster_size, s.disk_size - guest);
        }
    }
    return needed;
}

StreamStats stream_stats(const std::filesystem::path& path, StreamOptions options = {}) {
    qt::CollectingSink sink;
    StreamDecoder decoder(sink, options);
    const Buffer bytes = qt::read_file(path);
    auto stats = qt::feed_in_pieces(decoder, bytes, {1u << 20});
    EXPECT_TRUE(stats) << stats.error().message;
    return stats ? *stats : StreamStats{};
}

TEST(StreamImport, SpoolUseMatchesTheLayout) {
    const Images& i = images();
    for (const auto& path : {i.resized, i.all[1] /* reuse */, i.all[0] /* plain */}) {
        SCOPED_TRACE(path.filename().string());
        const std::uint64_t needed = spool_needed(path);
        const StreamStats stats = stream_stats(path);
        EXPECT_EQ(stats.spool_used_bytes, needed);
        // What was spooled and never used: clusters no table names (the freed old L1 table
        // of the resized image), at most a cluster or two here.
        EXPECT_GE(stats.spooled_bytes, stats.spool_used_bytes);
        EXPECT_LE(stats.spooled_bytes, stats.spool_used_bytes + 4 * 65536);
        EXPECT_LE(stats.spool_peak, stats.spooled_bytes);
    }
    EXPECT_GT(spool_needed(i.resized), 2u << 20); // the layout really is out of order
    EXPECT_GT(spool_needed(i.all[1]), 0u);
    EXPECT_EQ(spool_needed(i.all[12]), 0u); // our writer: tables first
}

/// A crafted image whose L1 table is moved to the end of the file: every L2 table and data
/// cluster arrives before the table naming it.
std::filesystem::path l1_at_end(const qt::TempDir& dir) {
    auto path = dir / "l1-at-end.qcow2";
    qt::make_image(path, "", "64M", {"write -P 0x5a 0 3M", "write -P 0x6b 50M 1M"});
    Buffer b = qt::read_file(path);
    const std::uint64_t l1 = qt::peek_be(path, 40, 8);
    const std::uint64_t at = (b.size() + 65535) / 65536 * 65536;
    Buffer moved(b.begin() + static_cast<std::ptrdiff_t>(l1),
                 b.begin() + static_cast<std::ptrdiff_t>(l1 + 65536));
    b.resize(at);
    b.insert(b.end(), moved.begin(), moved.end());
    std::fill(b.begin() + static_cast<std::ptrdiff_t>(l1),
              b.begin() + static_cast<std::ptrdiff_t>(l1 + 65536), std::byte{0});
    qt::write_file(path, b);
    qt::poke_be(path, 40, at, 8);
    return path;
}

TEST(StreamImport, MaxSpoolRefusesACraftedImageAndLeavesNoTarget) {
    qt::TempDir dir;
    const auto image = l1_at_end(dir);
    const auto out = dir / "out.raw";
    auto r = qt::run(cat_into(image, "convert --max-spool=2M - " + qt::q(out)));
    EXPECT_EQ(r.exit_code, 1) << r.err;
    EXPECT_NE(r.err.find("qcowmap: <stdin>: the image needs more than 2097152 bytes of spool"),
              std::string::npos)
        << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_FALSE(std::filesystem::exists(out));
    for (const auto& entry : std::filesystem::directory_iterator(dir.path()))
        EXPECT_EQ(entry.path().filename().string().find(".qcowmap-"), std::string::npos);
    // Enough spool: byte-identical.
    qt::run_ok(cat_into(image, "convert --max-spool=5M - " + qt::q(out)));
    EXPECT_EQ(qt::read_file(out), qt::qemu_raw(image, dir));
    // In the library: the code, and the same limit for ordered outputs.
    StreamOptions options;
    options.max_spool = 2u << 20;
    qt::CollectingSink sink;
    StreamDecoder decoder(sink, options);
    auto stats = qt::feed_in_pieces(decoder, qt::read_file(image), {65536});
    ASSERT_FALSE(stats);
    EXPECT_EQ(stats.error().code, ErrorCode::invalid_table);
    r = qt::run(cat_into(image, "convert --max-spool=2M - - >/dev/null"));
    EXPECT_EQ(r.exit_code, 1) << r.err;
}

TEST(StreamImport, ExpectedChecksumRightWrongAndTruncated) {
    qt::TempDir dir;
    const auto& image = images().zlib;
    const auto out = dir / "out.raw";
    const std::string sha = sha256_of(image);
    qt::run_ok(cat_into(image, "convert --expect-checksum=sha256:" + sha + " - " + qt::q(out)));
    EXPECT_EQ(qt::read_file(out), qt::qemu_raw(image, dir));
    std::filesystem::remove(out);
    // sha512 and blake2b512 as openssl computes them.
    for (const char* algo : {"sha512", "blake2b512"}) {
        std::string hex = qt::run_ok("openssl dgst -" + std::string(algo) + " -r " + qt::q(image));
        hex = hex.substr(0, hex.find(' '));
        qt::run_ok(cat_into(
            image, fmt::format("convert --expect-checksum={}:{} - - >/dev/null", algo, hex)));
    }
    // Wrong: exit 1, both digests named, no target.
    std::string wrong = sha;
    wrong[10] = wrong[10] == '0' ? '1' : '0';
    auto r =
        qt::run(cat_into(image, "convert --expect-checksum=sha256:" + wrong + " - " + qt::q(out)));
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_NE(
        r.err.find("checksum mismatch: the stream's sha256 is " + sha + ", expected " + wrong),
        std::string::npos)
        << r.err;
    EXPECT_FALSE(std::filesystem::exists(out));
    // A stream that ends early: refused, no target, with or without a checksum.
    for (const std::string& check : {std::string(), "--expect-checksum=sha256:" + sha + " "}) {
        r = qt::run("head -c 700000 " + qt::q(image) + " | " + qt::cli() + " convert " + check +
                    "- " + qt::q(out));
        EXPECT_EQ(r.exit_code, 1) << r.err;
        EXPECT_NE(r.err.find("beyond end of file"), std::string::npos) << r.err;
        EXPECT_FALSE(std::filesystem::exists(out));
    }
    // An existing target is kept when the stream fails (and replaced only with --force).
    qt::write_file(out, Buffer(10, std::byte{1}));
    r = qt::run(
        cat_into(image, "convert --force --expect-checksum=sha256:" + wrong + " - " + qt::q(out)));
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_EQ(qt::read_file(out), Buffer(10, std::byte{1}));
    // Bad option values are usage errors.
    r = qt::run(cat_into(image, "convert --expect-checksum=md5:00 - " + qt::q(out)));
    EXPECT_EQ(r.exit_code, 1) << r.err;
}

TEST(StreamImport, PiecesOfAnySizeGiveTheSameDisk) {
    const Images& i = images();
    for (const auto& path : {i.zlib, i.all[6] /* ext-compressed */, i.all[8] /* small */}) {
        SCOPED_TRACE(path.filename().string());
        const Buffer bytes = qt::read_file(path);
        std::map<std::uint64_t, Buffer> first;
        for (const std::vector<std::size_t>& pieces :
             std::vector<std::vector<std::size_t>>{{bytes.size()}, {1}, {7, 4093, 65537}}) {
            for (unsigned threads : {1u, 3u}) {
                StreamOptions options;
                options.threads = threads;
                qt::CollectingSink sink;
                StreamDecoder decoder(sink, options);
                auto stats = qt::feed_in_pieces(decoder, bytes, pieces);
                ASSERT_TRUE(stats) << stats.error().message;
                EXPECT_EQ(stats->stream_bytes, bytes.size());
                EXPECT_FALSE(sink.overlapped);
                EXPECT_EQ(sink.data_bytes + sink.zero_bytes, sink.disk_size);
                if (first.empty())
                    first = sink.data_runs;
                // Runs may be cut differently; the bytes at each offset are the same.
                Buffer a, b;
                for (auto& [o, r] : first)
                    a.insert(a.end(), r.begin(), r.end());
                for (auto& [o, r] : sink.data_runs)
                    b.insert(b.end(), r.begin(), r.end());
                EXPECT_EQ(a, b);
            }
        }
    }
}

TEST(StreamImport, ReferencesAndUnsafeHeadersRefusedBeforeTheTarget) {
    qt::TempDir dir;
    const auto out = dir / "out.raw";
    auto refused = [&](const std::filesystem::path& image, const std::string& args,
                       const std::string& message) {
        auto r = qt::run(cat_into(image, "convert " + args + " - " + qt::q(out)));
        EXPECT_EQ(r.exit_code, 1) << r.err;
        EXPECT_NE(r.err.find(message), std::string::npos) << r.err;
        EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
        EXPECT_FALSE(std::filesystem::exists(out));
    };
    // A backing file: never followed from a stream; --backing=none reads the image alone.
    auto base = dir / "base.qcow2";
    qt::make_image(base, "", "4M", {"write -P 1 0 4M"});
    auto overlay = dir / "overlay.qcow2";
    qt::run_ok("qemu-img create -q -f qcow2 -b " + qt::q(base) + " -F qcow2 " + qt::q(overlay) +
               " 4M");
    qt::run_ok("qemu-io -f qcow2 -c 'write -P 2 1M 64k' " + qt::q(overlay) + " >/dev/null");
    refused(overlay, "", "names a backing file '" + base.string() + "'");
    refused(overlay, "--untrusted", "names a backing file");
    qt::run_ok(cat_into(overlay, "convert --backing=none - " + qt::q(out)));
    qt::run_ok(qt::cli() + " convert --backing=none " + qt::q(overlay) + " " +
               qt::q(dir / "alone.raw"));
    EXPECT_EQ(qt::read_file(out), qt::read_file(dir / "alone.raw"));
    std::filesystem::remove(out);
    // An external data file: refused unless named; then read from it.
    auto with_data = dir / "data.qcow2";
    qt::run_ok("qemu-img create -q -f qcow2 -o data_file=" + qt::q(dir / "data.bin") + " " +
               qt::q(with_data) + " 4M");
    qt::run_ok("qemu-io -f qcow2 -c 'write -P 3 64k 128k' " + qt::q(with_data) + " >/dev/null");
    refused(with_data, "", "external data file");
    qt::run_ok(
        cat_into(with_data, "convert --data-file=" + qt::q(dir / "data.bin") + " - " + qt::q(out)));
    EXPECT_EQ(qt::read_file(out), qt::qemu_raw(with_data, dir));
    std::filesystem::remove(out);
    // The corrupt bit, an unknown incompatible feature, a virtual size the L1 cannot cover.
    auto corrupt = dir / "corrupt.qcow2";
    qt::make_image(corrupt, "", "4M", {"write -P 4 0 64k"});
    qt::poke_be(corrupt, 72, kIncompatCorrupt, 8);
    refused(corrupt, "", "the corrupt bit is set");
    auto unknown = dir / "unknown.qcow2";
    qt::make_image(unknown, "", "4M", {"write -P 4 0 64k"});
    qt::poke_be(unknown, 72, 1u << 9, 8);
    refused(unknown, "", "unsupported incompatible feature(s): bit 9");
    auto huge = dir / "huge.qcow2";
    qt::make_image(huge, "", "4M", {"write -P 4 0 64k"});
    qt::poke_be(huge, 24, std::uint64_t{1} << 50, 8);
    refused(huge, "", "is too small for the virtual size");
    // Options a stream cannot honour are usage errors.
    auto r = qt::run(cat_into(corrupt, "convert --snapshot=s1 - " + qt::q(out)));
    EXPECT_EQ(r.exit_code, 1) << r.err;
}

TEST(StreamImport, HostileStreamsGiveOneLineAndNoFile) {
    qt::TempDir dir;
    const auto out = dir / "out.raw";
    auto base = dir / "base.qcow2";
    qt::make_image(base, "cluster_size=4k", "1M",
                   {"write -P 1 0 64k", "write -c -P 2 128k 4k", "write -P 3 512k 4k"});
    const Buffer healthy = qt::read_file(base);
    const std::uint64_t l1 = qt::peek_be(base, 40, 8);
    const std::uint64_t l2 = qt::peek_be(base, l1, 8) & detail::kL1OffsetMask;
    struct Case {
        const char* name;
        std::uint64_t at;
        std::uint64_t value;
    };
    const std::vector<Case> cases = {
        {"L1 reserved bits", l1, (l2 | 0x100)},
        {"L2 table past the end", l1, 0x7f0000000000ULL},
        {"L2 entry reserved bits", l2, 0x8000000000030002ULL},
        {"data past the end", l2 + 8, 0x8000004000000000ULL},
        {"compressed stream garbage", l2 + 32 * 8, 0x4000000000000000ULL | 0x1000},
        {"L2 table unaligned", l1, 0x200},
    };
    for (const Case& c : cases) {
        SCOPED_TRACE(c.name);
        qt::write_file(dir / "bad.qcow2", healthy);
        qt::poke_be(dir / "bad.qcow2", c.at, c.value, 8);
        auto r = qt::run("timeout 60 sh -c " +
                         qt::shell_quote(cat_into(dir / "bad.qcow2", "convert - " + qt::q(out))));
        EXPECT_TRUE(r.exit_code == 0 || r.exit_code == 1) << r.exit_code << r.err;
        if (r.exit_code == 1) {
            EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
            EXPECT_EQ(r.err.rfind("qcowmap: <stdin>: ", 0), 0u) << r.err;
            EXPECT_FALSE(std::filesystem::exists(out));
        }
        std::filesystem::remove(out);
        qt::expect_stream_agrees(qt::read_file(dir / "bad.qcow2"));
    }
}

// An L1 table whose 2048 entries all name its own 2 MiB cluster as their L2 table (2^18 entries
// each): read once, then refused, instead of 2^29 entry visits.
TEST(StreamImport, AnL1TableNamingItsOwnClusterIsReadOnce) {
    qt::TempDir dir;
    auto image = dir / "self.qcow2";
    qt::make_image(image, "cluster_size=2M", "1P", {});
    const std::uint64_t l1 = qt::peek_be(image, 40, 8);
    const std::uint64_t entries = qt::peek_be(image, 36, 4);
    ASSERT_EQ(entries, 2048u);
    Buffer b = qt::read_file(image);
    b.resize(std::max<std::size_t>(b.size(), l1 + (2u << 20))); // the whole cluster
    for (std::uint64_t i = 0; i < entries; ++i) {
        for (unsigned k = 0; k < 8; ++k)
            b[l1 + i * 8 + k] = std::byte{static_cast<unsigned char>((l1 >> (56 - 8 * k)) & 0xff)};
    }
    qt::write_file(image, b);
    // (check: the same decoding without a 1 PiB target.)
    auto r = qt::run("timeout 60 sh -c " + qt::shell_quote(cat_into(image, "check -")));
    EXPECT_EQ(r.exit_code, 2) << r.err;
    EXPECT_NE(r.err.find("lies in the cluster of the L1 table, named again"), std::string::npos)
        << r.err;
}

TEST(StreamImport, InfoAndCheckTellWhatOnePassCan) {
    qt::TempDir dir;
    const auto& image = images().zlib;
    const std::string info = qt::run_ok(cat_into(image, "info -"));
    EXPECT_NE(info.find("virtual size: 32 MiB (33554432 bytes)"), std::string::npos) << info;
    EXPECT_NE(info.find("compressed clusters"), std::string::npos) << info;
    const std::string json = qt::run_ok(cat_into(image, "info --output=json -"));
    EXPECT_NE(json.find("\"virtual-size\": 33554432"), std::string::npos) << json;
    EXPECT_NE(json.find("\"errors\": []"), std::string::npos) << json;
    auto r = qt::run(cat_into(image, "check -"));
    EXPECT_EQ(r.exit_code, 0) << r.err;
    EXPECT_NE(r.out.find("No errors were found on the image."), std::string::npos);
    // A damaged L2 entry: a corruption (2); a header that is not qcow2: could not check (1).
    auto bad = dir / "bad.qcow2";
    qt::make_image(bad, "", "4M", {"write -P 4 0 64k"});
    const std::uint64_t l2 = qt::peek_be(bad, qt::peek_be(bad, 40, 8), 8) & detail::kL1OffsetMask;
    qt::poke_be(bad, l2, 0x8000000000050002ULL, 8);
    r = qt::run(cat_into(bad, "check -"));
    EXPECT_EQ(r.exit_code, 2) << r.out << r.err;
    EXPECT_NE(r.err.find("reserved bits set"), std::string::npos) << r.err;
    r = qt::run("echo hello | " + qt::cli() + " check -");
    EXPECT_EQ(r.exit_code, 1) << r.err;
}

// More entries wait for their clusters than the queue keeps in memory (256 Ki): our writer puts
// every L2 table first, so with 512-byte clusters a 160 MiB disk leaves 327 680 data clusters
// waiting at once; sorted runs spill to a temporary file and merge back.
// The spool's failures keep the errno of the system call: a spool directory that does not
// exist (ENOENT from open), a full one (ENOSPC from pwrite, on a 64 KiB tmpfs where this
// process may mount one). The spool is the library's own file, not the output: to_errno EIO.
TEST(StreamImport, SpoolFailuresCarryTheirErrno) {
    qt::TempDir dir;
    const Buffer bytes = qt::read_file(l1_at_end(dir));
    auto decode_with_spool_in = [&](const std::filesystem::path& spool) {
        StreamOptions options;
        options.spool_directory = spool;
        qt::CollectingSink sink;
        StreamDecoder decoder(sink, options);
        return qt::feed_in_pieces(decoder, bytes, {65536});
    };
    auto missing = decode_with_spool_in(dir / "no-such-directory");
    ASSERT_FALSE(missing);
    EXPECT_EQ(missing.error().code, ErrorCode::io_error);
    EXPECT_EQ(missing.error().system_errno, ENOENT) << missing.error().message;
    EXPECT_NE(missing.error().message.find("cannot create a spool file in"), std::string::npos)
        << missing.error().message;
    EXPECT_EQ(to_errno(missing.error()), EIO);

    const auto tiny = dir / "tiny";
    std::filesystem::create_directories(tiny);
    if (qt::run("mount -t tmpfs -o size=64k tmpfs " + qt::q(tiny)).exit_code != 0)
        GTEST_SKIP() << "cannot mount a tmpfs here";
    auto full = decode_with_spool_in(tiny);
    ::umount2(tiny.c_str(), MNT_DETACH);
    ASSERT_FALSE(full);
    EXPECT_EQ(full.error().code, ErrorCode::io_error);
    EXPECT_EQ(full.error().system_errno, ENOSPC) << full.error().message;
    EXPECT_EQ(full.error().message, "cannot write the spool: No space left on device");
    EXPECT_EQ(to_errno(full.error()), EIO);
}

TEST(StreamImport, WaitingEntriesSpillToDiskAndMergeBack) {
    qt::TempDir dir;
    const auto raw = dir / "disk.raw";
    Buffer disk(160u << 20);
    std::uint64_t x = 88172645463325252ULL;
    for (std::size_t i = 0; i < disk.size(); i += 512) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        disk[i + (x % 512)] = std::byte{static_cast<unsigned char>(x | 1)};
    }
    qt::write_file(raw, disk);
    const auto image = dir / "small-clusters.qcow2";
    qt::run_ok(qt::cli() + " convert -f raw -O qcow2 -o cluster_size=512 " + qt::q(raw) + " " +
               qt::q(image));
    const std::string streamed =
        qt::run_ok(cat_into(image, "hash --stream-stats - 2>" + qt::q(dir / "stats.json")));
    EXPECT_EQ(streamed, sha256_of(raw) + "  -\n");
    const std::string stats = qt::read_text(dir / "stats.json");
    EXPECT_NE(stats.find("\"spooled-bytes\": 0,"), std::string::npos) << stats;
    EXPECT_NE(stats.find("\"reorder-spooled-bytes\": 0"), std::string::npos) << stats;
}

} // namespace

// Compressed clusters (zlib, zstd) and legacy qcow version 1, against qemu-img as the oracle:
// cat byte-identical to `qemu-img convert -O raw`, random unaligned reads equal to the raw
// bytes, map equal to `qemu-img map --output=json`, and corrupt compressed data refused.
#include "support.hpp"

#include <qcowmap/image.hpp>

#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <optional>
#include <random>
#include <thread>

namespace qcowmap {
namespace {

using test::q;

using test::run;
using test::run_ok;
using test::shell_quote;
using test::TempDir;

/// A raw source mixing random bytes, text, zeros and repeated bytes, 1 MiB of each in turn.
std::filesystem::path make_mixed_raw(const TempDir& dir, std::size_t mebibytes) {
    std::vector<std::byte> data(mebibytes << 20);
    std::mt19937_64 rng(1234);
    const std::string text = "The quick brown fox jumps over the lazy dog; qcow2 cluster ";
    for (std::size_t mib = 0; mib < mebibytes; ++mib) {
        std::byte* p = data.data() + (mib << 20);
        switch (mib % 4) {
        case 0:
            for (std::size_t i = 0; i < (1u << 20); i += 8) {
                std::uint64_t v = rng();
                std::memcpy(p + i, &v, 8);
            }
            break;
        case 1:
            for (std::size_t i = 0; i < (1u << 20); ++i)
                p[i] = std::byte(text[(i + mib) % text.size()]);
            break;
        case 2:
            break; // zeros
        case 3:
            std::fill_n(p, 1u << 20, std::byte(mib));
            // ... with a few random bytes sprinkled in so clusters differ
            for (int k = 0; k < 64; ++k)
                p[rng() % (1u << 20)] = std::byte(rng());
            break;
        }
    }
    auto path = dir / "mixed.raw";
    test::write_file(path, data);
    return path;
}

std::string fmt_hex(std::uint64_t v) {
    char text[32];
    std::snprintf(text, sizeof text, "%#llx", static_cast<unsigned long long>(v));
    return text;
}

std::string strip_compressed_key(std::string json) {
    for (const char* key : {", \"compressed\": false", ", \"compressed\": true"}) {
        for (auto at = json.find(key); at != std::string::npos; at = json.find(key)) {
            json.erase(at, std::strlen(key));
        }
    }
    return json;
}

/// Everything we promise for one image, checked against qemu-img.
void expect_matches_qemu(const std::filesystem::path& image_path, const TempDir& dir,
                         const char* format = "qcow2") {
    SCOPED_TRACE(image_path.string());
    auto raw = dir / "oracle.raw";
    std::filesystem::remove(raw);
    run_ok(std::string("qemu-img convert -f ") + format + " -O raw " + q(image_path) + " " +
           q(raw));
    auto expected = test::read_file(raw);

    auto cat = dir / "cat.raw";
    auto r = run(shell_quote(test::qcowmap_bin()) + " cat " + q(image_path) + " > " + q(cat));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_TRUE(test::read_file(cat) == expected) << "cat differs from qemu-img convert";

    auto converted = dir / "convert.raw";
    std::filesystem::remove(converted);
    r = run(shell_quote(test::qcowmap_bin()) + " convert " + q(image_path) + " " + q(converted));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_TRUE(test::read_file(converted) == expected) << "convert differs from qemu-img convert";

    auto image = Image::open(image_path);
    ASSERT_TRUE(image) << image.error().message;
    ASSERT_EQ(image->size(), expected.size());
    std::mt19937_64 rng(99);
    std::vector<std::byte> buffer;
    for (int i = 0; i < 150; ++i) {
        std::uint64_t offset = rng() % expected.size();
        // Up to three clusters, capped so that 2 MiB-cluster images stay quick under ASan.
        std::size_t length =
            1 + rng() % std::min<std::uint64_t>(3 * image->info().cluster_size, 256 * 1024);
        buffer.assign(length, std::byte{0x5a});
        auto n = image->read(buffer, offset);
        ASSERT_TRUE(n) << n.error().message;
        std::size_t want = std::min<std::uint64_t>(length, expected.size() - offset);
        ASSERT_EQ(*n, want);
        ASSERT_EQ(0, std::memcmp(buffer.data(), expected.data() + offset, want))
            << "read at " << offset << " +" << length;
    }

    std::string ours =
        run_ok(shell_quote(test::qcowmap_bin()) + " map --output=json " + q(image_path));
    std::string theirs =
        run_ok(std::string("qemu-img map -f ") + format + " --output=json " + q(image_path));
    EXPECT_EQ(strip_compressed_key(ours), theirs);
}

int count_compressed(const std::filesystem::path& path) {
    auto image = Image::open(path);
    if (!image)
        return -1;
    int count = 0;
    ExtentRange it = image->extents();
    for (const Extent& e : it)
        count += e.kind == ExtentKind::compressed;
    return it.error().has_value() ? -1 : count;
}

struct ConvertCase {
    const char* name;
    const char* options;
};

class ConvertCompressed : public ::testing::TestWithParam<ConvertCase> {};

TEST_P(ConvertCompressed, MatchesQemu) {
    TempDir dir;
    auto source = make_mixed_raw(dir, 8);
    auto image = dir / "c.qcow2";
    run_ok("qemu-img convert -c -O qcow2 -o " + shell_quote(GetParam().options) + " " + q(source) +
           " " + q(image));
    EXPECT_GT(count_compressed(image), 0);
    expect_matches_qemu(image, dir);
}

INSTANTIATE_TEST_SUITE_P(
    Images, ConvertCompressed,
    ::testing::Values(ConvertCase{"zlib_4k", "compression_type=zlib,cluster_size=4k"},
                      ConvertCase{"zlib_64k", "compression_type=zlib,cluster_size=64k"},
                      ConvertCase{"zlib_2m", "compression_type=zlib,cluster_size=2M"},
                      ConvertCase{"zstd_4k", "compression_type=zstd,cluster_size=4k"},
                      ConvertCase{"zstd_64k", "compression_type=zstd,cluster_size=64k"},
                      ConvertCase{"zstd_2m", "compression_type=zstd,cluster_size=2M"},
                      ConvertCase{"zlib_v2", "compat=0.10,cluster_size=64k"}),
    [](const auto& info) { return std::string(info.param.name); });

struct MixedCase {
    const char* name;
    const char* options;
};

class MixedClusters : public ::testing::TestWithParam<MixedCase> {};

TEST_P(MixedClusters, CompressedPlainZeroAndUnallocated) {
    TempDir dir;
    auto image = dir / "m.qcow2";
    // qemu only compresses into unallocated clusters, so compressed writes come first.
    test::make_image(image, GetParam().options, "4M",
                     {"write -c -P 0x61 0 64k", "write -c -P 0x62 128k 128k",
                      "write -c -P 0x63 1M 64k", "write -P 0x70 64k 64k", "write -P 0x71 300k 5000",
                      "write -z 512k 64k", "discard 1M 64k", "write -P 0x72 2M 100k",
                      "write -c -P 0x64 3M 64k"});
    EXPECT_GT(count_compressed(image), 0);
    expect_matches_qemu(image, dir);
}

INSTANTIATE_TEST_SUITE_P(
    Images, MixedClusters,
    ::testing::Values(MixedCase{"zlib", "cluster_size=64k"},
                      MixedCase{"zstd", "cluster_size=64k,compression_type=zstd"},
                      MixedCase{"extended_l2_zlib", "cluster_size=64k,extended_l2=on"},
                      MixedCase{"extended_l2_zstd",
                                "cluster_size=64k,extended_l2=on,compression_type=zstd"}),
    [](const auto& info) { return std::string(info.param.name); });

TEST(LegacyQcow, WritesByQemuIo) {
    TempDir dir;
    auto image = dir / "v1.qcow";
    run_ok("qemu-img create -q -f qcow " + q(image) + " 4M");
    // v1 compressed writes must be exactly one cluster (4 KiB here).
    run_ok("qemu-io -f qcow -c 'write -P 0xab 4k 8k' -c 'write -c -P 0x12 1M 4k' "
           "-c 'write -c -P 0x13 1028k 4k' -c 'write -P 0xcd 3M 100k' -c 'write -P 0xce 4190000 "
           "4304' " +
           q(image) + " >/dev/null");
    auto opened = Image::open(image);
    ASSERT_TRUE(opened) << opened.error().message;
    EXPECT_EQ(opened->info().version, 1u);
    EXPECT_EQ(count_compressed(image), 2);
    expect_matches_qemu(image, dir, "qcow");
}

TEST(LegacyQcow, ConvertedWithCompression) {
    TempDir dir;
    auto source = make_mixed_raw(dir, 4);
    auto image = dir / "v1c.qcow";
    // qemu-img 7.2 exits 1 here although the image is complete: check it with compare.
    run("qemu-img convert -c -O qcow " + q(source) + " " + q(image));
    run_ok("qemu-img compare -f raw -F qcow " + q(source) + " " + q(image));
    EXPECT_GT(count_compressed(image), 0);
    expect_matches_qemu(image, dir, "qcow");
}

TEST(LegacyQcow, EncryptedIsRefused) {
    TempDir dir;
    auto image = dir / "v1.qcow";
    run_ok("qemu-img create -q -f qcow " + q(image) + " 1M");
    auto bytes = test::read_file(image);
    bytes[39] = std::byte{1}; // crypt_method = 1 (AES), big-endian u32 at 36
    test::write_file(image, bytes);
    auto opened = Image::open(image);
    ASSERT_FALSE(opened);
    EXPECT_EQ(opened.error().code, ErrorCode::encrypted);
    EXPECT_NE(opened.error().message.find("encrypted images are not supported"), std::string::npos);
}

/// A 64 KiB-cluster zlib image with one compressed cluster at virtual 0; returns the file bytes
/// and the L2 entry's file offset.
struct OneCompressed {
    std::vector<std::byte> bytes;
    std::uint64_t l2_entry_at = 0;
    std::uint64_t coffset = 0;
    std::uint64_t csize = 0;
};

OneCompressed make_one_compressed(const TempDir& dir, const std::string& options) {
    auto path = dir / "one.qcow2";
    test::make_image(path, options, "1M", {"write -c -P 0x5c 0 64k"});
    OneCompressed c;
    c.bytes = test::read_file(path);
    std::uint64_t l1 = test::get_be64(c.bytes, 40);
    std::uint64_t l2 = test::get_be64(c.bytes, l1) & 0x00fffffffffffe00ull;
    c.l2_entry_at = l2;
    std::uint64_t entry = test::get_be64(c.bytes, l2);
    EXPECT_TRUE(entry & (1ull << 62)) << "expected a compressed cluster";
    const unsigned shift = 62 - (16 - 8);
    c.coffset = entry & ((1ull << shift) - 1);
    c.csize = (((entry >> shift) & 0xff) + 1) * 512 - (c.coffset & 511);
    return c;
}

Error read_error(const std::vector<std::byte>& bytes) {
    auto image = Image::open_bytes(bytes);
    if (!image)
        return image.error();
    std::vector<std::byte> buffer(64 * 1024);
    auto n = image->read(buffer, 0);
    if (n)
        return Error{ErrorCode::invalid_argument, "no error"};
    return n.error();
}

TEST(CorruptCompressed, GarbageStream) {
    for (const char* options : {"cluster_size=64k", "cluster_size=64k,compression_type=zstd"}) {
        TempDir dir;
        OneCompressed c = make_one_compressed(dir, options);
        const std::uint64_t stream_in_file = c.bytes.size() - c.coffset;
        for (std::uint64_t i = 0; i < std::min<std::uint64_t>(stream_in_file, 64); ++i) {
            c.bytes[c.coffset + i] = std::byte(0xff - i);
        }
        Error e = read_error(c.bytes);
        EXPECT_EQ(e.code, ErrorCode::compressed_data) << options << ": " << e.message;
        EXPECT_NE(e.message.find("virtual offset 0x0"), std::string::npos) << e.message;
        EXPECT_NE(e.message.find(fmt_hex(c.coffset)), std::string::npos) << e.message;
    }
}

TEST(CorruptCompressed, TruncatedStream) {
    for (const char* options : {"cluster_size=64k", "cluster_size=64k,compression_type=zstd"}) {
        TempDir dir;
        OneCompressed c = make_one_compressed(dir, options);
        // Cut the file in the middle of the compressed stream (it is the last thing written).
        const std::uint64_t stream_in_file = c.bytes.size() - c.coffset;
        ASSERT_GE(stream_in_file, 8u);
        c.bytes.resize(c.coffset + stream_in_file / 2);
        Error e = read_error(c.bytes);
        EXPECT_TRUE(e.code == ErrorCode::compressed_data || e.code == ErrorCode::invalid_cluster ||
                    e.code == ErrorCode::invalid_table)
            << options << ": " << e.message;
        EXPECT_NE(e.message, "no error");
    }
}

TEST(CorruptCompressed, DescriptorPastEndOfFile) {
    TempDir dir;
    OneCompressed c = make_one_compressed(dir, "cluster_size=64k");
    std::uint64_t entry = test::get_be64(c.bytes, c.l2_entry_at);
    const unsigned shift = 62 - 8;
    entry = (entry & ~((1ull << shift) - 1)) | (c.bytes.size() + 4096);
    test::put_be64(c.bytes, c.l2_entry_at, entry);
    Error e = read_error(c.bytes);
    EXPECT_EQ(e.code, ErrorCode::invalid_cluster);
    EXPECT_NE(e.message.find("beyond end of file"), std::string::npos) << e.message;
}

TEST(CorruptCompressed, SectorCountRunsPastEndOfFile) {
    TempDir dir;
    OneCompressed c = make_one_compressed(dir, "cluster_size=64k");
    std::uint64_t entry = test::get_be64(c.bytes, c.l2_entry_at);
    const unsigned shift = 62 - 8;
    entry |= 0xffull << shift; // 256 sectors: 128 KiB from an offset near the end of the file
    test::put_be64(c.bytes, c.l2_entry_at, entry);
    Error e = read_error(c.bytes);
    EXPECT_EQ(e.code, ErrorCode::invalid_cluster);
    EXPECT_NE(e.message.find("beyond end of file"), std::string::npos) << e.message;
}

TEST(Concurrency, TwoThreadsReadOneImage) {
    TempDir dir;
    auto source = make_mixed_raw(dir, 8);
    auto path = dir / "c.qcow2";
    run_ok("qemu-img convert -c -O qcow2 -o cluster_size=64k,compression_type=zstd " + q(source) +
           " " + q(path));
    auto expected = test::read_file(source);
    auto image = Image::open(path);
    ASSERT_TRUE(image) << image.error().message;
    std::atomic<int> mismatches{0};
    auto reader = [&](unsigned seed) {
        std::mt19937_64 rng(seed);
        std::vector<std::byte> buffer;
        for (int i = 0; i < 300; ++i) {
            std::uint64_t offset = rng() % expected.size();
            std::size_t length = 1 + rng() % (200 * 1024);
            buffer.resize(length);
            auto n = image->read(buffer, offset);
            std::size_t want = std::min<std::uint64_t>(length, expected.size() - offset);
            if (!n || *n != want ||
                std::memcmp(buffer.data(), expected.data() + offset, want) != 0) {
                ++mismatches;
            }
        }
    };
    std::thread a(reader, 1), b(reader, 2);
    a.join();
    b.join();
    EXPECT_EQ(mismatches.load(), 0);
    // The parallel producer too, from two threads at once.
    auto whole = [&](std::vector<std::byte>& out) {
        out.assign(expected.size(), std::byte{0x33});
        return image->visit(
            0, UINT64_MAX,
            [&](const qcowmap::Run& run) {
                if (run.bytes.empty()) {
                    std::memset(out.data() + run.offset, 0, run.length);
                } else {
                    std::memcpy(out.data() + run.offset, run.bytes.data(), run.length);
                }
                return Result<void>{};
            },
            VisitOptions{2, DataAccess::mapping});
    };
    std::vector<std::byte> first, second;
    Result<void> r1, r2;
    std::thread c([&] { r1 = whole(first); }), d([&] { r2 = whole(second); });
    c.join();
    d.join();
    ASSERT_TRUE(r1);
    ASSERT_TRUE(r2);
    EXPECT_TRUE(first == expected);
    EXPECT_TRUE(second == expected);
}

// The inflater: libdeflate decodes each cluster whole when the build has it, and zlib judges
// every stream libdeflate does not decode to exactly one cluster. These streams are put in
// place of a qemu-written one, and qemu-img reads the same files as the oracle.

/// Deflate "stored" blocks (RFC 1951 3.2.4) holding `data`, the last one marked final.
std::vector<std::byte> stored_blocks(const std::vector<std::byte>& data) {
    std::vector<std::byte> out;
    std::size_t done = 0;
    do {
        const std::size_t n = std::min<std::size_t>(data.size() - done, 65535);
        const bool last = done + n == data.size();
        out.push_back(std::byte(last ? 1 : 0)); // BFINAL, BTYPE = 00, padded to the byte
        out.push_back(std::byte(n & 0xff));
        out.push_back(std::byte(n >> 8));
        out.push_back(std::byte(~n & 0xff));
        out.push_back(std::byte((~n >> 8) & 0xff));
        out.insert(out.end(), data.begin() + static_cast<std::ptrdiff_t>(done),
                   data.begin() + static_cast<std::ptrdiff_t>(done + n));
        done += n;
    } while (done < data.size());
    return out;
}

/// `c` with its compressed stream replaced by `stream` followed by `trailing` bytes, and the L2
/// entry's sector count covering them all (64 KiB clusters: the count is bits 54-61).
std::vector<std::byte> with_stream(const OneCompressed& c, const std::vector<std::byte>& stream,
                                   std::size_t trailing) {
    std::vector<std::byte> bytes(c.bytes.begin(),
                                 c.bytes.begin() + static_cast<std::ptrdiff_t>(c.coffset));
    bytes.insert(bytes.end(), stream.begin(), stream.end());
    for (std::size_t i = 0; i < trailing; ++i)
        bytes.push_back(std::byte((i * 131 + 7) & 0xff)); // garbage, as another stream would be
    const std::uint64_t sectors = ((c.coffset % 512) + stream.size() + trailing + 511) / 512;
    EXPECT_LE(sectors, 256u);
    test::put_be64(bytes, c.l2_entry_at, (1ull << 62) | ((sectors - 1) << 54) | c.coffset);
    return bytes;
}

/// The first 64 KiB of the disk of image file `bytes`, read by qemu-img (nullopt if it fails).
std::optional<std::vector<std::byte>> qemu_first_cluster(const TempDir& dir,
                                                         const std::vector<std::byte>& bytes) {
    auto path = dir / "edited.qcow2";
    test::write_file(path, bytes);
    auto raw = dir / "edited.raw";
    std::filesystem::remove(raw);
    if (run("qemu-img convert -f qcow2 -O raw " + q(path) + " " + q(raw)).exit_code != 0)
        return std::nullopt;
    auto all = test::read_file(raw);
    all.resize(64 * 1024);
    return all;
}

std::vector<std::byte> first_cluster(const std::vector<std::byte>& bytes) {
    auto image = Image::open_bytes(bytes);
    EXPECT_TRUE(image) << image.error().message;
    std::vector<std::byte> out(64 * 1024, std::byte{0x33});
    if (!image)
        return out;
    auto n = image->read(out, 0);
    EXPECT_TRUE(n) << n.error().message;
    return out;
}

TEST(Inflater, TrailingBytesAfterTheStreamAreIgnoredLikeQemu) {
    TempDir dir;
    OneCompressed c = make_one_compressed(dir, "cluster_size=64k");
    std::vector<std::byte> stream(c.bytes.begin() + static_cast<std::ptrdiff_t>(c.coffset),
                                  c.bytes.end());
    const std::vector<std::byte> expected(64 * 1024, std::byte{0x5c});
    // Up to the end of the sector (what qemu's rounded-up count covers), and 3 sectors more.
    for (std::size_t trailing :
         {std::size_t{1}, 511 - (c.coffset + stream.size()) % 512, std::size_t{1536}}) {
        SCOPED_TRACE(trailing);
        auto bytes = with_stream(c, stream, trailing);
        EXPECT_TRUE(first_cluster(bytes) == expected);
        auto theirs = qemu_first_cluster(dir, bytes);
        ASSERT_TRUE(theirs);
        EXPECT_TRUE(*theirs == expected);
    }
}

TEST(Inflater, EveryKindOfDeflateBlockDecodesExactly) {
    // Stored blocks (two of them: one holds at most 65535 bytes), with and without trailing
    // bytes; qemu's own fixed/dynamic Huffman streams are covered by the image tests above.
    TempDir dir;
    OneCompressed c = make_one_compressed(dir, "cluster_size=64k");
    std::vector<std::byte> data(64 * 1024);
    for (std::size_t i = 0; i < data.size(); ++i)
        data[i] = std::byte((i * 7 + i / 251) & 0xff);
    for (std::size_t trailing : {std::size_t{0}, std::size_t{100}}) {
        auto bytes = with_stream(c, stored_blocks(data), trailing);
        EXPECT_TRUE(first_cluster(bytes) == data) << trailing;
        auto theirs = qemu_first_cluster(dir, bytes);
        ASSERT_TRUE(theirs);
        EXPECT_TRUE(*theirs == data);
    }
}

TEST(Inflater, StreamThatGoesOnPastTheClusterGivesItsFirstClusterLikeQemu) {
    // qemu inflates with Z_FINISH into one cluster and accepts a full buffer whether or not the
    // stream ended there; libdeflate reports "insufficient space" and zlib decides.
    TempDir dir;
    OneCompressed c = make_one_compressed(dir, "cluster_size=64k");
    std::vector<std::byte> data(64 * 1024 + 100);
    for (std::size_t i = 0; i < data.size(); ++i)
        data[i] = std::byte((i * 13 + 1) & 0xff);
    auto bytes = with_stream(c, stored_blocks(data), 0);
    const std::vector<std::byte> expected(data.begin(), data.begin() + 64 * 1024);
    EXPECT_TRUE(first_cluster(bytes) == expected);
    auto theirs = qemu_first_cluster(dir, bytes);
    ASSERT_TRUE(theirs);
    EXPECT_TRUE(*theirs == expected);
}

TEST(Inflater, BrokenStreamsGiveZlibsMessages) {
    TempDir dir;
    OneCompressed c = make_one_compressed(dir, "cluster_size=64k");
    const std::string where =
        "compressed cluster for virtual offset 0x0 at host offset " + fmt_hex(c.coffset) + " (+";
    struct Case {
        const char* name;
        std::vector<std::byte> stream;
        std::string message_end;
    };
    std::vector<std::byte> short_data(1000, std::byte{0x42});
    std::vector<std::byte> bad_lengths = stored_blocks(short_data);
    bad_lengths[3] = std::byte{0}; // NLEN no longer the complement of LEN
    const std::vector<Case> cases = {
        {"ends early", stored_blocks(short_data), "): zlib stream ended after 1000 of 65536 bytes"},
        {"reserved block type",
         {std::byte{0x07}, std::byte{0}, std::byte{0}},
         "): zlib error -3: invalid block type"},
        {"stored lengths", bad_lengths, "): zlib error -3: invalid stored block lengths"},
    };
    for (const Case& k : cases) {
        SCOPED_TRACE(k.name);
        auto bytes = with_stream(c, k.stream, 0);
        Error e = read_error(bytes);
        EXPECT_EQ(e.code, ErrorCode::compressed_data);
        EXPECT_EQ(e.message.rfind(where, 0), 0u) << e.message;
        ASSERT_GE(e.message.size(), k.message_end.size());
        EXPECT_EQ(e.message.substr(e.message.size() - k.message_end.size()), k.message_end)
            << e.message;
        EXPECT_FALSE(qemu_first_cluster(dir, bytes)) << "qemu-img reads it";
    }
}

} // namespace
} // namespace qcowmap

// Corrupt images, one per validation rule: the header and its extensions, the refcount, snapshot,
// bitmap and L1 tables at open; L1/L2 entries, data and compressed clusters during the extent
// walk; and how the CLI reports all of these.
//
// Healthy images are made once by qemu-img/qemu-io at test time, then copied and patched in
// memory (big-endian fields at the offsets of the spec's "Header" section). Every case asserts
// the exact ErrorCode and that the one-line message names the offending value.
#include "stream_oracle.hpp"
#include "support.hpp"

#include <qcowmap/check.hpp>
#include <qcowmap/format.hpp>
#include <qcowmap/image.hpp>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <initializer_list>
#include <map>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <sys/stat.h>
#include <vector>

namespace {

using namespace qcowmap;
namespace qt = qcowmap::test;
using qt::Buffer;
using qt::get_be;
using qt::get_be32;
using qt::get_be64;
using qt::put_be;
using qt::put_be32;
using qt::put_be64;
using qt::put_u8;

// ---------------------------------------------------------------------------------------------
// On-disk layout (docs/interop/qcow2.txt)

// Header field offsets (spec "Header").
constexpr std::size_t kVersionAt = 4;
constexpr std::size_t kBackingFileOffsetAt = 8;
constexpr std::size_t kBackingFileSizeAt = 16;
constexpr std::size_t kClusterBitsAt = 20;
constexpr std::size_t kSizeAt = 24;
constexpr std::size_t kCryptMethodAt = 32;
constexpr std::size_t kL1SizeAt = 36;
constexpr std::size_t kL1TableOffsetAt = 40;
constexpr std::size_t kRefcountTableOffsetAt = 48;
constexpr std::size_t kRefcountTableClustersAt = 56;
constexpr std::size_t kNbSnapshotsAt = 60;
constexpr std::size_t kSnapshotsOffsetAt = 64;
constexpr std::size_t kIncompatibleAt = 72;
constexpr std::size_t kAutoclearAt = 88;
constexpr std::size_t kRefcountOrderAt = 96;
constexpr std::size_t kHeaderLengthAt = 100;
constexpr std::size_t kCompressionTypeAt = 104;

constexpr std::uint64_t kCluster = 0x10000; // qemu-img's default; every fixture uses it
constexpr std::uint64_t kOffsetMask = 0x00fffffffffffe00ULL; // L1/L2 entry bits 9-55
constexpr std::uint64_t kCopied = 1ULL << 63;
constexpr std::uint64_t kCompressedFlag = 1ULL << 62;
// Compressed descriptor with 64 KiB clusters: x = 62 - (16 - 8) = 54.
constexpr unsigned kCsizeShift = 54;
constexpr std::uint64_t kCoffsetMask = (1ULL << kCsizeShift) - 1;

constexpr std::uint32_t kExtUnknown = 0x12345678;

constexpr std::uint64_t kFarAway = 0x10000000; // cluster-aligned, far past every fixture's end
constexpr std::size_t kBackingNameAt = 0x1000; // after qemu's extensions, in the first cluster

// ---------------------------------------------------------------------------------------------
// Byte patching. `at()` throws on a bad offset, which gtest reports as a test failure.

/// Writes `text` at `at`, zero-filling up to `field_size` bytes.
void put_text(Buffer& b, std::size_t at, std::string_view text, std::size_t field_size) {
    for (std::size_t i = 0; i < field_size; ++i) {
        b.at(at + i) = i < text.size() ? static_cast<std::byte>(text[i]) : std::byte{0};
    }
}

std::string hex(std::uint64_t v) {
    return fmt::format("{:#x}", v);
}

// Header extensions: a chain from the end of the header to a type-0 end marker.
struct ExtensionAt {
    std::size_t header; ///< offset of the type field; the data starts 8 bytes later
    std::uint32_t type;
    std::uint32_t length;
};

std::size_t extensions_start(const Buffer& b) {
    return get_be32(b, kVersionAt) == 2 ? 72 : get_be32(b, kHeaderLengthAt);
}

std::vector<ExtensionAt> extensions(const Buffer& b) {
    std::vector<ExtensionAt> out;
    std::size_t at = extensions_start(b);
    while (std::uint32_t type = get_be32(b, at)) {
        std::uint32_t length = get_be32(b, at + 4);
        out.push_back({at, type, length});
        at += 8 + ((length + 7) & ~std::size_t{7});
    }
    return out;
}

/// Offset of the extension's header (type field); throws when the image has no such extension.
std::size_t find_extension(const Buffer& b, std::uint32_t type) {
    for (const ExtensionAt& e : extensions(b)) {
        if (e.type == type)
            return e.header;
    }
    throw std::runtime_error(fmt::format("fixture has no header extension {:#x}", type));
}

std::size_t end_marker(const Buffer& b) {
    auto list = extensions(b);
    return list.empty() ? extensions_start(b)
                        : list.back().header + 8 + ((list.back().length + 7) & ~std::size_t{7});
}

/// Adds an extension where the end marker was, followed by a new end marker.
void append_extension(Buffer& b, std::uint32_t type, std::string_view data) {
    std::size_t at = end_marker(b);
    std::size_t padded = (data.size() + 7) & ~std::size_t{7};
    put_be32(b, at, type);
    put_be32(b, at + 4, static_cast<std::uint32_t>(data.size()));
    put_text(b, at + 8, data, padded);
    put_be64(b, at + 8 + padded, 0);
}

// Geometry of the fixtures: one L1 entry (1 MiB disk), 64 KiB clusters.
std::size_t l1_offset(const Buffer& b) {
    return get_be64(b, kL1TableOffsetAt);
}
std::size_t l2_table(const Buffer& b) {
    return get_be64(b, l1_offset(b)) & kOffsetMask;
}
std::size_t l2_entry(const Buffer& b, unsigned index, unsigned entry_bytes = 8) {
    return l2_table(b) + std::size_t{index} * entry_bytes;
}

/// The compressed stream of the (compressed) cluster 0: host offset and the bytes the reader
/// takes (the descriptor's sector count, cut short by the end of the file).
struct Stream {
    std::uint64_t offset;
    std::uint64_t size;
};
Stream compressed_stream(const Buffer& b) {
    std::uint64_t entry = get_be64(b, l2_entry(b, 0));
    std::uint64_t offset = entry & kCoffsetMask;
    std::uint64_t sectors = ((entry >> kCsizeShift) & 0xff) + 1;
    std::uint64_t size = std::min<std::uint64_t>(sectors * 512 - (offset & 511), b.size() - offset);
    return {offset, size};
}

// ---------------------------------------------------------------------------------------------
// Assertions

testing::AssertionResult error_matches(const Error& error, ErrorCode code,
                                       std::initializer_list<std::string_view> needles) {
    if (error.code != code) {
        return testing::AssertionFailure()
               << "error code " << to_string(error.code) << ", expected " << to_string(code)
               << " (message: \"" << error.message << "\")";
    }
    for (std::string_view needle : needles) {
        if (error.message.find(needle) == std::string::npos) {
            return testing::AssertionFailure()
                   << "message \"" << error.message << "\" does not contain \"" << needle << "\"";
        }
    }
    if (error.message.empty() || error.message.find('\n') != std::string::npos) {
        return testing::AssertionFailure()
               << "message is not one line: \"" << error.message << "\"";
    }
    return testing::AssertionSuccess() << error.message;
}

template <typename T>
testing::AssertionResult fails_with(const Result<T>& result, ErrorCode code,
                                    std::initializer_list<std::string_view> needles) {
    if (result) {
        return testing::AssertionFailure() << "succeeded, expected " << to_string(code);
    }
    return error_matches(result.error(), code, needles);
}

OpenOptions no_backing() {
    OpenOptions options;
    options.backing = BackingMode::none;
    return options;
}

Result<Image> open(const Buffer& b, const OpenOptions& options = {}) {
    // Every image of this suite also goes through the stream decoder (issue 29).
    qt::expect_stream_agrees(b);
    return Image::open_bytes(std::span<const std::byte>(b), options);
}

/// Walks the whole disk expecting an error; after it, stepping on must keep yielding nothing
/// and the error must stay as it was.
testing::AssertionResult walk_fails_with(const Image& image, ErrorCode code,
                                         std::initializer_list<std::string_view> needles) {
    ExtentRange it = image.extents();
    auto cursor = it.begin();
    std::size_t yielded = 0;
    for (; cursor != std::default_sentinel; ++cursor) {
        ++yielded;
    }
    if (!it.error().has_value()) {
        return testing::AssertionFailure() << "walk succeeded (" << yielded << " extents)";
    }
    const Error first = *it.error();
    for (int again = 0; again < 3; ++again) {
        ++cursor; // asks the failed walk for more
        if (cursor != std::default_sentinel) {
            return testing::AssertionFailure() << "the walk yielded an extent after the error";
        }
        if (!it.error().has_value() || it.error()->code != first.code ||
            it.error()->message != first.message) {
            return testing::AssertionFailure() << "the error changed when the walk was retried";
        }
    }
    return error_matches(first, code, needles);
}

/// The extent walk, read() and visit() over the whole disk all fail with the same error.
testing::AssertionResult every_read_fails_with(const Image& image, ErrorCode code,
                                               std::initializer_list<std::string_view> needles) {
    if (auto r = walk_fails_with(image, code, needles); !r) {
        return r << " [extents()]";
    }
    std::vector<std::byte> disk(image.size());
    if (auto r = fails_with(image.read(disk, 0), code, needles); !r) {
        return r << " [read()]";
    }
    auto ignore = [](const qcowmap::Run&) -> Result<void> { return {}; };
    if (auto r = fails_with(image.visit(0, UINT64_MAX, ignore), code, needles); !r) {
        return r << " [visit()]";
    }
    return testing::AssertionSuccess();
}

/// Walks and reads the whole disk; true when nothing fails.
testing::AssertionResult reads_cleanly(const Image& image) {
    ExtentRange it = image.extents();
    for ([[maybe_unused]] const Extent& extent : it) {
    }
    if (it.error().has_value()) {
        return testing::AssertionFailure() << "walk failed: " << it.error()->message;
    }
    std::vector<std::byte> disk(image.size());
    auto read = image.read(disk, 0);
    if (!read) {
        return testing::AssertionFailure() << "read failed: " << read.error().message;
    }
    return testing::AssertionSuccess();
}

/// Runs `qcowmap ARGS FILE` (after `prefix`, e.g. a ulimit) and checks the error contract:
/// exit code 1 and exactly one stderr line "qcowmap: FILE: ..." containing `needle`.
testing::AssertionResult cli_fails(const std::string& args, const std::filesystem::path& file,
                                   std::string_view needle, const std::string& prefix = "") {
    const std::string command =
        prefix + qt::qcowmap_bin() + " " + args + " " + qt::shell_quote(file.string());
    qt::CommandResult r = qt::run(command);
    if (r.exit_code != 1) {
        return testing::AssertionFailure() << "`" << command << "` exited with " << r.exit_code
                                           << " (expected 1); stderr: " << r.err;
    }
    const std::string prefix_line = "qcowmap: " + file.string() + ": ";
    if (r.err.rfind(prefix_line, 0) != 0 || std::count(r.err.begin(), r.err.end(), '\n') != 1 ||
        r.err.back() != '\n') {
        return testing::AssertionFailure()
               << "`" << command << "`: stderr is not one line starting with \"" << prefix_line
               << "\": \"" << r.err << "\"";
    }
    if (r.err.find(needle) == std::string::npos) {
        return testing::AssertionFailure()
               << "`" << command << "`: stderr \"" << r.err << "\" lacks \"" << needle << "\"";
    }
    return testing::AssertionSuccess();
}

testing::AssertionResult cli_succeeds(const std::string& args, const std::filesystem::path& file,
                                      const std::string& prefix = "") {
    const std::string command =
        prefix + qt::qcowmap_bin() + " " + args + " " + qt::shell_quote(file.string());
    qt::CommandResult r = qt::run(command);
    if (r.exit_code != 0) {
        return testing::AssertionFailure()
               << "`" << command << "` exited with " << r.exit_code << ": " << r.err;
    }
    return testing::AssertionSuccess();
}

// ---------------------------------------------------------------------------------------------
// Fixtures: healthy images made once per run, copied by each test.

struct Fixtures {
    qt::TempDir dir;
    Buffer v3;          ///< 1 MiB; clusters 0 (0xab) and 2 (0xcd) allocated, 1 unallocated
    Buffer v2;          ///< the same as compat=0.10
    Buffer zlib;        ///< cluster 0 compressed with zlib (0x11)
    Buffer zstd;        ///< cluster 0 compressed with zstd (0x11)
    Buffer zlib_many;   ///< clusters 0..15 compressed with zlib, cluster i filled with 0x40 + i
    Buffer extended_l2; ///< extended_l2=on, cluster 0 written (0x22)
    Buffer extended_l2_compressed; ///< extended_l2=on, cluster 0 compressed (0x33)
    Buffer bitmaps;                ///< v3 with one persistent dirty bitmap "b0"
    Buffer v1;                     ///< legacy qcow: 1 MiB, 4 KiB clusters, cluster 0 written (0xab)
    Buffer v1_compressed;          ///< legacy qcow: cluster 0 compressed (0x11)

    Fixtures() {
        auto make = [&](const std::string& name, const std::string& options,
                        const std::vector<std::string>& io) {
            auto path = dir / name;
            qt::make_image(path, options, "1M", io);
            return path;
        };
        const std::vector<std::string> two_clusters = {"write -P 0xab 0 64k",
                                                       "write -P 0xcd 128k 64k"};
        v3 = qt::read_file(make("v3.qcow2", "", two_clusters));
        v2 = qt::read_file(make("v2.qcow2", "compat=0.10", two_clusters));
        zlib = qt::read_file(make("zlib.qcow2", "", {"write -c -P 0x11 0 64k"}));
        zstd =
            qt::read_file(make("zstd.qcow2", "compression_type=zstd", {"write -c -P 0x11 0 64k"}));
        std::vector<std::string> many;
        for (unsigned i = 0; i < 16; ++i) {
            many.push_back(fmt::format("write -c -P {:#x} {}k 64k", 0x40 + i, 64 * i));
        }
        zlib_many = qt::read_file(make("zlib-many.qcow2", "", many));
        extended_l2 = qt::read_file(make("ext.qcow2", "extended_l2=on", {"write -P 0x22 0 64k"}));
        extended_l2_compressed = qt::read_file(
            make("ext-compressed.qcow2", "extended_l2=on", {"write -c -P 0x33 0 64k"}));
        auto with_bitmap = make("bitmaps.qcow2", "", {"write -P 0xab 0 64k"});
        qt::run_ok("qemu-img bitmap --add " + qt::shell_quote(with_bitmap.string()) + " b0");
        bitmaps = qt::read_file(with_bitmap);

        auto legacy = dir / "v1.qcow";
        qt::run_ok("qemu-img create -q -f qcow " + qt::shell_quote(legacy.string()) + " 1M");
        qt::run_ok("qemu-io -f qcow -c 'write -P 0xab 0 4k' " + qt::shell_quote(legacy.string()) +
                   " >/dev/null");
        v1 = qt::read_file(legacy);
        auto legacy_compressed = dir / "v1c.qcow";
        qt::run_ok("qemu-img create -q -f qcow " + qt::shell_quote(legacy_compressed.string()) +
                   " 1M");
        qt::run_ok("qemu-io -f qcow -c 'write -c -P 0x11 0 4k' " +
                   qt::shell_quote(legacy_compressed.string()) + " >/dev/null");
        v1_compressed = qt::read_file(legacy_compressed);
    }
};

const Fixtures& fixtures() {
    static Fixtures f;
    return f;
}

// Every fixture opens and reads cleanly, so each failure below comes from its patch alone.
TEST(CorruptFixtures, HealthyImagesOpenAndRead) {
    const Fixtures& f = fixtures();
    for (const Buffer* b : {&f.v3, &f.v2, &f.zlib, &f.zstd, &f.zlib_many, &f.extended_l2,
                            &f.extended_l2_compressed, &f.bitmaps, &f.v1, &f.v1_compressed}) {
        auto image = open(*b);
        ASSERT_TRUE(image) << image.error().message;
        EXPECT_TRUE(reads_cleanly(*image));
        EXPECT_EQ(image->size(), 1u << 20);
        const bool legacy = b == &f.v1 || b == &f.v1_compressed;
        EXPECT_EQ(image->info().cluster_size, legacy ? 4096 : kCluster);
    }
    // The layout the patches below rely on.
    EXPECT_EQ(get_be32(f.v3, kL1SizeAt), 1u);
    EXPECT_NE(get_be64(f.v3, l2_entry(f.v3, 0)) & kOffsetMask, 0u);
    EXPECT_EQ(get_be64(f.v3, l2_entry(f.v3, 1)), 0u);
    EXPECT_NE(get_be64(f.v3, l2_entry(f.v3, 2)) & kOffsetMask, 0u);
    EXPECT_NE(get_be64(f.zlib, l2_entry(f.zlib, 0)) & kCompressedFlag, 0u);
    EXPECT_NE(get_be64(f.zstd, l2_entry(f.zstd, 0)) & kCompressedFlag, 0u);
    EXPECT_NE(get_be64(f.extended_l2_compressed, l2_entry(f.extended_l2_compressed, 0, 16)) &
                  kCompressedFlag,
              0u);
    EXPECT_EQ(open(f.bitmaps)->info().bitmaps->names, std::vector<std::string>{"b0"});
    EXPECT_EQ(open(f.zstd)->info().compression_type, CompressionType::zstd);
    EXPECT_TRUE(open(f.extended_l2)->info().extended_l2);
}

// ---------------------------------------------------------------------------------------------
// Not a qcow2 image, or not a file at all

TEST(CorruptFile, BadMagic) {
    Buffer b = fixtures().v3;
    put_u8(b, 3, 0xfa);
    EXPECT_TRUE(fails_with(open(b), ErrorCode::not_qcow2, {"magic"}));

    Buffer text(4096, std::byte{'x'});
    EXPECT_TRUE(fails_with(open(text), ErrorCode::not_qcow2, {"magic"}));

    qt::TempDir dir;
    qt::write_file(dir / "bad.qcow2", b);
    EXPECT_TRUE(fails_with(Image::open(dir / "bad.qcow2"), ErrorCode::not_qcow2, {"magic"}));
}

TEST(CorruptFile, EmptyFileIsNotQcow2) {
    qt::TempDir dir;
    qt::write_file(dir / "empty", {});
    EXPECT_TRUE(fails_with(Image::open(dir / "empty"), ErrorCode::not_qcow2, {"empty", "0 bytes"}));
    EXPECT_TRUE(fails_with(open(Buffer{}), ErrorCode::not_qcow2, {"magic"}));
}

TEST(CorruptFile, DirectoryIsNotQcow2) {
    qt::TempDir dir;
    EXPECT_TRUE(fails_with(Image::open(dir.path()), ErrorCode::not_qcow2, {"directory"}));
}

TEST(CorruptFile, CharacterDeviceIsNotQcow2) {
    EXPECT_TRUE(fails_with(Image::open("/dev/null"), ErrorCode::not_qcow2, {"not a regular file"}));
}

TEST(CorruptFile, NonexistentPathIsIoError) {
    qt::TempDir dir;
    EXPECT_TRUE(fails_with(Image::open(dir / "missing.qcow2"), ErrorCode::io_error,
                           {"No such file or directory"}));
}

// ---------------------------------------------------------------------------------------------
// Truncated files

TEST(CorruptTruncated, ThreeBytes) {
    Buffer b(fixtures().v3.begin(), fixtures().v3.begin() + 3); // "QFI"
    EXPECT_TRUE(fails_with(open(b), ErrorCode::not_qcow2, {"magic"}));
    qt::TempDir dir;
    qt::write_file(dir / "three", b);
    EXPECT_TRUE(fails_with(Image::open(dir / "three"), ErrorCode::not_qcow2, {"magic"}));
}

TEST(CorruptTruncated, MagicWithoutVersion) {
    Buffer b(fixtures().v3.begin(), fixtures().v3.begin() + 6);
    EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_header, {"truncated", "6 bytes"}));
}

TEST(CorruptTruncated, HalfAVersion2Header) {
    Buffer b(fixtures().v2.begin(), fixtures().v2.begin() + 50);
    EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_header,
                           {"truncated", "50 bytes", "72-byte version 2 header"}));
    qt::TempDir dir;
    qt::write_file(dir / "short.qcow2", b);
    EXPECT_TRUE(fails_with(Image::open(dir / "short.qcow2"), ErrorCode::invalid_header,
                           {"50 bytes", "72-byte"}));
}

TEST(CorruptTruncated, Version3HeaderCutAt100Bytes) {
    Buffer b(fixtures().v3.begin(), fixtures().v3.begin() + 100);
    EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_header,
                           {"truncated", "100 bytes", "104-byte version 3 header"}));
}

TEST(CorruptTruncated, Version3HeaderShorterThanHeaderLength) {
    Buffer b(fixtures().v3.begin(), fixtures().v3.begin() + 108); // header_length is 112
    EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_header, {"header_length 112", "108 bytes"}));
}

TEST(CorruptTruncated, InsideTheHeaderExtensions) {
    Buffer b(fixtures().v3.begin(), fixtures().v3.begin() + 200);
    EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_header,
                           {"header extension 0x6803f857 at 0x70", "length 384", "0xc8"}));
}

TEST(CorruptTruncated, BeforeTheRefcountTable) {
    Buffer b(fixtures().v3.begin(), fixtures().v3.begin() + 0x1000);
    const std::uint64_t table = get_be64(b, kRefcountTableOffsetAt);
    EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_table,
                           {"refcount table at " + hex(table), "(+0x10000)", "(0x1000)"}));
}

TEST(CorruptTruncated, InsideTheL1Table) {
    Buffer b = fixtures().v3;
    const std::uint64_t l1 = l1_offset(b);
    b.resize(l1 + 4);
    EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_table,
                           {"L1 table at " + hex(l1) + " (+0x8)", "end of file (" + hex(l1 + 4)}));
    qt::TempDir dir;
    qt::write_file(dir / "cut.qcow2", b);
    EXPECT_TRUE(fails_with(Image::open(dir / "cut.qcow2"), ErrorCode::invalid_table,
                           {"L1 table at " + hex(l1)}));
}

TEST(CorruptTruncated, InsideAnL2Table) {
    Buffer b = fixtures().v3;
    const std::uint64_t l2 = l2_table(b);
    b.resize(l2 + 0x100);
    auto image = open(b); // the header and L1 are intact: the walk finds the damage
    ASSERT_TRUE(image) << image.error().message;
    EXPECT_TRUE(every_read_fails_with(
        *image, ErrorCode::invalid_table,
        {"L2 table at " + hex(l2) + " (+0x10000)", "end of file (" + hex(l2 + 0x100) + ")"}));
}

TEST(CorruptTruncated, InsideADataCluster) {
    Buffer b = fixtures().v3;
    const std::uint64_t host = get_be64(b, l2_entry(b, 2)) & kOffsetMask;
    ASSERT_EQ(host + kCluster, b.size()) << "cluster 2 is expected to be the last in the file";
    b.resize(host + kCluster - 0x200);
    auto image = open(b);
    ASSERT_TRUE(image) << image.error().message;
    EXPECT_TRUE(every_read_fails_with(*image, ErrorCode::invalid_cluster,
                                      {"virtual offset 0x20000", "host offset " + hex(host),
                                       "end of file (" + hex(b.size()) + ")"}));
    // What lies before the damage still reads.
    std::vector<std::byte> first(kCluster);
    auto read = image->read(first, 0);
    ASSERT_TRUE(read) << read.error().message;
    EXPECT_EQ(first[0], std::byte{0xab});
}

// ---------------------------------------------------------------------------------------------
// Header fields

TEST(CorruptHeader, UnknownVersion) {
    for (std::uint32_t version : {0u, 4u, 0xffffffffu}) {
        Buffer b = fixtures().v3;
        put_be32(b, kVersionAt, version);
        EXPECT_TRUE(fails_with(open(b), ErrorCode::unsupported_version,
                               {fmt::format("version {}", version)}));
    }
}

TEST(CorruptHeader, Version1FieldOnAQcow2Header) {
    // Version 1 selects the legacy qcow layout, in which byte 32 is cluster_bits: here the top
    // byte of crypt_method, 0.
    Buffer b = fixtures().v3;
    put_be32(b, kVersionAt, 1);
    EXPECT_TRUE(
        fails_with(open(b), ErrorCode::invalid_header, {"cluster_bits 0", "qcow version 1"}));
}

TEST(CorruptHeader, ClusterBitsOutOfRange) {
    for (std::uint32_t bits : {0u, 8u, 22u, 63u, 64u}) {
        Buffer b = fixtures().v3;
        put_be32(b, kClusterBitsAt, bits);
        EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_header,
                               {fmt::format("cluster_bits {} ", bits), "9..21"}));
    }
}

TEST(CorruptHeader, HeaderLengthNotAMultipleOf8) {
    Buffer b = fixtures().v3;
    put_be32(b, kHeaderLengthAt, 113);
    EXPECT_TRUE(
        fails_with(open(b), ErrorCode::invalid_header, {"header_length 113", "multiple of 8"}));
}

TEST(CorruptHeader, HeaderLengthLargerThanACluster) {
    Buffer b = fixtures().v3;
    put_be32(b, kHeaderLengthAt, 0x10008);
    EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_header,
                           {"header_length 65544", "cluster size 65536"}));
}

TEST(CorruptHeader, HeaderLengthBelow104OnVersion3) {
    for (std::uint32_t length : {0u, 72u, 96u}) {
        Buffer b = fixtures().v3;
        put_be32(b, kHeaderLengthAt, length);
        EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_header,
                               {fmt::format("header_length {} is less than 104", length)}));
    }
}

TEST(CorruptHeader, UnknownIncompatibleBitWithoutFeatureTable) {
    Buffer b = fixtures().v3;
    put_be32(b, find_extension(b, qcowmap::kExtensionFeatureNames), kExtUnknown); // hide the table
    put_be64(b, kIncompatibleAt, 1ULL << 9);
    auto image = open(b);
    EXPECT_TRUE(fails_with(image, ErrorCode::unsupported_feature,
                           {"unsupported incompatible feature(s): bit 9"}));
}

TEST(CorruptHeader, UnknownIncompatibleBitNamedByFeatureTable) {
    Buffer b = fixtures().v3;
    // Rename the first entry of qemu's feature-name table to incompatible bit 9.
    const std::size_t entry = find_extension(b, qcowmap::kExtensionFeatureNames) + 8;
    put_u8(b, entry, 0);
    put_u8(b, entry + 1, 9);
    put_text(b, entry + 2, "frobnication", 46);
    put_be64(b, kIncompatibleAt, 1ULL << 9);
    EXPECT_TRUE(fails_with(open(b), ErrorCode::unsupported_feature, {"frobnication (bit 9)"}));

    // Several unknown bits: named ones by name, the others by number; known bits stay quiet.
    put_be64(b, kIncompatibleAt, (1ULL << 9) | (1ULL << 40) | kIncompatDirty);
    auto image = open(b);
    EXPECT_TRUE(
        fails_with(image, ErrorCode::unsupported_feature, {"frobnication (bit 9), bit 40"}));
    EXPECT_EQ(image.error().message.find("dirty"), std::string::npos) << image.error().message;
}

// Names come from the image: whatever bytes they hold, an error message stays one line (the CLI
// prints it as its single stderr line), and terminal control characters do not pass through raw.
TEST(CorruptHeader, NamesFromTheImageDoNotBreakTheOneLineMessage) {
    qt::TempDir dir;
    auto check = [&](const Buffer& b, ErrorCode code, std::string_view needle,
                     const std::string& name, const std::string& command = "info") {
        auto image = open(b);
        EXPECT_TRUE(fails_with(image, code, {needle})) << name;
        if (!image) {
            EXPECT_EQ(image.error().message.find('\x1b'), std::string::npos)
                << name << ": raw escape character in \"" << image.error().message << "\"";
        }
        qt::write_file(dir / name, b);
        EXPECT_TRUE(cli_fails(command, dir / name, needle)) << name;
    };
    {
        Buffer b = fixtures().v3;
        const std::size_t entry = find_extension(b, qcowmap::kExtensionFeatureNames) + 8;
        put_u8(b, entry, 0);
        put_u8(b, entry + 1, 9);
        put_text(b, entry + 2, "frob\nnication\x1b[2J", 46);
        put_be64(b, kIncompatibleAt, 1ULL << 9);
        check(b, ErrorCode::unsupported_feature, "frob", "feature.qcow2");
    }
    {
        Buffer b = fixtures().v3;
        put_text(b, kBackingNameAt, "base\n.qcow2", 16);
        put_be64(b, kBackingFileOffsetAt, kBackingNameAt);
        put_be32(b, kBackingFileSizeAt, 11);
        // info names the backing file without opening it; cat follows it.
        check(b, ErrorCode::unsupported_feature, "base", "backing.qcow2", "cat");
    }
    {
        Buffer b = fixtures().v3;
        append_extension(b, qcowmap::kExtensionDataFile, "disk\r\n.raw");
        put_be64(b, kIncompatibleAt, kIncompatDataFile);
        // info needs only the header and works without the data file: map reads.
        check(b, ErrorCode::unsupported_feature, "disk", "data-file.qcow2", "map");
    }
}

TEST(CorruptHeader, CompressionBitWithZlibType) {
    Buffer b = fixtures().v3;
    put_be64(b, kIncompatibleAt, kIncompatCompressionType);
    EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_header,
                           {"compression type bit is set", "compression_type is 0"}));
}

TEST(CorruptHeader, ZstdTypeWithoutCompressionBit) {
    Buffer b = fixtures().zstd;
    put_be64(b, kIncompatibleAt, 0);
    EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_header,
                           {"compression_type is 1", "bit is not set"}));
}

TEST(CorruptHeader, UnknownCompressionType) {
    Buffer b = fixtures().zstd;
    put_u8(b, kCompressionTypeAt, 2);
    EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_header, {"compression_type 2"}));
}

TEST(CorruptHeader, RefcountOrder7) {
    Buffer b = fixtures().v3;
    put_be32(b, kRefcountOrderAt, 7);
    EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_header, {"refcount_order 7"}));
}

TEST(CorruptHeader, CryptMethods) {
    Buffer b = fixtures().v3;
    put_be32(b, kCryptMethodAt, 1);
    EXPECT_TRUE(fails_with(open(b), ErrorCode::encrypted, {"crypt_method 1", "AES"}));
    put_be32(b, kCryptMethodAt, 2);
    EXPECT_TRUE(fails_with(open(b), ErrorCode::encrypted, {"crypt_method 2", "LUKS"}));
    put_be32(b, kCryptMethodAt, 3);
    EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_header, {"crypt_method 3"}));
}

TEST(CorruptHeader, RealLuksImageIsEncrypted) {
    qt::TempDir dir;
    auto path = dir / "luks.qcow2";
    qt::make_luks_image(path, "16M");
    EXPECT_TRUE(fails_with(Image::open(path), ErrorCode::encrypted, {"crypt_method 2", "LUKS"}));

    auto result = qt::run(qt::qcowmap_bin() + " info " + qt::shell_quote(path.string()));
    EXPECT_EQ(result.exit_code, 1) << result.err;
    EXPECT_EQ(result.err.rfind("qcowmap: " + path.string() + ": ", 0), 0u) << result.err;
}

TEST(CorruptHeader, ExtendedL2NeedsLargeClusters) {
    Buffer b = fixtures().extended_l2;
    put_be32(b, kClusterBitsAt, 13);
    EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_header,
                           {"extended L2", "cluster_bits >= 14, got 13"}));
}

TEST(CorruptHeader, ExternalDataFileIsUnsupported) {
    Buffer b = fixtures().v3;
    append_extension(b, qcowmap::kExtensionDataFile, "disk.raw");
    put_be64(b, kIncompatibleAt, kIncompatDataFile);
    EXPECT_TRUE(
        fails_with(open(b), ErrorCode::unsupported_feature, {"external data file", "disk.raw"}));
}

// Virtual size and the active L1 table

TEST(CorruptL1, TooLarge) {
    Buffer b = fixtures().v3;
    put_be32(b, kL1SizeAt, 4194305); // one entry past qemu's 32 MiB
    EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_table,
                           {"4194305 entries", "0x2000008 bytes", "0x2000000"}));
}

TEST(CorruptL1, EntryCountTimes8DoesNotOverflow) {
    Buffer b = fixtures().v3;
    put_be32(b, kL1SizeAt, 0xffffffff);
    EXPECT_TRUE(
        fails_with(open(b), ErrorCode::invalid_table, {"4294967295 entries", "0x7fffffff8 bytes"}));
}

TEST(CorruptL1, TooSmallForTheVirtualSize) {
    Buffer b = fixtures().v3;
    put_be64(b, kSizeAt, 1ULL << 30); // one L2 table covers 512 MiB: 1 GiB needs 2 entries
    EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_table,
                           {"L1 table of 1 entries", "virtual size 1073741824", "needs 2"}));

    put_be32(b, kL1SizeAt, 0);
    put_be64(b, kSizeAt, 512);
    EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_table,
                           {"L1 table of 0 entries", "virtual size 512", "needs 1"}));
}

TEST(CorruptL1, VirtualSizeNear2To64) {
    Buffer b = fixtures().v3;
    put_be64(b, kSizeAt, 0xfffffffffffffe00ULL);
    // 2^48 clusters of 64 KiB, 2^13 per L2 table: 2^35 L1 entries.
    EXPECT_TRUE(fails_with(
        open(b), ErrorCode::invalid_table,
        {"L1 table of 1 entries", "virtual size 18446744073709551104", "needs 34359738368"}));
    put_be64(b, kSizeAt, 0xffffffffffffffffULL);
    EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_table,
                           {"virtual size 18446744073709551615", "needs 34359738368"}));
}

TEST(CorruptL1, Unaligned) {
    Buffer b = fixtures().v3;
    const std::uint64_t l1 = l1_offset(b);
    put_be64(b, kL1TableOffsetAt, l1 + 0x200);
    EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_table,
                           {"L1 table offset " + hex(l1 + 0x200), "cluster size 0x10000"}));
    put_be64(b, kL1TableOffsetAt, 0);
    EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_table, {"L1 table offset 0x0 "}));
}

TEST(CorruptL1, PastTheEndOfTheFile) {
    Buffer b = fixtures().v3;
    put_be64(b, kL1TableOffsetAt, kFarAway);
    EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_table,
                           {"L1 table at 0x10000000 (+0x8)", "end of file (" + hex(b.size())}));
    // Starts inside, ends outside.
    put_be64(b, kL1TableOffsetAt, l1_offset(fixtures().v3));
    put_be32(b, kL1SizeAt, 4194304);
    EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_table,
                           {"L1 table at " + hex(l1_offset(b)) + " (+0x2000000)"}));
}

// Refcount table

TEST(CorruptRefcountTable, ZeroClusters) {
    Buffer b = fixtures().v3;
    put_be32(b, kRefcountTableClustersAt, 0);
    EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_table, {"refcount table", "0 clusters"}));
}

TEST(CorruptRefcountTable, TooLarge) {
    Buffer b = fixtures().v3;
    put_be32(b, kRefcountTableClustersAt, 129); // 8 MiB + one cluster
    EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_table,
                           {"129 clusters", "0x810000 bytes", "0x800000"}));
    put_be32(b, kRefcountTableClustersAt, 0xffffffff);
    EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_table,
                           {"4294967295 clusters", "0xffffffff0000 bytes"}));
}

TEST(CorruptRefcountTable, Unaligned) {
    Buffer b = fixtures().v3;
    const std::uint64_t table = get_be64(b, kRefcountTableOffsetAt);
    put_be64(b, kRefcountTableOffsetAt, table + 0x200);
    EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_table,
                           {"refcount table offset " + hex(table + 0x200), "0x10000"}));
    put_be64(b, kRefcountTableOffsetAt, 0);
    EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_table, {"refcount table offset 0x0 "}));
}

TEST(CorruptRefcountTable, PastTheEndOfTheFile) {
    Buffer b = fixtures().v3;
    put_be64(b, kRefcountTableOffsetAt, kFarAway);
    EXPECT_TRUE(
        fails_with(open(b), ErrorCode::invalid_table,
                   {"refcount table at 0x10000000 (+0x10000)", "end of file (" + hex(b.size())}));
    // Within qemu's limit, but far longer than the file.
    put_be64(b, kRefcountTableOffsetAt, get_be64(fixtures().v3, kRefcountTableOffsetAt));
    put_be32(b, kRefcountTableClustersAt, 128);
    EXPECT_TRUE(
        fails_with(open(b), ErrorCode::invalid_table, {"refcount table at", "(+0x800000)"}));
}

// Snapshot table

TEST(CorruptSnapshots, TooMany) {
    Buffer b = fixtures().v3;
    put_be32(b, kNbSnapshotsAt, 65537);
    put_be64(b, kSnapshotsOffsetAt, kCluster);
    EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_table, {"65537 snapshots", "65536"}));
    put_be32(b, kNbSnapshotsAt, 0xffffffff);
    EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_table, {"4294967295 snapshots"}));
}

TEST(CorruptSnapshots, TableUnaligned) {
    Buffer b = fixtures().v3;
    put_be32(b, kNbSnapshotsAt, 1);
    put_be64(b, kSnapshotsOffsetAt, 0x10200);
    EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_table,
                           {"snapshot table offset 0x10200", "0x10000"}));
    put_be64(b, kSnapshotsOffsetAt, 0);
    EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_table, {"snapshot table offset 0x0 "}));
}

TEST(CorruptSnapshots, TablePastTheEndOfTheFile) {
    Buffer b = fixtures().v3;
    put_be32(b, kNbSnapshotsAt, 1);
    put_be64(b, kSnapshotsOffsetAt, kFarAway);
    EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_table,
                           {"snapshot table at 0x10000000 (+0x28)", hex(b.size())}));
    // The most qemu allows, starting inside the file: 65536 * 40 bytes do not fit.
    put_be32(b, kNbSnapshotsAt, 65536);
    put_be64(b, kSnapshotsOffsetAt, kCluster);
    EXPECT_TRUE(
        fails_with(open(b), ErrorCode::invalid_table, {"snapshot table at 0x10000 (+0x280000)"}));
}

// Bitmaps extension and directory

struct BitmapsAt {
    Buffer b = fixtures().bitmaps;
    std::size_t header =
        find_extension(b, qcowmap::kExtensionBitmaps); // type, length, then the 24 bytes
    std::size_t count() const { return header + 8; }
    std::size_t reserved() const { return header + 12; }
    std::size_t directory_size() const { return header + 16; }
    std::size_t directory_offset() const { return header + 24; }
};

TEST(CorruptBitmaps, WrongExtensionLength) {
    BitmapsAt at;
    put_be32(at.b, at.header + 4, 16);
    EXPECT_TRUE(fails_with(open(at.b), ErrorCode::invalid_header,
                           {"bitmaps extension has length 16", "expected 24"}));
}

TEST(CorruptBitmaps, ZeroOrTooManyBitmaps) {
    BitmapsAt at;
    put_be32(at.b, at.count(), 0);
    EXPECT_TRUE(fails_with(open(at.b), ErrorCode::invalid_header, {"0 bitmaps", "1..65535"}));
    put_be32(at.b, at.count(), 65536);
    EXPECT_TRUE(fails_with(open(at.b), ErrorCode::invalid_header, {"65536 bitmaps"}));
}

TEST(CorruptBitmaps, ReservedFieldNonZero) {
    BitmapsAt at;
    put_be32(at.b, at.reserved(), 0x5a);
    EXPECT_TRUE(fails_with(open(at.b), ErrorCode::invalid_header, {"reserved", "0x5a"}));
}

TEST(CorruptBitmaps, DirectoryUnaligned) {
    BitmapsAt at;
    const std::uint64_t directory = get_be64(at.b, at.directory_offset());
    put_be64(at.b, at.directory_offset(), directory + 8);
    EXPECT_TRUE(fails_with(open(at.b), ErrorCode::invalid_header,
                           {"bitmap directory offset " + hex(directory + 8), "0x10000"}));
}

TEST(CorruptBitmaps, DirectoryPastTheEndOfTheFile) {
    BitmapsAt at;
    const std::uint64_t size = get_be64(at.b, at.directory_size());
    put_be64(at.b, at.directory_offset(), kFarAway);
    EXPECT_TRUE(fails_with(open(at.b), ErrorCode::invalid_table,
                           {"bitmap directory at 0x10000000 (+" + hex(size) + ")",
                            "end of file (" + hex(at.b.size())}));
}

TEST(CorruptBitmaps, DirectoryLargerThanQemuAllows) {
    BitmapsAt at;
    put_be64(at.b, at.directory_size(), 1024ULL * 65535 + 1);
    EXPECT_TRUE(fails_with(open(at.b), ErrorCode::invalid_header,
                           {"bitmap directory size 0x3fffc01", "0x3fffc00"}));
}

TEST(CorruptBitmaps, EntryRunsPastTheDirectory) {
    BitmapsAt at;
    const std::uint64_t directory = get_be64(at.b, at.directory_offset());
    put_be64(at.b, at.directory_size(), 8);
    EXPECT_TRUE(fails_with(open(at.b), ErrorCode::invalid_table,
                           {"bitmap directory entry 0 at " + hex(directory), "size 0x8"}));
    // Room for the entry's fixed part but not its name.
    put_be64(at.b, at.directory_size(), 24);
    EXPECT_TRUE(fails_with(open(at.b), ErrorCode::invalid_table,
                           {"bitmap directory entry 0", "name of 2 bytes", "0x18"}));
    // A second bitmap announced but absent.
    BitmapsAt two;
    put_be32(two.b, two.count(), 2);
    EXPECT_TRUE(fails_with(open(two.b), ErrorCode::invalid_table, {"bitmap directory entry 1"}));
}

TEST(CorruptBitmaps, IgnoredWhenTheAutoclearBitIsClear) {
    // A program without bitmap support clears autoclear bit 0; qemu then skips the bitmaps
    // extension after checking only its length (qcow2_read_extensions), whatever its fields say.
    BitmapsAt at;
    put_be64(at.b, kAutoclearAt, 0);
    put_be32(at.b, at.count(), 0);
    put_be64(at.b, at.directory_offset(), kFarAway);
    auto image = open(at.b);
    ASSERT_TRUE(image) << image.error().message;
    EXPECT_TRUE(reads_cleanly(*image));

    put_be32(at.b, at.header + 4, 16);
    EXPECT_TRUE(
        fails_with(open(at.b), ErrorCode::invalid_header, {"bitmaps extension has length 16"}));
}

// Backing file name

TEST(CorruptBackingFile, NameLongerThan1023) {
    Buffer b = fixtures().v3;
    put_text(b, kBackingNameAt, std::string(1024, 'n'), 1024);
    put_be64(b, kBackingFileOffsetAt, kBackingNameAt);
    put_be32(b, kBackingFileSizeAt, 1024);
    EXPECT_TRUE(fails_with(open(b, no_backing()), ErrorCode::invalid_header,
                           {"backing file name at 0x1000 of 1024 bytes", "1023"}));
    // 1023 bytes is fine.
    put_be32(b, kBackingFileSizeAt, 1023);
    auto image = open(b, no_backing());
    ASSERT_TRUE(image) << image.error().message;
    EXPECT_EQ(image->info().backing_file, std::string(1023, 'n'));
}

TEST(CorruptBackingFile, NameBeyondTheFirstCluster) {
    Buffer b = fixtures().v3;
    put_be64(b, kBackingFileOffsetAt, 0xff00);
    put_be32(b, kBackingFileSizeAt, 0x200);
    EXPECT_TRUE(fails_with(open(b, no_backing()), ErrorCode::invalid_header,
                           {"backing file name at 0xff00 of 512 bytes"}));
    put_be64(b, kBackingFileOffsetAt, 0x20000);
    put_be32(b, kBackingFileSizeAt, 4);
    EXPECT_TRUE(fails_with(open(b, no_backing()), ErrorCode::invalid_header,
                           {"backing file name at 0x20000 of 4 bytes"}));
}

TEST(CorruptBackingFile, EmptyNameMeansNoBackingFile) {
    // qemu reads a zero-length backing file name as "no backing file" (qemu-img info and
    // qemu-io read such an image as a standalone one).
    Buffer b = fixtures().v3;
    put_be64(b, kBackingFileOffsetAt, kBackingNameAt);
    put_be32(b, kBackingFileSizeAt, 0);
    auto image = open(b);
    ASSERT_TRUE(image) << image.error().message;
    EXPECT_TRUE(reads_cleanly(*image));
}

TEST(CorruptBackingFile, ValidNameNeedsBackingNone) {
    Buffer b = fixtures().v3;
    put_text(b, kBackingNameAt, "base.qcow2", 16);
    put_be64(b, kBackingFileOffsetAt, kBackingNameAt);
    put_be32(b, kBackingFileSizeAt, 10);
    EXPECT_TRUE(fails_with(open(b), ErrorCode::unsupported_feature, {"'base.qcow2'"}));
    auto image = open(b, no_backing());
    ASSERT_TRUE(image) << image.error().message;
    EXPECT_EQ(image->info().backing_file, "base.qcow2");
    EXPECT_TRUE(reads_cleanly(*image));
}

// Header extensions

TEST(CorruptExtensions, RunsPastTheExtensionArea) {
    Buffer b = fixtures().v3;
    const std::size_t table = find_extension(b, qcowmap::kExtensionFeatureNames);
    put_be32(b, table + 4, 0x10000);
    EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_header,
                           {"header extension 0x6803f857 at " + hex(table), "length 65536",
                            "extension area end 0x10000"}));
}

TEST(CorruptExtensions, RunsIntoTheBackingFileName) {
    Buffer b = fixtures().v3;
    // The backing file name starts inside the feature-name table: the area ends there.
    put_be64(b, kBackingFileOffsetAt, 0x100);
    put_be32(b, kBackingFileSizeAt, 4);
    EXPECT_TRUE(
        fails_with(open(b, no_backing()), ErrorCode::invalid_header,
                   {"header extension 0x6803f857", "length 384", "extension area end 0x100"}));
}

TEST(CorruptExtensions, HeaderCutOffByTheAreaEnd) {
    Buffer b = fixtures().v3;
    put_be64(b, kBackingFileOffsetAt, 0x74); // 4 bytes after the first extension starts
    put_be32(b, kBackingFileSizeAt, 4);
    EXPECT_TRUE(fails_with(open(b, no_backing()), ErrorCode::invalid_header,
                           {"header extension at 0x70 is cut off", "0x74"}));
}

TEST(CorruptExtensions, Duplicate) {
    Buffer b = fixtures().v3;
    append_extension(b, qcowmap::kExtensionBackingFormat, "qcow2");
    ASSERT_TRUE(open(b)) << "one backing format extension is fine";
    append_extension(b, qcowmap::kExtensionBackingFormat, "raw");
    EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_header,
                           {"header extension 0xe2792aca appears more than once"}));

    Buffer c = fixtures().bitmaps;
    const std::size_t first = find_extension(c, qcowmap::kExtensionBitmaps);
    std::string copy(24, '\0');
    for (std::size_t i = 0; i < 24; ++i)
        copy[i] = static_cast<char>(c.at(first + 8 + i));
    append_extension(c, qcowmap::kExtensionBitmaps, copy);
    EXPECT_TRUE(
        fails_with(open(c), ErrorCode::invalid_header, {"0x23852875 appears more than once"}));
}

TEST(CorruptExtensions, UnknownExtensionIsIgnored) {
    Buffer b = fixtures().v3;
    append_extension(b, kExtUnknown, "whatever");
    auto image = open(b);
    ASSERT_TRUE(image) << image.error().message;
    EXPECT_TRUE(reads_cleanly(*image));
}

TEST(CorruptExtensions, FeatureTableLengthNotAMultipleOf48) {
    Buffer b = fixtures().v3;
    put_be32(b, find_extension(b, qcowmap::kExtensionFeatureNames) + 4, 383);
    EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_header,
                           {"feature name table length 383", "multiple of 48"}));
}

TEST(CorruptExtensions, BackingFormatNameTooLong) {
    Buffer b = fixtures().v3;
    append_extension(b, qcowmap::kExtensionBackingFormat, "abcdefghijklmnop");
    EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_header,
                           {"backing file format name is 16 bytes long"}));
}

TEST(CorruptExtensions, EncryptionPointerWrongLength) {
    Buffer b = fixtures().v3;
    append_extension(b, qcowmap::kExtensionEncryption, "12345678");
    EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_header,
                           {"encryption header pointer has length 8", "expected 16"}));
}

// ---------------------------------------------------------------------------------------------
// The extent walk: L1 and L2 entries, data clusters

TEST(CorruptWalk, L1EntryReservedBits) {
    for (std::uint64_t bit : {1ULL << 0, 1ULL << 8, 1ULL << 56, 1ULL << 62}) {
        Buffer b = fixtures().v3;
        const std::uint64_t entry = get_be64(b, l1_offset(b)) | bit;
        put_be64(b, l1_offset(b), entry);
        auto image = open(b);
        ASSERT_TRUE(image) << image.error().message;
        EXPECT_TRUE(every_read_fails_with(
            *image, ErrorCode::invalid_table,
            {fmt::format("L1 entry 0 ({:#018x}) has reserved bits set", entry)}));
    }
}

TEST(CorruptWalk, L2TableUnaligned) {
    Buffer b = fixtures().v3;
    const std::uint64_t l2 = l2_table(b);
    put_be64(b, l1_offset(b), kCopied | (l2 + 0x200));
    auto image = open(b);
    ASSERT_TRUE(image) << image.error().message;
    EXPECT_TRUE(every_read_fails_with(
        *image, ErrorCode::invalid_table,
        {"L2 table offset " + hex(l2 + 0x200), "L1 index 0", "cluster size 0x10000"}));
}

TEST(CorruptWalk, L2TablePastTheEndOfTheFile) {
    Buffer b = fixtures().v3;
    put_be64(b, l1_offset(b), kCopied | kFarAway);
    auto image = open(b);
    ASSERT_TRUE(image) << image.error().message;
    EXPECT_TRUE(every_read_fails_with(
        *image, ErrorCode::invalid_table,
        {"L2 table at 0x10000000 (+0x10000)", "end of file (" + hex(b.size()) + ")"}));
}

TEST(CorruptWalk, L2EntryHostOffsetPastTheEndOfTheFile) {
    Buffer b = fixtures().v3;
    put_be64(b, l2_entry(b, 0), kCopied | kFarAway);
    auto image = open(b);
    ASSERT_TRUE(image) << image.error().message;
    EXPECT_TRUE(every_read_fails_with(*image, ErrorCode::invalid_cluster,
                                      {"virtual offset 0x0", "host offset 0x10000000 (+0x10000)",
                                       "end of file (" + hex(b.size()) + ")"}));
}

TEST(CorruptWalk, L2EntryHostOffsetUnaligned) {
    Buffer b = fixtures().v3;
    const std::uint64_t host = get_be64(b, l2_entry(b, 0)) & kOffsetMask;
    put_be64(b, l2_entry(b, 0), kCopied | (host + 0x200));
    auto image = open(b);
    ASSERT_TRUE(image) << image.error().message;
    EXPECT_TRUE(every_read_fails_with(
        *image, ErrorCode::invalid_cluster,
        {"virtual offset 0x0", "host offset " + hex(host + 0x200), "not aligned", "0x10000"}));
}

TEST(CorruptWalk, L2EntryReservedBits) {
    for (std::uint64_t bit : {1ULL << 1, 1ULL << 8, 1ULL << 56, 1ULL << 61}) {
        Buffer b = fixtures().v3;
        const std::uint64_t entry = get_be64(b, l2_entry(b, 0)) | bit;
        put_be64(b, l2_entry(b, 0), entry);
        auto image = open(b);
        ASSERT_TRUE(image) << image.error().message;
        EXPECT_TRUE(every_read_fails_with(
            *image, ErrorCode::invalid_cluster,
            {fmt::format("L2 entry for virtual offset 0x0 ({:#018x}) has reserved bits set",
                         entry)}));
    }
}

// Entries that read like the one before join its run in one loop (extent_iterator.cpp); an
// entry that would continue the run but carries a reserved bit must still be refused, at its
// own cluster: after a data entry (next host offset, bit 56 set) and after empty entries.
TEST(CorruptWalk, EntriesJoiningARunAreStillValidated) {
    for (std::uint64_t bit : {1ULL << 1, 1ULL << 56}) {
        Buffer b = fixtures().v3;
        const std::uint64_t first = get_be64(b, l2_entry(b, 0));
        ASSERT_NE(first & kOffsetMask, 0u);
        put_be64(b, l2_entry(b, 1), (first + kCluster) | bit);
        auto image = open(b);
        ASSERT_TRUE(image) << image.error().message;
        EXPECT_TRUE(every_read_fails_with(*image, ErrorCode::invalid_cluster,
                                          {"virtual offset 0x10000", "reserved bits set"}));

        Buffer c = fixtures().v3;
        put_be64(c, l2_entry(c, 1), 0);
        put_be64(c, l2_entry(c, 2), 0);
        put_be64(c, l2_entry(c, 3), bit);
        auto sparse = open(c);
        ASSERT_TRUE(sparse) << sparse.error().message;
        EXPECT_TRUE(every_read_fails_with(*sparse, ErrorCode::invalid_cluster,
                                          {"virtual offset 0x30000", "reserved bits set"}));
    }
}

TEST(CorruptWalk, ErrorInALaterClusterSparesEarlierRanges) {
    Buffer b = fixtures().v3;
    put_be64(b, l2_entry(b, 2), get_be64(b, l2_entry(b, 2)) | (1ULL << 1));
    auto image = open(b);
    ASSERT_TRUE(image) << image.error().message;
    EXPECT_TRUE(
        every_read_fails_with(*image, ErrorCode::invalid_cluster, {"virtual offset 0x20000"}));

    // Ranges that end before the bad cluster walk and read cleanly.
    ExtentRange it = image->extents(0, 2 * kCluster);
    std::uint64_t covered = 0;
    for (const Extent& e : it)
        covered += e.length;
    EXPECT_FALSE(it.error().has_value()) << it.error()->message;
    EXPECT_EQ(covered, 2 * kCluster);
    std::vector<std::byte> head(2 * kCluster);
    auto read = image->read(head, 0);
    ASSERT_TRUE(read) << read.error().message;
    EXPECT_EQ(head[0], std::byte{0xab});
    EXPECT_EQ(head[kCluster], std::byte{0});

    // A range starting at the bad cluster fails at once, and stays failed.
    ExtentRange at_bad = image->extents(2 * kCluster + 5, 3 * kCluster);
    Extent e;
    EXPECT_FALSE(at_bad.next(e));
    EXPECT_TRUE(at_bad.error().has_value());
    EXPECT_FALSE(at_bad.next(e));
    EXPECT_TRUE(at_bad.error().has_value());
    EXPECT_EQ(at_bad.error()->code, ErrorCode::invalid_cluster);
}

// Runs visited before an error: in disk order, contiguous from the start, never at or past the
// cluster that failed. Sequential and parallel visits report the first error in disk order.
TEST(CorruptWalk, VisitsReportTheFirstErrorInDiskOrder) {
    Buffer b = fixtures().v3;
    put_be64(b, kSizeAt, 64ULL << 20); // still within the one L2 table (512 MiB)
    // Bad entries at 8 MiB and 40 MiB: different parallel chunks (8 MiB each).
    for (unsigned cluster : {128u, 640u}) {
        put_be64(b, l2_entry(b, cluster), kCopied | 0x50000 | (1ULL << 1));
    }
    auto image = open(b);
    ASSERT_TRUE(image) << image.error().message;
    EXPECT_TRUE(
        every_read_fails_with(*image, ErrorCode::invalid_cluster, {"virtual offset 0x800000 "}));
    for (unsigned threads : {0u, 1u, 2u, 4u, 8u}) {
        SCOPED_TRACE(fmt::format("{} threads", threads));
        std::uint64_t covered = 0;
        bool in_order = true;
        auto visitor = [&](const qcowmap::Run& run) -> Result<void> {
            auto offset = run.offset;
            auto length = run.length;
            in_order = in_order && offset == covered;
            covered = offset + length;
            return {};
        };
        auto result =
            image->visit(0, UINT64_MAX, visitor, VisitOptions{threads, DataAccess::mapping});
        EXPECT_TRUE(fails_with(result, ErrorCode::invalid_cluster, {"virtual offset 0x800000 "}));
        EXPECT_TRUE(in_order);
        EXPECT_LE(covered, 0x800000u);
    }
}

TEST(CorruptWalk, ZeroFlagInAVersion2Image) {
    Buffer b = fixtures().v2;
    put_be64(b, l2_entry(b, 0), get_be64(b, l2_entry(b, 0)) | 1);
    auto image = open(b);
    ASSERT_TRUE(image) << image.error().message;
    EXPECT_TRUE(every_read_fails_with(*image, ErrorCode::invalid_cluster,
                                      {"zero cluster at virtual offset 0x0", "version 2 image"}));

    // The same flag is valid in version 3: the cluster reads as zeros.
    Buffer v3 = fixtures().v3;
    put_be64(v3, l2_entry(v3, 0), get_be64(v3, l2_entry(v3, 0)) | 1);
    auto zeroed = open(v3);
    ASSERT_TRUE(zeroed) << zeroed.error().message;
    std::vector<std::byte> first(kCluster, std::byte{1});
    ASSERT_TRUE(zeroed->read(first, 0));
    EXPECT_EQ(std::count(first.begin(), first.end(), std::byte{0}),
              static_cast<std::ptrdiff_t>(kCluster));
}

TEST(CorruptWalk, ExtendedL2SubclusterBothAllocatedAndZero) {
    Buffer b = fixtures().extended_l2;
    const std::size_t entry = l2_entry(b, 0, 16);
    put_be64(b, entry + 8, 0x0000000100000001ULL);
    auto image = open(b);
    ASSERT_TRUE(image) << image.error().message;
    EXPECT_TRUE(every_read_fails_with(
        *image, ErrorCode::invalid_cluster,
        {"virtual offset 0x0", "0x0000000100000001", "both allocated and zero"}));
}

TEST(CorruptWalk, ExtendedL2AllocatedWithoutHostOffset) {
    Buffer b = fixtures().extended_l2;
    const std::size_t entry = l2_entry(b, 2, 16); // an unallocated cluster
    ASSERT_EQ(get_be64(b, entry), 0u);
    put_be64(b, entry + 8, 0x3);
    auto image = open(b);
    ASSERT_TRUE(image) << image.error().message;
    EXPECT_TRUE(every_read_fails_with(
        *image, ErrorCode::invalid_cluster,
        {"virtual offset 0x20000", "0x0000000000000003", "host offset is 0"}));
}

TEST(CorruptWalk, ExtendedL2ZeroFlagIsIgnoredLikeQemu) {
    // The spec calls bit 0 "always 0" with extended L2 entries, but qemu ignores it there (the
    // subcluster bitmap says what is zero) and reads such images: so do we.
    Buffer b = fixtures().extended_l2;
    std::vector<std::byte> before(64 * 1024), after(64 * 1024);
    auto healthy = open(b);
    ASSERT_TRUE(healthy) << healthy.error().message;
    ASSERT_TRUE(healthy->read(before, 0));
    const std::size_t entry = l2_entry(b, 0, 16);
    put_be64(b, entry, get_be64(b, entry) | 1);
    auto image = open(b);
    ASSERT_TRUE(image) << image.error().message;
    auto n = image->read(after, 0);
    ASSERT_TRUE(n) << n.error().message;
    EXPECT_TRUE(before == after);
}

TEST(CorruptWalk, ExtendedL2CompressedEntryWithABitmap) {
    // The bitmap of a compressed cluster is unused: qemu's reads ignore it (iotest 271, "We
    // actually don't consider this a corrupted image"), only its check reports it. So do we.
    Buffer b = fixtures().extended_l2_compressed;
    std::vector<std::byte> before(64 * 1024), after(64 * 1024);
    auto healthy = open(b);
    ASSERT_TRUE(healthy) << healthy.error().message;
    ASSERT_TRUE(healthy->read(before, 0));
    const std::size_t entry = l2_entry(b, 0, 16);
    ASSERT_EQ(get_be64(b, entry + 8), 0u);
    put_be64(b, entry + 8, 0x0000000100000000ULL);
    auto image = open(b);
    ASSERT_TRUE(image) << image.error().message;
    auto n = image->read(after, 0);
    ASSERT_TRUE(n) << n.error().message;
    EXPECT_TRUE(before == after);
    auto checked = check_image(b);
    ASSERT_TRUE(checked) << checked.error().message;
    EXPECT_EQ(checked->corruptions, 1u);
}

// Compressed clusters

TEST(CorruptCompressed, DescriptorPastTheEndOfTheFile) {
    for (const Buffer* fixture : {&fixtures().zlib, &fixtures().zstd}) {
        Buffer b = *fixture;
        const std::uint64_t entry = get_be64(b, l2_entry(b, 0));
        put_be64(b, l2_entry(b, 0), (entry & ~kCoffsetMask) | kFarAway);
        auto image = open(b);
        ASSERT_TRUE(image) << image.error().message;
        EXPECT_TRUE(every_read_fails_with(*image, ErrorCode::invalid_cluster,
                                          {"compressed cluster for virtual offset 0x0",
                                           "host offset 0x10000000",
                                           "end of file (" + hex(b.size()) + ")"}));
        // Starting exactly at the end of the file is just as bad.
        put_be64(b, l2_entry(b, 0), (entry & ~kCoffsetMask) | b.size());
        auto at_end = open(b);
        ASSERT_TRUE(at_end) << at_end.error().message;
        EXPECT_TRUE(every_read_fails_with(*at_end, ErrorCode::invalid_cluster,
                                          {"host offset " + hex(b.size())}));
    }
}

/// Overwrites the compressed stream of cluster 0 with `value` bytes.
void fill_stream(Buffer& b, std::uint8_t value) {
    const Stream stream = compressed_stream(b);
    std::fill_n(b.begin() + static_cast<std::ptrdiff_t>(stream.offset), stream.size,
                std::byte{value});
}

/// Opens `b` (cluster 0 compressed), checks that the walk itself succeeds and that read(),
/// visit() and a Decompressor all fail with compressed_data naming the stream.
void expect_bad_stream(const Buffer& b, std::string_view problem) {
    const Stream stream = compressed_stream(b);
    auto image = open(b);
    ASSERT_TRUE(image) << image.error().message;
    const std::string where =
        "compressed cluster for virtual offset 0x0 at host offset " + hex(stream.offset);

    ExtentRange it = image->extents();
    Extent first;
    ASSERT_TRUE(it.next(first));
    EXPECT_EQ(first.kind, ExtentKind::compressed);
    EXPECT_EQ(first.compressed_host_offset, stream.offset);
    Extent rest;
    while (it.next(rest)) {
    }
    EXPECT_FALSE(it.error().has_value()) << "the descriptor is valid; only the stream is bad";

    Decompressor decompressor;
    EXPECT_TRUE(fails_with(decompressor.decompress(*image, first), ErrorCode::compressed_data,
                           {where, problem}));
    std::vector<std::byte> disk(image->size());
    EXPECT_TRUE(fails_with(image->read(disk, 0), ErrorCode::compressed_data, {where, problem}));
    EXPECT_TRUE(fails_with(image->read(std::span(disk).subspan(0, 100), 1000),
                           ErrorCode::compressed_data, {where}));
    auto ignore = [](const qcowmap::Run&) -> Result<void> { return {}; };
    EXPECT_TRUE(fails_with(image->visit(0, UINT64_MAX, ignore), ErrorCode::compressed_data,
                           {where, problem}));
    // The rest of the disk is unaffected.
    EXPECT_TRUE(image->read(std::span(disk).subspan(0, kCluster), kCluster));
}

// A Decompressor caches the last cluster it produced. That cache must never serve one image's
// cluster for another image's stream, even when the second image reuses the first one's memory.
TEST(CorruptCompressed, DecompressorCacheDoesNotLeakAcrossImages) {
    Buffer good = fixtures().zlib;
    Buffer bad = fixtures().zlib;
    fill_stream(bad, 0xff);
    Decompressor decompressor;
    const void* first_state = nullptr;
    {
        auto image = open(good);
        ASSERT_TRUE(image) << image.error().message;
        first_state = &image->info();
        ExtentRange it = image->extents();
        Extent e;
        ASSERT_TRUE(it.next(e));
        auto bytes = decompressor.decompress(*image, e);
        ASSERT_TRUE(bytes) << bytes.error().message;
        EXPECT_EQ((*bytes)[0], std::byte{0x11});
    }
    auto image = open(bad);
    ASSERT_TRUE(image) << image.error().message;
    ExtentRange it = image->extents();
    Extent e;
    ASSERT_TRUE(it.next(e));
    auto bytes = decompressor.decompress(*image, e);
    EXPECT_TRUE(fails_with(bytes, ErrorCode::compressed_data, {"zlib error"}))
        << (&image->info() == first_state ? "the second image reuses the first one's address"
                                          : "the images live at different addresses");
}

TEST(CorruptCompressed, GarbageZlibStream) {
    Buffer b = fixtures().zlib;
    fill_stream(b, 0xff); // deflate block type 3: invalid
    expect_bad_stream(b, "zlib error");
}

TEST(CorruptCompressed, GarbageZstdStream) {
    Buffer b = fixtures().zstd;
    fill_stream(b, 0xff);
    expect_bad_stream(b, "zstd error");
}

TEST(CorruptCompressed, ParallelVisitsReportBadStreams) {
    for (const Buffer* fixture : {&fixtures().zlib, &fixtures().zstd}) {
        Buffer b = *fixture;
        fill_stream(b, 0xff);
        const Stream stream = compressed_stream(b);
        auto image = open(b);
        ASSERT_TRUE(image) << image.error().message;
        auto ignore = [](const qcowmap::Run&) -> Result<void> { return {}; };
        EXPECT_TRUE(
            fails_with(image->visit(0, UINT64_MAX, ignore, VisitOptions{4, DataAccess::mapping}),
                       ErrorCode::compressed_data, {"host offset " + hex(stream.offset), "error"}));
    }
}

// Many compressed clusters, one of them bad: sequential and parallel visits hand the visitor every
// cluster before the bad one, in order and with the right bytes, then report the bad one.
TEST(CorruptCompressed, VisitsStopAtTheFirstBadClusterInOrder) {
    struct Case {
        std::string what;
        unsigned bad_cluster;
        ErrorCode code;
        std::string needle;
    };
    const std::vector<Case> cases = {
        {"garbage stream", 9, ErrorCode::compressed_data, "virtual offset 0x90000 "},
        {"L2 entry with reserved bits", 12, ErrorCode::invalid_cluster, "virtual offset 0xc0000 "},
    };
    for (const Case& c : cases) {
        Buffer b = fixtures().zlib_many;
        const std::size_t entry = l2_entry(b, c.bad_cluster);
        if (c.code == ErrorCode::compressed_data) {
            const std::uint64_t descriptor = get_be64(b, entry);
            const std::uint64_t offset = descriptor & kCoffsetMask;
            const std::uint64_t sectors = ((descriptor >> kCsizeShift) & 0xff) + 1;
            const std::uint64_t size =
                std::min<std::uint64_t>(sectors * 512 - (offset & 511), b.size() - offset);
            std::fill_n(b.begin() + static_cast<std::ptrdiff_t>(offset), size, std::byte{0xff});
        } else {
            put_be64(b, entry, kCopied | kFarAway | (1ULL << 1));
        }
        auto image = open(b);
        ASSERT_TRUE(image) << image.error().message;
        for (unsigned threads : {0u, 2u, 4u, 8u}) {
            SCOPED_TRACE(fmt::format("{}, {} threads", c.what, threads));
            std::uint64_t covered = 0;
            bool in_order = true;
            bool right_bytes = true;
            auto visitor = [&](const qcowmap::Run& run) -> Result<void> {
                auto offset = run.offset;
                auto length = run.length;
                auto bytes = run.bytes;
                in_order = in_order && offset == covered;
                covered = offset + length;
                if (offset < 16 * kCluster) {
                    const auto expected = static_cast<std::byte>(0x40 + offset / kCluster);
                    right_bytes = right_bytes && bytes.size() == length &&
                                  std::all_of(bytes.begin(), bytes.end(),
                                              [&](std::byte x) { return x == expected; });
                }
                return {};
            };
            auto result = threads == 0 ? image->visit(0, UINT64_MAX, visitor)
                                       : image->visit(0, UINT64_MAX, visitor,
                                                      VisitOptions{threads, DataAccess::mapping});
            EXPECT_TRUE(fails_with(result, c.code, {c.needle}));
            EXPECT_TRUE(in_order);
            EXPECT_TRUE(right_bytes);
            EXPECT_EQ(covered, c.bad_cluster * kCluster)
                << "each compressed cluster is its own run";
        }
    }
}

TEST(CorruptCompressed, ZlibStreamShorterThanACluster) {
    Buffer b = fixtures().zlib;
    const Stream stream = compressed_stream(b);
    // One final stored deflate block of 5 bytes: a valid stream that ends far too early.
    const std::uint8_t stored[] = {0x01, 0x05, 0x00, 0xfa, 0xff, 'h', 'e', 'l', 'l', 'o'};
    for (std::size_t i = 0; i < sizeof stored; ++i)
        put_u8(b, stream.offset + i, stored[i]);
    expect_bad_stream(b, "zlib stream ended after 5 of 65536 bytes");
}

TEST(CorruptCompressed, ZstdFrameShorterThanACluster) {
    Buffer b = fixtures().zstd;
    const Stream stream = compressed_stream(b);
    ASSERT_EQ(stream.offset + stream.size, b.size()) << "the stream is expected to end the file";
    // A zstd frame (no content size, 1 KiB window) holding one raw block of 5 bytes; the file
    // ends with it, so the reader's input is exactly this frame.
    const std::uint8_t frame[] = {0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x00, 0x29,
                                  0x00, 0x00, 'h',  'e',  'l',  'l',  'o'};
    b.resize(stream.offset + sizeof frame);
    for (std::size_t i = 0; i < sizeof frame; ++i)
        put_u8(b, stream.offset + i, frame[i]);
    expect_bad_stream(b, "zstd stream ended after 5 of 65536 bytes");
}

// ---------------------------------------------------------------------------------------------
// Legacy qcow version 1 (qemu block/qcow.c): 48-byte header, cluster_bits at byte 32, l2_bits at
// 33, crypt_method at 36, L1 offset at 40; L2 entries are plain offsets, bit 63 marks a
// compressed cluster whose byte size sits in bits (63 - cluster_bits)..62.

constexpr std::size_t kV1ClusterBitsAt = 32;
constexpr std::size_t kV1L2BitsAt = 33;
constexpr std::size_t kV1CryptMethodAt = 36;
constexpr std::size_t kV1L1TableOffsetAt = 40;

std::size_t v1_l2_entry(const Buffer& b, unsigned index) {
    return get_be64(b, get_be64(b, kV1L1TableOffsetAt)) + std::size_t{index} * 8;
}

TEST(CorruptQcowV1, TruncatedHeader) {
    Buffer b(fixtures().v1.begin(), fixtures().v1.begin() + 40);
    EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_header,
                           {"40 bytes", "48-byte qcow version 1 header"}));
}

TEST(CorruptQcowV1, ClusterAndL2BitsOutOfRange) {
    for (std::uint8_t bits : {8, 17}) {
        Buffer b = fixtures().v1;
        put_u8(b, kV1ClusterBitsAt, bits);
        EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_header,
                               {fmt::format("cluster_bits {} ", bits), "9..16"}));
    }
    for (std::uint8_t bits : {5, 14}) {
        Buffer b = fixtures().v1;
        put_u8(b, kV1L2BitsAt, bits);
        EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_header,
                               {fmt::format("l2_bits {} ", bits), "6..13"}));
    }
}

TEST(CorruptQcowV1, VirtualSize) {
    Buffer b = fixtures().v1;
    put_be64(b, kSizeAt, 1);
    EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_header, {"virtual size 1 "}));
    // 2^64 - 512 bytes in 2 MiB L2 ranges: 2^43 L1 entries.
    put_be64(b, kSizeAt, 0xfffffffffffffe00ULL);
    EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_table,
                           {"virtual size 18446744073709551104", "8796093022208 entries"}));
}

TEST(CorruptQcowV1, CryptMethods) {
    Buffer b = fixtures().v1;
    put_be32(b, kV1CryptMethodAt, 1);
    EXPECT_TRUE(fails_with(open(b), ErrorCode::encrypted, {"crypt_method 1", "AES"}));
    put_be32(b, kV1CryptMethodAt, 2);
    EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_header, {"crypt_method 2"}));
}

TEST(CorruptQcowV1, L1TablePastTheEndOfTheFile) {
    Buffer b = fixtures().v1;
    put_be64(b, kV1L1TableOffsetAt, kFarAway);
    EXPECT_TRUE(fails_with(open(b), ErrorCode::invalid_table,
                           {"L1 table at 0x10000000 (+0x8)", "end of file (" + hex(b.size())}));
}

TEST(CorruptQcowV1, BackingFileName) {
    Buffer b = fixtures().v1;
    put_be64(b, kBackingFileOffsetAt, 0x100);
    put_be32(b, kBackingFileSizeAt, 1024);
    EXPECT_TRUE(
        fails_with(open(b, no_backing()), ErrorCode::invalid_header, {"1024 bytes", "1023"}));
    put_be64(b, kBackingFileOffsetAt, kFarAway);
    put_be32(b, kBackingFileSizeAt, 4);
    EXPECT_TRUE(fails_with(open(b, no_backing()), ErrorCode::invalid_header,
                           {"backing file name at 0x10000000 (+0x4)"}));
}

TEST(CorruptQcowV1, L2TablePastTheEndOfTheFile) {
    Buffer b = fixtures().v1;
    put_be64(b, get_be64(b, kV1L1TableOffsetAt), kFarAway);
    auto image = open(b);
    ASSERT_TRUE(image) << image.error().message;
    EXPECT_TRUE(every_read_fails_with(*image, ErrorCode::invalid_table,
                                      {"L2 table at 0x10000000 (+0x1000)"}));
}

TEST(CorruptQcowV1, DataPastTheEndOfTheFile) {
    Buffer b = fixtures().v1;
    put_be64(b, v1_l2_entry(b, 0), kFarAway);
    auto image = open(b);
    ASSERT_TRUE(image) << image.error().message;
    EXPECT_TRUE(every_read_fails_with(*image, ErrorCode::invalid_cluster,
                                      {"virtual offset 0x0", "host offset 0x10000000 (+0x1000)"}));
}

TEST(CorruptQcowV1, CompressedClusterPastTheEndOfTheFile) {
    Buffer b = fixtures().v1;
    put_be64(b, v1_l2_entry(b, 0), (1ULL << 63) | (100ULL << (63 - 12)) | kFarAway);
    auto image = open(b);
    ASSERT_TRUE(image) << image.error().message;
    EXPECT_TRUE(every_read_fails_with(
        *image, ErrorCode::invalid_cluster,
        {"compressed cluster for virtual offset 0x0", "host offset 0x10000000 (+0x64)"}));
}

TEST(CorruptQcowV1, GarbageCompressedStream) {
    Buffer b = fixtures().v1_compressed;
    const std::uint64_t entry = get_be64(b, v1_l2_entry(b, 0));
    ASSERT_NE(entry & (1ULL << 63), 0u) << "cluster 0 is expected to be compressed";
    const std::uint64_t offset = entry & ((1ULL << (63 - 12)) - 1);
    const std::uint64_t size = (entry >> (63 - 12)) & 0xfff;
    std::fill_n(b.begin() + static_cast<std::ptrdiff_t>(offset), size, std::byte{0xff});
    auto image = open(b);
    ASSERT_TRUE(image) << image.error().message;
    std::vector<std::byte> disk(image->size());
    EXPECT_TRUE(fails_with(image->read(disk, 0), ErrorCode::compressed_data,
                           {"host offset " + hex(offset), "zlib error"}));
}

// ---------------------------------------------------------------------------------------------
// The CLI: one line on stderr, exit code 1, never a crash

const char* const kCommands[] = {"info", "cat", "map --output=json", "check"};

TEST(CorruptCli, OpenErrorsFailEveryCommand) {
    qt::TempDir dir;
    struct Case {
        std::string name;
        Buffer bytes;
        std::string needle;
    };
    std::vector<Case> cases;
    {
        Buffer b = fixtures().v3;
        put_u8(b, 0, 'X');
        cases.push_back({"bad magic.qcow2", b, "magic"});
    }
    {
        Buffer b = fixtures().v3;
        b.resize(l1_offset(b) + 4);
        cases.push_back({"cut-in-l1.qcow2", b, "L1 table at " + hex(l1_offset(b))});
    }
    {
        Buffer b = fixtures().v3;
        put_be32(b, kClusterBitsAt, 22);
        cases.push_back({"cluster-bits.qcow2", b, "cluster_bits 22"});
    }
    {
        Buffer b = fixtures().v3;
        const std::size_t entry = find_extension(b, qcowmap::kExtensionFeatureNames) + 8;
        put_u8(b, entry + 1, 9);
        put_text(b, entry + 2, "frobnication", 46);
        put_be64(b, kIncompatibleAt, 1ULL << 9);
        cases.push_back({"feature.qcow2", b, "frobnication (bit 9)"});
    }
    {
        Buffer b = fixtures().v3;
        put_be64(b, kSizeAt, 0xfffffffffffffe00ULL);
        cases.push_back({"huge.qcow2", b, "needs 34359738368"});
    }
    cases.push_back({"empty.qcow2", {}, "empty"});
    for (const Case& c : cases) {
        qt::write_file(dir / c.name, c.bytes);
        // Without the qcow magic a file probes as raw, as qemu-img probes it (issue 25): said
        // to be qcow2, it is refused.
        const bool probes_raw = c.name == "bad magic.qcow2" || c.name == "empty.qcow2";
        for (const char* command : kCommands) {
            EXPECT_TRUE(cli_fails(std::string(command) + (probes_raw ? " -f qcow2" : ""),
                                  dir / c.name, c.needle));
        }
    }
    for (const char* command : kCommands) {
        EXPECT_TRUE(cli_fails(command, dir / "missing.qcow2", "No such file or directory"));
        EXPECT_TRUE(cli_fails(command, dir.path(), "directory"));
    }
}

TEST(CorruptCli, WalkErrorsFailCatAndMap) {
    qt::TempDir dir;
    Buffer b = fixtures().v3;
    put_be64(b, l1_offset(b), kCopied | kFarAway);
    const auto path = dir / "l2-far.qcow2";
    qt::write_file(path, b);
    EXPECT_TRUE(cli_succeeds("info", path)) << "info reads only the header";
    EXPECT_TRUE(cli_fails("cat", path, "L2 table at 0x10000000"));
    EXPECT_TRUE(cli_fails("map --output=json", path, "L2 table at 0x10000000"));
    EXPECT_TRUE(cli_fails("map", path, "L2 table at 0x10000000"));

    // convert: the same one-line report naming the image, not the output.
    const auto out = dir / "out.raw";
    auto convert = qt::run(qt::qcowmap_bin() + " convert " + qt::shell_quote(path.string()) + " " +
                           qt::shell_quote(out.string()));
    EXPECT_EQ(convert.exit_code, 1) << convert.err;
    EXPECT_EQ(convert.err.rfind("qcowmap: " + path.string() + ": ", 0), 0u) << convert.err;
    EXPECT_EQ(std::count(convert.err.begin(), convert.err.end(), '\n'), 1) << convert.err;
    EXPECT_NE(convert.err.find("L2 table at 0x10000000"), std::string::npos) << convert.err;

    Buffer c = fixtures().v3;
    put_be64(c, l2_entry(c, 2), get_be64(c, l2_entry(c, 2)) | (1ULL << 1));
    const auto reserved = dir / "l2-reserved.qcow2";
    qt::write_file(reserved, c);
    EXPECT_TRUE(cli_fails("cat", reserved, "virtual offset 0x20000"));
    EXPECT_TRUE(cli_fails("map --output=json", reserved, "virtual offset 0x20000"));
}

TEST(CorruptCli, GarbageCompressedStreamFailsCat) {
    qt::TempDir dir;
    for (const Buffer* fixture : {&fixtures().zlib, &fixtures().zstd}) {
        Buffer b = *fixture;
        fill_stream(b, 0xff);
        const auto path = dir / "garbage.qcow2";
        qt::write_file(path, b);
        EXPECT_TRUE(cli_fails("cat", path, "compressed cluster for virtual offset 0x0"));
        // map and info never decompress, like qemu-img map/info.
        EXPECT_TRUE(cli_succeeds("map --output=json", path));
        EXPECT_TRUE(cli_succeeds("info", path));
    }
}

TEST(CorruptCli, FifoIsRefusedWithoutBlocking) {
    qt::TempDir dir;
    const auto fifo = dir / "fifo";
    ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
    // Opening a FIFO for reading blocks until a writer appears; the tool must not wait for one.
    EXPECT_TRUE(cli_fails("info", fifo, "not a regular file", "timeout 2 "));
}

// AddressSanitizer reserves terabytes of address space: `ulimit -v` cannot apply to such builds.
#if defined(__SANITIZE_ADDRESS__)
constexpr bool kAddressSanitizer = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
constexpr bool kAddressSanitizer = true;
#else
constexpr bool kAddressSanitizer = false;
#endif
#else
constexpr bool kAddressSanitizer = false;
#endif

// Memory: headers that claim huge tables fail fast, before any allocation of that size.
TEST(CorruptCli, HugeTablesFailUnderAMemoryLimit) {
    if (kAddressSanitizer)
        GTEST_SKIP() << "ulimit -v does not work under AddressSanitizer";
    qt::TempDir dir;
    const std::string limit = "ulimit -v 262144; ";
    const auto healthy = dir / "healthy.qcow2";
    qt::write_file(healthy, fixtures().v3);
    ASSERT_TRUE(cli_succeeds("info", healthy, limit)) << "the limit itself must not break qcowmap";
    ASSERT_TRUE(cli_succeeds("cat", healthy, limit));

    struct Case {
        std::string name;
        std::size_t field;
        std::uint64_t value;
        unsigned width;
        std::string needle;
    };
    const std::uint64_t snapshots_at = kCluster;
    const std::vector<Case> cases = {
        {"l1-max", kL1SizeAt, 4194304, 4, "(+0x2000000)"},
        {"l1-huge", kL1SizeAt, 0xffffffff, 4, "4294967295 entries"},
        {"refcount-max", kRefcountTableClustersAt, 128, 4, "(+0x800000)"},
        {"refcount-huge", kRefcountTableClustersAt, 0xffffffff, 4, "4294967295 clusters"},
        {"snapshots-max", kNbSnapshotsAt, 65536, 4, "(+0x280000)"},
        {"snapshots-huge", kNbSnapshotsAt, 0xffffffff, 4, "4294967295 snapshots"},
    };
    for (const Case& c : cases) {
        Buffer b = fixtures().v3;
        put_be(b, c.field, c.value, c.width);
        put_be64(b, kSnapshotsOffsetAt, snapshots_at);
        const auto path = dir / (c.name + ".qcow2");
        qt::write_file(path, b);
        for (const char* command : kCommands) {
            // check reads a snapshot table past the end of the file as zeros, as qemu-img check
            // does (iotest 080): here the fixture's data is read as an entry with too much extra
            // data first, as qemu-img check reports it ("Too much extra metadata in snapshot
            // table entry 3276").
            const bool check = std::string_view(command) == "check";
            const std::string needle =
                check && c.name == "snapshots-max" ? "snapshot table entry 3276 has" : c.needle;
            EXPECT_TRUE(cli_fails(command, path, needle, limit)) << c.name;
        }
    }
    // The largest bitmap directory qemu allows, announced in a small file.
    BitmapsAt at;
    put_be32(at.b, at.count(), 65535);
    put_be64(at.b, at.directory_size(), 1024ULL * 65535);
    const auto bitmaps = dir / "bitmaps-max.qcow2";
    qt::write_file(bitmaps, at.b);
    for (const char* command : kCommands) {
        EXPECT_TRUE(cli_fails(command, bitmaps, "bitmap directory at", limit));
    }
}

// Under memory pressure, commands that read the whole disk may fail, but with the one-line error
// contract, never by aborting (for instance when worker threads cannot be started).
TEST(CorruptCli, TightMemoryLimitsNeverCrash) {
    if (kAddressSanitizer)
        GTEST_SKIP() << "ulimit -v does not work under AddressSanitizer";
    qt::TempDir dir;
    // A plain image, and one with compressed clusters (decompressed on worker threads).
    const auto plain = dir / "plain.qcow2";
    const auto compressed = dir / "compressed.qcow2";
    qt::write_file(plain, fixtures().v3);
    qt::write_file(compressed, fixtures().zlib);
    const auto out = dir / "out.raw";
    const std::string out_qcow2 = qt::shell_quote((dir / "out.qcow2").string());
    int limits_tried = 0;
    std::vector<std::string> crashed; // report each command once
    for (unsigned kib = 65536; kib >= 8192; kib -= 4096) {
        const std::string limit = fmt::format("ulimit -v {}; ", kib);
        // Where the tool cannot even start (the loader needs memory too), there is nothing to test.
        if (qt::run(limit + qt::qcowmap_bin() + " info " + qt::shell_quote(plain.string()))
                .exit_code != 0)
            continue;
        ++limits_tried;
        for (const auto& path : {plain, compressed}) {
            const std::string image = qt::shell_quote(path.string());
            for (const std::string& command :
                 {"cat " + image, "map --output=json " + image,
                  "convert --force " + image + " " + qt::shell_quote(out.string()),
                  // The writer's copy and compression threads.
                  "convert --force -O qcow2 " + image + " " + out_qcow2,
                  "convert --force -O qcow2 -c " + image + " " + out_qcow2,
                  // The stream decoder (issue 29): its buffers and decompressing threads.
                  "convert --force - " + qt::shell_quote(out.string()) + " < " + image,
                  "hash - < " + image}) {
                if (std::find(crashed.begin(), crashed.end(), command) != crashed.end())
                    continue;
                qt::CommandResult r =
                    qt::run(limit + qt::qcowmap_bin() + " " + command + " >/dev/null");
                // 0 success, 1 image error, 3 output error: anything else is a crash.
                const bool clean = r.exit_code == 0 || r.exit_code == 1 || r.exit_code == 3;
                EXPECT_TRUE(clean) << "`" << command << "` under a " << kib
                                   << " KiB limit exited with " << r.exit_code << ": " << r.err;
                if (!clean)
                    crashed.push_back(command);
            }
        }
    }
    EXPECT_GT(limits_tried, 0);
}

// ---------------------------------------------------------------------------------------------
// Backing chains in memory (OpenOptions::backing_resolver): the same loop, depth and missing-file
// rules as chains of files, without touching the file system.

struct MemoryChain {
    std::map<std::string, Buffer> files;
    OpenOptions options() const {
        OpenOptions o;
        o.backing_resolver =
            [this](const std::string& name) -> std::optional<std::span<const std::byte>> {
            auto it = files.find(name);
            if (it == files.end())
                return std::nullopt;
            return std::span<const std::byte>(it->second);
        };
        return o;
    }
};

/// A 256 KiB qcow2 image named `name` whose backing file is `backing` (unchecked: -u).
Buffer overlay(const qt::TempDir& dir, const std::string& name, const std::string& backing,
               const std::string& format = "qcow2", const std::string& io = "") {
    const auto path = dir / name;
    qt::run_ok("cd " + qt::shell_quote(dir.path().string()) +
               " && qemu-img create -q -f qcow2 -u -b " + qt::shell_quote(backing) + " -F " +
               format + " " + qt::shell_quote(name) + " 256k");
    if (!io.empty()) {
        qt::run_ok("qemu-io -f qcow2 -c " + qt::shell_quote(io) + " " +
                   qt::shell_quote(path.string()) + " >/dev/null");
    }
    return qt::read_file(path);
}

TEST(CorruptMemoryChain, ResolvedChainReadsThroughEveryLayer) {
    qt::TempDir dir;
    MemoryChain chain;
    const auto base = dir / "base.qcow2";
    qt::make_image(base, "", "256k", {"write -P 0x5a 0 64k"});
    chain.files["base.qcow2"] = qt::read_file(base);
    chain.files["raw.img"] = Buffer(256 * 1024, std::byte{0x77});
    chain.files["top.qcow2"] =
        overlay(dir, "top.qcow2", "base.qcow2", "qcow2", "write -P 0x11 64k 64k");
    auto image = Image::open_bytes(chain.files["top.qcow2"], chain.options());
    ASSERT_TRUE(image) << image.error().message;
    EXPECT_EQ(image->layers().size(), 2u);
    Buffer out(3 * 65536);
    ASSERT_TRUE(image->read(out, 0));
    EXPECT_EQ(out[0], std::byte{0x5a});
    EXPECT_EQ(out[65536], std::byte{0x11});
    EXPECT_EQ(out[2 * 65536], std::byte{0});

    Buffer on_raw = overlay(dir, "on-raw.qcow2", "raw.img", "raw");
    auto raw = Image::open_bytes(on_raw, chain.options());
    ASSERT_TRUE(raw) << raw.error().message;
    ASSERT_EQ(raw->layers().size(), 2u);
    EXPECT_EQ(raw->layers()[1].format, "raw");
    ASSERT_TRUE(raw->read(out, 0));
    EXPECT_EQ(out[100], std::byte{0x77});
}

TEST(CorruptMemoryChain, LoopOfTwo) {
    qt::TempDir dir;
    MemoryChain chain;
    chain.files["a.qcow2"] = overlay(dir, "a.qcow2", "b.qcow2");
    chain.files["b.qcow2"] = overlay(dir, "b.qcow2", "a.qcow2");
    auto image = Image::open_bytes(chain.files["a.qcow2"], chain.options());
    EXPECT_TRUE(fails_with(image, ErrorCode::invalid_table, {"backing chain loops"}));
}

TEST(CorruptMemoryChain, LoopOntoItself) {
    qt::TempDir dir;
    MemoryChain chain;
    // qemu-img refuses to name an image as its own backing file: write it under another name.
    chain.files["a.qcow2"] = overlay(dir, "self.qcow2", "a.qcow2");
    auto image = Image::open_bytes(chain.files["a.qcow2"], chain.options());
    EXPECT_TRUE(fails_with(image, ErrorCode::invalid_table, {"backing chain loops"}));
}

TEST(CorruptMemoryChain, DeeperThanTheLimit) {
    qt::TempDir dir;
    MemoryChain chain;
    const auto base = dir / "l64.qcow2";
    qt::make_image(base, "", "256k");
    chain.files["l64.qcow2"] = qt::read_file(base);
    for (int i = 63; i >= 0; --i) {
        const std::string name = fmt::format("l{}.qcow2", i);
        chain.files[name] = overlay(dir, name, fmt::format("l{}.qcow2", i + 1));
    }
    // l1 .. l64: exactly 64 layers open; l0 on top makes 65.
    auto ok = Image::open_bytes(chain.files["l1.qcow2"], chain.options());
    ASSERT_TRUE(ok) << ok.error().message;
    EXPECT_EQ(ok->layers().size(), 64u);
    auto deep = Image::open_bytes(chain.files["l0.qcow2"], chain.options());
    EXPECT_TRUE(fails_with(deep, ErrorCode::invalid_table, {"deeper than 64"}));
}

TEST(CorruptMemoryChain, MissingBackingFile) {
    qt::TempDir dir;
    MemoryChain chain;
    chain.files["a.qcow2"] = overlay(dir, "a.qcow2", "gone.qcow2");
    auto image = Image::open_bytes(chain.files["a.qcow2"], chain.options());
    EXPECT_TRUE(fails_with(image, ErrorCode::io_error, {"backing file gone.qcow2", "not found"}));
    // Without a resolver at all, as before.
    auto plain = Image::open_bytes(chain.files["a.qcow2"]);
    EXPECT_TRUE(
        fails_with(plain, ErrorCode::unsupported_feature, {"gone.qcow2", "backing_resolver"}));
}

TEST(CorruptMemoryChain, CorruptBackingLayerIsReported) {
    qt::TempDir dir;
    MemoryChain chain;
    chain.files["a.qcow2"] = overlay(dir, "a.qcow2", "b.qcow2");
    Buffer b = fixtures().v3;
    put_be32(b, kClusterBitsAt, 30);
    chain.files["b.qcow2"] = b;
    auto image = Image::open_bytes(chain.files["a.qcow2"], chain.options());
    EXPECT_TRUE(fails_with(image, ErrorCode::invalid_header, {"cluster_bits 30"}));
}

} // namespace

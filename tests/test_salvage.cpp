// --salvage: a damaged image (truncated download, partial copy, bad tables or clusters) reads
// what can be read. Ranges that cannot be read read as zeros exactly as qemu-img reads a
// truncated file: where qemu-img convert reads the image, `cat`/`convert`/`hash --salvage` give
// its bytes; where it cannot (garbage compressed data, unaligned entries) every other byte is
// the image's and the damaged clusters are zeros. Every damaged range is reported, exactly;
// the exit status is 4 ("data was lost"); without --salvage nothing changes.
#include "support.hpp"

#include <qcowmap/image.hpp>
#include <qcowmap/salvage.hpp>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>

namespace qcowmap {
namespace {

namespace fs = std::filesystem;
namespace qt = qcowmap::test;
using qt::cli;
using qt::q;

constexpr std::uint64_t kL1 = 0x30000;
constexpr std::uint64_t kL2 = 0x40000;
constexpr std::uint64_t kData = 0x50000;

std::vector<std::byte> as_bytes(const std::string& text) {
    std::vector<std::byte> out(text.size());
    std::memcpy(out.data(), text.data(), text.size());
    return out;
}

/// `qemu-img convert -O raw` of the image (which qemu must be able to read).
std::vector<std::byte> qemu_bytes(const fs::path& image) {
    qt::TempDir dir;
    return qt::qemu_raw(image, dir);
}

/// The salvage report lines `cat --salvage` prints for `image`, and its bytes and status.
struct Salvaged {
    int exit_code;
    std::vector<std::byte> bytes;
    std::string err;
};
Salvaged cat_salvage(const fs::path& image) {
    const qt::CommandResult r = qt::run(cli() + " cat --salvage " + q(image));
    return {r.exit_code, as_bytes(r.out), r.err};
}

std::string line(const fs::path& image, std::uint64_t offset, std::uint64_t length,
                 const std::string& how, const std::string& why) {
    return fmt::format("qcowmap: {}: salvage: {:#x} (+{:#x}) {}: {}\n", image.string(), offset,
                       length, how, why);
}

/// 1 MiB image, 64 KiB clusters: data 0x11.. in clusters 0-3 (host 0x50000-0x8ffff).
fs::path four_clusters(const qt::TempDir& dir, const std::string& name = "t.qcow2") {
    const fs::path img = dir / name;
    qt::make_image(img, "", "1M",
                   {"write -P 0x11 0 64k", "write -P 0x12 64k 64k", "write -P 0x13 128k 64k",
                    "write -P 0x14 192k 64k"});
    return img;
}

TEST(Salvage, TruncatedImageReadsAsQemuReadsIt) {
    qt::TempDir dir;
    const fs::path img = four_clusters(dir);
    // Cut in the middle of the third data cluster (host 0x70000 + 0x1000).
    fs::resize_file(img, kData + 2 * 65536 + 0x1000);
    const std::vector<std::byte> oracle = qemu_bytes(img);
    ASSERT_EQ(oracle.size(), 1u << 20);
    EXPECT_EQ(oracle[2 * 65536 + 0xfff], std::byte{0x13});
    EXPECT_EQ(oracle[2 * 65536 + 0x1000], std::byte{0}) << "qemu reads past the end as zeros";

    // Without --salvage: one line, exit 1.
    const qt::CommandResult plain = qt::run(cli() + " cat " + q(img) + " >/dev/null");
    EXPECT_EQ(plain.exit_code, 1);
    EXPECT_EQ(std::count(plain.err.begin(), plain.err.end(), '\n'), 1);

    const Salvaged s = cat_salvage(img);
    EXPECT_EQ(s.exit_code, 4) << s.err;
    EXPECT_TRUE(s.bytes == oracle);
    // Clusters 2 and 3 follow each other in the file: one range, from the cut on.
    EXPECT_EQ(s.err, line(img, 0x21000, 0x1f000, "read as zeros",
                          "data for virtual offset 0x21000 at host offset 0x71000 (+0x1f000) lies "
                          "beyond end of file (0x71000)"));

    // The library says the same.
    OpenOptions options;
    options.salvage = true;
    auto image = Image::open(img, options);
    ASSERT_TRUE(image) << image.error().message;
    const SalvageReport& report = salvage_report(*image);
    ASSERT_EQ(report.ranges.size(), 1u);
    EXPECT_EQ(report.ranges[0].offset, 0x21000u);
    EXPECT_EQ(report.ranges[0].length, 0x1f000u);
    EXPECT_EQ(report.ranges[0].depth, 0u);
    EXPECT_FALSE(report.ranges[0].unallocated);
    EXPECT_EQ(report.damaged_bytes, 0x1f000u);
    EXPECT_TRUE(report.data_lost());
    std::vector<std::byte> window(0x2000);
    auto n = image->read(window, 0x20000 + 0xf00 * 16);
    ASSERT_TRUE(n) << n.error().message;
    EXPECT_TRUE(std::equal(window.begin(), window.end(), oracle.begin() + 0x20000 + 0xf00 * 16));

    // convert and hash --salvage: the same bytes, the same exit status.
    const fs::path out = dir / "out.raw";
    const qt::CommandResult converted =
        qt::run(cli() + " convert --salvage " + q(img) + " " + q(out));
    EXPECT_EQ(converted.exit_code, 4) << converted.err;
    EXPECT_EQ(converted.err, s.err);
    EXPECT_TRUE(qt::read_file(out) == oracle);
    const fs::path oracle_file = dir / "oracle.raw";
    qt::write_file(oracle_file, oracle);
    const std::string sha = qt::run_ok("sha256sum " + q(oracle_file)).substr(0, 64);
    const qt::CommandResult hashed = qt::run(cli() + " hash --salvage " + q(img));
    EXPECT_EQ(hashed.exit_code, 4) << hashed.err;
    EXPECT_EQ(hashed.out.substr(0, 64), sha);
    const qt::CommandResult json = qt::run(cli() + " hash --salvage --json " + q(img));
    EXPECT_EQ(json.exit_code, 4);
    EXPECT_NE(json.out.find("\"damaged\": [{\"offset\": 135168, \"length\": 126976, \"reason\": "
                            "\"data for virtual offset 0x21000"),
              std::string::npos)
        << json.out;
}

TEST(Salvage, UndamagedImageExitsZeroAndReportsNothing) {
    qt::TempDir dir;
    const fs::path img = four_clusters(dir);
    const Salvaged s = cat_salvage(img);
    EXPECT_EQ(s.exit_code, 0);
    EXPECT_EQ(s.err, "");
    EXPECT_TRUE(s.bytes == qemu_bytes(img));
    const qt::CommandResult json = qt::run(cli() + " hash --salvage --json " + q(img));
    EXPECT_EQ(json.exit_code, 0);
    EXPECT_NE(json.out.find("\"damaged\": []"), std::string::npos) << json.out;
}

TEST(Salvage, L2TablePastTheEndReadsAsUnallocated) {
    // The L1 entry points at an L2 table past the end of the file: qemu reads its entries as
    // zeros (unallocated), so an overlay shows its backing file there, a lone image zeros.
    qt::TempDir dir;
    const fs::path base = dir / "base.qcow2";
    qt::make_image(base, "", "1M", {"write -P 0x77 0 1M"});
    const fs::path top = dir / "top.qcow2";
    qt::run_ok("qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 " + q(top) + " 1M");
    qt::run_ok("qemu-io -f qcow2 -c 'write -P 0x11 0 64k' " + q(top) + " >/dev/null");
    const std::uint64_t size = fs::file_size(top);
    qt::poke_be(top, kL1, 0x8000000000000000ULL | 0x100000, 8); // L2 at 1 MiB, past the end
    const std::vector<std::byte> oracle = qemu_bytes(top);
    EXPECT_EQ(oracle[0], std::byte{0x77}) << "qemu reads through to the backing file";
    const Salvaged s = cat_salvage(top);
    EXPECT_EQ(s.exit_code, 4) << s.err;
    EXPECT_TRUE(s.bytes == oracle);
    EXPECT_EQ(s.err, line(top, 0, 0x100000, "read from the backing file",
                          fmt::format("L2 table at 0x100000 (+0x10000) lies beyond end of file "
                                      "({:#x})",
                                      size)));

    // Without a backing file: zeros.
    const fs::path alone = four_clusters(dir, "alone.qcow2");
    qt::poke_be(alone, kL1, 0x8000000000000000ULL | 0x200000, 8);
    const Salvaged z = cat_salvage(alone);
    EXPECT_EQ(z.exit_code, 4);
    EXPECT_TRUE(z.bytes == qemu_bytes(alone));
    EXPECT_EQ(std::count(z.bytes.begin(), z.bytes.end(), std::byte{0}), 1 << 20);
    EXPECT_NE(z.err.find("salvage: 0x0 (+0x100000) read as zeros: L2 table at 0x200000"),
              std::string::npos)
        << z.err;
}

TEST(Salvage, L1TableCutOffByTheEndOfTheFile) {
    // 4 MiB disk, 512-byte clusters: each L1 entry covers 32 KiB, 128 entries (1 KiB). Move
    // the L1 table to the last bytes of the file so that only its first 16 entries are inside.
    qt::TempDir dir;
    const fs::path img = dir / "t.qcow2";
    qt::make_image(img, "cluster_size=512", "4M", {"write -P 0x21 0 4k", "write -P 0x22 160k 4k"});
    const std::uint64_t l1 = qt::peek_be(img, 40, 8);
    std::vector<std::byte> file = qt::read_file(img);
    const std::uint64_t new_l1 = (file.size() + 511) & ~std::uint64_t{511};
    file.resize(new_l1 + 16 * 8);
    std::copy_n(file.begin() + static_cast<std::ptrdiff_t>(l1), 16 * 8,
                file.begin() + static_cast<std::ptrdiff_t>(new_l1));
    qt::write_file(img, file);
    qt::poke_be(img, 40, new_l1, 8);
    const std::vector<std::byte> oracle = qemu_bytes(img);
    const Salvaged s = cat_salvage(img);
    EXPECT_EQ(s.exit_code, 4) << s.err;
    ASSERT_EQ(s.bytes.size(), oracle.size());
    EXPECT_TRUE(s.bytes == oracle);
    EXPECT_EQ(s.bytes[0], std::byte{0x21});
    EXPECT_EQ(s.bytes[160 * 1024], std::byte{0x22});
    // Entries 16..127 are cut off: one range, to the end of the disk.
    EXPECT_EQ(s.err, line(img, 0x80000, 0x380000, "read as zeros",
                          fmt::format("L1 table entries 16 and on (from {:#x}) lie beyond end of "
                                      "file ({:#x})",
                                      new_l1 + 128, new_l1 + 128)));
}

TEST(Salvage, GarbageCompressedClusterReadsAsZeros) {
    // qemu-img convert cannot read this image (the cluster does not inflate: EIO); salvage
    // gives every other byte of the image and zeros for that cluster.
    qt::TempDir dir;
    const fs::path img = dir / "t.qcow2";
    qt::make_image(
        img, "", "1M",
        {"write -c -P 0x31 0 64k", "write -c -P 0x32 64k 64k", "write -P 0x33 128k 64k"});
    const std::vector<std::byte> healthy = qemu_bytes(img);
    // Cluster 1's stream: overwrite it with 0xff.
    const std::uint64_t entry = qt::peek_be(img, kL2 + 8, 8);
    ASSERT_NE(entry & (1ULL << 62), 0u);
    const std::uint64_t offset = entry & ((1ULL << 54) - 1); // 62 - (16 - 8) bits of offset
    qt::poke(img, offset, std::string(64, '\xff'));
    EXPECT_NE(qt::run("qemu-img convert -O raw " + q(img) + " " + q(dir / "x.raw")).exit_code, 0);
    const Salvaged s = cat_salvage(img);
    EXPECT_EQ(s.exit_code, 4) << s.err;
    std::vector<std::byte> expected = healthy;
    std::fill_n(expected.begin() + 65536, 65536, std::byte{0});
    EXPECT_TRUE(s.bytes == expected);
    EXPECT_EQ(std::count(s.err.begin(), s.err.end(), '\n'), 1) << s.err;
    EXPECT_TRUE(s.err.starts_with(fmt::format(
        "qcowmap: {}: salvage: 0x10000 (+0x10000) read as zeros: compressed cluster for virtual "
        "offset 0x10000 at host offset {:#x}",
        img.string(), offset)))
        << s.err;
    // Decompressed on several threads (cat) or one (hash): the same digest.
    const fs::path expected_file = dir / "expected.raw";
    qt::write_file(expected_file, expected);
    const qt::CommandResult hashed = qt::run(cli() + " hash --salvage --threads=1 " + q(img));
    EXPECT_EQ(hashed.exit_code, 4);
    EXPECT_EQ(hashed.out.substr(0, 64), qt::run_ok("sha256sum " + q(expected_file)).substr(0, 64));
}

TEST(Salvage, ReservedBitsAndUnalignedEntriesReadAsZeros) {
    qt::TempDir dir;
    const fs::path img = four_clusters(dir);
    const std::vector<std::byte> healthy = qemu_bytes(img);
    qt::poke_be(img, kL2 + 8, qt::peek_be(img, kL2 + 8, 8) | 2, 8);       // reserved bit 1
    qt::poke_be(img, kL2 + 16, qt::peek_be(img, kL2 + 16, 8) + 0x200, 8); // unaligned
    const Salvaged s = cat_salvage(img);
    EXPECT_EQ(s.exit_code, 4) << s.err;
    std::vector<std::byte> expected = healthy;
    std::fill_n(expected.begin() + 65536, 2 * 65536, std::byte{0});
    EXPECT_TRUE(s.bytes == expected);
    EXPECT_EQ(s.err,
              line(img, 0x10000, 0x10000, "read as zeros",
                   "L2 entry for virtual offset 0x10000 (0x8000000000060002) has reserved bits "
                   "set") +
                  line(img, 0x20000, 0x10000, "read as zeros",
                       "L2 entry for virtual offset 0x20000 has host offset 0x70200 not aligned "
                       "to the cluster size 0x10000"));
}

TEST(Salvage, TruncatedBackingFileAndDataFile) {
    qt::TempDir dir;
    // A raw-format chain: the qcow2 base is cut, the overlay is whole.
    const fs::path base = four_clusters(dir, "base.qcow2");
    const fs::path top = dir / "top.qcow2";
    qt::run_ok("qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 " + q(top) + " 1M");
    qt::run_ok("qemu-io -f qcow2 -c 'write -P 0x41 0 64k' " + q(top) + " >/dev/null");
    fs::resize_file(base, kData + 2 * 65536);
    const Salvaged s = cat_salvage(top);
    EXPECT_EQ(s.exit_code, 4) << s.err;
    EXPECT_TRUE(s.bytes == qemu_bytes(top));
    // The overlay hands the base one cluster at a time: one range per cluster.
    EXPECT_EQ(s.err, line(top, 0x20000, 0x10000, "read as zeros",
                          "data for virtual offset 0x20000 at host offset 0x70000 (+0x10000) lies "
                          "beyond end of file (0x70000)") +
                         line(top, 0x30000, 0x10000, "read as zeros",
                              "data for virtual offset 0x30000 at host offset 0x80000 (+0x10000) "
                              "lies beyond end of file (0x70000)"));
    OpenOptions options;
    options.salvage = true;
    auto image = Image::open(top, options);
    ASSERT_TRUE(image);
    ASSERT_EQ(salvage_report(*image).ranges.size(), 2u);
    EXPECT_EQ(salvage_report(*image).ranges[0].depth, 1u) << "the damage is in the base";

    // An external data file cut short.
    const fs::path data_image = dir / "d.qcow2";
    const fs::path data = dir / "d.data";
    qt::make_image(data_image, "data_file=" + data.string(), "1M", {"write -P 0x51 0 256k"});
    fs::resize_file(data, 128 * 1024);
    const Salvaged d = cat_salvage(data_image);
    EXPECT_EQ(d.exit_code, 4) << d.err;
    EXPECT_TRUE(d.bytes == qemu_bytes(data_image));
    EXPECT_EQ(d.err, line(data_image, 0x20000, 0x20000, "read as zeros",
                          "data for virtual offset 0x20000 at host offset 0x20000 (+0x20000) lies "
                          "beyond end of the data file (0x20000)"));
}

TEST(Salvage, SnapshotTablePastTheEndOfTheFile) {
    // The header parses, the snapshot table is gone: the active disk reads as it is.
    qt::TempDir dir;
    const fs::path img = four_clusters(dir);
    qt::run_ok("qemu-img snapshot -c s1 " + q(img));
    fs::resize_file(img, qt::peek_be(img, 64, 8) + 8);
    const qt::CommandResult plain = qt::run(cli() + " cat " + q(img) + " >/dev/null");
    EXPECT_EQ(plain.exit_code, 1);
    const Salvaged s = cat_salvage(img);
    EXPECT_EQ(s.exit_code, 0) << "the disk itself lost nothing: " << s.err;
    EXPECT_TRUE(s.bytes == qemu_bytes(img));
}

TEST(Salvage, TheHeaderMustStillParse) {
    qt::TempDir dir;
    const fs::path img = four_clusters(dir);
    fs::resize_file(img, 50);
    const qt::CommandResult r = qt::run(cli() + " cat --salvage " + q(img));
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_EQ(r.err, "qcowmap: " + img.string() +
                         ": file is truncated: 50 bytes, shorter than the 104-byte version 3 "
                         "header\n");
    EXPECT_EQ(r.out, "");
}

TEST(Salvage, QcowVersion1TruncatedImage) {
    qt::TempDir dir;
    const fs::path img = dir / "t.qcow";
    qt::run_ok("qemu-img create -q -f qcow " + q(img) + " 1M");
    qt::run_ok("qemu-io -f qcow -c 'write -P 0x61 0 64k' -c 'write -P 0x62 512k 64k' " + q(img) +
               " >/dev/null");
    fs::resize_file(img, fs::file_size(img) - 0x8000);
    const std::vector<std::byte> oracle = [&] {
        qt::TempDir scratch;
        const fs::path raw = scratch / "q.raw";
        qt::run_ok("qemu-img convert -f qcow -O raw " + q(img) + " " + q(raw));
        return qt::read_file(raw);
    }();
    const Salvaged s = cat_salvage(img);
    EXPECT_EQ(s.exit_code, 4) << s.err;
    EXPECT_TRUE(s.bytes == oracle);
    // 4 KiB clusters, each its own run in qcow v1: the 8 clusters cut off, one line each.
    EXPECT_EQ(std::count(s.err.begin(), s.err.end(), '\n'), 8) << s.err;
}

} // namespace
} // namespace qcowmap

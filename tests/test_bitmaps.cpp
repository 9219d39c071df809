// Persistent dirty bitmaps: images made by qemu-img bitmap and qemu-io at test time, their dirty
// ranges compared with what qemu-nbd serves as qemu:dirty-bitmap:NAME (read with nbdinfo),
// incremental syncs compared byte for byte with qemu-img convert, and hand-patched bitmap
// directories and tables that must be refused with the documented error.
#include "support.hpp"

#include <qcowmap/bitmap.hpp>
#include <qcowmap/format.hpp>
#include <qcowmap/image.hpp>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <regex>
#include <string>
#include <tuple>
#include <vector>

namespace {

using namespace qcowmap;
namespace qt = qcowmap::test;
using qt::Buffer;
using qt::get_be;
using qt::put_be;
using qt::q;

/// A range as compared with the oracle: start, length, dirty.
using Span = std::tuple<std::uint64_t, std::uint64_t, bool>;

std::string cli(const std::string& args) {
    return qt::shell_quote(qt::qcowmap_bin()) + " " + args;
}

/// `qemu-img bitmap OPERATIONS IMAGE NAME`, e.g. bitmap_cmd(img, "--add -g 4k", "b0").
void bitmap_cmd(const std::filesystem::path& image, const std::string& operations,
                const std::string& name) {
    qt::run_ok("qemu-img bitmap " + operations + " " + q(image) + " " + qt::shell_quote(name));
}

void qemu_io(const std::filesystem::path& image, const std::vector<std::string>& commands) {
    std::string io = "qemu-io -f qcow2";
    for (const std::string& c : commands)
        io += " -c " + qt::shell_quote(c);
    qt::CommandResult r = qt::run(io + " " + q(image));
    ASSERT_TRUE(r.exit_code == 0 && r.out.find("failed") == std::string::npos &&
                r.err.find("failed") == std::string::npos)
        << "qemu-io failed on " << image << ": " << r.out << r.err;
}

/// Merges adjacent runs of the same state (the oracle may split at request boundaries).
std::vector<Span> merged(const std::vector<Span>& runs) {
    std::vector<Span> out;
    for (const Span& r : runs) {
        if (!out.empty() && std::get<2>(out.back()) == std::get<2>(r) &&
            std::get<0>(out.back()) + std::get<1>(out.back()) == std::get<0>(r)) {
            std::get<1>(out.back()) += std::get<1>(r);
        } else {
            out.push_back(r);
        }
    }
    return out;
}

/// What qemu-nbd serves as qemu:dirty-bitmap:NAME, read with nbdinfo (type 1 = dirty).
std::vector<Span> nbd_runs(const std::filesystem::path& image, const std::string& name) {
    std::string out =
        qt::run_ok("nbdinfo --json --map=qemu:dirty-bitmap:" + name + " -- '[' " +
                   "qemu-nbd -r -f qcow2 -B " + qt::shell_quote(name) + " " + q(image) + " ']'");
    static const std::regex entry(
        R"re("offset":\s*(\d+),\s*"length":\s*(\d+),\s*"type":\s*(\d+))re");
    std::vector<Span> runs;
    for (auto it = std::sregex_iterator(out.begin(), out.end(), entry);
         it != std::sregex_iterator(); ++it) {
        runs.emplace_back(std::stoull((*it)[1]), std::stoull((*it)[2]), (*it)[3] == "1");
    }
    EXPECT_FALSE(runs.empty()) << out;
    return merged(runs);
}

std::vector<Span> library_runs(const DirtyBitmap& bitmap, std::uint64_t start = 0,
                               std::uint64_t end = UINT64_MAX) {
    std::vector<Span> runs;
    BitmapRanges it = bitmap.ranges(start, end);
    for (const BitmapRange& r : it)
        runs.emplace_back(r.offset, r.length, r.dirty);
    return runs;
}

/// `qcowmap map --bitmap=NAME --bitmap-only --output=json` parsed back.
std::vector<Span> cli_runs(const std::filesystem::path& image, const std::string& name) {
    std::string out = qt::run_ok(
        cli("map --bitmap=" + qt::shell_quote(name) + " --bitmap-only --output=json " + q(image)));
    static const std::regex entry(
        R"re(\{"start": (\d+), "length": (\d+), "dirty": (true|false)\})re");
    std::vector<Span> runs;
    for (auto it = std::sregex_iterator(out.begin(), out.end(), entry);
         it != std::sregex_iterator(); ++it) {
        runs.emplace_back(std::stoull((*it)[1]), std::stoull((*it)[2]), (*it)[3] == "true");
    }
    // One object per line inside [ ... ].
    EXPECT_EQ(out.front(), '[');
    EXPECT_EQ(std::count(out.begin(), out.end(), '\n'), static_cast<long>(runs.size()));
    return runs;
}

std::uint64_t dirty_total(const std::vector<Span>& runs) {
    std::uint64_t total = 0;
    for (const Span& r : runs)
        total += std::get<2>(r) ? std::get<1>(r) : 0;
    return total;
}

Image open_ok(const std::filesystem::path& path, const OpenOptions& options = {}) {
    auto image = Image::open(path, options);
    if (!image)
        throw std::runtime_error(image.error().message);
    return std::move(*image);
}

DirtyBitmap bitmap_ok(const Image& image, const std::string& name) {
    auto bitmap = DirtyBitmap::open(image, name);
    if (!bitmap)
        throw std::runtime_error(bitmap.error().message);
    return std::move(*bitmap);
}

/// The library's runs, the CLI's and qemu-nbd's are the same, cover the disk, and the dirty
/// byte count is their sum.
void expect_matches_qemu(const std::filesystem::path& path, const std::string& name) {
    SCOPED_TRACE(path.filename().string() + " bitmap " + name);
    Image image = open_ok(path);
    DirtyBitmap bitmap = bitmap_ok(image, name);
    std::vector<Span> ours = library_runs(bitmap);
    std::vector<Span> oracle = nbd_runs(path, name);
    EXPECT_EQ(ours, oracle);
    EXPECT_EQ(cli_runs(path, name), oracle);
    EXPECT_EQ(bitmap.dirty_bytes(), dirty_total(oracle));
    std::uint64_t covered = 0;
    for (std::size_t i = 0; i < ours.size(); ++i) {
        EXPECT_EQ(std::get<0>(ours[i]), covered);
        covered += std::get<1>(ours[i]);
        if (i) {
            EXPECT_NE(std::get<2>(ours[i]), std::get<2>(ours[i - 1])) << "not merged";
        }
    }
    EXPECT_EQ(covered, image.size());
}

// ---------------------------------------------------------------------------------------------
// Against qemu-nbd

TEST(Bitmaps, OneBitmapWritesBeforeAndAfterAdd) {
    qt::TempDir dir;
    auto img = dir / "one.qcow2";
    qt::make_image(img, "", "64M", {"write -P 0x11 0 1M", "write -P 0x12 5M 64k"});
    bitmap_cmd(img, "--add", "b0");
    qemu_io(img, {"write -P 0x21 100k 3k", "write -z 2M 192k", "discard 5M 64k",
                  "write -P 0x22 63M 1M", "write -P 0x23 10M 1"});
    expect_matches_qemu(img, "b0");
    Image image = open_ok(img);
    DirtyBitmap b0 = bitmap_ok(image, "b0");
    EXPECT_EQ(b0.granularity(), 65536u);
    EXPECT_TRUE(b0.entry().enabled());
    EXPECT_FALSE(b0.entry().in_use());
    // Writes before --add are not dirty; writes after are, rounded out to granules.
    std::vector<Span> dirty;
    BitmapRanges it = b0.dirty_ranges();
    for (const BitmapRange& r : it)
        dirty.emplace_back(r.offset, r.length, r.dirty);
    const std::vector<Span> expected = {{65536, 65536, true},
                                        {2 << 20, 196608, true},
                                        {5 << 20, 65536, true},
                                        {10 << 20, 65536, true},
                                        {63 << 20, 1 << 20, true}};
    EXPECT_EQ(dirty, expected);
    EXPECT_EQ(b0.dirty_bytes(), 65536u + 196608 + 65536 + 65536 + (1 << 20));
}

TEST(Bitmaps, GranularitiesFrom512BytesTo4MiB) {
    qt::TempDir dir;
    // A size that is not a multiple of any granularity above 512: the last granule is partial.
    const std::uint64_t size = (40ull << 20) + 3 * 512;
    auto img = dir / "granularities.qcow2";
    qt::make_image(img, "", std::to_string(size), {"write -P 1 0 8M"});
    const std::vector<std::pair<std::string, std::string>> bitmaps = {
        {"g512", "512"}, {"g4k", "4k"}, {"g64k", "64k"}, {"g1m", "1M"}, {"g4m", "4M"}};
    for (const auto& [name, g] : bitmaps)
        bitmap_cmd(img, "--add -g " + g, name);
    std::vector<std::string> writes;
    for (int i = 0; i < 40; ++i) {
        // Scattered small writes, some 512-byte ones, one at the very end of the disk.
        writes.push_back(fmt::format("write -P {} {} {}", i + 2, i * 997 * 1024 + (i % 3) * 512,
                                     512 * (1 + i % 5)));
    }
    writes.push_back(fmt::format("write -P 0x77 {} 512", size - 512));
    writes.push_back("write -z 20M 3M");
    qemu_io(img, writes);
    Image image = open_ok(img);
    for (const auto& [name, g] : bitmaps) {
        expect_matches_qemu(img, name);
        DirtyBitmap b = bitmap_ok(image, name);
        // The last range ends at the virtual size, dirty (the last sector was written).
        std::vector<Span> runs = library_runs(b);
        ASSERT_FALSE(runs.empty());
        EXPECT_EQ(std::get<0>(runs.back()) + std::get<1>(runs.back()), size);
        EXPECT_TRUE(std::get<2>(runs.back()));
    }
    EXPECT_EQ(bitmap_ok(image, "g512").granularity(), 512u);
    EXPECT_EQ(bitmap_ok(image, "g4m").granularity(), 4u << 20);
}

TEST(Bitmaps, SmallClustersSpreadTheBitmapOverManyDataClusters) {
    // 512-byte clusters hold 4096 bits each: a 512-byte-granularity bitmap of 16 MiB needs 8
    // bitmap data clusters, some unallocated (all clean) in the table.
    qt::TempDir dir;
    auto img = dir / "small-clusters.qcow2";
    qt::make_image(img, "cluster_size=512", "16M");
    bitmap_cmd(img, "--add -g 512", "fine");
    bitmap_cmd(img, "--add -g 8k", "coarse");
    std::vector<std::string> writes;
    for (int i = 0; i < 64; ++i) {
        if (i % 16 < 5)
            continue; // leave whole bitmap clusters clean
        writes.push_back(
            fmt::format("write -P {} {} {}", i, i * 256 * 1024 + (i % 7) * 512, 512 * (1 + i % 9)));
    }
    writes.push_back("write -P 0x55 2097152 131072"); // straddles a bitmap-cluster edge
    qemu_io(img, writes);
    expect_matches_qemu(img, "fine");
    expect_matches_qemu(img, "coarse");
}

TEST(Bitmaps, SeveralBitmapsEnabledAndDisabled) {
    qt::TempDir dir;
    auto img = dir / "several.qcow2";
    qt::make_image(img, "", "32M", {"write -P 1 0 2M"});
    bitmap_cmd(img, "--add", "early");
    qemu_io(img, {"write -P 2 1M 64k"});
    bitmap_cmd(img, "--add --disable", "frozen");
    bitmap_cmd(img, "--add", "late");
    qemu_io(img, {"write -P 3 8M 128k"});
    bitmap_cmd(img, "--disable", "late");
    qemu_io(img, {"write -P 4 16M 64k"});

    for (const char* name : {"early", "frozen", "late"})
        expect_matches_qemu(img, name);
    Image image = open_ok(img);
    EXPECT_EQ(bitmap_ok(image, "frozen").dirty_bytes(), 0u);
    EXPECT_EQ(bitmap_ok(image, "late").dirty_bytes(), 128u << 10);
    EXPECT_EQ(bitmap_ok(image, "early").dirty_bytes(), (64u + 128 + 64) << 10);
    EXPECT_TRUE(bitmap_ok(image, "early").entry().enabled());
    EXPECT_FALSE(bitmap_ok(image, "frozen").entry().enabled());
    EXPECT_FALSE(bitmap_ok(image, "late").entry().enabled());

    // The listing, in directory order, with flags and dirty bytes.
    std::vector<BitmapSummary> list = list_bitmaps(image);
    ASSERT_EQ(list.size(), 3u);
    EXPECT_EQ(list[0].entry.name, "early");
    EXPECT_EQ(list[1].entry.name, "frozen");
    EXPECT_EQ(list[2].entry.name, "late");
    EXPECT_EQ(list[0].dirty_bytes, std::optional<std::uint64_t>((64u + 128 + 64) << 10));
    EXPECT_EQ(list[1].dirty_bytes, std::optional<std::uint64_t>(0));
    for (const auto& s : list)
        EXPECT_FALSE(s.error) << s.error->message;

    std::string json = qt::run_ok(cli("bitmaps --json " + q(img)));
    EXPECT_NE(json.find(R"({ "name": "early", "granularity": 65536, "flags": ["auto"], )"
                        R"("enabled": true, "in-use": false, "consistent": true, "usable": true, )"
                        R"("error": null, "dirty-bytes": 262144 })"),
              std::string::npos)
        << json;
    EXPECT_NE(json.find(R"("name": "frozen", "granularity": 65536, "flags": [], "enabled": false)"),
              std::string::npos)
        << json;
    std::string human = qt::run_ok(cli("bitmaps " + q(img)));
    EXPECT_NE(human.find("late"), std::string::npos);
    EXPECT_NE(human.find("131072  consistent"), std::string::npos) << human;
}

TEST(Bitmaps, MergedBitmapIsTheUnion) {
    qt::TempDir dir;
    auto img = dir / "merge.qcow2";
    qt::make_image(img, "", "16M");
    bitmap_cmd(img, "--add", "a");
    qemu_io(img, {"write -P 1 0 64k", "write -P 1 4M 64k"});
    bitmap_cmd(img, "--disable", "a");
    bitmap_cmd(img, "--add -g 4k", "b");
    qemu_io(img, {"write -P 2 4M 4k", "write -P 2 9M 8k"});
    bitmap_cmd(img, "--add --disable -g 16k", "sum");
    bitmap_cmd(img, "--merge a", "sum");
    bitmap_cmd(img, "--merge b", "sum");
    expect_matches_qemu(img, "sum");
    expect_matches_qemu(img, "a");
    expect_matches_qemu(img, "b");
    Image image = open_ok(img);
    std::vector<Span> dirty;
    for (const Span& r : library_runs(bitmap_ok(image, "sum")))
        if (std::get<2>(r))
            dirty.push_back(r);
    const std::vector<Span> expected = {
        {0, 65536, true}, {4 << 20, 65536, true}, {9 << 20, 16384, true}};
    EXPECT_EQ(dirty, expected);
}

TEST(Bitmaps, RangesOfASubrange) {
    qt::TempDir dir;
    auto img = dir / "sub.qcow2";
    qt::make_image(img, "", "4M");
    bitmap_cmd(img, "--add", "b");
    qemu_io(img, {"write -P 1 64k 128k", "write -P 1 1M 64k"});
    Image image = open_ok(img);
    DirtyBitmap b = bitmap_ok(image, "b");
    const std::vector<Span> expected = {{100000, 96608, true}, {196608, 803392, false}};
    EXPECT_EQ(library_runs(b, 100000, 1000000), expected);
    // The CLI takes the same range from --start-offset/--max-length.
    EXPECT_EQ(qt::run_ok(cli("map --bitmap=b --bitmap-only --output=json --start-offset=100000 "
                             "--max-length=900000 " +
                             q(img))),
              "[{\"start\": 100000, \"length\": 96608, \"dirty\": true},\n"
              "{\"start\": 196608, \"length\": 803392, \"dirty\": false}]\n");
    // map --bitmap inside the range: only [100000, 196608) is dirty there.
    std::string map = qt::run_ok(cli("map --bitmap=b --output=json --start-offset=100000 "
                                     "--max-length=900000 " +
                                     q(img)));
    EXPECT_EQ(map.rfind("[{ \"start\": 100000, \"length\": 96608, \"depth\": 0, ", 0), 0u) << map;
    EXPECT_EQ(std::count(map.begin(), map.end(), '\n'), 1) << map;
    EXPECT_TRUE(library_runs(b, 5 << 20, 6 << 20).empty());
    EXPECT_TRUE(library_runs(b, 1000, 1000).empty());
}

// ---------------------------------------------------------------------------------------------
// Extents restricted to dirty ranges

TEST(Bitmaps, DirtyExtentsCoverExactlyTheDirtyRangesWithTheRightBytes) {
    qt::TempDir dir;
    auto base = dir / "base.qcow2";
    auto img = dir / "top.qcow2";
    qt::make_image(base, "", "8M", {"write -P 0xb1 0 8M"});
    qt::run_ok("qemu-img create -q -f qcow2 -b " + q(base) + " -F qcow2 " + q(img));
    // Granules of 128 KiB span two clusters: a dirty granule also holds ranges the overlay
    // does not allocate, which come from the base (depth 1).
    bitmap_cmd(img, "--add -g 128k", "b");
    qemu_io(img, {"write -P 0x01 0 4k", "write -c -P 0x02 1M 64k", "write -z 2M 64k",
                  "write -P 0x03 3M 100k", "discard 3M 64k", "write -P 0x04 7M 4k"});
    // An unwritten range of the top image inside a dirty granule reads from the base.
    Image image = open_ok(img);
    DirtyBitmap b = bitmap_ok(image, "b");
    const Buffer raw = qt::qemu_raw(img, dir);
    ASSERT_EQ(raw.size(), image.size());

    std::vector<Span> dirty;
    BitmapRanges ranges = b.dirty_ranges();
    for (const BitmapRange& r : ranges)
        dirty.emplace_back(r.offset, r.length, true);

    DirtyExtentRange it = b.dirty_extents();
    Decompressor decompressor;
    std::vector<Span> covered;
    bool saw_compressed = false, saw_zero = false, saw_depth1 = false;
    for (const Extent& e : it) {
        if (!covered.empty() &&
            std::get<0>(covered.back()) + std::get<1>(covered.back()) == e.offset)
            std::get<1>(covered.back()) += e.length;
        else
            covered.emplace_back(e.offset, e.length, true);
        Buffer bytes(e.length);
        if (e.kind == ExtentKind::data) {
            std::copy(e.bytes.begin(), e.bytes.end(), bytes.begin());
        } else if (e.kind == ExtentKind::compressed) {
            saw_compressed = true;
            auto d = decompressor.decompress(image, e);
            ASSERT_TRUE(d) << d.error().message;
            std::copy(d->begin(), d->end(), bytes.begin());
        } else {
            saw_zero = true;
        }
        saw_depth1 |= e.depth == 1;
        EXPECT_TRUE(
            std::equal(bytes.begin(), bytes.end(), raw.begin() + static_cast<long>(e.offset)))
            << "extent at " << e.offset;
    }
    EXPECT_FALSE(it.error().has_value());
    EXPECT_EQ(covered, dirty);
    EXPECT_TRUE(saw_compressed);
    EXPECT_TRUE(saw_zero);
    EXPECT_TRUE(saw_depth1);

    // The CLI's map --bitmap: qemu-img map's entries for each dirty range, nothing else.
    std::string ours = qt::run_ok(cli("map --bitmap=b --output=json " + q(img)));
    std::string expected;
    for (const Span& d : dirty) {
        std::string part = qt::run_ok(
            fmt::format("qemu-img map --output=json --start-offset={} --max-length={} {}",
                        std::get<0>(d), std::get<1>(d), q(img)));
        part = part.substr(1, part.rfind(']') - 1); // without the brackets
        expected += (expected.empty() ? "" : ",\n") + part;
    }
    expected = "[" + expected + "]\n";
    // qemu-img 7.2 does not print "compressed" (8.2+ does).
    ours = std::regex_replace(ours, std::regex(R"(, "compressed": (true|false))"), "");
    expected = std::regex_replace(expected, std::regex(R"(, "compressed": (true|false))"), "");
    EXPECT_EQ(ours, expected);
}

// ---------------------------------------------------------------------------------------------
// Incremental sync

TEST(Bitmaps, IncrementalSyncIsByteIdenticalToAFreshConvert) {
    qt::TempDir dir;
    auto img = dir / "vm.qcow2";
    auto copy = dir / "backup.raw";
    qt::make_image(img, "", "24M",
                   {"write -P 0x10 0 6M", "write -c -P 0x11 8M 1M", "write -z 12M 1M"});
    // Checkpoint: the bitmap starts when the full copy is taken.
    bitmap_cmd(img, "--add", "inc");
    qt::run_ok(cli("convert " + q(img) + " " + q(copy)));
    qemu_io(img, {"write -P 0x20 100k 3k", "write -z 1M 64k", "discard 2M 128k",
                  "write -P 0x21 23M 100k", "write -c -P 0x22 16M 64k", "write -P 0x23 12M 4k",
                  "write -P 0 5M 8k"});
    qt::run_ok(cli("convert --bitmap=inc " + q(img) + " " + q(copy)));
    EXPECT_EQ(qt::read_file(copy), qt::qemu_raw(img, dir));

    // Rotate: a new bitmap for the next period, the old one removed; sync again.
    bitmap_cmd(img, "--add", "inc2");
    bitmap_cmd(img, "--remove", "inc");
    qemu_io(img, {"write -P 0x30 7M 1M", "write -z 0 64k", "discard 23M 1M"});
    qt::run_ok(cli("convert --bitmap=inc2 " + q(img) + " " + q(copy)));
    EXPECT_EQ(qt::read_file(copy), qt::qemu_raw(img, dir));

    // The sync touched only dirty ranges: garbage elsewhere in the copy survives it.
    {
        Buffer b = qt::read_file(copy);
        b[20 << 20] = std::byte{0x5a};
        qt::write_file(copy, b);
    }
    qt::run_ok(cli("convert --bitmap=inc2 " + q(img) + " " + q(copy)));
    EXPECT_EQ(qt::read_file(copy)[20 << 20], std::byte{0x5a});
}

TEST(Bitmaps, IncrementalSyncRefusals) {
    qt::TempDir dir;
    auto img = dir / "vm.qcow2";
    qt::make_image(img, "", "4M");
    bitmap_cmd(img, "--add", "inc");
    qemu_io(img, {"write -P 1 0 64k"});
    auto small = dir / "small.raw";
    qt::run_ok("truncate -s 1M " + q(small));
    qt::CommandResult r = qt::run(cli("convert --bitmap=inc " + q(img) + " " + q(small)));
    EXPECT_EQ(r.exit_code, 3);
    EXPECT_EQ(r.err, "qcowmap: " + small.string() +
                         ": is 1048576 bytes but the disk is 4194304 bytes: an incremental update "
                         "needs a copy of the same size\n");
    r = qt::run(cli("convert --bitmap=inc " + q(img) + " " + q(dir / "missing.raw")));
    EXPECT_EQ(r.exit_code, 3);
    EXPECT_NE(r.err.find("missing.raw: does not exist"), std::string::npos) << r.err;
    EXPECT_FALSE(std::filesystem::exists(dir / "missing.raw"));
    auto same = dir / "same.raw";
    qt::run_ok("truncate -s 4M " + q(same));
    r = qt::run(cli("convert --bitmap=nope " + q(img) + " " + q(same)));
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_EQ(r.err, "qcowmap: " + img.string() + ": no bitmap named 'nope' (1 bitmaps)\n");
    r = qt::run(cli("convert --bitmap=inc " + q(img) + " " + q(img)));
    EXPECT_EQ(r.exit_code, 3);
    EXPECT_NE(r.err.find("refusing to overwrite it"), std::string::npos) << r.err;
}

TEST(Bitmaps, ReadmeIncrementalBackupExample) {
    // The README's workflow, extracted and run as written (with the built qcowmap on PATH).
    const std::string script = qt::readme_script("incremental-backup-example");
    ASSERT_FALSE(script.empty()) << "README's incremental-backup-example markers";
    qt::TempDir dir;
    qt::CommandResult r = qt::run_script_in(dir.path(), script);
    EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
    EXPECT_NE(r.out.find("since-full"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find(R"({"start": 1048576, "length": 65536, "dirty": true})"),
              std::string::npos)
        << r.out;
    EXPECT_NE(r.out.find("backup.raw is up to date"), std::string::npos) << r.out << r.err;
}

// ---------------------------------------------------------------------------------------------
// CLI: info, snapshot, usage

TEST(Bitmaps, InfoListsBitmaps) {
    qt::TempDir dir;
    auto img = dir / "info.qcow2";
    qt::make_image(img, "", "4M");
    bitmap_cmd(img, "--add -g 1M", "one");
    bitmap_cmd(img, "--add --disable", "two");
    std::string human = qt::run_ok(cli("info " + q(img)));
    EXPECT_NE(human.find("bitmaps:\n    one (granularity 1048576, flags auto, consistent)\n"
                         "    two (granularity 65536, flags none, consistent)\n"),
              std::string::npos)
        << human;
    std::string json = qt::run_ok(cli("info --json " + q(img)));
    EXPECT_NE(json.find(R"({ "name": "one", "granularity": 1048576, "flags": ["auto"], )"
                        R"("consistent": true, "inconsistent-reason": null })"),
              std::string::npos)
        << json;
    qt::make_image(dir / "plain.qcow2", "", "1M");
    EXPECT_NE(qt::run_ok(cli("info " + q(dir / "plain.qcow2"))).find("bitmaps: none\n"),
              std::string::npos);
    EXPECT_NE(qt::run_ok(cli("info --json " + q(dir / "plain.qcow2"))).find("\"bitmaps\": []"),
              std::string::npos);
    EXPECT_EQ(qt::run_ok(cli("bitmaps --json " + q(dir / "plain.qcow2"))), "[]\n");
}

TEST(Bitmaps, SnapshotsAreRefused) {
    qt::TempDir dir;
    auto img = dir / "snap.qcow2";
    qt::make_image(img, "", "4M", {"write -P 1 0 64k"});
    bitmap_cmd(img, "--add", "b");
    qt::run_ok("qemu-img snapshot -c s1 " + q(img));
    OpenOptions at_snapshot;
    at_snapshot.snapshot = "s1";
    Image image = open_ok(img, at_snapshot);
    auto b = DirtyBitmap::open(image, "b");
    ASSERT_FALSE(b);
    EXPECT_EQ(b.error().code, ErrorCode::invalid_argument);
    EXPECT_EQ(b.error().message, "bitmap 'b' describes the active disk, not snapshot 's1'");
    qt::CommandResult r = qt::run(cli("map --snapshot=s1 --bitmap=b " + q(img)));
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_EQ(r.err, "qcowmap: " + img.string() +
                         ": bitmap 'b' describes the active disk, not snapshot 's1'\n");
    r = qt::run(cli("map --bitmap-only --output=json " + q(img)));
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_NE(r.err.find("--bitmap-only needs --bitmap=NAME"), std::string::npos) << r.err;
}

// ---------------------------------------------------------------------------------------------
// Hand-built bad bitmap directories and tables

constexpr std::size_t kAutoclearAt = 88;
constexpr std::size_t kHeaderLengthAt = 100;

/// A v3 image with bitmaps "b0" (dirty at 0..64k, so its table has one allocated entry) and
/// "b1" (clean), patched in memory.
struct Patched {
    Buffer b;
    std::size_t ext = 0;       ///< start of the bitmaps extension's 24 data bytes
    std::size_t directory = 0; ///< bitmap directory offset
    std::size_t entry1 = 0;    ///< second directory entry

    static const Buffer& pristine() {
        static const Buffer bytes = [] {
            qt::TempDir dir;
            auto img = dir / "good.qcow2";
            qt::make_image(img, "", "4M");
            bitmap_cmd(img, "--add", "b0");
            bitmap_cmd(img, "--add --disable", "b1");
            qemu_io(img, {"write -P 1 0 64k"});
            return qt::read_file(img);
        }();
        return bytes;
    }

    Patched() : b(pristine()) {
        std::size_t at = get_be(b, kHeaderLengthAt, 4);
        while (std::uint32_t type = static_cast<std::uint32_t>(get_be(b, at, 4))) {
            if (type == qcowmap::kExtensionBitmaps)
                ext = at + 8;
            at += 8 + ((get_be(b, at + 4, 4) + 7) & ~7ull);
        }
        directory = get_be(b, ext + 16, 8);
        entry1 = directory + ((24 + 2 + 7) & ~7ull); // "b0" and its padding
    }
    std::size_t table(std::size_t entry) const { return get_be(b, entry, 8); }

    Result<Image> open() const { return Image::open_bytes(b); }
    Result<DirtyBitmap> bitmap(const std::string& name) const {
        auto image = open();
        if (!image)
            return image.error();
        return DirtyBitmap::open(*image, name);
    }
};

std::string opened_error(const Patched& p) {
    auto image = p.open();
    if (image)
        return "(opened)";
    EXPECT_EQ(image.error().code, ErrorCode::invalid_table) << image.error().message;
    return image.error().message;
}

TEST(BitmapsCorrupt, PristineFixture) {
    Patched p;
    auto image = p.open();
    ASSERT_TRUE(image) << image.error().message;
    ASSERT_EQ(image->info().bitmaps->entries.size(), 2u);
    EXPECT_EQ(image->info().bitmaps->entries[1].name, "b1");
    EXPECT_TRUE(p.bitmap("b0"));
    EXPECT_EQ(p.bitmap("b0")->dirty_bytes(), 65536u);
}

TEST(BitmapsCorrupt, InUseIsInconsistent) {
    Patched p;
    put_be(p.b, p.directory + 12, get_be(p.b, p.directory + 12, 4) | kBitmapInUse, 4);
    auto image = p.open();
    ASSERT_TRUE(image) << image.error().message; // listed, not fatal
    const BitmapEntry& e = image->info().bitmaps->entries[0];
    EXPECT_TRUE(e.in_use());
    EXPECT_FALSE(e.consistent());
    auto b = DirtyBitmap::open(*image, "b0");
    ASSERT_FALSE(b);
    EXPECT_EQ(b.error().code, ErrorCode::invalid_table);
    EXPECT_EQ(b.error().message,
              "bitmap 'b0' is inconsistent and cannot be used: flag in_use is set: it was not "
              "saved cleanly (qemu still has it open, or crashed) and may be out of date");
    EXPECT_TRUE(p.bitmap("b1")) << "the other bitmap stays usable";

    // The CLI: listed as unusable with the reason; map/convert --bitmap refuse it.
    qt::TempDir dir;
    auto img = dir / "in-use.qcow2";
    qt::write_file(img, p.b);
    std::string json = qt::run_ok(cli("bitmaps --json " + q(img)));
    EXPECT_NE(json.find(R"("flags": ["in-use", "auto"], "enabled": true, "in-use": true, )"
                        R"("consistent": false, "usable": false, "error": "bitmap 'b0' is )"
                        R"(inconsistent and cannot be used: flag in_use is set)"),
              std::string::npos)
        << json;
    EXPECT_NE(json.find(R"("dirty-bytes": null)"), std::string::npos);
    qt::CommandResult r = qt::run(cli("map --bitmap=b0 " + q(img)));
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_EQ(r.err, "qcowmap: " + img.string() + ": " + b.error().message + "\n");
    // qemu-nbd refuses it too (the timeout only guards against it serving after all).
    r = qt::run("timeout 10 qemu-nbd -r -f qcow2 -B b0 -k " + q(dir / "sock") + " " + q(img));
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_NE(r.err.find("Bitmap 'b0' is inconsistent and cannot be used"), std::string::npos)
        << r.err;
}

TEST(BitmapsCorrupt, AutoclearClearMakesEveryBitmapInconsistent) {
    Patched p;
    put_be(p.b, kAutoclearAt, 0, 8);
    auto image = p.open();
    ASSERT_TRUE(image) << image.error().message;
    ASSERT_EQ(image->info().bitmaps->entries.size(), 2u);
    EXPECT_FALSE(image->info().bitmaps->consistent);
    for (const char* name : {"b0", "b1"}) {
        auto b = DirtyBitmap::open(*image, name);
        ASSERT_FALSE(b);
        EXPECT_EQ(b.error().code, ErrorCode::invalid_table);
        EXPECT_EQ(b.error().message,
                  fmt::format("bitmap '{}' is inconsistent and cannot be used: autoclear bit 0 "
                              "(bitmaps) is clear: a program that does not know bitmaps may have "
                              "written to the image since they were saved",
                              name));
    }
    // A stale directory that no longer parses is not fatal either: it is only reported.
    put_be(p.b, p.directory + 18, 0xffff, 2); // name length
    image = p.open();
    ASSERT_TRUE(image) << image.error().message;
    EXPECT_TRUE(image->info().bitmaps->entries.empty());
    EXPECT_NE(image->info().bitmaps->directory_error.find("name of 65535 bytes"), std::string::npos)
        << image->info().bitmaps->directory_error;
    auto b = DirtyBitmap::open(*image, "b0");
    ASSERT_FALSE(b);
    EXPECT_EQ(b.error().code, ErrorCode::invalid_argument);
    EXPECT_NE(b.error().message.find("no bitmap named 'b0': the image has no bitmaps (its stale "
                                     "bitmap directory does not parse"),
              std::string::npos)
        << b.error().message;
    qt::TempDir dir;
    auto img = dir / "stale.qcow2";
    qt::write_file(img, p.b);
    qt::CommandResult r = qt::run(cli("bitmaps --json " + q(img)));
    EXPECT_EQ(r.exit_code, 0);
    EXPECT_EQ(r.out, "[]\n");
    EXPECT_NE(r.err.find("warning: stale bitmaps extension"), std::string::npos) << r.err;
}

TEST(BitmapsCorrupt, BadGranularity) {
    for (unsigned bits : {0u, 8u, 32u, 63u}) {
        Patched p;
        p.b.at(p.directory + 17) = static_cast<std::byte>(bits);
        EXPECT_EQ(opened_error(p), fmt::format("bitmap 'b0' has granularity_bits {} (qemu "
                                               "supports 9..31)",
                                               bits));
    }
    // A table whose size does not match the disk and granularity.
    Patched p;
    put_be(p.b, p.directory + 8, 2, 4);
    EXPECT_EQ(opened_error(p), "bitmap 'b0' table has 2 entries, but a virtual size of 4194304 "
                               "at granularity 65536 needs 1");
}

TEST(BitmapsCorrupt, TablePastTheEndOfTheFile) {
    Patched p;
    const std::uint64_t far = 0x40000000;
    put_be(p.b, p.directory, far, 8);
    // qemu opens such an image (check_dir_entry tests alignment and size only): so do we, and
    // the bitmap is refused when it is used.
    auto bitmap = p.bitmap("b0");
    ASSERT_FALSE(bitmap);
    EXPECT_EQ(bitmap.error().code, ErrorCode::invalid_table);
    EXPECT_EQ(bitmap.error().message, fmt::format("bitmap 'b0' table at {:#x} (+0x8) lies beyond "
                                                  "end of file ({:#x})",
                                                  far, p.b.size()));
    Patched unaligned;
    put_be(unaligned.b, unaligned.directory, unaligned.table(unaligned.directory) + 8, 8);
    EXPECT_NE(
        opened_error(unaligned).find("is not a non-zero multiple of the cluster size 0x10000"),
        std::string::npos);
    Patched size;
    put_be(size.b, size.directory + 8, 0x8000001, 4);
    EXPECT_NE(
        opened_error(size).find("table of 134217729 entries is empty or exceeds qemu's limits"),
        std::string::npos);
}

TEST(BitmapsCorrupt, NameLengthOverflow) {
    Patched p;
    put_be(p.b, p.directory + 18, 1024, 2);
    EXPECT_EQ(opened_error(p),
              "bitmap directory entry 0: name of 1024 bytes exceeds qemu's limit of 1023 bytes");
    Patched past;
    put_be(past.b, past.entry1 + 18, 1000, 2); // the last entry's name runs off the directory
    EXPECT_EQ(opened_error(past), fmt::format("bitmap directory entry 1: name of 1000 bytes after "
                                              "0 bytes of extra data runs past the directory size "
                                              "{:#x}",
                                              get_be(past.b, past.ext + 8, 8)));
    Patched empty;
    put_be(empty.b, empty.directory + 18, 0, 2);
    EXPECT_EQ(opened_error(empty), "bitmap directory entry 0 has an empty name");
    Patched extra; // extra data size pushes the name off the directory
    put_be(extra.b, extra.directory + 20, 0xfffffff0, 4);
    EXPECT_NE(opened_error(extra).find("after 4294967280 bytes of extra data runs past"),
              std::string::npos);
}

TEST(BitmapsCorrupt, DuplicateNames) {
    Patched p;
    p.b.at(p.entry1 + 24 + 1) = static_cast<std::byte>('0'); // "b1" -> "b0"
    EXPECT_EQ(opened_error(p),
              "bitmap directory entries 0 and 1 are both named 'b0' (names must be unique)");
}

TEST(BitmapsCorrupt, ReservedBits) {
    Patched flags;
    put_be(flags.b, flags.directory + 12, get_be(flags.b, flags.directory + 12, 4) | 0x80, 4);
    EXPECT_EQ(opened_error(flags), "bitmap 'b0' has reserved flag bits set (0x80; flags 0x82)");
    Patched type;
    type.b.at(type.directory + 16) = std::byte{2};
    EXPECT_EQ(opened_error(type), "bitmap 'b0' has type 2 (only 1, dirty tracking, is defined)");
    Patched padding;
    padding.b.at(padding.directory + 24 + 2) = std::byte{0x41};
    EXPECT_EQ(opened_error(padding),
              "bitmap directory entry 0 ('b0'): padding byte 0x41 is not zero");
    Patched size;                           // one entry's worth of bytes more than the entries fill
    size.b.resize(size.b.size() + 0x10000); // the directory ends the file: give it room
    put_be(size.b, size.ext + 8, get_be(size.b, size.ext + 8, 8) + 8, 8);
    EXPECT_NE(opened_error(size).find("bitmap directory of 2 entries ends at"), std::string::npos);

    // Bitmap table entries: checked when the bitmap is first used.
    auto table_error = [](const Patched& p, const std::string& name) {
        auto b = p.bitmap(name);
        if (b)
            return std::string("(usable)");
        EXPECT_EQ(b.error().code, ErrorCode::invalid_table);
        return b.error().message;
    };
    Patched entry;
    const std::size_t t0 = entry.table(entry.directory);
    const std::uint64_t data = get_be(entry.b, t0, 8);
    ASSERT_NE(data, 0u) << "b0 has a data cluster";
    put_be(entry.b, t0, data | 0x2, 8);
    EXPECT_EQ(table_error(entry, "b0"),
              fmt::format("bitmap 'b0' table entry 0 ({:#018x}) has reserved bits set (0x2)",
                          data | 0x2));
    put_be(entry.b, t0, data | (1ull << 60), 8);
    EXPECT_NE(table_error(entry, "b0").find("has reserved bits set (0x1000000000000000)"),
              std::string::npos);
    put_be(entry.b, t0, data | 1, 8);
    EXPECT_NE(table_error(entry, "b0").find("has both a cluster offset and the all-ones bit"),
              std::string::npos);
    put_be(entry.b, t0, data + 512, 8);
    EXPECT_NE(table_error(entry, "b0").find("is not aligned to the cluster size 0x10000"),
              std::string::npos);
    put_be(entry.b, t0, 0x40000000, 8);
    EXPECT_EQ(table_error(entry, "b0"),
              fmt::format("bitmap 'b0' data cluster 0 at 0x40000000 (+0x10000) lies beyond end of "
                          "file ({:#x})",
                          entry.b.size()));
    EXPECT_EQ(table_error(entry, "b1"), "(usable)");
}

TEST(BitmapsCorrupt, UnallocatedTableEntriesReadAsAllZeroOrAllOne) {
    // qemu never writes the all-ones form, but reads it (spec "Bitmap table", bit 0): patch b1's
    // only table entry to it and compare with qemu-nbd.
    Patched p;
    const std::size_t t1 = p.table(p.entry1);
    EXPECT_EQ(get_be(p.b, t1, 8), 0u) << "b1 is clean: its entry is unallocated";
    put_be(p.b, t1, 1, 8);
    qt::TempDir dir;
    auto img = dir / "ones.qcow2";
    qt::write_file(img, p.b);
    expect_matches_qemu(img, "b1");
    Image image = open_ok(img);
    DirtyBitmap b1 = bitmap_ok(image, "b1");
    EXPECT_EQ(b1.dirty_bytes(), image.size());
    EXPECT_EQ(library_runs(b1), (std::vector<Span>{{0, image.size(), true}}));
    // And b0's allocated entry replaced by the all-zero form: nothing dirty.
    put_be(p.b, p.table(p.directory), 0, 8);
    qt::write_file(img, p.b);
    Image cleared = open_ok(img);
    EXPECT_EQ(bitmap_ok(cleared, "b0").dirty_bytes(), 0u);
    EXPECT_EQ(library_runs(bitmap_ok(cleared, "b0")),
              (std::vector<Span>{{0, image.size(), false}}));
}

TEST(BitmapsCorrupt, ExtraDataWithoutTheCompatibleFlag) {
    // Rebuild entry 0 with 8 bytes of extra data before its name (and grow the directory).
    Patched p;
    p.b.resize(p.b.size() + 0x10000); // the directory ends the file: give it room to grow
    const std::size_t e0 = p.directory;
    Buffer first(p.b.begin() + static_cast<long>(e0), p.b.begin() + static_cast<long>(p.entry1));
    const std::uint64_t size = get_be(p.b, p.ext + 8, 8);
    Buffer rest(p.b.begin() + static_cast<long>(p.entry1),
                p.b.begin() + static_cast<long>(e0 + size));
    Buffer rebuilt(first.begin(), first.begin() + 24);
    rebuilt.resize(32, std::byte{0x7e}); // the extra data
    rebuilt.insert(rebuilt.end(), first.begin() + 24, first.end());
    put_be(rebuilt, 20, 8, 4);
    rebuilt.insert(rebuilt.end(), rest.begin(), rest.end());
    std::copy(rebuilt.begin(), rebuilt.end(), p.b.begin() + static_cast<long>(e0));
    put_be(p.b, p.ext + 8, size + 8, 8);
    auto image = p.open();
    ASSERT_TRUE(image) << image.error().message;
    auto b = DirtyBitmap::open(*image, "b0");
    ASSERT_FALSE(b);
    EXPECT_EQ(b.error().message,
              "bitmap 'b0' is inconsistent and cannot be used: it has 8 bytes of unknown extra "
              "data and flag extra_data_compatible is clear");
    EXPECT_TRUE(DirtyBitmap::open(*image, "b1"));
    // With the flag set the extra data may be ignored.
    put_be(p.b, e0 + 12, get_be(p.b, e0 + 12, 4) | kBitmapExtraDataCompatible, 4);
    image = p.open();
    ASSERT_TRUE(image) << image.error().message;
    auto ok = DirtyBitmap::open(*image, "b0");
    ASSERT_TRUE(ok) << ok.error().message;
    EXPECT_EQ(ok->dirty_bytes(), 65536u);
}

TEST(BitmapsCorrupt, RandomDamageIsAnErrorOrAConsistentWalk) {
    // Deterministic random damage to the bitmaps extension, directory, tables and data clusters:
    // every image either fails to open with a table/header error, or lists its bitmaps and walks
    // each usable one to ranges that tile the disk (run under ASan/UBSan by scripts/test.sh).
    const Patched clean;
    std::vector<std::size_t> spots;
    for (std::size_t i = 0; i < 24; ++i)
        spots.push_back(clean.ext + i);
    for (std::size_t i = 0; i < 64; ++i)
        spots.push_back(clean.directory + i);
    for (std::size_t entry : {clean.directory, clean.entry1}) {
        for (std::size_t i = 0; i < 8; ++i)
            spots.push_back(clean.table(entry) + i);
    }
    const std::uint64_t data = get_be(clean.b, clean.table(clean.directory), 8);
    for (std::size_t i = 0; i < 16; ++i)
        spots.push_back(data + i);
    std::uint64_t state = 0x9e3779b97f4a7c15ull;
    auto random = [&] {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        return state;
    };
    int opened = 0, refused = 0;
    for (int round = 0; round < 2000; ++round) {
        Patched p;
        for (int k = 0, n = 1 + static_cast<int>(random() % 3); k < n; ++k) {
            p.b.at(spots[random() % spots.size()]) ^= static_cast<std::byte>(1u << (random() % 8));
        }
        auto image = p.open();
        if (!image) {
            ++refused;
            EXPECT_TRUE(image.error().code == ErrorCode::invalid_table ||
                        image.error().code == ErrorCode::invalid_header)
                << image.error().message;
            continue;
        }
        ++opened;
        for (const BitmapSummary& s : list_bitmaps(*image)) {
            if (s.error)
                continue;
            DirtyBitmap b = bitmap_ok(*image, s.entry.name);
            std::uint64_t at = 0, dirty = 0;
            for (const Span& r : library_runs(b)) {
                EXPECT_EQ(std::get<0>(r), at);
                at += std::get<1>(r);
                dirty += std::get<2>(r) ? std::get<1>(r) : 0;
            }
            EXPECT_EQ(at, image->size());
            EXPECT_EQ(dirty, *s.dirty_bytes);
            DirtyExtentRange it = b.dirty_extents();
            std::uint64_t extent_bytes = 0;
            for (const Extent& e : it)
                extent_bytes += e.length;
            EXPECT_FALSE(it.error().has_value()) << it.error()->message;
            EXPECT_EQ(extent_bytes, dirty);
        }
    }
    EXPECT_GT(opened, 100);
    EXPECT_GT(refused, 100);
}

} // namespace

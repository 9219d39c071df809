// Layers: backing chains (raw and qcow2 layers, sizes that differ from layer to layer, relative
// and absolute backing names, missing files, loops, depth limit, OpenOptions overrides),
// external data files and internal snapshots, against qemu-img / qemu-io 7.2 as the oracle:
// cat byte-identical to `qemu-img convert -O raw`, map equal to `qemu-img map --output=json`,
// random unaligned reads equal to the raw bytes, and the depth/present of every extent.
#include "support.hpp"

#include <qcowmap/image.hpp>
#include <qcowmap/map.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <regex>
#include <sstream>

namespace qcowmap {
namespace {

using test::cli;
using test::q;

namespace fs = std::filesystem;
using test::run;
using test::run_ok;
using test::shell_quote;
using test::TempDir;

/// Prefix for a command that must run with `dir` as its working directory.
std::string in_dir(const fs::path& dir) {
    return "cd " + q(dir) + " && ";
}
std::string in_dir(const TempDir& dir) {
    return in_dir(dir.path());
}
/// qcowmap always runs from a directory unrelated to the images: relative names inside the
/// images must resolve against the image's own directory, never against the cwd.
const std::string kElsewhere = "cd / && ";

constexpr std::uint64_t KiB = 1024;
constexpr std::uint64_t MiB = 1024 * 1024;

/// Applies qemu-io commands to `image` (run from `cwd` when given) and fails the test when
/// one of them fails (qemu-io exits 0 even then).
void qemu_io(const fs::path& image, const std::vector<std::string>& commands,
             const std::string& format = "qcow2", const fs::path& cwd = {}) {
    std::string io = (cwd.empty() ? std::string() : in_dir(cwd)) + "qemu-io -f " + format;
    for (const std::string& c : commands)
        io += " -c " + shell_quote(c);
    test::CommandResult r = run(io + " " + q(image));
    if (r.exit_code != 0 || r.out.find("failed") != std::string::npos ||
        r.err.find("failed") != std::string::npos) {
        ADD_FAILURE() << "qemu-io failed on " << image << ": " << r.out << r.err;
    }
}

std::string strip_compressed_key(std::string json) {
    for (const char* key : {", \"compressed\": false", ", \"compressed\": true"}) {
        for (auto at = json.find(key); at != std::string::npos; at = json.find(key)) {
            json.erase(at, std::strlen(key));
        }
    }
    return json;
}

/// `qemu-img convert [extra] -O raw SOURCE` into a file of `dir`, returned as bytes.
std::vector<std::byte> qemu_convert(const std::string& source, const TempDir& dir,
                                    const std::string& extra = "", const std::string& prefix = "") {
    auto raw = dir / "oracle.raw";
    fs::remove(raw);
    run_ok(prefix + "qemu-img convert " + extra + " -O raw " + source + " " + q(raw));
    auto bytes = test::read_file(raw);
    fs::remove(raw);
    return bytes;
}

/// One range of a `map --output=json` listing.
struct MapLine {
    std::uint64_t start = 0, length = 0;
    unsigned depth = 0;
    bool present = false;
};

std::vector<MapLine> parse_map(const std::string& json) {
    static const std::regex line_re(
        R"(\{ "start": (\d+), "length": (\d+), "depth": (\d+), "present": (true|false),)");
    std::vector<MapLine> lines;
    for (std::sregex_iterator it(json.begin(), json.end(), line_re), end; it != end; ++it) {
        lines.push_back({std::stoull((*it)[1]), std::stoull((*it)[2]),
                         static_cast<unsigned>(std::stoul((*it)[3])), (*it)[4] == "true"});
    }
    return lines;
}

/// Every extent the library yields agrees with qemu's map on depth and presence for every
/// byte it covers (qemu merges differently, so compare by overlap).
void expect_extents_agree_with_map(const Image& image, const std::string& qemu_json) {
    std::vector<MapLine> lines = parse_map(qemu_json);
    ASSERT_FALSE(lines.empty()) << qemu_json;
    ExtentRange it = image.extents();
    std::uint64_t covered = 0;
    int checked = 0;
    for (const Extent& e : it) {
        EXPECT_EQ(e.offset, covered);
        covered = e.offset + e.length;
        for (const MapLine& line : lines) {
            if (line.start >= e.offset + e.length || line.start + line.length <= e.offset)
                continue;
            EXPECT_EQ(e.depth, line.depth) << "extent at " << e.offset << " +" << e.length;
            EXPECT_EQ(e.present, line.present) << "extent at " << e.offset << " +" << e.length;
            ++checked;
        }
    }
    ASSERT_FALSE(it.error().has_value()) << it.error()->message;
    EXPECT_EQ(covered, image.size());
    EXPECT_GT(checked, 0);
}

/// Random unaligned reads (and reads at and across the end) equal `expected`.
void expect_reads_equal(const Image& image, const std::vector<std::byte>& expected,
                        unsigned seed = 99) {
    ASSERT_EQ(image.size(), expected.size());
    std::mt19937_64 rng(seed);
    std::vector<std::byte> buffer;
    const std::uint64_t max_length =
        std::min<std::uint64_t>(3 * image.info().cluster_size, 256 * KiB);
    for (int i = 0; i < 200; ++i) {
        std::uint64_t offset = rng() % expected.size();
        std::size_t length = 1 + rng() % max_length;
        buffer.assign(length, std::byte{0x5a});
        auto n = image.read(buffer, offset);
        ASSERT_TRUE(n) << n.error().message;
        std::size_t want = std::min<std::uint64_t>(length, expected.size() - offset);
        ASSERT_EQ(*n, want);
        ASSERT_EQ(0, std::memcmp(buffer.data(), expected.data() + offset, want))
            << "read at " << offset << " +" << length;
    }
    // The tail: a read running past the end stops there, a read at the end copies nothing.
    buffer.assign(4096, std::byte{0x5a});
    auto n = image.read(buffer, expected.size() - 100);
    ASSERT_TRUE(n) << n.error().message;
    EXPECT_EQ(*n, 100u);
    EXPECT_EQ(0, std::memcmp(buffer.data(), expected.data() + expected.size() - 100, 100));
    n = image.read(buffer, expected.size());
    ASSERT_TRUE(n) << n.error().message;
    EXPECT_EQ(*n, 0u);
}

/// How to check one image (or one view of it) against qemu.
struct Oracle {
    std::string qemu_prefix;   ///< e.g. in_dir(dir) when qemu needs a working directory
    std::string qemu_source;   ///< what qemu-img opens (default: the image path)
    std::string convert_extra; ///< e.g. "-l snapshot.name=s1"
    std::string cli_args;      ///< qcowmap options, e.g. "--snapshot=s1"
    OpenOptions options;       ///< the same for the library
    bool compare_map = true;   ///< qemu-img map cannot show a snapshot
};

/// cat, map and random reads of `image` equal qemu's; returns the raw bytes.
std::vector<std::byte> expect_matches_qemu(const fs::path& image_path, const TempDir& dir,
                                           const Oracle& oracle = {}) {
    SCOPED_TRACE(image_path.string() + " " + oracle.cli_args);
    const std::string source = oracle.qemu_source.empty() ? q(image_path) : oracle.qemu_source;
    std::vector<std::byte> expected =
        qemu_convert(source, dir, oracle.convert_extra, oracle.qemu_prefix);
    EXPECT_FALSE(expected.empty());

    auto cat = dir / "cat.raw";
    auto r =
        run(kElsewhere + cli() + " cat " + oracle.cli_args + " " + q(image_path) + " > " + q(cat));
    EXPECT_EQ(r.exit_code, 0) << r.err;
    EXPECT_TRUE(test::read_file(cat) == expected) << "cat differs from qemu-img convert";
    fs::remove(cat);

    auto image = Image::open(image_path, oracle.options);
    EXPECT_TRUE(image) << image.error().message;
    if (!image)
        return expected;
    expect_reads_equal(*image, expected);

    if (oracle.compare_map) {
        r = run(kElsewhere + cli() + " map --output=json " + oracle.cli_args + " " + q(image_path));
        EXPECT_EQ(r.exit_code, 0) << r.err;
        std::string theirs = run_ok(oracle.qemu_prefix + "qemu-img map --output=json " + source);
        EXPECT_EQ(strip_compressed_key(r.out), theirs);
        expect_extents_agree_with_map(*image, theirs);
    }
    return expected;
}

OpenOptions top_only() {
    OpenOptions o;
    o.backing = BackingMode::none;
    return o;
}
OpenOptions at_snapshot(const std::string& snapshot) {
    OpenOptions o;
    o.snapshot = snapshot;
    return o;
}
OpenOptions overrides(std::optional<fs::path> backing_file,
                      std::optional<std::string> backing_format = std::nullopt) {
    OpenOptions o;
    o.backing_file = std::move(backing_file);
    o.backing_format = std::move(backing_format);
    return o;
}

/// The extent covering `offset`.
Extent extent_at(const Image& image, std::uint64_t offset) {
    ExtentRange it = image.extents(offset, offset + 1);
    Extent e;
    EXPECT_TRUE(it.next(e)) << "no extent at " << offset;
    EXPECT_FALSE(it.error().has_value()) << (it.error().has_value() ? it.error()->message : "");
    return e;
}

int count_compressed(const Image& image, std::optional<std::uint32_t> depth = std::nullopt) {
    int count = 0;
    ExtentRange it = image.extents();
    for (const Extent& e : it) {
        count += e.kind == ExtentKind::compressed && (!depth || e.depth == *depth);
    }
    return it.error().has_value() ? -1 : count;
}

/// An image that looks like qemu's `{"driver":"qcow2","file":...}` plus `extra` JSON members.
std::string json_image(const fs::path& image, const std::string& extra) {
    return shell_quote("json:{\"driver\":\"qcow2\",\"file\":{\"driver\":\"file\",\"filename\":\"" +
                       image.string() + "\"}" + extra + "}");
}

std::size_t count_lines(const std::string& text) {
    return static_cast<std::size_t>(std::count(text.begin(), text.end(), '\n'));
}

/// A failed CLI run: exit 1, nothing on stdout, exactly one line on stderr.
void expect_one_line_failure(const test::CommandResult& r, const std::string& must_contain) {
    EXPECT_EQ(r.exit_code, 1) << r.err;
    EXPECT_TRUE(r.out.empty()) << r.out.size() << " bytes on stdout";
    EXPECT_EQ(count_lines(r.err), 1u) << r.err;
    EXPECT_TRUE(!r.err.empty() && r.err.back() == '\n') << r.err;
    EXPECT_NE(r.err.find(must_contain), std::string::npos) << r.err;
}

// ---------------------------------------------------------------------------------------------
// A raw base, a smaller qcow2 middle and a larger qcow2 top.

struct ThreeLayers {
    fs::path base, mid, top;
};

ThreeLayers make_three_layers(const TempDir& dir) {
    ThreeLayers c{dir / "base.raw", dir / "mid.qcow2", dir / "top.qcow2"};
    run_ok("truncate -s 8M " + q(c.base));
    // Data, holes left by truncate, a zeroed range (punched) and a discard in the raw base.
    qemu_io(c.base,
            {"write -P 0x11 0 1M", "write -P 0x12 3M 512k", "write -z 3M 64k",
             "write -P 0x13 7M 1M", "discard 7M 256k", "write -P 0x14 5000k 3000"},
            "raw");
    // Relative backing names, created from the images' directory.
    run_ok(in_dir(dir) + "qemu-img create -q -f qcow2 -b base.raw -F raw mid.qcow2 6M");
    qemu_io(c.mid, {"write -P 0x21 512k 1M", "write -z 3200k 100k", "discard 0 64k",
                    "write -P 0x22 5M 1M", "write -P 0x23 6000k 7"});
    run_ok(in_dir(dir) + "qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2 10M");
    qemu_io(c.top, {"write -P 0x31 100k 33k", "write -z 5M 128k", "discard 512k 64k",
                    "write -P 0x32 9M 500k", "write -P 0x33 6000k 10k", "write -P 0x34 10239k 1k"});
    return c;
}

TEST(Chain, RawBaseSmallerMiddleLargerTopMatchQemuAtEveryLayer) {
    TempDir dir;
    ThreeLayers c = make_three_layers(dir);
    // Every qcow2 layer opened as the top of its own chain (the raw base is only ever a
    // backing layer here: qcowmap reads qcow2 images, and checks it through the others).
    std::vector<std::byte> top_bytes = expect_matches_qemu(c.top, dir);
    std::vector<std::byte> mid_bytes = expect_matches_qemu(c.mid, dir);
    EXPECT_EQ(top_bytes.size(), 10 * MiB);
    EXPECT_EQ(mid_bytes.size(), 6 * MiB);

    // Through the raw base: where neither qcow2 layer allocates, the bytes are the raw file's.
    std::vector<std::byte> base_bytes = test::read_file(c.base);
    ASSERT_EQ(base_bytes.size(), 8 * MiB);
    EXPECT_EQ(0,
              std::memcmp(top_bytes.data() + 200 * KiB, base_bytes.data() + 200 * KiB, 300 * KiB));
    EXPECT_EQ(0,
              std::memcmp(mid_bytes.data() + 3400 * KiB, base_bytes.data() + 3400 * KiB, 60 * KiB));
    EXPECT_EQ(mid_bytes[3400 * KiB], std::byte{0x12});
}

TEST(Chain, LayersAndExtentDepthsThroughTheLibrary) {
    TempDir dir;
    ThreeLayers c = make_three_layers(dir);
    auto image = Image::open(c.top);
    ASSERT_TRUE(image) << image.error().message;
    std::vector<LayerInfo> layers = image->layers();
    ASSERT_EQ(layers.size(), 3u);
    EXPECT_EQ(layers[0].path, c.top);
    EXPECT_EQ(layers[1].path, c.mid);
    EXPECT_EQ(layers[2].path, c.base);
    EXPECT_EQ(layers[0].format, "qcow2");
    EXPECT_EQ(layers[1].format, "qcow2");
    EXPECT_EQ(layers[2].format, "raw");
    EXPECT_EQ(layers[0].virtual_size, 10 * MiB);
    EXPECT_EQ(layers[1].virtual_size, 6 * MiB);
    EXPECT_EQ(layers[2].virtual_size, 8 * MiB);
    EXPECT_EQ(image->size(), 10 * MiB);

    Extent e = extent_at(*image, 110 * KiB); // written in the top
    EXPECT_EQ(e.depth, 0u);
    EXPECT_TRUE(e.present);
    EXPECT_EQ(e.kind, ExtentKind::data);
    e = extent_at(*image, 300 * KiB); // only the raw base has data here
    EXPECT_EQ(e.depth, 2u);
    EXPECT_TRUE(e.present);
    EXPECT_EQ(e.kind, ExtentKind::data);
    ASSERT_TRUE(e.host_offset);
    EXPECT_EQ(*e.host_offset, e.offset); // a raw layer maps the disk 1:1
    e = extent_at(*image, 530 * KiB);    // discarded in the top over the middle's data
    EXPECT_EQ(e.depth, 0u);
    EXPECT_EQ(e.kind, ExtentKind::zero);
    EXPECT_TRUE(e.present);
    e = extent_at(*image, 1 * MiB); // written in the middle
    EXPECT_EQ(e.depth, 1u);
    EXPECT_EQ(e.kind, ExtentKind::data);
    e = extent_at(*image, 2 * MiB); // a hole of the raw base: present, zero, at depth 2
    EXPECT_EQ(e.depth, 2u);
    EXPECT_TRUE(e.present);
    EXPECT_EQ(e.kind, ExtentKind::zero);
    e = extent_at(*image, 5 * MiB + 4 * KiB); // write -z in the top
    EXPECT_EQ(e.depth, 0u);
    EXPECT_EQ(e.kind, ExtentKind::zero);
    EXPECT_TRUE(e.present);
    e = extent_at(*image, 7 * MiB); // past the middle's end, not written in the top
    EXPECT_FALSE(e.present);
    EXPECT_EQ(e.kind, ExtentKind::zero);
    EXPECT_EQ(e.depth, 0u) << "qemu-img map reports depth 0 past the end of the backing file";
    e = extent_at(*image, 9 * MiB + 1); // written in the top past the middle's end
    EXPECT_EQ(e.depth, 0u);
    EXPECT_EQ(e.kind, ExtentKind::data);

    // Every data extent's bytes are exactly its layer's file bytes at host_offset.
    std::vector<std::vector<std::byte>> files;
    for (const LayerInfo& layer : layers)
        files.push_back(test::read_file(layer.path));
    ExtentRange it = image->extents();
    int data_extents[3] = {0, 0, 0};
    while (it.next(e)) {
        ASSERT_LT(e.depth, 3u);
        if (e.kind != ExtentKind::data)
            continue;
        ASSERT_TRUE(e.host_offset);
        ASSERT_EQ(e.bytes.size(), e.length);
        const auto& file = files[e.depth];
        ASSERT_LE(*e.host_offset + e.length, file.size());
        EXPECT_EQ(0, std::memcmp(e.bytes.data(), file.data() + *e.host_offset, e.length))
            << "extent at " << e.offset << " depth " << e.depth;
        ++data_extents[e.depth];
    }
    ASSERT_FALSE(it.error().has_value()) << it.error()->message;
    EXPECT_GT(data_extents[0], 0);
    EXPECT_GT(data_extents[1], 0);
    EXPECT_GT(data_extents[2], 0);

    // The middle opened alone: two layers.
    auto mid = Image::open(c.mid);
    ASSERT_TRUE(mid) << mid.error().message;
    ASSERT_EQ(mid->layers().size(), 2u);
    EXPECT_EQ(mid->layers()[1].path, c.base);
    EXPECT_EQ(extent_at(*mid, 300 * KiB).depth, 1u);
}

TEST(Chain, BackingNoneReadsTheTopOnly) {
    TempDir dir;
    ThreeLayers c = make_three_layers(dir);
    for (const fs::path& layer : {c.top, c.mid}) {
        Oracle oracle;
        oracle.qemu_source = json_image(layer, ",\"backing\":null");
        oracle.cli_args = "--backing=none";
        oracle.options.backing = BackingMode::none;
        expect_matches_qemu(layer, dir, oracle);
    }
    auto image = Image::open(c.top, top_only());
    ASSERT_TRUE(image) << image.error().message;
    EXPECT_EQ(image->layers().size(), 1u);
    Extent e = extent_at(*image, 300 * KiB);
    EXPECT_FALSE(e.present);
    EXPECT_EQ(e.depth, 0u);
    EXPECT_EQ(e.kind, ExtentKind::zero);
}

TEST(Chain, ExtendedL2TopOverQcow2Base) {
    TempDir dir;
    auto base = dir / "base.qcow2", top = dir / "top.qcow2";
    test::make_image(base, "cluster_size=64k", "4M",
                     {"write -P 0x51 0 200k", "write -P 0x53 1M 1M", "write -z 1536k 64k",
                      "write -P 0x54 3M 64k"});
    run_ok(in_dir(dir) + "qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=64k "
                         "-b base.qcow2 -F qcow2 top.qcow2 4M");
    // Subcluster (2 KiB) writes, zero-writes and discards over allocated and unallocated
    // backing ranges.
    qemu_io(top, {"write -P 0x61 2k 2k", "write -P 0x62 130k 5k", "write -z 1032k 4k",
                  "discard 1100k 64k", "write -P 0x63 3M 7k", "write -P 0x64 2500k 2k",
                  "write -z 2600k 2k", "write -P 0x65 4094k 2k"});
    auto image = Image::open(top);
    ASSERT_TRUE(image) << image.error().message;
    EXPECT_TRUE(image->info().extended_l2);
    EXPECT_EQ(extent_at(*image, 2 * KiB).depth, 0u);
    EXPECT_EQ(extent_at(*image, 5 * KiB).depth, 1u); // same cluster, another subcluster
    EXPECT_EQ(extent_at(*image, 2601 * KiB).kind, ExtentKind::zero);
    EXPECT_EQ(extent_at(*image, 2601 * KiB).depth, 0u);
    expect_matches_qemu(top, dir);
    expect_matches_qemu(base, dir);
}

TEST(Chain, CompressedClustersInTheBase) {
    TempDir dir;
    auto base = dir / "base.qcow2", top = dir / "top.qcow2";
    // qemu only compresses into unallocated clusters: compressed writes first.
    test::make_image(base, "cluster_size=64k", "4M",
                     {"write -c -P 0x41 0 64k", "write -c -P 0x42 128k 128k",
                      "write -c -P 0x43 1M 64k", "write -c -P 0x44 2M 64k", "write -P 0x45 3M 100k",
                      "write -z 2M 64k"});
    run_ok(in_dir(dir) + "qemu-img create -q -f qcow2 -o cluster_size=4k -b base.qcow2 -F qcow2 "
                         "top.qcow2 4M");
    // Partial overwrites of compressed backing clusters (the top has smaller clusters).
    qemu_io(top,
            {"write -P 0x71 8k 4k", "write -z 140k 8k", "discard 1M 4k", "write -P 0x72 3500k 9k"});
    auto image = Image::open(top);
    ASSERT_TRUE(image) << image.error().message;
    EXPECT_GT(count_compressed(*image, 1), 3);
    EXPECT_EQ(count_compressed(*image, 0), 0);
    EXPECT_EQ(extent_at(*image, 20 * KiB).kind, ExtentKind::compressed);
    EXPECT_EQ(extent_at(*image, 20 * KiB).depth, 1u);
    EXPECT_EQ(extent_at(*image, 9 * KiB).depth, 0u);
    expect_matches_qemu(top, dir);
    expect_matches_qemu(base, dir);
}

// ---------------------------------------------------------------------------------------------
// Backing file names.

TEST(BackingNames, RelativeNameResolvesAgainstTheOverlaysDirectory) {
    TempDir dir;
    fs::create_directories(dir / "sub");
    fs::create_directories(dir / "t");
    fs::create_directories(dir / "m");
    // sub/top.qcow2 -> "base.qcow2" (= sub/base.qcow2), with a decoy base.qcow2 in the cwd.
    test::make_image(dir / "sub" / "base.qcow2", "", "1M", {"write -P 0xb0 0 1M"});
    test::make_image(dir / "base.qcow2", "", "1M", {"write -P 0xdd 0 1M"});
    run_ok(in_dir(dir / "sub") + "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 1M");
    qemu_io(dir / "sub" / "top.qcow2", {"write -P 0x70 64k 64k"});
    const std::vector<std::byte> expected = qemu_convert(q(dir / "sub" / "top.qcow2"), dir);
    ASSERT_EQ(expected.size(), 1 * MiB);
    EXPECT_EQ(expected[0], std::byte{0xb0});

    // The CLI given a relative image path, from the directory holding the decoy.
    auto cat = dir / "cat.raw";
    auto r = run(in_dir(dir) + cli() + " cat sub/top.qcow2 > " + q(cat));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_TRUE(test::read_file(cat) == expected)
        << "relative backing name resolved against the cwd";
    r = run(in_dir(dir) + cli() + " map --output=json sub/top.qcow2");
    EXPECT_EQ(strip_compressed_key(r.out),
              run_ok(in_dir(dir) + "qemu-img map --output=json sub/top.qcow2"));
    r = run(in_dir(dir) + cli() + " info --backing-chain sub/top.qcow2");
    EXPECT_EQ(r.exit_code, 0) << r.err;
    EXPECT_NE(r.out.find("image: sub/base.qcow2\n"), std::string::npos) << r.out;
    expect_matches_qemu(dir / "sub" / "top.qcow2", dir);
    auto image = Image::open(dir / "sub" / "top.qcow2");
    ASSERT_TRUE(image) << image.error().message;
    ASSERT_EQ(image->layers().size(), 2u);
    EXPECT_EQ(image->layers()[1].path, dir / "sub" / "base.qcow2");

    // Each layer's relative name resolves against its own directory: t/top -> "../m/mid.qcow2",
    // m/mid -> "base.qcow2" (m/base.qcow2), decoy t/base.qcow2.
    test::make_image(dir / "m" / "base.qcow2", "", "1M", {"write -P 0xb1 0 512k"});
    test::make_image(dir / "t" / "base.qcow2", "", "1M", {"write -P 0xde 0 1M"});
    run_ok(in_dir(dir / "m") + "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2 1M");
    qemu_io(dir / "m" / "mid.qcow2", {"write -P 0xc1 128k 64k"});
    run_ok(in_dir(dir / "t") +
           "qemu-img create -q -f qcow2 -b ../m/mid.qcow2 -F qcow2 top.qcow2 1M");
    qemu_io(dir / "t" / "top.qcow2", {"write -P 0xc2 256k 64k"});
    std::vector<std::byte> bytes = expect_matches_qemu(dir / "t" / "top.qcow2", dir);
    ASSERT_EQ(bytes.size(), 1 * MiB);
    EXPECT_EQ(bytes[0], std::byte{0xb1});
    EXPECT_EQ(bytes[600 * KiB], std::byte{0});
    image = Image::open(dir / "t" / "top.qcow2");
    ASSERT_TRUE(image) << image.error().message;
    ASSERT_EQ(image->layers().size(), 3u);
    EXPECT_EQ(image->layers()[1].path, dir / "t" / "../m/mid.qcow2");
    EXPECT_EQ(fs::canonical(image->layers()[2].path), fs::canonical(dir / "m" / "base.qcow2"));
}

TEST(BackingNames, AbsoluteName) {
    TempDir dir;
    fs::create_directories(dir / "a");
    fs::create_directories(dir / "b");
    auto base = dir / "a" / "base.qcow2", top = dir / "b" / "top.qcow2";
    test::make_image(base, "", "2M", {"write -P 0xa1 0 2M"});
    run_ok(in_dir(dir / "b") + "qemu-img create -q -f qcow2 -b " + q(base) +
           " -F qcow2 top.qcow2 2M");
    qemu_io(top, {"write -P 0xa2 1M 64k"});
    auto image = Image::open(top);
    ASSERT_TRUE(image) << image.error().message;
    ASSERT_TRUE(image->info().backing_file);
    EXPECT_EQ(*image->info().backing_file, base.string());
    ASSERT_EQ(image->layers().size(), 2u);
    EXPECT_EQ(image->layers()[1].path, base);
    expect_matches_qemu(top, dir);
    // And through a relative top path from the top's directory.
    auto cat = dir / "cat.raw";
    auto r = run(in_dir(dir / "b") + cli() + " cat top.qcow2 > " + q(cat));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_TRUE(test::read_file(cat) == qemu_convert(q(top), dir));
}

// ---------------------------------------------------------------------------------------------
// Missing files, loops, depth.

TEST(BrokenChain, MissingBackingFile) {
    TempDir dir;
    auto image_path = dir / "x.qcow2";
    test::make_image(image_path, "", "1M", {"write -P 0x42 64k 64k", "write -z 256k 64k"});
    run_ok(in_dir(dir) + "qemu-img rebase -u -b gone.qcow2 -F qcow2 x.qcow2");
    // Also the qemu-img create -u way.
    run_ok(in_dir(dir) + "qemu-img create -q -f qcow2 -u -b gone.qcow2 -F qcow2 y.qcow2 1M");
    const std::string looked_for = (dir / "gone.qcow2").string();
    for (const fs::path& p : {image_path, dir / "y.qcow2"}) {
        SCOPED_TRACE(p.string());
        auto image = Image::open(p);
        ASSERT_FALSE(image);
        EXPECT_EQ(image.error().code, ErrorCode::io_error);
        EXPECT_NE(image.error().message.find(looked_for), std::string::npos)
            << image.error().message;
        for (const char* command : {"cat", "map --output=json", "info --backing-chain"}) {
            auto r = run(kElsewhere + cli() + " " + command + " " + q(p));
            SCOPED_TRACE(command);
            expect_one_line_failure(r, looked_for);
        }
    }
    // --backing=none reads the top alone: unallocated is zero, not present, depth 0.
    Oracle oracle;
    oracle.qemu_source = json_image(image_path, ",\"backing\":null");
    oracle.cli_args = "--backing=none";
    oracle.options.backing = BackingMode::none;
    std::vector<std::byte> bytes = expect_matches_qemu(image_path, dir, oracle);
    ASSERT_EQ(bytes.size(), 1 * MiB);
    EXPECT_EQ(bytes[64 * KiB], std::byte{0x42});
    auto image = Image::open(image_path, oracle.options);
    ASSERT_TRUE(image) << image.error().message;
    Extent e = extent_at(*image, 0);
    EXPECT_FALSE(e.present);
    EXPECT_EQ(e.depth, 0u);
    EXPECT_EQ(e.kind, ExtentKind::zero);
    // info without --backing-chain only names the backing file.
    auto r = run(kElsewhere + cli() + " info " + q(image_path));
    EXPECT_EQ(r.exit_code, 0) << r.err;
    EXPECT_NE(r.out.find("backing file: gone.qcow2 (actual path: " +
                         (image_path.parent_path() / "gone.qcow2").string() + ")\n"),
              std::string::npos)
        << r.out;
}

/// Opens `path` with the library and the CLI, expecting a loop error. No wall-clock bound (a
/// loaded CI machine made a "< 1 s" fail): a loop that hung would hit the CLI's `timeout` here
/// and the suite's meson timeout for the library call.
void expect_loop_refused(const fs::path& path) {
    SCOPED_TRACE(path.string());
    auto image = Image::open(path);
    ASSERT_FALSE(image);
    EXPECT_EQ(image.error().code, ErrorCode::invalid_table);
    EXPECT_NE(image.error().message.find("backing chain loops"), std::string::npos)
        << image.error().message;
    for (const char* command : {"cat", "map --output=json", "info --backing-chain"}) {
        SCOPED_TRACE(command);
        auto r = run(kElsewhere + "timeout 20 " + cli() + " " + command + " " + q(path));
        EXPECT_NE(r.exit_code, 124) << "timed out";
        expect_one_line_failure(r, "backing chain loops");
    }
    // The top alone still opens.
    auto top = Image::open(path, top_only());
    EXPECT_TRUE(top) << top.error().message;
}

TEST(BrokenChain, LoopsAreRefusedQuickly) {
    // Never run qemu-img on these: it spins.
    TempDir dir;
    auto a = dir / "a.qcow2", b = dir / "b.qcow2", self = dir / "self.qcow2";
    test::make_image(a, "", "1M", {"write -P 0xa 0 64k"});
    test::make_image(b, "", "1M", {"write -P 0xb 64k 64k"});
    test::make_image(self, "", "1M", {"write -P 0xc 0 64k"});
    run_ok(in_dir(dir) + "qemu-img rebase -u -b b.qcow2 -F qcow2 a.qcow2");
    run_ok(in_dir(dir) + "qemu-img rebase -u -b a.qcow2 -F qcow2 b.qcow2");
    run_ok(in_dir(dir) + "qemu-img rebase -u -b self.qcow2 -F qcow2 self.qcow2");
    expect_loop_refused(a);
    expect_loop_refused(b);
    expect_loop_refused(self);

    // A loop below the top (top -> c -> d -> c), and one closed through another name of the
    // same file (e -> f -> a symlink to e, named by absolute path).
    auto top = dir / "top.qcow2", c = dir / "c.qcow2", d = dir / "d.qcow2";
    test::make_image(c, "", "1M");
    test::make_image(d, "", "1M");
    run_ok(in_dir(dir) + "qemu-img rebase -u -b d.qcow2 -F qcow2 c.qcow2");
    run_ok(in_dir(dir) + "qemu-img rebase -u -b c.qcow2 -F qcow2 d.qcow2");
    run_ok(in_dir(dir) + "qemu-img create -q -f qcow2 -u -b c.qcow2 -F qcow2 top.qcow2 1M");
    expect_loop_refused(top);
    auto e = dir / "e.qcow2", f = dir / "f.qcow2";
    test::make_image(e, "", "1M");
    test::make_image(f, "", "1M");
    fs::create_symlink("e.qcow2", dir / "link.qcow2");
    run_ok(in_dir(dir) + "qemu-img rebase -u -b f.qcow2 -F qcow2 e.qcow2");
    run_ok(in_dir(dir) + "qemu-img rebase -u -b " + q(dir / "link.qcow2") + " -F qcow2 f.qcow2");
    expect_loop_refused(e);
}

std::string layer_name(int i) {
    char name[16];
    std::snprintf(name, sizeof name, "l%02d.qcow2", i);
    return name;
}

TEST(BrokenChain, DepthLimit) {
    TempDir dir;
    // l00 <- l01 <- ... <- l65: l63 is a chain of exactly kMaxChainLayers layers.
    static_assert(kMaxChainLayers == 64);
    run_ok(in_dir(dir) + "qemu-img create -q -f qcow2 l00.qcow2 1M && "
                         "qemu-img create -q -f qcow2 -u -b l00.qcow2 -F qcow2 l01.qcow2 1M");
    // The other overlays are copies of l01 naming the layer below (names of equal length; a
    // qemu-img create per layer would cost seconds).
    const std::vector<std::byte> template_bytes = test::read_file(dir / "l01.qcow2");
    auto be = [&](std::size_t at, int n) {
        std::uint64_t v = 0;
        for (int i = 0; i < n; ++i)
            v = (v << 8) | std::to_integer<std::uint64_t>(template_bytes[at + i]);
        return v;
    };
    const std::uint64_t name_at = be(8, 8);
    ASSERT_EQ(be(16, 4), 9u); // "l00.qcow2"
    for (int i = 2; i <= 65; ++i) {
        std::vector<std::byte> bytes = template_bytes;
        const std::string below = layer_name(i - 1);
        std::memcpy(bytes.data() + name_at, below.data(), below.size());
        test::write_file(dir / layer_name(i), bytes);
    }
    run_ok("qemu-img check -q " + q(dir / layer_name(65)) + " && qemu-img info " +
           q(dir / layer_name(65)) + " | grep -q 'backing file: l64.qcow2'");
    // Each written layer fills one cluster of its own (cluster k for the k-th of them) and 4 KiB
    // of cluster 15, which every layer above copies on write until l63 owns it.
    const int written[] = {0, 1, 9, 20, 33, 50, 62, 63};
    for (std::size_t k = 0; k < std::size(written); ++k) {
        const int layer = written[k];
        qemu_io(dir / layer_name(layer),
                {"write -P " + std::to_string(layer + 1) + " " + std::to_string(k * 64) + "k 64k",
                 "write -P " + std::to_string(layer + 1) + " " + std::to_string(15 * 64 + k * 4) +
                     "k 4k"});
    }
    auto deepest = dir / layer_name(63);
    auto image = Image::open(deepest);
    ASSERT_TRUE(image) << image.error().message;
    ASSERT_EQ(image->layers().size(), kMaxChainLayers);
    EXPECT_EQ(image->layers().back().path, dir / layer_name(0));
    for (std::size_t k = 0; k < std::size(written); ++k) {
        const int layer = written[k];
        for (std::uint64_t offset : {k * 64 * KiB + 1000, (15 * 64 + k * 4) * KiB + 5}) {
            std::byte b{};
            auto n = image->read({&b, 1}, offset);
            ASSERT_TRUE(n) << n.error().message;
            EXPECT_EQ(b, std::byte(layer + 1)) << "offset " << offset;
        }
        EXPECT_EQ(extent_at(*image, k * 64 * KiB).depth, 63u - layer);
        EXPECT_TRUE(extent_at(*image, k * 64 * KiB).present);
    }
    EXPECT_EQ(extent_at(*image, 15 * 64 * KiB).depth, 0u);
    EXPECT_EQ(extent_at(*image, 10 * 64 * KiB).depth, 63u); // nobody wrote: the bottom's depth
    EXPECT_FALSE(extent_at(*image, 10 * 64 * KiB).present);
    expect_matches_qemu(deepest, dir);

    for (const std::string& name : {layer_name(64), layer_name(65)}) {
        SCOPED_TRACE(name);
        auto deeper = Image::open(dir / name); // no wall-clock bound: the suite's timeout
        ASSERT_FALSE(deeper);
        EXPECT_EQ(deeper.error().code, ErrorCode::invalid_table);
        EXPECT_NE(deeper.error().message.find("deeper than 64"), std::string::npos)
            << deeper.error().message;
        expect_one_line_failure(run(kElsewhere + cli() + " cat " + q(dir / name)),
                                "deeper than 64");
        // The top alone is fine.
        EXPECT_TRUE(Image::open(dir / name, top_only()));
    }
}

// ---------------------------------------------------------------------------------------------
// OpenOptions overrides of the backing file and its format.

TEST(Overrides, BackingFileAndFormat) {
    TempDir dir;
    auto base = dir / "base.qcow2", alt = dir / "alt.qcow2", alt_raw = dir / "alt.raw";
    auto top = dir / "top.qcow2";
    test::make_image(base, "", "2M", {"write -P 0xb0 0 2M"});
    test::make_image(alt, "", "2M", {"write -P 0xa0 0 1M", "write -z 1536k 64k"});
    run_ok("truncate -s 3M " + q(alt_raw));
    qemu_io(alt_raw, {"write -P 0xaa 512k 1M"}, "raw");
    run_ok(in_dir(dir) + "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 2M");
    qemu_io(top, {"write -P 0x70 64k 64k", "write -z 1M 64k"});

    // The oracle: a copy of the top whose header names the override, made by rebase -u.
    auto rebased = [&](const std::string& backing, const std::string& format) {
        auto copy = dir / "rebased.qcow2";
        fs::copy_file(top, copy, fs::copy_options::overwrite_existing);
        run_ok(in_dir(dir) + "qemu-img rebase -u -b " + shell_quote(backing) + " -F " + format +
               " rebased.qcow2");
        return qemu_convert(q(copy), dir);
    };

    {
        SCOPED_TRACE("backing_file override (qcow2, absolute)");
        auto image = Image::open(top, overrides(alt));
        ASSERT_TRUE(image) << image.error().message;
        ASSERT_EQ(image->layers().size(), 2u);
        EXPECT_EQ(image->layers()[1].path, alt);
        EXPECT_EQ(image->layers()[1].format, "qcow2");
        auto expected = rebased(alt.string(), "qcow2");
        EXPECT_EQ(expected[0], std::byte{0xa0});
        expect_reads_equal(*image, expected);
    }
    {
        SCOPED_TRACE("backing_file + backing_format raw");
        auto image = Image::open(top, overrides(alt_raw, "raw"));
        ASSERT_TRUE(image) << image.error().message;
        ASSERT_EQ(image->layers().size(), 2u);
        EXPECT_EQ(image->layers()[1].format, "raw");
        EXPECT_EQ(image->layers()[1].virtual_size, 3 * MiB);
        EXPECT_EQ(image->size(), 2 * MiB);
        auto expected = rebased(alt_raw.string(), "raw");
        EXPECT_EQ(expected[600 * KiB], std::byte{0xaa});
        expect_reads_equal(*image, expected);
    }
    {
        SCOPED_TRACE("backing_format raw for the backing file the header names");
        // base.qcow2's own bytes (its qcow2 header and tables) become the backing disk.
        auto image = Image::open(top, overrides({}, "raw"));
        ASSERT_TRUE(image) << image.error().message;
        ASSERT_EQ(image->layers().size(), 2u);
        EXPECT_EQ(image->layers()[1].path, base);
        EXPECT_EQ(image->layers()[1].format, "raw");
        auto expected = rebased("base.qcow2", "raw");
        EXPECT_EQ(expected[0], std::byte{'Q'});
        expect_reads_equal(*image, expected);
    }
    {
        SCOPED_TRACE("backing_file for an image that names none");
        auto image = Image::open(alt, overrides(alt_raw, "raw"));
        ASSERT_TRUE(image) << image.error().message;
        ASSERT_EQ(image->layers().size(), 2u);
        auto copy = dir / "rebased.qcow2";
        fs::copy_file(alt, copy, fs::copy_options::overwrite_existing);
        run_ok(in_dir(dir) + "qemu-img rebase -u -b alt.raw -F raw rebased.qcow2");
        auto expected = qemu_convert(q(copy), dir);
        EXPECT_EQ(expected[1 * MiB + 4 * KiB], std::byte{0xaa});
        expect_reads_equal(*image, expected);
    }
    {
        SCOPED_TRACE("errors");
        auto image = Image::open(top, overrides(dir / "nowhere.qcow2"));
        ASSERT_FALSE(image);
        EXPECT_EQ(image.error().code, ErrorCode::io_error);
        EXPECT_NE(image.error().message.find((dir / "nowhere.qcow2").string()), std::string::npos)
            << image.error().message;
        image = Image::open(top, overrides({}, "vmdk"));
        ASSERT_FALSE(image);
        EXPECT_EQ(image.error().code, ErrorCode::unsupported_feature);
        EXPECT_NE(image.error().message.find("vmdk"), std::string::npos) << image.error().message;
        // BackingMode::none wins over an override.
        OpenOptions both = overrides(alt);
        both.backing = BackingMode::none;
        image = Image::open(top, both);
        ASSERT_TRUE(image) << image.error().message;
        EXPECT_EQ(image->layers().size(), 1u);
    }
}

// ---------------------------------------------------------------------------------------------
// External data files.

struct DataFileCase {
    const char* name;
    bool raw;
    bool absolute_name;
};

class DataFile : public ::testing::TestWithParam<DataFileCase> {};

TEST_P(DataFile, MatchesQemuAndCanBeOverridden) {
    const DataFileCase& p = GetParam();
    TempDir dir;
    fs::create_directories(dir / "img");
    auto image_path = dir / "img" / "i.qcow2";
    auto data_path = dir / "img" / "i-data.raw";
    const std::string data_name = p.absolute_name ? data_path.string() : "i-data.raw";
    // qemu 7.2 resolves a relative data file name against its cwd, not the image's directory:
    // run it from the image's directory.
    const std::string qemu_cwd = in_dir(dir / "img");
    run_ok(qemu_cwd + "qemu-img create -q -f qcow2 -o " +
           shell_quote("data_file=" + data_name + ",data_file_raw=" + (p.raw ? "on" : "off")) +
           " i.qcow2 4M");
    qemu_io(image_path,
            {"write -P 0x41 0 200k", "write -z 64k 64k", "discard 128k 64k", "write -P 0x42 1M 1M",
             "write -z 3M 128k", "write -P 0x43 3500k 3k", "write -P 0x44 4000k 5"},
            "qcow2", dir / "img");
    auto image = Image::open(image_path);
    ASSERT_TRUE(image) << image.error().message;
    ASSERT_TRUE(image->info().data_file);
    EXPECT_EQ(*image->info().data_file, data_name);
    EXPECT_TRUE(image->info().incompatible_features & kIncompatDataFile);
    EXPECT_EQ((image->info().autoclear_features & kAutoclearDataFileRaw) != 0, p.raw);
    // Data extents come from the data file, at the same offsets as the virtual disk.
    const auto data_bytes = test::read_file(data_path);
    Extent e = extent_at(*image, 1 * MiB + 5);
    ASSERT_EQ(e.kind, ExtentKind::data);
    ASSERT_TRUE(e.host_offset);
    EXPECT_EQ(e.bytes.data()[0], data_bytes[*e.host_offset]);

    Oracle oracle;
    oracle.qemu_prefix = qemu_cwd;
    const std::vector<std::byte> expected = expect_matches_qemu(image_path, dir, oracle);

    // Moved elsewhere: the default open names the file it looked for...
    fs::create_directories(dir / "elsewhere");
    auto moved = dir / "elsewhere" / "moved.raw";
    fs::rename(data_path, moved);
    auto missing = Image::open(image_path);
    ASSERT_FALSE(missing);
    EXPECT_EQ(missing.error().code, ErrorCode::io_error);
    EXPECT_NE(missing.error().message.find(data_path.string()), std::string::npos)
        << missing.error().message;
    expect_one_line_failure(run(kElsewhere + cli() + " cat " + q(image_path)), data_path.string());
    expect_one_line_failure(run(kElsewhere + cli() + " map " + q(image_path)), data_path.string());

    // ... and OpenOptions::data_file / --data-file find it.
    Oracle moved_oracle;
    moved_oracle.qemu_source = json_image(
        image_path, ",\"data-file\":{\"driver\":\"file\",\"filename\":\"" + moved.string() + "\"}");
    moved_oracle.cli_args = "--data-file=" + q(moved);
    moved_oracle.options.data_file = moved;
    EXPECT_TRUE(expect_matches_qemu(image_path, dir, moved_oracle) == expected);
}

INSTANTIATE_TEST_SUITE_P(Images, DataFile,
                         ::testing::Values(DataFileCase{"plain_relative", false, false},
                                           DataFileCase{"raw_relative", true, false},
                                           DataFileCase{"raw_absolute", true, true},
                                           DataFileCase{"plain_absolute", false, true}),
                         [](const auto& info) { return std::string(info.param.name); });

TEST(DataFileChain, DataFileImageAsABackingLayer) {
    TempDir dir;
    fs::create_directories(dir / "lower");
    run_ok(in_dir(dir / "lower") +
           "qemu-img create -q -f qcow2 -o data_file=base-data.raw base.qcow2 2M");
    qemu_io(dir / "lower" / "base.qcow2", {"write -P 0x61 0 1M", "write -z 256k 64k"}, "qcow2",
            dir / "lower");
    run_ok(in_dir(dir) + "qemu-img create -q -f qcow2 -b lower/base.qcow2 -F qcow2 top.qcow2 2M");
    qemu_io(dir / "top.qcow2", {"write -P 0x62 512k 64k"}, "qcow2", dir / "lower");
    auto image = Image::open(dir / "top.qcow2");
    ASSERT_TRUE(image) << image.error().message;
    EXPECT_EQ(extent_at(*image, 0).depth, 1u);
    // qemu opens the base's relative data file name from its cwd.
    Oracle oracle;
    oracle.qemu_prefix = in_dir(dir / "lower");
    expect_matches_qemu(dir / "top.qcow2", dir, oracle);
}

// ---------------------------------------------------------------------------------------------
// Internal snapshots.

/// The table lines of `qemu-img snapshot -l` / `qcowmap info`: from the "ID  TAG" header on.
std::vector<std::string> snapshot_table(const std::string& text) {
    std::vector<std::string> lines;
    std::istringstream in(text);
    std::string line;
    bool in_table = false;
    while (std::getline(in, line)) {
        if (line.starts_with("ID "))
            in_table = true;
        else if (in_table && line.empty())
            break;
        if (in_table)
            lines.push_back(line);
    }
    return lines;
}

void expect_snapshot_list_matches_qemu(const fs::path& image, std::size_t count) {
    for (const char* tz : {"TZ=UTC", "TZ=XST-05:30"}) {
        SCOPED_TRACE(tz);
        auto theirs = snapshot_table(run_ok(std::string(tz) + " qemu-img snapshot -l " + q(image)));
        auto ours = snapshot_table(run_ok(std::string(tz) + " " + cli() + " info " + q(image)));
        ASSERT_EQ(theirs.size(), count + 1);
        EXPECT_EQ(ours, theirs);
    }
}

/// Snapshot `name` against `qemu-img snapshot -a` applied to a copy: the copy's active layer
/// then uses the snapshot's L1 table (same host clusters, so the same map) and is resized to the
/// snapshot's size. With `compare_bytes`, also cat and reads against the copy's bytes.
std::vector<std::byte> expect_snapshot_matches_applied_copy(const fs::path& image,
                                                            const std::string& name,
                                                            const TempDir& dir,
                                                            bool compare_bytes) {
    SCOPED_TRACE("snapshot " + name + " vs an applied copy");
    auto copy = dir / "applied.qcow2";
    fs::copy_file(image, copy, fs::copy_options::overwrite_existing);
    run_ok("qemu-img snapshot -a " + shell_quote(name) + " " + q(copy));
    auto opened = Image::open(image, at_snapshot(name));
    EXPECT_TRUE(opened) << opened.error().message;
    std::vector<std::byte> expected;
    if (compare_bytes) {
        expected = qemu_convert(q(copy), dir);
        auto cat = dir / "cat.raw";
        auto r = run(kElsewhere + cli() + " cat --snapshot=" + shell_quote(name) + " " + q(image) +
                     " > " + q(cat));
        EXPECT_EQ(r.exit_code, 0) << r.err;
        EXPECT_TRUE(test::read_file(cat) == expected);
        if (opened)
            expect_reads_equal(*opened, expected, 7);
    }
    auto r = run(kElsewhere + cli() + " map --output=json --snapshot=" + shell_quote(name) + " " +
                 q(image));
    EXPECT_EQ(r.exit_code, 0) << r.err;
    std::string theirs = run_ok("qemu-img map --output=json " + q(copy));
    EXPECT_EQ(strip_compressed_key(r.out), theirs);
    if (opened)
        expect_extents_agree_with_map(*opened, theirs);
    fs::remove(copy);
    return expected;
}

/// Each snapshot, by name and by ID, equals `qemu-img convert -l snapshot.name=NAME` (cat and
/// library reads) and maps like an applied copy; the active layer matches qemu too.
void expect_snapshots_match_qemu(const fs::path& image, const TempDir& dir) {
    auto opened = Image::open(image);
    ASSERT_TRUE(opened) << opened.error().message;
    ASSERT_FALSE(opened->info().snapshots.empty());
    for (const Snapshot& sn : opened->info().snapshots) {
        SCOPED_TRACE("snapshot " + sn.id + " " + sn.name);
        const std::vector<std::byte> expected =
            qemu_convert(q(image), dir, "-l " + shell_quote("snapshot.name=" + sn.name));
        ASSERT_EQ(expected.size(), sn.virtual_size) << "use the resize test for other sizes";
        for (const std::string& value : {sn.name, sn.id}) {
            auto cat = dir / "cat.raw";
            auto r = run(kElsewhere + cli() + " cat --snapshot=" + shell_quote(value) + " " +
                         q(image) + " > " + q(cat));
            EXPECT_EQ(r.exit_code, 0) << r.err;
            EXPECT_TRUE(test::read_file(cat) == expected) << "cat --snapshot=" << value;
            auto view = Image::open(image, at_snapshot(value));
            ASSERT_TRUE(view) << view.error().message;
            expect_reads_equal(*view, expected, 11);
        }
        expect_snapshot_matches_applied_copy(image, sn.name, dir, /*compare_bytes=*/false);
    }
    expect_matches_qemu(image, dir);
}

TEST(Snapshots, TwoSnapshotsBetweenWorkloads) {
    TempDir dir;
    auto image_path = dir / "s.qcow2";
    test::make_image(image_path, "cluster_size=64k", "4M",
                     {"write -P 0x01 0 1M", "write -P 0x02 2M 100k", "write -z 3M 64k"});
    run_ok("qemu-img snapshot -c s1 " + q(image_path));
    qemu_io(image_path, {"write -P 0x11 512k 1M", "discard 2M 64k", "write -z 0 64k",
                         "write -P 0x12 3500k 5k"});
    run_ok("qemu-img snapshot -c s2 " + q(image_path));
    qemu_io(image_path, {"write -P 0x21 100k 50k", "write -z 1M 256k", "discard 3500k 64k",
                         "write -P 0x22 4000k 1k"});
    auto image = Image::open(image_path);
    ASSERT_TRUE(image) << image.error().message;
    ASSERT_EQ(image->info().snapshots.size(), 2u);
    EXPECT_EQ(image->info().snapshots[0].name, "s1");
    EXPECT_EQ(image->info().snapshots[0].id, "1");
    EXPECT_EQ(image->info().snapshots[1].name, "s2");
    EXPECT_EQ(image->info().snapshots[1].id, "2");
    expect_snapshots_match_qemu(image_path, dir);
    expect_snapshot_list_matches_qemu(image_path, 2);
    // qemu agrees on which snapshot an ID names.
    EXPECT_TRUE(qemu_convert(q(image_path), dir, "-l snapshot.id=1") ==
                qemu_convert(q(image_path), dir, "-l snapshot.name=s1"));

    // Distinct contents: s1 predates the 0x11 write, s2 predates the 0x21 write.
    auto s1 = Image::open(image_path, at_snapshot("s1"));
    auto s2 = Image::open(image_path, at_snapshot("2"));
    ASSERT_TRUE(s1 && s2);
    std::byte b{};
    ASSERT_TRUE(s1->read({&b, 1}, 600 * KiB));
    EXPECT_EQ(b, std::byte{0x01});
    ASSERT_TRUE(s2->read({&b, 1}, 600 * KiB));
    EXPECT_EQ(b, std::byte{0x11});
    ASSERT_TRUE(image->read({&b, 1}, 1 * MiB + 1));
    EXPECT_EQ(b, std::byte{0});

    // Unknown snapshot.
    auto unknown = Image::open(image_path, at_snapshot("nope"));
    ASSERT_FALSE(unknown);
    EXPECT_EQ(unknown.error().code, ErrorCode::invalid_argument);
    EXPECT_NE(unknown.error().message.find("nope"), std::string::npos) << unknown.error().message;
    for (const char* command : {"cat", "map --output=json"}) {
        SCOPED_TRACE(command);
        expect_one_line_failure(
            run(kElsewhere + cli() + " " + command + " --snapshot=nope " + q(image_path)), "nope");
    }
}

TEST(Snapshots, SnapshotOlderThanAResize) {
    TempDir dir;
    auto image_path = dir / "r.qcow2";
    test::make_image(image_path, "", "4M", {"write -P 0x31 0 4M"});
    run_ok("qemu-img snapshot -c small " + q(image_path));
    run_ok("qemu-img resize -q " + q(image_path) + " 6M");
    qemu_io(image_path, {"write -P 0x32 5M 64k", "write -P 0x33 1M 64k"});
    run_ok("qemu-img snapshot -c large " + q(image_path));
    run_ok("qemu-img resize -q " + q(image_path) + " 7M");
    qemu_io(image_path, {"write -P 0x34 6500k 64k"});

    auto image = Image::open(image_path);
    ASSERT_TRUE(image) << image.error().message;
    EXPECT_EQ(image->size(), 7 * MiB);
    ASSERT_EQ(image->info().snapshots.size(), 2u);
    EXPECT_EQ(image->info().snapshots[0].virtual_size, 4 * MiB);
    EXPECT_EQ(image->info().snapshots[1].virtual_size, 6 * MiB);
    auto small = Image::open(image_path, at_snapshot("small"));
    ASSERT_TRUE(small) << small.error().message;
    EXPECT_EQ(small->size(), 4 * MiB);
    auto large = Image::open(image_path, at_snapshot("large"));
    ASSERT_TRUE(large) << large.error().message;
    EXPECT_EQ(large->size(), 6 * MiB);

    // qemu-img snapshot -a resizes the copy to the snapshot's size: the oracle.
    std::vector<std::byte> small_bytes =
        expect_snapshot_matches_applied_copy(image_path, "small", dir, true);
    EXPECT_EQ(small_bytes.size(), 4 * MiB);
    std::vector<std::byte> large_bytes =
        expect_snapshot_matches_applied_copy(image_path, "large", dir, true);
    EXPECT_EQ(large_bytes.size(), 6 * MiB);
    // qemu-img convert -l keeps the active size (7 MiB): the snapshot's bytes, then zeros.
    for (const auto& [name, bytes] :
         {std::pair{"small", &small_bytes}, std::pair{"large", &large_bytes}}) {
        auto converted = qemu_convert(q(image_path), dir, std::string("-l snapshot.name=") + name);
        ASSERT_EQ(converted.size(), 7 * MiB);
        EXPECT_EQ(0, std::memcmp(converted.data(), bytes->data(), bytes->size())) << name;
        EXPECT_TRUE(std::all_of(converted.begin() + bytes->size(), converted.end(),
                                [](std::byte b) { return b == std::byte{0}; }))
            << name;
    }
    expect_matches_qemu(image_path, dir);
    expect_snapshot_list_matches_qemu(image_path, 2);
}

TEST(Snapshots, CompressedClusters) {
    TempDir dir;
    auto image_path = dir / "c.qcow2";
    test::make_image(image_path, "cluster_size=64k,compression_type=zstd", "4M",
                     {"write -c -P 0x51 0 64k", "write -c -P 0x52 128k 128k",
                      "write -c -P 0x53 1M 64k", "write -P 0x54 2M 64k"});
    run_ok("qemu-img snapshot -c packed " + q(image_path));
    // Overwrite (copy-on-write) part of a compressed cluster, discard another, add more.
    qemu_io(image_path, {"write -P 0x61 4k 4k", "discard 128k 64k", "write -c -P 0x62 3M 64k",
                         "write -z 1M 64k"});
    run_ok("qemu-img snapshot -c later " + q(image_path));
    qemu_io(image_path, {"write -P 0x63 3M 4k"});
    auto packed = Image::open(image_path, at_snapshot("packed"));
    ASSERT_TRUE(packed) << packed.error().message;
    EXPECT_EQ(count_compressed(*packed), 4);
    auto later = Image::open(image_path, at_snapshot("later"));
    ASSERT_TRUE(later) << later.error().message;
    EXPECT_GE(count_compressed(*later), 2);
    expect_snapshots_match_qemu(image_path, dir);
}

TEST(Snapshots, ExtendedL2) {
    TempDir dir;
    auto image_path = dir / "x.qcow2";
    test::make_image(image_path, "cluster_size=64k,extended_l2=on", "4M",
                     {"write -P 0x71 2k 2k", "write -P 0x72 70k 10k", "write -z 1M 4k",
                      "write -P 0x73 1028k 2k", "write -P 0x74 3M 64k"});
    run_ok("qemu-img snapshot -c first " + q(image_path));
    qemu_io(image_path,
            {"write -P 0x81 6k 2k", "discard 3M 64k", "write -z 72k 2k", "write -P 0x82 2M 3k"});
    run_ok("qemu-img snapshot -c second " + q(image_path));
    qemu_io(image_path, {"write -P 0x83 2k 1k", "write -z 2M 2k"});
    auto first = Image::open(image_path, at_snapshot("first"));
    ASSERT_TRUE(first) << first.error().message;
    EXPECT_TRUE(first->info().extended_l2);
    expect_snapshots_match_qemu(image_path, dir);
    expect_snapshot_list_matches_qemu(image_path, 2);
}

TEST(Snapshots, SnapshotOfAnOverlayReadsThroughTheBacking) {
    TempDir dir;
    auto base = dir / "base.qcow2", top = dir / "top.qcow2";
    test::make_image(base, "", "2M", {"write -P 0x91 0 2M"});
    run_ok(in_dir(dir) + "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 2M");
    qemu_io(top, {"write -P 0x92 64k 64k"});
    run_ok("qemu-img snapshot -c snap " + q(top));
    qemu_io(top, {"write -P 0x93 0 1M"});
    auto image = Image::open(top, at_snapshot("snap"));
    ASSERT_TRUE(image) << image.error().message;
    EXPECT_EQ(image->layers().size(), 2u);
    EXPECT_EQ(extent_at(*image, 0).depth, 1u);
    EXPECT_EQ(extent_at(*image, 64 * KiB).depth, 0u);
    expect_snapshots_match_qemu(top, dir);
}

// ---------------------------------------------------------------------------------------------
// info --backing-chain.

std::vector<std::string> lines_starting_with(const std::string& text,
                                             const std::vector<std::string>& prefixes) {
    std::vector<std::string> lines;
    std::istringstream in(text);
    std::string line;
    while (std::getline(in, line)) {
        for (const std::string& prefix : prefixes) {
            if (line.starts_with(prefix))
                lines.push_back(line);
        }
    }
    return lines;
}

std::vector<std::string> json_values(const std::string& json, const std::string& key) {
    std::regex re("\"" + key + "\": (\"[^\"]*\"|[0-9]+)");
    std::vector<std::string> values;
    for (std::sregex_iterator it(json.begin(), json.end(), re), end; it != end; ++it) {
        values.push_back((*it)[1]);
    }
    return values;
}

TEST(InfoBackingChain, ListsEveryLayer) {
    TempDir dir;
    ThreeLayers c = make_three_layers(dir);
    for (const std::string& image : {c.top.string(), std::string("top.qcow2")}) {
        SCOPED_TRACE(image);
        std::string ours =
            run_ok(in_dir(dir) + cli() + " info --backing-chain " + shell_quote(image));
        std::string theirs =
            run_ok(in_dir(dir) + "qemu-img info --backing-chain " + shell_quote(image));
        const std::vector<std::string> keys = {
            "image: ",        "file format: ",         "virtual size: ", "disk size: ",
            "backing file: ", "backing file format: ", "cluster_size: "};
        // "backing file: NAME (actual path: DIR/NAME)" included, as qemu prints it (issue 25).
        EXPECT_EQ(lines_starting_with(ours, keys), lines_starting_with(theirs, keys));
        EXPECT_EQ(lines_starting_with(ours, {"image: "}).size(), 3u);

        std::string ours_json =
            run_ok(in_dir(dir) + cli() + " info --backing-chain --json " + shell_quote(image));
        std::string theirs_json = run_ok(
            in_dir(dir) + "qemu-img info --backing-chain --output=json " + shell_quote(image));
        ASSERT_TRUE(ours_json.starts_with("[")) << ours_json;
        ASSERT_TRUE(ours_json.ends_with("]\n")) << ours_json;
        for (const char* key : {"filename", "format", "virtual-size", "backing-filename",
                                "backing-filename-format", "cluster-size"}) {
            SCOPED_TRACE(key);
            EXPECT_EQ(json_values(ours_json, key), json_values(theirs_json, key));
        }
        EXPECT_EQ(json_values(ours_json, "filename").size(), 3u);
        // One object per layer at the top level of the array (closing braces in column 0).
        std::size_t objects = 0;
        for (auto at = ours_json.find("\n}"); at != std::string::npos;
             at = ours_json.find("\n}", at + 1)) {
            ++objects;
        }
        EXPECT_EQ(objects, 3u) << ours_json;
    }
    // Without --backing-chain: one object, the top.
    std::string one = run_ok(kElsewhere + cli() + " info --json " + q(c.top));
    EXPECT_TRUE(one.starts_with("{")) << one;
    EXPECT_EQ(json_values(one, "filename"), std::vector<std::string>{"\"" + c.top.string() + "\""});
    // --backing=none with --backing-chain: the top only.
    std::string top_only =
        run_ok(kElsewhere + cli() + " info --backing-chain --backing=none " + q(c.top));
    EXPECT_EQ(lines_starting_with(top_only, {"image: "}).size(), 1u);
}

} // namespace
} // namespace qcowmap

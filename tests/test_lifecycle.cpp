// The image-changing commands (create, resize, bitmap, commit, rebase) against qemu-img's on
// the same inputs: each test builds its images with qemu-img/qemu-io in theirs/, copies the
// directory to ours/ (relative backing names keep working), runs qemu-img in theirs/ and
// qcowmap in ours/, then judges with qemu-img: `check` clean and `compare` identical for every
// image written, and qemu-io's allocation map or qemu-img info where a command changes
// metadata only.
#include "support.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using namespace qcowmap::test;

namespace {

/// theirs/ (qemu-img's) and ours/ (qcowmap's) inside one temporary directory.
struct Pair {
    TempDir dir;
    fs::path theirs = dir / "theirs";
    fs::path ours = dir / "ours";
    Pair() { fs::create_directory(theirs); }
    /// ours/ becomes a copy of theirs/ as it is now.
    void copy() { run_ok("cp -a " + q(theirs) + " " + q(ours)); }
    std::string in_theirs(const std::string& command) const {
        return "cd " + q(theirs) + " && " + command;
    }
    std::string in_ours(const std::string& command) const {
        return "cd " + q(ours) + " && " + command;
    }
};

void expect_check_clean(const fs::path& image) {
    CommandResult check =
        run("cd " + q(image.parent_path()) + " && qemu-img check -f qcow2 " + q(image));
    EXPECT_EQ(check.exit_code, 0) << image << "\n" << check.out << check.err;
    EXPECT_NE(check.out.find("No errors were found on the image."), std::string::npos) << check.out;
}

void expect_identical(const fs::path& a, const fs::path& b) {
    CommandResult compare =
        run("cd " + q(a.parent_path()) + " && qemu-img compare " + q(a) + " " + q(b));
    EXPECT_EQ(compare.exit_code, 0) << a << " vs " << b << "\n" << compare.out << compare.err;
}

/// What the image itself allocates (qemu-io's map: the top layer only).
std::string top_layer_map(const fs::path& image) {
    return run_ok("cd " + q(image.parent_path()) + " && qemu-io -r -f qcow2 -c map " + q(image));
}

/// A field of `qemu-img info --output=json` (the raw text after the key, to the line's end).
std::string info_field(const fs::path& image, const std::string& key) {
    const std::string info =
        run_ok("cd " + q(image.parent_path()) + " && qemu-img info -U --output=json " + q(image));
    const auto at = info.find("\"" + key + "\": ");
    if (at == std::string::npos)
        return "(absent)";
    const auto start = at + key.size() + 4;
    return info.substr(start, info.find('\n', start) - start);
}

/// The persistent bitmaps as `qcowmap bitmaps --json` lists them, one per line, sorted (qemu
/// and qcowmap may order the directory differently).
std::vector<std::string> bitmap_lines(const fs::path& image) {
    std::string json = run_ok(cli() + " bitmaps --json " + q(image));
    std::vector<std::string> lines;
    const std::regex object(R"(\{[^{}]*\})");
    for (auto it = std::sregex_iterator(json.begin(), json.end(), object);
         it != std::sregex_iterator(); ++it)
        lines.push_back(it->str());
    std::sort(lines.begin(), lines.end());
    return lines;
}

/// True when `result` is the one-line error `qcowmap: FILE...` on stderr.
bool one_line_error(const CommandResult& result) {
    return result.err.rfind("qcowmap: ", 0) == 0 && result.err.find('\n') == result.err.size() - 1;
}

/// True when `result` is a usage error: exit 1 (as qemu-img), one line naming --help.
bool usage_error(const CommandResult& result) {
    return result.exit_code == 1 && one_line_error(result) &&
           result.err.rfind("qcowmap: usage: ", 0) == 0 &&
           result.err.find("--help") != std::string::npos;
}

/// True when `result` is an error about an image: exit 1, one line, not a usage error.
bool image_error(const CommandResult& result) {
    return result.exit_code == 1 && one_line_error(result) &&
           result.err.rfind("qcowmap: usage: ", 0) != 0;
}

} // namespace

// ---------------------------------------------------------------------------------------------
// create

TEST(CreateCli, MatchesQemuImgCreate) {
    Pair p;
    p.copy();
    const std::vector<std::pair<std::string, std::string>> cases = {
        {"", "64M"},
        {"-o cluster_size=4k,extended_l2=off", "10M"},
        {"-o cluster_size=64k,extended_l2=on,compression_type=zstd", "1G"},
        {"-o refcount_bits=1,lazy_refcounts=on", "3M"},
        {"-o compat=0.10,cluster_size=512", "1.5M"},
        {"-o data_file=img5.data", "2M"},
        {"-o data_file=img6.data,data_file_raw=on,cluster_size=128k", "3M"},
    };
    int n = 0;
    for (const auto& [options, size] : cases) {
        SCOPED_TRACE(options);
        const std::string name = "img" + std::to_string(n++) + ".qcow2";
        run_ok(p.in_theirs("qemu-img create -q -f qcow2 " + options + " " + name + " " + size));
        run_ok(p.in_ours(cli() + " create -f qcow2 " + options + " " + name + " " + size));
        for (const char* key : {"virtual-size", "cluster-size", "compat", "extended-l2",
                                "compression-type", "refcount-bits", "lazy-refcounts"})
            EXPECT_EQ(info_field(p.ours / name, key), info_field(p.theirs / name, key)) << key;
        EXPECT_EQ(info_field(p.ours / name, "data-file"), info_field(p.theirs / name, "data-file"));
        expect_check_clean(p.ours / name);
        expect_identical(p.ours / name, p.theirs / name);
    }
}

TEST(CreateCli, BackingFileGivesTheSize) {
    Pair p;
    run_ok(p.in_theirs("qemu-img create -q -f qcow2 base.qcow2 5M && "
                       "qemu-io -f qcow2 -c 'write -P 0x5a 1M 64k' base.qcow2 >/dev/null && "
                       "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2"));
    p.copy();
    fs::remove(p.ours / "top.qcow2");
    run_ok(p.in_ours(cli() + " create -b base.qcow2 -F qcow2 top.qcow2"));
    for (const char* key : {"virtual-size", "backing-filename", "backing-filename-format"})
        EXPECT_EQ(info_field(p.ours / "top.qcow2", key), info_field(p.theirs / "top.qcow2", key))
            << key;
    EXPECT_EQ(info_field(p.ours / "top.qcow2", "virtual-size"), "5242880,");
    expect_check_clean(p.ours / "top.qcow2");
    expect_identical(p.ours / "top.qcow2", p.theirs / "top.qcow2");
}

TEST(CreateCli, UsageAndImageErrors) {
    TempDir dir;
    // No size and no backing file; an unknown -o option; -f of a format not written.
    for (const std::string args :
         {"x.qcow2", "-o nosuch=1 x.qcow2 1M", "-f vmdk x.qcow2 1M", "x.qcow2 12abc"}) {
        SCOPED_TRACE(args);
        CommandResult r = run("cd " + q(dir.path()) + " && " + cli() + " create " + args);
        EXPECT_TRUE(usage_error(r)) << r.exit_code << " " << r.err;
        EXPECT_FALSE(fs::exists(dir / "x.qcow2"));
    }
    // A backing file that is not there: an image error, and no image left behind.
    CommandResult r =
        run("cd " + q(dir.path()) + " && " + cli() + " create -b missing.qcow2 -F qcow2 x.qcow2");
    EXPECT_TRUE(image_error(r)) << r.exit_code << " " << r.err;
    EXPECT_FALSE(fs::exists(dir / "x.qcow2"));
}

// ---------------------------------------------------------------------------------------------
// resize

TEST(ResizeCli, GrowAndShrinkAsQemuImg) {
    Pair p;
    run_ok(p.in_theirs("qemu-img create -q -f qcow2 a.qcow2 4M && "
                       "qemu-io -f qcow2 -c 'write -P 0x11 0 1M' a.qcow2 >/dev/null"));
    p.copy();
    // Grow by a relative size, to an absolute one, then shrink an unallocated tail.
    // A negative size as qemu-img takes it: the last argument, no "--" needed.
    for (const std::string args :
         {"a.qcow2 +60M", "a.qcow2 3G", "--shrink a.qcow2 2M", "--shrink a.qcow2 -1M"}) {
        SCOPED_TRACE(args);
        run_ok(p.in_theirs("qemu-img resize -q -f qcow2 " + args));
        CommandResult ours = run(p.in_ours(cli() + " resize " + args));
        EXPECT_EQ(ours.exit_code, 0) << ours.err;
        EXPECT_EQ(ours.out, "Image resized.\n");
        EXPECT_EQ(info_field(p.ours / "a.qcow2", "virtual-size"),
                  info_field(p.theirs / "a.qcow2", "virtual-size"));
        expect_check_clean(p.ours / "a.qcow2");
        expect_identical(p.ours / "a.qcow2", p.theirs / "a.qcow2");
    }
    EXPECT_EQ(info_field(p.ours / "a.qcow2", "virtual-size"), "1048576,");
}

TEST(ResizeCli, RefusesShrinkWithoutFlagOrOverData) {
    TempDir dir;
    run_ok("cd " + q(dir.path()) +
           " && qemu-img create -q -f qcow2 a.qcow2 4M && "
           "qemu-io -f qcow2 -c 'write -P 0x11 3M 64k' a.qcow2 >/dev/null");
    const auto before = read_file(dir / "a.qcow2");
    // Without --shrink: qemu-img's refusal, exit 1.
    CommandResult r = run(cli() + " resize " + q(dir / "a.qcow2") + " 2M");
    EXPECT_TRUE(image_error(r)) << r.exit_code << " " << r.err;
    EXPECT_NE(r.err.find("--shrink"), std::string::npos) << r.err;
    // With --shrink, data at 3M lies past the new end: refused, nothing changed.
    r = run(cli() + " resize --shrink " + q(dir / "a.qcow2") + " 2M");
    EXPECT_TRUE(image_error(r)) << r.exit_code << " " << r.err;
    EXPECT_EQ(info_field(dir / "a.qcow2", "virtual-size"), "4194304,");
    expect_check_clean(dir / "a.qcow2");
    // A size that does not parse, and a missing SIZE: usage errors.
    EXPECT_TRUE(usage_error(run(cli() + " resize " + q(dir / "a.qcow2") + " 2Q")));
    EXPECT_TRUE(usage_error(run(cli() + " resize " + q(dir / "a.qcow2"))));
    EXPECT_EQ(read_file(dir / "a.qcow2").size(), before.size());
}

// ---------------------------------------------------------------------------------------------
// bitmap

TEST(BitmapCli, EditsMatchQemuImgBitmap) {
    Pair p;
    run_ok(p.in_theirs("qemu-img create -q -f qcow2 a.qcow2 8M && "
                       "qemu-io -f qcow2 -c 'write -P 1 0 1M' a.qcow2 >/dev/null && "
                       "qemu-img create -q -f qcow2 other.qcow2 8M && "
                       "qemu-img bitmap --add -g 128k other.qcow2 o && "
                       "qemu-io -f qcow2 -c 'write 6M 100k' other.qcow2 >/dev/null"));
    p.copy();
    // Each step in both directories; qemu-io writes between steps set bits of enabled bitmaps.
    const std::vector<std::string> steps = {
        "bitmap --add -g 64k a.qcow2 a", "io write 2M 128k",
        "bitmap --add a.qcow2 b",        "io write 3M 4k",
        "bitmap --disable a.qcow2 b",    "io write 5M 64k",
        "bitmap --merge a a.qcow2 b",    "bitmap --merge o -b other.qcow2 -F qcow2 a.qcow2 b",
        "bitmap --clear a.qcow2 a",      "bitmap --add -g 1M --disable a.qcow2 c",
        "bitmap --enable a.qcow2 c",     "io write 7M 512",
        "bitmap --add a.qcow2 d",        "bitmap --remove a.qcow2 d",
    };
    for (const std::string& step : steps) {
        SCOPED_TRACE(step);
        if (step.rfind("io ", 0) == 0) {
            const std::string io =
                "qemu-io -f qcow2 -c '" + step.substr(3) + "' a.qcow2 >/dev/null";
            run_ok(p.in_theirs(io));
            run_ok(p.in_ours(io));
            continue;
        }
        run_ok(p.in_theirs("qemu-img " + step));
        CommandResult ours = run(p.in_ours(cli() + " " + step));
        ASSERT_EQ(ours.exit_code, 0) << ours.err;
        EXPECT_EQ(bitmap_lines(p.ours / "a.qcow2"), bitmap_lines(p.theirs / "a.qcow2"));
        expect_check_clean(p.ours / "a.qcow2");
    }
    // Four bitmaps at the end, with dirty bytes: a none, b and c some.
    const auto lines = bitmap_lines(p.ours / "a.qcow2");
    ASSERT_EQ(lines.size(), 3u);
    expect_identical(p.ours / "a.qcow2", p.theirs / "a.qcow2");
    // qemu reads our directory: qemu-img info lists the same names.
    EXPECT_EQ(run_ok(p.in_ours("qemu-img info a.qcow2 | grep -c 'name: '")), "3\n");
}

TEST(BitmapCli, Errors) {
    TempDir dir;
    run_ok("cd " + q(dir.path()) + " && qemu-img create -q -f qcow2 a.qcow2 1M && " +
           "qemu-img bitmap --add a.qcow2 x && qemu-img create -q -f qcow2 -o compat=0.10 " +
           "v2.qcow2 1M");
    const auto before = read_file(dir / "a.qcow2");
    // Image errors (exit 1, one line, file unchanged): missing bitmap, existing name, bad
    // granularity, a version 2 image.
    for (const std::string args :
         {"--remove a.qcow2 nosuch", "--enable a.qcow2 nosuch", "--merge nosuch a.qcow2 x",
          "--add a.qcow2 x", "--add -g 1000 a.qcow2 y", "--add v2.qcow2 y"}) {
        SCOPED_TRACE(args);
        CommandResult r = run("cd " + q(dir.path()) + " && " + cli() + " bitmap " + args);
        EXPECT_TRUE(image_error(r)) << r.exit_code << " " << r.err;
    }
    EXPECT_EQ(read_file(dir / "a.qcow2"), before);
    // Usage errors (exit 1 as qemu-img, worded as usage): no operation, -g without --add, -b
    // without --merge, no NAME.
    for (const std::string args : {"a.qcow2 x", "--remove -g 64k a.qcow2 x",
                                   "--remove -b a.qcow2 a.qcow2 x", "--add a.qcow2"}) {
        SCOPED_TRACE(args);
        CommandResult r = run("cd " + q(dir.path()) + " && " + cli() + " bitmap " + args);
        EXPECT_TRUE(usage_error(r)) << r.exit_code << " " << r.err;
    }
    EXPECT_EQ(read_file(dir / "a.qcow2"), before);
}

// ---------------------------------------------------------------------------------------------
// commit

namespace {

/// base.qcow2 <- top.qcow2, top with data over base data, a zeroed range, a compressed cluster
/// and an unaligned write.
void make_commit_chain(const Pair& p, const std::string& base_options) {
    run_ok(p.in_theirs(
        "qemu-img create -q -f qcow2 " + base_options +
        " base.qcow2 4M && "
        "qemu-io -f qcow2 -c 'write -P 0xaa 0 2M' base.qcow2 >/dev/null && "
        "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 6M && "
        "qemu-io -f qcow2 -c 'write -P 0xbb 64k 128k' -c 'write -z 1M 256k' "
        "-c 'write -c -P 0xcc 3M 64k' -c 'write -P 0xdd 5M 1000' top.qcow2 >/dev/null"));
}

} // namespace

TEST(CommitCli, MatchesQemuImgCommit) {
    for (const std::string base_options : {"", "-o cluster_size=16k,extended_l2=on"}) {
        SCOPED_TRACE(base_options);
        Pair p;
        make_commit_chain(p, base_options);
        p.copy();
        run_ok(p.in_ours("qemu-img convert -O raw top.qcow2 expected.raw"));
        run_ok(p.in_theirs("qemu-img commit -q top.qcow2"));
        CommandResult ours = run(p.in_ours(cli() + " commit top.qcow2"));
        ASSERT_EQ(ours.exit_code, 0) << ours.err;
        EXPECT_EQ(ours.out, "Image committed.\n");
        for (const char* name : {"base.qcow2", "top.qcow2"}) {
            SCOPED_TRACE(name);
            expect_check_clean(p.ours / name);
            expect_identical(p.ours / name, p.theirs / name);
            EXPECT_EQ(info_field(p.ours / name, "virtual-size"),
                      info_field(p.theirs / name, "virtual-size"));
        }
        // The base holds the overlay's content; the overlay is empty, as qemu-img leaves it.
        run_ok(p.in_ours("qemu-img compare -q -f raw -F qcow2 expected.raw base.qcow2"));
        EXPECT_EQ(top_layer_map(p.ours / "top.qcow2"), top_layer_map(p.theirs / "top.qcow2"));
    }
}

TEST(CommitCli, CacheModeNoneMatchesQemuImgCommit) {
    // -t none: the base's data written past the page cache (O_DIRECT), by both tools.
    Pair p;
    make_commit_chain(p, "");
    p.copy();
    run_ok(p.in_theirs("qemu-img commit -q -t none top.qcow2"));
    CommandResult ours = run(p.in_ours(cli() + " commit -q -t none top.qcow2"));
    ASSERT_EQ(ours.exit_code, 0) << ours.err;
    for (const char* name : {"base.qcow2", "top.qcow2"}) {
        SCOPED_TRACE(name);
        expect_check_clean(p.ours / name);
        expect_identical(p.ours / name, p.theirs / name);
    }
    EXPECT_EQ(top_layer_map(p.ours / "top.qcow2"), top_layer_map(p.theirs / "top.qcow2"));
    CommandResult bad = run(p.in_ours(cli() + " commit -t unsafe top.qcow2"));
    EXPECT_TRUE(usage_error(bad)) << bad.exit_code << " " << bad.err;
}

TEST(CommitCli, BaseWithCompressedClustersSnapshotAndBitmap) {
    // The overlay writes into a compressed cluster of the base (partly), over clusters an
    // internal snapshot of the base shares, and the base has an enabled bitmap that the commit
    // must dirty.
    Pair p;
    run_ok(p.in_theirs("qemu-img create -q -f qcow2 base.qcow2 4M && "
                       "qemu-io -f qcow2 -c 'write -c -P 0x31 0 64k' -c 'write -c -P 0x32 64k 64k' "
                       "-c 'write -P 0x33 1M 1M' base.qcow2 >/dev/null && "
                       "qemu-img snapshot -c snap base.qcow2 && "
                       "qemu-img bitmap --add -g 64k base.qcow2 inc && "
                       "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 && "
                       "qemu-io -f qcow2 -c 'write -P 0x44 4k 8k' -c 'write -P 0x45 1M 4k' "
                       "-c 'write -z 1536k 64k' top.qcow2 >/dev/null"));
    p.copy();
    run_ok(p.in_ours("qemu-img convert -O raw top.qcow2 expected.raw && "
                     "qemu-img convert -l snapshot.name=snap -O raw base.qcow2 snap.raw"));
    run_ok(p.in_theirs("qemu-img commit -q top.qcow2"));
    ASSERT_EQ(run(p.in_ours(cli() + " commit -q top.qcow2")).exit_code, 0);
    for (const char* name : {"base.qcow2", "top.qcow2"}) {
        SCOPED_TRACE(name);
        expect_check_clean(p.ours / name);
        expect_identical(p.ours / name, p.theirs / name);
        EXPECT_EQ(top_layer_map(p.ours / name), top_layer_map(p.theirs / name));
    }
    run_ok(p.in_ours("qemu-img compare -q -f raw -F qcow2 expected.raw base.qcow2"));
    // The snapshot still reads what it read.
    run_ok(p.in_ours("qemu-img convert -l snapshot.name=snap -O raw base.qcow2 snap-after.raw && "
                     "cmp snap.raw snap-after.raw"));
    // The base's bitmap has the committed ranges, as qemu-img's commit leaves it.
    const auto bitmaps = bitmap_lines(p.ours / "base.qcow2");
    EXPECT_EQ(bitmaps, bitmap_lines(p.theirs / "base.qcow2"));
    ASSERT_EQ(bitmaps.size(), 1u);
    EXPECT_EQ(bitmaps[0].find("\"dirty-bytes\": 0 "), std::string::npos) << bitmaps[0];
}

TEST(CommitCli, KeepAndDeeperBase) {
    Pair p;
    make_commit_chain(p, "");
    run_ok(p.in_theirs("qemu-img create -q -f qcow2 -b top.qcow2 -F qcow2 third.qcow2 && "
                       "qemu-io -f qcow2 -c 'write -P 0xee 2M 64k' third.qcow2 >/dev/null"));
    p.copy();
    // -d: the overlay keeps its data.
    run_ok(p.in_theirs("qemu-img commit -q -d top.qcow2"));
    ASSERT_EQ(run(p.in_ours(cli() + " commit -q -d top.qcow2")).exit_code, 0);
    EXPECT_EQ(top_layer_map(p.ours / "top.qcow2"), top_layer_map(p.theirs / "top.qcow2"));
    EXPECT_NE(top_layer_map(p.ours / "top.qcow2").find("allocated at offset 64 KiB"),
              std::string::npos);
    // -b: two layers into the bottom one (implies -d).
    run_ok(p.in_theirs("qemu-img commit -q -b base.qcow2 third.qcow2"));
    ASSERT_EQ(run(p.in_ours(cli() + " commit -q -b base.qcow2 third.qcow2")).exit_code, 0);
    for (const char* name : {"base.qcow2", "top.qcow2", "third.qcow2"}) {
        SCOPED_TRACE(name);
        expect_check_clean(p.ours / name);
        expect_identical(p.ours / name, p.theirs / name);
        EXPECT_EQ(top_layer_map(p.ours / name), top_layer_map(p.theirs / name));
    }
}

TEST(CommitCli, Errors) {
    TempDir dir;
    run_ok("cd " + q(dir.path()) + " && qemu-img create -q -f qcow2 a.qcow2 1M && " +
           "qemu-img create -q -f qcow2 b.qcow2 1M");
    // No backing file; a -b that is not in the chain.
    for (const std::string args : {"a.qcow2", "-b b.qcow2 a.qcow2"}) {
        SCOPED_TRACE(args);
        CommandResult r = run("cd " + q(dir.path()) + " && " + cli() + " commit " + args);
        EXPECT_TRUE(image_error(r)) << r.exit_code << " " << r.err;
    }
    CommandResult r = run(cli() + " commit");
    EXPECT_TRUE(usage_error(r)) << r.exit_code << " " << r.err;
}

// ---------------------------------------------------------------------------------------------
// rebase

namespace {

/// old.qcow2 and new.qcow2 differing in places (one only in new, one only in old, one in
/// both with other bytes, one the same), top.qcow2 over old with data of its own.
void make_rebase_chain(const Pair& p, const std::string& top_options) {
    run_ok(p.in_theirs(
        "qemu-img create -q -f qcow2 old.qcow2 4M && "
        "qemu-io -f qcow2 -c 'write -P 1 0 512k' -c 'write -P 2 1M 256k' "
        "-c 'write -P 7 3M 64k' old.qcow2 >/dev/null && "
        "qemu-img create -q -f qcow2 new.qcow2 4M && "
        "qemu-io -f qcow2 -c 'write -P 1 0 512k' -c 'write -P 3 1M 64k' "
        "-c 'write -P 4 2M 128k' new.qcow2 >/dev/null && "
        "qemu-img create -q -f qcow2 " +
        top_options +
        " -b old.qcow2 -F qcow2 top.qcow2 && "
        "qemu-io -f qcow2 -c 'write -P 9 1M 32k' -c 'write -P 8 3M 4k' top.qcow2 >/dev/null"));
}

} // namespace

TEST(RebaseCli, SafeModeMatchesQemuImgRebase) {
    for (const std::string top_options : {"", "-o cluster_size=32k,extended_l2=on"}) {
        SCOPED_TRACE(top_options);
        Pair p;
        make_rebase_chain(p, top_options);
        p.copy();
        run_ok(p.in_ours("qemu-img convert -O raw top.qcow2 before.raw"));
        run_ok(p.in_theirs("qemu-img rebase -q -b new.qcow2 -F qcow2 top.qcow2"));
        CommandResult ours = run(p.in_ours(cli() + " rebase -b new.qcow2 -F qcow2 top.qcow2"));
        ASSERT_EQ(ours.exit_code, 0) << ours.err;
        expect_check_clean(p.ours / "top.qcow2");
        expect_identical(p.ours / "top.qcow2", p.theirs / "top.qcow2");
        // The content did not change, only where it comes from.
        run_ok(p.in_ours("qemu-img compare -q -f raw -F qcow2 before.raw top.qcow2"));
        for (const char* key : {"backing-filename", "backing-filename-format"})
            EXPECT_EQ(info_field(p.ours / "top.qcow2", key),
                      info_field(p.theirs / "top.qcow2", key));
        EXPECT_EQ(info_field(p.ours / "top.qcow2", "backing-filename"), "\"new.qcow2\",");
        // The same ranges copied as qemu-img copies them.
        EXPECT_EQ(top_layer_map(p.ours / "top.qcow2"), top_layer_map(p.theirs / "top.qcow2"));
    }
}

TEST(RebaseCli, CacheModeNoneMatchesQemuImgRebase) {
    Pair p;
    make_rebase_chain(p, "");
    p.copy();
    run_ok(p.in_theirs("qemu-img rebase -q -t none -b new.qcow2 -F qcow2 top.qcow2"));
    CommandResult ours = run(p.in_ours(cli() + " rebase -t none -b new.qcow2 -F qcow2 top.qcow2"));
    ASSERT_EQ(ours.exit_code, 0) << ours.err;
    expect_check_clean(p.ours / "top.qcow2");
    expect_identical(p.ours / "top.qcow2", p.theirs / "top.qcow2");
    EXPECT_EQ(top_layer_map(p.ours / "top.qcow2"), top_layer_map(p.theirs / "top.qcow2"));
}

TEST(RebaseCli, FromADeeperCompressedChainOntoRaw) {
    // Old chain: old0 (compressed clusters) <- old1 <- top; new backing: a raw file sharing
    // part of the content.
    Pair p;
    run_ok(
        p.in_theirs("qemu-img create -q -f qcow2 old0.qcow2 2M && "
                    "qemu-io -f qcow2 -c 'write -c -P 0x51 0 64k' -c 'write -c -P 0x52 512k 64k' "
                    "old0.qcow2 >/dev/null && "
                    "qemu-img create -q -f qcow2 -b old0.qcow2 -F qcow2 old1.qcow2 && "
                    "qemu-io -f qcow2 -c 'write -P 0x53 1M 128k' old1.qcow2 >/dev/null && "
                    "qemu-img create -q -f qcow2 -b old1.qcow2 -F qcow2 top.qcow2 && "
                    "qemu-io -f qcow2 -c 'write -P 0x54 1056k 8k' top.qcow2 >/dev/null && "
                    "qemu-img convert -O raw old0.qcow2 new.raw && "
                    "qemu-io -f raw -c 'write -P 0x55 1536k 64k' new.raw >/dev/null"));
    p.copy();
    run_ok(p.in_ours("qemu-img convert -O raw top.qcow2 before.raw"));
    run_ok(p.in_theirs("qemu-img rebase -q -b new.raw -F raw top.qcow2"));
    ASSERT_EQ(run(p.in_ours(cli() + " rebase -b new.raw -F raw top.qcow2")).exit_code, 0);
    expect_check_clean(p.ours / "top.qcow2");
    expect_identical(p.ours / "top.qcow2", p.theirs / "top.qcow2");
    run_ok(p.in_ours("qemu-img compare -q -f raw -F qcow2 before.raw top.qcow2"));
    EXPECT_EQ(info_field(p.ours / "top.qcow2", "backing-filename-format"), "\"raw\",");
    EXPECT_EQ(top_layer_map(p.ours / "top.qcow2"), top_layer_map(p.theirs / "top.qcow2"));
}

TEST(RebaseCli, UnsafeAndFlatten) {
    Pair p;
    make_rebase_chain(p, "");
    p.copy();
    // -u: the reference only; the allocation stays.
    const std::string map_before = top_layer_map(p.ours / "top.qcow2");
    run_ok(p.in_theirs("qemu-img rebase -u -b new.qcow2 -F qcow2 top.qcow2"));
    ASSERT_EQ(run(p.in_ours(cli() + " rebase -u -b new.qcow2 -F qcow2 top.qcow2")).exit_code, 0);
    EXPECT_EQ(top_layer_map(p.ours / "top.qcow2"), map_before);
    EXPECT_EQ(info_field(p.ours / "top.qcow2", "backing-filename"), "\"new.qcow2\",");
    expect_check_clean(p.ours / "top.qcow2");
    expect_identical(p.ours / "top.qcow2", p.theirs / "top.qcow2");
    // -b "": flattened, reading as before.
    run_ok(p.in_ours("qemu-img convert -O raw top.qcow2 before.raw"));
    run_ok(p.in_theirs("qemu-img rebase -q -b '' top.qcow2"));
    ASSERT_EQ(run(p.in_ours(cli() + " rebase -b '' top.qcow2")).exit_code, 0);
    EXPECT_EQ(info_field(p.ours / "top.qcow2", "backing-filename"), "(absent)");
    expect_check_clean(p.ours / "top.qcow2");
    expect_identical(p.ours / "top.qcow2", p.theirs / "top.qcow2");
    run_ok(p.in_ours("qemu-img compare -q -f raw -F qcow2 before.raw top.qcow2"));
}

TEST(RebaseCli, Errors) {
    TempDir dir;
    run_ok("cd " + q(dir.path()) + " && qemu-img create -q -f qcow2 a.qcow2 1M");
    const auto before = read_file(dir / "a.qcow2");
    // Safe mode needs the new backing file to open.
    CommandResult r =
        run("cd " + q(dir.path()) + " && " + cli() + " rebase -b missing.qcow2 a.qcow2");
    EXPECT_TRUE(image_error(r)) << r.exit_code << " " << r.err;
    EXPECT_EQ(read_file(dir / "a.qcow2"), before);
    // -b is required.
    r = run("cd " + q(dir.path()) + " && " + cli() + " rebase a.qcow2");
    EXPECT_TRUE(usage_error(r)) << r.exit_code << " " << r.err;
}

// ---------------------------------------------------------------------------------------------
// convert --bitmap onto an existing qcow2 copy (in place)

namespace {

/// vm.qcow2 (compressed and plain clusters, a 4k-granularity bitmap `b` recording from the
/// copy on) and copy.qcow2, its full copy taken at the checkpoint (with `copy_options`), then
/// the VM's writes: data over plain and compressed clusters, partial clusters, zeros, a
/// discard, and a write past the data.
void make_incremental_pair(const fs::path& dir, const std::string& copy_options) {
    run_ok("cd " + q(dir) + " && qemu-img create -q -f qcow2 seed.qcow2 16M && " +
           "qemu-io -f qcow2 -c 'write -P 0x11 0 4M' -c 'write -P 0x12 8M 2M' seed.qcow2 " +
           ">/dev/null && qemu-img convert -c -O qcow2 seed.qcow2 vm.qcow2 && " +
           "qemu-io -f qcow2 -c 'write -P 0x13 4M 1M' vm.qcow2 >/dev/null && " +
           "qemu-img bitmap --add -g 4k vm.qcow2 b && " + "qemu-img convert -O qcow2 " +
           copy_options + " vm.qcow2 copy.qcow2 && " +
           "qemu-io -f qcow2 -c 'write -P 0x21 64k 4k' -c 'write -P 0x22 4M 12k' " +
           "-c 'write -z 1M 1M' -c 'discard 8M 128k' -c 'write -P 0x23 15M 8k' " +
           "-c 'write -P 0x24 9M 512' vm.qcow2 >/dev/null && " +
           "qemu-img bitmap --disable vm.qcow2 b");
}

} // namespace

TEST(IncrementalCli, InPlaceIntoQcow2CopyMatchesTheSource) {
    for (const std::string copy_options :
         {"", "-c", "-o cluster_size=16k,extended_l2=on", "-o compat=0.10"}) {
        SCOPED_TRACE(copy_options);
        TempDir dir;
        make_incremental_pair(dir.path(), copy_options);
        CommandResult ours =
            run("cd " + q(dir.path()) + " && " + cli() + " convert --bitmap=b vm.qcow2 copy.qcow2");
        ASSERT_EQ(ours.exit_code, 0) << ours.out << ours.err;
        EXPECT_EQ(ours.err, "");
        expect_check_clean(dir / "copy.qcow2");
        expect_identical(dir / "vm.qcow2", dir / "copy.qcow2");
        EXPECT_EQ(info_field(dir / "copy.qcow2", "virtual-size"),
                  info_field(dir / "vm.qcow2", "virtual-size"));
    }
}

TEST(IncrementalCli, TouchesOnlyTheDirtyRanges) {
    TempDir dir;
    make_incremental_pair(dir.path(), "");
    // The copy changed out of band in two clean places: an update that wrote more than the
    // dirty ranges would overwrite them with the source's bytes.
    run_ok("cd " + q(dir.path()) +
           " && qemu-io -f qcow2 -c 'write -P 0x5a 2M 64k' -c 'write -P 0x5b 12M 4k' copy.qcow2" +
           " >/dev/null");
    CommandResult ours =
        run("cd " + q(dir.path()) + " && " + cli() + " convert -p --bitmap=b vm.qcow2 copy.qcow2");
    ASSERT_EQ(ours.exit_code, 0) << ours.err;
    expect_check_clean(dir / "copy.qcow2");
    const std::string reads =
        run_ok("cd " + q(dir.path()) +
               " && qemu-io -r -f qcow2 -c 'read -P 0x5a 2M 64k' -c 'read -P 0x5b 12M 4k' " +
               "-c 'read -P 0x21 64k 4k' -c 'read -P 0x22 4M 12k' -c 'read -P 0 1M 1M' " +
               "-c 'read -P 0 8M 128k' -c 'read -P 0x23 15M 8k' -c 'read -P 0x24 9M 512' " +
               "-c 'read -P 0x12 9437696 512' copy.qcow2");
    EXPECT_EQ(reads.find("Pattern verification failed"), std::string::npos) << reads;
    EXPECT_EQ(std::count(reads.begin(), reads.end(), '\n'), 18) << reads; // 2 lines per read
    // The source and the copy differ exactly at the out-of-band writes.
    CommandResult compare = run("cd " + q(dir.path()) + " && qemu-img compare vm.qcow2 copy.qcow2");
    EXPECT_EQ(compare.exit_code, 1) << compare.out;
    EXPECT_NE(compare.out.find("offset 2097152"), std::string::npos) << compare.out;
}

TEST(IncrementalCli, CopyOfAnotherSizeAndUsageErrors) {
    TempDir dir;
    make_incremental_pair(dir.path(), "");
    run_ok("cd " + q(dir.path()) + " && qemu-img create -q -f qcow2 small.qcow2 8M");
    const std::string small_bytes = run_ok("cd " + q(dir.path()) + " && sha256sum small.qcow2");
    // Errors of the copy being written exit 3 (convert's output errors), as for a raw copy.
    CommandResult other =
        run("cd " + q(dir.path()) + " && " + cli() + " convert --bitmap=b vm.qcow2 small.qcow2");
    EXPECT_EQ(other.exit_code, 3) << other.err;
    EXPECT_TRUE(one_line_error(other)) << other.err;
    EXPECT_EQ(other.err.rfind("qcowmap: small.qcow2: ", 0), 0u) << other.err;
    EXPECT_NE(other.err.find("same size"), std::string::npos) << other.err;
    EXPECT_EQ(run_ok("cd " + q(dir.path()) + " && sha256sum small.qcow2"), small_bytes);

    CommandResult missing =
        run("cd " + q(dir.path()) + " && " + cli() + " convert --bitmap=nope vm.qcow2 copy.qcow2");
    EXPECT_TRUE(image_error(missing)) << missing.err;
    EXPECT_EQ(missing.err.rfind("qcowmap: vm.qcow2: ", 0), 0u) << missing.err;

    // -O qcow2 options make a new image; without -B they are refused, naming the in-place way.
    CommandResult compressed = run("cd " + q(dir.path()) + " && " + cli() +
                                   " convert -O qcow2 -c --bitmap=b vm.qcow2 new.qcow2");
    EXPECT_TRUE(usage_error(compressed)) << compressed.err;
    EXPECT_NE(compressed.err.find("in place"), std::string::npos) << compressed.err;
    EXPECT_FALSE(fs::exists(dir / "new.qcow2"));

    // A copy a writer holds (qemu-io, open until its input ends) is refused, untouched.
    CommandResult held;
    std::string copy_bytes;
    {
        QemuIoHolder qemu_io(dir / "copy.qcow2");
        ASSERT_TRUE(qemu_io.held()) << "qemu-io never took its lock";
        copy_bytes = run_ok("cd " + q(dir.path()) + " && sha256sum copy.qcow2");
        held =
            run("cd " + q(dir.path()) + " && " + cli() + " convert --bitmap=b vm.qcow2 copy.qcow2");
        EXPECT_EQ(run_ok("cd " + q(dir.path()) + " && sha256sum copy.qcow2"), copy_bytes);
    }
    EXPECT_EQ(held.exit_code, 3) << held.err;
    EXPECT_TRUE(one_line_error(held)) << held.err;
    EXPECT_EQ(held.err.rfind("qcowmap: copy.qcow2: ", 0), 0u) << held.err;
    EXPECT_NE(held.err.find("lock"), std::string::npos) << held.err;
    EXPECT_EQ(held.err.find("-U"), std::string::npos) << held.err; // a writer cannot share
}

// ---------------------------------------------------------------------------------------------
// README: the whole backup lifecycle without qemu-img

TEST(LifecycleReadme, BackupWorkflowWithoutQemuImg) {
    // The README's workflow, extracted and run as written (the built qcowmap on PATH); qemu-img
    // appears only here, as the judge.
    const std::string script = readme_script("lifecycle-example");
    ASSERT_FALSE(script.empty()) << "README's lifecycle-example markers";
    EXPECT_EQ(script.find("qemu-img"), std::string::npos) << script;
    TempDir dir;
    CommandResult r = run_script_in(dir.path(), script);
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
    EXPECT_EQ(r.out, "restored.raw and mirror.qcow2 hold the disk\n") << r.err;
    EXPECT_FALSE(fs::exists(dir / "inc1.qcow2"));
    for (const char* name :
         {"vm.qcow2", "full.qcow2", "inc2.qcow2", "inc3.qcow2", "mirror.qcow2"}) {
        SCOPED_TRACE(name);
        expect_check_clean(dir / name);
    }
    expect_identical(dir / "vm.qcow2", dir / "inc3.qcow2");
    expect_identical(dir / "vm.qcow2", dir / "mirror.qcow2");
    run_ok("cd " + q(dir.path()) + " && qemu-img compare -q -f raw -F qcow2 restored.raw vm.qcow2");
    // Each remaining point restores its period: the disk with the later periods' writes undone
    // (period i wrote 0x2i at iM, zeros at (i+3)M for 1M, 0x3i at (i*10)M; before, those ranges
    // held 0x11, 0x11 and zeros).
    run_ok("cd " + q(dir.path()) + " && qemu-img convert -O qcow2 vm.qcow2 period2.qcow2 && " +
           "qemu-io -f qcow2 -c 'write -P 0x11 3M 64k' -c 'write -P 0x11 6M 1M' " +
           "-c 'write -z 30M 4k' period2.qcow2 >/dev/null && " +
           "qemu-img convert -O qcow2 period2.qcow2 period1.qcow2 && " +
           "qemu-io -f qcow2 -c 'write -P 0x11 2M 64k' -c 'write -P 0x11 5M 1M' " +
           "-c 'write -z 20M 4k' period1.qcow2 >/dev/null");
    expect_identical(dir / "period2.qcow2", dir / "inc2.qcow2");
    expect_identical(dir / "period1.qcow2", dir / "full.qcow2");
    EXPECT_EQ(info_field(dir / "inc2.qcow2", "backing-filename"), "\"full.qcow2\",");
}

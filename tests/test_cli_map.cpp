// Human `qcowmap map` against `qemu-img map`, line for line: the File column names
// the file that holds the bytes (a backing layer, raw or qcow2, or an external data file) and
// the offset is relative to that file. Also `map --bitmap` (library map_dirty) in both forms.
#include "support.hpp"

#include <gtest/gtest.h>

#include <filesystem>
#include <string>
#include <vector>

namespace qcowmap {
namespace {

using test::cli;
using test::q;

using test::CommandResult;
using test::run;
using test::run_ok;
using test::shell_quote;
using test::TempDir;

std::string in_dir(const std::filesystem::path& dir) {
    return "cd " + q(dir) + " && ";
}

/// Runs `qcowmap map ARGS` and `qemu-img map ARGS` in `dir` and expects the same output.
void expect_same_map(const std::filesystem::path& dir, const std::string& args) {
    SCOPED_TRACE(args);
    CommandResult ours = run(in_dir(dir) + cli() + " map " + args);
    CommandResult theirs = run(in_dir(dir) + "qemu-img map " + args);
    ASSERT_EQ(theirs.exit_code, 0) << theirs.err;
    EXPECT_EQ(ours.exit_code, 0) << ours.err;
    EXPECT_EQ(ours.out, theirs.out);
}

/// base.raw <- mid.qcow2 <- sub/top.qcow2 (relative names, the top in a subdirectory), each
/// layer holding some of the data, with zero clusters hiding data below.
void make_chain(const std::filesystem::path& dir) {
    run_ok(in_dir(dir) + "qemu-img create -q -f raw base.raw 4M");
    run_ok(in_dir(dir) + "qemu-io -f raw -c 'write -P 1 0 64k' -c 'write -P 2 1M 128k' "
                         "-c 'write -P 3 3584k 512k' base.raw");
    run_ok(in_dir(dir) + "qemu-img create -q -f qcow2 -b base.raw -F raw mid.qcow2");
    run_ok(in_dir(dir) + "qemu-io -f qcow2 -c 'write -P 4 64k 64k' -c 'write -P 5 2M 192k' "
                         "-c 'write -z 1M 64k' mid.qcow2");
    std::filesystem::create_directory(dir / "sub");
    run_ok(in_dir(dir) + "qemu-img create -q -f qcow2 -b ../mid.qcow2 -F qcow2 sub/top.qcow2");
    run_ok(in_dir(dir) + "qemu-io -f qcow2 -c 'write -P 6 3M 64k' -c 'write -P 7 2112k 64k' "
                         "-c 'write -z 3648k 64k' sub/top.qcow2");
}

TEST(CliMapHuman, ChainOfRawAndQcow2LayersMatchesQemuImg) {
    TempDir dir;
    make_chain(dir.path());
    // The File column names the layer that holds each range, as qemu joins the names.
    CommandResult ours = run(in_dir(dir.path()) + cli() + " map sub/top.qcow2");
    EXPECT_NE(ours.out.find("sub/../base.raw\n"), std::string::npos) << ours.out;
    EXPECT_NE(ours.out.find("sub/../mid.qcow2\n"), std::string::npos) << ours.out;
    EXPECT_NE(ours.out.find("sub/top.qcow2\n"), std::string::npos) << ours.out;
    expect_same_map(dir.path(), "sub/top.qcow2");
    expect_same_map(dir.path(), "mid.qcow2");
    expect_same_map(dir.path(), "--start-offset=1M --max-length=2M sub/top.qcow2");
    expect_same_map(dir.path(), q(dir / "sub/top.qcow2")); // absolute: names joined to it
    expect_same_map(dir / "sub", "top.qcow2");
    // Three qcow2 layers with an absolute backing name.
    run_ok(in_dir(dir.path()) + "qemu-img create -q -f qcow2 -b " + q(dir / "sub/top.qcow2") +
           " -F qcow2 over.qcow2");
    run_ok(in_dir(dir.path()) + "qemu-io -f qcow2 -c 'write -P 8 0 32k' over.qcow2");
    expect_same_map(dir.path(), "over.qcow2");
}

TEST(CliMapHuman, DataFileImagesMatchQemuImg) {
    TempDir dir;
    // qemu 7.2 resolves a relative data file name against the current directory, qcowmap
    // against the image's: both agree when run in the image's directory.
    for (const std::string options : {"data_file=vm.data", "data_file=raw.data,data_file_raw=on"}) {
        const std::string name =
            options.find("raw=on") != std::string::npos ? "raw.qcow2" : "vm.qcow2";
        run_ok(in_dir(dir.path()) + "qemu-img create -q -f qcow2 -o " + options + " " + name +
               " 4M");
        run_ok(in_dir(dir.path()) +
               "qemu-io -f qcow2 -c 'write -P 7 64k 64k' -c 'write -P 8 1M "
               "192k' -c 'write -z 2M 64k' " +
               name);
        CommandResult ours = run(in_dir(dir.path()) + cli() + " map " + name);
        EXPECT_NE(ours.out.find(".data\n"), std::string::npos) << ours.out;
        expect_same_map(dir.path(), name);
        expect_same_map(dir.path(), "--start-offset=1088k " + name);
    }
    // A data file over a backing file: each range names its own file.
    run_ok(in_dir(dir.path()) + "qemu-img create -q -f qcow2 -o data_file=top.data -b vm.qcow2 "
                                "-F qcow2 top.qcow2");
    run_ok(in_dir(dir.path()) + "qemu-io -f qcow2 -c 'write -P 9 1M 64k' top.qcow2");
    CommandResult ours = run(in_dir(dir.path()) + cli() + " map top.qcow2");
    EXPECT_NE(ours.out.find("vm.data\n"), std::string::npos) << ours.out;
    EXPECT_NE(ours.out.find("top.data\n"), std::string::npos) << ours.out;
    expect_same_map(dir.path(), "top.qcow2");
}

TEST(CliMapHuman, ZeroOffsetsPrintAsQemuPrintsThem) {
    TempDir dir;
    // A raw layer's data at offset 0: qemu's "%#-16" PRIx64 prints 0 without "0x".
    run_ok(in_dir(dir.path()) + "qemu-img create -q -f raw base.raw 1M");
    run_ok(in_dir(dir.path()) + "qemu-io -f raw -c 'write -P 1 0 4k' base.raw");
    run_ok(in_dir(dir.path()) + "qemu-img create -q -f qcow2 -b base.raw -F raw top.qcow2");
    CommandResult ours = run(in_dir(dir.path()) + cli() + " map top.qcow2");
    EXPECT_EQ(ours.out, "Offset          Length          Mapped to       File\n"
                        "0               0x1000          0               base.raw\n");
    expect_same_map(dir.path(), "top.qcow2");
}

TEST(CliMapBitmap, DirtyMapIsTheMapOfEachDirtyRange) {
    TempDir dir;
    const auto image = dir / "b.qcow2";
    test::make_image(image, "cluster_size=64k", "8M",
                     {"write -P 1 0 1M", "write -P 2 3M 1M", "write -z 6M 1M"});
    run_ok("qemu-img bitmap --add " + q(image) + " b");
    run_ok("qemu-io -f qcow2 -c 'write -P 3 512k 128k' -c 'write -P 4 3968k 256k' -c 'write -z "
           "6272k 64k' " +
           q(image));
    run_ok("qemu-img bitmap --disable " + q(image) + " b");
    // The dirty ranges, then qemu-img map of each range on its own: the JSON of map --bitmap is
    // exactly those entries, in order.
    std::string ranges = run_ok(cli() + " map --bitmap=b --bitmap-only --output=json " + q(image));
    ASSERT_EQ(ranges, "[{\"start\": 0, \"length\": 524288, \"dirty\": false},\n"
                      "{\"start\": 524288, \"length\": 131072, \"dirty\": true},\n"
                      "{\"start\": 655360, \"length\": 3407872, \"dirty\": false},\n"
                      "{\"start\": 4063232, \"length\": 262144, \"dirty\": true},\n"
                      "{\"start\": 4325376, \"length\": 2097152, \"dirty\": false},\n"
                      "{\"start\": 6422528, \"length\": 65536, \"dirty\": true},\n"
                      "{\"start\": 6488064, \"length\": 1900544, \"dirty\": false}]\n");
    std::string expected;
    for (const auto& [start, length] :
         std::vector<std::pair<int, int>>{{524288, 131072}, {4063232, 262144}, {6422528, 65536}}) {
        std::string one =
            run_ok("qemu-img map --output=json --start-offset=" + std::to_string(start) +
                   " --max-length=" + std::to_string(length) + " " + q(image));
        one = one.substr(1, one.size() - 3); // the entries without "[" and "]\n"
        expected += (expected.empty() ? "" : ",\n") + one;
    }
    std::string ours = run_ok(cli() + " map --bitmap=b --output=json " + q(image));
    for (const char* key : {", \"compressed\": false"}) {
        for (auto at = ours.find(key); at != std::string::npos; at = ours.find(key))
            ours.erase(at, std::string(key).size());
    }
    EXPECT_EQ(ours, "[" + expected + "]\n");
    // The human form lists the dirty data ranges with their file.
    std::string human = run_ok(cli() + " map --bitmap=b " + q(image));
    EXPECT_GE(std::count(human.begin(), human.end(), '\n'), 3) << human; // header + data ranges
    EXPECT_NE(human.find("0x80000         0x20000         "), std::string::npos) << human;
    EXPECT_TRUE(human.ends_with(image.string() + "\n")) << human;
}

} // namespace
} // namespace qcowmap

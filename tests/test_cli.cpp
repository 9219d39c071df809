// The qcowmap command line: help, exit codes, the one-line error format, and the promises of
// each command (cat into a pipe, sparse convert that refuses to overwrite, progress, JSON).
#include "support.hpp"

#include <gtest/gtest.h>

#include <sys/stat.h>

namespace qcowmap {
namespace {

using test::CommandResult;
using test::run;
using test::shell_quote;
using test::TempDir;

std::string cli() {
    return shell_quote(test::qcowmap_bin());
}

int count_lines(const std::string& text) {
    return static_cast<int>(std::count(text.begin(), text.end(), '\n'));
}

class Cli : public ::testing::Test {
  protected:
    void SetUp() override {
        image_ = (dir_ / "disk.qcow2").string();
        test::make_image(image_, "cluster_size=64k", "8M",
                         {"write -P 0xab 0 100k", "write -P 0xcd 3M 1M", "write -z 5M 1M"});
    }
    TempDir dir_;
    std::string image_;
};

TEST_F(Cli, HelpOnEveryCommand) {
    for (std::string command : {"", "info", "map", "cat", "convert"}) {
        CommandResult r = run(cli() + " " + command + " --help");
        EXPECT_EQ(r.exit_code, 0) << command;
        EXPECT_NE(r.out.find("Usage"), std::string::npos) << command << ": " << r.out;
        EXPECT_NE(r.out.find("--help"), std::string::npos) << command;
    }
    CommandResult version = run(cli() + " --version");
    EXPECT_EQ(version.exit_code, 0);
    EXPECT_NE(version.out.find("qcowmap"), std::string::npos);
}

TEST_F(Cli, UsageErrorsExitTwo) {
    EXPECT_EQ(run(cli()).exit_code, 2);
    EXPECT_EQ(run(cli() + " frobnicate").exit_code, 2);
    EXPECT_EQ(run(cli() + " map --output=xml " + shell_quote(image_)).exit_code, 2);
    EXPECT_EQ(run(cli() + " cat").exit_code, 2);
    CommandResult r = run(cli() + " map --start-offset=12Q " + shell_quote(image_));
    EXPECT_EQ(r.exit_code, 2);
    EXPECT_EQ(r.err, "qcowmap: " + image_ + ": invalid --start-offset '12Q'\n");
}

TEST_F(Cli, MissingFileIsOneLineExitOne) {
    std::string missing = (dir_ / "nope.qcow2").string();
    for (std::string command : {"info", "map", "cat"}) {
        CommandResult r = run(cli() + " " + command + " " + shell_quote(missing));
        EXPECT_EQ(r.exit_code, 1) << command;
        EXPECT_EQ(r.err, "qcowmap: " + missing + ": No such file or directory\n") << command;
        EXPECT_TRUE(r.out.empty());
    }
    CommandResult r = run(cli() + " info " + shell_quote(dir_.path().string()));
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_EQ(count_lines(r.err), 1);
    EXPECT_NE(r.err.find("is a directory"), std::string::npos) << r.err;
}

TEST_F(Cli, CatIntoAPipeMatchesQemu) {
    auto raw = dir_ / "qemu.raw";
    test::run_ok("qemu-img convert -O raw " + shell_quote(image_) + " " +
                 shell_quote(raw.string()));
    std::string expected = test::run_ok("sha256sum < " + shell_quote(raw.string()));
    CommandResult ours = run(cli() + " cat " + shell_quote(image_) + " | sha256sum");
    EXPECT_EQ(ours.exit_code, 0) << ours.err;
    EXPECT_EQ(ours.out, expected);
    ASSERT_EQ(expected.size(), 64u + 4u); // "HEX  -\n"
}

TEST_F(Cli, ConvertIsSparseAndRefusesToOverwrite) {
    auto out = (dir_ / "out.raw").string();
    auto raw = dir_ / "qemu.raw";
    test::run_ok("qemu-img convert -O raw " + shell_quote(image_) + " " +
                 shell_quote(raw.string()));
    CommandResult first = run(cli() + " convert " + shell_quote(image_) + " " + shell_quote(out));
    ASSERT_EQ(first.exit_code, 0) << first.err;
    EXPECT_TRUE(first.err.empty());
    EXPECT_TRUE(test::read_file(out) == test::read_file(raw));
    struct stat st {};
    ASSERT_EQ(::stat(out.c_str(), &st), 0);
    EXPECT_EQ(static_cast<std::uint64_t>(st.st_size), 8u << 20);
    // 1.1 MiB of data (two runs) in an 8 MiB disk: the rest must be holes.
    EXPECT_LE(static_cast<std::uint64_t>(st.st_blocks) * 512, 1300u * 1024) << st.st_blocks;

    CommandResult again = run(cli() + " convert " + shell_quote(image_) + " " + shell_quote(out));
    EXPECT_EQ(again.exit_code, 3);
    EXPECT_EQ(again.err, "qcowmap: " + out + ": already exists (use --force to overwrite)\n");

    test::write_file(out, std::vector<std::byte>(10u << 20, std::byte{0x77}));
    CommandResult forced =
        run(cli() + " convert --force -p " + shell_quote(image_) + " " + shell_quote(out));
    EXPECT_EQ(forced.exit_code, 0) << forced.err;
    EXPECT_NE(forced.err.find("(100.00/100%)"), std::string::npos) << forced.err;
    EXPECT_TRUE(test::read_file(out) == test::read_file(raw));
}

TEST_F(Cli, ConvertRefusesToOverwriteItsOwnInput) {
    auto before = test::read_file(image_);
    CommandResult r =
        run(cli() + " convert --force " + shell_quote(image_) + " " + shell_quote(image_));
    EXPECT_EQ(r.exit_code, 3);
    EXPECT_EQ(r.err, "qcowmap: " + image_ +
                         ": is the image being read (or one of its layers or its data file): "
                         "refusing to overwrite it\n");
    EXPECT_TRUE(test::read_file(image_) == before) << "the image was modified";
}

TEST_F(Cli, OutputErrorsExitThree) {
    for (std::string command : {"info", "info --json", "map --output=json", "map", "cat"}) {
        CommandResult r = run(cli() + " " + command + " " + shell_quote(image_) + " >/dev/full");
        EXPECT_EQ(r.exit_code, 3) << command << ": " << r.err;
        EXPECT_EQ(count_lines(r.err), 1) << command << ": " << r.err;
    }
    // Closed stderr: the error cannot be shown, but the exit code still says what happened.
    EXPECT_EQ(run(cli() + " info " + shell_quote((dir_ / "missing").string()) + " 2>&-").exit_code,
              1);
    CommandResult usage = run(cli() + " info");
    EXPECT_EQ(usage.exit_code, 2);
    EXPECT_EQ(usage.err, "qcowmap: usage: IMAGE is required (see qcowmap --help)\n");
}

TEST_F(Cli, ConvertToUnwritablePlaceExitsThree) {
    CommandResult r = run(cli() + " convert " + shell_quote(image_) + " " +
                          shell_quote((dir_ / "no/such/dir/out.raw").string()));
    EXPECT_EQ(r.exit_code, 3);
    EXPECT_EQ(count_lines(r.err), 1);
    EXPECT_NE(r.err.find("No such file or directory"), std::string::npos);
}

TEST_F(Cli, InfoJsonAndText) {
    CommandResult json = run(cli() + " info --json " + shell_quote(image_));
    ASSERT_EQ(json.exit_code, 0) << json.err;
    EXPECT_NE(json.out.find("\"virtual-size\": 8388608,"), std::string::npos) << json.out;
    EXPECT_NE(json.out.find("\"cluster-size\": 65536,"), std::string::npos);
    EXPECT_NE(json.out.find("\"version\": 3,"), std::string::npos);
    EXPECT_NE(json.out.find("\"refcount-bits\": 16,"), std::string::npos);
    EXPECT_NE(json.out.find("\"backing-filename\": null,"), std::string::npos);
    CommandResult text = run(cli() + " info " + shell_quote(image_));
    ASSERT_EQ(text.exit_code, 0);
    EXPECT_NE(text.out.find("virtual size: 8 MiB (8388608 bytes)\n"), std::string::npos)
        << text.out;
    EXPECT_NE(text.out.find("cluster_size: 65536\n"), std::string::npos);
}

TEST_F(Cli, InfoNamesTheBackingFileAndReadsGoThroughIt) {
    auto overlay = (dir_ / "overlay.qcow2").string();
    test::run_ok("qemu-img create -q -f qcow2 -F qcow2 -b " + shell_quote(image_) + " " +
                 shell_quote(overlay));
    CommandResult r = run(cli() + " info --json " + shell_quote(overlay));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_NE(r.out.find("\"backing-filename\": \"" + image_ + "\""), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("\"backing-filename-format\": \"qcow2\""), std::string::npos);
    // Reading goes through the chain: the overlay reads as its base...
    auto raw = dir_ / "base.raw";
    test::run_ok("qemu-img convert -O raw " + shell_quote(image_) + " " +
                 shell_quote(raw.string()));
    CommandResult cat =
        run(cli() + " cat " + shell_quote(overlay) + " | cmp - " + shell_quote(raw.string()));
    EXPECT_EQ(cat.exit_code, 0) << cat.err << cat.out;
    // ...and --backing=none reads the top layer alone.
    CommandResult map = run(cli() + " map --output=json --backing=none " + shell_quote(overlay));
    EXPECT_EQ(map.exit_code, 0) << map.err;
    EXPECT_EQ(map.out, "[{ \"start\": 0, \"length\": 8388608, \"depth\": 0, \"present\": false, "
                       "\"zero\": true, \"data\": false, \"compressed\": false}]\n");
}

TEST_F(Cli, MapHumanListsDataRanges) {
    CommandResult r = run(cli() + " map " + shell_quote(image_));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    std::string header = "Offset          Length          Mapped to       File\n";
    ASSERT_EQ(r.out.substr(0, header.size()), header);
    EXPECT_EQ(count_lines(r.out), 3) << r.out; // header + the two data runs
    EXPECT_NE(r.out.find("0x300000        0x100000"), std::string::npos) << r.out;
}

TEST(CliShrinkingImage, CatReportsTheChangeInsteadOfCrashing) {
    // A file truncated while mapped: reading a vanished page raises SIGBUS (or EFAULT inside
    // write()). Either way the CLI must say so in one line and exit 1.
    for (std::string kind : {"plain", "compressed"}) {
        TempDir dir;
        auto image = (dir / "shrinks.qcow2").string();
        test::make_image(image, "cluster_size=64k", "32M", {"write -P 0x5a 0 32M"});
        if (kind == "compressed") {
            auto source = (dir / "source.qcow2").string();
            std::filesystem::rename(image, source);
            test::run_ok("qemu-img convert -c -O qcow2 " + shell_quote(source) + " " +
                         shell_quote(image));
        }
        auto err = (dir / "err").string();
        // The reader takes the first 64 KiB (so qcowmap is surely reading), truncates the image,
        // then drains the rest.
        CommandResult r =
            run("{ " + cli() + " cat " + shell_quote(image) + "; echo \"rc=$?\" >&2; } 2>" +
                shell_quote(err) + " | { head -c 65536 >/dev/null; truncate -s 300k " +
                shell_quote(image) + "; cat >/dev/null; }");
        EXPECT_EQ(r.exit_code, 0) << kind;
        std::string stderr_text;
        for (std::byte b : test::read_file(err))
            stderr_text += static_cast<char>(b);
        EXPECT_EQ(stderr_text, "qcowmap: " + image +
                                   ": image changed while being read (the file shrank under its "
                                   "mapping)\nrc=1\n")
            << kind;
    }
}

} // namespace
} // namespace qcowmap

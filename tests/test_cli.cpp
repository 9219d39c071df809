// The qcowmap command line: help, exit codes, the one-line error format, and the promises of
// each command (cat into a pipe, sparse convert that refuses to overwrite, progress, JSON).
#include "support.hpp"

#include <qcowmap/image.hpp>

#include <gtest/gtest.h>

#include <algorithm>

#include <sys/stat.h>

namespace qcowmap {
namespace {

using test::cli;
using test::q;

using test::CommandResult;
using test::run;
using test::shell_quote;
using test::TempDir;

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

TEST_F(Cli, UsageErrorsExitOne) {
    // qemu-img exits 1 on a usage error (issue 25: 2 collided with check and compare).
    EXPECT_EQ(run(cli()).exit_code, 1);
    EXPECT_EQ(run(cli() + " frobnicate").exit_code, 1);
    EXPECT_EQ(run(cli() + " map --output=xml " + shell_quote(image_)).exit_code, 1);
    EXPECT_EQ(run(cli() + " cat").exit_code, 1);
    CommandResult r = run(cli() + " map --start-offset=12Q " + shell_quote(image_));
    EXPECT_EQ(r.exit_code, 1);
    // Issue 18: a bad size blames the option, not the image, and names the command's --help.
    EXPECT_EQ(r.err, "qcowmap: usage: invalid --start-offset '12Q': not a size (see qcowmap map "
                     "--help)\n");
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
    EXPECT_EQ(usage.exit_code, 1);
    EXPECT_EQ(usage.err, "qcowmap: usage: IMAGE is required (see qcowmap info --help)\n");
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
        // One line, exit 1; the fault boundary says the offset read and the new end, or the
        // change check (Image::check_unchanged) the sizes before and after.
        const std::string prefix = "qcowmap: " + image + ": image changed while being read (";
        EXPECT_EQ(stderr_text.substr(0, prefix.size()), prefix) << kind << ": " << stderr_text;
        EXPECT_EQ(std::count(stderr_text.begin(), stderr_text.end(), '\n'), 2) << stderr_text;
        EXPECT_TRUE(stderr_text.ends_with(")\nrc=1\n")) << kind << ": " << stderr_text;
    }
}

// ---------------------------------------------------------------------------------------------
// Issue 18: qemu-img's conventions

/// qemu-img 7.2 prints no "compressed" key; qcowmap prints qemu 8.2's.
std::string without_compressed_key(std::string text) {
    for (const char* key : {", \"compressed\": false", ", \"compressed\": true"}) {
        for (auto at = text.find(key); at != std::string::npos; at = text.find(key, at))
            text.erase(at, std::string(key).size());
    }
    return text;
}

/// Every key of the JSON value `theirs` is in `ours` with an equal value (recursively: objects
/// may hold more keys, arrays must be as long); python3 reads both. Returns "" or what differs.
std::string json_subset_mismatch(const std::string& ours, const std::string& theirs,
                                 const TempDir& dir) {
    static int counter = 0;
    const auto a = dir / ("ours-" + std::to_string(counter) + ".json");
    const auto b = dir / ("theirs-" + std::to_string(counter++) + ".json");
    test::write_file(
        a, std::vector<std::byte>(reinterpret_cast<const std::byte*>(ours.data()),
                                  reinterpret_cast<const std::byte*>(ours.data()) + ours.size()));
    test::write_file(b, std::vector<std::byte>(reinterpret_cast<const std::byte*>(theirs.data()),
                                               reinterpret_cast<const std::byte*>(theirs.data()) +
                                                   theirs.size()));
    const char* script = R"PY(
import json, sys
ours, theirs = (json.load(open(p)) for p in sys.argv[1:3])
def sub(o, t, path):
    if isinstance(t, dict):
        if not isinstance(o, dict): return [path + ": not an object"]
        out = []
        for k, v in t.items():
            out += sub(o[k], v, path + "." + k) if k in o else [path + "." + k + ": missing"]
        return out
    if isinstance(t, list):
        if not isinstance(o, list) or len(o) != len(t): return [path + ": lists differ"]
        return sum((sub(x, y, path + "[%d]" % i) for i, (x, y) in enumerate(zip(o, t))), [])
    return [] if o == t else ["%s: %r != %r" % (path, o, t)]
print("\n".join(sub(ours, theirs, "$")))
)PY";
    CommandResult r = run("python3 -c " + shell_quote(script) + " " + q(a) + " " + q(b));
    if (r.exit_code != 0)
        return "python3 failed: " + r.err;
    std::string out = r.out;
    while (!out.empty() && out.back() == '\n')
        out.pop_back();
    return out;
}

TEST_F(Cli, SizesParseAsQemuImgParsesThem) {
    const std::string args = " --start-offset=1.5M --max-length=0x10000 ";
    std::string ours = test::run_ok(cli() + " map --output=json" + args + q(image_));
    std::string theirs = test::run_ok("qemu-img map -f qcow2 --output=json" + args + q(image_));
    EXPECT_EQ(without_compressed_key(ours), theirs);
    // 1.3k is 1331 bytes (qemu rounds the fraction), 64k and 1.k are 65536 and 1024.
    for (const auto& [text, value] : std::vector<std::pair<std::string, std::string>>{
             {"1.3k", "1331"}, {"64k", "65536"}, {"1.k", "1024"}, {"0X10", "16"}, {"5b", "5"}}) {
        std::string map = test::run_ok(
            cli() + " map --output=json --max-length=1 --start-offset=" + text + " " + q(image_));
        EXPECT_NE(map.find("\"start\": " + value + ","), std::string::npos) << text << ": " << map;
    }
    struct Bad {
        std::string text, why;
    };
    for (const Bad& bad : std::vector<Bad>{{"-1", "sizes cannot be negative"},
                                           {"1.5", "a fraction needs a unit (1.5M, 0.5k)"},
                                           {"1e3", "not a size"},
                                           {"16E", "too large (at most 9223372036854775807)"},
                                           {"0x1.8k", "a hexadecimal size cannot have a fraction"},
                                           {"12Q", "not a size"}}) {
        CommandResult r =
            run(cli() + " map --max-length=" + shell_quote(bad.text) + " " + q(image_));
        EXPECT_EQ(r.exit_code, 1) << bad.text;
        EXPECT_EQ(r.err, "qcowmap: usage: invalid --max-length '" + bad.text + "': " + bad.why +
                             " (see qcowmap map --help)\n");
        // qemu-img refuses the same values.
        EXPECT_NE(
            run("qemu-img map --max-length=" + shell_quote(bad.text) + " " + q(image_)).exit_code,
            0)
            << bad.text;
    }
}

TEST_F(Cli, SparseSizeTakesQemuSizes) {
    // -S 1.5k is 1536 bytes, a multiple of 512: accepted, and the output matches qemu-img's.
    auto ours = dir_ / "ours.raw";
    auto theirs = dir_ / "theirs.raw";
    CommandResult r = run(cli() + " convert -S 1.5k " + q(image_) + " " + q(ours));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    test::run_ok("qemu-img convert -S 1.5k -O raw " + q(image_) + " " + q(theirs));
    EXPECT_TRUE(test::read_file(ours) == test::read_file(theirs));
    for (const std::string bad : {"1000", "32M", "1.1k"}) {
        CommandResult refused = run(cli() + " convert -S " + bad + " " + q(image_) + " " +
                                    q(dir_ / ("x-" + bad + ".raw")));
        EXPECT_EQ(refused.exit_code, 1) << bad;
        EXPECT_EQ(refused.err, "qcowmap: usage: invalid -S '" + bad +
                                   "': the sparse size must be a multiple of 512 up to 16M (or 0 "
                                   "to turn zero detection off) (see qcowmap convert --help)\n");
    }
}

TEST_F(Cli, UsageErrorsSayWhatAndNameTheCommandsHelp) {
    CommandResult r = run(cli() + " foo " + q(image_));
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_EQ(r.err, "qcowmap: usage: unknown command 'foo' (see qcowmap --help)\n");
    r = run(cli() + " hash --io=foo " + q(image_));
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_EQ(r.err, "qcowmap: usage: --io: 'foo' is not one of auto, read, mmap (see qcowmap "
                     "hash --help)\n");
    r = run(cli() + " map --output=xml " + q(image_));
    EXPECT_EQ(r.err, "qcowmap: usage: --output: 'xml' is not one of human, json (see qcowmap map "
                     "--help)\n");
    r = run(cli() + " compare -f vmdk " + q(image_) + " " + q(image_));
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_EQ(r.err, "qcowmap: usage: -f: 'vmdk' is not one of qcow2, raw (see qcowmap compare "
                     "--help)\n");
    r = run(cli() + " hash --quiet " + q(image_));
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_EQ(r.err, "qcowmap: usage: --quiet, --status and --ignore-missing go with --check (see "
                     "qcowmap hash --help)\n");
    // -f is the image format now (qemu-img's meaning), no longer --force.
    r = run(cli() + " convert -f " + q(image_) + " " + q(dir_ / "out.raw"));
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_TRUE(r.err.starts_with("qcowmap: usage: --format: '")) << r.err;
    EXPECT_NE(r.err.find("' is not one of qcow2, qcow, raw (see qcowmap convert --help)"),
              std::string::npos)
        << r.err;
}

TEST_F(Cli, MapStartOffsetPastTheEndPrintsWhatQemuImgPrints) {
    for (const std::string args :
         {" --start-offset=8M", " --start-offset=16M", " --start-offset=1M --max-length=0"}) {
        std::string ours = test::run_ok(cli() + " map --output=json" + args + " " + q(image_));
        std::string theirs =
            test::run_ok("qemu-img map -f qcow2 --output=json" + args + " " + q(image_));
        EXPECT_EQ(without_compressed_key(ours), theirs) << args;
        EXPECT_EQ(test::run_ok(cli() + " map" + args + " " + q(image_)),
                  test::run_ok("qemu-img map -f qcow2" + args + " " + q(image_)))
            << args;
    }
}

TEST_F(Cli, OutputJsonOnEveryCommandWithJsonAndJsonStaysAnAlias) {
    for (const std::string command : {"info", "bitmaps", "hash", "check", "map"}) {
        CommandResult long_form = run(cli() + " " + command + " --output=json " + q(image_));
        CommandResult alias = run(cli() + " " + command + " --json " + q(image_));
        EXPECT_EQ(long_form.exit_code, 0) << command << ": " << long_form.err;
        EXPECT_EQ(long_form.out, alias.out) << command;
        EXPECT_TRUE(long_form.out.starts_with("[") || long_form.out.starts_with("{"))
            << command << ": " << long_form.out;
        CommandResult human = run(cli() + " " + command + " --output=human " + q(image_));
        EXPECT_EQ(human.exit_code, 0) << command;
        EXPECT_NE(human.out, long_form.out) << command;
    }
}

TEST_F(Cli, InfoWorksWithoutItsDataFileAndTakesDataFile) {
    // The image and qemu-img run in the image's directory: qemu 7.2 resolves a relative data
    // file name against the current directory, qcowmap against the image's.
    const std::string in_dir = "cd " + q(dir_.path()) + " && ";
    test::run_ok(in_dir + "qemu-img create -q -f qcow2 -o data_file=vm.data vm.qcow2 4M");
    test::run_ok(in_dir + "qemu-io -f qcow2 -c 'write -P 7 64k 64k' vm.qcow2");
    std::filesystem::rename(dir_ / "vm.data", dir_ / "moved.data");
    const std::string image = (dir_ / "vm.qcow2").string();
    CommandResult human = run(cli() + " info " + shell_quote(image));
    ASSERT_EQ(human.exit_code, 0) << human.err;
    EXPECT_NE(human.out.find("data file: vm.data\ndata file found: no (data file " +
                             (dir_ / "vm.data").string() + ": No such file or directory)\n"),
              std::string::npos)
        << human.out;
    CommandResult json = run(cli() + " info --output=json " + shell_quote(image));
    ASSERT_EQ(json.exit_code, 0) << json.err;
    EXPECT_NE(json.out.find("\"data-file\": \"vm.data\","), std::string::npos) << json.out;
    EXPECT_NE(json.out.find("\"data-file-found\": false,"), std::string::npos) << json.out;
    // qemu-img info works without the data file too, and we carry its keys.
    std::string theirs = test::run_ok(in_dir + "qemu-img info --output=json vm.qcow2");
    std::string ours = test::run_ok(in_dir + cli() + " info --output=json vm.qcow2");
    EXPECT_EQ(json_subset_mismatch(ours, theirs, dir_), "");
    // Reading still needs it, and says which file is missing.
    CommandResult map = run(cli() + " map " + shell_quote(image));
    EXPECT_EQ(map.exit_code, 1);
    EXPECT_EQ(map.err, "qcowmap: " + image + ": data file " + (dir_ / "vm.data").string() +
                           ": No such file or directory\n");
    // --data-file points info (and reads) at it.
    human = run(cli() + " info --data-file=" + q(dir_ / "moved.data") + " " + shell_quote(image));
    EXPECT_NE(human.out.find("data file: vm.data\ndata file found: yes\n"), std::string::npos)
        << human.out << human.err;
    EXPECT_EQ(run(cli() + " map --data-file=" + q(dir_ / "moved.data") + " " + shell_quote(image))
                  .exit_code,
              0);
}

TEST(CliInfo, JsonCarriesQemuImgsKeys) {
    TempDir dir;
    const std::string in_dir = "cd " + q(dir.path()) + " && ";
    test::make_image(dir / "v3.qcow2", "lazy_refcounts=on", "4M", {"write -P 1 0 64k"});
    test::make_image(dir / "v2.qcow2", "compat=0.10", "4M", {"write -P 1 0 64k"});
    test::make_image(dir / "zstd.qcow2", "compression_type=zstd,extended_l2=on", "4M");
    test::make_image(dir / "snap.qcow2", "", "4M", {"write -P 1 0 64k"});
    test::run_ok("qemu-img snapshot -c first " + q(dir / "snap.qcow2"));
    test::run_ok("qemu-img bitmap --add " + q(dir / "snap.qcow2") + " b0");
    test::run_ok(in_dir + "qemu-img create -q -f raw base.raw 4M");
    std::filesystem::create_directory(dir / "sub");
    test::run_ok(in_dir + "qemu-img create -q -f qcow2 -b ../v3.qcow2 -F qcow2 sub/top.qcow2");
    test::run_ok(in_dir + "qemu-img create -q -f qcow2 -b base.raw -F raw on-raw.qcow2");
    test::run_ok(in_dir + "qemu-img create -q -f qcow2 -o data_file=vm.data vm.qcow2 4M");
    struct Case {
        std::string args;
        std::string qemu_args;
    };
    for (const Case& c :
         std::vector<Case>{{"v3.qcow2", "v3.qcow2"},
                           {"v2.qcow2", "v2.qcow2"},
                           {"zstd.qcow2", "zstd.qcow2"},
                           {"snap.qcow2", "snap.qcow2"},
                           {"sub/top.qcow2", "sub/top.qcow2"},
                           {"vm.qcow2", "vm.qcow2"},
                           {"-f raw base.raw", "-f raw base.raw"},
                           {"--backing-chain sub/top.qcow2", "--backing-chain sub/top.qcow2"},
                           {"--backing-chain on-raw.qcow2", "--backing-chain on-raw.qcow2"}}) {
        std::string ours = test::run_ok(in_dir + cli() + " info --output=json " + c.args);
        std::string theirs = test::run_ok(in_dir + "qemu-img info --output=json " + c.qemu_args);
        EXPECT_EQ(json_subset_mismatch(ours, theirs, dir), "") << c.args << "\n" << ours;
    }
}

TEST(CliInfo, RawImagesWithFormatRaw) {
    TempDir dir;
    const auto raw = dir / "disk.raw";
    test::run_ok("qemu-img create -q -f raw " + q(raw) + " 1M");
    test::run_ok("qemu-io -f raw -c 'write -P 9 4k 8k' " + q(raw));
    std::string info = test::run_ok(cli() + " info -f raw " + q(raw));
    EXPECT_NE(info.find("file format: raw\nvirtual size: 1 MiB (1048576 bytes)\n"),
              std::string::npos)
        << info;
    // Without -f a raw file is probed as qemu-img probes it: read as raw, with qemu's warning
    // (issue 25; it was refused as "not a qcow2 image").
    CommandResult probed = run(cli() + " info " + q(raw));
    EXPECT_EQ(probed.exit_code, 0) << probed.err;
    EXPECT_EQ(probed.out, info);
    EXPECT_NE(probed.err.find("probing guessed raw"), std::string::npos) << probed.err;
    EXPECT_EQ(without_compressed_key(test::run_ok(cli() + " map -f raw --output=json " + q(raw))),
              test::run_ok("qemu-img map -f raw --output=json " + q(raw)));
    std::string digest = test::run_ok("sha256sum < " + q(raw)).substr(0, 64);
    EXPECT_EQ(test::run_ok(cli() + " hash -f raw " + q(raw)), digest + "  " + raw.string() + "\n");
    EXPECT_EQ(run(cli() + " cat -f raw " + q(raw) + " | cmp - " + q(raw)).exit_code, 0);
}

/// `qcowmap hash` lines, for the named images, run in `dir`.
std::string hash_in(const TempDir& dir, const std::string& args) {
    return test::run_ok("cd " + q(dir.path()) + " && " + cli() + " hash " + args);
}

TEST(CliHash, CheckReadsItsOwnOutputLikeSha256sumC) {
    TempDir dir;
    const std::string in_dir = "cd " + q(dir.path()) + " && ";
    test::make_image(dir / "a.qcow2", "", "1M", {"write -P 1 0 4k"});
    test::make_image(dir / "b.qcow2", "", "1M", {"write -P 2 64k 4k"});
    const std::string sums = hash_in(dir, "a.qcow2 b.qcow2");
    test::write_file(
        dir / "SUMS",
        std::vector<std::byte>(reinterpret_cast<const std::byte*>(sums.data()),
                               reinterpret_cast<const std::byte*>(sums.data()) + sums.size()));
    // Good.
    CommandResult good = run(in_dir + cli() + " hash --check SUMS");
    EXPECT_EQ(good.exit_code, 0) << good.err;
    EXPECT_EQ(good.out, "a.qcow2: OK\nb.qcow2: OK\n");
    EXPECT_EQ(good.err, "");
    EXPECT_EQ(run(in_dir + cli() + " hash --check --quiet SUMS").out, "");
    // Standard input, and the list sha256sum makes of the raw disks checks too.
    EXPECT_EQ(run(in_dir + "cat SUMS | " + cli() + " hash -c -").out, "a.qcow2: OK\nb.qcow2: OK\n");
    // Bad: b changes.
    test::run_ok("qemu-io -f qcow2 -c 'write -P 3 64k 4k' " + q(dir / "b.qcow2"));
    CommandResult bad = run(in_dir + cli() + " hash --check SUMS");
    EXPECT_EQ(bad.exit_code, 1);
    EXPECT_EQ(bad.out, "a.qcow2: OK\nb.qcow2: FAILED\n");
    EXPECT_EQ(bad.err, "qcowmap: SUMS: WARNING: 1 computed checksum did NOT match\n");
    CommandResult quiet = run(in_dir + cli() + " hash --check --quiet SUMS");
    EXPECT_EQ(quiet.exit_code, 1);
    EXPECT_EQ(quiet.out, "b.qcow2: FAILED\n");
    CommandResult status = run(in_dir + cli() + " hash --check --status SUMS");
    EXPECT_EQ(status.exit_code, 1);
    EXPECT_EQ(status.out, "");
    EXPECT_EQ(status.err, "");
    // Missing: a is gone.
    std::filesystem::remove(dir / "a.qcow2");
    CommandResult missing = run(in_dir + cli() + " hash --check SUMS");
    EXPECT_EQ(missing.exit_code, 1);
    EXPECT_EQ(missing.out, "a.qcow2: FAILED open or read\nb.qcow2: FAILED\n");
    EXPECT_EQ(missing.err, "qcowmap: a.qcow2: No such file or directory\n"
                           "qcowmap: SUMS: WARNING: 1 listed file could not be read\n"
                           "qcowmap: SUMS: WARNING: 1 computed checksum did NOT match\n");
    CommandResult ignore = run(in_dir + cli() + " hash --check --ignore-missing SUMS");
    EXPECT_EQ(ignore.out, "b.qcow2: FAILED\n");
    EXPECT_EQ(ignore.err, "qcowmap: SUMS: WARNING: 1 computed checksum did NOT match\n");
    // Lines that are not digest lines are counted, a list without any is an error.
    test::run_ok(in_dir + "printf 'not a digest line\\n' > JUNK");
    CommandResult junk = run(in_dir + cli() + " hash --check JUNK");
    EXPECT_EQ(junk.exit_code, 1);
    EXPECT_EQ(junk.err, "qcowmap: JUNK: no properly formatted digest lines found\n");
}

TEST(CliHash, NamesAreEscapedAsCoreutilsEscapesThem) {
    // The same names in two directories: raw disks (sha256sum) and images (qcowmap hash) of the
    // same bytes must give the same lines, escapes included; each tool checks the other's list.
    TempDir images, raws;
    const std::vector<std::string> names = {"plain.img", "back\\slash.img", "new\nline.img",
                                            "carriage\rreturn.img"};
    std::string args;
    for (std::size_t i = 0; i < names.size(); ++i) {
        test::make_image(images / names[i], "", "1M",
                         {"write -P " + std::to_string(i + 1) + " 0 4k"});
        test::run_ok("qemu-img convert -O raw " + q(images / names[i]) + " " + q(raws / names[i]));
        args += " " + shell_quote(names[i]);
    }
    const std::string ours = hash_in(images, args);
    const std::string theirs = test::run_ok("cd " + q(raws.path()) + " && sha256sum" + args);
    EXPECT_EQ(ours, theirs);
    EXPECT_EQ(std::count(ours.begin(), ours.end(), '\n'), 4) << ours;
    EXPECT_NE(ours.find("\\"), std::string::npos);
    const std::vector<std::byte> list(reinterpret_cast<const std::byte*>(ours.data()),
                                      reinterpret_cast<const std::byte*>(ours.data()) +
                                          ours.size());
    test::write_file(images / "SUMS", list);
    test::write_file(raws / "SUMS", list);
    CommandResult ours_check = run("cd " + q(images.path()) + " && " + cli() + " hash -c SUMS");
    CommandResult theirs_check = run("cd " + q(raws.path()) + " && sha256sum -c SUMS");
    EXPECT_EQ(ours_check.exit_code, 0) << ours_check.out << ours_check.err;
    EXPECT_EQ(theirs_check.exit_code, 0) << theirs_check.out << theirs_check.err;
    EXPECT_EQ(ours_check.out, theirs_check.out);
}

TEST(CliHash, JsonReportsAFailedImageAsAnObject) {
    TempDir dir;
    test::make_image(dir / "a.qcow2", "", "1M", {"write -P 1 0 4k"});
    const auto missing = dir / "missing.qcow2";
    CommandResult r = run(cli() + " hash --output=json " + q(dir / "a.qcow2") + " " + q(missing));
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_EQ(r.err, "qcowmap: " + missing.string() + ": No such file or directory\n");
    EXPECT_NE(r.out.find(",\n{\"image\": \"" + missing.string() +
                         "\", \"algorithm\": \"sha256\", \"error\": \"" + missing.string() +
                         ": No such file or directory\", \"error-code\": \"io_error\"}\n]\n"),
              std::string::npos)
        << r.out;
    EXPECT_NE(r.out.find("\"size\": 1048576, \"digest\": \""), std::string::npos) << r.out;
}

TEST(CliHash, SeveralImagesAtOnceInArgumentOrder) {
    // Hashed at once (hash_images), printed in argument order, a missing image reported in its
    // place; with -p one after another, each with its progress; every --io gives the same.
    TempDir dir;
    std::vector<std::string> names;
    std::string args;
    for (int i = 0; i < 5; ++i) {
        names.push_back("d" + std::to_string(i) + ".qcow2");
        if (i != 2) {
            test::make_image(
                dir / names.back(), "", "8M",
                {"write -P " + std::to_string(i + 1) + " " + std::to_string(i) + "M 64k"});
        }
        args += " " + names.back();
    }
    const std::string in_dir = "cd " + q(dir.path()) + " && ";
    std::string expected;
    for (int i = 0; i < 5; ++i) {
        if (i != 2)
            expected += test::run_ok(in_dir + cli() + " hash " + names[i]);
    }
    for (const std::string io : {"auto", "read", "mmap"}) {
        SCOPED_TRACE(io);
        CommandResult r = run(in_dir + cli() + " hash --io=" + io + args);
        EXPECT_EQ(r.exit_code, 1);
        EXPECT_EQ(r.out, expected);
        EXPECT_EQ(r.err, "qcowmap: d2.qcow2: No such file or directory\n");
    }
    CommandResult p = run(in_dir + cli() + " hash -p" + args);
    EXPECT_EQ(p.exit_code, 1);
    EXPECT_EQ(p.out, expected);
    EXPECT_EQ(std::count(p.err.begin(), p.err.end(), '\n'), 5) << p.err;
    EXPECT_NE(p.err.find("qcowmap: d2.qcow2: No such file or directory\n"), std::string::npos)
        << p.err;
}

TEST_F(Cli, ProgressOnHashAndCompare) {
    CommandResult hash = run(cli() + " hash -p " + q(image_));
    EXPECT_EQ(hash.exit_code, 0);
    EXPECT_NE(hash.err.find("(0.00/100%)"), std::string::npos) << hash.err;
    EXPECT_TRUE(hash.err.ends_with("(100.00/100%)\n")) << hash.err;
    EXPECT_EQ(hash.out.size(), 64u + 2 + image_.size() + 1);
    CommandResult compare = run(cli() + " compare -p " + q(image_) + " " + q(image_));
    EXPECT_EQ(compare.exit_code, 0);
    EXPECT_EQ(compare.out, "Images are identical.\n");
    EXPECT_TRUE(compare.err.ends_with("(100.00/100%)\n")) << compare.err;
    CommandResult manifest = run(cli() + " hash -p --block-size=1M " + q(image_));
    EXPECT_TRUE(manifest.err.ends_with("(100.00/100%)\n")) << manifest.err;
}

TEST_F(Cli, ConvertFollowsQemuImgsOptions) {
    auto raw = dir_ / "qemu.raw";
    test::run_ok("qemu-img convert -O raw " + q(image_) + " " + q(raw));
    // -f is the source format, -O the output format.
    auto out = dir_ / "out.raw";
    CommandResult r = run(cli() + " convert -f qcow2 -O raw " + q(image_) + " " + q(out));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_TRUE(test::read_file(out) == test::read_file(raw));
    // A raw source.
    auto again = dir_ / "again.raw";
    r = run(cli() + " convert -f raw " + q(raw) + " " + q(again));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_TRUE(test::read_file(again) == test::read_file(raw));
    // -O qcow2 comes with the writer; until then it says so.
    r = run(cli() + " convert -O qcow2 " + q(image_) + " " + q(dir_ / "out.qcow2"));
    if (r.exit_code == 1) {
        EXPECT_EQ(r.err, "qcowmap: usage: -O qcow2 is not supported yet (this build writes: raw) "
                         "(see qcowmap convert --help)\n");
        EXPECT_FALSE(std::filesystem::exists(dir_ / "out.qcow2"));
    }
    r = run(cli() + " convert -O vmdk " + q(image_) + " " + q(dir_ / "out.vmdk"));
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_TRUE(r.err.starts_with("qcowmap: usage: -O: 'vmdk' is not one of ")) << r.err;
    // - is standard output: into a pipe, the whole disk.
    r = run(cli() + " convert -p " + q(image_) + " - | cmp - " + q(raw));
    EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
    EXPECT_TRUE(r.err.ends_with("(100.00/100%)\n")) << r.err;
    EXPECT_FALSE(std::filesystem::exists(dir_ / "-"));
    // ... and into a file by redirection.
    auto redirected = dir_ / "redirected.raw";
    r = run(cli() + " convert " + q(image_) + " - > " + q(redirected));
    EXPECT_EQ(r.exit_code, 0) << r.err;
    EXPECT_TRUE(test::read_file(redirected) == test::read_file(raw));
    // A directory gets a clear error; /dev/null needs no --force.
    r = run(cli() + " convert " + q(image_) + " " + q(dir_.path()));
    EXPECT_EQ(r.exit_code, 3);
    EXPECT_EQ(r.err, "qcowmap: " + dir_.path().string() +
                         ": is a directory (convert writes one file: name it)\n");
    r = run(cli() + " convert " + q(image_) + " /dev/null");
    EXPECT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(r.err, "");
    // --force is long-only.
    test::write_file(out, {});
    r = run(cli() + " convert --force " + q(image_) + " " + q(out));
    EXPECT_EQ(r.exit_code, 0) << r.err;
    EXPECT_TRUE(test::read_file(out) == test::read_file(raw));
}

TEST_F(Cli, CatTakesARangeAndRefusesATerminal) {
    auto raw = dir_ / "qemu.raw";
    test::run_ok("qemu-img convert -O raw " + q(image_) + " " + q(raw));
    const std::vector<std::byte> disk = test::read_file(raw);
    auto slice = dir_ / "slice.raw";
    CommandResult r =
        run(cli() + " cat --start-offset=3M --max-length=1.5M " + q(image_) + " > " + q(slice));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    const std::vector<std::byte> got = test::read_file(slice);
    ASSERT_EQ(got.size(), 1536u * 1024);
    EXPECT_TRUE(std::equal(got.begin(), got.end(), disk.begin() + (3 << 20)));
    // A range past the end is cut there.
    r = run(cli() + " cat --start-offset=8M-64k " + q(image_) + " >/dev/null");
    EXPECT_EQ(r.exit_code, 1);
    r = run(cli() + " cat --start-offset=8128k --max-length=1M " + q(image_) + " | wc -c");
    EXPECT_EQ(r.out, "65536\n");
    // A terminal: script(1) gives cat one.
    r = run("script -qec " + shell_quote(cli() + " cat " + q(image_)) + " /dev/null");
    EXPECT_NE(r.exit_code, 0);
    EXPECT_NE(r.out.find("qcowmap: <stdout>: is a terminal: refusing to write a disk image to it "
                         "(redirect the output, or use --force)"),
              std::string::npos)
        << r.out;
}

TEST(CliErrors, LibraryErrorsNameTheFile) {
    auto image = Image::open("no-such-image.qcow2");
    ASSERT_FALSE(image);
    EXPECT_EQ(image.error().code, ErrorCode::io_error);
    EXPECT_EQ(image.error().message, "no-such-image.qcow2: No such file or directory");
    // The CLI does not name it twice.
    CommandResult r = run(cli() + " info no-such-image.qcow2");
    EXPECT_EQ(r.err, "qcowmap: no-such-image.qcow2: No such file or directory\n");
}

} // namespace
} // namespace qcowmap

// Issue 25: never a wrong backup, never a read of an image in use. convert -B writes exactly
// what makes the output read as the source (judged by qemu-img compare), QEMU's image locks
// against a live qemu-io, usage errors exit 1 everywhere, format probing as qemu-img does,
// -S 0 fully allocated, and the small promises of the command line.
#include "image_lock.hpp"
#include "support.hpp"

#include <qcowmap/check.hpp>
#include <qcowmap/hash.hpp>
#include <qcowmap/image.hpp>
#include <qcowmap/writable.hpp>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <csignal>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <string>
#include <thread>

namespace qcowmap {
namespace {

using test::cli;
using test::CommandResult;
using test::q;
using test::run;
using test::run_ok;
using test::TempDir;

/// qemu-img compare's exit code (0 identical, 1 different).
int qemu_compare(const std::filesystem::path& a, const std::filesystem::path& b) {
    return run("qemu-img compare -q " + q(a) + " " + q(b)).exit_code;
}

/// qemu-img check must find no corruption and no leak in what we write.
void expect_clean(const std::filesystem::path& image) {
    CommandResult r = run("qemu-img check " + q(image));
    EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
}

/// The backing file name stored in `image`, as qemu-img reads it ("" when none).
std::string backing_of(const std::filesystem::path& image) {
    return run_ok("qemu-img info -U --output=json " + q(image) +
                  " | sed -n 's/^ *\"backing-filename\": \"\\(.*\\)\",$/\\1/p'");
}

// ---- convert -O qcow2 -B BACKING ----

class ConvertBacking : public ::testing::Test {
  protected:
    void SetUp() override {
        // BACKING: 0xaa everywhere but one hole (unallocated) at 6M.
        test::make_image(dir_ / "base.qcow2", "cluster_size=64k", "8M",
                         {"write -P 0xaa 0 6M", "write -P 0xaa 7M 1M"});
    }
    /// Converts `source` with -B base.qcow2 (relative: found next to the target) into
    /// out.qcow2 and checks that it reads exactly as `source`, as qemu-img compare says.
    void convert_and_compare(const std::filesystem::path& source, const std::string& extra = "") {
        const auto out = dir_ / "out.qcow2";
        std::filesystem::remove(out);
        CommandResult r = run(cli() + " convert -O qcow2 -B base.qcow2 -F qcow2 " + extra + " " +
                              q(source) + " " + q(out));
        ASSERT_EQ(r.exit_code, 0) << r.err;
        EXPECT_EQ(backing_of(out), "base.qcow2\n");
        EXPECT_EQ(qemu_compare(source, out), 0) << "the output does not read as its source";
        expect_clean(out);
    }
    TempDir dir_;
};

// The issue's case: a flat image (qemu-img convert of an overlay) whose zeros hide BACKING's
// data. Before the fix only the source's top layer was written: BACKING's 0xaa showed through
// the zeros (qemu-img compare: "Content mismatch at offset 2097152").
TEST_F(ConvertBacking, FlatSourceWhoseZerosHideBackingData) {
    test::make_image(dir_ / "top.qcow2",
                     "backing_file=base.qcow2,backing_fmt=qcow2,cluster_size=64k", "8M",
                     {"write -z 2M 1M", "write -P 0xbb 4M 64k", "write -P 0xcc 6M 64k"});
    run_ok("qemu-img convert -O qcow2 " + q(dir_ / "top.qcow2") + " " + q(dir_ / "flat.qcow2"));
    ASSERT_EQ(backing_of(dir_ / "flat.qcow2"), "");
    convert_and_compare(dir_ / "flat.qcow2");
    // What qemu-img convert -B writes reads the same.
    run_ok("cd " + q(dir_.path()) + " && qemu-img convert -O qcow2 -B base.qcow2 -F qcow2 " +
           "flat.qcow2 qemu.qcow2");
    EXPECT_EQ(qemu_compare(dir_ / "qemu.qcow2", dir_ / "out.qcow2"), 0);
    // Only what differs from BACKING is stored: the unchanged 0xaa clusters are not.
    const std::string map = run_ok("qemu-img map --output=json " + q(dir_ / "out.qcow2"));
    EXPECT_NE(map.find(R"("start": 0, "length": 2097152, "depth": 1)"), std::string::npos) << map;
}

// A source that is an overlay of BACKING itself (the same file): the fast path writes what
// its top layer allocates, nothing read from BACKING.
TEST_F(ConvertBacking, OverlayOfBackingKeepsTheFastPath) {
    test::make_image(dir_ / "top.qcow2",
                     "backing_file=base.qcow2,backing_fmt=qcow2,cluster_size=64k", "8M",
                     {"write -z 2M 64k", "write -P 0xbb 4M 128k"});
    convert_and_compare(dir_ / "top.qcow2");
    // Exactly the top's clusters: the zero cluster at 2M and the data at 4M.
    const std::string map = run_ok("qemu-img map --output=json " + q(dir_ / "out.qcow2"));
    const std::string top = run_ok("qemu-img map --output=json " + q(dir_ / "top.qcow2"));
    auto depth0 = [](const std::string& json) {
        std::string kept;
        std::size_t at = 0;
        while ((at = json.find("\"depth\": 0", at)) != std::string::npos) {
            const std::size_t line = json.rfind('{', at);
            kept += json.substr(line, json.find(", \"depth\"", line) - line) + "\n";
            ++at;
        }
        return kept;
    };
    EXPECT_EQ(depth0(map), depth0(top)) << map;
}

// An overlay of another file than BACKING (a copy with other data): its backing chain's data
// differs from BACKING's and must be written. Before the fix: only the top layer.
TEST_F(ConvertBacking, OverlayOfAnotherBackingFile) {
    test::make_image(dir_ / "other.qcow2", "cluster_size=64k", "8M", {"write -P 0x11 1M 2M"});
    test::make_image(dir_ / "top.qcow2",
                     "backing_file=other.qcow2,backing_fmt=qcow2,cluster_size=64k", "8M",
                     {"write -P 0xbb 4M 64k"});
    convert_and_compare(dir_ / "top.qcow2");
}

// Sources shorter and longer than BACKING: past BACKING's end the output reads zeros from
// below, so the source's data there must be stored; short of it, BACKING's data past the
// source's end does not matter.
TEST_F(ConvertBacking, ShorterAndLongerSources) {
    test::make_image(dir_ / "short.qcow2", "cluster_size=64k", "3M", {"write -P 0xaa 0 1M"});
    convert_and_compare(dir_ / "short.qcow2");
    EXPECT_EQ(run_ok("qemu-img info --output=json " + q(dir_ / "out.qcow2") +
                     " | grep -o '\"virtual-size\": [0-9]*'"),
              "\"virtual-size\": 3145728\n");
    test::make_image(dir_ / "long.qcow2", "cluster_size=64k", "16M",
                     {"write -P 0xaa 0 1M", "write -P 0x77 12M 1M"});
    convert_and_compare(dir_ / "long.qcow2");
    // A flat source with a raw BACKING, and compressed source clusters.
    run_ok("qemu-img convert -O raw " + q(dir_ / "base.qcow2") + " " + q(dir_ / "base.raw"));
    run_ok("qemu-img convert -c -O qcow2 " + q(dir_ / "long.qcow2") + " " + q(dir_ / "c.qcow2"));
    const auto out = dir_ / "out2.qcow2";
    CommandResult r =
        run(cli() + " convert -O qcow2 -B base.raw -F raw " + q(dir_ / "c.qcow2") + " " + q(out));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(qemu_compare(dir_ / "c.qcow2", out), 0);
    expect_clean(out);
}

// qemu-img opens BACKING as the new image will find it, and refuses what it cannot open.
TEST_F(ConvertBacking, BackingIsOpenedWhereTheOutputWillLook) {
    test::make_image(dir_ / "src.qcow2", "cluster_size=64k", "8M", {"write -P 0x22 0 64k"});
    std::filesystem::create_directory(dir_ / "sub");
    std::filesystem::copy_file(dir_ / "base.qcow2", dir_ / "sub" / "base.qcow2");
    // From the parent directory, "sub/base.qcow2" stored in sub/out.qcow2 means
    // sub/sub/base.qcow2: refused as qemu-img refuses it, and nothing is written.
    CommandResult r = run("cd " + q(dir_.path()) + " && " + cli() +
                          " convert -O qcow2 -B sub/base.qcow2 -F qcow2 src.qcow2 sub/out.qcow2");
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_EQ(r.err, "qcowmap: sub/out.qcow2: Could not open backing file: sub/sub/base.qcow2: "
                     "No such file or directory\n");
    EXPECT_FALSE(std::filesystem::exists(dir_ / "sub" / "out.qcow2"));
    r = run(cli() + " convert -O qcow2 -B /nonexistent.qcow2 -F qcow2 " + q(dir_ / "src.qcow2") +
            " " + q(dir_ / "o.qcow2"));
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_NE(r.err.find("Could not open backing file: /nonexistent.qcow2: No such file"),
              std::string::npos)
        << r.err;
    EXPECT_FALSE(std::filesystem::exists(dir_ / "o.qcow2"));
    // A BACKING that is not in the format -F names.
    r = run(cli() + " convert -O qcow2 -B base.qcow2 -F raw " + q(dir_ / "src.qcow2") + " " +
            q(dir_ / "o.qcow2"));
    EXPECT_EQ(r.exit_code, 0) << r.err; // a qcow2 file read as raw is a valid raw backing file
    EXPECT_EQ(qemu_compare(dir_ / "src.qcow2", dir_ / "o.qcow2"), 0);
    // -u: qemu's unsafe mode, BACKING not opened; the top layer only.
    r = run(cli() + " convert -O qcow2 -u -B /nonexistent.qcow2 -F qcow2 " + q(dir_ / "src.qcow2") +
            " " + q(dir_ / "u.qcow2"));
    EXPECT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(run_ok("qemu-img info -U --output=json " + q(dir_ / "u.qcow2") +
                     " | grep -o '\"backing-filename\": \"[^\"]*\"'"),
              "\"backing-filename\": \"/nonexistent.qcow2\"\n");
    // --force cannot make an image its own backing file.
    r = run(cli() + " convert -O qcow2 --force -B base.qcow2 -F qcow2 " + q(dir_ / "src.qcow2") +
            " " + q(dir_ / "base.qcow2"));
    EXPECT_EQ(r.exit_code, 3);
    EXPECT_NE(r.err.find("an image cannot be its own backing file"), std::string::npos) << r.err;
    EXPECT_EQ(qemu_compare(dir_ / "base.qcow2", dir_ / "sub" / "base.qcow2"), 0); // untouched
    r = run(cli() + " convert -O qcow2 -u " + q(dir_ / "src.qcow2") + " " + q(dir_ / "u2.qcow2"));
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_NE(r.err.find("-u without -B"), std::string::npos) << r.err;
}

// --bitmap over a BACKING of another size: not a previous backup of this disk.
TEST_F(ConvertBacking, BitmapOverABackingOfAnotherSize) {
    test::make_image(dir_ / "src.qcow2", "cluster_size=64k", "16M", {"write -P 0x22 0 64k"});
    run_ok("qemu-img bitmap --add " + q(dir_ / "src.qcow2") + " b0");
    CommandResult r = run(cli() + " convert -O qcow2 --bitmap=b0 -B base.qcow2 -F qcow2 " +
                          q(dir_ / "src.qcow2") + " " + q(dir_ / "inc.qcow2"));
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_NE(r.err.find("is 8388608 bytes but the disk is 16777216 bytes"), std::string::npos)
        << r.err;
    EXPECT_FALSE(std::filesystem::exists(dir_ / "inc.qcow2"));
}

// ---- QEMU's image locks ----

/// A qemu-io holding `image` open for writing (as a running VM would) until destroyed; bounded
/// by timeout in any case.
class LiveWriter {
  public:
    explicit LiveWriter(const std::filesystem::path& image) {
        pid_ = std::stoi(run_ok("timeout 60 qemu-io -f qcow2 -c 'sleep 60000' " + q(image) +
                                " >/dev/null 2>&1 & echo $!"));
        if (!test::wait_for_writer_lock(image))
            ADD_FAILURE() << "qemu-io did not lock " << image;
    }
    ~LiveWriter() {
        ::kill(pid_, SIGTERM); // timeout, which passes it on to qemu-io
        for (int i = 0; i < 100 && ::kill(pid_, 0) == 0; ++i)
            std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }

  private:
    pid_t pid_ = 0;
};

class Locks : public ::testing::Test {
  protected:
    void SetUp() override {
        image_ = dir_ / "disk.qcow2";
        test::make_image(image_, "cluster_size=64k", "4M", {"write -P 0xab 0 1M"});
    }
    TempDir dir_;
    std::filesystem::path image_;
};

// Before: info, check, hash exited 0 (hash printed a digest of a half-written state) and
// convert failed with "lies beyond end of file". Now every reading command refuses with
// qemu's words, and reads with -U.
TEST_F(Locks, EveryReadingCommandRefusesAnImageAWriterHolds) {
    LiveWriter writer(image_);
    const std::string img = q(image_);
    const std::string out = q(dir_ / "out.raw");
    const std::vector<std::string> commands = {
        "info " + img,
        "map " + img,
        "cat " + img + " >/dev/null",
        "convert " + img + " " + out,
        "bitmaps " + img,
        "hash " + img,
        "check " + img,
        "compare " + img + " " + img,
    };
    for (const std::string& command : commands) {
        CommandResult r = run(cli() + " " + command);
        EXPECT_NE(r.exit_code, 0) << command;
        EXPECT_NE(r.err.find("Failed to get shared \"write\" lock: is another process using "
                             "the image? (-U reads it anyway"),
                  std::string::npos)
            << command << ": " << r.err;
        std::filesystem::remove(dir_ / "out.raw");
        CommandResult shared = run(cli() + " " + command.substr(0, command.find(' ')) + " -U" +
                                   command.substr(command.find(' ')));
        EXPECT_EQ(shared.exit_code, 0) << command << " -U: " << shared.err;
        std::filesystem::remove(dir_ / "out.raw");
    }
    // The library: image_in_use, and force_share opens.
    auto image = Image::open(image_);
    ASSERT_FALSE(image);
    EXPECT_EQ(image.error().code, ErrorCode::image_in_use);
    OpenOptions shared;
    shared.force_share = true;
    EXPECT_TRUE(Image::open(image_, shared));
    // A backing file a writer holds (qemu-img commit would): the overlay refuses too.
    test::make_image(dir_ / "top.qcow2", "backing_file=disk.qcow2,backing_fmt=qcow2", "4M");
    CommandResult r = run(cli() + " info --backing-chain " + q(dir_ / "top.qcow2"));
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_NE(r.err.find("backing file"), std::string::npos) << r.err;
}

// While we read, qemu's writers are kept out (we deny "write", as qemu-img does).
TEST_F(Locks, OurReaderKeepsQemuWritersOut) {
    auto image = Image::open(image_);
    ASSERT_TRUE(image) << image.error().message;
    CommandResult r = run("timeout 60 qemu-io -f qcow2 -c 'write -P 0x55 2M 64k' " + q(image_));
    EXPECT_NE(r.exit_code, 0);
    EXPECT_NE((r.out + r.err).find("Failed to get \"write\" lock"), std::string::npos)
        << r.out << r.err;
    // Other readers are welcome.
    EXPECT_EQ(run("qemu-img info " + q(image_)).exit_code, 0);
    auto second = Image::open(image_);
    EXPECT_TRUE(second);
}

// With -U (force_share) a change under the reader is reported as such, never as corruption
// or "lies beyond end of file": qemu-io allocates an L2 table past the end we mapped.
TEST_F(Locks, AChangeUnderAForcedReaderIsReportedAsSuch) {
    OpenOptions shared;
    shared.force_share = true;
    auto image = Image::open(image_, shared);
    ASSERT_TRUE(image) << image.error().message;
    EXPECT_FALSE(image->changed_since_open());
    run_ok("qemu-io -f qcow2 -c 'write -P 0x55 3M 64k' " + q(image_));
    EXPECT_TRUE(image->changed_since_open());
    auto digest = hash_image(*image);
    ASSERT_FALSE(digest);
    EXPECT_EQ(digest.error().code, ErrorCode::image_changed) << digest.error().message;
    EXPECT_NE(digest.error().message.find("image changed while being read"), std::string::npos);
    // The extent walk meets the new L2 table beyond the mapped end: the change, not corruption.
    auto extents = image->extents();
    for (const Extent& e : extents)
        (void)e;
    ASSERT_TRUE(extents.error());
    EXPECT_EQ(extents.error()->code, ErrorCode::image_changed) << extents.error()->message;
    CheckOptions check;
    check.force_share = true;
    EXPECT_TRUE(check_image(image_, check)); // a fresh look at the quiet image is fine
}

// The writer side (for the in-place writer of issue 27): qemu's readers and writers are kept
// out while we hold it, and a qemu reader already there keeps us out, in qemu's words.
TEST_F(Locks, WriterSideAsQemuIo) {
    {
        const int fd = ::open(image_.c_str(), O_RDWR | O_CLOEXEC);
        ASSERT_GE(fd, 0);
        ASSERT_TRUE(detail::lock_image(fd, detail::kWriterLock));
        CommandResult info = run("qemu-img info " + q(image_));
        EXPECT_NE(info.exit_code, 0);
        EXPECT_NE(info.err.find("Failed to get shared \"write\" lock"), std::string::npos)
            << info.err;
        auto reader = Image::open(image_);
        ASSERT_FALSE(reader);
        EXPECT_EQ(reader.error().code, ErrorCode::image_in_use);
        // A second writer in the same process is refused as well (its own open file).
        const int other = ::open(image_.c_str(), O_RDWR | O_CLOEXEC);
        auto second = detail::lock_image(other, detail::kWriterLock);
        ASSERT_FALSE(second);
        EXPECT_EQ(second.error().message,
                  "Failed to get \"write\" lock: is another process using the image?");
        ::close(other);
        ::close(fd); // releases it
    }
    EXPECT_EQ(run("qemu-img info " + q(image_)).exit_code, 0);
    // A qemu reader holds it: we cannot become its writer.
    const pid_t qemu = std::stoi(run_ok("timeout 60 qemu-io -r -f qcow2 -c 'sleep 60000' " +
                                        q(image_) + " >/dev/null 2>&1 & echo $!"));
    struct stat st {};
    ASSERT_EQ(::stat(image_.c_str(), &st), 0);
    const std::string inode = ":" + std::to_string(st.st_ino) + " ";
    for (int i = 0; i < 200; ++i) { // until qemu-io's locks show in /proc/locks
        if (test::read_text("/proc/locks").find(inode) != std::string::npos)
            break;
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    const int fd = ::open(image_.c_str(), O_RDWR | O_CLOEXEC);
    Result<void> locked = detail::lock_image(fd, detail::kWriterLock);
    ::close(fd);
    ::kill(qemu, SIGTERM);
    ASSERT_FALSE(locked);
    EXPECT_EQ(locked.error().code, ErrorCode::image_in_use);
    EXPECT_EQ(locked.error().message,
              "Failed to get \"write\" lock: is another process using the image?");
}

// A lock that fails keeps the errno of its fcntl: EAGAIN for a conflict (image_in_use, which
// to_errno gives as EAGAIN, as qemu's lock test returns), the call's own for the rest.
TEST_F(Locks, FailuresCarryTheirErrno) {
    const int fd = ::open(image_.c_str(), O_RDWR | O_CLOEXEC);
    ASSERT_GE(fd, 0);
    ASSERT_TRUE(detail::lock_image(fd, detail::kWriterLock));
    const int other = ::open(image_.c_str(), O_RDWR | O_CLOEXEC);
    ASSERT_GE(other, 0);
    auto second = detail::lock_image(other, detail::kWriterLock);
    ::close(other);
    ASSERT_FALSE(second);
    EXPECT_EQ(second.error().code, ErrorCode::image_in_use);
    EXPECT_EQ(second.error().system_errno, EAGAIN);
    EXPECT_EQ(to_errno(second.error()), EAGAIN);
    // Through Image::open and WritableImage::open, which name the file.
    auto reader = Image::open(image_);
    ASSERT_FALSE(reader);
    EXPECT_EQ(reader.error().code, ErrorCode::image_in_use);
    EXPECT_EQ(reader.error().system_errno, EAGAIN);
    EXPECT_EQ(to_errno(reader.error()), EAGAIN);
    auto writer = WritableImage::open(image_);
    ASSERT_FALSE(writer);
    EXPECT_EQ(writer.error().code, ErrorCode::image_in_use);
    EXPECT_EQ(writer.error().system_errno, EAGAIN);
    EXPECT_EQ(to_errno(writer.error()), EAGAIN);
    ::close(fd);
    // A shared (read) lock on a descriptor opened write-only: fcntl fails with EBADF.
    const int write_only = ::open(image_.c_str(), O_WRONLY | O_CLOEXEC);
    ASSERT_GE(write_only, 0);
    auto bad = detail::lock_image(write_only, detail::kReaderLock);
    ::close(write_only);
    ASSERT_FALSE(bad);
    EXPECT_EQ(bad.error().code, ErrorCode::io_error);
    EXPECT_EQ(bad.error().system_errno, EBADF);
    EXPECT_EQ(bad.error().message, "Failed to lock byte 100: Bad file descriptor");
    EXPECT_EQ(to_errno(bad.error()), EIO); // the image's own file, not an output
}

// ---- exit codes, probing, -S 0, the small items ----

// qemu-img exits 1 on a usage error; before, qcowmap exited 2, which check uses for
// "corruptions found" and compare for "could not open".
TEST(Usage, ErrorsExitOneOnEveryCommand) {
    for (std::string command : {"info a", "map a", "cat a", "convert a b", "bitmaps a", "hash a",
                                "compare a b", "check a", "mount a b"}) {
        const std::string name = command.substr(0, command.find(' '));
        CommandResult r = run(cli() + " " + name + " --bogus" + command.substr(name.size()));
        EXPECT_EQ(r.exit_code, 1) << command << ": " << r.err;
        EXPECT_EQ(r.err, "qcowmap: usage: unrecognized option '--bogus' (see qcowmap " + name +
                             " --help)\n")
            << command;
        // Before: 2, which check uses for "corruptions found" and compare for "open error".
        EXPECT_EQ(run(cli() + " " + name).exit_code, 1) << name; // a missing argument
    }
    CommandResult extra = run(cli() + " info a b");
    EXPECT_EQ(extra.exit_code, 1);
    EXPECT_EQ(extra.err, "qcowmap: usage: unexpected argument 'b' (see qcowmap info --help)\n");
    EXPECT_EQ(run(cli()).exit_code, 1);
    EXPECT_EQ(run(cli() + " frobnicate").exit_code, 1);
    EXPECT_EQ(run(cli() + " --bogus").exit_code, 1);
    for (std::string version : {"-v", "-V", "--version"}) {
        CommandResult r = run(cli() + " " + version);
        EXPECT_EQ(r.exit_code, 0) << version;
        EXPECT_EQ(r.out.rfind("qcowmap ", 0), 0u) << r.out;
    }
    CommandResult help = run(cli() + " help");
    EXPECT_EQ(help.exit_code, 0);
    EXPECT_NE(help.out.find("convert"), std::string::npos);
    CommandResult help_info = run(cli() + " help info");
    EXPECT_EQ(help_info.exit_code, 0);
    EXPECT_NE(help_info.out.find("--backing-chain"), std::string::npos) << help_info.out;
    TempDir dir;
    test::make_image(dir / "a.qcow2", "", "1M");
    CommandResult both = run(cli() + " info --json --output=human " + q(dir / "a.qcow2"));
    EXPECT_EQ(both.exit_code, 1);
    EXPECT_EQ(both.err, "qcowmap: usage: --json and --output=human contradict each other (see "
                        "qcowmap info --help)\n");
    EXPECT_TRUE(both.out.empty());
}

// qemu-img probes: the qcow magic (qcow2 and qcow version 1), else raw with a warning.
TEST(Probing, RawQcowAndQcow2OnEveryCommand) {
    TempDir dir;
    run_ok("head -c 1048576 /dev/urandom > " + q(dir / "r.raw"));
    run_ok("qemu-img create -q -f qcow " + q(dir / "v1.qcow") + " 1M && qemu-io -f qcow -c " +
           "'write -P 0x33 0 64k' " + q(dir / "v1.qcow"));
    test::make_image(dir / "v3.qcow2", "", "1M", {"write -P 0x44 0 64k"});
    const std::string sha = run_ok("sha256sum < " + q(dir / "r.raw")).substr(0, 64);
    const std::string warning = "qcowmap: " + (dir / "r.raw").string() +
                                ": WARNING: Image format was not specified and probing guessed "
                                "raw (specify -f raw to read it as raw without this warning)\n";
    CommandResult r = run(cli() + " info " + q(dir / "r.raw"));
    EXPECT_EQ(r.exit_code, 0) << r.err;
    EXPECT_NE(r.out.find("file format: raw"), std::string::npos) << r.out;
    EXPECT_EQ(r.err, warning);
    r = run(cli() + " hash " + q(dir / "r.raw"));
    EXPECT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(r.out.substr(0, 64), sha);
    r = run(cli() + " map --output=json " + q(dir / "r.raw"));
    EXPECT_EQ(r.exit_code, 0) << r.err;
    r = run(cli() + " convert " + q(dir / "r.raw") + " " + q(dir / "copy.raw"));
    EXPECT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(run_ok("sha256sum < " + q(dir / "copy.raw")).substr(0, 64), sha);
    r = run(cli() + " info -f raw " + q(dir / "r.raw"));
    EXPECT_EQ(r.exit_code, 0);
    EXPECT_EQ(r.err, ""); // said so: no warning
    // qemu-img check of raw: "This image format does not support checks", 63.
    r = run(cli() + " check " + q(dir / "r.raw"));
    EXPECT_EQ(r.exit_code, 63);
    EXPECT_NE(r.err.find("This image format does not support checks"), std::string::npos);
    // -f qcow2 on a raw file says what to do.
    r = run(cli() + " info -f qcow2 " + q(dir / "r.raw"));
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_NE(r.err.find("(use -f raw for a raw image)"), std::string::npos) << r.err;
    // qcow version 1 and qcow2 probe as themselves, silently.
    r = run(cli() + " info " + q(dir / "v1.qcow"));
    EXPECT_EQ(r.exit_code, 0) << r.err;
    EXPECT_NE(r.out.find("file format: qcow\n"), std::string::npos) << r.out;
    EXPECT_EQ(r.err, "");
    r = run(cli() + " info -f qcow " + q(dir / "v1.qcow"));
    EXPECT_EQ(r.exit_code, 0) << r.err;
    r = run(cli() + " compare " + q(dir / "v1.qcow") + " " + q(dir / "v1.qcow"));
    EXPECT_EQ(r.exit_code, 0) << r.err;
    r = run(cli() + " check " + q(dir / "v3.qcow2"));
    EXPECT_EQ(r.exit_code, 0) << r.err;
}

// qemu-img convert -S 0: "the destination image will always be fully allocated". Before, the
// zero runs stayed holes (8256 KiB used for a 16 MiB disk).
TEST(SparseZero, FullyAllocatedAsQemuImg) {
    TempDir dir;
    test::make_image(dir / "src.qcow2", "cluster_size=64k", "16M",
                     {"write -P 0xab 0 1M", "write -z 4M 1M", "write -P 0 8M 64k"});
    run_ok("qemu-img convert -S 0 -O raw " + q(dir / "src.qcow2") + " " + q(dir / "qemu.raw"));
    CommandResult r =
        run(cli() + " convert -S 0 " + q(dir / "src.qcow2") + " " + q(dir / "ours.raw"));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    struct stat qemu {
    }, ours{};
    ASSERT_EQ(::stat((dir / "qemu.raw").c_str(), &qemu), 0);
    ASSERT_EQ(::stat((dir / "ours.raw").c_str(), &ours), 0);
    EXPECT_EQ(ours.st_size, qemu.st_size);
    // Every byte allocated. st_blocks also counts the file system's own blocks (an ext4
    // extent tree block when the file was allocated in more pieces), so not equal to qemu's.
    EXPECT_GE(ours.st_blocks * 512, ours.st_size);
    EXPECT_GE(qemu.st_blocks * 512, qemu.st_size);
    EXPECT_LE(ours.st_blocks * 512, ours.st_size + 256 * 1024);
    EXPECT_EQ(qemu_compare(dir / "qemu.raw", dir / "ours.raw"), 0);
    // The default still leaves holes.
    r = run(cli() + " convert " + q(dir / "src.qcow2") + " " + q(dir / "sparse.raw"));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    struct stat sparse {};
    ASSERT_EQ(::stat((dir / "sparse.raw").c_str(), &sparse), 0);
    EXPECT_LT(sparse.st_blocks * 512, 2 << 20);
}

// A file cut short: the error names the first cluster that fails, not the start of the run
// the walk merged (before: "virtual offset 0x0" though the first MiB read fine).
TEST(Truncated, ErrorNamesTheFirstOffsetThatFails) {
    TempDir dir;
    const auto image = dir / "t.qcow2";
    test::make_image(image, "cluster_size=64k", "8M", {"write -P 0xab 0 4M"});
    const std::string map = run_ok("qemu-img map --output=json " + q(image));
    const std::size_t at = map.find("\"offset\": ");
    ASSERT_NE(at, std::string::npos) << map;
    const std::uint64_t host = std::stoull(map.substr(at + 10));
    std::filesystem::resize_file(image, host + (1 << 20) + 100); // 1 MiB and a bit of data
    for (std::string command : {"convert " + q(image) + " " + q(dir / "o.raw"), "hash " + q(image),
                                "cat " + q(image) + " >/dev/null", "map " + q(image)}) {
        CommandResult r = run(cli() + " " + command);
        EXPECT_EQ(r.exit_code, 1) << command;
        EXPECT_NE(r.err.find(fmt::format("data for virtual offset 0x100000 at host offset {:#x} ",
                                         host + (1 << 20))),
                  std::string::npos)
            << command << ": " << r.err;
        std::filesystem::remove(dir / "o.raw");
    }
}

TEST(Info, BackingFileActualPathAndNoUntrustedLine) {
    TempDir dir;
    std::filesystem::create_directory(dir / "sub");
    test::make_image(dir / "sub" / "base.qcow2", "", "1M");
    test::make_image(dir / "sub" / "top.qcow2", "backing_file=base.qcow2,backing_fmt=qcow2", "1M");
    // As qemu-img info prints it, from the parent directory and from the image's own.
    const std::string from_parent = "cd " + q(dir.path()) + " && ";
    EXPECT_EQ(run_ok(from_parent + cli() + " info sub/top.qcow2 | grep '^backing file:'"),
              run_ok(from_parent + "qemu-img info sub/top.qcow2 | grep '^backing file:'"));
    EXPECT_EQ(run_ok(from_parent + cli() + " info sub/top.qcow2 | grep '^backing file:'"),
              "backing file: base.qcow2 (actual path: sub/base.qcow2)\n");
    const std::string from_sub = "cd " + q(dir / "sub") + " && ";
    EXPECT_EQ(run_ok(from_sub + cli() + " info top.qcow2 | grep '^backing file:'"),
              "backing file: base.qcow2\n");
    EXPECT_EQ(run(cli() + " info " + q(dir / "sub" / "top.qcow2") + " | grep -c untrusted").out,
              "0\n");
    // "(1 snapshot)", not "(1 snapshots)".
    run_ok("qemu-img snapshot -c one " + q(dir / "sub" / "base.qcow2"));
    CommandResult r = run(cli() + " cat --snapshot=two " + q(dir / "sub" / "base.qcow2"));
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_NE(r.err.find("(1 snapshot)"), std::string::npos) << r.err;
}

} // namespace
} // namespace qcowmap

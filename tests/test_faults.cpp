// Issue 26, "one fault boundary for every embedder": a read of a mapping that faults (the file
// truncated under us; EIO from the file system, as a bad sector gives) is the error of the call
// that made it, and the process lives on. Truncation is made with ftruncate; EIO with eio_fs
// (tests/eio_fs.c), a FUSE pass-through whose reads fail over chosen ranges.
#include "support.hpp"

#include <qcowmap/compare.hpp>
#include <qcowmap/export.hpp>
#include <qcowmap/hash.hpp>
#include <qcowmap/image.hpp>
#include <qcowmap/map.hpp>
#include <qcowmap/qcow2.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <filesystem>
#include <string>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>
#include <vector>

namespace qcowmap {
namespace {

using test::cli;
using test::CommandResult;
using test::q;
using test::run;
using test::run_ok;
using test::TempDir;

constexpr std::uint64_t MiB = 1024 * 1024;

Image open_ok(const std::filesystem::path& path) {
    auto image = Image::open(path);
    EXPECT_TRUE(image) << image.error().message;
    return std::move(*image);
}

/// Host offset of the first data extent at or after `virtual_offset`.
std::uint64_t host_offset_of(const Image& image, std::uint64_t virtual_offset) {
    for (const Extent& e : image.extents(virtual_offset)) {
        if (e.kind == ExtentKind::data)
            return *e.host_offset;
    }
    ADD_FAILURE() << "no data extent";
    return 0;
}

/// The host offset of the first L2 table (L1[0]).
std::uint64_t first_l2_offset(const std::filesystem::path& path) {
    const std::uint64_t l1 = test::peek_be(path, 40, 8);
    return test::peek_be(path, l1, 8) & 0x00fffffffffffe00ULL;
}

void truncate_to(const std::filesystem::path& path, std::uint64_t size) {
    ASSERT_EQ(::truncate(path.c_str(), static_cast<off_t>(size)), 0);
}

/// 64 MiB disk: 8 MiB of 0xab at 32 MiB, 64 KiB clusters (metadata before the data).
class Truncated : public ::testing::Test {
  protected:
    void SetUp() override {
        path_ = dir_ / "disk.qcow2";
        test::make_image(path_, "cluster_size=64k", "64M", {"write -P 0xab 32M 8M"});
    }
    TempDir dir_;
    std::filesystem::path path_;
};

TEST_F(Truncated, ReadIsAnErrorAndTheProcessLivesOn) {
    Image image = open_ok(path_);
    const std::uint64_t data = host_offset_of(image, 32 * MiB);
    truncate_to(path_, data + 1 * MiB); // the first MiB of the data survives
    std::vector<std::byte> buffer(4 * MiB);
    auto read = image.read(buffer, 32 * MiB);
    ASSERT_FALSE(read);
    EXPECT_EQ(read.error().code, ErrorCode::image_changed);
    EXPECT_NE(read.error().message.find("image changed while being read"), std::string::npos)
        << read.error().message;
    EXPECT_NE(read.error().message.find("shrank under its mapping"), std::string::npos);
    // The top image is not named again (the caller's message names it).
    EXPECT_EQ(read.error().message.find(path_.string()), std::string::npos) << read.error().message;
    // The same image keeps serving what can still be read, and fails the rest again.
    auto ok = image.read(std::span(buffer).first(64 * 1024), 32 * MiB);
    ASSERT_TRUE(ok) << ok.error().message;
    EXPECT_EQ(buffer[0], std::byte{0xab});
    ASSERT_TRUE(image.read(buffer, 0));
    EXPECT_EQ(buffer[0], std::byte{0});
    EXPECT_FALSE(image.read(buffer, 36 * MiB));
}

TEST_F(Truncated, ExtentWalkOverLostTablesFails) {
    Image image = open_ok(path_);
    truncate_to(path_, first_l2_offset(path_));
    auto range = image.extents();
    std::uint64_t seen = 0;
    for (const Extent& e : range)
        seen += e.length;
    ASSERT_TRUE(range.error());
    EXPECT_EQ(range.error()->code, ErrorCode::image_changed);
    EXPECT_NE(range.error()->message.find("shrank"), std::string::npos) << range.error()->message;
    EXPECT_EQ(seen, 0u);
}

TEST_F(Truncated, HashMapCompareExportAndTheCApiFail) {
    Image image = open_ok(path_);
    // A copy of the same disk to compare against (the same file would be skipped unread).
    run_ok("cp " + q(path_) + " " + q(dir_ / "copy.qcow2"));
    auto copy = Image::open(dir_ / "copy.qcow2");
    ASSERT_TRUE(copy);
    // The C API's handle, opened while the file is whole.
    const int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
    ASSERT_GE(fd, 0);
    const char* error = nullptr;
    struct qcow2* c_image = qcow2_open(fd, &error);
    ASSERT_NE(c_image, nullptr) << error;
    const std::uint64_t data = host_offset_of(image, 32 * MiB);
    truncate_to(path_, data + 1 * MiB);
    for (unsigned threads : {1u, 2u}) {
        for (DataAccess access : {DataAccess::mapping, DataAccess::read}) {
            HashOptions options;
            options.threads = threads;
            options.data_access = access;
            auto digest = hash_image(image, options);
            ASSERT_FALSE(digest) << threads;
            EXPECT_EQ(digest.error().code, ErrorCode::image_changed);
        }
    }
    // /dev/null never reads what it is given: the export must read it anyway.
    for (unsigned threads : {1u, 2u}) {
        const int null = ::open("/dev/null", O_WRONLY | O_CLOEXEC);
        ASSERT_GE(null, 0);
        ExportOptions options;
        options.threads = threads;
        options.data_access = DataAccess::mapping;
        auto exported = export_raw(image, null, options);
        ::close(null);
        ASSERT_FALSE(exported) << threads;
        EXPECT_EQ(exported.error().code, ErrorCode::image_changed) << exported.error().message;
    }
    auto compared = compare_images(image, *copy);
    ASSERT_FALSE(compared);
    EXPECT_EQ(compared.error().code, ErrorCode::image_changed);
    EXPECT_EQ(compared.error().stage, ErrorStage::read);

    std::vector<char> buffer(2 * MiB);
    EXPECT_EQ(qcow2_read(c_image, buffer.data(), buffer.size(), 32 * MiB), -1);
    EXPECT_EQ(errno, EIO);
    EXPECT_NE(std::string(qcowmap_last_error()).find("shrank"), std::string::npos)
        << errno << qcowmap_last_error();
    EXPECT_EQ(qcow2_read(c_image, buffer.data(), 4096, 0), 4096);
    qcow2_close(c_image);
}

TEST_F(Truncated, CompressedClustersFail) {
    const auto compressed = dir_ / "compressed.qcow2";
    run_ok("qemu-img convert -c -O qcow2 " + q(path_) + " " + q(compressed));
    Image image = open_ok(compressed);
    std::uint64_t stream = 0;
    for (const Extent& e : image.extents()) {
        if (e.kind == ExtentKind::compressed) {
            stream = e.compressed_host_offset;
            break;
        }
    }
    ASSERT_NE(stream, 0u);
    truncate_to(compressed, stream);
    std::vector<std::byte> buffer(64 * 1024);
    auto read = image.read(buffer, 32 * MiB);
    ASSERT_FALSE(read);
    EXPECT_EQ(read.error().code, ErrorCode::image_changed) << read.error().message;
}

/// The process ended on the fault: SIGBUS by default, or whatever a handler installed before
/// ours does with it (a sanitizer's report and exit).
bool died(int status) {
    return (WIFSIGNALED(status) && WTERMSIG(status) == SIGBUS) ||
           (WIFEXITED(status) && WEXITSTATUS(status) != 0);
}

// Outside the boundary nothing changes: the caller's own access to the mapping (an extent's
// bytes, a visitor of Image::visit) is the caller's, and an uncontained SIGBUS still ends the
// process, by the default action or the handler installed before ours.
TEST_F(Truncated, TheCallersOwnAccessIsNotContained) {
    Image image = open_ok(path_);
    const std::uint64_t data = host_offset_of(image, 32 * MiB);
    truncate_to(path_, data);
    EXPECT_EXIT(
        {
            for (const Extent& e : image.extents(32 * MiB)) {
                volatile std::byte b = e.bytes[0];
                (void)b;
            }
            std::exit(0);
        },
        died, "");
    EXPECT_EXIT(
        {
            (void)image.visit(32 * MiB, 33 * MiB, [](const qcowmap::Run& run) -> Result<void> {
                volatile std::byte b = run.bytes[0];
                (void)b;
                return {};
            });
            std::exit(0);
        },
        died, "");
}

// -------------------------------------------------------------------------------------------
// EIO from the file system, through eio_fs.

class Eio : public ::testing::Test {
  protected:
    void SetUp() override {
        source_ = dir_ / "source";
        std::filesystem::create_directories(source_);
        test::make_image(source_ / "disk.qcow2", "cluster_size=64k", "64M",
                         {"write -P 0xab 32M 8M", "write -P 0xcd 0 64k"});
        mount_.emplace(source_, dir_ / "mnt");
        if (!mount_->mounted())
            GTEST_SKIP() << "eio_fs could not mount (no /dev/fuse or QCOWMAP_EIO_FS unset)";
        image_path_ = dir_ / "mnt" / "disk.qcow2";
    }
    void TearDown() override { mount_.reset(); }

    /// Reads of disk.qcow2 over [offset, offset + length) fail with EIO from now on.
    void fail_reads(std::uint64_t offset, std::uint64_t length) {
        mount_->fail_reads("disk.qcow2", offset, length);
    }

    TempDir dir_;
    std::filesystem::path source_;
    std::filesystem::path image_path_;
    std::optional<test::EioMount> mount_;
};

TEST_F(Eio, ReadHashExportAndTheCApiGetAnIoError) {
    std::uint64_t data = 0;
    {
        auto probe = Image::open(source_ / "disk.qcow2");
        ASSERT_TRUE(probe);
        data = host_offset_of(*probe, 32 * MiB);
    }
    fail_reads(data + 2 * MiB, 64 * 1024);
    Image image = open_ok(image_path_);
    std::vector<std::byte> buffer(4 * MiB);
    auto read = image.read(buffer, 32 * MiB);
    ASSERT_FALSE(read);
    EXPECT_EQ(read.error().code, ErrorCode::io_error);
    EXPECT_NE(read.error().message.find("I/O error"), std::string::npos) << read.error().message;
    EXPECT_NE(read.error().message.find("Input/output error"), std::string::npos)
        << read.error().message;
    EXPECT_EQ(read.error().message.find("shrank"), std::string::npos) << read.error().message;
    // The fault's errno is the file system's, kept in the error; a source that cannot be read
    // is EIO for the C API and Python as well.
    EXPECT_EQ(read.error().system_errno, EIO);
    EXPECT_EQ(to_errno(read.error()), EIO);
    // Around the bad range, the disk reads.
    auto ok = image.read(std::span(buffer).first(64 * 1024), 0);
    ASSERT_TRUE(ok) << ok.error().message;
    EXPECT_EQ(buffer[0], std::byte{0xcd});
    ok = image.read(std::span(buffer).first(MiB), 32 * MiB);
    ASSERT_TRUE(ok) << ok.error().message;
    EXPECT_EQ(buffer[0], std::byte{0xab});

    HashOptions hash;
    hash.threads = 2;
    hash.data_access = DataAccess::mapping;
    auto digest = hash_image(image, hash);
    ASSERT_FALSE(digest);
    EXPECT_EQ(digest.error().code, ErrorCode::io_error);

    const int null = ::open("/dev/null", O_WRONLY | O_CLOEXEC);
    ASSERT_GE(null, 0);
    ExportOptions options;
    options.threads = 1;
    options.data_access = DataAccess::mapping;
    auto exported = export_raw(image, null, options);
    ::close(null);
    ASSERT_FALSE(exported);
    EXPECT_NE(exported.error().message.find("Input/output error"), std::string::npos)
        << exported.error().message;

    const int fd = ::open(image_path_.c_str(), O_RDONLY | O_CLOEXEC);
    ASSERT_GE(fd, 0);
    const char* error = nullptr;
    struct qcow2* c_image = qcow2_open(fd, &error);
    ASSERT_NE(c_image, nullptr) << error;
    EXPECT_EQ(qcow2_read(c_image, buffer.data(), 4 * MiB, 32 * MiB), -1);
    EXPECT_EQ(errno, EIO);
    EXPECT_EQ(qcow2_read(c_image, buffer.data(), 4096, 0), 4096);
    qcow2_close(c_image);
}

TEST_F(Eio, OpenFailsWhenTheHeaderCannotBeRead) {
    fail_reads(0, 512);
    auto image = Image::open(image_path_);
    ASSERT_FALSE(image);
    EXPECT_EQ(image.error().code, ErrorCode::io_error);
    EXPECT_NE(image.error().message.find("Input/output error"), std::string::npos)
        << image.error().message;
}

} // namespace
} // namespace qcowmap

namespace qcowmap {
namespace {

using test::cli;
using test::CommandResult;

/// The names in `dir`, hidden ones included, sorted.
std::vector<std::string> names_in(const std::filesystem::path& dir) {
    std::vector<std::string> names;
    for (const auto& entry : std::filesystem::directory_iterator(dir))
        names.push_back(entry.path().filename().string());
    std::sort(names.begin(), names.end());
    return names;
}

// -------------------------------------------------------------------------------------------
// /dev/null is not an excuse: data that cannot be read fails the command whatever the target.

TEST_F(Eio, CliCommandsFailWhateverTheTarget) {
    std::uint64_t data = 0;
    {
        auto probe = Image::open(source_ / "disk.qcow2");
        ASSERT_TRUE(probe);
        data = host_offset_of(*probe, 32 * MiB);
    }
    fail_reads(data + 2 * MiB, 4096);
    for (const std::string& command :
         {"cat " + q(image_path_) + " > /dev/null",
          "convert --io=mmap " + q(image_path_) + " /dev/null",
          "convert --io=read " + q(image_path_) + " /dev/null",
          "convert " + q(image_path_) + " - | cat > /dev/null", "hash " + q(image_path_)}) {
        CommandResult r = run("bash -o pipefail -c " + test::shell_quote(cli() + " " + command));
        EXPECT_NE(r.exit_code, 0) << command;
        EXPECT_NE(r.err.find("Input/output error"), std::string::npos) << command << ": " << r.err;
        EXPECT_EQ(r.err.find("shrank"), std::string::npos) << command << ": " << r.err;
        EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << command << ": " << r.err;
    }
}

TEST_F(Eio, MountFailsThatReadAndStaysUp) {
    if (::geteuid() != 0)
        GTEST_SKIP() << "mounting needs root here";
    // Compressed: the clusters are read through the mapping (metadata and compressed streams
    // are, data runs are spliced from the file).
    // 0xcd at 0 stays a plain data cluster, away from the pages of the compressed streams.
    test::make_image(source_ / "c.qcow2", "cluster_size=64k", "64M",
                     {"write -P 0xcd 0 64k", "write -c -P 0xab 32M 1M"});
    std::uint64_t stream = 0;
    {
        auto probe = Image::open(source_ / "c.qcow2");
        ASSERT_TRUE(probe);
        for (const Extent& e : probe->extents(32 * MiB)) {
            if (e.kind == ExtentKind::compressed) {
                stream = e.compressed_host_offset;
                break;
            }
        }
    }
    ASSERT_NE(stream, 0u);
    mount_->fail_reads("c.qcow2", stream, 1);
    const auto mnt = dir_ / "disk-mnt";
    std::filesystem::create_directories(mnt);
    CommandResult r = run(cli() + " mount " + q(dir_ / "mnt" / "c.qcow2") + " " + q(mnt));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    struct Unmount {
        std::filesystem::path at;
        ~Unmount() { ::umount2(at.c_str(), MNT_DETACH); }
    } unmount{mnt};
    r = run("dd if=" + q(mnt / "disk") + " bs=64k skip=512 count=16 iflag=direct of=/dev/null");
    EXPECT_NE(r.exit_code, 0);
    EXPECT_NE(r.err.find("Input/output error"), std::string::npos) << r.err;
    // The mount is still there and serves the rest.
    r = run("dd if=" + q(mnt / "disk") + " bs=64k count=1 status=none | od -An -tx1 | head -1");
    EXPECT_EQ(r.exit_code, 0) << r.err;
    EXPECT_NE(r.out.find("cd cd cd cd"), std::string::npos) << r.out << r.err;
    EXPECT_TRUE(std::filesystem::exists(mnt / "disk"));
}

// -------------------------------------------------------------------------------------------
// Atomic output on every file system: bindfs (FUSE) has neither O_TMPFILE nor
// RENAME_NOREPLACE, as NFS has not.

/// bindfs mounted over a directory for the object's lifetime (skipped where it cannot run).
class Bindfs {
  public:
    Bindfs(const std::filesystem::path& source, const std::filesystem::path& mountpoint)
        : mountpoint_(mountpoint) {
        std::filesystem::create_directories(mountpoint);
        mounted_ = run("bindfs " + q(source) + " " + q(mountpoint)).exit_code == 0;
    }
    ~Bindfs() {
        if (mounted_)
            ::umount2(mountpoint_.c_str(), MNT_DETACH);
    }
    bool mounted() const { return mounted_; }

  private:
    std::filesystem::path mountpoint_;
    bool mounted_ = false;
};

class AtomicOutput : public ::testing::Test {
  protected:
    void SetUp() override {
        image_ = dir_ / "disk.qcow2";
        test::make_image(image_, "cluster_size=64k", "64M",
                         {"write -P 0xab 0 8M", "write -P 0xcd 32M 8M", "write -c -P 0x5e 60M 1M"});
        out_dir_ = dir_ / "out";
        std::filesystem::create_directories(out_dir_);
        mount_.emplace(out_dir_, dir_ / "mnt");
        if (!mount_->mounted())
            GTEST_SKIP() << "bindfs could not mount (apt-get install bindfs; needs /dev/fuse)";
        mnt_ = dir_ / "mnt";
    }
    void TearDown() override { mount_.reset(); }

    TempDir dir_;
    std::filesystem::path image_, out_dir_, mnt_;
    std::optional<Bindfs> mount_;
};

TEST_F(AtomicOutput, ConvertOnBindfsLeavesExactlyTheTarget) {
    for (const std::string format : {"qcow2", "raw"}) {
        const auto target = mnt_ / ("new." + format);
        CommandResult r = run(cli() + " convert -O " + format + " " + q(image_) + " " + q(target));
        ASSERT_EQ(r.exit_code, 0) << format << ": " << r.err;
        EXPECT_EQ(names_in(out_dir_), std::vector<std::string>{"new." + format}) << format;
        run_ok("qemu-img compare -f qcow2 -F " + format + " " + q(image_) + " " + q(target));
        if (format == "qcow2")
            run_ok("qemu-img check " + q(target));
        // Again without --force: refused, the file untouched, nothing left beside it.
        const auto before = test::read_file(out_dir_ / ("new." + format));
        r = run(cli() + " convert -O " + format + " " + q(image_) + " " + q(target));
        EXPECT_EQ(r.exit_code, 3) << format << ": " << r.err;
        EXPECT_NE(r.err.find("already exists"), std::string::npos) << r.err;
        EXPECT_EQ(names_in(out_dir_), std::vector<std::string>{"new." + format}) << format;
        EXPECT_TRUE(test::read_file(out_dir_ / ("new." + format)) == before) << format;
        // With --force: replaced, still alone.
        r = run(cli() + " convert --force -O " + format + " " + q(image_) + " " + q(target));
        EXPECT_EQ(r.exit_code, 0) << format << ": " << r.err;
        EXPECT_EQ(names_in(out_dir_), std::vector<std::string>{"new." + format}) << format;
        std::filesystem::remove(out_dir_ / ("new." + format));
    }
}

/// Starts `qcowmap convert` of a 1 GiB disk into the bindfs mount, waits until its hidden
/// temporary holds data, sends `signal`, and returns what the output directory holds then.
std::vector<std::string> kill_mid_copy(const std::filesystem::path& image,
                                       const std::filesystem::path& target,
                                       const std::filesystem::path& out_dir,
                                       const std::string& format, int signal) {
    const pid_t child = ::fork();
    if (child == 0) {
        // A signal ignored at exec stays ignored, and qcowmap rightly leaves it so (under
        // nohup, SIGHUP must not stop a conversion): start from the default dispositions
        // whatever the test runner ignores (a CI run started with nohup failed here).
        for (int s : {SIGHUP, SIGINT, SIGTERM})
            ::signal(s, SIG_DFL);
        const std::string bin = test::qcowmap_bin();
        const std::string image_text = image.string(), target_text = target.string();
        ::execl(bin.c_str(), bin.c_str(), "convert", "-O", format.c_str(), image_text.c_str(),
                target_text.c_str(), nullptr);
        ::_exit(127);
    }
    bool writing = false;
    for (int i = 0; i < 2000 && !writing; ++i) {
        for (const auto& entry : std::filesystem::directory_iterator(out_dir)) {
            std::error_code ec;
            if (entry.path().filename().string().starts_with(".") &&
                std::filesystem::file_size(entry.path(), ec) > 0) {
                writing = true;
            }
        }
        if (!writing)
            ::usleep(2000);
    }
    ::kill(child, signal);
    int status = 0;
    ::waitpid(child, &status, 0);
    EXPECT_TRUE(writing) << "the conversion finished (or never wrote) before the kill";
    EXPECT_TRUE(WIFSIGNALED(status)) << "status " << status;
    if (WIFSIGNALED(status)) {
        EXPECT_EQ(WTERMSIG(status), signal);
    }
    // A file unlinked while still open through FUSE is renamed .fuse_hiddenN by libfuse until
    // the kernel's release of it, which comes after the process is gone: wait for that.
    for (int i = 0; i < 500; ++i) {
        const auto names = names_in(out_dir);
        if (std::none_of(names.begin(), names.end(),
                         [](const std::string& n) { return n.starts_with(".fuse_hidden"); })) {
            break;
        }
        ::usleep(10000);
    }
    return names_in(out_dir);
}

TEST_F(AtomicOutput, KilledMidCopyLeavesNothingButSigkillsTemporary) {
    const auto big = dir_ / "big.qcow2";
    test::make_image(big, "cluster_size=64k", "1G", {"write -P 0x5a 0 1G"});
    for (const std::string format : {"raw", "qcow2"}) {
        for (int signal : {SIGINT, SIGTERM, SIGHUP}) {
            auto left = kill_mid_copy(big, mnt_ / "out.img", out_dir_, format, signal);
            EXPECT_TRUE(left.empty())
                << format << " signal " << signal << ": " << (left.empty() ? "" : left[0]);
        }
        // SIGKILL cannot be caught: the hidden temporary stays (README says so), never TARGET.
        auto left = kill_mid_copy(big, mnt_ / "out.img", out_dir_, format, SIGKILL);
        ASSERT_EQ(left.size(), 1u) << format;
        EXPECT_TRUE(left[0].starts_with(".out.img.qcowmap-")) << left[0];
        std::filesystem::remove(out_dir_ / left[0]);
    }
}

// -------------------------------------------------------------------------------------------
// Symlink targets are written through, as qemu-img writes (-O raw and -O qcow2 alike).

TEST(Targets, SymlinksAreWrittenThroughByBothFormats) {
    TempDir dir;
    const auto image = dir / "disk.qcow2";
    test::make_image(image, "", "4M", {"write -P 0x11 0 1M"});
    for (const std::string format : {"raw", "qcow2"}) {
        const auto real = dir / ("real." + format);
        const auto link = dir / ("link." + format);
        test::write_file(real, std::vector<std::byte>(10, std::byte{'x'}));
        ::chmod(real.c_str(), 0640);
        std::filesystem::create_symlink(real.filename(), link);
        CommandResult r =
            run(cli() + " convert --force -O " + format + " " + q(image) + " " + q(link));
        ASSERT_EQ(r.exit_code, 0) << format << ": " << r.err;
        EXPECT_TRUE(std::filesystem::is_symlink(link)) << format;
        run_ok("qemu-img compare -f qcow2 -F " + format + " " + q(image) + " " + q(real));
        struct stat st {};
        ASSERT_EQ(::stat(real.c_str(), &st), 0);
        EXPECT_EQ(st.st_mode & 0777, 0640u) << format << ": a replaced file keeps its mode";
    }
}

// -------------------------------------------------------------------------------------------
// A loop device over the source (or a layer) is the source: refused.

/// A loop device over `file` for the object's lifetime, detached even when the test fails.
class LoopDevice {
  public:
    explicit LoopDevice(const std::filesystem::path& file) {
        CommandResult r = run("losetup -f --show " + q(file));
        if (r.exit_code == 0)
            device_ = r.out.substr(0, r.out.find('\n'));
    }
    ~LoopDevice() {
        if (!device_.empty())
            run("losetup -d " + q(device_));
    }
    const std::string& device() const { return device_; }

  private:
    std::string device_;
};

TEST(Targets, LoopDeviceOverTheSourceIsRefused) {
    TempDir dir;
    const auto base = dir / "base.qcow2";
    test::make_image(base, "", "4M", {"write -P 0x22 0 1M"});
    const auto top = dir / "top.qcow2";
    run_ok("qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 " + q(top));
    for (const auto& backed : {top, base}) {
        const auto before = test::read_file(backed);
        LoopDevice loop(backed);
        if (loop.device().empty())
            GTEST_SKIP() << "losetup cannot attach a loop device here";
        CommandResult r = run(cli() + " convert " + q(top) + " " + q(loop.device()));
        EXPECT_EQ(r.exit_code, 3) << r.err;
        EXPECT_NE(r.err.find("block device backed by the image being read"), std::string::npos)
            << r.err;
        EXPECT_TRUE(test::read_file(backed) == before) << backed;
    }
}

// -------------------------------------------------------------------------------------------
// Messages (issue 26, point 8).

TEST(Messages, ClosedStdoutDataFileEmptyOptionAndFullSpool) {
    TempDir dir;
    const auto image = dir / "disk.qcow2";
    test::make_image(image, "", "4M", {"write -P 0x33 0 1M"});

    CommandResult r = run(cli() + " cat " + q(image) + " >&-");
    EXPECT_EQ(r.exit_code, 3) << r.err;
    EXPECT_NE(r.err.find("<stdout>: Bad file descriptor"), std::string::npos) << r.err;
    EXPECT_EQ(r.err.find("refusing to overwrite"), std::string::npos) << r.err;

    r = run(cli() + " cat --data-file=/nonexistent " + q(image) + " > /dev/null");
    EXPECT_EQ(r.exit_code, 1) << r.err;
    EXPECT_NE(r.err.find("'data-file' can only be set for images with an external data file"),
              std::string::npos)
        << r.err;

    for (const std::string command : {"map", "cat"}) {
        r = run(cli() + " " + command + " --start-offset= " + q(image) + " > /dev/null");
        EXPECT_EQ(r.exit_code, 1) << command << ": " << r.err;
        EXPECT_NE(r.err.find("--start-offset"), std::string::npos) << r.err;
        EXPECT_EQ(r.err.find("IMAGE is required"), std::string::npos) << r.err;
    }

    // -c to a pipe spools in $TMPDIR: a full one is named as such, not as the output.
    const auto tiny = dir / "tiny";
    std::filesystem::create_directories(tiny);
    if (run("mount -t tmpfs -o size=64k tmpfs " + q(tiny)).exit_code != 0)
        GTEST_SKIP() << "cannot mount a tmpfs here";
    const auto big = dir / "big.qcow2";
    test::make_image(big, "", "8M", {"write -P 0x44 0 8M"});
    r = run("TMPDIR=" + q(tiny) + " " + cli() + " convert -c -O qcow2 " + q(big) +
            " - | cat > /dev/null");
    ::umount2(tiny.c_str(), MNT_DETACH);
    EXPECT_NE(r.err.find("spool file in " + tiny.string()), std::string::npos) << r.err;
    EXPECT_NE(r.err.find("No space left on device"), std::string::npos) << r.err;
}

} // namespace
} // namespace qcowmap

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
    EXPECT_EQ(read.error().code, ErrorCode::io_error);
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
    EXPECT_EQ(range.error()->code, ErrorCode::io_error);
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
            EXPECT_EQ(digest.error().code, ErrorCode::io_error);
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
        EXPECT_EQ(exported.error().code, ErrorCode::io_error) << exported.error().message;
    }
    CompareError detail;
    auto compared = compare_images(image, *copy, {}, &detail);
    ASSERT_FALSE(compared);
    EXPECT_EQ(detail.error.code, ErrorCode::io_error);
    EXPECT_TRUE(detail.read_error);

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
    EXPECT_EQ(read.error().code, ErrorCode::io_error) << read.error().message;
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
        ::testing::KilledBySignal(SIGBUS), "");
    EXPECT_EXIT(
        {
            (void)image.visit(32 * MiB, 33 * MiB, [](const qcowmap::Run& run) -> Result<void> {
                volatile std::byte b = run.bytes[0];
                (void)b;
                return {};
            });
            std::exit(0);
        },
        ::testing::KilledBySignal(SIGBUS), "");
}

// -------------------------------------------------------------------------------------------
// EIO from the file system, through eio_fs.

/// eio_fs mounted over a directory for the test's lifetime; unmounted (lazily, even when the
/// test failed) by the destructor.
class EioMount {
  public:
    EioMount(const std::filesystem::path& source, const std::filesystem::path& mountpoint)
        : mountpoint_(mountpoint) {
        const char* helper = std::getenv("QCOWMAP_EIO_FS");
        if (!helper || access("/dev/fuse", R_OK | W_OK) != 0)
            return;
        std::filesystem::create_directories(mountpoint);
        struct stat before {};
        ::stat(mountpoint.c_str(), &before);
        pid_ = ::fork();
        if (pid_ == 0) {
            ::execl(helper, helper, source.c_str(), mountpoint.c_str(), "-f", nullptr);
            ::_exit(127);
        }
        // Mounted when the mount point's device changes.
        for (int i = 0; i < 500; ++i) {
            struct stat now {};
            if (::stat(mountpoint.c_str(), &now) == 0 && now.st_dev != before.st_dev) {
                mounted_ = true;
                return;
            }
            std::this_thread::sleep_for(std::chrono::milliseconds(10));
        }
    }
    ~EioMount() {
        if (pid_ > 0) {
            ::umount2(mountpoint_.c_str(), MNT_DETACH);
            ::kill(pid_, SIGTERM);
            int status = 0;
            ::waitpid(pid_, &status, 0);
        }
    }
    bool mounted() const { return mounted_; }

  private:
    std::filesystem::path mountpoint_;
    pid_t pid_ = -1;
    bool mounted_ = false;
};

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
        test::write_file(source_ / ".eio", {});
        const std::string line =
            "disk.qcow2 " + std::to_string(offset) + " " + std::to_string(length) + "\n";
        std::vector<std::byte> bytes(line.size());
        std::memcpy(bytes.data(), line.data(), line.size());
        test::write_file(source_ / ".eio", bytes);
    }

    TempDir dir_;
    std::filesystem::path source_;
    std::filesystem::path image_path_;
    std::optional<EioMount> mount_;
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

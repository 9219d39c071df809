// qcowmap mount: MOUNTPOINT/disk against qemu-img as the oracle (bytes equal to `qemu-img
// convert -O raw` for chains, compressed images and snapshots; SEEK_DATA/SEEK_HOLE equal to the
// data ranges of `qemu-img map`), writes refused, and the daemon's life: it backgrounds once the
// mount exists, ends with exit 0 on umount, fusermount3 -u and SIGTERM, and a bad image gives
// one error line and no mount. With --rw (issue 28): an ext4 file system made and filled
// through the mount, a hole punched, and the image then judged by qemu-img (check clean, its raw
// conversion equal to the file as it read while mounted, e2fsck clean on it); QEMU's locks
// keep a second writer and plain readers out.
//
// Mounting needs /dev/fuse and the right to mount (root in CI). Without them every test is
// skipped with the reason; with them a mount that fails is a failure. Every mount is undone in
// teardown (lazy unmount, then the daemon is killed and reaped) even when a test fails.
#include "support.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstring>
#include <fcntl.h>
#include <fstream>
#include <optional>
#include <random>
#include <spawn.h>
#include <sstream>
#include <string>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>
#include <utility>
#include <vector>

extern char** environ;

namespace qcowmap {
namespace {

using test::cli;
using test::q;

namespace fs = std::filesystem;
using test::run;
using test::run_ok;
using test::shell_quote;
using test::TempDir;
using namespace std::chrono_literals;

constexpr std::uint64_t KiB = 1024;
constexpr std::uint64_t MiB = 1024 * 1024;

/// Why mounting cannot work on this machine, or nullopt when it can.
std::optional<std::string> why_mounting_is_impossible() {
    int fd = ::open("/dev/fuse", O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return std::string("/dev/fuse cannot be opened: ") + std::strerror(errno);
    ::close(fd);
    if (::geteuid() != 0 && run("command -v fusermount3").exit_code != 0)
        return std::string("not root and no fusermount3 to mount with");
    return std::nullopt;
}

#define SKIP_UNLESS_MOUNTING_WORKS()                                                               \
    do {                                                                                           \
        if (auto why = why_mounting_is_impossible())                                               \
            GTEST_SKIP() << "cannot mount FUSE file systems here: " << *why;                       \
    } while (0)

/// True when `mountpoint` is a mount point now (/proc/self/mountinfo, field 5).
bool is_mounted(const fs::path& mountpoint) {
    const std::string want = fs::weakly_canonical(mountpoint).string();
    std::ifstream in("/proc/self/mountinfo");
    std::string line;
    while (std::getline(in, line)) {
        std::istringstream fields(line);
        std::string id, parent, device, root, point;
        fields >> id >> parent >> device >> root >> point;
        if (point == want)
            return true;
    }
    return false;
}

/// Waits up to 10 s for `mountpoint` to become (or stop being) a mount point.
bool wait_mounted(const fs::path& mountpoint, bool mounted) {
    for (auto deadline = std::chrono::steady_clock::now() + 10s;
         std::chrono::steady_clock::now() < deadline; std::this_thread::sleep_for(10ms)) {
        if (is_mounted(mountpoint) == mounted)
            return true;
    }
    return is_mounted(mountpoint) == mounted;
}

/// waitpid with a deadline: the exit code (128 + signal when killed), or nullopt when `pid`
/// is still running after `timeout`.
std::optional<int> wait_for_exit(pid_t pid, std::chrono::milliseconds timeout) {
    for (auto deadline = std::chrono::steady_clock::now() + timeout;;) {
        int status = 0;
        pid_t done = ::waitpid(pid, &status, WNOHANG);
        if (done == pid)
            return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        if (done < 0)
            return std::nullopt;
        if (std::chrono::steady_clock::now() >= deadline)
            return std::nullopt;
        std::this_thread::sleep_for(10ms);
    }
}

/// Undoes a mount and its daemon whatever happened: lazy unmount, then SIGKILL and reap.
void force_unmount(const fs::path& mountpoint, pid_t daemon) {
    if (is_mounted(mountpoint))
        (void)run("umount -l " + q(mountpoint));
    if (daemon > 0 && !wait_for_exit(daemon, 5s)) {
        ::kill(daemon, SIGKILL);
        (void)wait_for_exit(daemon, 5s);
    }
}

/// `qcowmap mount -f ARGS... IMAGE MOUNTPOINT` as our child, started and waited for until the
/// mount appears; undone (force_unmount) on destruction.
class ForegroundMount {
  public:
    ForegroundMount(const fs::path& image, const fs::path& mountpoint,
                    const std::vector<std::string>& options = {})
        : mountpoint_(mountpoint), log_(mountpoint.parent_path() / "mount-f.log") {
        std::vector<std::string> args = {test::qcowmap_bin(), "mount", "-f"};
        args.insert(args.end(), options.begin(), options.end());
        args.push_back(image.string());
        args.push_back(mountpoint.string());
        std::vector<char*> argv;
        for (std::string& a : args)
            argv.push_back(a.data());
        argv.push_back(nullptr);
        posix_spawn_file_actions_t actions;
        posix_spawn_file_actions_init(&actions);
        posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, log_.c_str(),
                                         O_WRONLY | O_CREAT | O_TRUNC, 0644);
        posix_spawn_file_actions_adddup2(&actions, STDOUT_FILENO, STDERR_FILENO);
        int failed = ::posix_spawn(&pid_, argv[0], &actions, nullptr, argv.data(), environ);
        posix_spawn_file_actions_destroy(&actions);
        if (failed) {
            pid_ = -1;
            ADD_FAILURE() << "posix_spawn " << argv[0] << ": " << std::strerror(failed);
            return;
        }
        ready_ = wait_mounted(mountpoint_, true);
    }
    ~ForegroundMount() { force_unmount(mountpoint_, pid_); }
    ForegroundMount(const ForegroundMount&) = delete;
    ForegroundMount& operator=(const ForegroundMount&) = delete;

    /// True once the mount appeared.
    bool ready() const { return ready_; }
    pid_t pid() const { return pid_; }
    /// What the process printed (stdout and stderr).
    std::string log() const {
        std::ifstream in(log_);
        return std::string(std::istreambuf_iterator<char>(in), {});
    }
    /// The exit code once the process ends (within 10 s), else nullopt. Reaps it.
    std::optional<int> wait() {
        auto code = wait_for_exit(pid_, 10s);
        if (code)
            pid_ = -1;
        return code;
    }

  private:
    fs::path mountpoint_;
    fs::path log_;
    pid_t pid_ = -1;
    bool ready_ = false;
};

/// The pid of a `qcowmap mount` daemon serving `mountpoint` that is our child (we are a child
/// subreaper, so the daemon that `qcowmap mount` leaves behind is reparented to us).
pid_t find_daemon(const fs::path& mountpoint) {
    const std::string parent = std::to_string(::getpid());
    for (const auto& entry : fs::directory_iterator("/proc")) {
        const std::string name = entry.path().filename().string();
        if (name.find_first_not_of("0123456789") != std::string::npos)
            continue;
        std::ifstream status(entry.path() / "status");
        std::string line, ppid;
        while (std::getline(status, line)) {
            if (line.rfind("PPid:", 0) == 0) {
                std::istringstream(line.substr(5)) >> ppid;
                break;
            }
        }
        if (ppid != parent)
            continue;
        std::ifstream in(entry.path() / "cmdline", std::ios::binary);
        std::string cmdline(std::istreambuf_iterator<char>(in), {});
        if (cmdline.find(std::string("mount") + '\0') != std::string::npos &&
            cmdline.find(mountpoint.string()) != std::string::npos)
            return static_cast<pid_t>(std::stol(name));
    }
    return -1;
}

/// `qcowmap mount ARGS... IMAGE MOUNTPOINT` in the background (the usual way); undone on
/// destruction.
class BackgroundMount {
  public:
    BackgroundMount(const fs::path& image, const fs::path& mountpoint,
                    const std::vector<std::string>& options = {})
        : mountpoint_(mountpoint) {
        // Orphans of our descendants become our children: the daemon can be waited for.
        ::prctl(PR_SET_CHILD_SUBREAPER, 1);
        std::string command = cli() + " mount";
        for (const std::string& o : options)
            command += " " + shell_quote(o);
        result_ = run(command + " " + q(image) + " " + q(mountpoint));
        daemon_ = find_daemon(mountpoint);
    }
    ~BackgroundMount() { force_unmount(mountpoint_, daemon_); }
    BackgroundMount(const BackgroundMount&) = delete;
    BackgroundMount& operator=(const BackgroundMount&) = delete;

    const test::CommandResult& result() const { return result_; }
    pid_t daemon() const { return daemon_; }
    std::optional<int> wait() {
        auto code = wait_for_exit(daemon_, 10s);
        if (code)
            daemon_ = -1;
        return code;
    }

  private:
    fs::path mountpoint_;
    test::CommandResult result_;
    pid_t daemon_ = -1;
};

/// `count` MiB of mixed content: random, text, zeros and nearly-constant mebibytes in turn, so
/// that compressed images hold compressed, uncompressed and zero clusters.
fs::path make_mixed_raw(const TempDir& dir, std::size_t count) {
    std::vector<std::byte> data(count * MiB);
    std::mt19937_64 rng(17);
    const std::string text = "qcowmap mount: the virtual disk as one read-only file; ";
    for (std::size_t mib = 0; mib < count; ++mib) {
        std::byte* p = data.data() + mib * MiB;
        switch (mib % 4) {
        case 0:
            for (std::size_t i = 0; i < MiB; i += 8) {
                std::uint64_t v = rng();
                std::memcpy(p + i, &v, 8);
            }
            break;
        case 1:
            for (std::size_t i = 0; i < MiB; ++i)
                p[i] = std::byte(text[(i + mib) % text.size()]);
            break;
        case 2:
            break;
        case 3:
            std::fill_n(p, MiB, std::byte(mib));
            for (int k = 0; k < 64; ++k)
                p[rng() % MiB] = std::byte(rng());
            break;
        }
    }
    auto path = dir / "mixed.raw";
    test::write_file(path, data);
    return path;
}

/// Whole file contents, read with read(2) into a buffer of the file's size (std::ifstream and
/// a growing buffer are slow where page faults are expensive).
std::vector<std::byte> slurp(const fs::path& path) {
    std::vector<std::byte> bytes;
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    struct stat st {};
    if (fd < 0 || ::fstat(fd, &st) != 0) {
        ADD_FAILURE() << path << ": " << std::strerror(errno);
        if (fd >= 0)
            ::close(fd);
        return bytes;
    }
    bytes.resize(static_cast<std::size_t>(st.st_size));
    std::size_t used = 0;
    while (used < bytes.size()) {
        ssize_t n =
            ::read(fd, bytes.data() + used, std::min<std::size_t>(bytes.size() - used, MiB));
        if (n <= 0) {
            ADD_FAILURE() << path << ": " << (n < 0 ? std::strerror(errno) : "short read");
            break;
        }
        used += static_cast<std::size_t>(n);
    }
    ::close(fd);
    return bytes;
}

/// First difference between two byte vectors, for messages.
std::string first_difference(const std::vector<std::byte>& a, const std::vector<std::byte>& b) {
    if (a.size() != b.size())
        return "sizes differ: " + std::to_string(a.size()) + " vs " + std::to_string(b.size());
    auto [x, y] = std::mismatch(a.begin(), a.end(), b.begin());
    if (x == a.end())
        return "identical";
    return "first difference at offset " + std::to_string(x - a.begin());
}

/// The mounted disk file equals `qemu-img convert -O raw` of `image` (with `qemu_options`,
/// e.g. "-l snapshot.name=S") byte for byte, and its size and block count are the disk's.
void expect_same_bytes(const fs::path& disk, const fs::path& image, const TempDir& dir,
                       const std::string& qemu_options = "") {
    auto raw = dir / "expected.raw";
    run_ok("qemu-img convert " + qemu_options + " -O raw " + q(image) + " " + q(raw));
    auto expected = slurp(raw);
    fs::remove(raw);
    auto actual = slurp(disk);
    ASSERT_FALSE(expected.empty());
    EXPECT_TRUE(actual == expected) << first_difference(actual, expected);
}

using Ranges = std::vector<std::pair<std::uint64_t, std::uint64_t>>; // [start, end)

std::uint64_t json_number(const std::string& line, const std::string& key) {
    auto at = line.find("\"" + key + "\": ");
    if (at == std::string::npos)
        return UINT64_MAX;
    return std::stoull(line.substr(at + key.size() + 4));
}

/// The ranges where `qemu-img map --output=json` says "data": true, adjacent ones joined.
Ranges qemu_data_ranges(const std::string& map_args) {
    std::string text = run_ok("timeout 120 qemu-img map --output=json " + map_args);
    Ranges ranges;
    std::istringstream lines(text);
    std::string line;
    while (std::getline(lines, line)) {
        if (line.find("\"data\": true") == std::string::npos)
            continue;
        std::uint64_t start = json_number(line, "start");
        std::uint64_t end = start + json_number(line, "length");
        if (!ranges.empty() && ranges.back().second == start)
            ranges.back().second = end;
        else
            ranges.emplace_back(start, end);
    }
    return ranges;
}

/// The data ranges of a file found with lseek(SEEK_DATA) / lseek(SEEK_HOLE).
Ranges seek_data_ranges(const fs::path& file) {
    Ranges ranges;
    int fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        ADD_FAILURE() << file << ": " << std::strerror(errno);
        return ranges;
    }
    off_t size = ::lseek(fd, 0, SEEK_END);
    for (off_t at = 0; at < size;) {
        off_t data = ::lseek(fd, at, SEEK_DATA);
        if (data < 0) {
            EXPECT_EQ(errno, ENXIO) << "SEEK_DATA at " << at;
            break;
        }
        off_t hole = ::lseek(fd, data, SEEK_HOLE);
        if (hole <= data) {
            ADD_FAILURE() << "SEEK_HOLE at " << data << " gave " << hole << ": "
                          << std::strerror(errno);
            break;
        }
        ranges.emplace_back(data, hole);
        at = hole;
    }
    ::close(fd);
    return ranges;
}

std::string describe(const Ranges& ranges) {
    std::string out;
    for (auto [start, end] : ranges)
        out += "[" + std::to_string(start) + ", " + std::to_string(end) + ") ";
    return out.empty() ? "(none)" : out;
}

std::uint64_t total(const Ranges& ranges) {
    std::uint64_t sum = 0;
    for (auto [start, end] : ranges)
        sum += end - start;
    return sum;
}

class Mount : public ::testing::Test {
  protected:
    void SetUp() override {
        SKIP_UNLESS_MOUNTING_WORKS();
        fs::create_directory(mountpoint_);
    }
    fs::path disk() const { return mountpoint_ / "disk"; }

    TempDir dir_;
    fs::path mountpoint_ = dir_ / "mnt";
};

/// A two-layer chain with every kind of run: data in either layer, a zero cluster in the
/// overlay hiding base data, a compressed cluster, unallocated ranges.
fs::path make_chain(const TempDir& dir) {
    auto base = dir / "base.qcow2";
    auto overlay = dir / "overlay.qcow2";
    test::make_image(base, "cluster_size=64k", "32M",
                     {"write -P 0x11 0 1M", "write -P 0x12 4M 256k", "write -P 0x13 9M 64k",
                      "write -c -P 0x14 12M 64k", "write -P 0x15 20M 2M"});
    run_ok("qemu-img create -q -f qcow2 -o cluster_size=64k -b " + q(base) + " -F qcow2 " +
           q(overlay) + " 32M");
    run_ok("qemu-io -f qcow2 -c 'write -P 0x21 512k 1M' -c 'write -z 4M 64k' "
           "-c 'write -c -P 0x22 16M 64k' -c 'write -P 0x23 21M 4k' -c 'write -z 9M 64k' " +
           q(overlay) + " >/dev/null");
    return overlay;
}

TEST_F(Mount, ChainBytesSizeAndListingEqualQemu) {
    auto image = make_chain(dir_);
    BackgroundMount mount(image, mountpoint_);
    ASSERT_EQ(mount.result().exit_code, 0) << mount.result().err;
    EXPECT_EQ(mount.result().err, "");
    // The mount exists as soon as the command returns: no waiting.
    ASSERT_TRUE(is_mounted(mountpoint_));

    std::vector<std::string> names;
    for (const auto& entry : fs::directory_iterator(mountpoint_))
        names.push_back(entry.path().filename().string());
    EXPECT_EQ(names, std::vector<std::string>{"disk"});

    struct stat st {};
    ASSERT_EQ(::stat(disk().c_str(), &st), 0) << std::strerror(errno);
    EXPECT_TRUE(S_ISREG(st.st_mode));
    EXPECT_EQ(st.st_mode & 07777, 0444u);
    EXPECT_EQ(static_cast<std::uint64_t>(st.st_size), 32 * MiB);
    // st_blocks counts the data (what qemu-img map calls data), so cp and tar see a sparse file.
    EXPECT_EQ(static_cast<std::uint64_t>(st.st_blocks) * 512,
              total(qemu_data_ranges("-f qcow2 " + q(image))));

    expect_same_bytes(disk(), image, dir_);
}

TEST_F(Mount, BackingNoneShowsOnlyTheOverlay) {
    auto image = make_chain(dir_);
    BackgroundMount mount(image, mountpoint_, {"--backing=none"});
    ASSERT_EQ(mount.result().exit_code, 0) << mount.result().err;
    // The oracle: a copy of the overlay with its backing file name removed.
    auto alone = dir_ / "alone.qcow2";
    fs::copy_file(image, alone);
    run_ok("qemu-img rebase -u -b '' " + q(alone));
    expect_same_bytes(disk(), alone, dir_);
}

struct CompressedCase {
    const char* name;
    const char* options;
};
std::ostream& operator<<(std::ostream& os, const CompressedCase& c) {
    return os << c.options;
}

class MountCompressed : public Mount, public ::testing::WithParamInterface<CompressedCase> {};

TEST_P(MountCompressed, BytesEqualQemuAlsoUnaligned) {
    auto source = make_mixed_raw(dir_, 12);
    auto image = dir_ / "c.qcow2";
    run_ok(std::string("qemu-img convert -c -O qcow2 -o ") + GetParam().options + " " + q(source) +
           " " + q(image));
    ASSERT_NE(run_ok("qemu-img map --output=json " + q(image)).find("\"data\": true"),
              std::string::npos);
    ForegroundMount mount(image, mountpoint_);
    ASSERT_TRUE(mount.ready()) << mount.log();
    expect_same_bytes(disk(), image, dir_);

    // O_DIRECT reads reach the daemon at the offsets and sizes asked (the page cache would
    // round them to pages): odd ones, across cluster and kind boundaries.
    auto expected = slurp(source);
    int fd = ::open(disk().c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
    ASSERT_GE(fd, 0) << std::strerror(errno);
    std::mt19937_64 rng(5);
    std::vector<std::byte> buffer(300 * KiB);
    for (int i = 0; i < 200; ++i) {
        std::uint64_t offset = rng() % expected.size();
        std::size_t length = 1 + rng() % buffer.size();
        ssize_t n = ::pread(fd, buffer.data(), length, static_cast<off_t>(offset));
        std::size_t want = std::min<std::uint64_t>(length, expected.size() - offset);
        ASSERT_EQ(n, static_cast<ssize_t>(want)) << "at " << offset << ": " << std::strerror(errno);
        ASSERT_EQ(0, std::memcmp(buffer.data(), expected.data() + offset, want))
            << "read at " << offset << " +" << length;
    }
    ::close(fd);
}

INSTANTIATE_TEST_SUITE_P(
    Images, MountCompressed,
    ::testing::Values(CompressedCase{"zlib", "compression_type=zlib,cluster_size=64k"},
                      CompressedCase{"zstd", "compression_type=zstd,cluster_size=64k"},
                      CompressedCase{"zstd_4k", "compression_type=zstd,cluster_size=4k"}),
    [](const auto& info) { return std::string(info.param.name); });

TEST_F(Mount, SnapshotBytesEqualQemu) {
    auto image = dir_ / "s.qcow2";
    test::make_image(image, "cluster_size=64k", "16M",
                     {"write -P 0x31 0 2M", "write -c -P 0x32 4M 64k", "write -P 0x33 8M 1M"});
    run_ok("qemu-img snapshot -c before " + q(image));
    run_ok("qemu-io -f qcow2 -c 'write -P 0x41 1M 2M' -c 'write -z 8M 512k' "
           "-c 'discard 0 64k' -c 'write -P 0x42 12M 1M' " +
           q(image) + " >/dev/null");
    {
        BackgroundMount mount(image, mountpoint_, {"--snapshot=before"});
        ASSERT_EQ(mount.result().exit_code, 0) << mount.result().err;
        expect_same_bytes(disk(), image, dir_, "-l snapshot.name=before");
    }
    ASSERT_TRUE(wait_mounted(mountpoint_, false));
    BackgroundMount active(image, mountpoint_);
    ASSERT_EQ(active.result().exit_code, 0) << active.result().err;
    expect_same_bytes(disk(), image, dir_);
}

TEST_F(Mount, SeekDataAndHoleGiveTheMapsDataRanges) {
    auto image = make_chain(dir_);
    BackgroundMount mount(image, mountpoint_);
    ASSERT_EQ(mount.result().exit_code, 0) << mount.result().err;

    Ranges expected = qemu_data_ranges("-f qcow2 " + q(image));
    ASSERT_GE(expected.size(), 4u) << describe(expected);
    Ranges seen = seek_data_ranges(disk());
    EXPECT_EQ(seen, expected) << "lseek: " << describe(seen)
                              << "\nqemu-img map: " << describe(expected);
    // qemu-img reading the mounted file as raw finds the same holes (through SEEK_DATA/HOLE).
    Ranges raw = qemu_data_ranges("-f raw " + q(disk()));
    EXPECT_EQ(raw, expected) << "qemu-img map -f raw: " << describe(raw);

    // Edges: SEEK_DATA inside data stays put, SEEK_HOLE in the last hole stays put, at or past
    // the end both give ENXIO, SEEK_HOLE in the last data run gives the end of the file.
    int fd = ::open(disk().c_str(), O_RDONLY | O_CLOEXEC);
    ASSERT_GE(fd, 0);
    const off_t size = 32 * MiB;
    EXPECT_EQ(::lseek(fd, static_cast<off_t>(expected[0].first + 1), SEEK_DATA),
              static_cast<off_t>(expected[0].first + 1));
    EXPECT_EQ(::lseek(fd, size, SEEK_DATA), -1);
    EXPECT_EQ(errno, ENXIO);
    EXPECT_EQ(::lseek(fd, size, SEEK_HOLE), -1);
    EXPECT_EQ(errno, ENXIO);
    EXPECT_EQ(::lseek(fd, size - 1, SEEK_HOLE), size - 1); // 31M.. is unallocated
    ::close(fd);
}

TEST_F(Mount, SparseAwareToolsKeepTheHoles) {
    auto image = make_chain(dir_);
    BackgroundMount mount(image, mountpoint_);
    ASSERT_EQ(mount.result().exit_code, 0) << mount.result().err;
    const Ranges expected = qemu_data_ranges("-f qcow2 " + q(image));
    auto expected_bytes = slurp(disk());

    auto cp_copy = dir_ / "cp.raw";
    auto dd_copy = dir_ / "dd.raw";
    // Under `timeout`: a wrong SEEK_DATA/SEEK_HOLE answer can send them into an endless loop.
    run_ok("timeout 120 cp --sparse=always " + q(disk()) + " " + q(cp_copy));
    run_ok("timeout 120 dd status=none conv=sparse bs=64k if=" + q(disk()) + " of=" + q(dd_copy));
    run_ok("timeout 120 tar -S -cf " + q(dir_ / "disk.tar") + " -C " + q(mountpoint_) + " disk");
    fs::create_directory(dir_ / "untar");
    run_ok("tar -xf " + q(dir_ / "disk.tar") + " -C " + q(dir_ / "untar"));
    for (const fs::path& copy : {cp_copy, dd_copy, dir_ / "untar" / "disk"}) {
        EXPECT_TRUE(slurp(copy) == expected_bytes) << copy;
        // The copies are sparse where the disk has holes. (Zero data blocks inside the data
        // ranges may become holes too, so the copy holds at most the data.)
        struct stat st {};
        ASSERT_EQ(::stat(copy.c_str(), &st), 0);
        EXPECT_LE(static_cast<std::uint64_t>(st.st_blocks) * 512, total(expected) + 64 * KiB)
            << copy;
    }
    // tar -S stores only the data: the archive is far smaller than the 32 MiB disk.
    EXPECT_LT(fs::file_size(dir_ / "disk.tar"), total(expected) + 1 * MiB);
}

TEST_F(Mount, WritesAreRefused) {
    auto image = dir_ / "w.qcow2";
    test::make_image(image, "", "4M", {"write -P 0x55 0 1M"});
    auto before = slurp(image);
    BackgroundMount mount(image, mountpoint_);
    ASSERT_EQ(mount.result().exit_code, 0) << mount.result().err;

    auto refused = [](int result, const char* what) {
        EXPECT_EQ(result, -1) << what;
        EXPECT_TRUE(errno == EROFS || errno == EACCES) << what << ": " << std::strerror(errno);
    };
    for (int flags : {O_WRONLY, O_RDWR, O_RDONLY | O_TRUNC, O_WRONLY | O_APPEND}) {
        int fd = ::open(disk().c_str(), flags | O_CLOEXEC);
        if (fd >= 0)
            ::close(fd);
        refused(fd, ("open flags " + std::to_string(flags)).c_str());
    }
    refused(::open((mountpoint_ / "new").c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644), "create");
    refused(::truncate(disk().c_str(), 0), "truncate");
    refused(::chmod(disk().c_str(), 0666), "chmod");
    refused(::unlink(disk().c_str()), "unlink");
    refused(::mkdir((mountpoint_ / "dir").c_str(), 0755), "mkdir");
    refused(::rename(disk().c_str(), (mountpoint_ / "other").c_str()), "rename");
    EXPECT_EQ(fs::file_size(disk()), 4 * MiB);
    EXPECT_TRUE(slurp(image) == before);
}

TEST_F(Mount, UmountEndsTheForegroundProcessWithExitZero) {
    auto image = dir_ / "u.qcow2";
    test::make_image(image, "", "4M", {"write -P 0x66 0 64k"});
    for (const char* unmount : {"umount", "fusermount3 -u"}) {
        ForegroundMount mount(image, mountpoint_);
        ASSERT_TRUE(mount.ready()) << mount.log();
        EXPECT_EQ(fs::file_size(disk()), 4 * MiB);
        run_ok(std::string(unmount) + " " + q(mountpoint_));
        EXPECT_EQ(mount.wait(), std::optional<int>(0)) << unmount << ": " << mount.log();
        EXPECT_FALSE(is_mounted(mountpoint_)) << unmount;
        EXPECT_EQ(mount.log(), "") << unmount;
    }
}

TEST_F(Mount, SigtermEndsTheProcessAndUnmounts) {
    auto image = dir_ / "t.qcow2";
    test::make_image(image, "", "4M", {"write -P 0x77 0 64k"});
    ForegroundMount mount(image, mountpoint_);
    ASSERT_TRUE(mount.ready()) << mount.log();
    ASSERT_EQ(::kill(mount.pid(), SIGTERM), 0);
    EXPECT_EQ(mount.wait(), std::optional<int>(0)) << mount.log();
    EXPECT_FALSE(is_mounted(mountpoint_));
    EXPECT_EQ(mount.log(), "");
}

TEST_F(Mount, BackgroundDaemonEndsWithExitZeroOnUmount) {
    auto image = dir_ / "b.qcow2";
    test::make_image(image, "", "4M", {"write -P 0x78 0 64k"});
    BackgroundMount mount(image, mountpoint_);
    ASSERT_EQ(mount.result().exit_code, 0) << mount.result().err;
    ASSERT_GT(mount.daemon(), 0) << "no daemon found serving " << mountpoint_;
    expect_same_bytes(disk(), image, dir_);
    run_ok("umount " + q(mountpoint_));
    EXPECT_EQ(mount.wait(), std::optional<int>(0));
    EXPECT_FALSE(is_mounted(mountpoint_));

    // SIGTERM ends a background daemon as cleanly.
    BackgroundMount again(image, mountpoint_);
    ASSERT_EQ(again.result().exit_code, 0) << again.result().err;
    ASSERT_GT(again.daemon(), 0);
    ASSERT_EQ(::kill(again.daemon(), SIGTERM), 0);
    EXPECT_EQ(again.wait(), std::optional<int>(0));
    EXPECT_FALSE(is_mounted(mountpoint_));
}

// Issue 25: a second mount onto the same directory stacked silently (the first became
// unreachable, and the next umount took the wrong one). Refused now, the first left alone.
TEST_F(Mount, MountingOntoAMountPointIsRefused) {
    auto image = dir_ / "m.qcow2";
    test::make_image(image, "", "4M", {"write -P 0x5a 0 64k"});
    BackgroundMount first(image, mountpoint_);
    ASSERT_EQ(first.result().exit_code, 0) << first.result().err;
    auto r = run(cli() + " mount " + q(image) + " " + q(mountpoint_));
    EXPECT_EQ(r.exit_code, 3);
    EXPECT_EQ(r.err, "qcowmap: " + mountpoint_.string() +
                         ": is a mount point already (unmount it first: fusermount3 -u DIR)\n");
    expect_same_bytes(disk(), image, dir_); // still the first mount
    run_ok("umount " + q(mountpoint_));
    EXPECT_EQ(first.wait(), std::optional<int>(0));
    EXPECT_FALSE(is_mounted(mountpoint_));
}

TEST_F(Mount, ImageTruncatedWhileMountedGivesEioNotAShortDisk) {
    auto image = dir_ / "cut.qcow2";
    // One data run of 4 MiB that starts right after the metadata; the tables stay in the file.
    test::make_image(image, "cluster_size=64k", "8M", {"write -P 0x5a 0 4M"});
    ForegroundMount mount(image, mountpoint_);
    ASSERT_TRUE(mount.ready()) << mount.log();
    fs::resize_file(image, 1 * MiB);

    int fd = ::open(disk().c_str(), O_RDONLY | O_CLOEXEC);
    ASSERT_GE(fd, 0) << std::strerror(errno);
    std::vector<std::byte> buffer(MiB);
    std::uint64_t total_read = 0;
    ssize_t n = 0;
    int error = 0;
    while ((n = ::read(fd, buffer.data(), buffer.size())) > 0)
        total_read += static_cast<std::uint64_t>(n);
    error = errno;
    ::close(fd);
    // What is still in the file may be read; the rest fails loudly, never as an early end.
    EXPECT_EQ(n, -1) << "read " << total_read << " bytes, then end of file";
    EXPECT_EQ(error, EIO);
    EXPECT_LT(total_read, 1 * MiB);
    EXPECT_NE(mount.log().find("image changed while being read"), std::string::npos) << mount.log();
}

/// One line, "qcowmap: SUBJECT: ...".
void expect_one_error_line(const std::string& err, const std::string& subject) {
    EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
    EXPECT_EQ(err.rfind("qcowmap: " + subject + ": ", 0), 0u) << err;
}

TEST_F(Mount, BadImageGivesOneErrorLineAndNoMount) {
    auto junk = dir_ / "junk.qcow2";
    run_ok("printf 'not an image at all' > " + q(junk));
    // Probed, it would be a raw disk of 19 bytes (as qemu-img probes it): say qcow2.
    BackgroundMount mount(junk, mountpoint_, {"--format=qcow2"});
    EXPECT_EQ(mount.result().exit_code, 1);
    expect_one_error_line(mount.result().err, junk.string());
    EXPECT_NE(mount.result().err.find("not a qcow2 image"), std::string::npos)
        << mount.result().err;
    EXPECT_FALSE(is_mounted(mountpoint_));
    EXPECT_EQ(mount.daemon(), -1);

    // A missing backing file: the same, naming the path looked for.
    auto overlay = dir_ / "orphan.qcow2";
    run_ok("qemu-img create -q -f qcow2 -u -b " + q(dir_ / "gone.qcow2") + " -F qcow2 " +
           q(overlay) + " 4M");
    BackgroundMount orphan(overlay, mountpoint_);
    EXPECT_EQ(orphan.result().exit_code, 1);
    expect_one_error_line(orphan.result().err, overlay.string());
    EXPECT_NE(orphan.result().err.find("gone.qcow2"), std::string::npos) << orphan.result().err;
    EXPECT_FALSE(is_mounted(mountpoint_));

    // The same in the foreground.
    auto r = run(cli() + " mount -f --format=qcow2 " + q(junk) + " " + q(mountpoint_));
    EXPECT_EQ(r.exit_code, 1);
    expect_one_error_line(r.err, junk.string());
    EXPECT_FALSE(is_mounted(mountpoint_));
}

TEST_F(Mount, BadMountpointGivesOneErrorLine) {
    auto image = dir_ / "m.qcow2";
    test::make_image(image, "", "4M");
    auto missing = dir_ / "no-such-dir";
    auto r = run(cli() + " mount " + q(image) + " " + q(missing));
    EXPECT_EQ(r.exit_code, 3);
    expect_one_error_line(r.err, missing.string());
    EXPECT_NE(r.err.find("No such file or directory"), std::string::npos) << r.err;

    r = run(cli() + " mount " + q(image) + " " + q(image));
    EXPECT_EQ(r.exit_code, 3);
    expect_one_error_line(r.err, image.string());
    EXPECT_NE(r.err.find("not a directory"), std::string::npos) << r.err;
    EXPECT_FALSE(is_mounted(image));
}

// --rw (issue 28)

bool have_e2fsprogs() {
    return run("command -v mkfs.ext4 && command -v debugfs && command -v e2fsck").exit_code == 0;
}

/// fsync(2) on the disk file through a descriptor opened for writing.
void fsync_file(const fs::path& file) {
    int fd = ::open(file.c_str(), O_RDWR | O_CLOEXEC);
    ASSERT_GE(fd, 0) << file << ": " << std::strerror(errno);
    EXPECT_EQ(::fsync(fd), 0) << std::strerror(errno);
    ::close(fd);
}

TEST_F(Mount, RwExt4MadeAndFilledThroughTheMountIsWhatQemuReads) {
    if (!have_e2fsprogs())
        GTEST_SKIP() << "e2fsprogs (mkfs.ext4, debugfs, e2fsck) not installed";
    auto image = dir_ / "rw.qcow2";
    // The last 16 MiB lie outside the file system: a pattern there to punch and zero.
    test::make_image(image, "cluster_size=64k", "64M", {"write -P 0x5a 56M 8M"});
    BackgroundMount mount(image, mountpoint_, {"--rw"});
    ASSERT_EQ(mount.result().exit_code, 0) << mount.result().err;
    EXPECT_EQ(mount.result().err, "");
    struct stat st {};
    ASSERT_EQ(::stat(disk().c_str(), &st), 0) << std::strerror(errno);
    EXPECT_EQ(st.st_mode & 07777, 0644u);

    // mkfs.ext4 discards the whole file first (fallocate PUNCH_HOLE on a regular file).
    run_ok("timeout -k 5 300 mkfs.ext4 -q -F " + q(disk()) + " 48M");
    std::vector<std::byte> blob(300 * KiB + 123);
    std::mt19937_64 rng(28);
    for (auto& b : blob)
        b = std::byte(rng());
    test::write_file(dir_ / "blob.bin", blob);
    run_ok("cp /etc/services " + q(dir_ / "text.txt") + " 2>/dev/null || seq 1 20000 > " +
           q(dir_ / "text.txt"));
    run_ok("printf 'mkdir docs\nwrite %s docs/blob.bin\nwrite %s text.txt\n' " +
           q(dir_ / "blob.bin") + " " + q(dir_ / "text.txt") + " > " + q(dir_ / "cmds"));
    run_ok("timeout -k 5 300 debugfs -w -f " + q(dir_ / "cmds") + " " + q(disk()) +
           " >/dev/null 2>&1");
    run_ok("timeout -k 5 300 e2fsck -fn " + q(disk()) + " >/dev/null 2>&1");
    // A partial-cluster write, a punched hole and a zeroed range outside the file system.
    run_ok("timeout -k 5 60 dd status=none if=" + q(dir_ / "blob.bin") + " of=" + q(disk()) +
           " bs=1000 seek=50000 count=7 conv=notrunc");
    run_ok("timeout -k 5 60 fallocate -p -o 57M -l 2M " + q(disk()));
    run_ok("timeout -k 5 60 fallocate -z -o 59M -l 512k " + q(disk()));
    fsync_file(disk());
    // Both ranges read as zeros and are holes now; the pattern after them is data.
    int fd = ::open(disk().c_str(), O_RDONLY | O_CLOEXEC);
    ASSERT_GE(fd, 0);
    EXPECT_EQ(::lseek(fd, static_cast<off_t>(57 * MiB), SEEK_HOLE), static_cast<off_t>(57 * MiB));
    EXPECT_EQ(::lseek(fd, static_cast<off_t>(57 * MiB), SEEK_DATA),
              static_cast<off_t>(59 * MiB + 512 * KiB));
    ::close(fd);
    const auto mounted = slurp(disk());
    ASSERT_EQ(mounted.size(), 64 * MiB);
    EXPECT_TRUE(std::all_of(mounted.begin() + 57 * MiB, mounted.begin() + 59 * MiB + 512 * KiB,
                            [](std::byte b) { return b == std::byte{0}; }));
    EXPECT_EQ(mounted[60 * MiB], std::byte{0x5a});

    run_ok("umount " + q(mountpoint_));
    EXPECT_EQ(mount.wait(), std::optional<int>(0)); // the image is closed once the daemon ends

    run_ok("qemu-img check -q " + q(image)); // exit 0: no corruption, no leaks
    auto raw = dir_ / "after.raw";
    run_ok("qemu-img convert -O raw " + q(image) + " " + q(raw));
    const auto converted = slurp(raw);
    EXPECT_TRUE(converted == mounted) << first_difference(converted, mounted);
    run_ok("timeout -k 5 300 e2fsck -fn " + q(raw) + " >/dev/null 2>&1");
    run_ok("debugfs -R 'dump docs/blob.bin " + (dir_ / "blob.out").string() + "' " + q(raw) +
           " 2>/dev/null");
    EXPECT_TRUE(test::read_file(dir_ / "blob.out") == blob);
}

TEST_F(Mount, RwHoldsTheWriteLock) {
    auto image = dir_ / "locked.qcow2";
    test::make_image(image, "", "4M", {"write -P 0x31 0 1M"});
    auto other = dir_ / "mnt2";
    fs::create_directory(other);
    {
        BackgroundMount mount(image, mountpoint_, {"--rw"});
        ASSERT_EQ(mount.result().exit_code, 0) << mount.result().err;
        // A second writer, and readers without -U, are refused as qemu refuses them.
        BackgroundMount second(image, other, {"--rw"});
        EXPECT_EQ(second.result().exit_code, 1);
        expect_one_error_line(second.result().err, image.string());
        EXPECT_NE(second.result().err.find("lock"), std::string::npos) << second.result().err;
        EXPECT_FALSE(is_mounted(other));
        BackgroundMount reader(image, other);
        EXPECT_EQ(reader.result().exit_code, 1);
        EXPECT_NE(reader.result().err.find("lock"), std::string::npos) << reader.result().err;
        EXPECT_FALSE(is_mounted(other));
        EXPECT_NE(run("qemu-img info " + q(image)).exit_code, 0);
        EXPECT_NE(run("qemu-io -c 'read 0 512' " + q(image)).exit_code, 0);
        // -U readers share (qemu-img info -U works under a running VM).
        EXPECT_EQ(run("qemu-img info -U " + q(image)).exit_code, 0);

        // A write through the mount is what a reader finds after unmount.
        run_ok("printf 'written by the mount' | dd status=none of=" + q(disk()) +
               " bs=1 seek=4096 conv=notrunc");
        run_ok("umount " + q(mountpoint_));
        EXPECT_EQ(mount.wait(), std::optional<int>(0));
    }
    run_ok("qemu-img check -q " + q(image));
    std::vector<std::byte> expected(4 * MiB);
    std::fill_n(expected.begin(), MiB, std::byte{0x31});
    const std::string text = "written by the mount";
    std::memcpy(expected.data() + 4096, text.data(), text.size());
    EXPECT_TRUE(test::qemu_raw(image, dir_) == expected);

    // A read-only mount keeps a writer out too.
    BackgroundMount reader(image, mountpoint_);
    ASSERT_EQ(reader.result().exit_code, 0) << reader.result().err;
    BackgroundMount writer(image, other, {"--rw"});
    EXPECT_EQ(writer.result().exit_code, 1);
    EXPECT_NE(writer.result().err.find("lock"), std::string::npos) << writer.result().err;
    EXPECT_FALSE(is_mounted(other));
}

TEST_F(Mount, RwRefusesOptionsThatCannotWrite) {
    auto image = dir_ / "opts.qcow2";
    test::make_image(image, "", "4M");
    run_ok("qemu-img snapshot -c s1 " + q(image));
    for (const auto& [option, words] : std::vector<std::pair<std::string, std::string>>{
             {"--snapshot=s1", "--rw cannot write a snapshot"},
             {"-U", "--rw cannot share the image"},
             {"--format=raw", "--rw writes qcow2 images only"},
             {"--backing=none", "--rw needs the backing file"}}) {
        auto r = run(cli() + " mount --rw " + option + " " + q(image) + " " + q(mountpoint_));
        EXPECT_EQ(r.exit_code, 1) << option;
        EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
        EXPECT_NE(r.err.find(words), std::string::npos) << option << ": " << r.err;
        EXPECT_FALSE(is_mounted(mountpoint_)) << option;
    }
    // A file that probes as raw is not written either (qemu would write it as raw).
    auto raw = dir_ / "plain.raw";
    test::write_file(raw, std::vector<std::byte>(MiB, std::byte{0x42}));
    auto r = run(cli() + " mount --rw " + q(raw) + " " + q(mountpoint_));
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_NE(r.err.find("probed as raw"), std::string::npos) << r.err;
    EXPECT_FALSE(is_mounted(mountpoint_));
    EXPECT_TRUE(test::read_file(raw) == std::vector<std::byte>(MiB, std::byte{0x42}));
}

} // namespace
} // namespace qcowmap

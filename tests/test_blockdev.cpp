// qcow2 on block devices: an image, a backing layer or a data file on a loop device
// is read like a file (sized with BLKGETSIZE64), and convert writes onto block devices. Loop
// devices are made in the test with `losetup`, which needs root: otherwise every test is
// skipped and says why.
#include "support.hpp"

#include <qcowmap/image.hpp>

#include <gtest/gtest.h>

#include <filesystem>
#include <iostream>
#include <memory>
#include <string>
#include <unistd.h>

namespace qcowmap {
namespace {

using test::cli;
using test::q;

using test::CommandResult;
using test::run;
using test::run_ok;
using test::shell_quote;
using test::TempDir;

/// Why loop devices cannot be made here, or "" when they can.
std::string why_no_loop_devices() {
    if (::geteuid() != 0)
        return "not running as root: losetup cannot attach loop devices";
    if (!std::filesystem::exists("/dev/loop-control"))
        return "/dev/loop-control is missing: no loop device support";
    if (run("command -v losetup").exit_code != 0)
        return "losetup is not installed";
    return "";
}

#define REQUIRE_LOOP_DEVICES()                                                                     \
    do {                                                                                           \
        if (std::string why = why_no_loop_devices(); !why.empty()) {                               \
            std::cout << "[  SKIPPED ] " << why << std::endl;                                      \
            GTEST_SKIP() << why;                                                                   \
        }                                                                                          \
    } while (0)

/// A loop device over a file (rounded up to a multiple of 512 bytes, as a loop device reads
/// whole sectors), detached on destruction.
class LoopDevice {
  public:
    explicit LoopDevice(const std::filesystem::path& file) {
        run_ok("truncate -s %512 " + q(file));
        CommandResult r = run("losetup -f --show " + q(file));
        if (r.exit_code != 0 || r.out.empty()) {
            ADD_FAILURE() << "losetup failed: " << r.err;
            return;
        }
        device_ = r.out.substr(0, r.out.find('\n'));
    }
    ~LoopDevice() {
        if (!device_.empty())
            run("losetup -d " + shell_quote(device_));
    }
    LoopDevice(const LoopDevice&) = delete;
    LoopDevice& operator=(const LoopDevice&) = delete;
    const std::string& path() const { return device_; }
    bool ok() const { return !device_.empty(); }

  private:
    std::string device_;
};

std::string strip_compressed_key(std::string text) {
    for (const char* key : {", \"compressed\": false", ", \"compressed\": true"}) {
        for (auto at = text.find(key); at != std::string::npos; at = text.find(key, at))
            text.erase(at, std::string(key).size());
    }
    return text;
}

TEST(BlockDevice, QcowOnALoopDeviceReadsLikeTheFile) {
    REQUIRE_LOOP_DEVICES();
    TempDir dir;
    const auto image = dir / "disk.qcow2";
    test::make_image(image, "cluster_size=64k", "8M",
                     {"write -P 0xab 0 100k", "write -P 0xcd 3M 1M", "write -z 5M 1M",
                      "write -c -P 0x5e 6M 128k"});
    const auto raw = dir / "disk.raw";
    run_ok("qemu-img convert -O raw " + q(image) + " " + q(raw));
    LoopDevice loop(image);
    ASSERT_TRUE(loop.ok());
    const std::string dev = shell_quote(loop.path());

    // The library: the device is sized with BLKGETSIZE64, not fstat (which says 0).
    auto opened = Image::open(loop.path());
    ASSERT_TRUE(opened) << opened.error().message;
    EXPECT_EQ(opened->size(), 8u << 20);
    EXPECT_EQ(opened->file_bytes().size(), std::filesystem::file_size(image));

    CommandResult info = run(cli() + " info " + dev);
    ASSERT_EQ(info.exit_code, 0) << info.err;
    EXPECT_NE(info.out.find("image: " + loop.path() + "\nfile format: qcow2\n"), std::string::npos)
        << info.out;
    EXPECT_NE(info.out.find("virtual size: 8 MiB (8388608 bytes)\n"), std::string::npos);
    EXPECT_EQ(strip_compressed_key(run_ok(cli() + " map --output=json " + dev)),
              run_ok("qemu-img map -f qcow2 --output=json " + dev));
    // Human map: qemu-img refuses compressed clusters there, so map the uncompressed part.
    EXPECT_EQ(run_ok(cli() + " map --max-length=6M " + dev),
              run_ok("qemu-img map -f qcow2 --max-length=6M " + dev));
    EXPECT_EQ(run(cli() + " cat " + dev + " | cmp - " + q(raw)).exit_code, 0);
    EXPECT_EQ(run_ok(cli() + " hash " + dev).substr(0, 64),
              run_ok("sha256sum < " + q(raw)).substr(0, 64));
    // The blkhash digest (test_blkhash checks the raw file's against the construction), and
    // the device read as a raw disk: the image file's bytes.
    EXPECT_EQ(run_ok(cli() + " hash --algo=blkhash-sha256 " + dev).substr(0, 64),
              run_ok(cli() + " hash --algo=blkhash-sha256 -f raw " + q(raw)).substr(0, 64));
    EXPECT_EQ(run_ok(cli() + " hash --algo=blkhash-sha256 -f raw " + dev).substr(0, 64),
              run_ok(cli() + " hash --algo=blkhash-sha256 -f raw " + q(image)).substr(0, 64));
    CommandResult compare = run(cli() + " compare " + dev + " " + q(image));
    EXPECT_EQ(compare.exit_code, 0) << compare.out << compare.err;
    CommandResult check = run(cli() + " check " + dev);
    EXPECT_EQ(check.exit_code, 0) << check.out << check.err;
    EXPECT_EQ(check.out, run_ok("qemu-img check " + dev));
    // The device holding the image is never a convert target for it.
    CommandResult self = run(cli() + " convert " + dev + " " + dev);
    EXPECT_EQ(self.exit_code, 3);
    EXPECT_EQ(self.err, "qcowmap: " + loop.path() +
                            ": is the image being read (or one of its layers or its data file): "
                            "refusing to overwrite it\n");
}

TEST(BlockDevice, BackingLayerAndDataFileOnLoopDevices) {
    REQUIRE_LOOP_DEVICES();
    TempDir dir;
    const auto base = dir / "base.qcow2";
    test::make_image(base, "", "4M", {"write -P 1 0 1M", "write -P 2 2M 512k"});
    LoopDevice base_dev(base);
    ASSERT_TRUE(base_dev.ok());
    // An overlay whose backing file is the device, named absolutely.
    const auto top = dir / "top.qcow2";
    run_ok("qemu-img create -q -f qcow2 -b " + shell_quote(base_dev.path()) + " -F qcow2 " +
           q(top));
    run_ok("qemu-io -f qcow2 -c 'write -P 3 512k 64k' " + q(top));
    const auto raw = dir / "top.raw";
    run_ok("qemu-img convert -O raw " + q(top) + " " + q(raw));
    EXPECT_EQ(run(cli() + " cat " + q(top) + " | cmp - " + q(raw)).exit_code, 0);
    // The File column names the device for the ranges it holds.
    std::string ours = run_ok(cli() + " map " + q(top));
    EXPECT_EQ(ours, run_ok("qemu-img map " + q(top)));
    EXPECT_NE(ours.find(base_dev.path() + "\n"), std::string::npos) << ours;
    EXPECT_EQ(strip_compressed_key(run_ok(cli() + " map --output=json " + q(top))),
              run_ok("qemu-img map --output=json " + q(top)));

    // An external data file on a device.
    run_ok("cd " + q(dir.path()) +
           " && qemu-img create -q -f qcow2 -o data_file=vm.data "
           "vm.qcow2 4M");
    run_ok("cd " + q(dir.path()) +
           " && qemu-io -f qcow2 -c 'write -P 4 64k 64k' "
           "-c 'write -P 5 3M 1M' vm.qcow2");
    const auto vm_raw = dir / "vm.raw";
    run_ok("cd " + q(dir.path()) + " && qemu-img convert -O raw vm.qcow2 vm.raw");
    LoopDevice data_dev(dir / "vm.data");
    ASSERT_TRUE(data_dev.ok());
    const std::string with_device = " --data-file=" + shell_quote(data_dev.path()) + " ";
    EXPECT_EQ(
        run(cli() + " cat" + with_device + q(dir / "vm.qcow2") + " | cmp - " + q(vm_raw)).exit_code,
        0);
    std::string map = run_ok(cli() + " map" + with_device + q(dir / "vm.qcow2"));
    EXPECT_EQ(map, "Offset          Length          Mapped to       File\n"
                   "0x10000         0x10000         0x10000         " +
                       data_dev.path() +
                       "\n"
                       "0x300000        0x100000        0x300000        " +
                       data_dev.path() + "\n");
}

TEST(BlockDevice, ConvertWritesOntoADeviceWithoutForce) {
    REQUIRE_LOOP_DEVICES();
    TempDir dir;
    const auto image = dir / "disk.qcow2";
    test::make_image(image, "", "4M",
                     {"write -P 0xab 0 64k", "write -z 1M 64k", "write -c -P 0x11 2M 64k"});
    const auto raw = dir / "disk.raw";
    run_ok("qemu-img convert -O raw " + q(image) + " " + q(raw));
    // A device larger than the disk, full of 0xff: the disk's zero runs must be zeroed on it
    // and the part past the disk left alone.
    const auto backing = dir / "target.img";
    run_ok("head -c 5M /dev/zero | tr '\\0' '\\377' > " + q(backing));
    LoopDevice target(backing);
    ASSERT_TRUE(target.ok());
    const std::string dev = shell_quote(target.path());
    CommandResult r = run(cli() + " convert -p --digest=blkhash-sha256 " + q(image) + " " + dev);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_TRUE(
        r.err.ends_with("(100.00/100%)\n" +
                        run_ok(cli() + " hash --algo=blkhash-sha256 " + q(image)).substr(0, 64) +
                        "  " + target.path() + "\n"))
        << r.err;
    EXPECT_EQ(run("cmp -n 4194304 " + dev + " " + q(raw)).exit_code, 0);
    EXPECT_EQ(run_ok("tail -c 1048576 " + dev + " | tr -d '\\377' | wc -c"), "0\n");
    // Smaller than the disk: refused before anything is written.
    const auto small = dir / "small.img";
    run_ok("truncate -s 1M " + q(small));
    LoopDevice small_dev(small);
    ASSERT_TRUE(small_dev.ok());
    r = run(cli() + " convert " + q(image) + " " + shell_quote(small_dev.path()));
    EXPECT_EQ(r.exit_code, 3);
    EXPECT_EQ(r.err, "qcowmap: " + small_dev.path() +
                         ": block device is 1048576 bytes, smaller than the disk (4194304 "
                         "bytes)\n");
}

} // namespace
} // namespace qcowmap

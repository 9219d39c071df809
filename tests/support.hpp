// Test support: temporary directories, running commands (qemu-img, qemu-io, the qcowmap CLI)
// and reading files. Images are always generated at test time, never shipped.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <iterator>
#include <optional>
#include <string>
#include <vector>

namespace qcowmap::test {

/// A fresh directory under $TMPDIR, removed with its contents on destruction.
class TempDir {
  public:
    TempDir();
    ~TempDir();
    TempDir(const TempDir&) = delete;
    TempDir& operator=(const TempDir&) = delete;
    const std::filesystem::path& path() const { return path_; }
    std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

  private:
    std::filesystem::path path_;
};

struct CommandResult {
    int exit_code = -1; ///< exit status, or 128 + signal number when killed by a signal
    std::string out;    ///< stdout
    std::string err;    ///< stderr
};

/// Runs `command` through /bin/sh, capturing stdout and stderr.
CommandResult run(const std::string& command);

/// Runs `command` and fails the current test (ADD_FAILURE) unless it exits 0. Returns stdout.
std::string run_ok(const std::string& command);

/// Single-quotes `text` for /bin/sh.
std::string shell_quote(const std::string& text);

/// The qcowmap CLI built with the tests (env QCOWMAP_BIN, set by meson).
std::string qcowmap_bin();

/// qcowmap_bin() quoted for /bin/sh: how a test's command line starts.
std::string cli();

/// `path` quoted for /bin/sh.
std::string q(const std::filesystem::path& path);

/// Whole file contents.
std::vector<std::byte> read_file(const std::filesystem::path& path);
/// Whole file contents as text (also of a FIFO or a /proc file, whose size says nothing).
std::string read_text(const std::filesystem::path& path);
void write_file(const std::filesystem::path& path, const std::vector<std::byte>& bytes);

/// Rewrites the active L2 entry of guest cluster `cluster` (its L2 table being the first one
/// the L1 table names) to a standard, COPIED entry at host offset 0x40000000000: far past the
/// end of any test image, so reading that cluster must fail with an error naming that offset.
void point_cluster_past_eof(const std::filesystem::path& image, std::uint64_t cluster);

/// `qemu-img convert -O raw IMAGE` into the directory, returned as bytes.
std::vector<std::byte> qemu_raw(const std::filesystem::path& image, const TempDir& dir);

/// Creates an image with `qemu-img create -f qcow2 -o OPTIONS PATH SIZE` and applies the
/// qemu-io commands in `io_commands` (each like "write -P 0xab 64k 4k").
void make_image(const std::filesystem::path& path, const std::string& options,
                const std::string& size, const std::vector<std::string>& io_commands = {});

/// Creates a LUKS-encrypted qcow2 image (secret "PASS", object id "s") of `size`. qemu-img's
/// key setup times itself and fails now and then on a loaded machine ("Unable to get accurate
/// CPU usage"), so it is tried up to 10 times; fails the test (ADD_FAILURE) if it never works.
void make_luks_image(const std::filesystem::path& path, const std::string& size);

} // namespace qcowmap::test

namespace qcowmap::test {

/// An image's bytes held in memory, to patch before opening them.
using Buffer = std::vector<std::byte>;

// Byte patching of a Buffer (big-endian, as qcow2 stores its fields). Offsets are checked with
// `at()`: a bad one throws, which gtest reports as a failure of the test.
void put_be(Buffer& b, std::uint64_t at, std::uint64_t value, unsigned width);
void put_u8(Buffer& b, std::uint64_t at, std::uint8_t value);
void put_be32(Buffer& b, std::uint64_t at, std::uint32_t value);
void put_be64(Buffer& b, std::uint64_t at, std::uint64_t value);
std::uint64_t get_be(const Buffer& b, std::uint64_t at, unsigned width);
std::uint32_t get_be32(const Buffer& b, std::uint64_t at);
std::uint64_t get_be64(const Buffer& b, std::uint64_t at);

/// Overwrites bytes of a file in place (qemu-iotests' poke_file).
void poke(const std::filesystem::path& path, std::uint64_t offset, const std::string& bytes);
/// Writes `value` big-endian in `width` bytes at `offset` (qemu-iotests' poke_file_be).
void poke_be(const std::filesystem::path& path, std::uint64_t offset, std::uint64_t value,
             unsigned width);
/// Reads a big-endian value of `width` bytes at `offset` (qemu-iotests' peek_file_be).
std::uint64_t peek_be(const std::filesystem::path& path, std::uint64_t offset, unsigned width);

/// Replaces, adds (data given, type absent) or removes (nullopt) the header extension `type`
/// of a qcow2 image, rewriting the extension area and moving the backing file name after it,
/// as qemu-iotests' qcow2.py add-header-ext / del-header-ext do.
void set_header_extension(const std::filesystem::path& path, std::uint32_t type,
                          const std::optional<std::string>& data);

/// eio_fs (tests/eio_fs.c, env QCOWMAP_EIO_FS) mounted at `mountpoint` over `source` for the
/// object's lifetime: the files of `source`, read-only, with reads that fail with EIO where
/// fail_reads() says. Unmounted (lazily) by the destructor, also when the test failed.
/// mounted() is false where it cannot run (no /dev/fuse, no helper): skip the test then.
class EioMount {
  public:
    EioMount(const std::filesystem::path& source, const std::filesystem::path& mountpoint);
    ~EioMount();
    EioMount(const EioMount&) = delete;
    EioMount& operator=(const EioMount&) = delete;
    bool mounted() const { return mounted_; }
    /// From now on, reads of `name` overlapping [offset, offset + length) fail with EIO.
    void fail_reads(const std::string& name, std::uint64_t offset, std::uint64_t length);

  private:
    std::filesystem::path source_;
    std::filesystem::path mountpoint_;
    int pid_ = -1;
    bool mounted_ = false;
};

/// qemu-io holding `image` open for writing (QEMU's image locks taken, as a running VM holds
/// them) for the object's lifetime, reading commands from a pipe; the destructor sends quit.
/// held() is true once `qemu-img info` was seen refused (waits up to 30 s for that).
/// The shell script README.md holds between `<!-- NAME:begin -->` and `<!-- NAME:end -->` (inside
/// a ```sh fence); empty when the markers are missing. README is found through
/// QCOWMAP_SOURCE_ROOT, which meson sets for every test.
std::string readme_script(const std::string& name);

/// Runs `script` with sh in `dir`, the built qcowmap first on PATH, bounded by timeout 600.
CommandResult run_script_in(const std::filesystem::path& dir, const std::string& script);

/// Waits (up to 30 s) until a writer such as qemu-io holds `image`: its OFD locks show in
/// /proc/locks and `qemu-img info` is refused. Polling with qemu-img info alone races: its own
/// read lock denies writers, so a qemu-io opening in that instant fails and never holds it.
bool wait_for_writer_lock(const std::filesystem::path& image);

class QemuIoHolder {
  public:
    explicit QemuIoHolder(const std::filesystem::path& image);
    ~QemuIoHolder();
    QemuIoHolder(const QemuIoHolder&) = delete;
    QemuIoHolder& operator=(const QemuIoHolder&) = delete;
    bool held() const { return held_; }

  private:
    std::FILE* io_ = nullptr;
    bool held_ = false;
};

} // namespace qcowmap::test

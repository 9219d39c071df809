// The one owner of an image file's mapping (mmap(2) of a regular file or a block device).
#pragma once

#include <qcowmap/result.hpp>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <utility>

namespace qcowmap::detail {

/// A whole file mapped read-only. Move-only; the span lives as long as the object.
class MappedFile {
  public:
    /// Opens `path` read-only and maps it (see `open_fd`). Errors (io_error / not_qcow2) say
    /// what is wrong with the file (missing, unreadable, a directory, not a regular file or
    /// block device, empty) without naming it: callers add the name they know it by.
    static Result<MappedFile> open(const std::filesystem::path& path, bool allow_empty = false);

    /// Maps the file open on `fd`, which the MappedFile takes over (it is closed on failure
    /// too). Regular files are sized with fstat, block devices with the BLKGETSIZE64 ioctl (an
    /// LVM volume or a loop device holds a qcow2 as a file would); anything else is refused
    /// with not_qcow2. An empty file (or device) is refused unless `allow_empty`, which gives
    /// an empty span (raw backing files may be empty). `name` is kept for `name()` only.
    static Result<MappedFile> open_fd(int fd, const std::filesystem::path& name,
                                      bool allow_empty = false);

    MappedFile(MappedFile&&) noexcept;
    MappedFile& operator=(MappedFile&&) noexcept;
    ~MappedFile();

    std::span<const std::byte> bytes() const { return bytes_; }
    /// The file, kept open read-only for lseek(SEEK_DATA/SEEK_HOLE) and kernel copies.
    int fd() const;
    /// Device and inode of the file (of the device node for a block device), to recognise the
    /// same file reached by two names.
    std::pair<std::uint64_t, std::uint64_t> identity() const;
    /// True when the file is a block device.
    bool is_block_device() const;
    /// True when the file's size or modification time is no longer what it was when it was
    /// mapped (someone wrote to it or truncated it since), or when it cannot be checked.
    /// For a block device only its size is compared (writes do not change a device node).
    bool changed() const;
    /// The name given to `open` / `open_fd`.
    const std::filesystem::path& name() const;

  private:
    struct Impl;
    explicit MappedFile(std::unique_ptr<Impl> impl);
    std::unique_ptr<Impl> impl_;
    std::span<const std::byte> bytes_;
};

} // namespace qcowmap::detail

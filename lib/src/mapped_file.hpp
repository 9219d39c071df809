// The one owner of an image file's mapping; the only place that touches Boost.Iostreams.
#pragma once

#include <qcowmap/result.hpp>

#include <cstddef>
#include <filesystem>
#include <memory>
#include <span>

namespace qcowmap::detail {

/// A whole file mapped read-only. Move-only; the span lives as long as the object.
class MappedFile {
  public:
    /// Maps `path`. Errors (io_error / not_qcow2) name the path's problem: missing, unreadable,
    /// a directory, not a regular file, or empty (which cannot be mapped) unless `allow_empty`,
    /// which gives an empty span (raw backing files may be empty).
    static Result<MappedFile> open(const std::filesystem::path& path, bool allow_empty = false);
    /// Maps the file already open on `fd` (read-only), which the MappedFile takes over (it is
    /// closed on failure too). `name` is only remembered for messages. Same checks and errors
    /// as `open`. Lets a caller choose how the file is reached (openat2 confinement) and map
    /// exactly the file it checked.
    static Result<MappedFile> open_fd(int fd, const std::filesystem::path& name, bool allow_empty);

    MappedFile(MappedFile&&) noexcept;
    MappedFile& operator=(MappedFile&&) noexcept;
    ~MappedFile();

    std::span<const std::byte> bytes() const { return bytes_; }
    /// The file, kept open read-only for lseek(SEEK_DATA/SEEK_HOLE) and kernel copies.
    int fd() const;
    /// Device and inode, to recognise the same file reached by two names.
    std::pair<std::uint64_t, std::uint64_t> identity() const;

  private:
    struct Impl;
    explicit MappedFile(std::unique_ptr<Impl> impl);
    std::unique_ptr<Impl> impl_;
    std::span<const std::byte> bytes_;
};

} // namespace qcowmap::detail

// An output file that appears complete or not at all, on every file system: written under a
// temporary in the target's directory and named only once complete. Shared by the qcow2
// writer (write_qcow2_file), the raw export (export_raw_file) and the stream decoder's raw
// targets.
#pragma once

#include <qcowmap/result.hpp>

#include <filesystem>
#include <optional>
#include <string>
#include <sys/types.h>

namespace qcowmap::detail {

/// The file a write to `target` lands in, as qemu-img's does: a symlink is followed (to the end
/// of its chain, relative links from their own directory), so the link stays and the file it
/// points to is replaced; a dangling link names the file to create. Other paths unchanged.
std::filesystem::path resolve_output_path(const std::filesystem::path& target);

/// A new file on its way to `target`.
///
/// Created unnamed (O_TMPFILE) where the file system can, so that nothing is left behind
/// whatever stops the process; elsewhere (FUSE mounts such as bindfs, NFS, older kernels) under
/// a hidden name next to the target, `.NAME.qcowmap-XXXXXX`, removed by the destructor on every
/// error path and by remove_temporary_files() from a signal handler. Only SIGKILL (or a crash
/// of the machine) can leave that hidden file behind.
class AtomicFile {
  public:
    /// Creates the temporary for `target` (a symlink is followed: resolve_output_path) in its
    /// directory, open for writing and reading. An existing target is refused unless
    /// `replace`, and always when it is a directory or not a regular file; a replaced file's
    /// mode is kept, a new one gets 0644 less the umask, as a file qemu-img creates. Errors:
    /// io_error, its message without the file name ("already exists (use --force to replace
    /// it)", "is a directory", "exists and is not a regular file", strerror).
    static Result<AtomicFile> create(const std::filesystem::path& target, bool replace);

    AtomicFile(AtomicFile&& other) noexcept;
    AtomicFile& operator=(AtomicFile&&) = delete;
    AtomicFile(const AtomicFile&) = delete;
    ~AtomicFile();

    int fd() const { return fd_; }

    /// Syncs the file and gives it its name: atomically refused when the target exists unless
    /// `replace` was given (RENAME_NOREPLACE, else link(2) + unlink, else an exclusive create of
    /// the name then rename over it), else renamed over it; then syncs the directory and closes
    /// the file. Errors: io_error as create.
    Result<void> commit();

  private:
    AtomicFile(std::filesystem::path target, int fd, std::string temporary, int slot, bool replace);
    /// Forgets the temporary name (it no longer exists under that name, or never will).
    void drop_name();

    std::filesystem::path target_;
    int fd_ = -1;
    std::string temporary_; ///< the hidden name, empty while unnamed (O_TMPFILE)
    int slot_ = -1;         ///< its place in the list remove_temporary_files() reads
    bool replace_ = false;
};

} // namespace qcowmap::detail

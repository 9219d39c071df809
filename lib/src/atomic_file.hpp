// An output file that appears complete or not at all, on every file system: written under a
// temporary in the target's directory and named only once complete. Shared by the qcow2
// writer (write_qcow2_file) and the raw export (export_raw_file).
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
    /// Creates the temporary in the directory of `target` (already resolved). It gets
    /// `keep_mode` (the mode of the file it replaces), else 0644 less the umask, as a file
    /// qemu-img creates. Errors: the errno of creating it, as the message.
    static Result<AtomicFile> create(const std::filesystem::path& target,
                                     std::optional<mode_t> keep_mode = std::nullopt);

    AtomicFile(AtomicFile&& other) noexcept;
    AtomicFile& operator=(AtomicFile&&) = delete;
    AtomicFile(const AtomicFile&) = delete;
    ~AtomicFile();

    int fd() const { return fd_; }

    /// Syncs the file and gives it its name: atomically refused when `target` exists unless
    /// `replace` (RENAME_NOREPLACE, else link(2) + unlink, else an exclusive create of the name
    /// then rename over it), else renamed over it; then syncs the directory and closes the
    /// file. The message of an error is the errno's text, or "already exists (use --force to
    /// replace it)".
    Result<void> commit(bool replace);

  private:
    AtomicFile(std::filesystem::path target, int fd, std::string temporary, int slot);
    /// Forgets the temporary name (it no longer exists under that name, or never will).
    void drop_name();

    std::filesystem::path target_;
    int fd_ = -1;
    std::string temporary_; ///< the hidden name, empty while unnamed (O_TMPFILE)
    int slot_ = -1;         ///< its place in the list remove_temporary_files() reads
};

} // namespace qcowmap::detail

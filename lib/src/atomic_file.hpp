// A regular file that appears complete or not at all: written under an unnamed temporary in
// its directory and given its name only once complete. Shared by the qcow2 writer and the
// stream decoder's raw targets.
#pragma once

#include <qcowmap/result.hpp>

#include <filesystem>
#include <string>

namespace qcowmap::detail {

class AtomicFile {
  public:
    /// Creates the temporary for `target`: O_TMPFILE in its directory (nothing is left behind
    /// by a crash or kill), else a hidden name next to it, removed on every error path. An
    /// existing `target` is refused unless `replace`, and always when it is a directory or not
    /// a regular file. Errors: io_error, its message without the file name ("already exists
    /// (use --force to replace it)", "is a directory", strerror).
    static Result<AtomicFile> create(const std::filesystem::path& target, bool replace);

    AtomicFile(AtomicFile&& other) noexcept;
    AtomicFile& operator=(AtomicFile&&) = delete;
    AtomicFile(const AtomicFile&) = delete;
    /// Without commit(): the temporary is closed and removed.
    ~AtomicFile();

    /// The temporary's descriptor, open for writing (and reading).
    int fd() const { return fd_; }

    /// Syncs the file, gives it the target's name (atomically: link fails on an existing name
    /// when not replacing, rename replaces) and syncs the directory. Errors: io_error as create.
    Result<void> commit();

  private:
    AtomicFile(std::filesystem::path target, std::string temp_name, int fd, bool replace)
        : target_(std::move(target)), temp_name_(std::move(temp_name)), fd_(fd), replace_(replace) {
    }
    void abandon();

    std::filesystem::path target_;
    std::string temp_name_; ///< empty for an O_TMPFILE file until it is linked
    int fd_ = -1;
    bool replace_ = false;
};

} // namespace qcowmap::detail

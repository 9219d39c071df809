// Outputs that appear complete or not at all (atomic_file.hpp).
#include "atomic_file.hpp"

#include "errors.hpp"

#include <qcowmap/export.hpp>

#include <fmt/format.h>

#include <array>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <mutex>
#include <optional>
#include <sys/stat.h>
#include <unistd.h>
#include <utility>

namespace qcowmap::detail {
namespace {

/// Hidden temporaries that exist right now, for remove_temporary_files() to unlink from a
/// signal handler: fixed storage, read with atomics only. A process with more temporaries at
/// once than slots still removes the others on every error path, just not from a handler.
struct TemporarySlot {
    std::atomic<bool> active{false};
    char name[PATH_MAX] = {};
};
std::array<TemporarySlot, 16> g_temporaries;
std::mutex g_temporaries_mutex;

int remember_temporary(const std::string& name) {
    if (name.size() >= PATH_MAX)
        return -1;
    std::lock_guard lock(g_temporaries_mutex);
    for (std::size_t i = 0; i < g_temporaries.size(); ++i) {
        TemporarySlot& slot = g_temporaries[i];
        if (!slot.active.load(std::memory_order_relaxed)) {
            std::memcpy(slot.name, name.c_str(), name.size() + 1);
            slot.active.store(true, std::memory_order_release);
            return static_cast<int>(i);
        }
    }
    return -1;
}

void forget_temporary(int slot) {
    if (slot >= 0)
        g_temporaries[static_cast<std::size_t>(slot)].active.store(false,
                                                                   std::memory_order_release);
}

/// The hidden name pattern next to `target`: `.NAME.qcowmap-XXXXXX`.
std::string hidden_pattern(const std::filesystem::path& target) {
    std::filesystem::path dir = target.parent_path();
    if (dir.empty())
        dir = ".";
    return (dir / ("." + target.filename().string() + ".qcowmap-XXXXXX")).string();
}

Error already_exists() {
    return Error{ErrorCode::io_error, "already exists (use --force to replace it)"};
}

/// The process's umask, read without changing it (umask(2) can only set it).
mode_t current_umask() {
    FILE* status = std::fopen("/proc/self/status", "re");
    unsigned mask = 022;
    if (status) {
        char line[256];
        while (std::fgets(line, sizeof line, status)) {
            if (std::sscanf(line, "Umask: %o", &mask) == 1)
                break;
        }
        std::fclose(status);
    }
    return static_cast<mode_t>(mask);
}

/// errno values with which a file system says it does not do an operation at all.
bool unsupported(int error) {
    return error == EINVAL || error == ENOSYS || error == EOPNOTSUPP || error == ENOTSUP ||
           error == EPERM;
}

} // namespace

std::filesystem::path resolve_output_path(const std::filesystem::path& target) {
    std::filesystem::path path = target;
    // As the kernel does: at most 40 links in a chain (ELOOP beyond); then the path as it is,
    // for the open that follows to report.
    for (int links = 0; links < 40; ++links) {
        struct stat st {};
        if (::lstat(path.c_str(), &st) != 0 || !S_ISLNK(st.st_mode))
            return path;
        std::string text(PATH_MAX, '\0');
        const ssize_t n = ::readlink(path.c_str(), text.data(), text.size());
        if (n < 0 || static_cast<std::size_t>(n) >= text.size())
            return path;
        text.resize(static_cast<std::size_t>(n));
        std::filesystem::path next(text);
        path = next.is_absolute() ? next : path.parent_path() / next;
    }
    return path;
}

Result<AtomicFile> AtomicFile::create(const std::filesystem::path& given, bool replace) {
    // Through a symlink, as qemu-img writes: the file it points to is what gets replaced.
    const std::filesystem::path target = resolve_output_path(given);
    std::optional<mode_t> keep_mode;
    struct stat st {};
    if (::stat(target.c_str(), &st) == 0) {
        if (S_ISDIR(st.st_mode))
            return Error{ErrorCode::io_error, "is a directory"};
        if (!S_ISREG(st.st_mode))
            return Error{ErrorCode::io_error, "exists and is not a regular file"};
        if (!replace)
            return already_exists();
        keep_mode = st.st_mode & 07777;
    }
    std::filesystem::path dir = target.parent_path();
    if (dir.empty())
        dir = ".";
    // A new file gets 0644 less the umask, as qemu-img's; a replaced one keeps its mode.
    int fd = ::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0644);
    if (fd >= 0) {
        if (keep_mode)
            (void)::fchmod(fd, *keep_mode);
        return AtomicFile(target, fd, {}, -1, replace);
    }
    // EOPNOTSUPP: the file system has no O_TMPFILE (bindfs, NFS); EISDIR/EINVAL: the kernel
    // has none. Anything else (no such directory, no permission) is the answer.
    if (errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL && errno != ENOSYS)
        return errno_error(errno);
    std::string name = hidden_pattern(target);
    // Remembered before it exists (the X's still in place, so nothing is removed by mistake):
    // a signal between the create and the bookkeeping must not leave it behind.
    const int slot = remember_temporary(name);
    fd = ::mkostemp(name.data(), O_CLOEXEC);
    if (fd < 0) {
        const int error = errno;
        forget_temporary(slot);
        return errno_error(error);
    }
    if (slot >= 0)
        std::memcpy(g_temporaries[static_cast<std::size_t>(slot)].name, name.c_str(),
                    name.size() + 1);
    (void)::fchmod(fd, keep_mode ? *keep_mode : 0644 & ~current_umask());
    return AtomicFile(target, fd, std::move(name), slot, replace);
}

AtomicFile::AtomicFile(std::filesystem::path target, int fd, std::string temporary, int slot,
                       bool replace)
    : target_(std::move(target)), fd_(fd), temporary_(std::move(temporary)), slot_(slot),
      replace_(replace) {}

AtomicFile::AtomicFile(AtomicFile&& other) noexcept
    : target_(std::move(other.target_)), fd_(std::exchange(other.fd_, -1)),
      temporary_(std::move(other.temporary_)), slot_(std::exchange(other.slot_, -1)),
      replace_(other.replace_) {
    other.temporary_.clear();
}

AtomicFile::~AtomicFile() {
    if (!temporary_.empty())
        ::unlink(temporary_.c_str());
    drop_name();
    if (fd_ >= 0)
        ::close(fd_);
}

void AtomicFile::drop_name() {
    forget_temporary(slot_);
    slot_ = -1;
    temporary_.clear();
}

Result<void> AtomicFile::commit() {
    if (fd_ < 0)
        return Error{ErrorCode::io_error, "no file to commit"};
    const bool replace = replace_;
    if (::fsync(fd_) != 0)
        return errno_error(errno);
    const std::string name = target_.string();
    if (temporary_.empty()) {
        // Unnamed (O_TMPFILE): a link straight at the target when it must not exist (linkat
        // fails with EEXIST, atomically); to replace, a hidden name first, renamed over it.
        std::string link_name = name;
        if (replace) {
            link_name = hidden_pattern(target_);
            link_name.resize(link_name.size() - 6);
            link_name += std::to_string(::getpid());
            ::unlink(link_name.c_str()); // left by a killed run with the same process id
            temporary_ = link_name;
            slot_ = remember_temporary(link_name);
        }
        const std::string proc = fmt::format("/proc/self/fd/{}", fd_);
        if (::linkat(fd_, "", AT_FDCWD, link_name.c_str(), AT_EMPTY_PATH) != 0 &&
            ::linkat(AT_FDCWD, proc.c_str(), AT_FDCWD, link_name.c_str(), AT_SYMLINK_FOLLOW) != 0) {
            const int error = errno;
            if (replace)
                drop_name(); // never created
            return error == EEXIST && !replace ? already_exists() : errno_error(error);
        }
        if (replace && ::rename(link_name.c_str(), name.c_str()) != 0)
            return errno_error(errno); // the destructor removes the hidden name
        drop_name();
    } else if (replace) {
        if (::rename(temporary_.c_str(), name.c_str()) != 0)
            return errno_error(errno);
        drop_name();
    } else if (::renameat2(AT_FDCWD, temporary_.c_str(), AT_FDCWD, name.c_str(),
                           RENAME_NOREPLACE) == 0) {
        drop_name();
    } else if (errno == EEXIST) {
        return already_exists();
    } else if (!unsupported(errno)) {
        return errno_error(errno);
    } else if (::link(temporary_.c_str(), name.c_str()) == 0) {
        // No RENAME_NOREPLACE here (FUSE, NFS): link(2) also refuses an existing name
        // atomically; the temporary name then goes.
        ::unlink(temporary_.c_str());
        drop_name();
    } else if (errno == EEXIST) {
        return already_exists();
    } else if (!unsupported(errno)) {
        return errno_error(errno);
    } else {
        // No hard links either: claim the name with an exclusive create, then rename over the
        // placeholder. Only a kill between the two leaves an empty TARGET.
        const int placeholder = ::open(name.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (placeholder < 0)
            return errno == EEXIST ? already_exists() : errno_error(errno);
        ::close(placeholder);
        if (::rename(temporary_.c_str(), name.c_str()) != 0) {
            const int error = errno;
            ::unlink(name.c_str());
            return errno_error(error);
        }
        drop_name();
    }
    const int fd = std::exchange(fd_, -1);
    if (::close(fd) != 0)
        return errno_error(errno);
    // The new name is durable once the directory is.
    std::filesystem::path dir = target_.parent_path();
    if (dir.empty())
        dir = ".";
    const int dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dir_fd >= 0) {
        (void)::fsync(dir_fd);
        ::close(dir_fd);
    }
    return {};
}

} // namespace qcowmap::detail

namespace qcowmap {

void remove_temporary_files() noexcept {
    for (detail::TemporarySlot& slot : detail::g_temporaries) {
        if (slot.active.load(std::memory_order_acquire))
            ::unlink(slot.name);
    }
}

} // namespace qcowmap

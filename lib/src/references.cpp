// Untrusted references: a backing or data file name taken from an image is opened only inside
// the image's directory. The decision and the open are one step, relative to a descriptor of
// that directory, so no path is ever resolved twice (no check-then-open race).
#include "references.hpp"

#include "bytes.hpp"
#include "errors.hpp"

#include <qcowmap/references.hpp>

#include <fmt/format.h>

#include <cerrno>
#include <climits>
#include <cstring>
#include <deque>
#include <fcntl.h>
#include <linux/magic.h>
#include <linux/openat2.h>
#include <string>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <vector>

namespace qcowmap::detail {
namespace {

// Symlinks followed in one name before giving up, as the kernel's own limit (MAXSYMLINKS).
constexpr unsigned kMaxSymlinks = 40;

/// Closes a descriptor when it goes out of scope unless released.
class Fd {
  public:
    explicit Fd(int fd = -1) : fd_(fd) {}
    Fd(Fd&& other) noexcept : fd_(other.release()) {}
    Fd& operator=(Fd&& other) noexcept {
        reset(other.release());
        return *this;
    }
    Fd(const Fd&) = delete;
    Fd& operator=(const Fd&) = delete;
    ~Fd() { reset(); }
    int get() const { return fd_; }
    int release() { return std::exchange(fd_, -1); }
    void reset(int fd = -1) {
        if (fd_ >= 0)
            ::close(fd_);
        fd_ = fd;
    }

  private:
    int fd_;
};

std::string_view what_of(ErrorOrigin origin) {
    return origin == ErrorOrigin::data_file ? "data file" : "backing file";
}

/// A refusal as `confine` returns it: the message is only why, `path` the name as shown.
Error refused(std::string_view shown_name, std::string_view why) {
    Error error{ErrorCode::unsupported_feature, std::string(why)};
    error.refusal = Refusal::untrusted;
    error.path = std::string(shown_name);
    return error;
}

Error os_error(ErrorOrigin origin, const std::filesystem::path& path, int err) {
    Error error = errno_error(err, fmt::format("{} {}: {}", what_of(origin),
                                               printable(path.string()), std::strerror(err)));
    return attribute(std::move(error), origin, path.string());
}

/// After the open: a regular file, and not one of the kernel's pseudo files (which claim to be
/// regular files of size 0 and would read as another process's or the host's state).
Result<void> check_opened(int fd, ErrorOrigin origin, std::string_view name) {
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
        const int err = errno;
        return attribute(errno_error(err, fmt::format("{} '{}': {}", what_of(origin),
                                                      printable(name), std::strerror(err))),
                         origin, std::string(name));
    }
    if (!S_ISREG(st.st_mode)) {
        const char* kind = S_ISDIR(st.st_mode)    ? "a directory"
                           : S_ISBLK(st.st_mode)  ? "a block device"
                           : S_ISCHR(st.st_mode)  ? "a character device"
                           : S_ISFIFO(st.st_mode) ? "a FIFO"
                           : S_ISSOCK(st.st_mode) ? "a socket"
                                                  : "a special file";
        return refused(name, fmt::format("is {}, not a regular file", kind));
    }
    struct statfs fs {};
    if (::fstatfs(fd, &fs) == 0 && (fs.f_type == PROC_SUPER_MAGIC || fs.f_type == SYSFS_MAGIC)) {
        return refused(name, "is a /proc or /sys file");
    }
    return {};
}

/// The open flags of the final file: read-only, never a controlling terminal, and
/// non-blocking so that a FIFO does not wait for a writer (it is refused right after).
constexpr int kFileFlags = O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK;

/// openat2 with RESOLVE_BENEATH: the kernel refuses absolute symlinks and `..` that would
/// leave `dir`, and RESOLVE_NO_MAGICLINKS refuses /proc/self/fd-style links. Returns -errno.
int open_beneath(int dir, std::string_view name, int flags) {
    open_how how{};
    how.flags = static_cast<std::uint64_t>(flags);
    how.resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS;
    const std::string path(name);
    const long fd = ::syscall(SYS_openat2, dir, path.c_str(), &how, sizeof how);
    return fd < 0 ? -errno : static_cast<int>(fd);
}

/// A component of a name being walked, and whether what it names must be a directory (it was
/// followed by a slash or by `.`, as in "a/" or "a/.": openat2 then fails with ENOTDIR on a
/// file).
struct Part {
    std::string name;
    bool directory = false;
};

/// Puts the components of `text` (a name, or a symlink's target) in front of `pending`; empty
/// and `.` components only mark the one before as a directory. `directory`: the last one must
/// be a directory (the symlink was followed by one).
void split_into_front(std::deque<Part>& pending, std::string_view text, bool directory) {
    std::vector<Part> parts;
    std::size_t at = 0;
    while (at <= text.size()) {
        const std::size_t slash = text.find('/', at);
        const std::size_t end = slash == std::string_view::npos ? text.size() : slash;
        const std::string_view part = text.substr(at, end - at);
        if (part.empty() || part == ".") {
            if (!parts.empty() && (slash != std::string_view::npos || part == "."))
                parts.back().directory = true;
        } else {
            parts.push_back({std::string(part), slash != std::string_view::npos});
        }
        if (slash == std::string_view::npos)
            break;
        at = slash + 1;
    }
    if (!parts.empty() && directory)
        parts.back().directory = true;
    pending.insert(pending.begin(), parts.begin(), parts.end());
}

/// The same confinement without openat2: walk the name one component at a time from `dir`,
/// opening each with O_NOFOLLOW, expanding symlinks by hand (readlinkat on the link itself)
/// and refusing an absolute target or a `..` above `dir`. Returns the opened file, -errno, or
/// -EXDEV for an escape (as openat2 reports it).
int open_by_walk(int dir, std::string_view name, int flags) {
    std::deque<Part> pending;
    split_into_front(pending, name, false);
    if (pending.empty())
        return -EISDIR; // the directory itself
    // The directories descended into, innermost last; `..` pops one, above `dir` is an escape.
    std::vector<Fd> stack;
    auto current = [&] { return stack.empty() ? dir : stack.back().get(); };
    unsigned links = 0;
    while (!pending.empty()) {
        const Part part = std::move(pending.front());
        pending.pop_front();
        if (part.name == "..") {
            if (stack.empty())
                return -EXDEV;
            stack.pop_back();
            continue;
        }
        Fd node(::openat(current(), part.name.c_str(), O_PATH | O_NOFOLLOW | O_CLOEXEC));
        if (node.get() < 0)
            return -errno;
        struct stat st {};
        if (::fstat(node.get(), &st) != 0)
            return -errno;
        if (S_ISLNK(st.st_mode)) {
            if (++links > kMaxSymlinks)
                return -ELOOP;
            // The target of the link we hold, not of whatever the name means now.
            std::string target(4096, '\0');
            const ssize_t n = ::readlinkat(node.get(), "", target.data(), target.size());
            if (n < 0)
                return -errno;
            if (static_cast<std::size_t>(n) >= target.size())
                return -ENAMETOOLONG;
            target.resize(static_cast<std::size_t>(n));
            if (target.empty())
                return -ENOENT;
            if (target[0] == '/')
                return -EXDEV;
            split_into_front(pending, target, part.directory);
            continue;
        }
        if (!S_ISDIR(st.st_mode) && (part.directory || !pending.empty()))
            return -ENOTDIR;
        if (pending.empty()) {
            // The last component: open the very inode the O_PATH descriptor holds, by name
            // again with O_NOFOLLOW, and make sure it is still that inode.
            Fd file(::openat(current(), part.name.c_str(), flags | O_NOFOLLOW));
            if (file.get() < 0)
                return -errno;
            struct stat opened {};
            if (::fstat(file.get(), &opened) != 0)
                return -errno;
            if (opened.st_dev != st.st_dev || opened.st_ino != st.st_ino)
                return -EAGAIN; // replaced between the two opens
            return file.release();
        }
        Fd next(
            ::openat(current(), part.name.c_str(), O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
        if (next.get() < 0)
            return -errno;
        stack.push_back(std::move(next));
    }
    return -EISDIR; // the name ended in `..`: a directory
}

/// open_confined, with a refusal's message being only why (see `refused`).
Result<ConfinedFile> confine(const std::filesystem::path& image, std::string_view name,
                             ErrorOrigin origin, ConfineMethod method) {
    if (name.empty()) {
        return refused(name, "is an empty name");
    }
    if (name.find('\0') != std::string_view::npos) {
        return refused(name, "contains a NUL byte");
    }
    if (name.front() == '/') {
        return refused(name, "is an absolute path");
    }
    if (name.size() >= PATH_MAX) {
        return refused(name.substr(0, 64), "... is longer than a path may be");
    }
    // qemu resolves a relative name against the directory of the image naming it.
    std::filesystem::path directory = image.parent_path();
    if (directory.empty())
        directory = ".";
    const std::filesystem::path path = directory / std::filesystem::path(std::string(name));
    Fd dir(::open(directory.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC));
    if (dir.get() < 0) {
        return os_error(origin, path, errno);
    }
    bool walk = method == ConfineMethod::walk;
    auto open_with = [&](int flags) {
        return walk ? open_by_walk(dir.get(), name, flags) : open_beneath(dir.get(), name, flags);
    };
    int fd = open_with(kFileFlags);
    // Kernels before 5.6 lack openat2, and some sandboxes filter it: walk instead.
    if (!walk && (fd == -ENOSYS || fd == -EPERM)) {
        walk = true;
        fd = open_with(kFileFlags);
    }
    if (fd == -ENXIO) {
        // A socket (or a device without a driver) cannot be opened for reading: look at what
        // it is without opening it, to say so.
        fd = open_with(O_PATH | O_CLOEXEC);
    }
    if (fd < 0) {
        switch (-fd) {
        case EXDEV:
            return refused(name, "leaves the image's directory");
        case ELOOP:
            return refused(name, "goes through a symlink loop or a /proc magic link");
        case EAGAIN:
            return refused(name, "changed while it was being opened");
        case EISDIR:
            return refused(name, "is a directory, not a regular file");
        default:
            return os_error(origin, path, -fd);
        }
    }
    Fd file(fd);
    if (auto ok = check_opened(file.get(), origin, name); !ok) {
        return std::move(ok).error();
    }
    return ConfinedFile{file.release(), path};
}

} // namespace

Result<ConfinedFile> open_confined(const std::filesystem::path& image, std::string_view name,
                                   ErrorOrigin origin, ConfineMethod method) {
    auto opened = confine(image, name, origin, method);
    if (!opened && opened.error().refusal == Refusal::untrusted) {
        // "WHAT 'NAME' why (untrusted)"
        Error error = std::move(opened).error();
        error.message = fmt::format("{} '{}' {}{}", what_of(origin), printable(error.path),
                                    error.message, kUntrustedRefusalMark);
        error.path = std::string(name);
        return attribute(std::move(error), origin, std::string(name));
    }
    return opened;
}

} // namespace qcowmap::detail

namespace qcowmap {

std::string_view to_string(ImageReference::Kind kind) {
    return kind == ImageReference::Kind::backing_file ? "backing file" : "data file";
}

std::vector<ImageReference> image_references(const Image& image) {
    std::vector<ImageReference> out;
    const ImageInfo& info = image.info();
    auto add = [&](ImageReference::Kind kind, const std::string& name) {
        ImageReference ref;
        ref.kind = kind;
        ref.name = name;
        const ErrorOrigin origin = kind == ImageReference::Kind::backing_file
                                       ? ErrorOrigin::backing
                                       : ErrorOrigin::data_file;
        auto opened = detail::confine(image.path(), name, origin, detail::ConfineMethod::automatic);
        if (opened) {
            ::close(opened->fd);
        } else if (opened.error().refusal == Refusal::untrusted) {
            // The why alone, unless the name was shortened to be shown ("'NAME...' ... is
            // longer than a path may be"): then the whole sentence.
            const Error& refusal = opened.error();
            ref.untrusted_refusal =
                refusal.path == name
                    ? refusal.message
                    : fmt::format("{} '{}' {}", to_string(kind), detail::printable(refusal.path),
                                  refusal.message);
        } else {
            ref.missing = true;
        }
        out.push_back(std::move(ref));
    };
    if (info.backing_file)
        add(ImageReference::Kind::backing_file, *info.backing_file);
    if (info.data_file)
        add(ImageReference::Kind::data_file, *info.data_file);
    return out;
}

} // namespace qcowmap

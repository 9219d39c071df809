#include "atomic_file.hpp"

#include <fmt/format.h>

#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace qcowmap::detail {
namespace {

Error file_error(std::string message) {
    return Error{ErrorCode::io_error, std::move(message)};
}

Error errno_error(int error) {
    return file_error(std::strerror(error));
}

constexpr const char* kExists = "already exists (use --force to replace it)";

} // namespace

Result<AtomicFile> AtomicFile::create(const std::filesystem::path& target, bool replace) {
    const std::string name = target.string();
    struct stat st {};
    if (::stat(name.c_str(), &st) == 0) {
        if (S_ISDIR(st.st_mode))
            return file_error("is a directory");
        if (!S_ISREG(st.st_mode))
            return file_error("exists and is not a regular file");
        if (!replace)
            return file_error(kExists);
    }
    std::filesystem::path dir = target.parent_path();
    if (dir.empty())
        dir = ".";
    std::string temp_name;
    int fd = ::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0644);
    if (fd < 0) {
        if (errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL)
            return errno_error(errno);
        temp_name = (dir / ("." + target.filename().string() + ".qcowmap-XXXXXX")).string();
        fd = ::mkostemp(temp_name.data(), O_CLOEXEC);
        if (fd < 0)
            return errno_error(errno);
        (void)::fchmod(fd, 0644);
    }
    return AtomicFile(target, std::move(temp_name), fd, replace);
}

AtomicFile::AtomicFile(AtomicFile&& other) noexcept
    : target_(std::move(other.target_)), temp_name_(std::move(other.temp_name_)), fd_(other.fd_),
      replace_(other.replace_) {
    other.fd_ = -1;
    other.temp_name_.clear();
}

AtomicFile::~AtomicFile() {
    abandon();
}

void AtomicFile::abandon() {
    if (fd_ >= 0)
        ::close(fd_);
    fd_ = -1;
    if (!temp_name_.empty())
        ::unlink(temp_name_.c_str());
    temp_name_.clear();
}

Result<void> AtomicFile::commit() {
    auto fail = [&](Error error) -> Result<void> {
        abandon();
        return error;
    };
    if (fd_ < 0)
        return file_error("no file to commit");
    if (::fsync(fd_) != 0)
        return fail(errno_error(errno));
    const std::string name = target_.string();
    std::filesystem::path dir = target_.parent_path();
    if (dir.empty())
        dir = ".";
    if (temp_name_.empty()) {
        // Give the unnamed file a name: straight at the target when it must not exist (link
        // fails with EEXIST, atomically), else a temporary one renamed over the target.
        const std::string proc = fmt::format("/proc/self/fd/{}", fd_);
        std::string link_name = name;
        if (replace_) {
            link_name = (dir / ("." + target_.filename().string() + ".qcowmap-" +
                                std::to_string(::getpid())))
                            .string();
            ::unlink(link_name.c_str()); // left by a killed run with the same process id
        }
        if (::linkat(fd_, "", AT_FDCWD, link_name.c_str(), AT_EMPTY_PATH) != 0 &&
            ::linkat(AT_FDCWD, proc.c_str(), AT_FDCWD, link_name.c_str(), AT_SYMLINK_FOLLOW) != 0) {
            if (errno == EEXIST && !replace_)
                return fail(file_error(kExists));
            return fail(errno_error(errno));
        }
        if (replace_) {
            temp_name_ = link_name;
            if (::rename(link_name.c_str(), name.c_str()) != 0)
                return fail(errno_error(errno));
        }
    } else if (replace_) {
        if (::rename(temp_name_.c_str(), name.c_str()) != 0)
            return fail(errno_error(errno));
    } else {
        if (::renameat2(AT_FDCWD, temp_name_.c_str(), AT_FDCWD, name.c_str(), RENAME_NOREPLACE) !=
            0) {
            if (errno == EEXIST)
                return fail(file_error(kExists));
            return fail(errno_error(errno));
        }
    }
    temp_name_.clear(); // named now: nothing to remove
    const int fd = fd_;
    fd_ = -1;
    if (::close(fd) != 0)
        return errno_error(errno);
    // The new name is durable once the directory is.
    int dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dir_fd >= 0) {
        (void)::fsync(dir_fd);
        ::close(dir_fd);
    }
    return {};
}

} // namespace qcowmap::detail

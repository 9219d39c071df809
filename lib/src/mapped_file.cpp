#include "mapped_file.hpp"

#include "errors.hpp"
#include "fault.hpp"

#include <fmt/format.h>

#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace qcowmap::detail {

struct MappedFile::Impl {
    void* base = nullptr;
    std::size_t length = 0;
    int fd = -1;
    std::uint64_t device = 0;
    std::uint64_t inode = 0;
    bool block_device = false;
    std::uint64_t size = 0;   // when mapped
    struct timespec mtime {}; // when mapped (regular files)
    std::filesystem::path name;
    ~Impl() {
        if (base) {
            unregister_mapping(base);
            ::munmap(base, length);
        }
        if (fd >= 0)
            ::close(fd);
    }
};

MappedFile::MappedFile(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {
    if (impl_->base) {
        bytes_ = {static_cast<const std::byte*>(impl_->base), impl_->length};
    }
}
MappedFile::MappedFile(MappedFile&&) noexcept = default;
MappedFile& MappedFile::operator=(MappedFile&&) noexcept = default;
MappedFile::~MappedFile() = default;

int MappedFile::fd() const {
    return impl_->fd;
}
std::pair<std::uint64_t, std::uint64_t> MappedFile::identity() const {
    return {impl_->device, impl_->inode};
}
bool MappedFile::is_block_device() const {
    return impl_->block_device;
}
bool MappedFile::changed() const {
    struct stat st {};
    if (::fstat(impl_->fd, &st) != 0)
        return true;
    if (impl_->block_device) {
        std::uint64_t size = 0;
        return ::ioctl(impl_->fd, BLKGETSIZE64, &size) != 0 || size != impl_->size;
    }
    return static_cast<std::uint64_t>(st.st_size) != impl_->size ||
           st.st_mtim.tv_sec != impl_->mtime.tv_sec || st.st_mtim.tv_nsec != impl_->mtime.tv_nsec;
}
const std::filesystem::path& MappedFile::name() const {
    return impl_->name;
}

Result<MappedFile> MappedFile::open(const std::filesystem::path& path, bool allow_empty) {
    // O_NONBLOCK: opening a FIFO must not wait for a writer (open_fd refuses it anyway); it
    // changes nothing for reads of regular files and block devices.
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        return errno_error(errno);
    }
    return open_fd(fd, path, allow_empty);
}

Result<MappedFile> MappedFile::open_fd(int fd, const std::filesystem::path& name,
                                       bool allow_empty) {
    auto impl = std::make_unique<Impl>();
    impl->fd = fd; // owned from here on: closed by ~Impl on every error path
    impl->name = name;
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
        return errno_error(errno);
    }
    impl->device = st.st_dev;
    impl->inode = st.st_ino;
    if (S_ISDIR(st.st_mode)) {
        return Error{ErrorCode::not_qcow2, "is a directory, not an image file"};
    }
    std::uint64_t size = 0;
    if (S_ISREG(st.st_mode)) {
        size = static_cast<std::uint64_t>(st.st_size);
    } else if (S_ISBLK(st.st_mode)) {
        // fstat gives 0 for a device; the kernel knows its size (as qemu's raw_getlength asks).
        if (::ioctl(fd, BLKGETSIZE64, &size) != 0) {
            const int err = errno;
            return errno_error(err, fmt::format("cannot get the size of the block device: {}",
                                                std::strerror(err)));
        }
        impl->block_device = true;
    } else {
        return Error{ErrorCode::not_qcow2, "not a regular file or block device"};
    }
    impl->size = size;
    impl->mtime = st.st_mtim;
    if (size == 0) {
        if (allow_empty) {
            return MappedFile(std::move(impl));
        }
        return Error{ErrorCode::not_qcow2,
                     impl->block_device ? "block device is empty (0 bytes), not a qcow2 image"
                                        : "file is empty (0 bytes), not a qcow2 image"};
    }
    if (size > SIZE_MAX) {
        return Error{ErrorCode::io_error, fmt::format("is too large to map ({} bytes)", size)};
    }
    void* base = ::mmap(nullptr, static_cast<std::size_t>(size), PROT_READ, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        const int err = errno;
        return errno_error(err, fmt::format("cannot map file: {}", std::strerror(err)));
    }
    impl->base = base;
    impl->length = static_cast<std::size_t>(size);
    // A fault reading it is contained where the library runs (fault.hpp).
    register_mapping(base, impl->length, impl->fd, &impl->name);
    return MappedFile(std::move(impl));
}

} // namespace qcowmap::detail

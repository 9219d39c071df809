#include "mapped_file.hpp"

#include <boost/iostreams/device/mapped_file.hpp>
#include <fmt/format.h>

#include <cerrno>
#include <cstring>
#include <exception>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace qcowmap::detail {

struct MappedFile::Impl {
    boost::iostreams::mapped_file_source source;
    int fd = -1;
    std::uint64_t device = 0;
    std::uint64_t inode = 0;
    // open_fd maps the descriptor itself: Boost maps only by path.
    void* map = nullptr;
    std::size_t map_size = 0;
    ~Impl() {
        if (map)
            ::munmap(map, map_size);
        if (fd >= 0)
            ::close(fd);
    }
};

MappedFile::MappedFile(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {
    if (impl_->source.is_open()) {
        bytes_ = {reinterpret_cast<const std::byte*>(impl_->source.data()), impl_->source.size()};
    } else if (impl_->map) {
        bytes_ = {static_cast<const std::byte*>(impl_->map), impl_->map_size};
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

Result<MappedFile> MappedFile::open(const std::filesystem::path& path, bool allow_empty) {
    // Open and stat first: Boost's exceptions carry vague messages, and it throws on empty files.
    // O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below anyway).
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        return Error{ErrorCode::io_error, std::strerror(errno)};
    }
    auto impl = std::make_unique<Impl>();
    impl->fd = fd;
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
        return Error{ErrorCode::io_error, std::strerror(errno)};
    }
    impl->device = st.st_dev;
    impl->inode = st.st_ino;
    if (S_ISDIR(st.st_mode)) {
        return Error{ErrorCode::not_qcow2, "is a directory, not an image file"};
    }
    if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
        return Error{ErrorCode::not_qcow2, "not a regular file"};
    }
    if (S_ISREG(st.st_mode) && st.st_size == 0) {
        if (allow_empty) {
            return MappedFile(std::move(impl));
        }
        return Error{ErrorCode::not_qcow2, "file is empty (0 bytes), not a qcow2 image"};
    }
    try {
        impl->source.open(path.string());
    } catch (const std::exception& e) {
        return Error{ErrorCode::io_error, fmt::format("cannot map file: {}", e.what())};
    }
    if (!impl->source.is_open() || impl->source.size() == 0) {
        return Error{ErrorCode::io_error, "cannot map file"};
    }
    return MappedFile(std::move(impl));
}

Result<MappedFile> MappedFile::open_fd(int fd, const std::filesystem::path& /*name*/,
                                       bool allow_empty) {
    auto impl = std::make_unique<Impl>();
    impl->fd = fd;
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
        return Error{ErrorCode::io_error, std::strerror(errno)};
    }
    impl->device = st.st_dev;
    impl->inode = st.st_ino;
    if (S_ISDIR(st.st_mode)) {
        return Error{ErrorCode::not_qcow2, "is a directory, not an image file"};
    }
    if (!S_ISREG(st.st_mode)) {
        return Error{ErrorCode::not_qcow2, "not a regular file"};
    }
    if (st.st_size == 0) {
        if (allow_empty) {
            return MappedFile(std::move(impl));
        }
        return Error{ErrorCode::not_qcow2, "file is empty (0 bytes), not a qcow2 image"};
    }
    const auto size = static_cast<std::size_t>(st.st_size);
    void* map = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) {
        return Error{ErrorCode::io_error, fmt::format("cannot map file: {}", std::strerror(errno))};
    }
    impl->map = map;
    impl->map_size = size;
    return MappedFile(std::move(impl));
}

} // namespace qcowmap::detail

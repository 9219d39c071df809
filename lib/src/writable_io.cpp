#include "writable_io.hpp"

#include "errors.hpp"
#include "sys_io.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstring>
#include <fcntl.h>
#include <linux/falloc.h>
#include <mutex>
#include <random>
#include <sys/stat.h>
#include <unistd.h>

namespace qcowmap::detail {
namespace {

struct FaultState {
    std::mutex mutex;
    std::atomic<bool> armed{false};
    bool fired = false;
    std::uint64_t remaining = 0;
    std::uint64_t counted = 0;
    FaultMode mode = FaultMode::stop;
    std::mt19937_64 random;
    std::vector<FileIo*> files; // every live FileIo, for lose_unsynced
};

FaultState& faults() {
    // Never destroyed: a WritableImage that outlives main (a global, or a plugin host that
    // exits without unloading us, as nbdkit 1.32 does with --run) still closes its files
    // through it during static destruction.
    static FaultState* const state = new FaultState;
    return *state;
}

} // namespace

FileIo::FileIo(int fd, std::string name) : fd_(fd), name_(std::move(name)) {
    FaultState& f = faults();
    std::lock_guard lock(f.mutex);
    f.files.push_back(this);
    if (f.armed.load() && f.mode == FaultMode::lose_unsynced) {
        tracking_ = true;
        auto s = size();
        synced_size_ = s ? *s : 0;
    }
}

FileIo::FileIo(FileIo&& other) noexcept {
    *this = std::move(other);
}

FileIo& FileIo::operator=(FileIo&& other) noexcept {
    if (this == &other)
        return *this;
    close();
    FaultState& f = faults();
    std::lock_guard lock(f.mutex);
    fd_ = std::exchange(other.fd_, -1);
    direct_fd_ = std::exchange(other.direct_fd_, -1);
    name_ = std::move(other.name_);
    syncs_ = other.syncs_;
    unsynced_ = std::move(other.unsynced_);
    synced_size_ = other.synced_size_;
    tracking_ = other.tracking_;
    if (fd_ >= 0 && std::find(f.files.begin(), f.files.end(), this) == f.files.end())
        f.files.push_back(this);
    return *this;
}

FileIo::~FileIo() {
    close();
}

void FileIo::close() {
    FaultState& f = faults();
    std::lock_guard lock(f.mutex);
    std::erase(f.files, this);
    if (fd_ >= 0) {
        ::close(fd_);
        fd_ = -1;
    }
    if (direct_fd_ >= 0) {
        ::close(direct_fd_);
        direct_fd_ = -1;
    }
}

Result<void> FileIo::enable_direct_writes() {
    if (direct_fd_ >= 0)
        return {};
    // The same file through /proc (not its name, which may have been replaced meanwhile).
    const std::string self = fmt::format("/proc/self/fd/{}", fd_);
    const int fd = ::open(self.c_str(), O_WRONLY | O_DIRECT | O_CLOEXEC);
    if (fd < 0) {
        const int err = errno;
        Error error = errno_error(err, fmt::format("cannot open {} for direct writes (cache mode "
                                                   "none): {}",
                                                   name_, std::strerror(err)));
        if (err == EINVAL)
            error.code = ErrorCode::invalid_argument;
        return error;
    }
    direct_fd_ = fd;
    return {};
}

Error FileIo::io_error(std::string_view what, int err) const {
    return errno_error(err, fmt::format("cannot {} {}: {}", what, name_, std::strerror(err)));
}

// Called with the fault mutex held, once, when the armed fault fires.
void fire_fault_locked() {
    FaultState& f = faults();
    f.fired = true;
    if (f.mode != FaultMode::lose_unsynced)
        return;
    for (FileIo* file : f.files) {
        if (!file->tracking_ || file->fd_ < 0)
            continue;
        // Undo a random part of what was written since the last sync, newest first.
        for (auto it = file->unsynced_.rbegin(); it != file->unsynced_.rend(); ++it) {
            if (f.random() & 1) {
                const auto& [offset, old] = *it;
                [[maybe_unused]] auto n =
                    ::pwrite(file->fd_, old.data(), old.size(), static_cast<off_t>(offset));
            }
        }
        struct stat st {};
        if (::fstat(file->fd_, &st) == 0 &&
            static_cast<std::uint64_t>(st.st_size) > file->synced_size_ && (f.random() & 1)) {
            [[maybe_unused]] int r = ::ftruncate(file->fd_, static_cast<off_t>(file->synced_size_));
        }
        file->unsynced_.clear();
    }
}

Result<void> FileIo::count_operation(std::string_view what) {
    FaultState& f = faults();
    if (!f.armed.load(std::memory_order_relaxed))
        return {};
    std::lock_guard lock(f.mutex);
    if (!f.armed.load())
        return {};
    if (f.fired)
        return Error{ErrorCode::io_error, fmt::format("cannot {} {}: injected fault", what, name_)};
    ++f.counted;
    if (--f.remaining == 0) {
        fire_fault_locked();
        return Error{ErrorCode::io_error, fmt::format("cannot {} {}: injected fault", what, name_)};
    }
    return {};
}

void FileIo::record_old(std::uint64_t offset, std::uint64_t length) {
    if (!tracking_)
        return;
    std::vector<std::byte> old(length);
    if (!pread(old, offset))
        return;
    unsynced_.emplace_back(offset, std::move(old));
}

Result<void> FileIo::pwrite(std::span<const std::byte> data, std::uint64_t offset) {
    if (auto ok = count_operation("write"); !ok)
        return ok;
    record_old(offset, data.size());
    const Transfer written = pwrite_full(fd_, data.data(), data.size(), offset);
    if (written.done < data.size())
        return io_error("write", transfer_errno(written));
    return {};
}

Result<void> FileIo::pwritev(std::vector<iovec>& iov, std::uint64_t offset) {
    if (auto ok = count_operation("write"); !ok)
        return ok;
    std::uint64_t total = 0;
    for (const iovec& v : iov)
        total += v.iov_len;
    record_old(offset, total);
    int fd = fd_;
    if (direct_fd_ >= 0 && offset % kDirectAlignment == 0) {
        const bool aligned = std::all_of(iov.begin(), iov.end(), [](const iovec& v) {
            return reinterpret_cast<std::uintptr_t>(v.iov_base) % kDirectAlignment == 0 &&
                   v.iov_len % kDirectAlignment == 0;
        });
        if (aligned)
            fd = direct_fd_;
    }
    std::size_t first = 0;
    while (first < iov.size()) {
        const int count = static_cast<int>(std::min<std::size_t>(iov.size() - first, IOV_MAX));
        const ssize_t n = retry_eintr(
            [&] { return ::pwritev(fd, iov.data() + first, count, static_cast<off_t>(offset)); });
        if (n < 0 && errno == EINVAL && fd != fd_) {
            fd = fd_; // an alignment this file system wants beyond ours: write it buffered
            continue;
        }
        if (n < 0)
            return io_error("write", errno);
        if (fd != fd_ && static_cast<std::uint64_t>(n) % kDirectAlignment != 0)
            fd = fd_; // what a short direct write left is no longer aligned
        if (n == 0)
            return io_error("write", EIO);
        offset += static_cast<std::uint64_t>(n);
        // Skip the buffers written, shorten a partly written one.
        auto left = static_cast<std::size_t>(n);
        while (first < iov.size() && left >= iov[first].iov_len) {
            left -= iov[first].iov_len;
            ++first;
        }
        if (left > 0) {
            iov[first].iov_base = static_cast<char*>(iov[first].iov_base) + left;
            iov[first].iov_len -= left;
        }
    }
    return {};
}

Result<void> FileIo::sync() {
    if (auto ok = count_operation("sync"); !ok)
        return ok;
    ++syncs_;
    if (retry_eintr([&] { return ::fdatasync(fd_); }) != 0)
        return io_error("sync", errno);
    if (tracking_) {
        unsynced_.clear();
        auto s = size();
        synced_size_ = s ? *s : synced_size_;
    }
    return {};
}

Result<void> FileIo::truncate(std::uint64_t new_size) {
    if (auto ok = count_operation("resize"); !ok)
        return ok;
    if (retry_eintr([&] { return ::ftruncate(fd_, static_cast<off_t>(new_size)); }) != 0)
        return io_error("resize", errno);
    return {};
}

Result<void> FileIo::zero_range(std::uint64_t offset, std::uint64_t length) {
    if (length == 0)
        return {};
    static const std::vector<std::byte> zeros(1 << 20);
    if (!tracking_) {
        if (auto ok = count_operation("write"); !ok)
            return ok;
        if (::fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
                        static_cast<off_t>(length)) == 0)
            return {};
        // No hole punching here (block device, old file system): the same operation writes
        // zeros.
        const Transfer written =
            transfer_all(length, zeros.size(), [&](std::uint64_t done, std::size_t want) {
                return ::pwrite(fd_, zeros.data(), want, static_cast<off_t>(offset + done));
            });
        if (written.done < length)
            return io_error("write", transfer_errno(written));
        return {};
    }
    // A power cut is being simulated: plain writes, so that each can be undone.
    while (length > 0) {
        const std::uint64_t n = std::min<std::uint64_t>(length, zeros.size());
        if (auto ok = pwrite(std::span(zeros).first(static_cast<std::size_t>(n)), offset); !ok)
            return ok;
        offset += n;
        length -= n;
    }
    return {};
}

Result<void> FileIo::pread(std::span<std::byte> out, std::uint64_t offset) const {
    const Transfer read = pread_full(fd_, out.data(), out.size(), offset);
    if (read.error != 0)
        return io_error("read", read.error);
    // Past the end of the file: zeros, as qemu reads a short file.
    const auto done = static_cast<std::size_t>(read.done);
    if (done < out.size())
        std::memset(out.data() + done, 0, out.size() - done);
    return {};
}

Result<std::uint64_t> FileIo::size() const {
    struct stat st {};
    if (::fstat(fd_, &st) != 0)
        return io_error("stat", errno);
    return static_cast<std::uint64_t>(st.st_size);
}

void arm_fault(std::uint64_t n, FaultMode mode, std::uint64_t seed) {
    FaultState& f = faults();
    std::lock_guard lock(f.mutex);
    f.remaining = n;
    f.counted = 0;
    f.fired = false;
    f.mode = mode;
    f.random.seed(seed);
    for (FileIo* file : f.files) {
        file->tracking_ = mode == FaultMode::lose_unsynced;
        file->unsynced_.clear();
        auto s = file->size();
        file->synced_size_ = s ? *s : 0;
    }
    f.armed.store(true);
}

std::uint64_t disarm_fault() {
    FaultState& f = faults();
    std::lock_guard lock(f.mutex);
    f.armed.store(false);
    for (FileIo* file : f.files) {
        file->tracking_ = false;
        file->unsynced_.clear();
    }
    return f.counted;
}

bool fault_fired() {
    FaultState& f = faults();
    std::lock_guard lock(f.mutex);
    return f.fired;
}

} // namespace qcowmap::detail

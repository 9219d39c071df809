#include "writable_lock.hpp"

#include <fmt/format.h>

#include <array>
#include <cerrno>
#include <cstring>
#include <fcntl.h>

namespace qcowmap::detail {
namespace {

// qemu's permission bits (include/block/block-common.h BLK_PERM_*) and lock byte bases
// (block/file-posix.c RAW_LOCK_PERM_BASE, RAW_LOCK_SHARED_BASE).
constexpr int kPermConsistentRead = 0;
constexpr int kPermWrite = 1;
constexpr int kPermResize = 3;
constexpr off_t kLockPermBase = 100;
constexpr off_t kLockSharedBase = 200;
constexpr std::array<const char*, 5> kPermNames = {"consistent read", "write", "write unchanged",
                                                   "resize", "take child"};

bool set_lock(int fd, off_t byte, short type) {
    struct flock fl {};
    fl.l_whence = SEEK_SET;
    fl.l_start = byte;
    fl.l_len = 1;
    fl.l_type = type;
    return ::fcntl(fd, F_OFD_SETLK, &fl) == 0;
}

/// True when another open file description holds a lock on `byte` (qemu_lock_fd_test).
bool locked_by_other(int fd, off_t byte) {
    struct flock fl {};
    fl.l_whence = SEEK_SET;
    fl.l_start = byte;
    fl.l_len = 1;
    fl.l_type = F_WRLCK;
    if (::fcntl(fd, F_OFD_GETLK, &fl) != 0)
        return false;
    return fl.l_type != F_UNLCK;
}

} // namespace

Result<void> lock_for_writing(int fd, std::string_view name) {
    constexpr std::array<int, 3> held = {kPermConsistentRead, kPermWrite, kPermResize};
    constexpr std::array<int, 2> unshared = {kPermWrite, kPermResize};
    auto release = [&] {
        for (int p : held)
            set_lock(fd, kLockPermBase + p, F_UNLCK);
        for (int p : unshared)
            set_lock(fd, kLockSharedBase + p, F_UNLCK);
    };
    for (int p : held) {
        if (!set_lock(fd, kLockPermBase + p, F_RDLCK)) {
            const int err = errno;
            release();
            return Error{ErrorCode::io_error, fmt::format("{}: cannot take QEMU's \"{}\" lock: {}",
                                                          name, kPermNames[p], std::strerror(err))};
        }
    }
    for (int p : unshared) {
        if (!set_lock(fd, kLockSharedBase + p, F_RDLCK)) {
            const int err = errno;
            release();
            return Error{ErrorCode::io_error, fmt::format("{}: cannot take QEMU's \"{}\" lock: {}",
                                                          name, kPermNames[p], std::strerror(err))};
        }
    }
    // Someone who does not share what we hold, or who holds what we do not share (as qemu's
    // raw_check_lock_bytes tests after taking its own).
    for (int p : held) {
        if (locked_by_other(fd, kLockSharedBase + p)) {
            release();
            return Error{ErrorCode::io_error,
                         fmt::format("{}: is in use: another program (a VM, qemu-io or "
                                     "qemu-img) does not share the \"{}\" permission (QEMU's "
                                     "image lock byte {})",
                                     name, kPermNames[p], kLockSharedBase + p)};
        }
    }
    for (int p : unshared) {
        if (locked_by_other(fd, kLockPermBase + p)) {
            release();
            return Error{ErrorCode::io_error,
                         fmt::format("{}: is in use: another program (a VM or qemu-io) holds "
                                     "the \"{}\" permission (QEMU's image lock byte {})",
                                     name, kPermNames[p], kLockPermBase + p)};
        }
    }
    return {};
}

} // namespace qcowmap::detail

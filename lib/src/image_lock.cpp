// QEMU's image locks (see image_lock.hpp): qemu's block/file-posix.c raw_apply_lock_bytes and
// raw_check_lock_bytes, on OFD locks only (qemu's default on Linux since 2.10).
#include "image_lock.hpp"

#include "errors.hpp"
#include "sys_io.hpp"

#include <fmt/format.h>

#include <cerrno>
#include <cstring>
#include <fcntl.h>

namespace qcowmap::detail {
namespace {

// block/file-posix.c: RAW_LOCK_PERM_BASE, RAW_LOCK_SHARED_BASE.
constexpr off_t kPermBase = 100;
constexpr off_t kSharedBase = 200;
constexpr unsigned kPermissions = 4; // BLK_PERM_CONSISTENT_READ .. BLK_PERM_RESIZE

/// errno values that mean "this file system has no OFD locks": qemu's locking=auto then goes
/// on unlocked.
bool locks_unsupported(int error) {
    return error == EINVAL || error == ENOLCK || error == EOPNOTSUPP || error == ENOSYS;
}

/// One byte, shared (F_RDLCK, as qemu takes every byte) or released (F_UNLCK).
int set_byte(int fd, off_t byte, short type) {
    struct flock lock {};
    lock.l_type = type;
    lock.l_whence = SEEK_SET;
    lock.l_start = byte;
    lock.l_len = 1;
    return retry_eintr([&] { return ::fcntl(fd, F_OFD_SETLK, &lock); }) == 0 ? 0 : errno;
}

/// qemu_lock_fd_test: would an exclusive lock of `byte` conflict with another open file
/// description's lock? 0 no, EAGAIN yes, else the errno of fcntl.
int byte_taken(int fd, off_t byte) {
    struct flock lock {};
    lock.l_type = F_WRLCK;
    lock.l_whence = SEEK_SET;
    lock.l_start = byte;
    lock.l_len = 1;
    if (::fcntl(fd, F_OFD_GETLK, &lock) != 0)
        return errno;
    return lock.l_type == F_UNLCK ? 0 : EAGAIN;
}

void release(int fd, const LockRequest& request) {
    for (unsigned n = 0; n < kPermissions; ++n) {
        if (request.hold & (1u << n))
            (void)set_byte(fd, kPermBase + n, F_UNLCK);
        if (request.deny & (1u << n))
            (void)set_byte(fd, kSharedBase + n, F_UNLCK);
    }
}

/// The error of a lock that failed with `error` (the errno of fcntl, kept in both cases).
Error lock_failure(int error, std::string_view what) {
    if (error == EAGAIN) {
        // qemu's raw_lock_error_setg_errno adds "Is another process using the image [PATH]?"
        // on a line of its own; the caller names the file.
        Error in_use{ErrorCode::image_in_use,
                     fmt::format("{}: is another process using the image?", what)};
        in_use.system_errno = error;
        return in_use;
    }
    return errno_error(error, fmt::format("{}: {}", what, std::strerror(error)));
}

} // namespace

std::string_view lock_permission_name(LockPermission permission) {
    switch (permission) {
    case LockPermission::consistent_read:
        return "consistent read";
    case LockPermission::write:
        return "write";
    case LockPermission::write_unchanged:
        return "write unchanged";
    case LockPermission::resize:
        return "resize";
    }
    return "unknown";
}

Result<void> lock_image(int fd, const LockRequest& request) {
    // qemu takes its bytes first and checks for conflicts after (raw_handle_perm_lock,
    // RAW_PL_PREPARE): two openers racing each see the other's bytes, and at worst both give
    // up, never both go on.
    for (unsigned n = 0; n < kPermissions; ++n) {
        const off_t bytes[2] = {kPermBase + n, kSharedBase + n};
        const bool wanted[2] = {(request.hold & (1u << n)) != 0, (request.deny & (1u << n)) != 0};
        for (int side = 0; side < 2; ++side) {
            if (!wanted[side])
                continue;
            if (int error = set_byte(fd, bytes[side], F_RDLCK); error != 0) {
                release(fd, request);
                if (locks_unsupported(error))
                    return {};
                return lock_failure(error, "Failed to lock byte " + std::to_string(bytes[side]));
            }
        }
    }
    // In qemu's order (raw_check_lock_bytes): first the permissions we hold that another
    // opener denies, then the permissions we deny that another opener holds.
    for (int pass = 0; pass < 2; ++pass) {
        for (unsigned n = 0; n < kPermissions; ++n) {
            const bool hold_pass = pass == 0;
            if (((hold_pass ? request.hold : request.deny) & (1u << n)) == 0)
                continue;
            const off_t other = (hold_pass ? kSharedBase : kPermBase) + n;
            if (int error = byte_taken(fd, other); error != 0) {
                release(fd, request);
                if (locks_unsupported(error))
                    return {};
                const auto name = lock_permission_name(static_cast<LockPermission>(n));
                return lock_failure(
                    error, hold_pass ? fmt::format("Failed to get \"{}\" lock", name)
                                     : fmt::format("Failed to get shared \"{}\" lock", name));
            }
        }
    }
    return {};
}

} // namespace qcowmap::detail

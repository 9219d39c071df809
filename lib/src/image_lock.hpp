// QEMU's image locks: who may read and who may write an image file, as qemu's tools agree on it.
//
// qemu (block/file-posix.c, raw_apply_lock_bytes / raw_check_lock_bytes) keeps advisory OFD
// byte-range locks (fcntl F_OFD_SETLK, always shared F_RDLCK) on every image file it opens:
// byte 100 + n says "I hold permission n", byte 200 + n says "I do not let others hold
// permission n", with n: 0 consistent read, 1 write, 2 write-unchanged, 3 resize (libvirt
// uses byte 0, which qemu leaves alone). Before taking a byte qemu asks, with F_OFD_GETLK and
// an exclusive probe, whether another open file description holds the opposite byte, and
// refuses with `Failed to get "write" lock` (a permission it wants is denied by someone) or
// `Failed to get shared "write" lock` (someone holds a permission it will not share).
//
// Measured with qemu-utils 7.2 (/proc/locks): `qemu-img info`/`convert` and `qemu-io -r` hold
// 100 and deny 201 (qemu-io -r also 203); a writer (`qemu-io`, a VM's disk) holds 100, 101, 103
// and denies 201, 203; the backing files below a writer: 100, 201, 203.
//
// The locks belong to the open file description: they live as long as the descriptor they
// were taken on (qcowmap: the MappedFile's, so as long as the mapping) and vanish with it,
// also when the process dies. They are advisory: a program that ignores them (dd, cp, a
// qcowmap or qemu-img run with -U) is not stopped.
#pragma once

#include <qcowmap/result.hpp>

#include <cstdint>
#include <string_view>

namespace qcowmap::detail {

/// The permissions qemu names (BLK_PERM_*, include/block/block-common.h), as bit numbers.
enum class LockPermission : std::uint8_t {
    consistent_read = 0,
    write = 1,
    write_unchanged = 2,
    resize = 3,
};

/// A set of LockPermission bits.
using LockPermissions = std::uint8_t;

constexpr LockPermissions lock_bit(LockPermission permission) {
    return static_cast<LockPermissions>(1u << static_cast<unsigned>(permission));
}

/// What one opener takes: the permissions it holds (bytes 100 + n) and those it refuses to
/// share with anyone else (bytes 200 + n).
struct LockRequest {
    LockPermissions hold = 0;
    LockPermissions deny = 0;
};

/// A reader, as `qemu-img info` and `qemu-img convert`'s source: holds consistent read and
/// lets nobody write (a writer would change the bytes under the mapping). Several readers
/// share an image; a writer already there makes the reader fail.
inline constexpr LockRequest kReaderLock{lock_bit(LockPermission::consistent_read),
                                         lock_bit(LockPermission::write)};

/// A writer that changes the image in place (the in-place writer, issue 27), as a qemu writer
/// (qemu-io, a VM's disk): holds consistent read, write and resize, shares neither write nor
/// resize. Take it on a descriptor opened for writing (a read-only one works for the check
/// but qemu takes it on its read-write descriptor, and so should we). A reader or another
/// writer already there makes it fail with `Failed to get "write" lock`.
inline constexpr LockRequest kWriterLock{
    static_cast<LockPermissions>(lock_bit(LockPermission::consistent_read) |
                                 lock_bit(LockPermission::write) |
                                 lock_bit(LockPermission::resize)),
    static_cast<LockPermissions>(lock_bit(LockPermission::write) |
                                 lock_bit(LockPermission::resize))};

/// Takes `request` on the open file description of `fd`, after checking (F_OFD_GETLK) that no
/// other open file description denies a permission it holds or holds a permission it denies.
/// On a conflict nothing is taken and the error is ErrorCode::image_in_use with qemu's words:
/// `Failed to get shared "write" lock` (another opener holds write, which `request` denies)
/// or `Failed to get "write" lock` (another opener denies write, which `request` holds),
/// followed by qemu's hint "is another process using the image?". The conflicting process
/// keeps its lock, so a retry later may succeed. A file system without OFD locks (EINVAL,
/// ENOLCK, EOPNOTSUPP: some network file systems) is not an error: qemu's locking=auto goes
/// on without locks there too. Other fcntl failures: io_error.
///
/// The lock is released when the descriptor (every duplicate of it) is closed; taking a
/// smaller request later on the same descriptor does not release bytes already held.
Result<void> lock_image(int fd, const LockRequest& request);

/// qemu's name of one permission ("consistent read", "write", "write unchanged", "resize").
std::string_view lock_permission_name(LockPermission permission);

} // namespace qcowmap::detail

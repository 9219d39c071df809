// The one place where system calls are retried: EINTR (a signal handler ran; the call did
// nothing) and short reads and writes (the call moved fewer bytes than asked: pipes, signals,
// file systems that split requests). Every file access of the library goes through these
// instead of writing its own loop; what a caller does at the end of a file or on an error stays
// the caller's decision (Transfer says which happened).
#pragma once

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>

#include <sys/types.h>
#include <unistd.h>

namespace qcowmap::detail {

/// Calls `call()` again for as long as it fails with EINTR, for system calls that return -1
/// and set errno on failure (read, write, fcntl, fdatasync, ftruncate, copy_file_range,
/// splice...). Returns the last call's result; errno is the last call's.
template <typename Call> auto retry_eintr(Call&& call) -> decltype(call()) {
    for (;;) {
        auto result = call();
        if (result != -1 || errno != EINTR)
            return result;
    }
}

/// How far a whole transfer got.
struct Transfer {
    /// Bytes moved.
    std::uint64_t done = 0;
    /// The errno of the call that failed; 0 when every byte moved, or when a call moved none
    /// (the end of the file for a read).
    int error = 0;
};

/// No cap per call but the kernel's own (MAX_RW_COUNT, just under 2 GiB per read or write).
inline constexpr std::uint64_t kUncapped = UINT64_MAX;
/// Bounded chunks stay below the kernel's per-call cap (the raw writers' and copies' cap).
inline constexpr std::uint64_t kChunkCap = std::uint64_t{1} << 30;

/// Moves `length` bytes with `call(done, want)`, a system call moving up to `want` bytes
/// starting `done` bytes into the transfer (it returns what the system call returns), asking
/// for at most `cap` bytes at a time. Retries EINTR and continues short transfers; stops at
/// the first error or at a call that moves nothing.
template <typename Call>
Transfer transfer_all(std::uint64_t length, std::uint64_t cap, Call&& call) {
    Transfer transfer;
    while (transfer.done < length) {
        const auto want = static_cast<std::size_t>(std::min(length - transfer.done, cap));
        const auto n = retry_eintr([&] { return call(transfer.done, want); });
        if (n < 0) {
            transfer.error = errno;
            break;
        }
        if (n == 0)
            break;
        transfer.done += static_cast<std::uint64_t>(n);
    }
    return transfer;
}

/// pread(2) of `length` bytes at `offset` into `out`, short reads continued: `done` is less
/// than `length` at the end of the file (error 0) or on an error.
inline Transfer pread_full(int fd, std::byte* out, std::uint64_t length, std::uint64_t offset,
                           std::uint64_t cap = kUncapped) {
    return transfer_all(length, cap, [&](std::uint64_t done, std::size_t want) {
        return ::pread(fd, out + done, want, static_cast<off_t>(offset + done));
    });
}

/// pwrite(2) of `length` bytes of `data` at `offset`, short writes continued.
inline Transfer pwrite_full(int fd, const std::byte* data, std::uint64_t length,
                            std::uint64_t offset, std::uint64_t cap = kUncapped) {
    return transfer_all(length, cap, [&](std::uint64_t done, std::size_t want) {
        return ::pwrite(fd, data + done, want, static_cast<off_t>(offset + done));
    });
}

/// write(2) of `length` bytes of `data` (pipes, sockets, character devices, sequential files),
/// short writes continued.
inline Transfer write_full(int fd, const std::byte* data, std::uint64_t length,
                           std::uint64_t cap = kUncapped) {
    return transfer_all(length, cap, [&](std::uint64_t done, std::size_t want) {
        return ::write(fd, data + done, want);
    });
}

/// The errno of a transfer that stopped short: its call's, or EIO for a write that moved
/// nothing (no errno of its own) or a read that met the end of the file.
inline int transfer_errno(const Transfer& transfer) {
    return transfer.error != 0 ? transfer.error : EIO;
}

/// One read(2) of up to `length` bytes, EINTR retried: what read returns.
inline ssize_t read_some(int fd, std::byte* out, std::size_t length) {
    return retry_eintr([&] { return ::read(fd, out, length); });
}

/// One pread(2) of up to `length` bytes at `offset`, EINTR retried: what pread returns.
inline ssize_t pread_some(int fd, std::byte* out, std::size_t length, std::uint64_t offset) {
    return retry_eintr([&] { return ::pread(fd, out, length, static_cast<off_t>(offset)); });
}

/// Writes all of `data` at `offset` in chunks of at most kChunkCap; false with errno set (EIO
/// when a write moved nothing).
inline bool pwrite_all(int fd, const std::byte* data, std::uint64_t length, std::uint64_t offset) {
    const Transfer transfer = pwrite_full(fd, data, length, offset, kChunkCap);
    if (transfer.done == length)
        return true;
    errno = transfer_errno(transfer);
    return false;
}

/// Writes all of `data` in chunks of at most kChunkCap; false with errno set (EIO when a write
/// moved nothing).
inline bool write_all(int fd, const std::byte* data, std::uint64_t length) {
    const Transfer transfer = write_full(fd, data, length, kChunkCap);
    if (transfer.done == length)
        return true;
    errno = transfer_errno(transfer);
    return false;
}

} // namespace qcowmap::detail

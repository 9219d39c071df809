// Raw writes shared by the exports and the stream decoder's targets (whole writes that retry
// short ones come from sys_io.hpp): sparse writes that leave zero blocks as holes, zeroing
// ranges of files and block devices, and the unnamed temporary files the spools live in.
#pragma once

#include "errors.hpp"
#include "sys_io.hpp"

#include <qcowmap/result.hpp>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>

#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

namespace qcowmap::detail {

/// Zeros for writing zero runs where holes cannot be left (never materialised per run).
alignas(4096) inline const std::byte kZeros[1 << 20] = {};

/// True when all `length` bytes are zero (memcmp against itself shifted by one is vectorised).
inline bool all_zero(const std::byte* data, std::size_t length) {
    return length == 0 || (data[0] == std::byte{0} && std::memcmp(data, data + 1, length - 1) == 0);
}

/// Writes a data run, leaving holes for the blocks of `block` bytes (aligned in the output)
/// that hold only zeros, as qemu-img convert does with its default -S 4k. Consecutive
/// non-zero blocks go out in one pwrite.
inline bool pwrite_sparse(int fd, const std::byte* data, std::uint64_t length, std::uint64_t offset,
                          std::uint64_t block) {
    if (block == 0) {
        return pwrite_all(fd, data, length, offset);
    }
    std::uint64_t pending_start = 0, pending_length = 0;
    for (std::uint64_t at = 0; at < length;) {
        std::uint64_t piece = std::min(length - at, block - (offset + at) % block);
        if (all_zero(data + at, static_cast<std::size_t>(piece))) {
            if (pending_length &&
                !pwrite_all(fd, data + pending_start, pending_length, offset + pending_start)) {
                return false;
            }
            pending_length = 0;
        } else {
            if (!pending_length)
                pending_start = at;
            pending_length += piece;
        }
        at += piece;
    }
    return !pending_length ||
           pwrite_all(fd, data + pending_start, pending_length, offset + pending_start);
}

/// Makes `[offset, offset + length)` of a file or block device read as zeros. `punch`: a
/// hole where the file system or device can make one (else zeroed). Block devices are
/// zeroed by the kernel where they can be (write-zeroes, FALLOC_FL_ZERO_RANGE), else with
/// written zeros.
inline bool zero_range(int fd, std::uint64_t offset, std::uint64_t length, bool punch) {
    const int mode = punch ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
                           : FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
    if (::fallocate(fd, mode, static_cast<off_t>(offset), static_cast<off_t>(length)) == 0) {
        return true;
    }
    for (std::uint64_t done = 0; done < length;) {
        std::uint64_t n = std::min<std::uint64_t>(length - done, sizeof kZeros);
        if (!pwrite_all(fd, kZeros, n, offset + done))
            return false;
        done += n;
    }
    return true;
}

/// An unnamed read-write temporary file in `directory` (empty: $TMPDIR, else /tmp): O_TMPFILE,
/// else a named one unlinked at once, so nothing is left behind whatever happens. Returns the
/// descriptor, or an io_error naming the directory.
inline Result<int> open_spool_file(const std::filesystem::path& directory) {
    std::string dir = directory.string();
    if (dir.empty()) {
        const char* tmpdir = std::getenv("TMPDIR");
        dir = tmpdir && *tmpdir ? tmpdir : "/tmp";
    }
    int fd = ::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (fd < 0) {
        std::string name = dir + "/qcowmap-spool-XXXXXX";
        fd = ::mkostemp(name.data(), O_CLOEXEC);
        if (fd >= 0)
            ::unlink(name.c_str());
    }
    if (fd < 0) {
        const int err = errno;
        return errno_error(
            err, fmt::format("cannot create a spool file in {}: {}", dir, std::strerror(err)));
    }
    return fd;
}

} // namespace qcowmap::detail

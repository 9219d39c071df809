// The file I/O of the in-place writer: every write, sync and size change of an image (or data
// file) being modified goes through one FileIo, so that the order of what reaches the file is
// visible in one place and tests can stop the writer at its N-th operation (fault injection).
#pragma once

#include <qcowmap/result.hpp>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <sys/uio.h>
#include <vector>

namespace qcowmap::detail {

// ---------------------------------------------------------------------------------------------
// Fault injection (tests only; a relaxed atomic load per operation otherwise).

/// How an armed fault leaves the files when it fires.
enum class FaultMode {
    /// As a process killed at that point: everything written before stays.
    stop,
    /// As a power cut at that point: in addition, each write made since its file's last sync
    /// is undone with probability 1/2 (newest first), and a file grown since then may lose
    /// its growth.
    lose_unsynced,
};

/// Arms a fault: the `n`-th write, sync or size change from now (1-based, counted across every
/// FileIo of the process) and every one after it fail with io_error "injected fault", and
/// nothing more reaches the files. `seed` drives lose_unsynced's choices.
void arm_fault(std::uint64_t n, FaultMode mode = FaultMode::stop, std::uint64_t seed = 1);
/// Disarms and returns the number of operations counted since `arm_fault` (arm with a huge
/// `n` to count a workload's operations).
std::uint64_t disarm_fault();
/// True once an armed fault has fired.
bool fault_fired();

/// One file opened read-write by the in-place writer. Owns the descriptor. Not thread-safe
/// (the writer serialises its calls).
class FileIo {
  public:
    FileIo() = default;
    FileIo(int fd, std::string name);
    FileIo(FileIo&&) noexcept;
    FileIo& operator=(FileIo&&) noexcept;
    FileIo(const FileIo&) = delete;
    FileIo& operator=(const FileIo&) = delete;
    ~FileIo();

    int fd() const { return fd_; }
    const std::string& name() const { return name_; }
    bool is_open() const { return fd_ >= 0; }

    /// Writes all of `data` at `offset` (retrying short writes and EINTR).
    Result<void> pwrite(std::span<const std::byte> data, std::uint64_t offset);
    /// Writes the buffers of `iov` one after the other from `offset` (one operation). With
    /// direct writes on, a write whose offset, buffers and lengths are all aligned to
    /// kDirectAlignment bypasses the page cache.
    Result<void> pwritev(std::vector<iovec>& iov, std::uint64_t offset);
    /// Data writes bypass the page cache from now on (a second descriptor of the same file
    /// opened with O_DIRECT: qemu's cache=none); metadata writes stay buffered and syncs
    /// cover both. invalid_argument where the file system refuses O_DIRECT (tmpfs).
    Result<void> enable_direct_writes();
    static constexpr std::uint64_t kDirectAlignment = 4096;
    /// fdatasync(2).
    Result<void> sync();
    /// ftruncate(2) to `size` (used to grow the file over newly allocated clusters).
    Result<void> truncate(std::uint64_t size);
    /// Makes `[offset, offset + length)` read as zeros (fallocate PUNCH_HOLE, else writes).
    Result<void> zero_range(std::uint64_t offset, std::uint64_t length);
    /// Reads `out.size()` bytes at `offset`; what lies past the end of the file reads as zeros.
    Result<void> pread(std::span<std::byte> out, std::uint64_t offset) const;
    /// The file's size now (fstat).
    Result<std::uint64_t> size() const;
    /// Closes the descriptor (releasing OFD locks taken on it).
    void close();

    std::uint64_t syncs() const { return syncs_; }

  private:
    /// Counts one operation against an armed fault; an error once the fault has fired.
    Result<void> count_operation(std::string_view what);
    void record_old(std::uint64_t offset, std::uint64_t length);
    Error io_error(std::string_view what, int err) const;

    friend void fire_fault_locked();
    friend void arm_fault(std::uint64_t, FaultMode, std::uint64_t);
    friend std::uint64_t disarm_fault();
    int fd_ = -1;
    int direct_fd_ = -1;
    std::string name_;
    std::uint64_t syncs_ = 0;
    /// With a power-loss fault armed: what each write since the last sync overwrote (offset,
    /// old bytes) and the size at the last sync, to undo a random part of them when it fires.
    std::vector<std::pair<std::uint64_t, std::vector<std::byte>>> unsynced_;
    std::uint64_t synced_size_ = 0;
    bool tracking_ = false;
};

} // namespace qcowmap::detail

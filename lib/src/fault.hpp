// The fault boundary: a read of a file mapping that faults (the file truncated under us, an
// I/O error behind a page: a bad sector, a network or FUSE file system returning EIO) becomes
// an io_error of the request that made it, instead of a SIGBUS that kills the process.
//
// How: every public entry point that reads mapped bytes runs inside a boundary (a thread-local
// depth). The library installs one SIGBUS handler, chained to the handler that was there
// before. For a fault the kernel raises on a thread inside a boundary, at an address inside one
// of the library's own mappings, the handler maps a page of zeros over the page that failed
// (mmap MAP_FIXED) and returns: the access completes with zeros, and the code that made it --
// the library's, or a C library it called (memcpy, zlib, OpenSSL) -- carries on, as it does
// with any bytes an image may hold. When the boundary ends, the thread puts the file's page
// back (so a later request reads the file again: a transient error is retried, a truncated
// file faults again) and the request returns the fault as its error instead of its result.
// Another thread that ran while a page was replaced may have read those zeros: its request
// fails too (a global count of fault events, compared at the end of every boundary).
//
// Why not unwind: throwing from the handler (-fnon-call-exceptions) cannot pass the libc
// functions that read the mapping for us (memcpy and memcmp are noexcept: the unwinder calls
// std::terminate there). Why not sigsetjmp/siglongjmp: a long jump skips destructors, so it
// could guard only regions without any, and the walks, decompression and hashing read the
// mapping from C++ code full of them. Why not MADV_POPULATE_READ alone: it reports a page that
// cannot be read at that moment, but a page can be truncated away or evicted and fail to come
// back between the check and the use. Any other SIGBUS (outside a boundary, or at an address
// not ours) goes to the previous handler as before: the CLI's one-line report, or the default.
#pragma once

#include <qcowmap/result.hpp>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <optional>
#include <span>

namespace qcowmap::detail {

struct ImageState;

/// True when `address` lies in a file mapping of the chain `top` (a layer or a data file).
bool maps_address(const ImageState& top, const void* address);

/// Registers a file mapping, so that a fault inside it can be contained and reported with the
/// file's name. `fd` stays open while the mapping is registered (MappedFile owns both).
void register_mapping(const void* base, std::size_t length, int fd,
                      const std::filesystem::path* name);
void unregister_mapping(const void* base);

/// The error for a fault at `address`: which file and offset, and why -- the file is now
/// shorter than the offset ("changed while being read"), or reading that offset fails (an I/O
/// error, with errno's text). The file is named unless it is `top` (the image the caller's
/// message names already: a message names a path once).
Error describe_fault(const void* address, const std::filesystem::path& top = {});

/// The library's SIGBUS handler, installed once (the first boundary entered installs it).
void install_fault_handler();

#define QCOWMAP_INITIAL_EXEC __attribute__((tls_model("initial-exec")))
/// The boundary's state, inline for its fast path (a boundary costs a few ns: an extent walk
/// enters one per extent). This thread's boundary depth (0: outside), its first faulting
/// address (0: none), the fault events it caused; the ranges replaced by zeros right now and
/// every replacement or restoration ever, in the process.
extern constinit thread_local int t_fault_depth QCOWMAP_INITIAL_EXEC;
extern constinit thread_local std::uintptr_t t_fault_address QCOWMAP_INITIAL_EXEC;
extern constinit thread_local std::uint64_t t_fault_own_events QCOWMAP_INITIAL_EXEC;
extern std::atomic<std::uint64_t> g_fault_replaced_now;
extern std::atomic<std::uint64_t> g_fault_events;
extern std::atomic<bool> g_fault_handler_installed;

/// True when this thread is inside a boundary.
inline bool in_fault_boundary() noexcept {
    return t_fault_depth > 0;
}

/// True when this thread met a fault inside its current boundary (the rest of its work reads
/// zeros where the file could not be read: stop early, the boundary reports it).
inline bool fault_pending() noexcept {
    return t_fault_address != 0;
}

/// Before running again work that failed because another thread's fault made a range read as
/// zeros: waits (a few ms at most, as a rule: the faulting thread puts the file back when its
/// piece of work ends) until no range is replaced, so that the rerun reads the file.
void wait_for_faults_to_settle() noexcept;

/// How often work that another thread's fault spoiled is run again before giving up.
inline constexpr int kFaultRetries = 4;

/// Marks this thread as inside a boundary for the object's lifetime (nests).
class FaultBoundary {
  public:
    FaultBoundary() {
        if (!g_fault_handler_installed.load(std::memory_order_acquire))
            install_fault_handler();
        outermost_ = t_fault_depth == 0;
        if (outermost_) {
            events_at_start_ = g_fault_events.load(std::memory_order_acquire);
            own_events_at_start_ = t_fault_own_events;
        }
        ++t_fault_depth;
    }
    ~FaultBoundary() {
        if (--t_fault_depth == 0 && t_fault_address != 0)
            clean_up(); // left early (an exception): the file goes back anyway
    }
    FaultBoundary(const FaultBoundary&) = delete;
    FaultBoundary& operator=(const FaultBoundary&) = delete;

    /// Ends the boundary's watch: this thread's fault (its pages are put back), or for the
    /// outermost boundary another thread's fault during it, as an error; nullopt when neither.
    std::optional<Error> finish(const std::filesystem::path& top) {
        if (t_fault_address == 0 &&
            (!outermost_ || (g_fault_events.load(std::memory_order_acquire) == events_at_start_ &&
                             g_fault_replaced_now.load(std::memory_order_acquire) == 0))) {
            return std::nullopt;
        }
        return finish_slowly(top);
    }
    /// After finish(): the error is this thread's own fault (it wins over any other error).
    bool own_fault() const { return own_; }
    /// After finish() found this thread's fault: the address that faulted first.
    const void* fault_address() const { return address_; }

  private:
    std::optional<Error> finish_slowly(const std::filesystem::path& top);
    static void clean_up() noexcept;

    std::uint64_t events_at_start_ = 0;
    std::uint64_t own_events_at_start_ = 0;
    bool outermost_ = false;
    bool own_ = false;
    const void* address_ = nullptr;
};

/// Takes this thread out of its boundaries for the object's lifetime: around calls into the
/// caller's code (a visitor of the public Image::visit). Its faults are its own (SIGBUS).
class FaultBoundarySuspended {
  public:
    FaultBoundarySuspended() noexcept : saved_depth_(t_fault_depth) { t_fault_depth = 0; }
    ~FaultBoundarySuspended() { t_fault_depth = saved_depth_; }
    FaultBoundarySuspended(const FaultBoundarySuspended&) = delete;
    FaultBoundarySuspended& operator=(const FaultBoundarySuspended&) = delete;

  private:
    int saved_depth_;
};

/// Runs `body` (which returns a Result) inside a boundary: a fault met on the way becomes the
/// Result's io_error (describe_fault; `top` as there), whatever `body` returned.
template <typename Body>
auto contain_faults(const std::filesystem::path& top, Body&& body) -> decltype(body()) {
    FaultBoundary boundary;
    auto result = body();
    if (auto fault = boundary.finish(top); fault && (result || boundary.own_fault()))
        return std::move(*fault);
    return result;
}

/// Reads one byte of every page of `bytes` (a range of a file mapping), so that a page that
/// cannot be read faults here, inside the caller's boundary, rather than never (write(2) to
/// /dev/null does not read what it is given).
void touch_every_page(std::span<const std::byte> bytes);

} // namespace qcowmap::detail

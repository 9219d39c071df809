// The fault boundary (fault.hpp): the SIGBUS handler, the registry of the library's mappings
// it consults, and the description of a contained fault.
#include "fault.hpp"

#include "image_state.hpp"

#include <fmt/format.h>

#include <array>
#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstring>
#include <mutex>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace qcowmap::detail {

// Read by the signal handler: initial-exec TLS, so that reading it there never allocates (the
// general-dynamic model may, on a thread's first access in a dlopen'ed module: the nbdkit
// plugin, the Python extension). A few words, well inside the static TLS space glibc keeps for
// modules loaded later.
constinit thread_local int t_fault_depth QCOWMAP_INITIAL_EXEC = 0;
constinit thread_local std::uintptr_t t_fault_address QCOWMAP_INITIAL_EXEC = 0;
constinit thread_local std::uint64_t t_fault_own_events QCOWMAP_INITIAL_EXEC = 0;
// Ranges replaced right now, and every replacement or restoration ever: another thread's
// boundary that saw either move was running while a page read as zeros.
std::atomic<std::uint64_t> g_fault_replaced_now{0};
std::atomic<std::uint64_t> g_fault_events{0};
std::atomic<bool> g_fault_handler_installed{false};

namespace {

/// One registered mapping. The handler reads it without a lock: plain atomics, written under
/// g_registry_mutex, `begin` last (0: the slot is free).
struct Slot {
    std::atomic<std::uintptr_t> begin{0};
    std::atomic<std::uintptr_t> end{0};
    std::atomic<int> fd{-1};
    const std::filesystem::path* name = nullptr; // read under the mutex only
};

/// Slots in chunks that are never freed, so the handler can walk them while another thread
/// adds one: a process maps as many files at once as it has images open.
struct Chunk {
    static constexpr std::size_t kSlots = 128;
    Slot slots[kSlots];
    std::atomic<Chunk*> next{nullptr};
};

Chunk g_first_chunk;
std::mutex g_registry_mutex;

const Slot* find_slot(std::uintptr_t address) noexcept {
    for (const Chunk* chunk = &g_first_chunk; chunk;
         chunk = chunk->next.load(std::memory_order_acquire)) {
        for (const Slot& slot : chunk->slots) {
            const std::uintptr_t begin = slot.begin.load(std::memory_order_acquire);
            if (begin != 0 && address >= begin &&
                address < slot.end.load(std::memory_order_relaxed)) {
                return &slot;
            }
        }
    }
    return nullptr;
}

/// A range of a file mapping replaced by zeros, until its owner thread puts the file back: from
/// the page that faulted to the end of the mapping, in one go (a truncated file fails from
/// there on; a copy that meets the fault then ends without faulting page after page).
struct Replaced {
    std::atomic<int> state{0}; // 0 free, 1 being filled, 2 replaced
    std::uintptr_t start = 0;
    std::size_t length = 0;
    std::uint64_t offset = 0; // of `start` in the file
    int fd = -1;
    pid_t owner = 0;
};
/// At most this many ranges replaced at once in the process (a fault ends the faulting
/// request's work at its next piece); a fault beyond that is not contained.
std::array<Replaced, 64> g_replaced;

std::uintptr_t g_page_size = 4096;

struct sigaction g_previous {};
std::once_flag g_installed;
std::mutex g_install_mutex;

/// Hands the signal to the handler that was there before ours (the CLI's, an embedder's), or
/// restores the default action and returns: the faulting access runs again and the process
/// dies of SIGBUS as it would have without us.
void chain(int signal, siginfo_t* info, void* context) {
    if (g_previous.sa_flags & SA_SIGINFO) {
        if (g_previous.sa_sigaction) {
            g_previous.sa_sigaction(signal, info, context);
            return;
        }
    } else if (g_previous.sa_handler != SIG_DFL && g_previous.sa_handler != SIG_IGN) {
        g_previous.sa_handler(signal);
        return;
    }
    struct sigaction fallback {};
    fallback.sa_handler = SIG_DFL;
    sigemptyset(&fallback.sa_mask);
    ::sigaction(signal, &fallback, nullptr);
    if (info->si_code <= 0) // sent with kill() or raise(), not a fault: send it again
        ::raise(signal);
}

/// Replaces the mapping of `slot` from the page holding `address` to its end by zeros; false
/// when it cannot (no free record, or mmap refused).
bool replace_range(const Slot& slot, std::uintptr_t address) noexcept {
    const std::uintptr_t start = address & ~(g_page_size - 1);
    const std::uintptr_t end =
        (slot.end.load(std::memory_order_relaxed) + g_page_size - 1) & ~(g_page_size - 1);
    const auto self = static_cast<pid_t>(::syscall(SYS_gettid));
    // A copy may read its source out of order (glibc's large memcpy interleaves pages, others
    // copy the tail first): a later fault below this thread's range in the same mapping extends
    // that range down instead of taking another record.
    for (Replaced& record : g_replaced) {
        if (record.state.load(std::memory_order_acquire) != 2 || record.owner != self ||
            record.start + record.length != end || start >= record.start) {
            continue;
        }
        void* zeros = ::mmap(reinterpret_cast<void*>(start), record.start - start, PROT_READ,
                             MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
        if (zeros == MAP_FAILED)
            return false;
        record.length += record.start - start;
        record.offset -= record.start - start;
        record.start = start;
        if (t_fault_address == 0)
            t_fault_address = address;
        return true;
    }
    for (Replaced& record : g_replaced) {
        int expected = 0;
        if (!record.state.compare_exchange_strong(expected, 1, std::memory_order_acq_rel))
            continue;
        void* zeros = ::mmap(reinterpret_cast<void*>(start), end - start, PROT_READ,
                             MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
        if (zeros == MAP_FAILED) {
            record.state.store(0, std::memory_order_release);
            return false;
        }
        record.start = start;
        record.length = end - start;
        record.offset = start - slot.begin.load(std::memory_order_relaxed);
        record.fd = slot.fd.load(std::memory_order_relaxed);
        record.owner = self;
        record.state.store(2, std::memory_order_release);
        g_fault_replaced_now.fetch_add(1, std::memory_order_acq_rel);
        g_fault_events.fetch_add(1, std::memory_order_acq_rel);
        ++t_fault_own_events;
        if (t_fault_address == 0)
            t_fault_address = address;
        return true;
    }
    return false;
}

/// Puts the file back where this thread replaced it by zeros, most recent replacement first
/// (a later one may lie inside an earlier one's range only if that was put back meanwhile).
void restore_own_pages() noexcept {
    const auto self = static_cast<pid_t>(::syscall(SYS_gettid));
    for (Replaced& record : g_replaced) {
        if (record.state.load(std::memory_order_acquire) != 2 || record.owner != self)
            continue;
        // The mapping is still there: the request that faulted holds its Image. Pages past
        // the end of a truncated file map fine and fault again when read.
        (void)::mmap(reinterpret_cast<void*>(record.start), record.length, PROT_READ,
                     MAP_SHARED | MAP_FIXED, record.fd, static_cast<off_t>(record.offset));
        record.state.store(0, std::memory_order_release);
        g_fault_replaced_now.fetch_sub(1, std::memory_order_acq_rel);
        g_fault_events.fetch_add(1, std::memory_order_acq_rel);
        ++t_fault_own_events;
    }
}

void on_sigbus(int signal, siginfo_t* info, void* context) {
    // si_code > 0: raised by the kernel for this thread's own access (BUS_ADRERR for a page
    // past the end of the file or one the file system could not read), not sent by anyone.
    if (info->si_code > 0 && t_fault_depth > 0) {
        const auto address = reinterpret_cast<std::uintptr_t>(info->si_addr);
        if (const Slot* slot = find_slot(address); slot && replace_range(*slot, address))
            return; // the access runs again and reads zeros; the boundary reports the fault
    }
    chain(signal, info, context);
}

bool ours(const struct sigaction& action) {
    return (action.sa_flags & SA_SIGINFO) && action.sa_sigaction == on_sigbus;
}

/// Puts our handler in place unless it already is, keeping the one it replaces for chain().
void install_now() {
    std::lock_guard lock(g_install_mutex);
    const long page = ::sysconf(_SC_PAGESIZE);
    if (page > 0)
        g_page_size = static_cast<std::uintptr_t>(page);
    struct sigaction current {};
    if (::sigaction(SIGBUS, nullptr, &current) == 0 && ours(current))
        return;
    struct sigaction action {};
    action.sa_sigaction = on_sigbus;
    // SA_NODEFER: a second fault while the handler runs (it touches nothing mapped) is not
    // possible, but a handler chained to must see the signal unblocked as it would have.
    action.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&action.sa_mask);
    struct sigaction previous {};
    if (::sigaction(SIGBUS, &action, &previous) == 0 && !ours(previous))
        g_previous = previous;
    g_fault_handler_installed.store(true, std::memory_order_release);
}

} // namespace

void register_mapping(const void* base, std::size_t length, int fd,
                      const std::filesystem::path* name) {
    if (!base || length == 0)
        return;
    std::lock_guard lock(g_registry_mutex);
    Chunk* chunk = &g_first_chunk;
    for (;;) {
        for (Slot& slot : chunk->slots) {
            if (slot.begin.load(std::memory_order_relaxed) == 0) {
                const auto begin = reinterpret_cast<std::uintptr_t>(base);
                slot.end.store(begin + length, std::memory_order_relaxed);
                slot.fd.store(fd, std::memory_order_relaxed);
                slot.name = name;
                slot.begin.store(begin, std::memory_order_release);
                return;
            }
        }
        Chunk* next = chunk->next.load(std::memory_order_relaxed);
        if (!next) {
            next = new Chunk; // never freed: the handler may be walking the list
            chunk->next.store(next, std::memory_order_release);
        }
        chunk = next;
    }
}

namespace {

/// What is known of a fault, found in normal context while its file is still open.
struct FaultFacts {
    std::uintptr_t address = 0;
    bool found = false; ///< the address lies in a registered mapping
    std::filesystem::path name;
    std::uint64_t offset = 0;
    bool shrank = false;
    std::uint64_t file_end = 0; ///< when shrank and known
    int error = 0;              ///< errno of reading the page again (0: it read)
};

/// Facts about this thread's fault in a mapping that was unmapped before its boundary ended
/// (an open that failed on it): kept here, since the file is closed by then.
thread_local std::optional<FaultFacts> t_unmapped_fault;

/// The facts for `address`; the caller holds g_registry_mutex.
FaultFacts inspect_locked(std::uintptr_t address) {
    FaultFacts facts;
    facts.address = address;
    int fd = -1;
    for (Chunk* chunk = &g_first_chunk; chunk && fd < 0;
         chunk = chunk->next.load(std::memory_order_relaxed)) {
        for (Slot& slot : chunk->slots) {
            const std::uintptr_t begin = slot.begin.load(std::memory_order_relaxed);
            if (begin != 0 && address >= begin &&
                address < slot.end.load(std::memory_order_relaxed)) {
                fd = slot.fd.load(std::memory_order_relaxed);
                if (slot.name)
                    facts.name = *slot.name;
                facts.offset = address - begin;
                break;
            }
        }
    }
    if (fd < 0)
        return facts;
    facts.found = true;
    // Tell the two causes apart after the fact: a file now shorter than the offset shrank
    // under its mapping; otherwise reading the page from the file says what failed (EIO from
    // a bad sector or a file system), with errno's own words.
    struct stat st {};
    if (::fstat(fd, &st) == 0 && S_ISREG(st.st_mode) &&
        static_cast<std::uint64_t>(st.st_size) <= facts.offset) {
        facts.shrank = true;
        facts.file_end = static_cast<std::uint64_t>(st.st_size);
        return facts;
    }
    unsigned char byte = 0;
    const ssize_t n = ::pread(fd, &byte, 1, static_cast<off_t>(facts.offset));
    if (n == 0)
        facts.shrank = true;
    else if (n < 0)
        facts.error = errno;
    return facts;
}

Error fault_error(const FaultFacts& facts, const std::filesystem::path& top) {
    if (!facts.found) {
        return Error{ErrorCode::io_error, fmt::format("a read of a mapped file faulted at "
                                                      "address {:#x}",
                                                      facts.address)};
    }
    const bool is_top = !top.empty() && facts.name == top;
    const std::string where =
        facts.name.empty() || is_top ? "the file" : fmt::format("'{}'", facts.name.string());
    if (facts.shrank) {
        // The words of the CLI's own report of a SIGBUS (cli.hpp kImageChanged), with the
        // offset that was read and where the file ends now. image_changed, as the same shrink
        // noticed by Image::check_unchanged reports it.
        return Error{ErrorCode::image_changed,
                     facts.file_end != 0
                         ? fmt::format("image changed while being read ({} shrank under its "
                                       "mapping: offset {:#x} read, the file now ends at {:#x})",
                                       where, facts.offset, facts.file_end)
                         : fmt::format("image changed while being read ({} shrank under its "
                                       "mapping: offset {:#x} read)",
                                       where, facts.offset)};
    }
    // The errno of reading the page again with pread (EIO from a bad sector); when that read
    // succeeded, EIO still: a SIGBUS on a page the kernel could not read is the mapping's EIO.
    Error error{ErrorCode::io_error,
                fmt::format("I/O error reading {} at offset {:#x}: {}", where, facts.offset,
                            facts.error != 0 ? std::strerror(facts.error)
                                             : "the page could not be read (reading it again "
                                               "succeeded)")};
    error.system_errno = facts.error != 0 ? facts.error : EIO;
    return error;
}

} // namespace

void unregister_mapping(const void* base) {
    if (!base)
        return;
    const auto begin = reinterpret_cast<std::uintptr_t>(base);
    std::lock_guard lock(g_registry_mutex);
    for (Chunk* chunk = &g_first_chunk; chunk;
         chunk = chunk->next.load(std::memory_order_relaxed)) {
        for (Slot& slot : chunk->slots) {
            if (slot.begin.load(std::memory_order_relaxed) != begin)
                continue;
            const std::uintptr_t end = slot.end.load(std::memory_order_relaxed);
            // This thread's fault inside it: described now, while the file is open.
            if (t_fault_address >= begin && t_fault_address < end && !t_unmapped_fault)
                t_unmapped_fault = inspect_locked(t_fault_address);
            // Ranges replaced by zeros go with the mapping: never map the file back over an
            // address that may belong to something else by then.
            for (Replaced& record : g_replaced) {
                if (record.state.load(std::memory_order_acquire) == 2 && record.start >= begin &&
                    record.start < end) {
                    record.state.store(0, std::memory_order_release);
                    g_fault_replaced_now.fetch_sub(1, std::memory_order_acq_rel);
                    g_fault_events.fetch_add(1, std::memory_order_acq_rel);
                    if (record.owner == static_cast<pid_t>(::syscall(SYS_gettid)))
                        ++t_fault_own_events;
                }
            }
            slot.begin.store(0, std::memory_order_release);
            slot.fd.store(-1, std::memory_order_relaxed);
            slot.name = nullptr;
            return;
        }
    }
}

Error describe_fault(const void* address, const std::filesystem::path& top) {
    const auto at = reinterpret_cast<std::uintptr_t>(address);
    if (t_unmapped_fault && t_unmapped_fault->address == at)
        return fault_error(*std::exchange(t_unmapped_fault, std::nullopt), top);
    FaultFacts facts;
    {
        std::lock_guard lock(g_registry_mutex);
        facts = inspect_locked(at);
    }
    return fault_error(facts, top);
}

bool maps_address(const ImageState& top, const void* address) {
    const auto* at = static_cast<const std::byte*>(address);
    auto inside = [&](const std::shared_ptr<const MappedFile>& file) {
        if (!file)
            return false;
        const auto bytes = file->bytes();
        return !bytes.empty() && at >= bytes.data() && at < bytes.data() + bytes.size();
    };
    for (const ImageState* layer = &top; layer; layer = layer->backing.get()) {
        if (inside(layer->file) || inside(layer->data_file))
            return true;
    }
    return false;
}

void install_fault_handler() {
    std::call_once(g_installed, install_now);
}

} // namespace qcowmap::detail

namespace qcowmap {

void install_fault_handler() {
    detail::install_now();
}

} // namespace qcowmap

namespace qcowmap::detail {

void FaultBoundary::clean_up() noexcept {
    restore_own_pages();
    t_fault_address = 0;
}

std::optional<Error> FaultBoundary::finish_slowly(const std::filesystem::path& top) {
    own_ = false;
    if (t_fault_address != 0) {
        const auto address = std::exchange(t_fault_address, 0);
        restore_own_pages();
        own_ = true;
        address_ = reinterpret_cast<const void*>(address);
        return describe_fault(reinterpret_cast<const void*>(address), top);
    }
    if (!outermost_)
        return std::nullopt;
    const std::uint64_t others = g_fault_events.load(std::memory_order_acquire) - events_at_start_ -
                                 (t_fault_own_events - own_events_at_start_);
    if (others != 0 || g_fault_replaced_now.load(std::memory_order_acquire) != 0) {
        return Error{ErrorCode::io_error,
                     "a read of a mapped file faulted in another thread during this call (an "
                     "I/O error or a file that shrank): its bytes cannot be trusted"};
    }
    return std::nullopt;
}

void wait_for_faults_to_settle() noexcept {
    for (int i = 0; i < 2000 && g_fault_replaced_now.load(std::memory_order_acquire) != 0; ++i)
        ::usleep(100);
}

void touch_every_page(std::span<const std::byte> bytes) {
    if (bytes.empty())
        return;
    static const std::size_t page = [] {
        const long size = ::sysconf(_SC_PAGESIZE);
        return static_cast<std::size_t>(size > 0 ? size : 4096);
    }();
    const auto* p = reinterpret_cast<const volatile unsigned char*>(bytes.data());
    const std::size_t first = (page - reinterpret_cast<std::uintptr_t>(bytes.data()) % page) % page;
    unsigned char sink = p[0];
    for (std::size_t at = first; at < bytes.size(); at += page)
        sink ^= p[at];
    (void)sink;
}

} // namespace qcowmap::detail

// Populate ahead, release behind, and the measured choice between the mapping and pread.
//
// Where the hypervisor shadows page tables (a "pvm" guest), the first read of a page made
// present by MADV_POPULATE_READ still traps into the hypervisor (no guest fault is counted), so
// populating alone saves the consumer little; a page another thread touched first costs the
// consumer almost nothing. So a helper populates and touches ahead, which brings hashing the
// mapping close to hashing a cache-hot buffer (README, "Benchmarks").
#include "populate.hpp"

#include "image_state.hpp"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <ctime>
#include <limits>
#include <sys/mman.h>
#include <unistd.h>

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22 // Linux 5.14, include/uapi/asm-generic/mman-common.h
#endif

namespace qcowmap {
namespace detail {
namespace {

std::uintptr_t page_size() {
    static const std::uintptr_t page = [] {
        long size = ::sysconf(_SC_PAGESIZE);
        return static_cast<std::uintptr_t>(size > 0 ? size : 4096);
    }();
    return page;
}

// Cleared the first time the kernel refuses MADV_POPULATE_READ (EINVAL: older than 5.14).
std::atomic<bool> g_populate_supported{true};

void touch_pages(std::span<const std::byte> bytes) {
    const std::uintptr_t page = page_size();
    const auto* p = reinterpret_cast<const volatile unsigned char*>(bytes.data());
    // The first byte of every page the range covers, the range's first byte included.
    const std::uintptr_t begin = reinterpret_cast<std::uintptr_t>(bytes.data());
    const std::size_t first = static_cast<std::size_t>((page - begin % page) % page);
    unsigned char sink = 0;
    if (!bytes.empty())
        sink ^= p[0];
    for (std::size_t at = first; at < bytes.size(); at += page)
        sink ^= p[at];
    (void)sink;
}

double thread_cpu_ns() {
    timespec t{};
    ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return static_cast<double>(t.tv_sec) * 1e9 + static_cast<double>(t.tv_nsec);
}

/// Times, in this thread's CPU time (which other processes on a busy machine do not add to),
/// pread of a few windows of a memory file against making the same windows of a fresh mapping
/// present and touched: the best of each, so that an interrupt in one window does not decide.
DataAccess measure_data_access() {
    constexpr std::size_t kWindow = 256 * 1024;
    constexpr std::size_t kWindows = 4;
    constexpr std::size_t kSize = kWindow * kWindows;
    const int fd = ::memfd_create("qcowmap-probe", MFD_CLOEXEC);
    if (fd < 0)
        return DataAccess::mapping;
    struct Closer {
        int fd;
        ~Closer() { ::close(fd); }
    } closer{fd};
    std::vector<std::byte> buffer(kWindow);
    for (std::size_t i = 0; i < buffer.size(); ++i)
        buffer[i] = std::byte(i * 131 + 7);
    for (std::size_t w = 0; w < kWindows; ++w) {
        if (::pwrite(fd, buffer.data(), kWindow, static_cast<off_t>(w * kWindow)) !=
            static_cast<ssize_t>(kWindow))
            return DataAccess::mapping;
    }
    double best_read = std::numeric_limits<double>::infinity();
    for (std::size_t w = 0; w < kWindows; ++w) {
        const double t0 = thread_cpu_ns();
        if (::pread(fd, buffer.data(), kWindow, static_cast<off_t>(w * kWindow)) !=
            static_cast<ssize_t>(kWindow))
            return DataAccess::mapping;
        best_read = std::min(best_read, thread_cpu_ns() - t0);
    }
    void* map = ::mmap(nullptr, kSize, PROT_READ, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED)
        return DataAccess::mapping;
    double best_map = std::numeric_limits<double>::infinity();
    for (std::size_t w = 0; w < kWindows; ++w) {
        std::span<const std::byte> window(static_cast<const std::byte*>(map) + w * kWindow,
                                          kWindow);
        const double t0 = thread_cpu_ns();
        populate_pages(window, Prefetch::touch);
        best_map = std::min(best_map, thread_cpu_ns() - t0);
    }
    ::munmap(map, kSize);
    return best_map <= best_read ? DataAccess::mapping : DataAccess::read;
}

} // namespace

void populate_pages(std::span<const std::byte> bytes, Prefetch how) {
    if (bytes.empty() || how == Prefetch::none)
        return;
    const std::uintptr_t page = page_size();
    const auto begin = reinterpret_cast<std::uintptr_t>(bytes.data());
    const std::uintptr_t lo = begin / page * page;
    const std::uintptr_t hi = (begin + bytes.size() + page - 1) / page * page;
    void* start = reinterpret_cast<void*>(lo);
    if (g_populate_supported.load(std::memory_order_relaxed)) {
        if (::madvise(start, hi - lo, MADV_POPULATE_READ) == 0) {
            if (how == Prefetch::touch)
                touch_pages(bytes);
            return;
        }
        if (errno != EINVAL) {
            // EFAULT: a page cannot be read (the file shrank under the mapping, or the file
            // system returned an error). Touch them: the fault is raised here, inside the
            // caller's fault boundary, and becomes its error; a consumer that never reads the
            // bytes (write(2) to /dev/null) would never find out.
            touch_pages(bytes);
            return;
        }
        g_populate_supported.store(false, std::memory_order_relaxed);
    }
    if (how == Prefetch::touch) {
        touch_pages(bytes);
    } else {
        (void)::madvise(start, hi - lo, MADV_WILLNEED);
    }
}

void release_pages(std::span<const std::byte> bytes) {
    const std::uintptr_t page = page_size();
    const auto begin = reinterpret_cast<std::uintptr_t>(bytes.data());
    // Whole pages inside the range only: the edge pages may hold bytes not consumed yet.
    const std::uintptr_t lo = (begin + page - 1) / page * page;
    const std::uintptr_t hi = (begin + bytes.size()) / page * page;
    if (hi > lo)
        (void)::madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);
}

DataAccess resolve(DataAccess access) {
    return access == DataAccess::automatic ? automatic_data_access() : access;
}

PageReleaser::PageReleaser(const Image& image) {
    for (const ImageState* layer = &detail_state(image); layer; layer = layer->backing.get()) {
        if (layer->file)
            mappings_.push_back(layer->file->bytes());
        if (layer->data_file)
            mappings_.push_back(layer->data_file->bytes());
    }
}

void PageReleaser::consumed(std::span<const std::byte> bytes) {
    if (bytes.empty())
        return;
    const auto begin = reinterpret_cast<std::uintptr_t>(bytes.data());
    const auto end = begin + bytes.size();
    const int mapping = mapping_of(begin, end);
    if (mapping < 0)
        return;
    if (mapping != current_) {
        flush();
        current_ = mapping;
    }
    if (volume_ == 0) {
        lo_ = begin;
        hi_ = end;
    } else {
        lo_ = std::min(lo_, begin);
        hi_ = std::max(hi_, end);
    }
    volume_ += bytes.size();
    if (volume_ >= kBatch)
        flush();
}

void PageReleaser::flush() {
    if (volume_ == 0)
        return;
    release_pages({reinterpret_cast<const std::byte*>(lo_), hi_ - lo_});
    volume_ = 0;
}

int PageReleaser::mapping_of(std::uintptr_t begin, std::uintptr_t end) const {
    for (std::size_t i = 0; i < mappings_.size(); ++i) {
        const auto lo = reinterpret_cast<std::uintptr_t>(mappings_[i].data());
        if (begin >= lo && end <= lo + mappings_[i].size())
            return static_cast<int>(i);
    }
    return -1;
}

} // namespace detail

DataAccess automatic_data_access() {
    static const DataAccess measured = detail::measure_data_access();
    return measured;
}

} // namespace qcowmap

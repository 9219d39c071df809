// Buffers that are written before they are read (pread, decompression): growing one does not
// zero its bytes first. A std::vector<std::byte> value-initialises what resize adds, which for a
// worker's fresh 1 MiB buffer is a memset that also takes every page fault up front.
#pragma once

#include <cstddef>
#include <memory>
#include <new>
#include <utility>
#include <vector>

namespace qcowmap::detail {

/// std::allocator, except that construction without arguments default-initialises (leaves a
/// std::byte as it is) instead of value-initialising (zeroing).
template <typename T> struct DefaultInitAllocator : std::allocator<T> {
    using std::allocator<T>::allocator;
    template <typename U> struct rebind { using other = DefaultInitAllocator<U>; };
    template <typename U> void construct(U* p) noexcept { ::new (static_cast<void*>(p)) U; }
    template <typename U, typename... Args> void construct(U* p, Args&&... args) {
        ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
    }
};

/// Bytes whose `resize` leaves new bytes unset; they must be written before they are read.
using ScratchBytes = std::vector<std::byte, DefaultInitAllocator<std::byte>>;

} // namespace qcowmap::detail

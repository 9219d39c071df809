// Bounds-checked views of file bytes, big-endian loads and stores. Every read of bytes that come
// from an image goes through `slice`, whose check cannot overflow.
#pragma once

#include <qcowmap/result.hpp>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include <fmt/format.h>

namespace qcowmap::detail {

using Bytes = std::span<const std::byte>;

/// True when `[offset, offset + length)` lies inside a buffer of `size` bytes. Written as two
/// comparisons so that no sum can wrap.
constexpr bool fits(std::uint64_t size, std::uint64_t offset, std::uint64_t length) {
    return offset <= size && length <= size - offset;
}

/// True when `value` is a multiple of `alignment` (a power of two).
constexpr bool is_aligned(std::uint64_t value, std::uint64_t alignment) {
    return (value & (alignment - 1)) == 0;
}

/// The `length` bytes at `offset` in `bytes`, or an error naming `what`, the range and the size.
inline Result<Bytes> slice(Bytes bytes, std::uint64_t offset, std::uint64_t length,
                           std::string_view what, ErrorCode code = ErrorCode::invalid_table) {
    if (!fits(bytes.size(), offset, length)) {
        return Error{code, fmt::format("{} at {:#x} (+{:#x}) lies beyond end of file ({:#x})", what,
                                       offset, length, bytes.size())};
    }
    return bytes.subspan(static_cast<std::size_t>(offset), static_cast<std::size_t>(length));
}

// Big-endian loads by shifts (compilers turn these into one bswap). Callers pass spans that
// `slice` produced, so the size is already known to suffice; the asserts document it.
inline std::uint16_t load_be16(const std::byte* p) {
    return static_cast<std::uint16_t>((std::to_integer<unsigned>(p[0]) << 8) |
                                      std::to_integer<unsigned>(p[1]));
}
inline std::uint32_t load_be32(const std::byte* p) {
    return (std::to_integer<std::uint32_t>(p[0]) << 24) |
           (std::to_integer<std::uint32_t>(p[1]) << 16) |
           (std::to_integer<std::uint32_t>(p[2]) << 8) | std::to_integer<std::uint32_t>(p[3]);
}
inline std::uint64_t load_be64(const std::byte* p) {
    return (std::uint64_t{load_be32(p)} << 32) | load_be32(p + 4);
}
// Big-endian stores, the encoders' counterpart of the loads (by shifts, never casts).
inline void store_be16(std::byte* p, std::uint16_t value) {
    p[0] = static_cast<std::byte>(value >> 8);
    p[1] = static_cast<std::byte>(value);
}
inline void store_be32(std::byte* p, std::uint32_t value) {
    for (int i = 3; i >= 0; --i, value >>= 8)
        p[i] = static_cast<std::byte>(value & 0xff);
}
inline void store_be64(std::byte* p, std::uint64_t value) {
    for (int i = 7; i >= 0; --i, value >>= 8)
        p[i] = static_cast<std::byte>(value & 0xff);
}
inline std::uint8_t load_u8(Bytes b, std::size_t at) {
    return std::to_integer<std::uint8_t>(b[at]);
}
inline std::uint16_t load_be16(Bytes b, std::size_t at) {
    return load_be16(b.subspan(at, 2).data());
}
inline std::uint32_t load_be32(Bytes b, std::size_t at) {
    return load_be32(b.subspan(at, 4).data());
}
inline std::uint64_t load_be64(Bytes b, std::size_t at) {
    return load_be64(b.subspan(at, 8).data());
}

/// `text` made safe for a one-line message: control bytes and DEL become \xNN, so a name
/// taken from an image cannot break the line or send terminal escapes.
inline std::string printable(std::string_view text) {
    std::string out;
    out.reserve(text.size());
    for (char c : text) {
        auto u = static_cast<unsigned char>(c);
        if (u < 0x20 || u == 0x7f || c == '\\') {
            out += fmt::format("\\x{:02x}", u);
        } else {
            out += c;
        }
    }
    return out;
}

/// Text of a not-NUL-terminated on-disk string.
inline std::string_view as_text(Bytes b) {
    return {reinterpret_cast<const char*>(b.data()), b.size()};
}

} // namespace qcowmap::detail

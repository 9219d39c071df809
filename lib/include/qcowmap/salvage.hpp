// qcowmap — what an image opened with OpenOptions::salvage could not read.
#pragma once

#if !defined(__cplusplus) || __cplusplus < 202002L
#error "qcowmap needs C++20: compile with -std=c++20 (Meson: cpp_std=c++20)"
#endif

#include <qcowmap/image.hpp>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace qcowmap {

/// A range of the virtual disk that an image opened with OpenOptions::salvage reads as zeros
/// (or as unallocated) because its metadata or data cannot be read.
struct DamagedRange {
    std::uint64_t offset = 0;
    std::uint64_t length = 0;
    /// The layer whose tables or clusters are damaged (0: the image itself).
    std::uint32_t depth = 0;
    /// True when the range reads as unallocated in that layer, as qemu reads table entries cut
    /// off by the end of the file: the layer below shows through when there is one. False when
    /// the range reads as zeros.
    bool unallocated = false;
    /// True when `unallocated` and a layer below shows through (the range is not zeros).
    bool falls_through = false;
    /// What is wrong, naming the offsets ("L2 table at 0x40000 (+0x10000) lies beyond end of
    /// file (0x30008)", "compressed cluster ... zlib error -3: invalid stored block lengths").
    std::string reason;
};

/// The most damaged ranges a report lists; the rest are only counted.
inline constexpr std::size_t kMaxListedDamagedRanges = 65536;

/// Everything an image opened with OpenOptions::salvage found damaged, in disk order.
struct SalvageReport {
    std::vector<DamagedRange> ranges;
    /// Ranges beyond kMaxListedDamagedRanges: counted in `damaged_bytes`, not listed.
    std::uint64_t ranges_not_listed = 0;
    /// Bytes of the disk in damaged ranges, listed or not.
    std::uint64_t damaged_bytes = 0;
    /// True when some of the disk could not be read (what the CLI's exit status 4 says).
    bool data_lost() const { return damaged_bytes != 0; }
};

/// The damage found when `image` was opened with OpenOptions::salvage; empty for an image
/// opened without it or found undamaged. Lives as long as the Image.
const SalvageReport& salvage_report(const Image& image);

} // namespace qcowmap

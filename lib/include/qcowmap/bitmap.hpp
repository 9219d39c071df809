// qcowmap — persistent dirty bitmaps: which parts of the disk changed since a checkpoint.
#pragma once

#if !defined(__cplusplus) || __cplusplus < 202002L
#error "qcowmap needs C++20: compile with -std=c++20 (Meson: cpp_std=c++20)"
#endif

#include <qcowmap/extent.hpp>
#include <qcowmap/image.hpp>
#include <qcowmap/result.hpp>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

namespace qcowmap {

/// A run of the virtual disk `[offset, offset + length)` whose granules are all dirty or all
/// clean in a bitmap.
struct BitmapRange {
    std::uint64_t offset = 0;
    std::uint64_t length = 0; ///< never 0
    bool dirty = false;
};

namespace detail {

/// The machinery of `BitmapRanges`: walks a bitmap's data clusters in place in the mapping.
/// Fails only when reading the mapping does (an io_error: the file shrank or a read failed);
/// `DirtyBitmap::open` validated the bitmap table.
class BitmapRangeWalk {
  public:
    using value_type = BitmapRange;
    BitmapRangeWalk(Image image, std::span<const std::byte> table, unsigned cluster_bits,
                    unsigned granularity_bits, std::uint64_t start, std::uint64_t end,
                    bool dirty_only);
    bool next(BitmapRange& out);
    const std::optional<Error>& error() const { return error_; }

  private:
    bool step(BitmapRange& out); // next() inside the fault boundary
    bool bit(std::uint64_t granule) const;
    std::uint64_t find_change(std::uint64_t granule, bool value) const;

    Image image_;                       // keeps the mapping alive
    std::span<const std::byte> file_;   // the image file
    std::span<const std::byte> table_;  // the bitmap table, validated
    unsigned granule_bits_ = 0;         // log2(granularity)
    unsigned cluster_granule_bits_ = 0; // log2(granules described by one bitmap data cluster)
    std::uint64_t start_ = 0, end_ = 0; // byte range asked for
    std::uint64_t granule_ = 0;         // next granule to look at
    std::uint64_t granule_end_ = 0;     // one past the last granule of the range
    bool dirty_only_ = false;
    std::optional<Error> error_;
};

/// The machinery of `DirtyExtentRange`: the extent walk restricted to a bitmap's dirty ranges.
class DirtyExtentWalk {
  public:
    using value_type = Extent;
    DirtyExtentWalk(Image image, BitmapRangeWalk ranges);
    bool next(Extent& out);
    const std::optional<Error>& error() const { return error_; }

  private:
    Image image_;
    BitmapRangeWalk ranges_;
    std::optional<ExtentWalk> extents_;
    std::optional<Error> error_;
};

} // namespace detail

/// A bitmap's ranges in disk order, straight from the bitmap data clusters in the mapping (no
/// copy of the bitmap is made), as a single-pass input range. Adjacent granules of the same
/// state merge into one range; the range holding the last, partial granule ends at the virtual
/// size. Never fails (`error()` stays empty). The image's mapping stays alive as long as the
/// range does.
using BitmapRanges = WalkRange<detail::BitmapRangeWalk>;

/// Extents (exactly as `Image::extents` yields them: data spans, zero runs, compressed runs)
/// of the dirty ranges of a bitmap only, in disk order, as a single-pass input range: what an
/// incremental backup copies. Extents never cross the edge of a dirty range. After the loop,
/// `error()` says whether the extent walk stopped early.
using DirtyExtentRange = WalkRange<detail::DirtyExtentWalk>;

/// One persistent dirty bitmap of an image, checked and ready to read.
///
/// Bitmaps belong to the top image and describe its active disk (not an internal snapshot,
/// and not the backing layers' own bitmaps). Bit N covers bytes `[N * granularity,
/// (N + 1) * granularity)`; a set bit means the range was written while the bitmap was enabled.
/// A cheap value: it holds a reference to the image's state and a span of the bitmap table.
class DirtyBitmap {
  public:
    /// Looks up the bitmap called `name` in `image` and checks that it may be used.
    /// Errors:
    /// - invalid_argument: the image has no bitmap of that name, or it was opened at an
    ///   internal snapshot (bitmaps describe the active disk).
    /// - invalid_table: the bitmap is inconsistent and must not be trusted (flag in_use set,
    ///   autoclear bit 0 clear, unknown extra data without extra_data_compatible; the message
    ///   says which), or a bitmap table entry is malformed (reserved bits, unaligned offset,
    ///   all-ones flag beside an offset, data cluster past the end of the file).
    static Result<DirtyBitmap> open(const Image& image, std::string_view name);

    /// The directory entry: name, flags, granularity.
    const BitmapEntry& entry() const { return *entry_; }
    /// Bytes of the disk covered by one bit.
    std::uint64_t granularity() const { return entry_->granularity(); }
    /// The virtual size the bitmap covers (the image's).
    std::uint64_t size() const { return size_; }

    /// Dirty and clean ranges covering `[start, min(end, size()))`, alternating, in order.
    BitmapRanges ranges(std::uint64_t start = 0, std::uint64_t end = UINT64_MAX) const;
    /// Only the dirty ranges of `[start, min(end, size()))`, in order.
    BitmapRanges dirty_ranges(std::uint64_t start = 0, std::uint64_t end = UINT64_MAX) const;
    /// The extents of the dirty ranges of `[start, min(end, size()))`: the normal extent walk
    /// restricted to them. Its errors are those of `Image::extents`.
    DirtyExtentRange dirty_extents(std::uint64_t start = 0, std::uint64_t end = UINT64_MAX) const;
    /// How many bytes of the disk are dirty (popcount over the bitmap, the last partial
    /// granule counted up to the virtual size only). Reads the bitmap's data clusters from the
    /// mapping outside the fault boundary (no error to return): `list_bitmaps` counts inside it.
    std::uint64_t dirty_bytes() const;

  private:
    DirtyBitmap(Image image, const BitmapEntry* entry, std::span<const std::byte> table);
    static Result<DirtyBitmap> open_in_boundary(const Image& image, std::string_view name);
    Image image_;
    const BitmapEntry* entry_; // inside image_.info(), which lives as long as image_
    std::span<const std::byte> table_;
    std::uint64_t size_ = 0;
};

/// What `list_bitmaps` says about one bitmap.
struct BitmapSummary {
    BitmapEntry entry;
    /// Dirty bytes, when the bitmap can be used.
    std::optional<std::uint64_t> dirty_bytes;
    /// Why the bitmap cannot be used (the error `DirtyBitmap::open` gives), else empty.
    std::optional<Error> error;
};

/// Every bitmap of the top image in directory order, each with its dirty byte count or the
/// reason it cannot be used. Empty when the image has no bitmaps extension (or a stale one whose
/// directory no longer parses: see `BitmapsExtension::directory_error`). Reports bitmaps of the
/// active disk even when `image` was opened at a snapshot (then `error` says so).
std::vector<BitmapSummary> list_bitmaps(const Image& image);

} // namespace qcowmap

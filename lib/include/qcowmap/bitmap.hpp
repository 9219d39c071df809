// qcowmap — persistent dirty bitmaps: which parts of the disk changed since a checkpoint.
#pragma once

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

/// Walks a bitmap's ranges in disk order, straight from the bitmap data clusters in the
/// mapping (no copy of the bitmap is made). Adjacent granules of the same state merge into one
/// range; the range holding the last, partial granule ends at the virtual size. Never fails:
/// `DirtyBitmap::open` validated the bitmap table. A cheap value; the image's mapping stays
/// alive as long as the iterator does.
class BitmapRangeIterator {
  public:
    /// Produces the next range into `out`. Returns false at the end.
    bool next(BitmapRange& out);

  private:
    friend class DirtyBitmap;
    BitmapRangeIterator(Image image, std::span<const std::byte> table, unsigned cluster_bits,
                        unsigned granularity_bits, std::uint64_t start, std::uint64_t end,
                        bool dirty_only);
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
};

/// Extents (exactly as `Image::extents` yields them: data spans, zero runs, compressed runs)
/// of the dirty ranges of a bitmap only, in disk order: what an incremental backup copies.
/// Extents never cross the edge of a dirty range. After the first error it stays failed.
class DirtyExtentIterator {
  public:
    /// Produces the next extent into `out`. Returns false at the end or on error.
    bool next(Extent& out);
    /// True once an error stopped the walk.
    bool failed() const { return error_.has_value(); }
    /// The error that stopped the walk; only meaningful when `failed()`.
    const Error& error() const { return *error_; }

  private:
    friend class DirtyBitmap;
    DirtyExtentIterator(Image image, BitmapRangeIterator ranges);

    Image image_;
    BitmapRangeIterator ranges_;
    std::optional<ExtentIterator> extents_;
    std::optional<Error> error_;
};

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
    BitmapRangeIterator ranges(std::uint64_t start = 0, std::uint64_t end = UINT64_MAX) const;
    /// Only the dirty ranges of `[start, min(end, size()))`, in order.
    BitmapRangeIterator dirty_ranges(std::uint64_t start = 0, std::uint64_t end = UINT64_MAX) const;
    /// The extents of the dirty ranges of `[start, min(end, size()))`: the normal extent walk
    /// restricted to them. Its errors are those of `Image::extents`.
    DirtyExtentIterator dirty_extents(std::uint64_t start = 0,
                                      std::uint64_t end = UINT64_MAX) const;
    /// How many bytes of the disk are dirty (popcount over the bitmap, the last partial
    /// granule counted up to the virtual size only).
    std::uint64_t dirty_bytes() const;

  private:
    DirtyBitmap(Image image, const BitmapEntry* entry, std::span<const std::byte> table);
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

// qcowmap — a qcow2 image read through one read-only memory mapping.
#pragma once

#include <qcowmap/extent.hpp>
#include <qcowmap/result.hpp>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace qcowmap {

namespace detail {
struct ImageState;
}

/// qcow2 incompatible feature bits (spec "Header", bytes 72-79).
inline constexpr std::uint64_t kIncompatDirty = 1u << 0;
inline constexpr std::uint64_t kIncompatCorrupt = 1u << 1;
inline constexpr std::uint64_t kIncompatDataFile = 1u << 2;
inline constexpr std::uint64_t kIncompatCompressionType = 1u << 3;
inline constexpr std::uint64_t kIncompatExtendedL2 = 1u << 4;
/// qcow2 compatible feature bits (bytes 80-87).
inline constexpr std::uint64_t kCompatLazyRefcounts = 1u << 0;
/// qcow2 autoclear feature bits (bytes 88-95).
inline constexpr std::uint64_t kAutoclearBitmaps = 1u << 0;
inline constexpr std::uint64_t kAutoclearDataFileRaw = 1u << 1;

/// Compression types (header byte 104).
enum class CompressionType : std::uint8_t { zlib = 0, zstd = 1 };

/// One entry of the feature-name table header extension.
struct FeatureName {
    enum class Type : std::uint8_t { incompatible = 0, compatible = 1, autoclear = 2 };
    Type type;
    std::uint8_t bit;
    std::string name;
};

/// One header extension as found after the header (known and unknown ones alike).
struct HeaderExtension {
    std::uint32_t type;
    std::uint32_t length;
    std::uint64_t file_offset; ///< where its data starts in the file
};

/// The bitmaps header extension, and the names found in its bitmap directory.
struct BitmapsExtension {
    std::uint32_t count = 0;
    std::uint64_t directory_size = 0;
    std::uint64_t directory_offset = 0;
    std::vector<std::string> names;
};

/// Everything the header and its extensions say, decoded and validated at open.
struct ImageInfo {
    std::uint32_t version = 0; ///< 1 (legacy qcow), 2 or 3
    std::uint32_t mtime = 0;   ///< qcow version 1 only: modification time of the backing file
    std::uint64_t virtual_size = 0;
    std::uint32_t cluster_bits = 0;
    std::uint64_t cluster_size = 0;
    std::uint64_t file_size = 0;
    std::uint32_t crypt_method = 0;
    std::uint32_t l1_size = 0;
    std::uint64_t l1_table_offset = 0;
    std::uint64_t refcount_table_offset = 0;
    std::uint32_t refcount_table_clusters = 0;
    std::uint32_t snapshot_count = 0;
    std::uint64_t snapshots_offset = 0;
    std::uint64_t incompatible_features = 0;
    std::uint64_t compatible_features = 0;
    std::uint64_t autoclear_features = 0;
    std::uint32_t refcount_order = 4;
    std::uint32_t header_length = 72;
    CompressionType compression_type = CompressionType::zlib;
    bool extended_l2 = false;
    std::optional<std::string> backing_file;   ///< name as stored in the image
    std::optional<std::string> backing_format; ///< from the backing file format extension
    std::optional<std::string> data_file;      ///< from the external data file name extension
    std::optional<BitmapsExtension> bitmaps;
    std::optional<std::uint64_t> encryption_header_offset; ///< full disk encryption pointer
    std::vector<FeatureName> feature_names;
    std::vector<HeaderExtension> extensions;

    std::uint32_t refcount_bits() const { return 1u << refcount_order; }
    /// Name of a feature bit: from the image's feature-name table, else the spec's name, else
    /// "bit N".
    std::string feature_name(FeatureName::Type type, unsigned bit) const;
};

/// What to do with a backing file named in the header.
enum class BackingMode {
    follow, ///< read through the backing chain (not yet supported: such images are refused)
    none,   ///< read only this image: unallocated ranges read as zeros and are not `present`
};

struct OpenOptions {
    BackingMode backing = BackingMode::follow;
};

class Image;

/// Walks the virtual disk in order and yields merged extents.
///
/// A cheap value: copy it, or make one per thread from one shared `Image`. Use:
/// \code
///   ExtentIterator it = image.extents();
///   Extent e;
///   while (it.next(e)) { ... }
///   if (it.failed()) report(it.error());
/// \endcode
/// Adjacent runs merge when they are of the same kind, presence and depth and (where they have a
/// host offset) continue contiguously in the file; each compressed cluster is its own extent.
/// After the first error the iterator stays failed and yields nothing more.
class ExtentIterator {
  public:
    /// Produces the next extent into `out`. Returns false at the end of the range or on error.
    bool next(Extent& out);
    /// True once an error stopped the walk.
    bool failed() const { return error_.has_value(); }
    /// The error that stopped the walk; only meaningful when `failed()`.
    const Error& error() const { return *error_; }
    /// Where the next extent will start.
    std::uint64_t position() const { return position_; }

  private:
    friend class Image;
    ExtentIterator(std::shared_ptr<const detail::ImageState> state, std::uint64_t start,
                   std::uint64_t end);
    bool fail(Error error);

    std::shared_ptr<const detail::ImageState> state_;
    std::uint64_t position_ = 0;
    std::uint64_t end_ = 0;
    std::optional<Error> error_;
};

/// A qcow2 image opened read-only through a memory mapping.
///
/// Immutable after `open`: share one `Image` (or copies of it, which are cheap) across threads
/// freely. Every span it hands out points into the mapping and stays valid while any copy of the
/// `Image` is alive. The file must not be modified or truncated while it is mapped.
class Image {
  public:
    /// Maps and validates the image. Errors: io_error (cannot open/map), not_qcow2,
    /// unsupported_version, invalid_header, invalid_table, unsupported_feature, encrypted.
    static Result<Image> open(const std::filesystem::path& path, const OpenOptions& options = {});

    /// Validates an image already in memory (tests, fuzzing). `bytes` must outlive the Image.
    static Result<Image> open_bytes(std::span<const std::byte> bytes,
                                    const OpenOptions& options = {});

    /// Virtual disk size in bytes.
    std::uint64_t size() const;
    /// The decoded header.
    const ImageInfo& info() const;
    /// The path given to `open` (empty for `open_bytes`).
    const std::filesystem::path& path() const;
    /// The whole mapped file.
    std::span<const std::byte> file_bytes() const;

    /// Extents covering `[start, min(end, size()))`, in order.
    ExtentIterator extents(std::uint64_t start = 0, std::uint64_t end = UINT64_MAX) const;

    /// Copies `dest.size()` bytes of the virtual disk starting at `offset` into `dest`.
    /// Returns the bytes copied: fewer than asked only when the disk ends first.
    /// Errors: out_of_range when `offset > size()`, and any error the extent walk meets.
    Result<std::size_t> read(std::span<std::byte> dest, std::uint64_t offset) const;

    /// Receives one run of `visit_runs`: `bytes` holds the run's `length` bytes, or is empty
    /// when the run reads as zeros. Return an error to stop the walk.
    using RunVisitor = std::function<Result<void>(std::uint64_t offset, std::uint64_t length,
                                                  std::span<const std::byte> bytes)>;

    /// Walks `[start, min(end, size()))` in order as byte runs, the zero-copy way to consume a
    /// whole disk: data comes straight from the mapping, compressed clusters are decompressed
    /// into a buffer owned by this call (valid during the visitor call only), zero runs carry no
    /// bytes. Errors: those of the extent walk and of decompression, or the visitor's own.
    Result<void> visit_runs(std::uint64_t start, std::uint64_t end,
                            const RunVisitor& visitor) const;

    /// Like `visit_runs`, but compressed clusters are decompressed ahead of the visitor on
    /// `threads` worker threads, while the visitor is called on the calling thread in disk
    /// order. Workers start only when a compressed cluster is met, so images without any cost
    /// nothing extra. Memory stays bounded (4 × threads clusters in flight, whatever the image
    /// size). `threads` 0 or 1 means `visit_runs`.
    Result<void> visit_runs_parallel(std::uint64_t start, std::uint64_t end, unsigned threads,
                                     const RunVisitor& visitor) const;

  private:
    explicit Image(std::shared_ptr<const detail::ImageState> state);
    std::shared_ptr<const detail::ImageState> state_;
    friend class Decompressor;
};

/// Produces the bytes of compressed extents. Holds a one-cluster buffer and decoder state: own
/// one per thread. Never shared mutable state inside `Image`.
class Decompressor {
  public:
    Decompressor();
    ~Decompressor();
    Decompressor(Decompressor&&) noexcept;
    Decompressor& operator=(Decompressor&&) noexcept;

    /// Decompresses the cluster of a compressed `extent` from `image` and returns its
    /// `extent.length` bytes starting at `extent.offset_in_cluster`. The span lives until the
    /// next call. Errors: compressed_data (decoder error, output short of or past one cluster).
    Result<std::span<const std::byte>> decompress(const Image& image, const Extent& extent);

    /// Decompresses the whole cluster of a compressed `extent` into `cluster`, which must be
    /// exactly one cluster long (the extent's bytes then start at `extent.offset_in_cluster`).
    /// Errors: compressed_data, invalid_argument for a wrong extent or buffer size.
    Result<void> decompress_cluster(const Image& image, const Extent& extent,
                                    std::span<std::byte> cluster);

  private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

} // namespace qcowmap

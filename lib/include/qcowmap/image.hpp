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

/// Bitmap directory entry flags (spec "Bitmap directory", bytes 12-15).
inline constexpr std::uint32_t kBitmapInUse = 1u << 0;
inline constexpr std::uint32_t kBitmapAuto = 1u << 1;
inline constexpr std::uint32_t kBitmapExtraDataCompatible = 1u << 2;

/// One entry of the bitmap directory (spec "Bitmap directory"), validated at open.
struct BitmapEntry {
    std::string name;
    std::uint64_t table_offset = 0; ///< file offset of the bitmap table
    std::uint32_t table_size = 0;   ///< entries in the bitmap table
    std::uint32_t flags = 0;        ///< kBitmapInUse | kBitmapAuto | kBitmapExtraDataCompatible
    std::uint8_t type = 0;          ///< 1: dirty tracking bitmap (the only type)
    std::uint8_t granularity_bits = 0;
    std::uint32_t extra_data_size = 0;
    /// Empty when the bitmap can be used; else why it must not be trusted (in_use set, the
    /// autoclear bit clear, unknown extra data without extra_data_compatible).
    std::string inconsistent_reason;

    std::uint64_t granularity() const { return std::uint64_t{1} << granularity_bits; }
    bool in_use() const { return (flags & kBitmapInUse) != 0; }
    /// The "auto" flag: the bitmap is enabled (qemu keeps tracking writes into it).
    bool enabled() const { return (flags & kBitmapAuto) != 0; }
    bool consistent() const { return inconsistent_reason.empty(); }
};

/// The bitmaps header extension, and the names found in its bitmap directory.
struct BitmapsExtension {
    std::uint32_t count = 0;
    std::uint64_t directory_size = 0;
    std::uint64_t directory_offset = 0;
    std::vector<std::string> names;
    /// The directory entries, in directory order (same order as `names`).
    std::vector<BitmapEntry> entries;
    /// False when autoclear bit 0 is clear: the extension may be stale and every bitmap is
    /// inconsistent (spec "autoclear_features").
    bool consistent = true;
    /// When the autoclear bit is clear and the stale directory could not even be parsed: why.
    /// `entries` is then empty.
    std::string directory_error;
};

/// One entry of the internal snapshot table (spec "Snapshots").
struct Snapshot {
    std::string id;   ///< unique ID string
    std::string name; ///< the snapshot's name (its "tag" in qemu-img snapshot -l)
    std::uint64_t l1_table_offset = 0;
    std::uint32_t l1_size = 0;
    std::uint32_t date_seconds = 0;         ///< when it was taken, seconds since the Epoch
    std::uint32_t date_nanoseconds = 0;     ///< ... and the subsecond part
    std::uint64_t vm_clock_nanoseconds = 0; ///< guest run time when it was taken
    std::uint64_t vm_state_size = 0;        ///< 64-bit field from the extra data when present
    std::uint64_t virtual_size = 0;         ///< from the extra data, else the image's size
    std::uint32_t extra_data_size = 0;
    std::optional<std::uint64_t> icount; ///< instruction count (extra data bytes 56-63)
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
    std::vector<Snapshot> snapshots;

    std::uint32_t refcount_bits() const { return 1u << refcount_order; }
    /// Name of a feature bit: from the image's feature-name table, else the spec's name, else
    /// "bit N".
    std::string feature_name(FeatureName::Type type, unsigned bit) const;
};

/// What to do with a backing file named in the header.
enum class BackingMode {
    follow, ///< read through the backing chain: unallocated ranges fall through to the layer below
    none,   ///< read only this image: unallocated ranges read as zeros and are not `present`
};

/// The deepest backing chain `open` follows (layers, the image itself included).
inline constexpr unsigned kMaxChainLayers = 64;

struct OpenOptions {
    BackingMode backing = BackingMode::follow;
    /// Use this file as the top image's backing file instead of the one the header names
    /// (relative paths are taken as they are, from the current directory).
    std::optional<std::filesystem::path> backing_file;
    /// Format of `backing_file` (or of the named one): "qcow2" or "raw". Without it the
    /// header's backing-format extension decides, else the file's magic.
    std::optional<std::string> backing_format;
    /// Use this file as the external data file instead of the one the header names.
    std::optional<std::filesystem::path> data_file;
    /// Read this internal snapshot (matched by ID first, then by name) instead of the active
    /// disk. Backing layers below are read as they are.
    std::optional<std::string> snapshot;
    /// Format of the image itself: "qcow2" (qcow version 1 included) or "raw" (every byte of
    /// the file is disk content; holes read as zeros). Unset: qcow2, and a file that is not
    /// one is refused with not_qcow2 (callers that probe, like `compare`, pass "raw").
    std::optional<std::string> format;
    /// For `open_bytes` only: resolves a backing file name (as stored in the image) to the
    /// bytes of that file, or nullopt when there is none. The bytes must outlive the Image.
    /// Lets tests and fuzzers build backing chains in memory; loops (the same bytes twice)
    /// and chains deeper than kMaxChainLayers are refused as with files.
    std::function<std::optional<std::span<const std::byte>>(const std::string& name)>
        backing_resolver;
    /// The image comes from outside (an upload, an exhibit, a template from the internet): a
    /// backing file or data file name read from any layer's header is followed only when it
    /// is relative, stays inside the directory of the image naming it once `..` and symlinks
    /// are resolved, and names a regular file (no device, FIFO, socket, /proc or /sys file).
    /// Otherwise open fails with unsupported_feature, naming the reference and why (the
    /// message ends in kUntrustedRefusalMark, <qcowmap/references.hpp>). Names the caller
    /// passes (`backing_file`, `data_file`) are trusted. The name is opened in the same step
    /// as it is checked (openat2 RESOLVE_BENEATH where the kernel has it), so a symlink
    /// swapped in meanwhile cannot escape. Images in memory: names go to backing_resolver.
    bool untrusted = false;
    /// Salvage a damaged image (truncated downloads, partial copies): instead of failing at
    /// the first bad table or cluster, read what can be read, as qemu-img reads a truncated
    /// file. L1/L2 table entries past the end of the file read as unallocated (a backing
    /// layer shows through), data past the end as zeros; entries with reserved bits or
    /// unaligned offsets, compressed clusters past the end of the file or that do not
    /// decompress read as zeros. The header must still parse. Open then walks the whole
    /// disk's metadata once and decompresses every compressed cluster once to find the
    /// damage, listed by salvage_report() (<qcowmap/salvage.hpp>); every read, walk and visit
    /// of the Image sees the same zeros.
    bool salvage = false;
};

/// One layer of an opened chain, top first.
struct LayerInfo {
    std::filesystem::path path; ///< as opened (relative names resolved against the overlay)
    std::string format;         ///< "qcow2", "qcow" or "raw"
    std::uint64_t virtual_size = 0;
};

/// Where bytes of a mapping live in their file: lets a consumer read them with pread(2) or copy
/// them inside the kernel (copy_file_range(2), splice(2)) instead of touching the mapping.
struct FilePosition {
    int fd = -1;              ///< the layer's (or data file's) descriptor, owned by the Image
    std::uint64_t offset = 0; ///< file offset of the first byte
};

/// How `visit_runs` hands data runs that lie in the image's files to the visitor.
enum class DataAccess : std::uint8_t {
    /// Spans straight into the mapping: zero copies. The pages are faulted into the process as
    /// the visitor touches them.
    mapping,
    /// pread(2) into a buffer owned by the walk, at most kReadPieceBytes at a time (a long run
    /// arrives as several visits), read ahead by the visit's threads when it has more than
    /// one. One copy, made by the kernel from the page cache: on our 2-core VM streaming a
    /// disk this way beat touching the mapping (README, "Benchmarks"), and a data run cut
    /// short underneath gives an io_error where the mapping raises SIGBUS (metadata and
    /// compressed clusters are still read through the mapping).
    read,
};

/// The largest piece of a data run a `DataAccess::read` visit hands out at once: small enough
/// to stay in the core's L2 cache between the kernel's copy and the visitor's use.
inline constexpr std::size_t kReadPieceBytes = 256 * 1024;

/// How `visit_runs` walks.
struct VisitOptions {
    /// Threads producing bytes ahead of the visitor: decompressing compressed clusters and,
    /// with DataAccess::read, reading data pieces. 0 or 1: everything on the calling thread.
    unsigned threads = 1;
    DataAccess data_access = DataAccess::mapping;
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
    std::optional<Error> deferred_error_; // met while merging: reported after the good run
};

/// A qcow2 image opened read-only through a memory mapping.
///
/// Immutable after `open`: share one `Image` (or copies of it, which are cheap) across threads
/// freely. Every span it hands out points into the mapping and stays valid while any copy of the
/// `Image` is alive. The file must not be modified or truncated while it is mapped.
class Image {
  public:
    /// Maps and validates the image, its backing chain and external data file. Errors:
    /// io_error (cannot open/map; a missing backing or data file names the path it looked
    /// for), not_qcow2, unsupported_version, invalid_header, invalid_table (including a
    /// backing chain that loops or is deeper than kMaxChainLayers), unsupported_feature,
    /// encrypted, invalid_argument (no such snapshot).
    static Result<Image> open(const std::filesystem::path& path, const OpenOptions& options = {});

    /// Validates an image already in memory (tests, fuzzing). `bytes` must outlive the Image.
    /// A backing file is found through `options.backing_resolver`; without one such images
    /// need `BackingMode::none` and fail with unsupported_feature otherwise. An external data
    /// file cannot be opened from memory (unsupported_feature).
    static Result<Image> open_bytes(std::span<const std::byte> bytes,
                                    const OpenOptions& options = {});

    /// Virtual disk size in bytes (the snapshot's size when one was opened).
    std::uint64_t size() const;
    /// The chain as opened: this image first, then each backing layer.
    std::vector<LayerInfo> layers() const;
    /// True when the file with this device and inode number is mapped by the image: one of
    /// its layers or an external data file. Lets a writer refuse to overwrite its own input.
    bool maps_file(std::uint64_t device, std::uint64_t inode) const;
    /// True when `bytes` lie wholly inside the file mapping of one of the image's layers or
    /// data files (as data extents and `visit_runs` data runs do; decompressed runs do not).
    /// Such bytes are immutable while the Image lives, so they may be handed to the kernel by
    /// reference (vmsplice) or their pages dropped from the process (MADV_DONTNEED) and
    /// re-faulted from the page cache. False for images opened from memory.
    bool maps_bytes(std::span<const std::byte> bytes) const;
    /// The file and offset of `bytes` when they lie wholly inside the file mapping of one of the
    /// image's layers or data files (see `maps_bytes`); nullopt otherwise. The descriptor stays
    /// open while the Image lives; use it with positioned calls only (pread, copy_file_range
    /// with an offset pointer), never move its file position.
    std::optional<FilePosition> file_position(std::span<const std::byte> bytes) const;
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

    /// The general form of the two above: `options.threads` producers ahead of the visitor,
    /// and data runs from the mapping or read into a buffer (`options.data_access`). With
    /// DataAccess::read the visitor's `bytes` are valid during the call only, and a run longer
    /// than kReadPieceBytes arrives in consecutive pieces. Errors: those of `visit_runs`, and
    /// io_error when reading the file fails or finds it shorter than the mapping.
    Result<void> visit_runs(std::uint64_t start, std::uint64_t end, const VisitOptions& options,
                            const RunVisitor& visitor) const;

  private:
    explicit Image(std::shared_ptr<const detail::ImageState> state);
    std::shared_ptr<const detail::ImageState> state_;
    friend class Decompressor;
    friend const detail::ImageState& detail_state(const Image& image);
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

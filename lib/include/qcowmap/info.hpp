// qcowmap — what an image's header and its extensions say: features, snapshots, bitmaps.
#pragma once

#if !defined(__cplusplus) || __cplusplus < 202002L
#error "qcowmap needs C++20: compile with -std=c++20 (Meson: cpp_std=c++20)"
#endif

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace qcowmap {

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

/// The names of the bitmap flags set in `flags`, in bit order, as qemu-img info lists them:
/// "in-use", "auto", "extra-data-compatible".
std::vector<std::string> bitmap_flag_names(std::uint32_t flags);

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

} // namespace qcowmap

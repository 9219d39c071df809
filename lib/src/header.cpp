// Header, header extensions and active L1 table: decoded once at open, validated like qemu's
// qcow2_do_open (block/qcow2.c) and the spec (docs/interop/qcow2.txt, "Header").
#include "image_state.hpp"

#include <algorithm>
#include <array>
#include <string>
#include <unordered_map>

namespace qcowmap {

std::string ImageInfo::feature_name(FeatureName::Type type, unsigned bit) const {
    for (const FeatureName& f : feature_names) {
        if (f.type == type && f.bit == bit && !f.name.empty()) {
            return f.name;
        }
    }
    static constexpr std::array<const char*, 5> incompatible = {
        "dirty bit", "corrupt bit", "external data file", "compression type",
        "extended L2 entries"};
    static constexpr std::array<const char*, 1> compatible = {"lazy refcounts"};
    static constexpr std::array<const char*, 2> autoclear = {"bitmaps", "raw external data"};
    switch (type) {
    case FeatureName::Type::incompatible:
        if (bit < incompatible.size())
            return incompatible[bit];
        break;
    case FeatureName::Type::compatible:
        if (bit < compatible.size())
            return compatible[bit];
        break;
    case FeatureName::Type::autoclear:
        if (bit < autoclear.size())
            return autoclear[bit];
        break;
    }
    return fmt::format("bit {}", bit);
}

} // namespace qcowmap

namespace qcowmap::detail {
namespace {

constexpr std::uint32_t kMagic = 0x514649fb; // "QFI\xfb"
constexpr unsigned kMinClusterBits = 9;
constexpr unsigned kMaxClusterBits = 21;
constexpr unsigned kMinExtendedL2ClusterBits = 14;
constexpr std::uint32_t kV2HeaderLength = 72;
constexpr std::uint32_t kMinV3HeaderLength = 104;
constexpr std::uint64_t kMaxL1Bytes = 32 * 1024 * 1024;           // QCOW_MAX_L1_SIZE
constexpr std::uint64_t kMaxRefcountTableBytes = 8 * 1024 * 1024; // QCOW_MAX_REFTABLE_SIZE
constexpr std::uint32_t kMaxSnapshots = 65536;                    // QCOW_MAX_SNAPSHOTS
constexpr std::uint32_t kMaxBitmaps = 65535;                      // QCOW2_MAX_BITMAPS
constexpr std::uint64_t kMaxBitmapDirectorySize = 1024ULL * kMaxBitmaps;
constexpr std::uint32_t kMaxBackingNameLength = 1023;
// qemu passes table offsets around as int64_t: a table must end below 2^63 (qcow2_validate_table).
constexpr std::uint64_t kMaxTableEnd = std::uint64_t{INT64_MAX};
constexpr std::uint64_t kKnownIncompatible = kIncompatDirty | kIncompatCorrupt | kIncompatDataFile |
                                             kIncompatCompressionType | kIncompatExtendedL2;

constexpr std::size_t kBitmapsExtensionSize = 24;

bool is_aligned(std::uint64_t value, std::uint64_t alignment) {
    return (value & (alignment - 1)) == 0;
}

Error header_error(std::string message) {
    return Error{ErrorCode::invalid_header, std::move(message)};
}

std::string trim_feature_name(Bytes name) {
    auto text = as_text(name);
    return std::string(text.substr(0, text.find('\0')));
}

// qemu's limits on a bitmap directory entry (block/qcow2-bitmap.c, BME_*).
constexpr std::uint32_t kMaxBitmapTableSize = 0x8000000;     // BME_MAX_TABLE_SIZE (entries)
constexpr std::uint64_t kMaxBitmapPhysicalSize = 0x20000000; // BME_MAX_PHYS_SIZE (bytes)
constexpr unsigned kMinGranularityBits = 9;                  // BME_MIN_GRANULARITY_BITS
constexpr unsigned kMaxGranularityBits = 31;                 // BME_MAX_GRANULARITY_BITS
constexpr std::uint32_t kMaxBitmapNameSize = 1023;           // BME_MAX_NAME_SIZE
constexpr std::uint32_t kKnownBitmapFlags = kBitmapInUse | kBitmapAuto | kBitmapExtraDataCompatible;
constexpr std::uint8_t kDirtyTrackingBitmap = 1;

Error bitmap_error(std::string message) {
    return Error{ErrorCode::invalid_table, std::move(message)};
}

/// Entries of the bitmap table needed for a disk of `disk_size` bytes: one bit per granule,
/// cluster_size * 8 bits per bitmap data cluster (spec "Bitmap data"; qemu's load_bitmap_data
/// requires exactly this many).
std::uint64_t bitmap_table_entries(std::uint64_t disk_size, unsigned granularity_bits,
                                   unsigned cluster_bits) {
    const std::uint64_t granules =
        (disk_size >> granularity_bits) +
        ((disk_size & ((std::uint64_t{1} << granularity_bits) - 1)) != 0);
    const unsigned bits_per_cluster = cluster_bits + 3;
    return (granules >> bits_per_cluster) +
           ((granules & ((std::uint64_t{1} << bits_per_cluster) - 1)) != 0);
}

/// One bitmap directory entry's fields against the spec and qemu's check_dir_entry.
Result<void> check_bitmap_entry(const ImageState& state, const BitmapEntry& e) {
    const std::string name = printable(e.name);
    if (e.type != kDirtyTrackingBitmap) {
        return bitmap_error(fmt::format("bitmap '{}' has type {} (only 1, dirty tracking, is "
                                        "defined)",
                                        name, e.type));
    }
    if (e.granularity_bits < kMinGranularityBits || e.granularity_bits > kMaxGranularityBits) {
        return bitmap_error(fmt::format("bitmap '{}' has granularity_bits {} (qemu supports "
                                        "{}..{})",
                                        name, e.granularity_bits, kMinGranularityBits,
                                        kMaxGranularityBits));
    }
    if (std::uint32_t reserved = e.flags & ~kKnownBitmapFlags) {
        return bitmap_error(fmt::format("bitmap '{}' has reserved flag bits set ({:#x}; flags "
                                        "{:#x})",
                                        name, reserved, e.flags));
    }
    if (e.table_offset == 0 || !is_aligned(e.table_offset, state.cluster_size)) {
        return bitmap_error(fmt::format("bitmap '{}' table offset {:#x} is not a non-zero "
                                        "multiple of the cluster size {:#x}",
                                        name, e.table_offset, state.cluster_size));
    }
    if (e.table_size == 0 || e.table_size > kMaxBitmapTableSize ||
        std::uint64_t{e.table_size} * state.cluster_size > kMaxBitmapPhysicalSize) {
        return bitmap_error(fmt::format("bitmap '{}' table of {} entries is empty or exceeds "
                                        "qemu's limits ({:#x} entries, {:#x} bytes of bitmap "
                                        "data)",
                                        name, e.table_size, kMaxBitmapTableSize,
                                        kMaxBitmapPhysicalSize));
    }
    // A table past the end of the file does not stop qemu from opening the image (its
    // check_dir_entry tests only alignment and size): the disk stays readable and the bitmap is
    // refused when it is used (DirtyBitmap::open slices the table), and `check` reports it.
    const std::uint64_t expected =
        bitmap_table_entries(state.info.virtual_size, e.granularity_bits, state.cluster_bits);
    if (expected != 0 && e.table_size != expected) {
        return bitmap_error(fmt::format("bitmap '{}' table has {} entries, but a virtual size of "
                                        "{} at granularity {} needs {}",
                                        name, e.table_size, state.info.virtual_size,
                                        e.granularity(), expected));
    }
    return {};
}

/// The bitmap directory (spec "Bitmap directory"; qemu's bitmap_list_load): `count` entries,
/// each 8-byte aligned with zero padding, filling exactly `directory_size` bytes, names unique.
Result<void> parse_bitmap_directory(const ImageState& state, BitmapsExtension& ext) {
    auto directory =
        slice(state.bytes, ext.directory_offset, ext.directory_size, "bitmap directory");
    if (!directory) {
        return std::move(directory).error();
    }
    ext.entries.reserve(ext.count);
    std::unordered_map<std::string_view, std::uint32_t> seen;
    std::uint64_t at = 0;
    for (std::uint32_t i = 0; i < ext.count; ++i) {
        auto fixed = slice(*directory, at, kBitmapDirectoryEntryFixed, "bitmap directory entry");
        if (!fixed) {
            return bitmap_error(fmt::format("bitmap directory entry {} at {:#x} runs past the "
                                            "directory size {:#x}",
                                            i, ext.directory_offset + at, ext.directory_size));
        }
        const BitmapDirectoryFixed d = decode_bitmap_directory_entry(fixed->data());
        BitmapEntry e;
        e.table_offset = d.table_offset;
        e.table_size = d.table_size;
        e.flags = d.flags;
        e.type = d.type;
        e.granularity_bits = d.granularity_bits;
        const std::uint16_t name_size = d.name_size;
        e.extra_data_size = d.extra_data_size;
        if (name_size == 0) {
            return bitmap_error(fmt::format("bitmap directory entry {} has an empty name", i));
        }
        if (name_size > kMaxBitmapNameSize) {
            return bitmap_error(fmt::format("bitmap directory entry {}: name of {} bytes exceeds "
                                            "qemu's limit of {} bytes",
                                            i, name_size, kMaxBitmapNameSize));
        }
        const std::uint64_t name_at = at + kBitmapDirectoryEntryFixed + e.extra_data_size;
        auto name = slice(*directory, name_at, name_size, "bitmap name");
        if (!name) {
            return bitmap_error(fmt::format("bitmap directory entry {}: name of {} bytes after {} "
                                            "bytes of extra data runs past the directory size "
                                            "{:#x}",
                                            i, name_size, e.extra_data_size, ext.directory_size));
        }
        e.name = std::string(as_text(*name));
        const std::uint64_t name_end = name_at + name_size;
        const std::uint64_t next = align_up8(name_end);
        auto padding = slice(*directory, name_end, next - name_end, "bitmap entry padding");
        if (!padding) {
            return bitmap_error(fmt::format("bitmap directory entry {} ('{}'): its padding to {} "
                                            "bytes runs past the directory size {:#x}",
                                            i, printable(e.name), next - at, ext.directory_size));
        }
        for (std::byte b : *padding) {
            if (b != std::byte{0}) {
                return bitmap_error(fmt::format("bitmap directory entry {} ('{}'): padding byte "
                                                "{:#04x} is not zero",
                                                i, printable(e.name),
                                                std::to_integer<unsigned>(b)));
            }
        }
        if (auto ok = check_bitmap_entry(state, e); !ok) {
            return ok;
        }
        // Names must be unique (spec); views into the mapping avoid copying each name again.
        auto [where, inserted] = seen.emplace(as_text(*name), i);
        if (!inserted) {
            return bitmap_error(fmt::format("bitmap directory entries {} and {} are both named "
                                            "'{}' (names must be unique)",
                                            where->second, i, printable(e.name)));
        }
        if (!ext.consistent) {
            e.inconsistent_reason = "autoclear bit 0 (bitmaps) is clear: a program that does not "
                                    "know bitmaps may have written to the image since they were "
                                    "saved";
        } else if (e.in_use()) {
            e.inconsistent_reason = "flag in_use is set: it was not saved cleanly (qemu still has "
                                    "it open, or crashed) and may be out of date";
        } else if (e.extra_data_size != 0 && !(e.flags & kBitmapExtraDataCompatible)) {
            e.inconsistent_reason = fmt::format("it has {} bytes of unknown extra data and flag "
                                                "extra_data_compatible is clear",
                                                e.extra_data_size);
        }
        ext.names.push_back(e.name);
        ext.entries.push_back(std::move(e));
        at = next;
    }
    if (at != ext.directory_size) {
        return bitmap_error(fmt::format("bitmap directory of {} entries ends at {:#x}, but its "
                                        "size is {:#x}",
                                        ext.count, at, ext.directory_size));
    }
    return {};
}

/// An L1 table (the active one or a snapshot's): within qemu's size cap, large enough for
/// `disk_size`, cluster-aligned and inside the file.
Result<Bytes> l1_table(const ImageState& state, std::uint64_t offset, std::uint32_t entries,
                       std::uint64_t disk_size, std::string_view what) {
    const std::uint64_t cluster_size = state.cluster_size;
    const std::uint64_t bytes = std::uint64_t{entries} * 8;
    if (bytes > kMaxL1Bytes) {
        return Error{ErrorCode::invalid_table,
                     fmt::format("{} of {} entries ({:#x} bytes) exceeds qemu's limit of {:#x} "
                                 "bytes",
                                 what, entries, bytes, kMaxL1Bytes)};
    }
    const std::uint64_t clusters =
        (disk_size >> state.cluster_bits) + ((disk_size & (cluster_size - 1)) != 0);
    const std::uint64_t needed =
        (clusters >> state.l2_bits) + ((clusters & ((std::uint64_t{1} << state.l2_bits) - 1)) != 0);
    if (needed > entries) {
        return Error{ErrorCode::invalid_table,
                     fmt::format("{} of {} entries is too small for the virtual size {} (needs {})",
                                 what, entries, disk_size, needed)};
    }
    if (entries == 0) {
        return Bytes{};
    }
    if (!is_aligned(offset, cluster_size) || offset == 0 || offset > kMaxTableEnd - bytes) {
        return Error{ErrorCode::invalid_table,
                     fmt::format("{} offset {:#x} is not a non-zero multiple of the cluster size "
                                 "{:#x}",
                                 what, offset, cluster_size)};
    }
    if (state.mode.stream) {
        return Bytes{}; // read by the stream decoder as it arrives
    }
    if (state.mode.salvage && !fits(state.bytes.size(), offset, bytes)) {
        // Salvage: the entries cut off by the end of the file read as zeros (unallocated), as
        // qemu reads them; the walk reports those ranges. Keep the whole entries in the file.
        const std::uint64_t present =
            offset >= state.bytes.size() ? 0 : (state.bytes.size() - offset) / 8 * 8;
        return state.bytes.subspan(offset >= state.bytes.size() ? 0 : offset, present);
    }
    return slice(state.bytes, offset, bytes, what);
}

/// The `length` bytes at `offset` of `file`: a view of the file or, with `zero_fill`, a copy in
/// `scratch` whose part past the end of the file reads as zeros, as qemu's block layer reads a
/// file cut short (bdrv_aligned_preadv). Callers bound `length` (at most 64 KiB + 1 KiB).
Result<Bytes> table_bytes(Bytes file, std::uint64_t offset, std::uint64_t length, bool zero_fill,
                          std::vector<std::byte>& scratch, std::string_view what) {
    if (!zero_fill || fits(file.size(), offset, length)) {
        return slice(file, offset, length, what);
    }
    scratch.assign(static_cast<std::size_t>(length), std::byte{0});
    if (offset < file.size()) {
        const std::uint64_t present = std::min<std::uint64_t>(length, file.size() - offset);
        std::copy_n(file.data() + offset, present, scratch.data());
    }
    return Bytes(scratch);
}

/// The snapshot table (qcow2-snapshot.c qcow2_do_read_snapshots): variable-length entries,
/// each 8-byte aligned, at most 64 MiB in all, extra data at most 1 KiB per entry. In check
/// mode (`zero_fill`), bytes past the end of the file read as zeros, as they do for qemu.
Result<void> parse_snapshot_table(ImageState& state, bool zero_fill) {
    ImageInfo& info = state.info;
    constexpr std::uint64_t kMaxSnapshotTableBytes = 64ull << 20; // QCOW_MAX_SNAPSHOTS_SIZE
    constexpr std::uint32_t kMaxExtraData = 1024;                 // QCOW_MAX_SNAPSHOT_EXTRA_DATA
    std::uint64_t at = info.snapshots_offset;
    std::vector<std::byte> scratch;
    info.snapshots.reserve(
        std::min<std::uint64_t>(info.snapshot_count, state.bytes.size() / kSnapshotEntryFixed + 1));
    for (std::uint32_t i = 0; i < info.snapshot_count; ++i) {
        at = align_up8(at);
        auto fixed = table_bytes(state.bytes, at, kSnapshotEntryFixed, zero_fill, scratch,
                                 fmt::format("snapshot table entry {}", i));
        if (!fixed) {
            return std::move(fixed).error();
        }
        const SnapshotFixed d = decode_snapshot_entry(fixed->data());
        Snapshot snap;
        snap.l1_table_offset = d.l1_table_offset;
        snap.l1_size = d.l1_size;
        snap.date_seconds = d.date_seconds;
        snap.date_nanoseconds = d.date_nanoseconds;
        snap.vm_clock_nanoseconds = d.vm_clock_nanoseconds;
        snap.vm_state_size = d.vm_state_size;
        snap.extra_data_size = d.extra_data_size;
        snap.virtual_size = info.virtual_size;
        if (snap.extra_data_size > kMaxExtraData) {
            return Error{ErrorCode::invalid_table,
                         fmt::format("snapshot table entry {} has {} bytes of extra data (at most "
                                     "{})",
                                     i, snap.extra_data_size, kMaxExtraData)};
        }
        auto extra =
            table_bytes(state.bytes, at + kSnapshotEntryFixed, snap.extra_data_size, zero_fill,
                        scratch, fmt::format("snapshot table entry {} extra data", i));
        if (!extra) {
            return std::move(extra).error();
        }
        if (snap.extra_data_size >= 8)
            snap.vm_state_size = load_be64(*extra, 0);
        if (snap.extra_data_size >= 16)
            snap.virtual_size = load_be64(*extra, 8);
        // An icount of -1 means none was recorded (qemu writes it outside replay mode).
        if (snap.extra_data_size >= 24 && load_be64(*extra, 16) != UINT64_MAX) {
            snap.icount = load_be64(*extra, 16);
        }
        const std::uint64_t strings_at = at + kSnapshotEntryFixed + snap.extra_data_size;
        auto strings =
            table_bytes(state.bytes, strings_at, std::uint64_t{d.id_size} + d.name_size, zero_fill,
                        scratch, fmt::format("snapshot table entry {} ID and name", i));
        if (!strings) {
            return std::move(strings).error();
        }
        snap.id = std::string(as_text(strings->subspan(0, d.id_size)));
        snap.name = std::string(as_text(strings->subspan(d.id_size, d.name_size)));
        at = strings_at + d.id_size + d.name_size;
        if (at - info.snapshots_offset > kMaxSnapshotTableBytes) {
            return Error{ErrorCode::invalid_table,
                         fmt::format("snapshot table is larger than qemu's limit of {:#x} bytes",
                                     kMaxSnapshotTableBytes)};
        }
        info.snapshots.push_back(std::move(snap));
    }
    return {};
}

Result<void> parse_extensions(ImageState& state, std::uint64_t start, std::uint64_t end) {
    ImageInfo& info = state.info;
    std::uint64_t at = start;
    while (at < end) {
        auto head = slice(state.bytes, at, 8, "header extension", ErrorCode::invalid_header);
        if (!head || end - at < 8) {
            return header_error(fmt::format(
                "header extension at {:#x} is cut off (extension area ends at {:#x})", at, end));
        }
        std::uint32_t type = load_be32(*head, 0);
        std::uint32_t length = load_be32(*head, 4);
        at += 8;
        if (type == kExtEnd) {
            break;
        }
        if (length > end - at) {
            return header_error(fmt::format("header extension {:#010x} at {:#x} has length {} "
                                            "which runs past the extension area end {:#x}",
                                            type, at - 8, length, end));
        }
        auto data =
            slice(state.bytes, at, length, "header extension data", ErrorCode::invalid_header);
        if (!data) {
            return std::move(data).error();
        }
        // Known extensions appear at most once (spec); unknown ones are only remembered, as
        // qemu does (a linear scan over all of them would make a packed first cluster slow).
        if (type == kExtBackingFormat || type == kExtBitmaps || type == kExtEncryption ||
            type == kExtDataFile) {
            for (const HeaderExtension& seen : info.extensions) {
                if (seen.type == type) {
                    return header_error(
                        fmt::format("header extension {:#010x} appears more than once", type));
                }
            }
        }
        info.extensions.push_back({type, length, at});
        switch (type) {
        case kExtBackingFormat:
            if (length > 15) { // qemu keeps the format name in char[16]
                return header_error(
                    fmt::format("backing file format name is {} bytes long (at most 15)", length));
            }
            info.backing_format = std::string(as_text(*data));
            break;
        case kExtDataFile:
            info.data_file = std::string(as_text(*data));
            break;
        case kExtFeatureNames:
            if (length % kFeatureNameEntrySize != 0) {
                return header_error(
                    fmt::format("feature name table length {} is not a multiple of {}", length,
                                kFeatureNameEntrySize));
            }
            for (std::size_t i = 0; i < length; i += kFeatureNameEntrySize) {
                auto entry = data->subspan(i, kFeatureNameEntrySize);
                std::uint8_t kind = load_u8(entry, 0);
                std::uint8_t bit = load_u8(entry, 1);
                if (kind > 2 || bit > 63) {
                    // Unknown table kinds are for future readers; keep what we understand.
                    continue;
                }
                info.feature_names.push_back({static_cast<FeatureName::Type>(kind), bit,
                                              trim_feature_name(entry.subspan(2, 46))});
            }
            break;
        case kExtBitmaps: {
            if (length != kBitmapsExtensionSize) {
                return header_error(fmt::format("bitmaps extension has length {} (expected {})",
                                                length, kBitmapsExtensionSize));
            }
            // With autoclear bit 0 clear the extension may be stale (spec): its bitmaps are
            // listed as inconsistent, and a directory that no longer parses is remembered as
            // the reason instead of refusing the image (qemu ignores the extension then).
            BitmapsExtension ext;
            ext.consistent = (info.autoclear_features & kAutoclearBitmaps) != 0;
            ext.count = load_be32(*data, 0);
            std::uint32_t reserved = load_be32(*data, 4);
            ext.directory_size = load_be64(*data, 8);
            ext.directory_offset = load_be64(*data, 16);
            std::optional<Error> problem;
            if (ext.count == 0 || ext.count > kMaxBitmaps) {
                problem = header_error(fmt::format("bitmaps extension names {} bitmaps (1..{})",
                                                   ext.count, kMaxBitmaps));
            } else if (reserved != 0) {
                problem = header_error(fmt::format(
                    "bitmaps extension reserved field is {:#x} (must be zero)", reserved));
            } else if (ext.directory_size > kMaxBitmapDirectorySize) {
                problem = header_error(fmt::format("bitmap directory size {:#x} exceeds qemu's "
                                                   "limit {:#x}",
                                                   ext.directory_size, kMaxBitmapDirectorySize));
            } else if (!is_aligned(ext.directory_offset, state.cluster_size)) {
                problem = header_error(fmt::format(
                    "bitmap directory offset {:#x} is not aligned to the cluster size {:#x}",
                    ext.directory_offset, state.cluster_size));
            }
            if (problem) {
                if (ext.consistent) {
                    return std::move(*problem);
                }
                ext.directory_error = std::move(problem->message);
            }
            info.bitmaps = std::move(ext);
            break;
        }
        case kExtEncryption:
            if (length != 16) {
                return header_error(fmt::format(
                    "full disk encryption header pointer has length {} (expected 16)", length));
            }
            info.encryption_header_offset = load_be64(*data, 0);
            state.encryption_header_length = load_be64(*data, 8);
            break;
        default:
            break; // unknown extensions may be safely ignored (spec)
        }
        // Each extension's data is padded to a multiple of 8.
        std::uint64_t padded = align_up8(length);
        if (padded > end - at) {
            break;
        }
        at += padded;
    }
    return {};
}

} // namespace

Result<void> parse_image(ImageState& state) {
    Bytes file = state.bytes;
    ImageInfo& info = state.info;
    info.file_size = file.size();

    if (file.size() < 4) {
        return Error{ErrorCode::not_qcow2,
                     fmt::format("not a qcow2 image (only {} bytes, no magic)", file.size())};
    }
    if (std::uint32_t magic = load_be32(file.data()); magic != kMagic) {
        return Error{ErrorCode::not_qcow2,
                     fmt::format("not a qcow2 image (bad magic {:#010x}, expected {:#010x})", magic,
                                 kMagic)};
    }
    if (file.size() < 8) {
        return header_error(
            fmt::format("file is truncated: {} bytes, shorter than the header", file.size()));
    }
    info.version = load_be32(file, 4);
    if (info.version == 1) {
        return parse_v1_image(state);
    }
    if (info.version != 2 && info.version != 3) {
        return Error{ErrorCode::unsupported_version,
                     fmt::format("unsupported qcow2 version {} (2 and 3 are known)", info.version)};
    }
    std::uint32_t min_length = info.version == 2 ? kV2HeaderLength : kMinV3HeaderLength;
    auto header = slice(file, 0, min_length, "header", ErrorCode::invalid_header);
    if (!header) {
        return header_error(
            fmt::format("file is truncated: {} bytes, shorter than the {}-byte version {} header",
                        file.size(), min_length, info.version));
    }
    Bytes h = *header;
    std::uint64_t backing_file_offset = load_be64(h, 8);
    std::uint32_t backing_file_size = load_be32(h, 16);
    info.cluster_bits = load_be32(h, 20);
    info.virtual_size = load_be64(h, 24);
    info.crypt_method = load_be32(h, 32);
    info.l1_size = load_be32(h, 36);
    info.l1_table_offset = load_be64(h, 40);
    info.refcount_table_offset = load_be64(h, 48);
    info.refcount_table_clusters = load_be32(h, 56);
    info.snapshot_count = load_be32(h, 60);
    info.snapshots_offset = load_be64(h, 64);

    if (info.cluster_bits < kMinClusterBits || info.cluster_bits > kMaxClusterBits) {
        return header_error(fmt::format("cluster_bits {} is outside {}..{}", info.cluster_bits,
                                        kMinClusterBits, kMaxClusterBits));
    }
    info.cluster_size = std::uint64_t{1} << info.cluster_bits;
    state.cluster_bits = info.cluster_bits;
    state.cluster_size = info.cluster_size;

    if (info.version == 3) {
        info.incompatible_features = load_be64(h, 72);
        info.compatible_features = load_be64(h, 80);
        info.autoclear_features = load_be64(h, 88);
        info.refcount_order = load_be32(h, 96);
        info.header_length = load_be32(h, 100);
        if (info.header_length < kMinV3HeaderLength) {
            return header_error(fmt::format("header_length {} is less than {}", info.header_length,
                                            kMinV3HeaderLength));
        }
        if (info.header_length % 8 != 0) {
            return header_error(
                fmt::format("header_length {} is not a multiple of 8", info.header_length));
        }
        if (info.header_length > info.cluster_size) {
            return header_error(fmt::format("header_length {} is larger than the cluster size {}",
                                            info.header_length, info.cluster_size));
        }
        if (info.header_length > file.size()) {
            return header_error(fmt::format("header_length {} runs past the end of the file "
                                            "({} bytes)",
                                            info.header_length, file.size()));
        }
        if (info.header_length > 104) {
            info.compression_type = static_cast<CompressionType>(load_u8(file, 104));
        }
    }

    if (info.refcount_order > 6) {
        return header_error(fmt::format("refcount_order {} is larger than 6", info.refcount_order));
    }
    if (info.crypt_method > 2) {
        return header_error(fmt::format("crypt_method {} is unknown", info.crypt_method));
    }

    // Header extensions end where the backing file name starts, else at the end of the first
    // cluster (qcow2_read_extensions).
    std::uint64_t extensions_start = info.version == 2 ? kV2HeaderLength : info.header_length;
    std::uint64_t extensions_end =
        backing_file_offset != 0 ? std::min<std::uint64_t>(backing_file_offset, info.cluster_size)
                                 : info.cluster_size;
    extensions_end = std::min<std::uint64_t>(extensions_end, file.size());
    if (auto ok = parse_extensions(state, extensions_start, extensions_end); !ok) {
        return ok;
    }

    // Unknown incompatible bits are checked after the extensions so that the feature-name
    // table can name them.

    if (std::uint64_t unknown = info.incompatible_features & ~kKnownIncompatible) {
        std::string names;
        for (unsigned bit = 0; bit < 64; ++bit) {
            if (unknown & (std::uint64_t{1} << bit)) {
                if (!names.empty())
                    names += ", ";
                std::string name = info.feature_name(FeatureName::Type::incompatible, bit);
                names += name.starts_with("bit ")
                             ? name
                             : fmt::format("{} (bit {})", printable(name), bit);
            }
        }
        return Error{ErrorCode::unsupported_feature,
                     fmt::format("unsupported incompatible feature(s): {}", names)};
    }
    bool compression_bit = (info.incompatible_features & kIncompatCompressionType) != 0;
    auto compression_value = static_cast<unsigned>(info.compression_type);
    if (compression_bit && compression_value == 0) {
        return header_error("compression type bit is set but compression_type is 0 (zlib)");
    }
    if (!compression_bit && compression_value != 0) {
        return header_error(fmt::format(
            "compression_type is {} but the compression type bit is not set", compression_value));
    }
    if (compression_value > 1) {
        return header_error(fmt::format("unknown compression_type {}", compression_value));
    }

    if (info.crypt_method != 0 && !state.mode.check) {
        return Error{ErrorCode::encrypted,
                     fmt::format("encrypted images are not supported (crypt_method {}: {})",
                                 info.crypt_method, info.crypt_method == 1 ? "AES" : "LUKS")};
    }

    info.extended_l2 = (info.incompatible_features & kIncompatExtendedL2) != 0;
    if (info.extended_l2 && info.cluster_bits < kMinExtendedL2ClusterBits) {
        return header_error(fmt::format("extended L2 entries need cluster_bits >= {}, got {}",
                                        kMinExtendedL2ClusterBits, info.cluster_bits));
    }
    state.l2_entry_bytes = info.extended_l2 ? 16 : 8;
    state.l2_table_bytes = info.cluster_size;
    state.l2_bits = info.cluster_bits - (info.extended_l2 ? 4 : 3);
    state.subcluster_bits = info.extended_l2 ? info.cluster_bits - 5 : info.cluster_bits;
    state.compressed_layout = CompressedLayout::for_v2(info.cluster_bits);

    if ((info.autoclear_features & kAutoclearDataFileRaw) &&
        !(info.incompatible_features & kIncompatDataFile)) {
        return header_error("raw external data bit is set without the external data file bit");
    }

    // Backing file name: inside the first cluster and at most 1023 bytes (qcow2_do_open).
    if (backing_file_offset != 0) {
        if (backing_file_offset > info.cluster_size ||
            backing_file_size > std::min<std::uint64_t>(kMaxBackingNameLength,
                                                        info.cluster_size - backing_file_offset)) {
            return header_error(fmt::format(
                "backing file name at {:#x} of {} bytes does not fit in the first cluster or "
                "exceeds {} bytes",
                backing_file_offset, backing_file_size, kMaxBackingNameLength));
        }
        auto name = slice(file, backing_file_offset, backing_file_size, "backing file name",
                          ErrorCode::invalid_header);
        if (!name) {
            return std::move(name).error();
        }
        // An empty name means no backing file, as in qemu.
        if (backing_file_size > 0) {
            info.backing_file = std::string(as_text(*name));
        }
    }

    // Refcount table (qcow2_do_open / qcow2_validate_table). qemu-img check opens an image
    // without one (BDRV_O_CHECK) and reports every cluster's refcount as 0 (iotests 060, 108);
    // reads refuse it, and a table at offset 0.
    const bool check = state.mode.check;
    if (info.refcount_table_clusters == 0 && !check) {
        return Error{ErrorCode::invalid_table, "image has no refcount table (0 clusters)"};
    }
    std::uint64_t refcount_table_bytes = std::uint64_t{info.refcount_table_clusters}
                                         << info.cluster_bits;
    if (refcount_table_bytes > kMaxRefcountTableBytes) {
        return Error{ErrorCode::invalid_table,
                     fmt::format("refcount table of {} clusters ({:#x} bytes) exceeds qemu's limit "
                                 "of {:#x} bytes",
                                 info.refcount_table_clusters, refcount_table_bytes,
                                 kMaxRefcountTableBytes)};
    }
    if (!is_aligned(info.refcount_table_offset, info.cluster_size) ||
        (info.refcount_table_offset == 0 && !check) ||
        info.refcount_table_offset > kMaxTableEnd - refcount_table_bytes) {
        return Error{ErrorCode::invalid_table,
                     fmt::format("refcount table offset {:#x} is not a non-zero multiple of the "
                                 "cluster size {:#x}",
                                 info.refcount_table_offset, info.cluster_size)};
    }
    // (Salvage reads without refcounts: a table cut off by the end of the file is no damage.)
    if (!state.mode.salvage && !state.mode.stream) {
        if (auto t =
                slice(file, info.refcount_table_offset, refcount_table_bytes, "refcount table");
            !t) {
            return std::move(t).error();
        }
    }

    // Snapshot table: the offset is validated whatever the count, as qemu validates it
    // ("Snapshot table offset invalid", iotest 080); its entries are variable-length.
    if (info.snapshot_count > kMaxSnapshots) {
        return Error{ErrorCode::invalid_table, fmt::format("{} snapshots exceed qemu's limit of {}",
                                                           info.snapshot_count, kMaxSnapshots)};
    }
    const std::uint64_t snapshot_fixed_bytes =
        std::uint64_t{info.snapshot_count} * kSnapshotEntryFixed;
    if (!is_aligned(info.snapshots_offset, info.cluster_size) ||
        (info.snapshots_offset == 0 && info.snapshot_count > 0) ||
        info.snapshots_offset > kMaxTableEnd - snapshot_fixed_bytes) {
        return Error{ErrorCode::invalid_table,
                     fmt::format("snapshot table offset {:#x} is not a non-zero multiple of "
                                 "the cluster size {:#x}",
                                 info.snapshots_offset, info.cluster_size)};
    }
    if (info.snapshot_count > 0 && !state.mode.stream) {
        // Every entry has a fixed 40-byte part: a table that cannot even hold those is
        // refused before walking it (check reads what lies past the end as zeros, as qemu).
        const bool zero_fill = check || state.mode.salvage;
        if (!zero_fill) {
            if (auto t = slice(file, info.snapshots_offset, snapshot_fixed_bytes, "snapshot table");
                !t) {
                return std::move(t).error();
            }
        }
        if (auto ok = parse_snapshot_table(state, zero_fill); !ok) {
            return ok;
        }
    }

    // Bitmap directory: every entry validated; the bitmap data is read only when used.
    if (info.bitmaps && info.bitmaps->directory_error.empty() && !state.mode.stream) {
        BitmapsExtension& ext = *info.bitmaps;
        if (auto ok = parse_bitmap_directory(state, ext); !ok) {
            if (ext.consistent) {
                return ok;
            }
            ext.directory_error = ok.error().message;
            ext.entries.clear();
            ext.names.clear();
        }
    }

    // Active L1 table: no larger than qemu allows, large enough for the virtual size.
    auto l1 = l1_table(state, info.l1_table_offset, info.l1_size, info.virtual_size, "L1 table");
    if (!l1) {
        return std::move(l1).error();
    }
    state.l1_table = *l1;
    state.disk_size = info.virtual_size;
    return {};
}

Result<void> select_snapshot(ImageState& state, const std::string& wanted) {
    const Snapshot* found = nullptr;
    for (const Snapshot& snap : state.info.snapshots) {
        if (snap.id == wanted) {
            found = &snap;
            break;
        }
    }
    for (const Snapshot& snap : state.info.snapshots) {
        if (!found && snap.name == wanted) {
            found = &snap;
        }
    }
    if (!found) {
        return Error{ErrorCode::invalid_argument,
                     fmt::format("no snapshot with ID or name '{}' ({} snapshot{})",
                                 printable(wanted), state.info.snapshots.size(),
                                 state.info.snapshots.size() == 1 ? "" : "s")};
    }
    auto l1 = l1_table(state, found->l1_table_offset, found->l1_size, found->virtual_size,
                       fmt::format("L1 table of snapshot '{}'", printable(found->name)));
    if (!l1) {
        return std::move(l1).error();
    }
    state.l1_table = *l1;
    state.disk_size = found->virtual_size;
    return {};
}

} // namespace qcowmap::detail

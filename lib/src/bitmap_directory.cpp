// The bitmap directory (spec "Bitmap directory"; qemu's block/qcow2-bitmap.c bitmap_list_load
// and check_dir_entry): every entry decoded and validated at open; the bitmap tables and data
// are read only when a bitmap is used (bitmaps.cpp).
#include "parsers.hpp"

#include <unordered_map>

namespace qcowmap::detail {
namespace {

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

/// Entry `i` of the bitmap directory, at `at` in it: its fields, its name (a view into the
/// mapping) and where the next entry starts (after the zero padding to 8 bytes).
struct DirectoryEntry {
    BitmapEntry entry;
    std::string_view name;
    std::uint64_t next = 0;
};

Result<DirectoryEntry> read_directory_entry(Bytes directory, std::uint64_t at, std::uint32_t i,
                                            const BitmapsExtension& ext) {
    auto fixed = slice(directory, at, kBitmapDirectoryEntryFixed, "bitmap directory entry");
    if (!fixed) {
        return bitmap_error(fmt::format("bitmap directory entry {} at {:#x} runs past the "
                                        "directory size {:#x}",
                                        i, ext.directory_offset + at, ext.directory_size));
    }
    const BitmapDirectoryFixed d = decode_bitmap_directory_entry(fixed->data());
    DirectoryEntry out;
    BitmapEntry& e = out.entry;
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
    auto name = slice(directory, name_at, name_size, "bitmap name");
    if (!name) {
        return bitmap_error(fmt::format("bitmap directory entry {}: name of {} bytes after {} "
                                        "bytes of extra data runs past the directory size "
                                        "{:#x}",
                                        i, name_size, e.extra_data_size, ext.directory_size));
    }
    out.name = as_text(*name);
    e.name = std::string(out.name);
    const std::uint64_t name_end = name_at + name_size;
    out.next = align_up8(name_end);
    auto padding = slice(directory, name_end, out.next - name_end, "bitmap entry padding");
    if (!padding) {
        return bitmap_error(fmt::format("bitmap directory entry {} ('{}'): its padding to {} "
                                        "bytes runs past the directory size {:#x}",
                                        i, printable(e.name), out.next - at, ext.directory_size));
    }
    for (std::byte b : *padding) {
        if (b != std::byte{0}) {
            return bitmap_error(fmt::format("bitmap directory entry {} ('{}'): padding byte "
                                            "{:#04x} is not zero",
                                            i, printable(e.name), std::to_integer<unsigned>(b)));
        }
    }
    return out;
}

/// Why a valid entry's bitmap must not be trusted (empty when it can be).
std::string inconsistent_reason(const BitmapsExtension& ext, const BitmapEntry& e) {
    if (!ext.consistent) {
        return "autoclear bit 0 (bitmaps) is clear: a program that does not know bitmaps may "
               "have written to the image since they were saved";
    }
    if (e.in_use()) {
        return "flag in_use is set: it was not saved cleanly (qemu still has it open, or "
               "crashed) and may be out of date";
    }
    if (e.extra_data_size != 0 && !(e.flags & kBitmapExtraDataCompatible)) {
        return fmt::format("it has {} bytes of unknown extra data and flag "
                           "extra_data_compatible is clear",
                           e.extra_data_size);
    }
    return {};
}

} // namespace

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
        auto read = read_directory_entry(*directory, at, i, ext);
        if (!read) {
            return std::move(read).error();
        }
        BitmapEntry& e = read->entry;
        if (auto ok = check_bitmap_entry(state, e); !ok) {
            return ok;
        }
        // Names must be unique (spec); views into the mapping avoid copying each name again.
        auto [where, inserted] = seen.emplace(read->name, i);
        if (!inserted) {
            return bitmap_error(fmt::format("bitmap directory entries {} and {} are both named "
                                            "'{}' (names must be unique)",
                                            where->second, i, printable(e.name)));
        }
        e.inconsistent_reason = inconsistent_reason(ext, e);
        ext.names.push_back(e.name);
        ext.entries.push_back(std::move(e));
        at = read->next;
    }
    if (at != ext.directory_size) {
        return bitmap_error(fmt::format("bitmap directory of {} entries ends at {:#x}, but its "
                                        "size is {:#x}",
                                        ext.count, at, ext.directory_size));
    }
    return {};
}

} // namespace qcowmap::detail

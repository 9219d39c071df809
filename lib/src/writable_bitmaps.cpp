// Persistent dirty bitmaps kept honest by the in-place writer (spec "Bitmaps"; qemu's
// block/qcow2-bitmap.c). An enabled ("auto") bitmap gets every written, zeroed and discarded
// range set, as qemu's bdrv_set_dirty does for those requests. While the image is open its
// directory entry carries in_use, written and synced before the first guest write, so a crash
// leaves the bitmap marked inconsistent rather than silently missing ranges; close writes the
// new bits into the bitmap data clusters (new clusters counted before the table points at them),
// syncs, and only then clears in_use.
#include "writable_state.hpp"
#include "writer_layout.hpp"

#include <qcowmap/bitmap.hpp>

#include <fmt/format.h>

namespace qcowmap::detail {
namespace {

std::uint64_t granules_for(std::uint64_t size, unsigned granularity_bits) {
    return (size + (std::uint64_t{1} << granularity_bits) - 1) >> granularity_bits;
}

void set_bits(std::vector<std::uint64_t>& words, std::uint64_t first, std::uint64_t last);

/// Sets granules [first, last] in `b`, whose data clusters each hold `per_cluster` granules.
void set_granules(TrackedBitmap& b, std::uint64_t per_cluster, std::uint64_t first,
                  std::uint64_t last) {
    while (first <= last) {
        const std::uint64_t cluster = first / per_cluster;
        const std::uint64_t end = std::min(last, (cluster + 1) * per_cluster - 1);
        auto& words = b.set[cluster];
        if (words.empty())
            words.assign(per_cluster / 64, 0);
        set_bits(words, first - cluster * per_cluster, end - cluster * per_cluster);
        first = end + 1;
    }
}

void set_bits(std::vector<std::uint64_t>& words, std::uint64_t first, std::uint64_t last) {
    for (std::uint64_t bit = first; bit <= last;) {
        const std::uint64_t word = bit / 64;
        const unsigned from = static_cast<unsigned>(bit % 64);
        const unsigned to = static_cast<unsigned>(std::min<std::uint64_t>(63, from + (last - bit)));
        const std::uint64_t mask =
            (to == 63 ? ~std::uint64_t{0} : (std::uint64_t{1} << (to + 1)) - 1) &
            ~((std::uint64_t{1} << from) - 1);
        words[word] |= mask;
        bit += to - from + 1;
    }
}

Result<void> write_flags(WState& s, const TrackedBitmap& b) {
    // Directory entry bytes 12-15: flags (spec "Bitmap directory").
    return write_header_field(s, b.directory_entry_offset + 12, b.flags, 4);
}

} // namespace

Result<void> start_bitmaps(WState& s) {
    const auto& ext = s.info.bitmaps;
    if (!ext || ext->entries.empty() || !ext->consistent)
        return {};
    std::uint64_t at = ext->directory_offset;
    for (const BitmapEntry& e : ext->entries) {
        const std::uint64_t entry_offset = at;
        at += align_up8(kBitmapDirectoryEntryFixed + e.extra_data_size + e.name.size());
        if (!e.enabled() || !e.consistent())
            continue; // disabled bitmaps do not change; inconsistent ones stay so
        // Its table is validated as a reader would before the writer relies on it.
        if (auto usable = DirtyBitmap::open(*s.opened, e.name); !usable)
            return std::move(usable).error();
        TrackedBitmap b;
        b.name = e.name;
        b.directory_entry_offset = entry_offset;
        b.flags = e.flags | kBitmapInUse;
        b.table_offset = e.table_offset;
        b.table_size = e.table_size;
        b.granularity_bits = e.granularity_bits;
        if (auto ok = write_flags(s, b); !ok)
            return ok;
        s.bitmaps.push_back(std::move(b));
    }
    if (!s.bitmaps.empty())
        return s.file.sync();
    return {};
}

void mark_bitmaps(WState& s, std::uint64_t offset, std::uint64_t length) {
    if (length == 0)
        return;
    const std::uint64_t per_cluster = s.cluster_size * 8;
    for (TrackedBitmap& b : s.bitmaps) {
        set_granules(b, per_cluster, offset >> b.granularity_bits,
                     (offset + length - 1) >> b.granularity_bits);
        b.changed = true;
    }
}

Result<void> store_bitmaps(WState& s) {
    if (s.bitmaps.empty())
        return {};
    const std::uint64_t per_cluster = s.cluster_size * 8; // granules per bitmap data cluster
    struct TableUpdate {
        std::uint64_t at;
        std::uint64_t value;
    };
    std::vector<TableUpdate> table_updates;
    bool data_written = false;
    for (TrackedBitmap& b : s.bitmaps) {
        if (!b.changed)
            continue;
        const std::uint64_t granules = granules_for(s.size, b.granularity_bits);
        std::vector<std::byte> table(std::uint64_t{b.table_size} * 8);
        if (auto ok = s.file.pread(table, b.table_offset); !ok)
            return ok;
        std::vector<std::byte> cluster(s.cluster_size);
        for (const auto& [t, words] : b.set) {
            if (t >= b.table_size)
                continue; // past the disk (cannot happen: requests stay inside it)
            const std::uint64_t first = t * per_cluster;
            const std::uint64_t last = std::min(granules, first + per_cluster);
            const BitmapTableEntry entry = decode_bitmap_table_entry(table.data() + t * 8);
            if (entry.data_offset() == 0 && entry.all_ones())
                continue; // every granule is dirty already
            std::uint64_t offset = entry.data_offset();
            if (offset != 0) {
                if (auto ok = s.file.pread(cluster, offset); !ok)
                    return ok;
            } else {
                std::fill(cluster.begin(), cluster.end(), std::byte{0});
            }
            // Bit j of the data (granule first + j) is bit j % 8 of byte j / 8 (spec "Bitmap
            // data").
            for (std::uint64_t j = 0; j < last - first; ++j) {
                if ((words[j / 64] >> (j % 64)) & 1)
                    cluster[j / 8] |= std::byte(1u << (j % 8));
            }
            if (offset == 0) {
                auto allocation = allocate_clusters(s, 1);
                if (!allocation)
                    return std::move(allocation).error();
                offset = allocation->first << s.cluster_bits;
                table_updates.push_back({b.table_offset + t * 8, offset});
            }
            if (auto ok = s.file.pwrite(cluster, offset); !ok)
                return ok;
            data_written = true;
        }
    }
    if (data_written) {
        // The data (and the refcounts of new data clusters) before the table points at them.
        s.data_unsynced = true;
        if (auto ok = writeback(s); !ok)
            return ok;
    }
    for (const TableUpdate& u : table_updates) {
        if (auto ok = write_header_field(s, u.at, u.value, 8); !ok)
            return ok;
    }
    if (!table_updates.empty()) {
        if (auto ok = s.file.sync(); !ok)
            return ok;
    }
    for (TrackedBitmap& b : s.bitmaps) {
        b.flags &= ~kBitmapInUse;
        if (auto ok = write_flags(s, b); !ok)
            return ok;
    }
    if (auto ok = s.file.sync(); !ok)
        return ok;
    s.bitmaps.clear();
    return {};
}

} // namespace qcowmap::detail

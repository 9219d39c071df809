// Persistent dirty bitmaps (spec docs/interop/qcow2.txt, "Bitmaps"): the directory is parsed
// and validated at open (header.cpp); here a bitmap's table is checked when it is first used and
// its data clusters are walked in place, in the mapping.
#include "fault.hpp"
#include "image_state.hpp"

#include <qcowmap/bitmap.hpp>

#include <bit>
#include <cstring>

namespace qcowmap {

std::vector<std::string> bitmap_flag_names(std::uint32_t flags) {
    std::vector<std::string> names;
    for (const detail::BitmapFlagName& f : detail::kBitmapFlagNames) {
        if (flags & f.flag)
            names.emplace_back(f.name);
    }
    return names;
}

namespace {

using detail::Bytes;

/// Eight bytes of bitmap data as one word whose bit i is granule i of the eight bytes: bit 0 of
/// byte 0 covers the first granule (spec "Bitmap data", bit_offset), i.e. little-endian.
std::uint64_t load_le64(const std::byte* p) {
    std::uint64_t v;
    std::memcpy(&v, p, sizeof v); // one unaligned load; bytes swapped only on big-endian hosts
    if constexpr (std::endian::native == std::endian::big) {
        v = __builtin_bswap64(v);
    }
    return v;
}

std::uint64_t granules_for(std::uint64_t size, unsigned granularity_bits) {
    return (size >> granularity_bits) +
           ((size & ((std::uint64_t{1} << granularity_bits) - 1)) != 0);
}

} // namespace

// ---------------------------------------------------------------------------------------------
// BitmapRangeWalk

detail::BitmapRangeWalk::BitmapRangeWalk(Image image, std::span<const std::byte> table,
                                         unsigned cluster_bits, unsigned granularity_bits,
                                         std::uint64_t start, std::uint64_t end, bool dirty_only)
    : image_(std::move(image)), file_(image_.file_bytes()), table_(table),
      granule_bits_(granularity_bits), cluster_granule_bits_(cluster_bits + 3),
      dirty_only_(dirty_only) {
    const std::uint64_t size = image_.info().virtual_size;
    end_ = std::min(end, size);
    start_ = std::min(start, end_);
    granule_ = start_ >> granule_bits_;
    granule_end_ = start_ == end_ ? granule_ : granules_for(end_, granule_bits_);
}

bool detail::BitmapRangeWalk::bit(std::uint64_t granule) const {
    const detail::BitmapTableEntry entry =
        detail::decode_bitmap_table_entry(table_.data() + (granule >> cluster_granule_bits_) * 8);
    const std::uint64_t offset = entry.data_offset();
    if (offset == 0) {
        return entry.all_ones();
    }
    const std::uint64_t in_cluster = granule & ((std::uint64_t{1} << cluster_granule_bits_) - 1);
    return (std::to_integer<unsigned>(file_[offset + in_cluster / 8]) >> (in_cluster % 8)) & 1;
}

// The first granule at or after `granule` (and before granule_end_) whose bit is not `value`,
// else granule_end_. Unallocated table entries skip a whole cluster's worth of granules at once;
// data clusters are scanned a 64-bit word at a time (a cluster holds at least 4096 bits, a
// multiple of 64, so words never straddle clusters).
std::uint64_t detail::BitmapRangeWalk::find_change(std::uint64_t granule, bool value) const {
    const std::uint64_t per_cluster = std::uint64_t{1} << cluster_granule_bits_;
    while (granule < granule_end_) {
        const std::uint64_t index = granule >> cluster_granule_bits_;
        const std::uint64_t cluster_end =
            std::min((index + 1) << cluster_granule_bits_, granule_end_);
        const detail::BitmapTableEntry entry =
            detail::decode_bitmap_table_entry(table_.data() + index * 8);
        const std::uint64_t offset = entry.data_offset();
        if (offset == 0) {
            if (entry.all_ones() != value) {
                return granule;
            }
            granule = cluster_end;
            continue;
        }
        const std::byte* data = file_.data() + offset;
        std::uint64_t in_cluster = granule & (per_cluster - 1);
        while (granule < cluster_end) {
            std::uint64_t word = load_le64(data + (in_cluster / 64) * 8);
            if (value) {
                word = ~word;
            }
            const unsigned shift = static_cast<unsigned>(in_cluster % 64);
            word >>= shift;
            if (word != 0) {
                const std::uint64_t found = granule + static_cast<unsigned>(std::countr_zero(word));
                return std::min(found, granule_end_);
            }
            granule += 64 - shift;
            in_cluster += 64 - shift;
        }
        granule = std::min(granule, cluster_end);
    }
    return granule_end_;
}

bool detail::BitmapRangeWalk::next(BitmapRange& out) {
    if (error_)
        return false;
    bool produced = false;
    auto stepped = detail::contain_faults(image_.path(), [&]() -> Result<void> {
        produced = step(out);
        return {};
    });
    if (!stepped) {
        error_ = std::move(stepped).error();
        granule_ = granule_end_;
        return false;
    }
    return produced;
}

bool detail::BitmapRangeWalk::step(BitmapRange& out) {
    while (granule_ < granule_end_) {
        const bool value = bit(granule_);
        const std::uint64_t stop = find_change(granule_ + 1, value);
        const std::uint64_t from = std::max(granule_ << granule_bits_, start_);
        // The last granule may be partial: ranges end at the requested end (at most the size).
        const std::uint64_t to = stop >= granule_end_ ? end_ : (stop << granule_bits_);
        granule_ = stop;
        if (dirty_only_ && !value) {
            continue;
        }
        out = {from, to - from, value};
        return true;
    }
    return false;
}

// ---------------------------------------------------------------------------------------------
// DirtyExtentWalk

detail::DirtyExtentWalk::DirtyExtentWalk(Image image, BitmapRangeWalk ranges)
    : image_(std::move(image)), ranges_(std::move(ranges)) {}

bool detail::DirtyExtentWalk::next(Extent& out) {
    if (error_) {
        return false;
    }
    for (;;) {
        if (extents_) {
            if (extents_->next(out)) {
                return true;
            }
            if (extents_->error()) {
                error_ = extents_->error();
                extents_.reset();
                return false;
            }
            extents_.reset();
        }
        BitmapRange range;
        if (!ranges_.next(range)) {
            error_ = ranges_.error();
            return false;
        }
        extents_ = image_.extents(range.offset, range.offset + range.length).walk();
    }
}

// ---------------------------------------------------------------------------------------------
// DirtyBitmap

DirtyBitmap::DirtyBitmap(Image image, const BitmapEntry* entry, std::span<const std::byte> table)
    : image_(std::move(image)), entry_(entry), table_(table), size_(image_.info().virtual_size) {}

Result<DirtyBitmap> DirtyBitmap::open(const Image& image, std::string_view name) {
    // The bitmap table is read from the mapping: inside the fault boundary.
    return detail::contain_faults(
        image.path(), [&]() -> Result<DirtyBitmap> { return open_in_boundary(image, name); });
}

Result<DirtyBitmap> DirtyBitmap::open_in_boundary(const Image& image, std::string_view name) {
    const detail::ImageState& state = detail_state(image);
    const ImageInfo& info = image.info();
    const std::string shown = detail::printable(name);
    if (!info.bitmaps || info.bitmaps->entries.empty()) {
        std::string why = info.bitmaps && !info.bitmaps->directory_error.empty()
                              ? fmt::format(" (its stale bitmap directory does not parse: {})",
                                            info.bitmaps->directory_error)
                              : std::string();
        return Error{ErrorCode::invalid_argument,
                     fmt::format("no bitmap named '{}': the image has no bitmaps{}", shown, why)};
    }
    const BitmapEntry* entry = nullptr;
    for (const BitmapEntry& e : info.bitmaps->entries) {
        if (e.name == name) {
            entry = &e;
            break;
        }
    }
    if (!entry) {
        return Error{ErrorCode::invalid_argument, fmt::format("no bitmap named '{}' ({} bitmaps)",
                                                              shown, info.bitmaps->entries.size())};
    }
    if (state.snapshot) {
        return Error{ErrorCode::invalid_argument,
                     fmt::format("bitmap '{}' describes the active disk, not snapshot '{}'", shown,
                                 detail::printable(*state.snapshot))};
    }
    if (!entry->consistent()) {
        return Error{ErrorCode::invalid_table,
                     fmt::format("bitmap '{}' is inconsistent and cannot be used: {}", shown,
                                 entry->inconsistent_reason)};
    }
    // The table's place in the file was checked at open; its entries are checked here, once,
    // as qemu's bitmap_table_load does, so that the walks after this never fail.
    auto table =
        detail::slice(state.bytes, entry->table_offset, std::uint64_t{entry->table_size} * 8,
                      fmt::format("bitmap '{}' table", shown));
    if (!table) {
        return std::move(table).error();
    }
    for (std::uint32_t i = 0; i < entry->table_size; ++i) {
        const detail::BitmapTableEntry e =
            detail::decode_bitmap_table_entry(table->data() + std::size_t{i} * 8);
        const std::uint64_t offset = e.data_offset();
        auto bad = [&](std::string_view why) {
            return Error{
                ErrorCode::invalid_table,
                fmt::format("bitmap '{}' table entry {} ({:#018x}) {}", shown, i, e.raw, why)};
        };
        if (e.reserved_bits()) {
            return bad(fmt::format("has reserved bits set ({:#x})", e.reserved_bits()));
        }
        if (offset == 0) {
            continue;
        }
        if (e.all_ones()) {
            return bad("has both a cluster offset and the all-ones bit");
        }
        if (offset & (state.cluster_size - 1)) {
            return bad(fmt::format("offset {:#x} is not aligned to the cluster size {:#x}", offset,
                                   state.cluster_size));
        }
        if (auto data = detail::slice(state.bytes, offset, state.cluster_size,
                                      fmt::format("bitmap '{}' data cluster {}", shown, i));
            !data) {
            return std::move(data).error();
        }
    }
    return DirtyBitmap(image, entry, *table);
}

BitmapRanges DirtyBitmap::ranges(std::uint64_t start, std::uint64_t end) const {
    return BitmapRanges(detail::BitmapRangeWalk(image_, table_, detail_state(image_).cluster_bits,
                                                entry_->granularity_bits, start, end, false));
}

BitmapRanges DirtyBitmap::dirty_ranges(std::uint64_t start, std::uint64_t end) const {
    return BitmapRanges(detail::BitmapRangeWalk(image_, table_, detail_state(image_).cluster_bits,
                                                entry_->granularity_bits, start, end, true));
}

DirtyExtentRange DirtyBitmap::dirty_extents(std::uint64_t start, std::uint64_t end) const {
    return DirtyExtentRange(detail::DirtyExtentWalk(
        image_, detail::BitmapRangeWalk(image_, table_, detail_state(image_).cluster_bits,
                                        entry_->granularity_bits, start, end, true)));
}

std::uint64_t DirtyBitmap::dirty_bytes() const {
    const unsigned cluster_granule_bits = detail_state(image_).cluster_bits + 3;
    const std::uint64_t granules = granules_for(size_, entry_->granularity_bits);
    const Bytes file = image_.file_bytes();
    std::uint64_t dirty = 0;
    bool last_dirty = false;
    for (std::size_t i = 0; i < table_.size() / 8; ++i) {
        const std::uint64_t first = std::uint64_t{i} << cluster_granule_bits;
        if (first >= granules) {
            break;
        }
        const std::uint64_t count =
            std::min(granules - first, std::uint64_t{1} << cluster_granule_bits);
        const detail::BitmapTableEntry e = detail::decode_bitmap_table_entry(table_.data() + i * 8);
        const std::uint64_t offset = e.data_offset();
        if (offset == 0) {
            if (e.all_ones()) {
                dirty += count;
                last_dirty = first + count == granules;
            }
            continue;
        }
        const std::byte* data = file.data() + offset;
        for (std::uint64_t w = 0; w * 64 < count; ++w) {
            std::uint64_t word = load_le64(data + w * 8);
            const std::uint64_t bits = std::min<std::uint64_t>(64, count - w * 64);
            if (bits < 64) {
                word &= (std::uint64_t{1} << bits) - 1; // tail bits past the disk end
            }
            dirty += static_cast<unsigned>(std::popcount(word));
            if (first + w * 64 + bits == granules) {
                last_dirty = (word >> (bits - 1)) & 1;
            }
        }
    }
    std::uint64_t bytes = dirty << entry_->granularity_bits;
    const std::uint64_t tail = size_ & (granularity() - 1);
    if (last_dirty && tail != 0) {
        bytes -= granularity() - tail; // the last granule stops at the virtual size
    }
    return bytes;
}

std::vector<BitmapSummary> list_bitmaps(const Image& image) {
    std::vector<BitmapSummary> out;
    const ImageInfo& info = image.info();
    if (!info.bitmaps) {
        return out;
    }
    out.reserve(info.bitmaps->entries.size());
    for (const BitmapEntry& e : info.bitmaps->entries) {
        BitmapSummary summary{e, std::nullopt, std::nullopt};
        auto bitmap = DirtyBitmap::open(image, e.name);
        if (bitmap) {
            // Counting reads the bitmap's data clusters from the mapping.
            auto counted = detail::contain_faults(
                image.path(), [&]() -> Result<std::uint64_t> { return bitmap->dirty_bytes(); });
            if (counted)
                summary.dirty_bytes = *counted;
            else
                summary.error = counted.error();
        } else {
            summary.error = bitmap.error();
        }
        out.push_back(std::move(summary));
    }
    return out;
}

} // namespace qcowmap

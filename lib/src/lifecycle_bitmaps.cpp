// edit_bitmaps(): qemu-img bitmap's edits of the bitmap directory (add, remove, clear, enable,
// disable, merge), stored as qemu's qcow2_store_persistent_dirty_bitmaps stores them: every
// changed bitmap gets a new table and new data clusters, the directory is written anew, and one
// header write (the bitmaps extension) switches to it; then the clusters nothing uses any more
// are freed. New clusters are counted (refcounts synced) before anything points at them, so a
// crash leaves either directory, at worst with leaked clusters.
#include "lifecycle_internal.hpp"
#include "writer_layout.hpp"

#include <qcowmap/bitmap.hpp>
#include <qcowmap/image.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <fcntl.h>

namespace qcowmap {
namespace {

using detail::WState;

/// qemu's limits (block/qcow2-bitmap.c): granularity 2^9 .. 2^31, names up to 1023 bytes,
/// 65535 bitmaps.
constexpr unsigned kMinGranularityBits = 9;
constexpr unsigned kMaxGranularityBits = 31;
constexpr std::size_t kMaxNameSize = 1023;
constexpr std::size_t kMaxBitmaps = 65535;

Error edit_error(ErrorCode code, std::string message) {
    return Error{code, std::move(message)};
}

/// A bitmap's bits in memory: bit g of word g / 64 is granule g.
using Bits = std::vector<std::uint64_t>;

struct Entry {
    std::string name;
    std::uint32_t flags = 0;
    std::uint8_t type = 1;
    std::uint8_t granularity_bits = 16;
    std::vector<std::byte> extra_data;
    std::uint64_t table_offset = 0;
    std::uint32_t table_size = 0;
    bool consistent = true;
    /// Set when the content changes: the new bits, stored in new clusters.
    std::optional<Bits> bits;
    /// The table and data clusters it had on disk, freed once the new directory is in place
    /// (when its content changed or it was removed).
    bool release_old = false;
    bool is_new = false;
};

std::uint64_t granules(std::uint64_t size, unsigned bits) {
    return (size + (std::uint64_t{1} << bits) - 1) >> bits;
}

void set_range(Bits& bits, std::uint64_t first, std::uint64_t last) {
    for (std::uint64_t g = first; g <= last;) {
        const unsigned from = static_cast<unsigned>(g % 64);
        const unsigned to = static_cast<unsigned>(std::min<std::uint64_t>(63, from + (last - g)));
        const std::uint64_t mask =
            (to == 63 ? ~std::uint64_t{0} : (std::uint64_t{1} << (to + 1)) - 1) &
            ~((std::uint64_t{1} << from) - 1);
        bits[g / 64] |= mask;
        g += to - from + 1;
    }
}

/// The dirty ranges of bitmap `name` of `image`, as bits of granularity `granularity_bits`
/// (a granule is set when any dirty byte falls in it).
Result<void> or_bitmap(const Image& image, const std::string& name, unsigned granularity_bits,
                       Bits& bits) {
    auto bitmap = DirtyBitmap::open(image, name);
    if (!bitmap)
        return std::move(bitmap).error();
    auto ranges = bitmap->dirty_ranges();
    for (const BitmapRange& r : ranges)
        set_range(bits, r.offset >> granularity_bits,
                  (r.offset + r.length - 1) >> granularity_bits);
    if (ranges.error())
        return *ranges.error();
    return {};
}

/// Clusters touching `[offset, offset + length)`, for freeing.
void free_range_later(WState& s, std::uint64_t offset, std::uint64_t length) {
    if (offset == 0 || length == 0)
        return;
    for (std::uint64_t c = offset >> s.cluster_bits; c <= (offset + length - 1) >> s.cluster_bits;
         ++c)
        s.pending_frees.push_back(c);
}

/// Allocates and writes the clusters of `bytes` (a multiple of the cluster size); returns the
/// offset of the first.
Result<std::uint64_t> store_clusters(WState& s, std::span<const std::byte> bytes) {
    const std::uint64_t count = (bytes.size() + s.cluster_size - 1) >> s.cluster_bits;
    auto allocation = detail::allocate_clusters(s, count);
    if (!allocation)
        return std::move(allocation).error();
    const std::uint64_t offset = allocation->first << s.cluster_bits;
    // The file grows over the allocation first (writeback would; the write below may lie past
    // the current end, which pwrite handles, but the size must be synced with the data).
    if (auto ok = s.file.pwrite(bytes, offset); !ok)
        return std::move(ok).error();
    s.data_unsynced = true;
    return offset;
}

/// Writes `bits` as bitmap data clusters and a bitmap table; sets the entry's table.
Result<void> store_bits(WState& s, Entry& e) {
    const std::uint64_t per_cluster = s.cluster_size * 8; // granules per data cluster
    const std::uint64_t count = granules(s.size, e.granularity_bits);
    const std::uint64_t table_size = (count + per_cluster - 1) / per_cluster;
    std::vector<std::byte> table(((table_size * 8 + s.cluster_size - 1) >> s.cluster_bits)
                                 << s.cluster_bits);
    std::vector<std::byte> cluster(s.cluster_size);
    const Bits& bits = *e.bits;
    const std::uint64_t words_per_cluster = per_cluster / 64;
    for (std::uint64_t t = 0; t < table_size; ++t) {
        const std::uint64_t first_word = t * words_per_cluster;
        const std::uint64_t last_word =
            std::min<std::uint64_t>(bits.size(), first_word + words_per_cluster);
        bool any = false;
        std::fill(cluster.begin(), cluster.end(), std::byte{0});
        for (std::uint64_t w = first_word; w < last_word; ++w) {
            if (!bits[w])
                continue;
            any = true;
            // Bit j of the data is bit j % 8 of byte j / 8 (spec "Bitmap data"): the words'
            // little-endian bytes.
            for (unsigned b = 0; b < 8; ++b)
                cluster[(w - first_word) * 8 + b] = std::byte((bits[w] >> (8 * b)) & 0xff);
        }
        if (!any)
            continue; // an all-zero cluster is not stored (table entry 0), as qemu does
        auto offset = store_clusters(s, cluster);
        if (!offset)
            return std::move(offset).error();
        detail::writer::store_be64(table.data() + t * 8, *offset);
    }
    if (table_size == 0) {
        e.table_offset = 0;
        e.table_size = 0;
        return {};
    }
    auto offset = store_clusters(s, table);
    if (!offset)
        return std::move(offset).error();
    e.table_offset = *offset;
    e.table_size = static_cast<std::uint32_t>(table_size);
    return {};
}

/// The bitmap table and data clusters of an entry as it is on disk, freed later.
Result<void> release_entry(WState& s, const Entry& e) {
    if (e.table_offset == 0 || e.table_size == 0)
        return {};
    std::vector<std::byte> table(std::uint64_t{e.table_size} * 8);
    if (auto ok = s.file.pread(table, e.table_offset); !ok)
        return ok;
    for (std::uint32_t t = 0; t < e.table_size; ++t) {
        const detail::BitmapTableEntry entry =
            detail::decode_bitmap_table_entry(table.data() + t * 8);
        if (entry.data_offset() && !entry.reserved_bits())
            free_range_later(s, entry.data_offset(), s.cluster_size);
    }
    free_range_later(s, e.table_offset, table.size());
    return {};
}

std::vector<std::byte> encode_directory(const std::vector<Entry>& entries) {
    std::vector<std::byte> out;
    for (const Entry& e : entries) {
        const std::size_t at = out.size();
        out.resize(at + detail::align_up8(detail::kBitmapDirectoryEntryFixed + e.extra_data.size() +
                                          e.name.size()),
                   std::byte{0});
        std::byte* p = out.data() + at;
        detail::writer::store_be64(p, e.table_offset);
        detail::writer::store_be32(p + 8, e.table_size);
        detail::writer::store_be32(p + 12, e.flags);
        p[16] = std::byte{e.type};
        p[17] = std::byte{e.granularity_bits};
        p[18] = std::byte(static_cast<std::uint8_t>(e.name.size() >> 8));
        p[19] = std::byte(static_cast<std::uint8_t>(e.name.size()));
        detail::writer::store_be32(p + 20, static_cast<std::uint32_t>(e.extra_data.size()));
        std::memcpy(p + 24, e.extra_data.data(), e.extra_data.size());
        std::memcpy(p + 24 + e.extra_data.size(), e.name.data(), e.name.size());
    }
    return out;
}

std::vector<Entry>::iterator find_entry(std::vector<Entry>& entries, const std::string& name) {
    return std::find_if(entries.begin(), entries.end(),
                        [&](const Entry& e) { return e.name == name; });
}

} // namespace

Result<void> edit_bitmaps(const std::filesystem::path& path, const std::string& name,
                          const std::vector<BitmapEdit>& edits) {
    // The image as it is, for reading bitmap bits (before the writer marks bitmaps in_use).
    // Under a reader lock (nobody writes it meanwhile) until the edits are computed; released
    // before the writer takes its own lock.
    std::optional<Image> image;
    if (auto opened = Image::open(path); opened)
        image = std::move(*opened);
    else
        return std::move(opened).error();
    const ImageInfo info = image->info();
    if (info.version < 3) {
        return edit_error(ErrorCode::invalid_argument,
                          fmt::format("{}: qcow2 version 2 images cannot hold persistent bitmaps "
                                      "(compat=1.1 is needed)",
                                      path.string()));
    }
    const std::uint64_t size = image->size();
    // Source bitmaps of merges, read before anything changes.
    std::vector<std::pair<const BitmapEdit*, std::optional<Image>>> sources;
    for (const BitmapEdit& edit : edits) {
        if (edit.kind != BitmapEdit::Kind::merge)
            continue;
        if (!edit.source_image) {
            sources.emplace_back(&edit, std::nullopt); // a bitmap of the image itself
            continue;
        }
        OpenOptions open;
        open.format = edit.source_format;
        auto opened = Image::open(*edit.source_image, open);
        if (!opened)
            return std::move(opened).error();
        if (opened->size() != size) {
            return edit_error(ErrorCode::invalid_argument,
                              fmt::format("bitmap '{}' of {} covers {} bytes, the image {}: "
                                          "bitmaps of different sizes cannot be merged",
                                          edit.source, edit.source_image->string(), opened->size(),
                                          size));
        }
        sources.emplace_back(&edit, std::move(*opened));
    }

    std::vector<Entry> entries;
    const bool had_directory = info.bitmaps && info.bitmaps->consistent;
    if (had_directory) {
        const BitmapsExtension& ext = *info.bitmaps;
        std::vector<std::byte> directory(ext.directory_size);
        const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            const int err = errno;
            Error error = edit_error(ErrorCode::io_error,
                                     fmt::format("{}: {}", path.string(), std::strerror(err)));
            error.system_errno = err;
            return error;
        }
        const detail::FileIo reader(fd, path.string());
        if (auto ok = reader.pread(directory, ext.directory_offset); !ok)
            return ok;
        std::uint64_t at = 0;
        for (const BitmapEntry& b : ext.entries) {
            Entry e;
            e.name = b.name;
            e.flags = b.flags;
            e.type = b.type;
            e.granularity_bits = b.granularity_bits;
            e.table_offset = b.table_offset;
            e.table_size = b.table_size;
            e.consistent = b.consistent();
            // Parsed and validated at open: the entry lies inside the directory.
            const std::uint64_t extra_at = at + detail::kBitmapDirectoryEntryFixed;
            e.extra_data.assign(directory.begin() + static_cast<std::ptrdiff_t>(extra_at),
                                directory.begin() +
                                    static_cast<std::ptrdiff_t>(extra_at + b.extra_data_size));
            at += detail::align_up8(detail::kBitmapDirectoryEntryFixed + b.extra_data_size +
                                    b.name.size());
            entries.push_back(std::move(e));
        }
    }

    // Every edit is checked (and new bits computed) before the image is opened for writing,
    // so that a refused edit leaves the file as it was. Removed bitmaps' clusters are freed
    // once the writer is open.
    std::vector<Entry> removed;
    auto load_bits = [&](Entry& e) -> Result<void> {
        if (e.bits)
            return {};
        Bits bits((granules(size, e.granularity_bits) + 63) / 64, 0);
        if (!e.is_new) {
            if (auto ok = or_bitmap(*image, e.name, e.granularity_bits, bits); !ok)
                return ok;
        }
        e.bits = std::move(bits);
        e.release_old = !e.is_new;
        return {};
    };
    auto usable = [&](Entry& e) -> Result<void> {
        if (!e.consistent) {
            return edit_error(ErrorCode::invalid_table,
                              fmt::format("bitmap '{}' is inconsistent and cannot be used (remove "
                                          "it with --remove)",
                                          detail::printable(name)));
        }
        return {};
    };
    auto missing = [&]() {
        return edit_error(
            ErrorCode::invalid_argument,
            fmt::format("{}: no bitmap named '{}'", path.string(), detail::printable(name)));
    };

    for (const BitmapEdit& edit : edits) {
        auto it = find_entry(entries, name);
        switch (edit.kind) {
        case BitmapEdit::Kind::add: {
            if (it != entries.end()) {
                return edit_error(ErrorCode::invalid_argument,
                                  fmt::format("{}: bitmap '{}' already exists", path.string(),
                                              detail::printable(name)));
            }
            if (name.empty() || name.size() > kMaxNameSize) {
                return edit_error(ErrorCode::invalid_argument,
                                  fmt::format("bitmap name of {} bytes (1 to {} allowed)",
                                              name.size(), kMaxNameSize));
            }
            if (entries.size() >= kMaxBitmaps)
                return edit_error(ErrorCode::invalid_argument,
                                  "the image holds 65535 bitmaps already");
            std::uint64_t granularity = edit.granularity;
            if (granularity == 0) {
                // bdrv_get_default_bitmap_granularity: the cluster size, within 4 KiB..64 KiB.
                granularity = std::clamp<std::uint64_t>(info.cluster_size, 4096, 65536);
            }
            if ((granularity & (granularity - 1)) != 0 ||
                granularity < (std::uint64_t{1} << kMinGranularityBits) ||
                granularity > (std::uint64_t{1} << kMaxGranularityBits)) {
                return edit_error(ErrorCode::invalid_argument,
                                  fmt::format("granularity {} is not a power of two between 512 "
                                              "and 2 GiB",
                                              granularity));
            }
            Entry e;
            e.name = name;
            e.flags = edit.disabled ? 0 : kBitmapAuto;
            e.granularity_bits = static_cast<std::uint8_t>(std::countr_zero(granularity));
            e.is_new = true;
            e.bits = Bits((granules(size, e.granularity_bits) + 63) / 64, 0);
            entries.push_back(std::move(e));
            break;
        }
        case BitmapEdit::Kind::remove:
            if (it == entries.end())
                return missing();
            if (!it->is_new)
                removed.push_back(*it);
            entries.erase(it);
            break;
        case BitmapEdit::Kind::clear:
            if (it == entries.end())
                return missing();
            if (auto ok = usable(*it); !ok)
                return ok;
            it->bits = Bits((granules(size, it->granularity_bits) + 63) / 64, 0);
            it->release_old = !it->is_new;
            break;
        case BitmapEdit::Kind::enable:
        case BitmapEdit::Kind::disable:
            if (it == entries.end())
                return missing();
            if (auto ok = usable(*it); !ok)
                return ok;
            if (edit.kind == BitmapEdit::Kind::enable)
                it->flags |= kBitmapAuto;
            else
                it->flags &= ~kBitmapAuto;
            break;
        case BitmapEdit::Kind::merge: {
            if (it == entries.end())
                return missing();
            if (auto ok = usable(*it); !ok)
                return ok;
            if (auto ok = load_bits(*it); !ok)
                return ok;
            const auto source = std::find_if(sources.begin(), sources.end(),
                                             [&](const auto& p) { return p.first == &edit; });
            if (source->second) {
                if (auto ok =
                        or_bitmap(*source->second, edit.source, it->granularity_bits, *it->bits);
                    !ok)
                    return ok;
            } else {
                // The same image: the source as it is now (it may have been edited above).
                auto src = find_entry(entries, edit.source);
                if (src == entries.end()) {
                    return edit_error(ErrorCode::invalid_argument,
                                      fmt::format("{}: no bitmap named '{}'", path.string(),
                                                  detail::printable(edit.source)));
                }
                if (!src->consistent) {
                    return edit_error(ErrorCode::invalid_table,
                                      fmt::format("bitmap '{}' is inconsistent and cannot be used",
                                                  detail::printable(edit.source)));
                }
                if (src->bits) {
                    const std::uint64_t count = granules(size, src->granularity_bits);
                    for (std::uint64_t g = 0; g < count; ++g) {
                        if ((*src->bits)[g / 64] >> (g % 64) & 1) {
                            const std::uint64_t from = g << src->granularity_bits;
                            const std::uint64_t to =
                                std::min(size, (g + 1) << src->granularity_bits) - 1;
                            set_range(*it->bits, from >> it->granularity_bits,
                                      to >> it->granularity_bits);
                        }
                    }
                } else if (auto ok =
                               or_bitmap(*image, edit.source, it->granularity_bits, *it->bits);
                           !ok) {
                    return ok;
                }
            }
            break;
        }
        }
    }

    // The edits are valid: now the image is written. Our readers go first (a reader lock of
    // our own would refuse our writer).
    image.reset();
    sources.clear();
    auto writable = WritableImage::open(path);
    if (!writable)
        return std::move(writable).error();
    WState& s = detail_state(*writable);
    {
        // Between the two locks another program could have changed the bitmaps: refuse rather
        // than store a directory computed from the old one.
        const auto& now = s.info.bitmaps;
        const auto& then = info.bitmaps;
        if (now.has_value() != then.has_value() ||
            (now && (now->directory_offset != then->directory_offset ||
                     now->directory_size != then->directory_size))) {
            return edit_error(ErrorCode::io_error,
                              fmt::format("{}: the bitmaps changed while they were edited; "
                                          "nothing was written",
                                          path.string()));
        }
    }
    std::lock_guard lock(s.mutex);
    // In-use flags set by the open are cleared again (nothing was written), so the directory
    // on disk is the one parsed at open.
    if (auto ok = detail::writeback(s); !ok)
        return ok;
    if (auto ok = detail::store_bitmaps(s); !ok)
        return ok;

    for (const Entry& e : removed) {
        if (auto ok = release_entry(s, e); !ok)
            return ok;
    }

    // New tables and data, then the new directory, all counted and synced before the header
    // points at them.
    for (Entry& e : entries) {
        if (!e.bits)
            continue;
        if (e.release_old) {
            Entry old = e;
            if (auto ok = release_entry(s, old); !ok)
                return ok;
        }
        if (auto ok = store_bits(s, e); !ok)
            return ok;
    }
    std::optional<detail::BitmapsExtensionFields> fields;
    std::vector<std::byte> directory = encode_directory(entries);
    if (!entries.empty()) {
        std::vector<std::byte> padded(((directory.size() + s.cluster_size - 1) >> s.cluster_bits)
                                      << s.cluster_bits);
        std::copy(directory.begin(), directory.end(), padded.begin());
        auto offset = store_clusters(s, padded);
        if (!offset)
            return std::move(offset).error();
        fields = detail::BitmapsExtensionFields{};
        fields->nb_bitmaps = static_cast<std::uint32_t>(entries.size());
        fields->directory_size = directory.size();
        fields->directory_offset = *offset;
    }
    // The frees queued so far must wait for the header switch: set them aside.
    std::vector<std::uint64_t> frees = std::move(s.pending_frees);
    s.pending_frees.clear();
    if (auto ok = detail::writeback(s); !ok)
        return ok;
    detail::HeaderEdit edit;
    edit.bitmaps = fields;
    std::uint64_t autoclear = s.info.autoclear_features;
    autoclear =
        entries.empty() ? (autoclear & ~kAutoclearBitmaps) : (autoclear | kAutoclearBitmaps);
    edit.autoclear = autoclear;
    if (auto ok = detail::rewrite_header(s, edit); !ok)
        return ok;
    if (had_directory)
        free_range_later(s, info.bitmaps->directory_offset, info.bitmaps->directory_size);
    s.pending_frees.insert(s.pending_frees.end(), frees.begin(), frees.end());
    if (auto ok = detail::writeback(s); !ok)
        return ok;

    // The writer's view follows the new directory.
    if (entries.empty()) {
        s.info.bitmaps.reset();
    } else {
        BitmapsExtension ext;
        ext.count = static_cast<std::uint32_t>(entries.size());
        ext.directory_size = directory.size();
        ext.directory_offset = fields->directory_offset;
        for (const Entry& e : entries) {
            BitmapEntry b;
            b.name = e.name;
            b.table_offset = e.table_offset;
            b.table_size = e.table_size;
            b.flags = e.flags;
            b.type = e.type;
            b.granularity_bits = e.granularity_bits;
            b.extra_data_size = static_cast<std::uint32_t>(e.extra_data.size());
            ext.names.push_back(e.name);
            ext.entries.push_back(std::move(b));
        }
        s.info.bitmaps = std::move(ext);
    }
    return {};
}

} // namespace qcowmap

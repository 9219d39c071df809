// The header cluster rewritten in one write (qemu's qcow2_update_header), and what the
// lifecycle operations share: access to the writer's state, backing names, emptying a layer.
#include "lifecycle_internal.hpp"
#include "workers.hpp"
#include "writer_layout.hpp"

#include <qcowmap/format.hpp>
#include <qcowmap/image.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <cstring>

namespace qcowmap {

WritableImage::State& detail_state(WritableImage& image) {
    return *image.state_;
}

} // namespace qcowmap

namespace qcowmap::detail {
namespace {

// Header fields (spec "Header", byte offsets).
constexpr std::uint64_t kBackingFileOffsetAt = 8; // 8 bytes, then backing_file_size (4)
constexpr std::uint64_t kBackingFileSizeAt = 16;
constexpr std::uint64_t kAutoclearAt = 88;
/// qemu's limit on a backing file name (block/qcow2.c: "Backing file name too long").
constexpr std::size_t kMaxBackingName = 1023;

struct RawExtension {
    std::uint32_t type;
    std::vector<std::byte> data;
};

void append_extension(std::vector<std::byte>& out, std::uint32_t type,
                      std::span<const std::byte> data) {
    std::byte head[8];
    writer::store_be32(head, type);
    writer::store_be32(head + 4, static_cast<std::uint32_t>(data.size()));
    out.insert(out.end(), head, head + 8);
    out.insert(out.end(), data.begin(), data.end());
    out.resize((out.size() + 7) & ~std::size_t{7}, std::byte{0}); // padded to 8 bytes
}

std::vector<std::byte> text_bytes(const std::string& text) {
    std::vector<std::byte> bytes(text.size());
    std::memcpy(bytes.data(), text.data(), text.size());
    return bytes;
}

} // namespace

Result<void> rewrite_header(WState& s, const HeaderEdit& edit) {
    std::vector<std::byte> old(s.cluster_size);
    if (auto ok = s.file.pread(old, 0); !ok)
        return ok;
    const ImageInfo& info = s.info;
    const std::size_t header_length = info.version >= 3
                                          ? std::max<std::size_t>(info.header_length, 104)
                                          : std::size_t{kV2HeaderLength};
    if (header_length > old.size())
        return Error{ErrorCode::invalid_header, "the header is longer than a cluster"};
    // The extensions as they are now (validated at open: each lies inside the cluster).
    std::vector<RawExtension> extensions;
    for (const HeaderExtension& e : info.extensions) {
        if (e.file_offset > old.size() || e.length > old.size() - e.file_offset)
            return Error{ErrorCode::invalid_header, "a header extension passes the first cluster"};
        extensions.push_back(
            {e.type, std::vector<std::byte>(
                         old.begin() + static_cast<std::ptrdiff_t>(e.file_offset),
                         old.begin() + static_cast<std::ptrdiff_t>(e.file_offset + e.length))});
    }
    auto find = [&](std::uint32_t type) {
        return std::find_if(extensions.begin(), extensions.end(),
                            [type](const RawExtension& e) { return e.type == type; });
    };
    std::optional<std::string> backing = info.backing_file;
    if (edit.backing_file)
        backing = *edit.backing_file;
    if (backing && backing->size() > kMaxBackingName) {
        return Error{ErrorCode::invalid_argument,
                     fmt::format("backing file name of {} bytes is too long (qemu allows {})",
                                 backing->size(), kMaxBackingName)};
    }
    if (edit.backing_format || (edit.backing_file && !*edit.backing_file)) {
        if (auto it = find(kExtensionBackingFormat); it != extensions.end())
            extensions.erase(it);
        if (backing && edit.backing_format && *edit.backing_format)
            extensions.push_back({kExtensionBackingFormat, text_bytes(**edit.backing_format)});
    }
    if (edit.bitmaps) {
        if (auto it = find(kExtensionBitmaps); it != extensions.end())
            extensions.erase(it);
        if (*edit.bitmaps) {
            const BitmapsExtensionFields& b = **edit.bitmaps;
            std::vector<std::byte> data(24, std::byte{0});
            writer::store_be32(data.data(), b.nb_bitmaps); // then 4 reserved bytes
            writer::store_be64(data.data() + 8, b.directory_size);
            writer::store_be64(data.data() + 16, b.directory_offset);
            extensions.push_back({kExtensionBitmaps, std::move(data)});
        }
    }
    // qemu's order (qcow2_update_header); unknown extensions keep their relative order.
    static constexpr std::uint32_t order[] = {kExtensionBackingFormat, kExtensionDataFile,
                                              kExtensionEncryption, kExtensionFeatureNames,
                                              kExtensionBitmaps};
    auto rank = [](std::uint32_t type) {
        const auto* at = std::find(std::begin(order), std::end(order), type);
        return static_cast<std::size_t>(at - std::begin(order));
    };
    std::stable_sort(
        extensions.begin(), extensions.end(),
        [&](const RawExtension& a, const RawExtension& b) { return rank(a.type) < rank(b.type); });

    std::vector<std::byte> out(old.begin(),
                               old.begin() + static_cast<std::ptrdiff_t>(header_length));
    for (const RawExtension& e : extensions)
        append_extension(out, e.type, e.data);
    out.resize(out.size() + 8, std::byte{0}); // end of extensions
    std::uint64_t backing_offset = 0;
    if (backing) {
        backing_offset = out.size();
        const std::vector<std::byte> name = text_bytes(*backing);
        out.insert(out.end(), name.begin(), name.end());
    }
    if (out.size() > s.cluster_size) {
        return Error{ErrorCode::invalid_argument,
                     fmt::format("the header and its extensions ({} bytes) do not fit in the "
                                 "first cluster ({} bytes)",
                                 out.size(), s.cluster_size)};
    }
    writer::store_be64(out.data() + kBackingFileOffsetAt, backing_offset);
    writer::store_be32(out.data() + kBackingFileSizeAt,
                       backing ? static_cast<std::uint32_t>(backing->size()) : 0);
    std::uint64_t autoclear = info.autoclear_features;
    if (edit.autoclear && info.version >= 3) {
        autoclear = *edit.autoclear;
        writer::store_be64(out.data() + kAutoclearAt, autoclear);
    }
    out.resize(s.cluster_size, std::byte{0});
    if (auto ok = s.file.pwrite(out, 0); !ok)
        return ok;
    if (auto ok = s.file.sync(); !ok)
        return ok;

    // The writer's view of the header follows.
    s.info.backing_file = backing;
    if (edit.backing_format || (edit.backing_file && !*edit.backing_file))
        s.info.backing_format =
            backing && edit.backing_format ? *edit.backing_format : std::nullopt;
    s.info.autoclear_features = autoclear;
    s.info.extensions.clear();
    std::uint64_t at = header_length;
    for (const RawExtension& e : extensions) {
        s.info.extensions.push_back({e.type, static_cast<std::uint32_t>(e.data.size()), at + 8});
        at += 8 + ((e.data.size() + 7) & ~std::size_t{7});
    }
    return {};
}

std::filesystem::path resolve_backing(const std::filesystem::path& image, const std::string& name) {
    const std::filesystem::path named(name);
    if (named.is_absolute())
        return named;
    return image.parent_path() / named;
}

Result<std::string> backing_format_of(const std::filesystem::path& image, const std::string& name,
                                      const std::optional<std::string>& format) {
    if (format) {
        if (*format != "qcow2" && *format != "raw") {
            return Error{ErrorCode::invalid_argument,
                         fmt::format("backing format '{}' is not supported (qcow2 or raw)",
                                     detail::printable(*format))};
        }
        return *format;
    }
    return probe_format(resolve_backing(image, name));
}

Result<void> empty_active_layer(WState& s) {
    std::lock_guard lock(s.mutex);
    if (s.closed)
        return Error{ErrorCode::invalid_argument, "the image is closed"};
    if (s.data_file_raw) {
        return Error{ErrorCode::invalid_argument,
                     "an image whose external data file is raw (data_file_raw) cannot be "
                     "emptied: its clusters must stay allocated"};
    }
    // Every table and pending change on disk first, so that the L1 entries cleared below are
    // the only change of the next writeback.
    if (auto ok = writeback(s); !ok)
        return ok;
    for (std::size_t i = 0; i < s.l1.size(); ++i) {
        const L1Entry l1{s.l1[i]};
        const std::uint64_t l2_offset = l1.l2_offset();
        if (l2_offset == 0)
            continue;
        if (l1.copied()) {
            // The table is ours alone: the clusters it references lose a reference each
            // (qemu's make_completely_empty / discard of every cluster).
            auto table = l2_table_at(s, l2_offset);
            if (!table)
                return std::move(table).error();
            for (std::uint64_t j = 0; j < s.l2_entries(); ++j) {
                const L2Entry e = decode_l2((*table)->bytes.data() + j * s.entry_bytes, s.extended);
                free_entry_later(s, e);
            }
        }
        // A table shared with a snapshot keeps its entries; only this reference goes.
        s.pending_frees.push_back(l2_offset >> s.cluster_bits);
        s.l1[i] = 0;
        s.l1_dirty.insert(i);
        s.l2_cache.erase(l2_offset);
    }
    s.decompressed_entry = 0;
    // L1 entries cleared and synced (step 5), then the refcounts drop (step 6).
    return writeback(s);
}

VisitOptions copy_visit_options(unsigned threads, DataAccess access) {
    VisitOptions v;
    v.threads = resolve_threads(threads);
    v.data_access = access == DataAccess::automatic ? automatic_data_access() : access;
    if (v.data_access == DataAccess::mapping)
        v.prefetch = Prefetch::populate;
    return v;
}

} // namespace qcowmap::detail

// qemu-img map semantics on top of the extent iterator (qemu-img.c img_map, get_block_status,
// entry_mergeable; block/io.c bdrv_co_block_status for BDRV_BLOCK_RECURSE).
#include "fault.hpp"
#include "image_state.hpp"
#include "refcount.hpp"

#include <qcowmap/bitmap.hpp>
#include <qcowmap/map.hpp>

#include <cerrno>
#include <sys/stat.h>
#include <unistd.h>

namespace qcowmap {
namespace {

bool entry_mergeable(const MapEntry& current, const MapEntry& next) {
    if (current.length == 0) {
        return false;
    }
    if (current.zero != next.zero || current.data != next.data ||
        current.compressed != next.compressed || current.depth != next.depth ||
        current.present != next.present || current.offset.has_value() != next.offset.has_value()) {
        return false;
    }
    return !current.offset || *current.offset + current.length == *next.offset;
}

MapEntry entry_of(const Extent& e) {
    MapEntry m;
    m.start = e.offset;
    m.length = e.length;
    m.depth = e.depth;
    m.present = e.present;
    m.zero = e.kind == ExtentKind::zero;
    m.data = e.kind != ExtentKind::zero;
    m.compressed = e.kind == ExtentKind::compressed;
    m.offset = e.host_offset;
    return m;
}

} // namespace

namespace {

Result<std::uint64_t> layer_refcount(const detail::ImageState& layer, std::uint64_t cluster_index) {
    const ImageInfo& info = layer.info;
    if (layer.format != detail::LayerFormat::qcow2 || info.version < 2) {
        return std::uint64_t{0}; // raw files and qcow v1 keep no refcounts
    }
    using Status = detail::RefcountLookup::Status;
    const detail::RefcountLookup found = detail::lookup_refcount(layer.bytes, info, cluster_index);
    switch (found.status) {
    case Status::found:
        return found.refcount;
    case Status::unaligned_block:
        return Error{ErrorCode::invalid_table,
                     fmt::format("refcount block offset {:#x} (refcount table index {}) is not "
                                 "aligned to the cluster size",
                                 found.block_offset, found.table_index)};
    case Status::block_past_eof:
        break;
    }
    return detail::slice(layer.bytes, found.block_offset, info.cluster_size, "refcount block")
        .error();
}

bool layer_preallocated(const detail::ImageState& layer) {
    struct stat st {};
    if (layer.format != detail::LayerFormat::qcow2 || layer.fd() < 0 ||
        ::fstat(layer.fd(), &st) != 0) {
        return false;
    }
    const ImageInfo& info = layer.info;
    const std::uint64_t real_clusters =
        static_cast<std::uint64_t>(st.st_blocks) * 512 / info.cluster_size;
    const std::uint64_t threshold = std::max(real_clusters * 10 / 9, real_clusters + 2);
    const std::uint64_t file_clusters =
        (info.file_size + info.cluster_size - 1) >> info.cluster_bits;
    std::uint64_t referenced = 0;
    for (std::uint64_t i = 0; i < file_clusters && referenced < threshold; ++i) {
        auto refcount = layer_refcount(layer, i);
        if (!refcount) {
            return false; // qemu ignores detection errors
        }
        referenced += *refcount != 0;
    }
    return referenced >= threshold;
}

} // namespace

Result<std::uint64_t> refcount_of(const Image& image, std::uint64_t cluster_index) {
    return layer_refcount(detail_state(image), cluster_index);
}

bool looks_metadata_preallocated(const Image& image) {
    return layer_preallocated(detail_state(image));
}

namespace {

/// What a map walk's sink answers: go on, or stop here (the caller has what it wanted).
enum class Walk { more, stop };
using WalkSink = std::function<Result<Walk>(const MapEntry&)>;

/// map_image's walk; a sink answering Walk::stop ends it at once, successfully.
Result<void> map_walk(const Image& image, const MapOptions& options, const WalkSink& sink);

} // namespace

static Result<void>
map_image_in_boundary(const Image& image, const MapOptions& options,
                      const std::function<Result<void>(const MapEntry&)>& sink) {
    return map_walk(image, options, [&](const MapEntry& e) -> Result<Walk> {
        if (auto ok = sink(e); !ok)
            return std::move(ok).error();
        return Walk::more;
    });
}

Result<void> map_image(const Image& image, const MapOptions& options,
                       const std::function<Result<void>(const MapEntry&)>& sink) {
    return detail::contain_faults(image.path(), [&]() -> Result<void> {
        return map_image_in_boundary(image, options, sink);
    });
}

Result<void> map_dirty(const Image& image, const DirtyBitmap& bitmap, const MapOptions& options,
                       const std::function<Result<void>(const MapEntry&)>& sink) {
    const std::uint64_t start = options.start;
    const std::uint64_t end =
        options.length > UINT64_MAX - start ? UINT64_MAX : start + options.length;
    // A merge join of two ordered streams: one map walk from the first dirty byte, its entries
    // clipped to the dirty ranges. Clipping a merged entry gives what mapping each dirty range
    // on its own would (host offsets continue inside an entry), without redoing the walk's
    // setup for every range.
    BitmapRanges ranges = bitmap.dirty_ranges(start, end);
    auto next_range = ranges.begin();
    if (next_range == std::default_sentinel)
        return {};
    BitmapRange range = *next_range;
    bool have = true;
    MapOptions walk = options;
    walk.start = range.offset;
    walk.length = end - range.offset;
    return map_walk(image, walk, [&](const MapEntry& e) -> Result<Walk> {
        const std::uint64_t e_end = e.start + e.length;
        while (have && range.offset < e_end) {
            const std::uint64_t r_end = range.offset + range.length;
            const std::uint64_t from = std::max(range.offset, e.start);
            const std::uint64_t to = std::min(r_end, e_end);
            if (from < to) {
                MapEntry clipped = e;
                clipped.start = from;
                clipped.length = to - from;
                if (clipped.offset)
                    *clipped.offset += from - e.start;
                if (auto ok = sink(clipped); !ok)
                    return std::move(ok).error();
            }
            if (r_end > e_end)
                break; // the range goes on into the next entry
            have = ++next_range != std::default_sentinel;
            if (have)
                range = *next_range;
        }
        return have ? Walk::more : Walk::stop; // nothing dirty is left: the walk can end
    });
}

std::filesystem::path map_file(const Image& image, std::uint32_t depth) {
    const detail::ImageState* layer = detail::layer_at(detail_state(image), depth);
    if (!layer)
        return {};
    if (layer->format == detail::LayerFormat::qcow2 && layer->has_data_file())
        return layer->data_file_path;
    return layer->path;
}

namespace {

/// The part of a host file from `host` (below `host_end`) that is all hole or all data
/// (SEEK_DATA / SEEK_HOLE).
struct HostPiece {
    bool hole = false;
    std::uint64_t until = 0;
};
HostPiece host_piece(int fd, std::uint64_t host, std::uint64_t host_end) {
    const off_t data_at = ::lseek(fd, static_cast<off_t>(host), SEEK_DATA);
    if (data_at < 0 && errno != ENXIO) {
        return {false, host_end}; // no answer: keep reporting data, as classify_raw does
    }
    if (data_at < 0 || static_cast<std::uint64_t>(data_at) > host) {
        return {true, data_at < 0
                          ? host_end
                          : std::min<std::uint64_t>(host_end, static_cast<std::uint64_t>(data_at))};
    }
    const off_t hole_at = ::lseek(fd, static_cast<off_t>(host), SEEK_HOLE);
    return {false, hole_at < 0
                       ? host_end
                       : std::min<std::uint64_t>(host_end, static_cast<std::uint64_t>(hole_at))};
}

Result<void> map_walk(const Image& image, const MapOptions& options, const WalkSink& sink) {
    const std::uint64_t start = std::min(options.start, image.size());
    const std::uint64_t end =
        options.length > image.size() - start ? image.size() : start + options.length;
    // Whether each layer looks metadata-preallocated, worked out when first needed.
    std::vector<std::optional<bool>> preallocated;
    auto probe_layer = [&](std::uint32_t depth) -> const detail::ImageState* {
        if (!options.probe_host_holes)
            return nullptr;
        const detail::ImageState* layer = detail::layer_at(detail_state(image), depth);
        if (!layer)
            return nullptr;
        if (preallocated.size() <= depth)
            preallocated.resize(depth + 1);
        if (!preallocated[depth])
            preallocated[depth] = layer_preallocated(*layer);
        return *preallocated[depth] && layer->data_fd() >= 0 ? layer : nullptr;
    };

    MapEntry current;
    current.start = start;
    auto emit = [&](const MapEntry& next) -> Result<Walk> {
        if (entry_mergeable(current, next)) {
            current.length += next.length;
            return Walk::more;
        }
        if (current.length > 0) {
            auto more = sink(current);
            if (!more)
                return std::move(more).error();
            if (*more == Walk::stop)
                return Walk::stop;
        }
        current = next;
        return Walk::more;
    };

    ExtentRange extents = image.extents(start, end);
    for (const Extent& extent : extents) {
        MapEntry entry = entry_of(extent);
        const detail::ImageState* probed =
            extent.kind == ExtentKind::data ? probe_layer(extent.depth) : nullptr;
        if (!probed) {
            auto more = emit(entry);
            if (!more)
                return std::move(more).error();
            if (*more == Walk::stop)
                return {};
            continue;
        }
        // Split the data run at the host file's holes: holes read as zeros (BDRV_BLOCK_RECURSE).
        const std::uint64_t host_end = *extent.host_offset + extent.length;
        std::uint64_t host = *extent.host_offset;
        while (host < host_end) {
            const HostPiece found = host_piece(probed->data_fd(), host, host_end);
            MapEntry piece = entry;
            piece.start = extent.offset + (host - *extent.host_offset);
            piece.length = found.until - host;
            piece.offset = host;
            piece.zero = found.hole;
            const std::uint64_t until = found.until;
            auto more = emit(piece);
            if (!more)
                return std::move(more).error();
            if (*more == Walk::stop)
                return {};
            host = until;
        }
    }
    if (extents.error()) {
        return *extents.error();
    }
    if (current.length > 0) {
        if (auto more = sink(current); !more)
            return std::move(more).error();
    }
    return {};
}

} // namespace
} // namespace qcowmap

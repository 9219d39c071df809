// qemu-img map semantics on top of the extent iterator (qemu-img.c img_map, get_block_status,
// entry_mergeable; block/io.c bdrv_co_block_status for BDRV_BLOCK_RECURSE).
#include "image_state.hpp"

#include <qcowmap/map.hpp>

#include <cerrno>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace qcowmap {
namespace {

constexpr std::uint64_t kRefcountTableOffsetMask = 0xfffffffffffffe00ULL; // bits 9-63

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

class FileDescriptor {
  public:
    explicit FileDescriptor(const std::filesystem::path& path)
        : fd_(path.empty() ? -1 : ::open(path.c_str(), O_RDONLY | O_CLOEXEC)) {}
    ~FileDescriptor() {
        if (fd_ >= 0) ::close(fd_);
    }
    FileDescriptor(const FileDescriptor&) = delete;
    FileDescriptor& operator=(const FileDescriptor&) = delete;
    int get() const { return fd_; }

  private:
    int fd_;
};

} // namespace

Result<std::uint64_t> refcount_of(const Image& image, std::uint64_t cluster_index) {
    const ImageInfo& info = image.info();
    const auto bytes = image.file_bytes();
    const unsigned order = info.refcount_order;
    // Entries per refcount block: cluster_size * 8 / refcount_bits.
    const unsigned block_bits = info.cluster_bits + 3 - order;
    const std::uint64_t table_index = cluster_index >> block_bits;
    const std::uint64_t block_index = cluster_index & ((std::uint64_t{1} << block_bits) - 1);
    const std::uint64_t table_entries = (std::uint64_t{info.refcount_table_clusters}
                                         << info.cluster_bits) / 8;
    if (table_index >= table_entries) {
        return std::uint64_t{0};
    }
    // parse_image checked that the whole refcount table lies inside the file.
    const std::uint64_t block_offset =
        detail::load_be64(bytes.data() + info.refcount_table_offset + table_index * 8) &
        kRefcountTableOffsetMask;
    if (block_offset == 0) {
        return std::uint64_t{0};
    }
    if (block_offset & (info.cluster_size - 1)) {
        return Error{ErrorCode::invalid_table,
                     fmt::format("refcount block offset {:#x} (refcount table index {}) is not "
                                 "aligned to the cluster size",
                                 block_offset, table_index)};
    }
    auto block = detail::slice(bytes, block_offset, info.cluster_size, "refcount block");
    if (!block) {
        return std::move(block).error();
    }
    const std::byte* p = block->data();
    switch (order) {
    case 0: case 1: case 2: {
        // Sub-byte widths: bit 0 is the least significant bit of the byte (spec).
        const unsigned width = 1u << order;
        const std::uint64_t bit = block_index * width;
        unsigned byte = std::to_integer<unsigned>(p[bit / 8]);
        return std::uint64_t{(byte >> (bit % 8)) & ((1u << width) - 1)};
    }
    case 3: return std::uint64_t{std::to_integer<unsigned>(p[block_index])};
    case 4: return std::uint64_t{detail::load_be16(p + block_index * 2)};
    case 5: return std::uint64_t{detail::load_be32(p + block_index * 4)};
    default: return detail::load_be64(p + block_index * 8);
    }
}

bool looks_metadata_preallocated(const Image& image) {
    if (image.path().empty()) {
        return false;
    }
    struct stat st {};
    if (::stat(image.path().c_str(), &st) != 0) {
        return false;
    }
    const ImageInfo& info = image.info();
    const std::uint64_t real_clusters =
        static_cast<std::uint64_t>(st.st_blocks) * 512 / info.cluster_size;
    const std::uint64_t threshold = std::max(real_clusters * 10 / 9, real_clusters + 2);
    const std::uint64_t file_clusters =
        (info.file_size + info.cluster_size - 1) >> info.cluster_bits;
    std::uint64_t referenced = 0;
    for (std::uint64_t i = 0; i < file_clusters && referenced < threshold; ++i) {
        auto refcount = refcount_of(image, i);
        if (!refcount) {
            return false; // qemu ignores detection errors
        }
        referenced += *refcount != 0;
    }
    return referenced >= threshold;
}

Result<void> map_image(const Image& image, const MapOptions& options,
                       const std::function<Result<void>(const MapEntry&)>& sink) {
    const std::uint64_t start = std::min(options.start, image.size());
    const std::uint64_t end =
        options.length > image.size() - start ? image.size() : start + options.length;
    const bool probe = options.probe_host_holes && looks_metadata_preallocated(image);
    std::optional<FileDescriptor> fd;
    if (probe) {
        fd.emplace(image.path());
    }

    MapEntry current;
    current.start = start;
    auto emit = [&](const MapEntry& next) -> Result<void> {
        if (entry_mergeable(current, next)) {
            current.length += next.length;
            return {};
        }
        if (current.length > 0) {
            if (auto ok = sink(current); !ok) {
                return ok;
            }
        }
        current = next;
        return {};
    };

    ExtentIterator it = image.extents(start, end);
    Extent extent;
    while (it.next(extent)) {
        MapEntry entry = entry_of(extent);
        if (!(probe && fd->get() >= 0 && extent.kind == ExtentKind::data)) {
            if (auto ok = emit(entry); !ok) {
                return ok;
            }
            continue;
        }
        // Split the data run at the host file's holes: holes read as zeros (BDRV_BLOCK_RECURSE).
        const std::uint64_t host_end = *extent.host_offset + extent.length;
        std::uint64_t host = *extent.host_offset;
        while (host < host_end) {
            off_t data_at = ::lseek(fd->get(), static_cast<off_t>(host), SEEK_DATA);
            bool hole;
            std::uint64_t until;
            if (data_at < 0 || static_cast<std::uint64_t>(data_at) > host) {
                hole = true;
                until = data_at < 0 ? host_end
                                    : std::min<std::uint64_t>(host_end, static_cast<std::uint64_t>(data_at));
            } else {
                off_t hole_at = ::lseek(fd->get(), static_cast<off_t>(host), SEEK_HOLE);
                hole = false;
                until = hole_at < 0 ? host_end
                                    : std::min<std::uint64_t>(host_end, static_cast<std::uint64_t>(hole_at));
            }
            MapEntry piece = entry;
            piece.start = extent.offset + (host - *extent.host_offset);
            piece.length = until - host;
            piece.offset = host;
            piece.zero = hole;
            if (auto ok = emit(piece); !ok) {
                return ok;
            }
            host = until;
        }
    }
    if (it.failed()) {
        return it.error();
    }
    if (current.length > 0) {
        return sink(current);
    }
    return {};
}

} // namespace qcowmap

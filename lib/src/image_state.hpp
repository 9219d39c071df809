// What an open Image holds: the mapping and the validated, decoded metadata. Immutable.
#pragma once

#include "bytes.hpp"
#include "mapped_file.hpp"
#include "qcow2_format.hpp"

#include <qcowmap/image.hpp>
#include <qcowmap/salvage.hpp>

#include <algorithm>
#include <optional>

namespace qcowmap::detail {

enum class LayerFormat { qcow2, raw };

/// How strictly parse_image reads an image.
struct ParseMode {
    /// qemu's BDRV_O_CHECK, the open `check` does: encrypted images parse (only metadata is
    /// read), an image without a refcount table or with one at offset 0 opens, and the
    /// snapshot table may run past the end of the file, whose missing bytes read as zeros (the
    /// check reports what that means, as qemu-img check does: iotest 080).
    bool check = false;
    /// OpenOptions::salvage: the L1, refcount and snapshot tables may run past the end of the
    /// file; their missing entries read as zeros (unallocated), as qemu reads them.
    bool salvage = false;
    /// `bytes` holds only the start of a file read once as a stream (StreamDecoder): every
    /// header field, extension and table position and size is validated, but no table is read
    /// (the stream decoder reads the L1 and refcount tables as they arrive); the snapshot table
    /// and bitmap directory are not parsed.
    bool stream = false;
};

/// What an image opened with OpenOptions::salvage found damaged (kept by the top layer).
struct SalvageState {
    SalvageReport report;
    /// Compressed clusters that do not decompress, as (layer depth, stream offset), sorted:
    /// the walk reads them as zeros.
    std::vector<std::pair<std::uint32_t, std::uint64_t>> bad_compressed;
    bool bad(std::uint32_t depth, std::uint64_t host_offset) const {
        return std::binary_search(bad_compressed.begin(), bad_compressed.end(),
                                  std::pair{depth, host_offset});
    }
};

/// One layer of a chain: a qcow2/qcow image or a raw file, with the layer below it.
struct ImageState {
    LayerFormat format = LayerFormat::qcow2;
    std::shared_ptr<const MappedFile> file; // null for open_bytes
    Bytes bytes;
    std::filesystem::path path;
    ImageInfo info;
    /// Size of the disk this layer presents: the header's, or the opened snapshot's, or the
    /// raw file's size.
    std::uint64_t disk_size = 0;
    /// Where guest data clusters live: `bytes`, or the external data file's mapping.
    std::shared_ptr<const MappedFile> data_file;
    Bytes data_bytes;
    /// The external data file as resolved (empty when the layer has none or names none), and
    /// why it could not be opened (only with OpenOptions::require_data_file false).
    std::filesystem::path data_file_path;
    std::optional<Error> data_file_error;
    /// The layer below (null at the bottom of the chain or with BackingMode::none).
    std::shared_ptr<const ImageState> backing;
    /// The internal snapshot opened instead of the active disk (name or ID as asked), if any.
    std::optional<std::string> snapshot;

    bool has_data_file() const { return (info.incompatible_features & kIncompatDataFile) != 0; }
    int fd() const { return file ? file->fd() : -1; }
    int data_fd() const { return data_file ? data_file->fd() : fd(); }

    // Derived geometry.
    unsigned cluster_bits = 16;
    std::uint64_t cluster_size = 0;
    unsigned l2_entry_bytes = 8;      // 16 with extended L2 entries
    unsigned l2_bits = 13;            // log2(entries per L2 table)
    unsigned subcluster_bits = 16;    // log2(subcluster size); == cluster_bits without extended L2
    std::uint64_t l2_table_bytes = 0; // one cluster, except in qcow version 1
    Bytes l1_table;                   // the active L1 table, already bounds-checked

    // Compressed cluster descriptor layout (spec "Compressed Clusters Descriptor").
    CompressedLayout compressed_layout;

    /// Length of the encryption header area (full disk encryption header pointer extension).
    std::uint64_t encryption_header_length = 0;

    /// How parse_image treats the file (set before parsing).
    ParseMode mode;
    /// Top layer of an image opened with OpenOptions::salvage: the damage found at open.
    std::shared_ptr<const SalvageState> salvage;

    std::uint64_t l2_coverage() const { return std::uint64_t{1} << (l2_bits + cluster_bits); }
};

/// The layer `depth` steps below `top` (0 is `top` itself), or null.
inline const ImageState* layer_at(const ImageState& top, std::uint32_t depth) {
    const ImageState* layer = &top;
    while (layer && depth-- > 0) {
        layer = layer->backing.get();
    }
    return layer;
}

/// `error`, or image_changed when a file of the chain below `top` changed since it was mapped
/// (Image::explain).
Error explain_change(const ImageState& top, Error error);

/// Reads `out.size()` bytes at `position` with pread, retrying short reads and EINTR. A read
/// error or the end of the file (a file cut short under its mapping) is an io_error naming
/// the offset.
Result<void> read_exactly(const FilePosition& position, std::span<std::byte> out);

/// Walks the whole disk of `image` (opened with OpenOptions::salvage) once, the way every
/// walk will see it, and tries each compressed cluster: the damage, for the top layer.
Result<std::shared_ptr<const SalvageState>> scan_for_salvage(const Image& image);

/// Points the state at snapshot `wanted` (ID first, then name): its L1 table and size.
Result<void> select_snapshot(ImageState& state, const std::string& wanted);

/// Parses and validates the header and L1 table of a qcow version 1 image (block/qcow.c).
Result<void> parse_v1_image(ImageState& state);

/// Parses and validates the header, extensions and active L1 table of `state.bytes` into
/// `state` (everything but `file`/`path`).
Result<void> parse_image(ImageState& state);

/// How a chain is opened beyond the caller's OpenOptions: `check_image` opens like qemu-img
/// check (BDRV_O_CHECK for the top layer) and, for images in memory, without the data file.
struct OpenMode {
    ParseMode parse;
    bool open_data_file = true;
};

/// The one way to open an image: the file at `path` (names in images resolved against the
/// naming image's directory, or confined with `options.untrusted`) or `bytes` in memory (names
/// resolved by `options.backing_resolver`), its data file and its backing chain.
Result<std::shared_ptr<const ImageState>>
open_chain(const std::filesystem::path& path, const OpenOptions& options, const OpenMode& mode);
Result<std::shared_ptr<const ImageState>> open_chain(Bytes bytes, const OpenOptions& options,
                                                     const OpenMode& mode);

} // namespace qcowmap::detail

namespace qcowmap {
/// The state behind an Image, for the library's own modules (map, parallel visit).
const detail::ImageState& detail_state(const Image& image);
} // namespace qcowmap

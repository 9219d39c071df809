#include "image_state.hpp"

#include <algorithm>
#include <cstring>

namespace qcowmap {

std::string_view to_string(ErrorCode code) {
    switch (code) {
    case ErrorCode::io_error:
        return "io_error";
    case ErrorCode::not_qcow2:
        return "not_qcow2";
    case ErrorCode::unsupported_version:
        return "unsupported_version";
    case ErrorCode::invalid_header:
        return "invalid_header";
    case ErrorCode::unsupported_feature:
        return "unsupported_feature";
    case ErrorCode::encrypted:
        return "encrypted";
    case ErrorCode::invalid_table:
        return "invalid_table";
    case ErrorCode::invalid_cluster:
        return "invalid_cluster";
    case ErrorCode::compressed_data:
        return "compressed_data";
    case ErrorCode::out_of_range:
        return "out_of_range";
    case ErrorCode::invalid_argument:
        return "invalid_argument";
    }
    return "unknown";
}

std::string_view to_string(ExtentKind kind) {
    switch (kind) {
    case ExtentKind::data:
        return "data";
    case ExtentKind::zero:
        return "zero";
    case ExtentKind::compressed:
        return "compressed";
    }
    return "unknown";
}

std::string_view version() {
    return QCOWMAP_VERSION;
}

Image::Image(std::shared_ptr<const detail::ImageState> state) : state_(std::move(state)) {}

const detail::ImageState& detail_state(const Image& image) {
    return *image.state_;
}

namespace {

constexpr std::uint32_t kQcowMagic = 0x514649fb; // "QFI\xfb", qcow2 and qcow version 1

/// What one `open` has visited so far: the files of the chain, to refuse loops.
struct ChainWalk {
    std::vector<std::pair<std::uint64_t, std::uint64_t>> identities;
    std::vector<std::string> names;
};

std::filesystem::path relative_to_image(const std::filesystem::path& image,
                                        const std::string& name) {
    std::filesystem::path named(name);
    // qemu resolves a relative backing file name against the directory of the image naming it.
    return named.is_absolute() ? named : image.parent_path() / named;
}

Result<std::shared_ptr<detail::ImageState>> open_layer(const std::filesystem::path& path,
                                                       std::optional<std::string> format,
                                                       const OpenOptions& options, bool top,
                                                       ChainWalk& walk);

/// Opens a backing layer; problems with the file itself name it ("backing file PATH: ..."),
/// problems further down the chain come back as they are.
Result<std::shared_ptr<detail::ImageState>> open_backing(const std::filesystem::path& path,
                                                         std::optional<std::string> format,
                                                         const OpenOptions& options,
                                                         ChainWalk& walk) {
    const std::size_t depth = walk.names.size();
    auto layer = open_layer(path, std::move(format), options, false, walk);
    if (!layer && walk.names.size() <= depth + 1 &&
        !layer.error().message.starts_with("backing chain")) {
        return Error{layer.error().code,
                     fmt::format("backing file {}: {}", detail::printable(path.string()),
                                 layer.error().message)};
    }
    return layer;
}

Result<std::shared_ptr<detail::ImageState>> open_layer(const std::filesystem::path& path,
                                                       std::optional<std::string> format,
                                                       const OpenOptions& options, bool top,
                                                       ChainWalk& walk) {
    if (format && *format != "raw" && *format != "qcow2" && *format != "qcow") {
        return Error{ErrorCode::unsupported_feature,
                     fmt::format("backing file format '{}' is not supported (raw and qcow2 are)",
                                 detail::printable(*format))};
    }
    const bool raw_requested = format && *format == "raw";
    auto file = detail::MappedFile::open(path, /*allow_empty=*/!top || raw_requested);
    if (!file) {
        if (top) { // a backing layer is named by open_backing
            return Error{file.error().code, fmt::format("{}: {}", detail::printable(path.string()),
                                                        file.error().message)};
        }
        return std::move(file).error();
    }
    std::string name = path.string();
    for (std::size_t i = 0; i < walk.identities.size(); ++i) {
        if (walk.identities[i] == file->identity()) {
            std::string chain;
            for (const std::string& n : walk.names)
                chain += detail::printable(n) + " -> ";
            return Error{ErrorCode::invalid_table,
                         fmt::format("backing chain loops: {}{}", chain, detail::printable(name))};
        }
    }
    if (walk.identities.size() >= kMaxChainLayers) {
        return Error{ErrorCode::invalid_table,
                     fmt::format("backing chain is deeper than {} layers", kMaxChainLayers)};
    }
    walk.identities.push_back(file->identity());
    walk.names.push_back(name);

    auto state = std::make_shared<detail::ImageState>();
    auto mapped = std::make_shared<const detail::MappedFile>(std::move(*file));
    state->bytes = mapped->bytes();
    state->data_bytes = state->bytes;
    state->file = std::move(mapped);
    state->path = path;

    const bool looks_qcow =
        state->bytes.size() >= 4 && detail::load_be32(state->bytes.data()) == kQcowMagic;
    if (raw_requested || (!format && !looks_qcow && !top)) {
        // A raw layer: every byte of the file is guest data (holes read as zeros).
        state->format = detail::LayerFormat::raw;
        state->disk_size = state->bytes.size();
        state->info.virtual_size = state->disk_size;
        state->info.file_size = state->disk_size;
        return state;
    }
    if (auto ok = detail::parse_image(*state); !ok) {
        return std::move(ok).error();
    }
    const ImageInfo& info = state->info;
    if (top && options.snapshot) {
        if (info.version == 1) {
            return Error{ErrorCode::invalid_argument, "qcow version 1 images have no snapshots"};
        }
        if (auto ok = detail::select_snapshot(*state, *options.snapshot); !ok) {
            return std::move(ok).error();
        }
        state->snapshot = *options.snapshot;
    }
    if (state->has_data_file()) {
        std::optional<std::filesystem::path> data_path;
        if (top && options.data_file) {
            data_path = *options.data_file;
        } else if (info.data_file) {
            data_path = relative_to_image(path, *info.data_file);
        }
        Result<detail::MappedFile> data =
            Error{ErrorCode::invalid_header,
                  "the external data file bit is set but the image names no data file"};
        if (data_path) {
            state->data_file_path = *data_path;
            data = detail::MappedFile::open(*data_path, /*allow_empty=*/true);
            if (!data) {
                data = Error{data.error().code,
                             fmt::format("data file {}: {}", detail::printable(data_path->string()),
                                         data.error().message)};
            }
        }
        if (data) {
            auto data_file = std::make_shared<const detail::MappedFile>(std::move(*data));
            state->data_bytes = data_file->bytes();
            state->data_file = std::move(data_file);
        } else if (top && !options.require_data_file) {
            state->data_bytes = {}; // never the image file: data clusters must not read from it
            state->data_file_error = std::move(data).error();
        } else {
            return std::move(data).error();
        }
    }
    const bool has_backing = info.backing_file || (top && options.backing_file);
    if (has_backing && options.backing == BackingMode::follow) {
        std::filesystem::path backing_path = top && options.backing_file
                                                 ? *options.backing_file
                                                 : relative_to_image(path, *info.backing_file);
        std::optional<std::string> backing_format =
            top && options.backing_format ? options.backing_format : info.backing_format;
        auto backing = open_backing(backing_path, backing_format, options, walk);
        if (!backing) {
            return std::move(backing).error();
        }
        state->backing = std::move(*backing);
    }
    return state;
}

} // namespace

Result<Image> Image::open(const std::filesystem::path& path, const OpenOptions& options) {
    ChainWalk walk;
    if (options.format && *options.format != "raw" && *options.format != "qcow2") {
        return Error{ErrorCode::invalid_argument,
                     fmt::format("image format '{}' is not supported (raw and qcow2 are)",
                                 detail::printable(*options.format))};
    }
    // A raw top image is opened as a raw layer: open_layer's format argument is "raw" only then.
    std::optional<std::string> top_format;
    if (options.format == "raw")
        top_format = "raw";
    auto state = open_layer(path, top_format, options, true, walk);
    if (!state) {
        return std::move(state).error();
    }
    return Image(std::move(*state));
}

namespace {

/// One layer of an in-memory chain: `bytes` parsed as qcow2/qcow (or taken as raw), and the
/// layers below it found through the resolver. `seen` holds the start of every layer's bytes
/// so far, to refuse loops.
Result<std::shared_ptr<detail::ImageState>> open_bytes_layer(std::span<const std::byte> bytes,
                                                             std::optional<std::string> format,
                                                             const OpenOptions& options, bool top,
                                                             std::vector<const std::byte*>& seen) {
    if (std::find(seen.begin(), seen.end(), bytes.data()) != seen.end() && !bytes.empty()) {
        return Error{ErrorCode::invalid_table, "backing chain loops (the same bytes twice)"};
    }
    if (seen.size() >= kMaxChainLayers) {
        return Error{ErrorCode::invalid_table,
                     fmt::format("backing chain is deeper than {} layers", kMaxChainLayers)};
    }
    seen.push_back(bytes.data());
    if (format && *format != "raw" && *format != "qcow2" && *format != "qcow") {
        return Error{ErrorCode::unsupported_feature,
                     fmt::format("backing file format '{}' is not supported (raw and qcow2 are)",
                                 detail::printable(*format))};
    }
    auto state = std::make_shared<detail::ImageState>();
    state->bytes = bytes;
    state->data_bytes = bytes;
    const bool looks_qcow = bytes.size() >= 4 && detail::load_be32(bytes.data()) == kQcowMagic;
    if ((format && *format == "raw") || (!format && !looks_qcow && !top)) {
        state->format = detail::LayerFormat::raw;
        state->disk_size = bytes.size();
        state->info.virtual_size = state->disk_size;
        state->info.file_size = state->disk_size;
        return state;
    }
    if (auto ok = detail::parse_image(*state); !ok) {
        return std::move(ok).error();
    }
    if (top && options.snapshot) {
        if (state->info.version == 1) {
            return Error{ErrorCode::invalid_argument, "qcow version 1 images have no snapshots"};
        }
        if (auto ok = detail::select_snapshot(*state, *options.snapshot); !ok) {
            return std::move(ok).error();
        }
        state->snapshot = *options.snapshot;
    }
    if (state->has_data_file()) {
        return Error{ErrorCode::unsupported_feature,
                     fmt::format("an image in memory cannot use its external data file '{}'",
                                 detail::printable(state->info.data_file.value_or("")))};
    }
    if (state->info.backing_file && options.backing == BackingMode::follow) {
        const std::string& name = *state->info.backing_file;
        if (!options.backing_resolver) {
            return Error{ErrorCode::unsupported_feature,
                         fmt::format("backing file '{}' cannot be opened for an image in memory "
                                     "(open with BackingMode::none or give a backing_resolver)",
                                     detail::printable(name))};
        }
        auto backing_bytes = options.backing_resolver(name);
        if (!backing_bytes) {
            return Error{
                ErrorCode::io_error,
                fmt::format("backing file {}: not found by the resolver", detail::printable(name))};
        }
        auto backing =
            open_bytes_layer(*backing_bytes, state->info.backing_format, options, false, seen);
        if (!backing) {
            return std::move(backing).error();
        }
        state->backing = std::move(*backing);
    }
    return state;
}

} // namespace

Result<Image> Image::open_bytes(std::span<const std::byte> bytes, const OpenOptions& options) {
    std::vector<const std::byte*> seen;
    auto state = open_bytes_layer(bytes, std::nullopt, options, true, seen);
    if (!state) {
        return std::move(state).error();
    }
    return Image(std::move(*state));
}

bool Image::maps_file(std::uint64_t device, std::uint64_t inode) const {
    const std::pair<std::uint64_t, std::uint64_t> wanted{device, inode};
    for (const detail::ImageState* layer = state_.get(); layer; layer = layer->backing.get()) {
        if ((layer->file && layer->file->identity() == wanted) ||
            (layer->data_file && layer->data_file->identity() == wanted)) {
            return true;
        }
    }
    return false;
}

std::vector<LayerInfo> Image::layers() const {
    std::vector<LayerInfo> result;
    for (const detail::ImageState* layer = state_.get(); layer; layer = layer->backing.get()) {
        std::string format = layer->format == detail::LayerFormat::raw ? "raw"
                             : layer->info.version == 1                ? "qcow"
                                                                       : "qcow2";
        result.push_back({layer->path, format, layer->disk_size});
    }
    return result;
}

std::uint64_t Image::size() const {
    return state_->disk_size;
}
const ImageInfo& Image::info() const {
    return state_->info;
}
const std::filesystem::path& Image::path() const {
    return state_->path;
}
std::span<const std::byte> Image::file_bytes() const {
    return state_->bytes;
}

ExtentRange Image::extents(std::uint64_t start, std::uint64_t end) const {
    return ExtentRange(detail::ExtentWalk(state_, start, end));
}

Result<std::size_t> Image::read(std::span<std::byte> dest, std::uint64_t offset) const {
    const std::uint64_t disk_size = size();
    if (offset > disk_size) {
        return Error{ErrorCode::out_of_range,
                     fmt::format("read at offset {:#x} is beyond the end of the disk ({:#x})",
                                 offset, disk_size)};
    }
    const std::uint64_t length = std::min<std::uint64_t>(dest.size(), disk_size - offset);
    // A thin layer over visit: the same walk and decompression, copied into `dest`.
    auto ok = visit(offset, offset + length, [&](const Run& run) -> Result<void> {
        std::byte* out = dest.data() + (run.offset - offset);
        if (run.bytes.empty()) {
            std::memset(out, 0, run.length);
        } else {
            std::memcpy(out, run.bytes.data(), run.length);
        }
        return {};
    });
    if (!ok) {
        return std::move(ok).error();
    }
    return static_cast<std::size_t>(length);
}

} // namespace qcowmap

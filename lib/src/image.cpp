#include "image_state.hpp"

#include <cstring>

namespace qcowmap {

std::string_view to_string(ErrorCode code) {
    switch (code) {
    case ErrorCode::io_error: return "io_error";
    case ErrorCode::not_qcow2: return "not_qcow2";
    case ErrorCode::unsupported_version: return "unsupported_version";
    case ErrorCode::invalid_header: return "invalid_header";
    case ErrorCode::unsupported_feature: return "unsupported_feature";
    case ErrorCode::encrypted: return "encrypted";
    case ErrorCode::invalid_table: return "invalid_table";
    case ErrorCode::invalid_cluster: return "invalid_cluster";
    case ErrorCode::compressed_data: return "compressed_data";
    case ErrorCode::out_of_range: return "out_of_range";
    case ErrorCode::invalid_argument: return "invalid_argument";
    }
    return "unknown";
}

Image::Image(std::shared_ptr<const detail::ImageState> state) : state_(std::move(state)) {}

Result<Image> Image::open(const std::filesystem::path& path, const OpenOptions& options) {
    auto file = detail::MappedFile::open(path);
    if (!file) {
        return std::move(file).error();
    }
    auto state = std::make_shared<detail::ImageState>();
    state->bytes = file->bytes();
    state->file.emplace(std::move(*file));
    state->path = path;
    if (auto ok = detail::parse_image(*state, options); !ok) {
        return std::move(ok).error();
    }
    return Image(std::move(state));
}

Result<Image> Image::open_bytes(std::span<const std::byte> bytes, const OpenOptions& options) {
    auto state = std::make_shared<detail::ImageState>();
    state->bytes = bytes;
    if (auto ok = detail::parse_image(*state, options); !ok) {
        return std::move(ok).error();
    }
    return Image(std::move(state));
}

std::uint64_t Image::size() const { return state_->info.virtual_size; }
const ImageInfo& Image::info() const { return state_->info; }
const std::filesystem::path& Image::path() const { return state_->path; }
std::span<const std::byte> Image::file_bytes() const { return state_->bytes; }

ExtentIterator Image::extents(std::uint64_t start, std::uint64_t end) const {
    return ExtentIterator(state_, start, end);
}

Result<std::size_t> Image::read(std::span<std::byte> dest, std::uint64_t offset) const {
    const std::uint64_t disk_size = size();
    if (offset > disk_size) {
        return Error{ErrorCode::out_of_range,
                     fmt::format("read at offset {:#x} is beyond the end of the disk ({:#x})",
                                 offset, disk_size)};
    }
    const std::uint64_t length = std::min<std::uint64_t>(dest.size(), disk_size - offset);
    ExtentIterator it = extents(offset, offset + length);
    std::optional<Decompressor> decompressor;
    Extent extent;
    while (it.next(extent)) {
        std::byte* out = dest.data() + (extent.offset - offset);
        switch (extent.kind) {
        case ExtentKind::data:
            std::memcpy(out, extent.bytes.data(), extent.length);
            break;
        case ExtentKind::zero:
            std::memset(out, 0, extent.length);
            break;
        case ExtentKind::compressed: {
            if (!decompressor) {
                decompressor.emplace();
            }
            auto bytes = decompressor->decompress(*this, extent);
            if (!bytes) {
                return std::move(bytes).error();
            }
            std::memcpy(out, bytes->data(), extent.length);
            break;
        }
        }
    }
    if (it.failed()) {
        return it.error();
    }
    return static_cast<std::size_t>(length);
}

Result<void> Image::visit_runs(std::uint64_t start, std::uint64_t end,
                               const RunVisitor& visitor) const {
    ExtentIterator it = extents(start, end);
    std::optional<Decompressor> decompressor;
    Extent extent;
    while (it.next(extent)) {
        std::span<const std::byte> bytes;
        if (extent.kind == ExtentKind::data) {
            bytes = extent.bytes;
        } else if (extent.kind == ExtentKind::compressed) {
            if (!decompressor) {
                decompressor.emplace();
            }
            auto produced = decompressor->decompress(*this, extent);
            if (!produced) {
                return std::move(produced).error();
            }
            bytes = *produced;
        }
        if (auto ok = visitor(extent.offset, extent.length, bytes); !ok) {
            return ok;
        }
    }
    if (it.failed()) {
        return it.error();
    }
    return {};
}

} // namespace qcowmap

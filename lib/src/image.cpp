#include "errors.hpp"
#include "fault.hpp"
#include "image_lock.hpp"
#include "image_state.hpp"
#include "populate.hpp"
#include "references.hpp"

#include <qcowmap/references.hpp>
#include <qcowmap/salvage.hpp>

#include <algorithm>
#include <cstring>
#include <tuple>

#include <sys/stat.h>

namespace qcowmap {

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

namespace detail {
namespace {

using Identity = std::pair<std::uint64_t, std::uint64_t>;

/// The bytes of one layer (or data file) as a source produced them.
struct LayerBytes {
    Bytes bytes;
    std::shared_ptr<const MappedFile> file; // null in memory
    std::filesystem::path path;             // as opened; empty in memory
    Identity identity;                      // to recognise a layer met twice
};

/// What one open has visited so far: the layers of the chain, to refuse loops.
struct ChainWalk {
    std::vector<Identity> identities;
    std::vector<std::string> names;
};

/// Where the layers of a chain come from: files, or memory through a resolver. The one
/// layer-opening routine below (open_layer) asks a source for the bytes of each backing file
/// and data file; parsing, loops, depth, raw layers and snapshots are shared.
class LayerSource {
  public:
    virtual ~LayerSource() = default;
    /// The backing file `name` of `layer`: from its header, or the caller's (`caller_given`).
    virtual Result<LayerBytes> backing(const ImageState& layer, const std::string& name,
                                       bool caller_given) = 0;
    /// The external data file of `layer`, `name` as above (nullopt when there is none).
    virtual Result<LayerBytes> data_file(const ImageState& layer,
                                         const std::optional<std::string>& name,
                                         bool caller_given) = 0;
    /// The path a name given by `layer` (or the caller) stands for; empty in memory.
    virtual std::filesystem::path path_of(const ImageState& layer, const std::string& name,
                                          bool caller_given) const = 0;
    /// The error for a chain that reaches a layer a second time.
    virtual Error loop(const ChainWalk& walk, const std::string& name) const = 0;
    /// Whether errors about a backing layer itself are prefixed with its path.
    virtual bool names_backing_errors() const = 0;
};

std::filesystem::path relative_to_image(const std::filesystem::path& image,
                                        const std::string& name) {
    std::filesystem::path named(name);
    // qemu resolves a relative backing file name against the directory of the image naming it.
    return named.is_absolute() ? named : image.parent_path() / named;
}

class FileSource final : public LayerSource {
  public:
    explicit FileSource(bool untrusted) : untrusted_(untrusted) {}

    static Result<LayerBytes> map(Result<MappedFile> file, const std::filesystem::path& path) {
        if (!file) {
            return std::move(file).error();
        }
        auto mapped = std::make_shared<const MappedFile>(std::move(*file));
        LayerBytes out{mapped->bytes(), mapped, path, mapped->identity()};
        return out;
    }

    /// Opens a name read from an image: as qemu does, or confined (OpenOptions::untrusted).
    Result<LayerBytes> open_named(const ImageState& layer, const std::string& name,
                                  ErrorOrigin origin) const {
        if (!untrusted_) {
            const std::filesystem::path path = relative_to_image(layer.path, name);
            return map(MappedFile::open(path, /*allow_empty=*/true), path);
        }
        auto confined = open_confined(layer.path, name, origin);
        if (!confined) {
            return std::move(confined).error();
        }
        return map(MappedFile::open_fd(confined->fd, confined->path, /*allow_empty=*/true),
                   confined->path);
    }

    Result<LayerBytes> backing(const ImageState& layer, const std::string& name,
                               bool caller_given) override {
        if (caller_given) {
            // Relative paths from the caller are taken from the current directory.
            return with_name(ErrorOrigin::backing, name,
                             map(MappedFile::open(name, /*allow_empty=*/true), name));
        }
        return with_name(ErrorOrigin::backing, relative_to_image(layer.path, name).string(),
                         open_named(layer, name, ErrorOrigin::backing));
    }

    Result<LayerBytes> data_file(const ImageState& layer, const std::optional<std::string>& name,
                                 bool caller_given) override {
        if (!name) {
            Error error{ErrorCode::invalid_header,
                        "the external data file bit is set but the image names no data file"};
            return attribute(refusal(std::move(error), Refusal::no_data_file_name),
                             ErrorOrigin::data_file, {});
        }
        if (caller_given) {
            return with_name(ErrorOrigin::data_file, *name,
                             map(MappedFile::open(*name, /*allow_empty=*/true), *name));
        }
        return with_name(ErrorOrigin::data_file, relative_to_image(layer.path, *name).string(),
                         open_named(layer, *name, ErrorOrigin::data_file));
    }

    std::filesystem::path path_of(const ImageState& layer, const std::string& name,
                                  bool caller_given) const override {
        return caller_given ? std::filesystem::path(name) : relative_to_image(layer.path, name);
    }

    Error loop(const ChainWalk& walk, const std::string& name) const override {
        std::string chain;
        for (const std::string& n : walk.names)
            chain += printable(n) + " -> ";
        return refusal(Error{ErrorCode::invalid_table,
                             fmt::format("backing chain loops: {}{}", chain, printable(name))},
                       Refusal::backing_chain_loop);
    }
    bool names_backing_errors() const override { return true; }

  private:
    /// "backing file PATH: what went wrong" for a file that could not be opened or mapped
    /// (errors of the confined open already name the path and their origin).
    static Result<LayerBytes> with_name(ErrorOrigin origin, const std::string& path,
                                        Result<LayerBytes> opened) {
        if (opened || opened.error().origin != ErrorOrigin::none) {
            return opened;
        }
        Error error = std::move(opened).error();
        error.message =
            fmt::format("{} {}: {}", origin == ErrorOrigin::backing ? "backing file" : "data file",
                        printable(path), error.message);
        return attribute(std::move(error), origin, path);
    }

    bool untrusted_;
};

class MemorySource final : public LayerSource {
  public:
    explicit MemorySource(const OpenOptions& options) : options_(options) {}

    Result<LayerBytes> backing(const ImageState&, const std::string& name, bool) override {
        if (!options_.backing_resolver) {
            return attribute(
                Error{ErrorCode::unsupported_feature,
                      fmt::format("backing file '{}' cannot be opened for an image in memory "
                                  "(open with BackingMode::none or give a backing_resolver)",
                                  printable(name))},
                ErrorOrigin::backing, {});
        }
        auto bytes = options_.backing_resolver(name);
        if (!bytes) {
            return attribute(Error{ErrorCode::io_error, fmt::format("backing file {}: not found "
                                                                    "by the resolver",
                                                                    printable(name))},
                             ErrorOrigin::backing, {});
        }
        // Layers are told apart by where their bytes start; empty ones are all alike.
        const auto start = reinterpret_cast<std::uintptr_t>(bytes->data());
        return LayerBytes{*bytes, nullptr, {}, {bytes->empty() ? 0 : start, 0}};
    }

    Result<LayerBytes> data_file(const ImageState& layer, const std::optional<std::string>&,
                                 bool) override {
        return attribute(
            Error{ErrorCode::unsupported_feature,
                  fmt::format("an image in memory cannot use its external data file '{}'",
                              printable(layer.info.data_file.value_or("")))},
            ErrorOrigin::data_file, {});
    }

    std::filesystem::path path_of(const ImageState&, const std::string&, bool) const override {
        return {};
    }

    Error loop(const ChainWalk&, const std::string&) const override {
        return refusal(
            Error{ErrorCode::invalid_table, "backing chain loops (the same bytes twice)"},
            Refusal::backing_chain_loop);
    }
    bool names_backing_errors() const override { return false; }

  private:
    const OpenOptions& options_;
};

Result<void> check_format(const std::optional<std::string>& format) {
    if (format && *format != "raw" && *format != "qcow2" && *format != "qcow") {
        return Error{ErrorCode::unsupported_feature,
                     fmt::format("backing file format '{}' is not supported (raw and qcow2 are)",
                                 printable(*format))};
    }
    return {};
}

Result<std::shared_ptr<ImageState>> open_layer(LayerSource& source, LayerBytes opened,
                                               const std::optional<std::string>& format,
                                               const OpenOptions& options, const OpenMode& mode,
                                               bool top, ChainWalk& walk);

/// The error of layer `depth` (0: the image), said to be about it unless it names its origin.
Error layer_error(Error error, const ImageState& layer, std::uint32_t depth) {
    return attribute(std::move(error), depth == 0 ? ErrorOrigin::image : ErrorOrigin::backing,
                     layer.path.string(), depth);
}

/// The external data file of `state` (layer `depth`), opened through `source`.
Result<void> open_data_file(LayerSource& source, ImageState& state, const OpenOptions& options,
                            bool top, std::uint32_t depth) {
    const bool caller_given = top && options.data_file.has_value();
    std::optional<std::string> data_name =
        caller_given ? std::optional<std::string>(options.data_file->string())
                     : state.info.data_file;
    if (data_name) {
        state.data_file_path = source.path_of(state, *data_name, caller_given);
    }
    auto data = source.data_file(state, data_name, caller_given);
    if (data && data->file && !options.force_share) {
        if (auto locked = lock_image(data->file->fd(), kReaderLock); !locked) {
            const std::string data_path = data->path.string();
            Error error = std::move(locked).error();
            error.message = fmt::format("data file {}: {}", printable(data_path), error.message);
            data = attribute(std::move(error), ErrorOrigin::data_file, data_path, depth);
        }
    }
    if (data) {
        state.data_bytes = data->bytes;
        state.data_file = std::move(data->file);
        return {};
    }
    Error error = std::move(data).error();
    error.depth = depth;
    if (top && !options.require_data_file) {
        state.data_bytes = {}; // never the image file: data clusters must not read from it
        state.data_file_error = std::move(error);
        return {};
    }
    return error;
}

/// The layers below `state` (layer `depth`): its backing file (or the caller's) opened through
/// `source` and parsed, recursively.
Result<void> open_backing(LayerSource& source, ImageState& state, const OpenOptions& options,
                          const OpenMode& mode, bool top, std::uint32_t depth, ChainWalk& walk) {
    const ImageInfo& info = state.info;
    const bool caller_backing = top && options.backing_file.has_value();
    const std::string backing_name =
        caller_backing ? options.backing_file->string() : *info.backing_file;
    std::optional<std::string> backing_format =
        top && options.backing_format ? options.backing_format : info.backing_format;
    if (auto ok = check_format(backing_format); !ok) {
        return layer_error(std::move(ok).error(), state, depth);
    }
    auto below_bytes = source.backing(state, backing_name, caller_backing);
    if (!below_bytes) {
        Error error = std::move(below_bytes).error();
        error.depth = depth + 1;
        return error;
    }
    const std::string below_path = below_bytes->path.string();
    auto below =
        open_layer(source, std::move(*below_bytes), backing_format, options, mode, false, walk);
    if (!below) {
        // Problems with the backing file itself (or its data file) name it; problems further
        // down, and with the chain as a whole, come back as they are.
        Error error = std::move(below).error();
        const bool chain = error.refusal == Refusal::backing_chain_loop ||
                           error.refusal == Refusal::backing_chain_depth;
        if (source.names_backing_errors() && error.depth == depth + 1 && !chain) {
            error.message =
                fmt::format("backing file {}: {}", printable(below_path), error.message);
        }
        return error;
    }
    state.backing = std::move(*below);
    return {};
}

/// The one layer-opening routine: `opened` parsed as raw or qcow2/qcow (after the loop and
/// depth checks), its snapshot selected (top layer), its data file and the layers below it
/// opened through `source`. Errors name their origin: the layer, its data file or one below.
Result<std::shared_ptr<ImageState>> open_layer(LayerSource& source, LayerBytes opened,
                                               const std::optional<std::string>& format,
                                               const OpenOptions& options, const OpenMode& mode,
                                               bool top, ChainWalk& walk) {
    const auto depth = static_cast<std::uint32_t>(walk.names.size());
    const std::string name = opened.path.string();
    const ErrorOrigin origin = top ? ErrorOrigin::image : ErrorOrigin::backing;
    if (opened.identity != Identity{0, 0} || opened.file) {
        for (const Identity& seen : walk.identities) {
            if (seen == opened.identity) {
                return attribute(source.loop(walk, name), origin, name, depth);
            }
        }
    }
    if (walk.identities.size() >= kMaxChainLayers) {
        Error error{ErrorCode::invalid_table,
                    fmt::format("backing chain is deeper than {} layers", kMaxChainLayers)};
        return attribute(refusal(std::move(error), Refusal::backing_chain_depth), origin, name,
                         depth);
    }
    walk.identities.push_back(opened.identity);
    walk.names.push_back(name);
    if (opened.file && !options.force_share) {
        // As qemu-img takes them on every file of the chain it opens (see image_lock.hpp):
        // before parsing, so that no writer starts between our look and our lock.
        if (auto locked = lock_image(opened.file->fd(), kReaderLock); !locked) {
            return attribute(std::move(locked).error(), origin, name, depth);
        }
    }

    auto state = std::make_shared<ImageState>();
    state->bytes = opened.bytes;
    state->data_bytes = opened.bytes;
    state->file = std::move(opened.file);
    state->path = std::move(opened.path);
    if (top) {
        state->mode = mode.parse;
    }
    state->mode.salvage = options.salvage;

    const bool raw_requested = format && *format == "raw";
    const bool looks_qcow =
        state->bytes.size() >= 4 && load_be32(state->bytes.data()) == kQcowMagic;
    if (raw_requested || (!format && !looks_qcow && !top)) {
        // A raw layer: every byte of the file is guest data (holes read as zeros).
        state->format = LayerFormat::raw;
        state->disk_size = state->bytes.size();
        state->info.virtual_size = state->disk_size;
        state->info.file_size = state->disk_size;
        return state;
    }
    if (auto ok = parse_image(*state); !ok) {
        return layer_error(std::move(ok).error(), *state, depth);
    }
    const ImageInfo& info = state->info;
    if (top && options.snapshot) {
        if (info.version == 1) {
            return layer_error(
                Error{ErrorCode::invalid_argument, "qcow version 1 images have no snapshots"},
                *state, depth);
        }
        if (auto ok = select_snapshot(*state, *options.snapshot); !ok) {
            return layer_error(std::move(ok).error(), *state, depth);
        }
        state->snapshot = *options.snapshot;
    }
    if (state->has_data_file() && mode.open_data_file) {
        if (auto ok = open_data_file(source, *state, options, top, depth); !ok) {
            return std::move(ok).error();
        }
    }
    if (top && options.data_file && !state->has_data_file()) {
        // As qemu refuses a data-file option for such an image (qcow2_do_open): silently
        // ignoring it would read another disk than the caller meant.
        return Error{ErrorCode::invalid_argument,
                     fmt::format("a data file ('{}') was given, but the image has no external "
                                 "data file: 'data-file' can only be set for images with an "
                                 "external data file",
                                 printable(options.data_file->string()))};
    }
    const bool caller_backing = top && options.backing_file.has_value();
    if ((info.backing_file || caller_backing) && options.backing == BackingMode::follow) {
        if (auto ok = open_backing(source, *state, options, mode, top, depth, walk); !ok) {
            return std::move(ok).error();
        }
    }
    return state;
}

} // namespace

Result<std::shared_ptr<const ImageState>>
open_chain(const std::filesystem::path& path, const OpenOptions& options, const OpenMode& mode) {
    if (options.format && *options.format != "raw" && *options.format != "qcow2") {
        return Error{ErrorCode::invalid_argument,
                     fmt::format("image format '{}' is not supported (raw and qcow2 are)",
                                 printable(*options.format))};
    }
    // A raw top image is opened as a raw layer: open_layer's format is "raw" only then.
    std::optional<std::string> top_format;
    if (options.format == "raw")
        top_format = "raw";
    auto top =
        FileSource::map(MappedFile::open(path, /*allow_empty=*/top_format.has_value()), path);
    if (!top) {
        // MappedFile says what is wrong without naming the file: name it.
        Error error = std::move(top).error();
        error.message = fmt::format("{}: {}", printable(path.string()), error.message);
        error.message_names_path = true;
        return attribute(std::move(error), ErrorOrigin::image, path.string());
    }
    FileSource source(options.untrusted);
    ChainWalk walk;
    auto state = open_layer(source, std::move(*top), top_format, options, mode, true, walk);
    if (!state) {
        return std::move(state).error();
    }
    return std::shared_ptr<const ImageState>(std::move(*state));
}

Result<std::shared_ptr<const ImageState>> open_chain(Bytes bytes, const OpenOptions& options,
                                                     const OpenMode& mode) {
    MemorySource source(options);
    ChainWalk walk;
    const auto start = reinterpret_cast<std::uintptr_t>(bytes.data());
    LayerBytes top{bytes, nullptr, {}, {bytes.empty() ? 0 : start, 0}};
    auto state = open_layer(source, top, std::nullopt, options, mode, true, walk);
    if (!state) {
        return std::move(state).error();
    }
    return std::shared_ptr<const ImageState>(std::move(*state));
}

} // namespace detail

namespace detail {
namespace {

/// A copy of the top layer carrying the damage a salvage scan found (the layers below are
/// shared).
std::shared_ptr<const ImageState> with_salvage(const ImageState& top,
                                               std::shared_ptr<const SalvageState> salvage) {
    auto copy = std::make_shared<ImageState>(top);
    copy->salvage = std::move(salvage);
    return copy;
}

} // namespace
} // namespace detail

/// The image of a chain `open_chain` opened; with `salvage`, its damage found once, with the
/// walk every reader will make.
Result<Image> Image::from_chain(Result<std::shared_ptr<const detail::ImageState>> state,
                                const OpenOptions& options) {
    if (!state) {
        return std::move(state).error();
    }
    if (options.salvage) {
        auto scan = detail::scan_for_salvage(Image(*state));
        if (!scan) {
            return std::move(scan).error();
        }
        *state = detail::with_salvage(**state, std::move(*scan));
    }
    return Image(std::move(*state));
}

Result<Image> Image::open(const std::filesystem::path& path, const OpenOptions& options) {
    return detail::contain_faults(
        path, [&] { return from_chain(detail::open_chain(path, options, {}), options); });
}

Result<Image> Image::open_bytes(std::span<const std::byte> bytes, const OpenOptions& options) {
    return detail::contain_faults(
        {}, [&] { return from_chain(detail::open_chain(bytes, options, {}), options); });
}

const SalvageReport& salvage_report(const Image& image) {
    static const SalvageReport none;
    const auto& salvage = detail_state(image).salvage;
    return salvage ? salvage->report : none;
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
        LayerInfo info{layer->path, format, layer->disk_size};
        if (layer->file)
            std::tie(info.device, info.inode) = layer->file->identity();
        result.push_back(std::move(info));
    }
    return result;
}

namespace detail {

Error explain_change(const ImageState& top, Error error) {
    if (error.code == ErrorCode::image_changed)
        return error;
    for (const ImageState* layer = &top; layer; layer = layer->backing.get()) {
        for (const MappedFile* file : {layer->file.get(), layer->data_file.get()}) {
            if (file && file->changed()) {
                // Say how, when the size tells: a file cut short is the usual cause of a read
                // past its end.
                struct stat st {};
                std::string how = "was written meanwhile";
                if (!file->is_block_device() && ::fstat(file->fd(), &st) == 0 &&
                    static_cast<std::uint64_t>(st.st_size) != file->bytes().size()) {
                    how = fmt::format("{} from {:#x} to {:#x} bytes meanwhile",
                                      static_cast<std::uint64_t>(st.st_size) < file->bytes().size()
                                          ? "shrank"
                                          : "grew",
                                      file->bytes().size(), st.st_size);
                }
                return image_changed(fmt::format("{} {}", printable(file->name().string()), how));
            }
        }
    }
    return error;
}

} // namespace detail

bool Image::changed_since_open() const {
    for (const detail::ImageState* layer = state_.get(); layer; layer = layer->backing.get()) {
        if ((layer->file && layer->file->changed()) ||
            (layer->data_file && layer->data_file->changed())) {
            return true;
        }
    }
    return false;
}

Error Image::explain(Error error) const {
    return detail::explain_change(*state_, std::move(error));
}

Result<void> Image::check_unchanged() const {
    Error changed = explain(Error{ErrorCode::io_error, {}});
    if (changed.code == ErrorCode::image_changed)
        return changed;
    return {};
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

Result<void> Image::check_readable(std::span<const std::byte> bytes) const {
    return detail::contain_faults(path(), [&]() -> Result<void> {
        detail::populate_pages(bytes, Prefetch::touch);
        return {};
    });
}

Result<std::size_t> Image::read(std::span<std::byte> dest, std::uint64_t offset) const {
    const std::uint64_t disk_size = size();
    if (offset > disk_size) {
        return Error{ErrorCode::out_of_range,
                     fmt::format("read at offset {:#x} is beyond the end of the disk ({:#x})",
                                 offset, disk_size)};
    }
    const std::uint64_t length = std::min<std::uint64_t>(dest.size(), disk_size - offset);
    // A thin layer over visit: the same walk and decompression, copied into `dest`. Inside the
    // fault boundary, so the copy from the mapping is the library's, and a fault in it the
    // read's error.
    auto copy = [&] {
        return visit(offset, offset + length, [&](const Run& run) -> Result<void> {
            std::byte* out = dest.data() + (run.offset - offset);
            if (run.bytes.empty()) {
                std::memset(out, 0, run.length);
            } else {
                std::memcpy(out, run.bytes.data(), run.length);
            }
            return {};
        });
    };
    // A read that ran while another thread's fault made part of a mapping read as zeros (a
    // server's other client reading a bad sector) is made once more: its bytes are then its own.
    Result<void> ok;
    for (int attempt = 0; attempt < detail::kFaultRetries; ++attempt) {
        if (attempt > 0)
            detail::wait_for_faults_to_settle();
        detail::FaultBoundary boundary;
        ok = copy();
        auto fault = boundary.finish(path());
        if (fault && !boundary.own_fault() && attempt + 1 < detail::kFaultRetries)
            continue;
        if (fault && (ok || boundary.own_fault()))
            ok = std::move(*fault);
        break;
    }
    if (!ok) {
        return std::move(ok).error();
    }
    return static_cast<std::size_t>(length);
}

} // namespace qcowmap

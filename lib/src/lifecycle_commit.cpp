// commit(): an overlay's allocated ranges written into a layer of its backing chain, then the
// overlay emptied (qemu-img commit; qemu's block/mirror.c active commit decides what is copied:
// the ranges allocated above the base, zeros as zero writes that may unmap).
#include "lifecycle_internal.hpp"

#include <qcowmap/image.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <sys/stat.h>

namespace qcowmap {
namespace {

Error commit_error(const std::filesystem::path& overlay, ErrorCode code, std::string why) {
    return Error{code, fmt::format("cannot commit {}: {}", overlay.string(), why)};
}

std::optional<std::pair<std::uint64_t, std::uint64_t>>
file_identity(const std::filesystem::path& p) {
    struct stat st {};
    if (::stat(p.c_str(), &st) != 0)
        return std::nullopt;
    return std::pair<std::uint64_t, std::uint64_t>(st.st_dev, st.st_ino);
}

} // namespace

Result<CommitStats> commit(const std::filesystem::path& overlay, const CommitOptions& options) {
    std::vector<LayerInfo> layers;
    {
        auto chain = Image::open(overlay);
        if (!chain)
            return std::move(chain).error();
        layers = chain->layers();
    }
    if (layers.size() < 2)
        return commit_error(overlay, ErrorCode::invalid_argument, "it has no backing file");
    std::size_t base_index = 1;
    if (options.base) {
        const auto wanted = file_identity(*options.base);
        if (!wanted) {
            const int err = errno; // stat's
            Error error =
                commit_error(overlay, ErrorCode::io_error,
                             fmt::format("{}: {}", options.base->string(), std::strerror(err)));
            error.system_errno = err;
            return error;
        }
        base_index = 0;
        for (std::size_t i = 1; i < layers.size(); ++i) {
            if (file_identity(layers[i].path) == wanted) {
                base_index = i;
                break;
            }
        }
        if (base_index == 0) {
            return commit_error(overlay, ErrorCode::invalid_argument,
                                fmt::format("'{}' is not in the backing chain of '{}'",
                                            options.base->string(), overlay.string()));
        }
    }
    if (layers[base_index].format != "qcow2") {
        return commit_error(overlay, ErrorCode::invalid_argument,
                            fmt::format("the base {} is a {} file; only qcow2 bases are written",
                                        layers[base_index].path.string(),
                                        layers[base_index].format));
    }
    const bool empty_overlay = !options.drop && base_index == 1;
    const std::uint64_t size = layers[0].virtual_size;

    // The overlay is held (its lock taken) when it is to be emptied, so nobody writes it
    // between the copy and the emptying.
    std::optional<WritableImage> top;
    if (empty_overlay) {
        // Its writer takes no reader lock on the base below (image_lock.hpp), which we are
        // about to open for writing ourselves.
        WritableOptions top_options;
        top_options.open.force_share = true;
        auto opened = WritableImage::open(overlay, top_options);
        if (!opened)
            return std::move(opened).error();
        top = std::move(*opened);
    }
    WritableOptions base_options;
    base_options.direct_data_writes = options.direct_writes;
    auto base = WritableImage::open(layers[base_index].path, base_options);
    if (!base)
        return std::move(base).error();
    if (base->size() < size) {
        // The base grows to the overlay's size (qemu's mirror_run truncates the base up).
        if (auto ok = base->resize(size); !ok)
            return std::move(ok).error();
    }

    CommitStats stats;
    stats.layers = static_cast<std::uint32_t>(base_index);
    const std::uint64_t total = size * base_index;
    std::uint64_t done_before = 0;
    // Deepest layer first, so that a layer above overwrites what it hides.
    for (std::size_t k = base_index; k-- > 0;) {
        OpenOptions alone;
        alone.backing = BackingMode::none;
        // The overlay, when we hold it for writing, is read under our own writer lock.
        alone.force_share = k == 0 && top.has_value();
        auto layer = Image::open(layers[k].path, alone);
        if (!layer)
            return std::move(layer).error();
        const std::uint64_t end = std::min(size, layer->size());
        auto visited = layer->visit(
            0, end,
            [&](const Run& run) -> Result<void> {
                if (options.progress)
                    options.progress(done_before + run.offset, total);
                if (!run.present)
                    return {};
                if (run.kind == ExtentKind::zero) {
                    stats.zero_bytes += run.length;
                    return base->write_zeroes(run.offset, run.length, true);
                }
                stats.data_bytes += run.length;
                if (run.kind == ExtentKind::compressed)
                    stats.compressed_bytes += run.length;
                return base->write(run.offset, run.bytes);
            },
            detail::copy_visit_options(options.threads));
        if (!visited)
            return std::move(visited).error();
        done_before += size;
    }
    // The base is complete on disk (and its bitmaps stored) before the overlay loses anything.
    if (auto ok = base->close(); !ok)
        return std::move(ok).error();
    if (top) {
        if (auto ok = detail::empty_active_layer(detail_state(*top)); !ok)
            return std::move(ok).error();
        if (auto ok = top->close(); !ok)
            return std::move(ok).error();
        stats.emptied = true;
    }
    if (options.progress)
        options.progress(total, total);
    return stats;
}

} // namespace qcowmap

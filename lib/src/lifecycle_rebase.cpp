// rebase(): an image moved onto another backing file (qemu-img rebase). Safe mode keeps what
// the image reads: where the image does not allocate a range and the old and new backing
// files differ there, the old content is written into the image first (qemu-img.c img_rebase
// compares the two and writes the differing parts while the old backing file is still in
// place, so copy-on-write fills partial clusters from the old chain).
#include "image_lock.hpp"
#include "lifecycle_internal.hpp"
#include "raw_io.hpp"

#include <qcowmap/image.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <unistd.h>

namespace qcowmap {
namespace {

/// Bytes compared per step: long enough to amortise the walks, short enough to stay cached.
constexpr std::uint64_t kChunk = 4 << 20;

Error rebase_error(const std::filesystem::path& image, ErrorCode code, std::string why) {
    return Error{code, fmt::format("cannot rebase {}: {}", image.string(), why)};
}

/// True when every byte of `[start, end)` of `image` reads as zeros by its metadata alone
/// (zero or unallocated extents, or past its end): nothing needs reading there.
Result<bool> zero_by_metadata(const std::optional<Image>& image, std::uint64_t start,
                              std::uint64_t end) {
    if (!image || start >= image->size())
        return true;
    auto extents = image->extents(start, end);
    for (const Extent& e : extents) {
        if (e.kind != ExtentKind::zero)
            return false;
    }
    if (extents.error())
        return *extents.error();
    return true;
}

/// Reads `[offset, offset + out.size())` of `image` (zeros where it has none).
Result<void> read_or_zero(const std::optional<Image>& image, std::span<std::byte> out,
                          std::uint64_t offset, const VisitOptions& how) {
    std::uint64_t done = 0;
    if (image && offset < image->size()) {
        const std::uint64_t end = std::min<std::uint64_t>(offset + out.size(), image->size());
        auto ok = image->visit(
            offset, end,
            [&](const Run& run) -> Result<void> {
                std::byte* to = out.data() + (run.offset - offset);
                if (run.bytes.empty())
                    std::memset(to, 0, run.length);
                else
                    std::memcpy(to, run.bytes.data(), run.length);
                return {};
            },
            how);
        if (!ok)
            return ok;
        done = end - offset;
    }
    std::memset(out.data() + done, 0, out.size() - done);
    return {};
}

bool all_zero(std::span<const std::byte> bytes) {
    return detail::all_zero(bytes.data(), bytes.size());
}

/// Rewrites only the backing reference (unsafe mode, and the last step of safe mode when the
/// writer is not open): under the image's write lock, one header write.
Result<void> rewrite_reference(const std::filesystem::path& path, const detail::HeaderEdit& edit) {
    int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        const int err = errno;
        Error error = rebase_error(path, ErrorCode::io_error, std::strerror(err));
        error.system_errno = err;
        return error;
    }
    WritableImage::State s;
    s.file = detail::FileIo(fd, path.string());
    if (auto ok = detail::lock_image(fd, detail::kWriterLock); !ok)
        return ok;
    // The header is read under our writer lock (so our own view takes no reader lock).
    OpenOptions alone;
    alone.backing = BackingMode::none;
    alone.require_data_file = false;
    alone.force_share = true;
    auto image = Image::open(path, alone);
    if (!image)
        return std::move(image).error();
    const ImageInfo& info = image->info();
    if (info.version < 2) {
        return rebase_error(path, ErrorCode::unsupported_version,
                            "qcow version 1 images are not written");
    }
    s.info = info;
    s.cluster_size = info.cluster_size;
    s.cluster_bits = info.cluster_bits;
    return detail::rewrite_header(s, edit);
}

} // namespace

Result<RebaseStats> rebase(const std::filesystem::path& path, const RebaseOptions& options) {
    detail::HeaderEdit edit;
    RebaseStats stats;
    std::optional<std::string> format;
    if (!options.backing_file.empty()) {
        auto probed = detail::backing_format_of(path, options.backing_file, options.backing_format);
        if (!probed) {
            if (options.unsafe && options.backing_format)
                return std::move(probed).error();
            if (!options.unsafe)
                return std::move(probed).error();
            // Unsafe mode with a backing file that is not there (yet): stored without a format
            // unless one is given, as qemu-img rebase -u does.
        } else {
            format = *probed;
        }
        edit.backing_file = std::optional<std::string>(options.backing_file);
        edit.backing_format = format;
    } else {
        edit.backing_file = std::optional<std::string>();
        edit.backing_format = std::optional<std::string>();
    }
    if (options.unsafe) {
        if (auto ok = rewrite_reference(path, edit); !ok)
            return std::move(ok).error();
        return stats;
    }

    // The new backing file, opened as the image will open it.
    std::optional<Image> next;
    if (!options.backing_file.empty()) {
        OpenOptions open;
        open.format = format;
        auto opened = Image::open(detail::resolve_backing(path, options.backing_file), open);
        if (!opened) {
            return Error{opened.error().code, fmt::format("cannot rebase {}: new backing file: {}",
                                                          path.string(), opened.error().message)};
        }
        next = std::move(*opened);
    }
    WritableOptions writable_options;
    writable_options.direct_data_writes = options.direct_writes;
    auto writable = WritableImage::open(path, writable_options);
    if (!writable)
        return std::move(writable).error();
    // The image alone (what it allocates) and its old chain.
    std::optional<Image> old;
    std::optional<Image> top;
    {
        // Our own views of the image, under the writer's lock: no reader lock of their own.
        OpenOptions alone;
        alone.backing = BackingMode::none;
        alone.force_share = true;
        auto opened = Image::open(path, alone);
        if (!opened)
            return std::move(opened).error();
        top = std::move(*opened);
        OpenOptions whole;
        whole.force_share = true;
        auto chain = Image::open(path, whole);
        if (!chain)
            return std::move(chain).error();
        const std::vector<LayerInfo> layers = chain->layers();
        if (layers.size() > 1) {
            OpenOptions below;
            below.format = layers[1].format;
            auto opened_old = Image::open(layers[1].path, below);
            if (!opened_old)
                return std::move(opened_old).error();
            old = std::move(*opened_old);
        }
    }
    const ImageInfo info = writable->info();
    if (next && info.data_file && (info.autoclear_features & kAutoclearDataFileRaw)) {
        return rebase_error(path, ErrorCode::invalid_argument,
                            "an image whose external data file is raw (data_file_raw) cannot "
                            "have a backing file");
    }
    // Allocation is decided per cluster, or per subcluster with extended L2 entries: a unit is
    // either the image's or falls through as a whole.
    const unsigned unit_bits = info.extended_l2 ? info.cluster_bits - 5 : info.cluster_bits;
    const std::uint64_t unit = std::uint64_t{1} << unit_bits;
    const std::uint64_t size = writable->size();
    std::vector<std::byte> new_bytes(kChunk);
    // On the calling thread: a chunk is at most 4 MiB, and worker threads started for each
    // would cost more than they read ahead (two thread starts per compared MiB made rebase
    // twice as slow as qemu-img's single thread).
    const VisitOptions how = detail::copy_visit_options(1);

    // Ranges the image does not allocate, walked in chunks.
    struct Range {
        std::uint64_t start, end;
    };
    std::vector<Range> holes;
    {
        auto extents = top->extents(0, size);
        for (const Extent& e : extents) {
            if (e.present)
                continue;
            if (!holes.empty() && holes.back().end == e.offset)
                holes.back().end = e.offset + e.length;
            else
                holes.push_back({e.offset, e.offset + e.length});
        }
        if (extents.error())
            return *extents.error();
    }
    std::uint64_t hole_bytes = 0;
    for (const Range& r : holes)
        hole_bytes += r.end - r.start;
    std::uint64_t progress = 0;
    for (const Range& r : holes) {
        for (std::uint64_t at = r.start; at < r.end;) {
            const std::uint64_t n = std::min(kChunk - (at & (unit - 1)), r.end - at);
            const std::uint64_t end = at + n;
            if (options.progress)
                options.progress(progress, hole_bytes);
            progress += n;
            auto old_zero = zero_by_metadata(old, at, end);
            if (!old_zero)
                return std::move(old_zero).error();
            auto new_zero = zero_by_metadata(next, at, end);
            if (!new_zero)
                return std::move(new_zero).error();
            if (*old_zero && *new_zero) {
                at = end;
                continue;
            }
            stats.compared_bytes += n;
            // The new side is read into a buffer; the old side is compared straight from its
            // runs (mapped or read bytes, no second copy), unit by unit (the holes start and
            // end on unit boundaries, or at the disk's end), and differing units are written
            // in runs with the old content.
            auto new_span = std::span(new_bytes).first(n);
            if (*new_zero) {
                std::memset(new_span.data(), 0, n);
            } else if (auto ok = read_or_zero(next, new_span, at, how); !ok) {
                return std::move(ok).error();
            }
            auto compare_run = [&](std::uint64_t run_at, std::span<const std::byte> old_bytes,
                                   std::uint64_t length) -> Result<void> {
                // `old_bytes` empty: the old side reads as zeros there.
                auto same = [&](std::uint64_t i, std::uint64_t len) {
                    const std::byte* theirs = new_span.data() + (run_at + i - at);
                    return old_bytes.empty() ? detail::all_zero(theirs, len)
                                             : std::memcmp(old_bytes.data() + i, theirs, len) == 0;
                };
                std::uint64_t i = 0;
                while (i < length) {
                    const std::uint64_t len =
                        std::min(unit - ((run_at + i) & (unit - 1)), length - i);
                    if (same(i, len)) {
                        i += len;
                        continue;
                    }
                    std::uint64_t j = i + len;
                    while (j < length) {
                        const std::uint64_t l = std::min(unit, length - j);
                        if (same(j, l))
                            break;
                        j += l;
                    }
                    Result<void> ok =
                        old_bytes.empty() || all_zero(old_bytes.subspan(i, j - i))
                            ? writable->write_zeroes(run_at + i, j - i, false)
                            : writable->write(run_at + i, old_bytes.subspan(i, j - i));
                    if (!ok)
                        return ok;
                    stats.copied_bytes += j - i;
                    i = j;
                }
                return {};
            };
            if (*old_zero) {
                if (auto ok = compare_run(at, {}, n); !ok)
                    return std::move(ok).error();
                at = end;
                continue;
            }
            const std::uint64_t old_end = std::min(end, old->size());
            auto visited = old->visit(
                at, old_end,
                [&](const Run& run) { return compare_run(run.offset, run.bytes, run.length); },
                how);
            if (!visited)
                return std::move(visited).error();
            if (old_end < end) { // the old chain ends before the disk does: zeros there
                if (auto ok = compare_run(old_end, {}, end - old_end); !ok)
                    return std::move(ok).error();
            }
            at = end;
        }
    }
    if (auto ok = writable->flush(); !ok)
        return std::move(ok).error();
    {
        WritableImage::State& s = detail_state(*writable);
        std::lock_guard lock(s.mutex);
        if (auto ok = detail::rewrite_header(s, edit); !ok)
            return std::move(ok).error();
    }
    if (auto ok = writable->close(); !ok)
        return std::move(ok).error();
    if (options.progress)
        options.progress(hole_bytes, hole_bytes);
    return stats;
}

} // namespace qcowmap

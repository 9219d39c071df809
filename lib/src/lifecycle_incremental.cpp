// apply_dirty(): an incremental update of an existing qcow2 copy of a disk, in place. What
// export_dirty does for a raw copy (write each dirty range of the source into the copy), done
// through the in-place writer so the copy stays a valid qcow2 image: qemu's crash-safe order,
// its image locks, and the copy's own enabled bitmaps record what changed.
#include "fault.hpp"
#include "lifecycle_internal.hpp"

#include <qcowmap/bitmap.hpp>
#include <qcowmap/image.hpp>
#include <qcowmap/lifecycle.hpp>

#include <fmt/format.h>

#include <optional>
#include <utility>

#include <sys/stat.h>

namespace qcowmap {
namespace {

/// Errors of the copy being written say so (the CLI names TARGET for them, exit status 3, as
/// for any output convert cannot write).
Error about_target(Error error, const std::filesystem::path& target) {
    error.origin = ErrorOrigin::target;
    error.depth = 0;
    error.path = target.string();
    return error;
}

Result<ApplyDirtyStats> apply_dirty_in_boundary(const Image& source, const DirtyBitmap& bitmap,
                                                const std::filesystem::path& target_path,
                                                const ApplyDirtyOptions& options) {
    if (struct stat st{};
        ::stat(target_path.c_str(), &st) == 0 && source.maps_file(st.st_dev, st.st_ino)) {
        return about_target(Error{ErrorCode::invalid_argument,
                                  "is the image being read (or one of its layers or its data "
                                  "file): refusing to overwrite it"},
                            target_path);
    }
    {
        // The size first, read without a lock: a copy of another disk is refused before it is
        // opened for writing (closing a writer may round the file up to whole clusters).
        OpenOptions peek;
        peek.backing = BackingMode::none;
        peek.force_share = true;
        peek.format = "qcow2";
        auto copy = Image::open(target_path, peek);
        if (!copy)
            return about_target(std::move(copy).error(), target_path);
        if (copy->size() != source.size()) {
            return about_target(
                Error{ErrorCode::invalid_argument,
                      fmt::format("is a disk of {} bytes but the source is {} bytes: an "
                                  "incremental update needs a copy of the same size",
                                  copy->size(), source.size())},
                target_path);
        }
    }
    auto target = WritableImage::open(target_path, options.target);
    if (!target)
        return about_target(std::move(target).error(), target_path);
    if (target->size() != source.size()) { // changed since the look above
        return about_target(Error{ErrorCode::image_changed, "changed while it was opened"},
                            target_path);
    }
    ApplyDirtyStats stats;
    const std::uint64_t total = bitmap.dirty_bytes();
    std::uint64_t done = 0;
    if (options.progress)
        options.progress(0, total);
    const VisitOptions visit = detail::copy_visit_options(options.threads, options.data_access);
    // The source's runs are its guest-visible content through its whole chain: data (also
    // decompressed) is written, zeros (zero clusters, or nothing allocated anywhere) become
    // zero clusters of the copy, as qemu's mirror writes zeroes with unmap.
    auto write_run = [&](const Run& run) -> Result<void> {
        Result<void> written = run.kind == ExtentKind::zero
                                   ? target->write_zeroes(run.offset, run.length, true)
                                   : target->write(run.offset, run.bytes);
        if (!written)
            return about_target(std::move(written).error(), target_path);
        (run.kind == ExtentKind::zero ? stats.zero_bytes : stats.data_bytes) += run.length;
        done += run.length;
        if (options.progress)
            options.progress(done, total);
        return {};
    };
    for (const BitmapRange& range : bitmap.dirty_ranges()) {
        if (auto ok = source.visit(range.offset, range.offset + range.length, write_run, visit);
            !ok)
            return std::move(ok).error();
    }
    if (auto ok = source.check_unchanged(); !ok)
        return std::move(ok).error();
    // Data, refcounts, tables and the copy's bitmaps on disk, in that order, before we say done.
    if (auto ok = target->close(); !ok)
        return about_target(std::move(ok).error(), target_path);
    return stats;
}

} // namespace

Result<ApplyDirtyStats> apply_dirty(const Image& source, const DirtyBitmap& bitmap,
                                    const std::filesystem::path& target,
                                    const ApplyDirtyOptions& options) {
    return detail::contain_faults(source.path(), [&]() -> Result<ApplyDirtyStats> {
        return apply_dirty_in_boundary(source, bitmap, target, options);
    });
}

} // namespace qcowmap

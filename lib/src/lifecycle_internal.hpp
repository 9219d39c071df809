// What the lifecycle operations (commit, rebase, bitmap edits) share: access to a
// WritableImage's state, the header-cluster rewrite, and emptying an image's active layer.
#pragma once

#include "writable_state.hpp"

#include <qcowmap/lifecycle.hpp>
#include <qcowmap/writable.hpp>

#include <optional>
#include <string>

namespace qcowmap::detail {

// BitmapsExtensionFields: qcow2_format.hpp (spec "Bitmaps extension").

/// What `rewrite_header` changes; unset members stay as they are.
struct HeaderEdit {
    /// The backing file name (nullopt inside: none, which also drops the format extension).
    std::optional<std::optional<std::string>> backing_file;
    std::optional<std::optional<std::string>> backing_format;
    /// The bitmaps extension (nullopt inside: removed).
    std::optional<std::optional<BitmapsExtensionFields>> bitmaps;
    /// New autoclear bits (version 3).
    std::optional<std::uint64_t> autoclear;
};

/// Rewrites the header cluster of the image `s` writes (qemu's qcow2_update_header): the fixed
/// header as it is, then the extensions in qemu's order (backing format, external data file,
/// full disk encryption, feature names, bitmaps, then unknown ones as found), the end marker and
/// the backing file name, written in one pwrite of the cluster and synced. Errors:
/// invalid_argument (the header would not fit in the first cluster, a name too long), io_error.
Result<void> rewrite_header(WState& s, const HeaderEdit& edit);

/// Unallocates every cluster of the active disk of `s` (qemu's make_empty for qcow2): each L1
/// entry is cleared, and once that is on disk the L2 tables and the clusters only they
/// referenced are freed (a table shared with an internal snapshot only loses one reference).
/// The disk then reads through to the backing file. Takes the state's mutex.
Result<void> empty_active_layer(WState& s);

/// How a lifecycle operation reads the image it copies from: on `threads` workers (0: one per
/// usable core; 1: the calling thread alone), with `access` resolved to what this machine
/// measured cheaper when automatic; mapped pages made present ahead of the writer and dropped
/// behind it, so memory stays small whatever the amount of data.
VisitOptions copy_visit_options(unsigned threads, DataAccess access = DataAccess::automatic);

/// The format of the backing file `name` of the image at `image` (resolved against its
/// directory): `format` when given ("qcow2" or "raw"), else probed.
Result<std::string> backing_format_of(const std::filesystem::path& image, const std::string& name,
                                      const std::optional<std::string>& format);

/// `name` resolved as qemu resolves a backing file name stored in `image`: absolute names as
/// they are, relative ones against the image's directory.
std::filesystem::path resolve_backing(const std::filesystem::path& image, const std::string& name);

} // namespace qcowmap::detail

namespace qcowmap {
/// The state behind a WritableImage, for the lifecycle operations (declared friend there).
WritableImage::State& detail_state(WritableImage& image);
} // namespace qcowmap

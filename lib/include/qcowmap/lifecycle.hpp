// qcowmap — a backup's whole lifecycle in place: commit an overlay into its backing file, rebase
// an image onto another backing file, edit persistent bitmaps. Built on the
// in-place writer (writable.hpp): every change reaches the file in qemu's crash-safe order and
// under QEMU's image locks.
#pragma once

#include <qcowmap/options.hpp>
#include <qcowmap/result.hpp>
#include <qcowmap/writable.hpp>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace qcowmap {

/// Called with (bytes done, bytes in all) while a long operation runs.
using LifecycleProgress = std::function<void(std::uint64_t done, std::uint64_t total)>;

// ---- commit -----------------------------------------------------------------------------------

struct CommitOptions {
    /// The layer to commit into: a file of the overlay's backing chain (matched by the file
    /// itself, not by its name). Unset: the overlay's backing file.
    std::optional<std::filesystem::path> base;
    /// Keep the overlay's data (qemu-img commit -d). Without it, and when committing into the
    /// overlay's own backing file, the overlay is emptied afterwards (it then reads through to
    /// the base, with the same content). Committing into a deeper base always keeps it, as
    /// qemu-img does (-b implies -d).
    bool drop = false;
    /// Threads producing the overlay's bytes (0: one per core).
    unsigned threads = 0;
    LifecycleProgress progress;
    /// Write the base's data bypassing the page cache (WritableOptions::direct_data_writes;
    /// qemu-img commit -t none).
    bool direct_writes = false;
};

struct CommitStats {
    std::uint64_t data_bytes = 0;       ///< bytes written into the base as data
    std::uint64_t compressed_bytes = 0; ///< of those, bytes that came from compressed clusters
    std::uint64_t zero_bytes = 0;       ///< bytes made zero in the base
    std::uint32_t layers = 0;           ///< layers committed (1: the overlay alone)
    bool emptied = false;               ///< the overlay was emptied afterwards
};

/// Writes what the layers above `options.base` allocate into it (qemu-img commit): for each
/// layer from the one just above the base up to the overlay, only the ranges that layer
/// allocates are read (data from the mapping, compressed clusters decompressed on
/// `options.threads` workers); zero ranges become zero writes (unmapping) in the base. The base
/// is opened for writing (WritableImage: its enabled persistent bitmaps get the written ranges)
/// and grown when smaller than the overlay. Once the base is flushed, the overlay is emptied
/// (every cluster unallocated, its clusters freed) unless `drop` or a deeper base.
/// Errors: invalid_argument (no backing file; `base` is not in the chain; a raw base cannot be
/// written; an overlay with data_file_raw cannot be emptied), those of WritableImage::open
/// and of reading the overlay.
Result<CommitStats> commit(const std::filesystem::path& overlay, const CommitOptions& options = {});

// ---- rebase -----------------------------------------------------------------------------------

struct RebaseOptions {
    /// The new backing file name, stored as given (relative names are resolved against the
    /// image's directory). Empty: no backing file (the image is flattened).
    std::string backing_file;
    /// Its format, "qcow2" or "raw"; probed when unset.
    std::optional<std::string> backing_format;
    /// qemu-img rebase -u: only the reference in the header changes; the caller guarantees the
    /// new backing file reads as the old one.
    bool unsafe = false;
    /// Not used: the backing files are compared on the calling thread, in chunks of at most
    /// 4 MiB that worker threads would not speed up (kept for source compatibility).
    unsigned threads = 0;
    LifecycleProgress progress;
    /// Write the copied data bypassing the page cache (WritableOptions::direct_data_writes;
    /// qemu-img rebase -t none).
    bool direct_writes = false;
};

struct RebaseStats {
    std::uint64_t compared_bytes = 0; ///< bytes compared between old and new backing
    std::uint64_t copied_bytes = 0;   ///< bytes written into the image because they differ
};

/// Changes the backing file of `image` (qemu-img rebase). Safe mode: for every range the image
/// itself does not allocate, the old backing chain and the new backing file are compared and
/// where they differ the old content is written into the image (whole clusters, subclusters
/// with extended L2 entries), so that the image reads the same before and after; ranges where
/// both read as zeros cost nothing. Then the header names the new backing file (one write of
/// the header cluster, synced). Errors: invalid_argument (bad format; the image has an external
/// data file with data_file_raw and a backing file is asked for), those of opening the old
/// chain or the new backing file (safe mode) and of WritableImage.
Result<RebaseStats> rebase(const std::filesystem::path& image, const RebaseOptions& options);

// ---- persistent bitmaps -------------------------------------------------------------------------

/// One edit of `qemu-img bitmap`, applied in order by `edit_bitmaps`.
struct BitmapEdit {
    enum class Kind { add, remove, clear, enable, disable, merge };
    Kind kind = Kind::add;
    /// add: bytes per bit, a power of two from 512 to 2 GiB; 0: qemu's default (the cluster
    /// size, at least 64 KiB... as bdrv_get_default_bitmap_granularity).
    std::uint64_t granularity = 0;
    /// add: start disabled (qemu-img bitmap --add --disable).
    bool disabled = false;
    /// merge: the bitmap whose bits are added to NAME.
    std::string source;
    /// merge: the image holding `source` (qemu-img bitmap -b); unset: the same image.
    std::optional<std::filesystem::path> source_image;
    std::optional<std::string> source_format;
};

/// Applies `edits` to the persistent bitmap `name` of the qcow2 image at `path`, as
/// `qemu-img bitmap` does, and stores the new bitmap directory: new bitmap tables, data and
/// directory are written into new clusters (counted first), synced, then one write of the
/// header's bitmaps extension switches to them, then the old clusters are freed. A crash
/// leaves the old directory or the new one, never a mix. Errors: invalid_argument (no such
/// bitmap; add of a name that exists; bad granularity; merge of bitmaps of different disk
/// sizes; version 2 images, which have no bitmaps), invalid_table (an inconsistent source
/// bitmap), and those of WritableImage::open.
Result<void> edit_bitmaps(const std::filesystem::path& path, const std::string& name,
                          const std::vector<BitmapEdit>& edits);

// ---- incremental update of an existing qcow2 copy -----------------------------------------------

class DirtyBitmap;

struct ApplyDirtyOptions {
    /// How the target is opened for writing (its locks; `check` for its refcounts).
    WritableOptions target;
    /// Threads producing the source's bytes (0: one per core).
    unsigned threads = 0;
    /// How the source's data is taken from its files (see DataAccess): by default whichever
    /// costs less on this machine.
    DataAccess data_access = DataAccess::automatic;
    /// Called with (dirty bytes done, dirty bytes in all).
    LifecycleProgress progress;
};

struct ApplyDirtyStats {
    std::uint64_t data_bytes = 0; ///< bytes written into the target as data
    std::uint64_t zero_bytes = 0; ///< bytes made zero in the target (zero clusters, unmapped)
};

/// Makes the qcow2 image at `target`, a copy of the disk of `source` as it was when `bitmap`
/// started recording, equal to `source` now: for each range `bitmap` marks dirty, the source's
/// content is written into the target in place (WritableImage: qemu's crash-safe order, its
/// locks, its enabled bitmaps updated); ranges that read as zeros in the source become zero
/// clusters (unmapped), nothing outside the dirty ranges is read or written. The incremental
/// counterpart of `export_dirty` for a qcow2 copy (`qcowmap convert --bitmap=NAME SOURCE
/// TARGET`). A crash part-way leaves the target consistent (qemu-img check clean) but partly
/// updated: running the same update again completes it, since the source's bitmap is not
/// changed. Errors: those of WritableImage::open and writes with origin `target` (also
/// invalid_argument when the target's size differs from the source's), those of reading the
/// source with origin `image`; image_changed when the source changed meanwhile.
Result<ApplyDirtyStats> apply_dirty(const Image& source, const DirtyBitmap& bitmap,
                                    const std::filesystem::path& target,
                                    const ApplyDirtyOptions& options = {});

} // namespace qcowmap

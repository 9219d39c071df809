// qcowmap — the virtual disk written out raw: what `qcowmap convert` (and `qemu-img convert -O
// raw`) does, as a library call.
#pragma once

#if !defined(__cplusplus) || __cplusplus < 202002L
#error "qcowmap needs C++20: compile with -std=c++20 (Meson: cpp_std=c++20)"
#endif

#include <qcowmap/hash.hpp>
#include <qcowmap/image.hpp>
#include <qcowmap/result.hpp>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>

namespace qcowmap {

class DirtyBitmap;

/// How `export_raw` and `export_dirty` write.
struct ExportOptions {
    /// Data blocks of this many bytes (aligned in the output) that hold only zeros are left as
    /// holes too, like `qemu-img convert -S` (whose default is 4 KiB). 0: as `qemu-img
    /// convert -S 0`, a fully allocated file: no zero detection, data goes from the image's
    /// files to the target inside the kernel (copy_file_range(2)) where both are files, and
    /// zero runs are allocated (fallocate(2), else written zeros) instead of left as holes.
    /// A multiple of 512 (else invalid_argument). Only regular-file targets have holes:
    /// elsewhere it is ignored.
    std::uint64_t zero_block = 4096;
    /// Threads producing data ahead of the writer (reading ahead, decompressing).
    /// 0: one per core.
    unsigned threads = 0;
    /// How data is taken from the image's files when it is checked for zeros or written to a
    /// stream (see DataAccess): from the mapping made present ahead by the threads and dropped
    /// once written (Prefetch::touch), or read ahead into small buffers; by default whichever
    /// costs less on this machine (automatic_data_access()). Copies inside the kernel need
    /// neither.
    DataAccess data_access = DataAccess::automatic;
    /// Write in disk order from the descriptor's current position, zeros included, whatever
    /// the descriptor is (for standard output, which may be a pipe, a terminal or a file
    /// opened for appending). Pipes, sockets and character devices are always written so.
    bool sequential = false;
    /// The part of the disk to write, `[start, end)` clipped to the disk, for targets written
    /// in order (pipes, sockets, character devices, or `sequential`), as `qcowmap cat
    /// --start-offset --max-length` writes it. Other targets take the whole disk
    /// (invalid_argument otherwise).
    std::uint64_t start = 0;
    std::uint64_t end = UINT64_MAX;
    /// Called on the calling thread as the export advances, with the bytes done so far and the
    /// total (the disk size; for `export_dirty`, the dirty bytes).
    std::function<void(std::uint64_t done, std::uint64_t total)> progress;
    /// `export_raw` only: also compute this digest of the bytes written (the whole disk, or
    /// the part `[start, end)` as a disk of its own), equal to what hash_image gives for the
    /// same contents, from the bytes the export already has in hand: no second pass over the
    /// source. Zero runs are never read for it; a blkhash digest hashes its blocks on
    /// `threads` workers, a whole-disk digest on one thread beside the writer. Data the kernel
    /// copies without it (block devices, `zero_block` 0) is read for it, from the mapping or
    /// with pread as `data_access` resolves.
    std::optional<HashAlgorithm> digest;
    /// Receives that digest once the export succeeded (required with `digest`).
    Digest* digest_out = nullptr;
};

/// Writes the virtual disk of `image`, raw, to the open descriptor `fd` (left open), with the
/// bytes `qemu-img convert -O raw` writes:
/// - a regular file is emptied if it is not empty, sized to the disk, and given only the data:
///   zero runs (and data blocks of zeros, see `zero_block`) stay holes, except with
///   `zero_block` 0, which allocates every byte as qemu-img's -S 0 does;
/// - a block device must hold at least the disk; zero runs are zeroed on it (the kernel's
///   write-zeroes where the device offers it, else written zeros), the rest of a larger
///   device is left alone;
/// - pipes, sockets and character devices (and any descriptor with `sequential`) are written
///   in order from their current position, zeros included. Into a pipe, bytes straight from
///   the image's mapping and zeros are handed over by reference (vmsplice(2)), not copied:
///   the reader may see later changes to the image file.
/// Nothing is written when `fd` is the image itself, one of its layers or its data file.
/// Errors: invalid_argument (bad `zero_block`; a target that is the image's own file, or a
/// block device smaller than the disk; a part of the disk for a target that is not written
/// in order; `digest` without `digest_out`), io_error when writing fails (with the errno), all
/// of these with ErrorOrigin::target; and the errors of `Image::visit`, among them
/// image_changed ("image changed while being read") when a file of the image shrank under its
/// mapping or was written meanwhile (Image::check_unchanged, after the last byte).
Result<void> export_raw(const Image& image, int fd, const ExportOptions& options = {});

/// Writes the disk raw to the regular file `target` so that it appears complete or not at all:
/// into a temporary in the target's directory (unnamed with O_TMPFILE; elsewhere a hidden
/// `.NAME.qcowmap-XXXXXX`, removed on every error path and by remove_temporary_files()), synced,
/// then named `target`. An existing `target` is refused (io_error "already exists",
/// ErrorOrigin::target) unless `replace`; a replaced file keeps its permissions. A symlink is
/// written through, as qemu-img does: the file it points to is replaced and the link stays.
/// `target` must not be a device or a directory (devices and pipes are written in place by
/// `export_raw`), nor one of the image's files. Errors: those of `export_raw`.
Result<void> export_raw_file(const Image& image, const std::filesystem::path& target,
                             const ExportOptions& options = {}, bool replace = false);

/// Removes the hidden temporary files the library's atomic outputs (export_raw_file,
/// write_qcow2_file) hold right now. Async-signal-safe (only unlink(2)): for a SIGINT, SIGTERM
/// or SIGHUP handler that then ends the process, so that an interrupted conversion leaves
/// nothing behind. Outputs being written unnamed (O_TMPFILE) need nothing: the kernel frees
/// them with the process.
void remove_temporary_files() noexcept;

/// An incremental sync: writes only the ranges `bitmap` marks dirty to `fd`, an existing raw
/// copy of the disk (a regular file or a block device of exactly `image.size()` bytes): data
/// is written, zero runs are punched out (or zeroed where punching is not supported), and
/// nothing outside the dirty ranges is touched. `zero_block` does not apply (data is copied
/// inside the kernel where possible). Errors: as `export_raw`, and invalid_argument for a
/// target of another size or kind.
Result<void> export_dirty(const Image& image, const DirtyBitmap& bitmap, int fd,
                          const ExportOptions& options = {});

} // namespace qcowmap

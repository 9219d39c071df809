// qcowmap — the virtual disk written out raw: what `qcowmap convert` (and `qemu-img convert -O
// raw`) does, as a library call.
#pragma once

#include <qcowmap/image.hpp>
#include <qcowmap/result.hpp>

#include <cstdint>
#include <functional>

namespace qcowmap {

class DirtyBitmap;

/// How `export_raw` and `export_dirty` write.
struct ExportOptions {
    /// Data blocks of this many bytes (aligned in the output) that hold only zeros are left as
    /// holes too, like `qemu-img convert -S` (whose default is 4 KiB). 0: no zero detection;
    /// data then goes from the image's files to the target inside the kernel
    /// (copy_file_range(2)) where both are files. A multiple of 512 (else invalid_argument).
    /// Only regular-file targets have holes: elsewhere it is ignored.
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
};

/// Writes the virtual disk of `image`, raw, to the open descriptor `fd` (left open), with the
/// bytes `qemu-img convert -O raw` writes:
/// - a regular file is emptied if it is not empty, sized to the disk, and given only the data:
///   zero runs (and data blocks of zeros, see `zero_block`) stay holes;
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
/// in order), io_error when writing fails (with the errno), all of these with
/// ErrorOrigin::target; and the errors of `Image::visit`, among them Refusal::image_changed
/// ("image changed while being read") when the image's file shrank under its mapping.
Result<void> export_raw(const Image& image, int fd, const ExportOptions& options = {});

/// An incremental sync: writes only the ranges `bitmap` marks dirty to `fd`, an existing raw
/// copy of the disk (a regular file or a block device of exactly `image.size()` bytes): data
/// is written, zero runs are punched out (or zeroed where punching is not supported), and
/// nothing outside the dirty ranges is touched. `zero_block` does not apply (data is copied
/// inside the kernel where possible). Errors: as `export_raw`, and invalid_argument for a
/// target of another size or kind.
Result<void> export_dirty(const Image& image, const DirtyBitmap& bitmap, int fd,
                          const ExportOptions& options = {});

} // namespace qcowmap

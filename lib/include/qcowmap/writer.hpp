// qcowmap — writing a qcow2 image: a flattened copy of a disk, or an incremental overlay.
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
#include <string>
#include <string_view>

namespace qcowmap {

/// What part of the source disk the output holds.
enum class WriteSelection : std::uint8_t {
    /// The whole disk, flattened: no backing file is needed to read the output.
    whole_disk,
    /// Only the clusters the source's top layer allocates (data or zero clusters), read from
    /// the source's current contents: an overlay of the source's own layer over a backing file.
    /// Unsafe: the output reads as the source only if the backing file reads exactly as the
    /// source's own backing chain, which nothing checks (`qemu-img create -u`'s trust; the
    /// CLI's `convert -B ... -u`). Prefer differs_from_backing.
    top_layer,
    /// Every cluster whose bytes differ from those of `WriteOptions::backing_image` at the
    /// same offset (zeros past its end), read from the source; those that read as zeros in the
    /// source become zero clusters, so that the backing file's data cannot show through. The
    /// output then reads exactly as the source over that backing file, whatever the source's
    /// own chain (a flat image, an overlay of another file, a longer or shorter disk):
    /// `qemu-img convert -B`. Where the source is itself an overlay of the backing file (the
    /// same file, by device and inode, at some depth of its chain and in the same format), the
    /// clusters the layers above it allocate are taken without reading either side; else
    /// every cluster that may hold data on either side is read from both and compared.
    differs_from_backing,
    /// Only the clusters covering the dirty ranges of a persistent bitmap of the source
    /// (`WriteOptions::bitmap`), read from the source's current contents; dirty clusters that
    /// read as zeros become zero clusters. The incremental backup.
    bitmap_dirty,
};

/// How `write_qcow2` lays out and fills the output.
struct WriteOptions {
    /// Output cluster size: a power of two from 512 to 2 MiB (qemu's range).
    std::uint32_t cluster_size = 65536;
    /// Store data clusters compressed (`qemu-img convert -c`). A cluster that does not get
    /// smaller is stored uncompressed, as qemu does.
    bool compress = false;
    /// The header's compression type, used for compressed clusters (zlib: raw deflate with a
    /// 4 KiB window; zstd: one frame per cluster). zstd sets incompatible feature bit 3.
    CompressionType compression_type = CompressionType::zlib;
    /// Extended L2 entries (32 subclusters per cluster); needs clusters of 16 KiB or more.
    bool extended_l2 = false;
    /// Width of a refcount entry: a power of two from 1 to 64 (qemu's default 16).
    std::uint32_t refcount_bits = 16;
    /// Name of the backing file, stored as given (like qemu-img: relative names are resolved
    /// against the output's directory by readers). Required for top_layer and bitmap_dirty.
    std::optional<std::string> backing_file;
    /// "qcow2" or "raw": stored in the backing-format header extension.
    std::optional<std::string> backing_format;
    /// The file `backing_file` names, opened as readers of the output will find it
    /// (open_output_backing). Required by differs_from_backing; with bitmap_dirty its size
    /// is checked against the source's (a previous backup of the same disk).
    std::optional<Image> backing_image;
    WriteSelection selection = WriteSelection::whole_disk;
    /// The bitmap whose dirty ranges are copied (WriteSelection::bitmap_dirty).
    std::string bitmap;
    /// Threads compressing clusters (and decompressing compressed source clusters); 0 means one
    /// per core.
    unsigned threads = 0;
    /// Called from the writing thread as data is written: bytes of the selected disk ranges
    /// done so far, and their total.
    std::function<void(std::uint64_t done, std::uint64_t total)> progress;
    /// Also compute this digest of the disk written (WriteStats::digest; equal to hash_image
    /// of the source and of the output), from the bytes the writer reads anyway: no second
    /// pass over the source. Zero ranges are never read for it; a blkhash digest hashes its
    /// blocks on `threads` workers, a whole-disk digest on one thread beside the writer. Data
    /// the kernel would copy without it is read for it (from the mapping, or with pread where
    /// automatic_data_access() prefers that), and the copy then runs on one thread. Only for
    /// `whole_disk` (an overlay's disk is not all written here).
    std::optional<HashAlgorithm> digest;
};

/// What `write_qcow2` wrote.
struct WriteStats {
    std::uint64_t file_size = 0;           ///< bytes of the output image
    std::uint64_t data_clusters = 0;       ///< clusters stored uncompressed
    std::uint64_t compressed_clusters = 0; ///< clusters stored compressed
    std::uint64_t zero_clusters = 0;       ///< L2 entries marked zero (no host cluster)
    std::uint64_t l2_tables = 0;
    std::uint64_t selected_bytes = 0; ///< virtual bytes of the clusters the selection covered
    /// WriteOptions::digest of the disk written, when asked for.
    std::optional<Digest> digest;
};

/// Errors about the output (rather than the source) carry io_error, ErrorOrigin::target (and
/// the errno of a failed system call) and a message starting with this text.
inline constexpr std::string_view kWriteTargetError = "cannot write the output: ";

/// True when `error` came from writing the output, not from reading the source.
inline bool is_target_error(const Error& error) {
    return error.origin == ErrorOrigin::target;
}

/// Checks the options that do not depend on the source (cluster size, extended L2, refcount
/// bits, selection and backing file, backing format, a digest of an overlay), as `write_qcow2`
/// does first; not `backing_image`, which write_qcow2 checks. Errors: invalid_argument naming
/// the option.
Result<void> check_write_options(const WriteOptions& options);

/// Opens the file `options.backing_file` names, in `options.backing_format` (probed when
/// unset), the way readers of the output will resolve the name: a relative name from the
/// directory of `target`, the output's path (from the current directory when `target` is
/// empty: an output that is not a file). `open` gives the rest (force_share; its backing and
/// format fields are ignored). Errors: those of Image::open, the message starting with
/// qemu-img's "Could not open backing file: "; invalid_argument without a backing_file.
Result<Image> open_output_backing(const WriteOptions& options, const std::filesystem::path& target,
                                  const OpenOptions& open = {});

/// Writes `source` as a qcow2 version 3 image to `fd`: clean (not dirty), with exact refcounts,
/// laid out as header, refcount table, refcount blocks, L1 table, L2 tables, then data in
/// virtual-disk order.
///
/// The target may be a pipe, socket or character device: without compression the whole layout
/// is decided first (a pre-scan of the data finds the clusters that hold only zeros, which are
/// not stored) and the image is written in one sequential pass. With compression the sizes of
/// the clusters are only known once compressed: a seekable target gets its metadata written
/// last (into space reserved up front); any other target gets the image spooled to an unlinked
/// temporary file in $TMPDIR, then copied out. A regular file is truncated to zero first and
/// written from offset 0; holes are left where the image holds zeros. A block device is written
/// from offset 0, zeros included.
///
/// Errors: invalid_argument (options: cluster size, refcount bits, extended L2 with small
/// clusters, a selection without backing file, differs_from_backing without backing_image,
/// bitmap_dirty over a backing_image of another size, a disk too large for the L1 table qemu
/// accepts, a backing name that does not fit the header cluster), the errors of reading the
/// source (any code; a bitmap that cannot be used), image_changed when a file of the source
/// changed while it was read (Image::check_unchanged), and io_error with ErrorOrigin::target
/// for the output.
Result<WriteStats> write_qcow2(const Image& source, int fd, const WriteOptions& options = {});

/// Writes the image to `target` safely: under an unnamed temporary file (O_TMPFILE, else a
/// hidden temporary name) in the target's directory, synced, and linked or renamed into place
/// only once complete, so an interrupted run never leaves a plausible-looking `target`. An
/// existing `target` is refused (io_error with ErrorOrigin::target, "already exists") unless
/// `replace`; a target that is one of the source's files is always refused.
Result<WriteStats> write_qcow2_file(const Image& source, const std::filesystem::path& target,
                                    const WriteOptions& options = {}, bool replace = false);

} // namespace qcowmap

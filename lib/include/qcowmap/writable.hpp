// qcowmap — creating qcow2 images and modifying them in place, crash-safe.
#pragma once

#include <qcowmap/image.hpp>
#include <qcowmap/info.hpp>
#include <qcowmap/options.hpp>
#include <qcowmap/result.hpp>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>

namespace qcowmap {

/// What `create` makes: the options of `qemu-img create -f qcow2 -o ...`, same names and
/// defaults (`parse_create_options` reads the `-o` string).
struct CreateOptions {
    /// `compat`: 3 ("1.1", the default) or 2 ("0.10"). Version 2 has no zero clusters,
    /// extended L2 entries, lazy refcounts, external data files or compression types.
    std::uint32_t version = 3;
    /// `cluster_size`: a power of two from 512 to 2 MiB.
    std::uint32_t cluster_size = 65536;
    /// `extended_l2`: 32 subclusters per cluster (clusters of 16 KiB or more).
    bool extended_l2 = false;
    /// `compression_type`: zlib or zstd (zstd sets incompatible bit 3).
    CompressionType compression_type = CompressionType::zlib;
    /// `refcount_bits`: a power of two from 1 to 64.
    std::uint32_t refcount_bits = 16;
    /// `lazy_refcounts`: sets the compatible feature bit. qcowmap itself always keeps
    /// refcounts exact (it never needs the dirty bit); qemu uses the bit.
    bool lazy_refcounts = false;
    /// `backing_file` (`-b`), stored as given; relative names are resolved against the new
    /// image's directory. `backing_fmt` (`-F`): "qcow2" or "raw"; probed when unset.
    std::optional<std::string> backing_file;
    std::optional<std::string> backing_format;
    /// `data_file`: an external data file, stored as given (relative names are resolved
    /// against the image's directory). It is created empty with the disk's size, as qemu-img
    /// create does (an existing file is truncated and extended).
    std::optional<std::string> data_file;
    /// `data_file_raw`: the data file stays a valid raw image of the disk. As qemu does, every
    /// cluster is then allocated at its guest offset at creation (preallocation=metadata).
    bool data_file_raw = false;
    /// Overwrite `path` when it exists (qemu-img create always does). False: refuse.
    bool replace = true;
};

/// Parses `qemu-img create -o` options ("cluster_size=64k,extended_l2=on,...") onto
/// `options`: compat, cluster_size, extended_l2, compression_type, refcount_bits,
/// lazy_refcounts, backing_file, backing_fmt, data_file, data_file_raw, and preallocation=off.
/// Sizes take qemu's suffixes (k, M, G...). Errors: invalid_argument naming the option.
Result<void> parse_create_options(std::string_view text, CreateOptions& options);

/// Creates an empty qcow2 image of `size` virtual bytes at `path` (written under a temporary
/// name and renamed into place, so a crash leaves no half image). With a backing file and
/// `size` 0 the size is the backing file's (as qemu-img create). The image is what
/// `qemu-img create -f qcow2` with the same options makes: clean, `qemu-img check` passes.
/// Errors: invalid_argument (options, size not a multiple of 512, too large for the L1 table
/// qemu accepts), io_error (cannot write the file, the backing or data file cannot be opened).
Result<void> create(const std::filesystem::path& path, std::uint64_t size,
                    const CreateOptions& options = {});

/// How `WritableImage::open` opens an image.
struct WritableOptions {
    /// How the chain below is opened (backing override, data file, untrusted...). `snapshot`
    /// must be unset: a snapshot cannot be written.
    OpenOptions open;
    /// Take QEMU's image locks (OFD byte-range locks as qemu's file driver takes them), so
    /// that a running VM or qemu-io that writes the image refuses it, and we refuse an image
    /// one of them writes. Only turn off for images nobody else can reach.
    bool lock = true;
    /// Bytes of L2 tables and refcount blocks kept in memory before dirty ones are written
    /// back (in the crash-safe order) and clean ones dropped. 0: 32 MiB.
    std::size_t cache_bytes = 0;
    /// Check the image's refcounts and tables first (check_image, what `qemu-img check`
    /// does; leaks are fine) and refuse it when they are damaged: new clusters are handed out
    /// by refcount, so writing into an image whose refcounts miss a used cluster would
    /// overwrite it. It reads every L2 table once (tens of milliseconds per 100 GiB of data
    /// with 64 KiB clusters). Turn off only for images known to be sound.
    bool check = true;
    /// Data writes of whole pages (offset, buffers and lengths 4 KiB-aligned) bypass the page
    /// cache (O_DIRECT), as qemu's cache mode "none" (`qemu-img commit -t none`); metadata
    /// stays buffered and every flush syncs both, in the same crash-safe order. Where the
    /// page cache is costly this makes long copies several times faster; it is a choice, not
    /// the default. invalid_argument where the file system refuses O_DIRECT (tmpfs).
    bool direct_data_writes = false;
};

/// Where a range of the disk comes from, as the writable image sees it now (for NBD block
/// status and SEEK_DATA/SEEK_HOLE).
struct BlockStatus {
    std::uint64_t offset = 0;
    std::uint64_t length = 0; ///< never 0 for a range inside the disk
    bool allocated = false;   ///< this image (top layer) decides the range's content
    bool zero = false;        ///< the range reads as zeros (may be true with allocated)
};

/// A qcow2 image opened for writing in place.
///
/// Thread rules: every method may be called from any thread; calls are serialised by an
/// internal mutex (one request at a time). Reads see every write made through this object,
/// flushed or not. The file must not be written by anyone else meanwhile: QEMU's image locks
/// (WritableOptions::lock) keep qemu out.
///
/// Crash safety (README, "Writing in place"): the file is changed in the order qemu changes
/// it, so that after a crash at any point `qemu-img check` finds no corruption. Metadata (L2
/// tables, refcounts) is kept in a write-back cache and written at `flush`, `close`, or when
/// the cache is full. A crash may lose writes made after the last completed `flush` (as with a
/// disk's write cache) and may leak clusters (refcount higher than the references: wasted
/// space that `qemu-img check -r leaks` reclaims), never more. Every write completed before
/// the last completed `flush` reads back after a crash.
///
/// Persistent dirty bitmaps that are enabled get every written, zeroed and discarded range
/// set, as qemu does; while the image is open they carry the in_use flag on disk, cleared by
/// `close` once their data is stored.
class WritableImage {
  public:
    /// Opens the qcow2 image at `path` for writing: qcow2 version 2 or 3, any cluster size,
    /// extended L2 entries, compressed clusters, backing chains, external data files, internal
    /// snapshots, persistent bitmaps. Errors: those of Image::open; unsupported_version (qcow
    /// version 1); unsupported_feature (the corrupt bit, the dirty bit of an image qemu left
    /// with lazy refcounts: repair it with `qemu-img check -r all`; a snapshot asked for;
    /// a raw file); encrypted; invalid_table (WritableOptions::check found corruption: repair
    /// it with `qemu-img check -r all`); io_error (cannot open the file for writing; locked by
    /// another program, the message names the lock).
    static Result<WritableImage> open(const std::filesystem::path& path,
                                      const WritableOptions& options = {});

    WritableImage(WritableImage&&) noexcept;
    WritableImage& operator=(WritableImage&&) noexcept;
    /// Closes the image like `close()` when that was not called; errors are lost then.
    ~WritableImage();

    /// Virtual disk size in bytes.
    std::uint64_t size() const;
    /// The header as it is now (size and features follow `resize` and bitmap changes).
    ImageInfo info() const;
    const std::filesystem::path& path() const;

    /// Copies `dest.size()` bytes of the disk at `offset` into `dest`, as written through this
    /// object (flushed or not). Returns the bytes copied: fewer only at the end of the disk.
    /// Errors: out_of_range (offset past the end), the errors of reading tables and
    /// compressed clusters, io_error.
    Result<std::size_t> read(std::span<std::byte> dest, std::uint64_t offset);

    /// Writes `data` at `offset`. Errors: out_of_range (the range passes the end of the disk),
    /// invalid_table / invalid_cluster (the image is damaged where the write goes; nothing
    /// is changed), io_error (the file could not be written; the image stays consistent
    /// but this write may be partly done), invalid_argument (closed).
    Result<void> write(std::uint64_t offset, std::span<const std::byte> data);

    /// Makes `[offset, offset + length)` read as zeros. Whole clusters (subclusters with
    /// extended L2 entries) become zero clusters, their host clusters freed when `unmap`;
    /// partial ones are written with zeros. Version 2 images have no zero clusters: ranges
    /// are deallocated when nothing lies below (no backing file) and `unmap`, else written
    /// with zeros. Errors as `write`.
    Result<void> write_zeroes(std::uint64_t offset, std::uint64_t length, bool unmap = false);

    /// Tells the image the range's content is no longer needed, as qemu's discard does: whole
    /// clusters inside the range are freed and read as zeros (version 3, or with nothing below)
    /// or from the backing file (version 2); partial clusters are left as they are. Errors as
    /// `write`.
    Result<void> discard(std::uint64_t offset, std::uint64_t length);

    /// Makes every write so far durable: data, then refcounts, then L2/L1 tables, each step
    /// synced before the next (the order in the class comment). Errors: io_error.
    Result<void> flush();

    /// Changes the virtual size. Growing extends the L1 table when needed (a new one, switched
    /// to by one header write); the new range reads as zeros (or from a backing file as far as
    /// it reaches, as qemu). Shrinking is refused unless nothing is allocated past the new end
    /// (as `qemu-img resize --shrink` with unallocated tails). Images with internal snapshots
    /// or persistent bitmaps: growing only... see README. Errors: invalid_argument (not a
    /// multiple of 512, shrink with data past the end, bitmaps present), io_error.
    Result<void> resize(std::uint64_t new_size);

    /// Allocation of the range starting at `offset` (at most `length` bytes) as seen now: the
    /// first run of equal status. Errors: out_of_range, table errors.
    Result<BlockStatus> block_status(std::uint64_t offset, std::uint64_t length);

    /// Flushes, stores the bitmaps (clearing in_use) and releases the file and its locks.
    /// Afterwards every method but the destructor fails with invalid_argument. Calling it
    /// twice is harmless.
    Result<void> close();

    /// Flushes and opens a read-only Image of the file as it is now, for walks (`extents`,
    /// `visit`, `map`, `hash`). The Image does not see later writes.
    Result<Image> snapshot_view();

    /// Clusters this object has allocated and freed since open, for tests and statistics.
    struct Stats {
        std::uint64_t allocated_clusters = 0;
        std::uint64_t freed_clusters = 0;
        std::uint64_t syncs = 0; ///< fdatasync calls
        std::uint64_t writebacks = 0;
    };
    Stats stats() const;

    struct State;

  private:
    explicit WritableImage(std::unique_ptr<State> state);
    std::unique_ptr<State> state_;
    /// The lifecycle operations (lifecycle.hpp) work on the writer's state.
    friend State& detail_state(WritableImage& image);
};

} // namespace qcowmap

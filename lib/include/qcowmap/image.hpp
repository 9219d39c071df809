// qcowmap — a qcow2 image read through one read-only memory mapping.
#pragma once

#if !defined(__cplusplus) || __cplusplus < 202002L
#error "qcowmap needs C++20: compile with -std=c++20 (Meson: cpp_std=c++20)"
#endif

#include <qcowmap/extent.hpp>
#include <qcowmap/info.hpp>
#include <qcowmap/options.hpp>
#include <qcowmap/result.hpp>
#include <qcowmap/version.hpp>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace qcowmap {

/// One layer of an opened chain, top first.
struct LayerInfo {
    std::filesystem::path path; ///< as opened (relative names resolved against the overlay)
    std::string format;         ///< "qcow2", "qcow" or "raw"
    std::uint64_t virtual_size = 0;
    /// Device and inode of the layer's file (0, 0 for an image in memory): the same file
    /// reached by two names is one layer.
    std::uint64_t device = 0;
    std::uint64_t inode = 0;
};

/// One run of the virtual disk as `Image::visit` hands it to its visitor: the run's bytes
/// produced the way the visit was asked to (straight from the mapping, read into a buffer, or
/// decompressed), in disk order.
struct Run {
    std::uint64_t offset = 0; ///< start in the virtual disk
    std::uint64_t length = 0; ///< never 0
    /// How the range is stored. data: `bytes` are the run's bytes; zero: `bytes` is empty (the
    /// range reads as zeros); compressed: `bytes` are the decompressed bytes of the range.
    ExtentKind kind = ExtentKind::zero;
    /// False where no layer allocates the range (as Extent::present).
    bool present = false;
    /// The layer that supplied the range (as Extent::depth).
    std::uint32_t depth = 0;
    /// `length` bytes, or empty for a zero run. Valid during the visitor call only, except
    /// when `mapped`: then they lie in the image's file mapping and live as long as the Image.
    std::span<const std::byte> bytes;
    /// data runs stored in a file: where `bytes` start in that file (layer file or external data
    /// file), whichever way they were produced — for copy_file_range, splice or pread. Positioned
    /// calls only; the descriptor is owned by the Image. nullopt for zero and compressed runs
    /// and for images opened from memory.
    std::optional<FilePosition> file;
    /// True when `bytes` point into the image's read-only file mapping (DataAccess::mapping):
    /// they are immutable while the Image lives, so they may be handed to the kernel by
    /// reference (vmsplice) or their pages dropped from the process (MADV_DONTNEED).
    bool mapped = false;
};

/// Receives one run of `Image::visit`. Return an error to stop the walk.
using RunVisitor = std::function<Result<void>(const Run& run)>;

class Image;
namespace detail {
class RunWalk;
} // namespace detail

/// The runs of a range of the virtual disk with their bytes produced, in order, as a
/// single-pass input range the caller advances (`Image::runs`): `Image::visit` turned inside
/// out, with the same look-ahead. See detail::RunWalk for how long a run's bytes live.
using RunRange = WalkRange<detail::RunWalk>;

/// A qcow2 image opened read-only through a memory mapping.
///
/// Immutable after `open`: share one `Image` (or copies of it, which are cheap) across threads
/// freely. Every span it hands out points into the mapping and stays valid while any copy of the
/// `Image` is alive. The file must not be modified or truncated while it is mapped.
///
/// Two ways to consume the disk, layered on each other: `extents()` (the allocation map as a
/// range, data as spans into the mapping) and `visit()` (every run with its bytes produced:
/// decompressed, read ahead on threads). `read()` and the stream device are thin layers over
/// `visit()`.
class Image {
  public:
    /// Maps and validates the image, its backing chain and external data file. Errors:
    /// io_error (cannot open/map; a missing backing or data file names the path it looked
    /// for), not_qcow2, unsupported_version, invalid_header, invalid_table (including a
    /// backing chain that loops or is deeper than kMaxChainLayers), unsupported_feature,
    /// encrypted, invalid_argument (no such snapshot).
    static Result<Image> open(const std::filesystem::path& path, const OpenOptions& options = {});

    /// Validates an image already in memory (tests, fuzzing). `bytes` must outlive the Image.
    /// A backing file is found through `options.backing_resolver`; without one such images
    /// need `BackingMode::none` and fail with unsupported_feature otherwise. An external data
    /// file cannot be opened from memory (unsupported_feature).
    static Result<Image> open_bytes(std::span<const std::byte> bytes,
                                    const OpenOptions& options = {});

    /// Virtual disk size in bytes (the snapshot's size when one was opened).
    std::uint64_t size() const;
    /// The chain as opened: this image first, then each backing layer.
    std::vector<LayerInfo> layers() const;
    /// True when the file with this device and inode number is mapped by the image: one of
    /// its layers or an external data file. Lets a writer refuse to overwrite its own input.
    bool maps_file(std::uint64_t device, std::uint64_t inode) const;
    /// True when a file of the image (a layer or an external data file) has changed size or
    /// modification time since `open` mapped it, or can no longer be checked: someone wrote to
    /// it, so what was read since may mix two states. Costs one fstat per file. Never true
    /// for open_bytes. QEMU's image locks (OpenOptions::force_share false) keep qemu's writers
    /// out while the Image lives; this catches the rest (-U, writers that ignore the locks).
    bool changed_since_open() const;
    /// `error` unless the image changed since open: then image_changed, "image changed while
    /// being read (FILE was written meanwhile)", which names the real cause of whatever
    /// failed (a table that now lies beyond the mapped end, a mismatch, a corruption).
    Error explain(Error error) const;
    /// Nothing when no file changed since open (changed_since_open), else the image_changed
    /// error explain() gives. Long operations (hash, compare, check, export, write) end with it
    /// so that a result read from a changing image is never handed out as good.
    Result<void> check_unchanged() const;
    /// The decoded header.
    const ImageInfo& info() const;
    /// The path given to `open` (empty for `open_bytes`).
    const std::filesystem::path& path() const;
    /// The whole mapped image file (the container, not the virtual disk).
    std::span<const std::byte> file_bytes() const;

    /// The extents covering `[start, min(end, size()))`, in order, as a single-pass input range
    /// (see ExtentRange): data as spans into the mapping with their file position, zero runs
    /// without bytes, compressed clusters as their compressed stream.
    ExtentRange extents(std::uint64_t start = 0, std::uint64_t end = UINT64_MAX) const;

    /// Walks `[start, min(end, size()))` in order and calls `visitor` with every run's bytes:
    /// data straight from the mapping (DataAccess::mapping, zero copies) or read into a buffer
    /// in pieces of at most kReadPieceBytes (DataAccess::read), compressed clusters
    /// decompressed, zero runs without bytes. With `options.threads` > 1 the bytes are
    /// produced ahead of the visitor on that many workers (decompression starts only when a
    /// compressed cluster is met, so images without any cost nothing extra; memory stays
    /// bounded at 4 × threads pieces in flight), while the visitor is called on the calling
    /// thread in disk order. Errors: those of the extent walk and of decompression, io_error
    /// when reading the file fails or finds it shorter than the mapping, or the visitor's own.
    Result<void> visit(std::uint64_t start, std::uint64_t end, const RunVisitor& visitor,
                       const VisitOptions& options = {}) const;

    /// The runs `visit(start, end, ..., options)` would hand its visitor, as a range the caller
    /// steps through at its own pace (a Python iterator, a C iterator, a loop that stops when
    /// it likes). With `options.threads` > 1 the bytes are produced ahead of the caller on
    /// worker threads exactly as for visit: data read with pread (DataAccess::read) or mapped
    /// pages made present and touched (Prefetch::touch) a bounded window ahead, compressed
    /// clusters decompressed ahead, and the mapped pages the caller has stepped past dropped
    /// from the process. A data run's bytes live until the next step unless they lie in the
    /// mapping (`Run::mapped`: as long as the Image) or the caller keeps them
    /// (`runs.walk().hold()`). The range's own steps run inside the library's fault boundary:
    /// a page that cannot be read ends the walk with an io_error (`error()`), never a SIGBUS,
    /// for every byte produced ahead with Prefetch::touch or DataAccess::read.
    RunRange runs(std::uint64_t start = 0, std::uint64_t end = UINT64_MAX,
                  const VisitOptions& options = {}) const;

    /// Makes the pages of `bytes` (a span this Image handed out: an extent's or a run's bytes
    /// in the mapping) present and reads one byte of each, inside the library's fault
    /// boundary: io_error (the file shrank, or an I/O error reading it) where a page cannot be
    /// read now, instead of a SIGBUS when the caller touches it. A page that is evicted and
    /// fails later, or a file truncated later, can still fault in the caller's own code.
    Result<void> check_readable(std::span<const std::byte> bytes) const;

    /// Copies `dest.size()` bytes of the virtual disk starting at `offset` into `dest`.
    /// Returns the bytes copied: fewer than asked only when the disk ends first.
    /// Errors: out_of_range when `offset > size()`, and any error the extent walk meets.
    Result<std::size_t> read(std::span<std::byte> dest, std::uint64_t offset) const;

  private:
    explicit Image(std::shared_ptr<const detail::ImageState> state);
    /// visit() once inside the fault boundary.
    Result<void> visit_in_boundary(std::uint64_t start, std::uint64_t end,
                                   const RunVisitor& visitor, const VisitOptions& options) const;
    /// What open and open_bytes share once the chain is open (the salvage scan).
    static Result<Image> from_chain(Result<std::shared_ptr<const detail::ImageState>> state,
                                    const OpenOptions& options);
    std::shared_ptr<const detail::ImageState> state_;
    friend class Decompressor;
    friend const detail::ImageState& detail_state(const Image& image);
};

namespace detail {

/// The machinery of `RunRange` (Image::runs), also what Image::visit drives. Library-internal
/// in its parts; `hold()` and `extent()` are for consumers that need more than the runs.
class RunWalk {
  public:
    using value_type = Run;
    RunWalk(const Image& image, std::uint64_t start, std::uint64_t end,
            const VisitOptions& options);
    RunWalk(RunWalk&&) noexcept;
    RunWalk& operator=(RunWalk&&) noexcept;
    ~RunWalk();

    /// Produces the next run into `out`. False at the end of the range or on error. The run
    /// produced before is done with: its buffer may be reused, its mapped pages dropped.
    bool next(Run& out);
    const std::optional<Error>& error() const { return error_; }

    /// Keeps the bytes of the run `next()` produced last valid after the walk moves on, for as
    /// long as the returned owner lives (the walk then reads into a fresh buffer). nullptr when
    /// they need no owner: zero runs, and mapped bytes, which live as long as the Image.
    std::shared_ptr<const void> hold() const;
    /// The extent the run `next()` produced last is a piece of (its host offset, its
    /// compressed stream). Valid until the next step.
    const Extent& extent() const;

  private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
    std::optional<Error> error_;
};

} // namespace detail

/// Produces the bytes of compressed extents. Holds a one-cluster buffer and decoder state: own
/// one per thread. Never shared mutable state inside `Image`.
class Decompressor {
  public:
    Decompressor();
    ~Decompressor();
    Decompressor(Decompressor&&) noexcept;
    Decompressor& operator=(Decompressor&&) noexcept;

    /// Decompresses the cluster of a compressed `extent` from `image` and returns its
    /// `extent.length` bytes starting at `extent.offset_in_cluster`. The span lives until the
    /// next call. Errors: compressed_data (decoder error, output short of or past one cluster).
    Result<std::span<const std::byte>> decompress(const Image& image, const Extent& extent);

    /// Decompresses the whole cluster of a compressed `extent` into `cluster`, which must be
    /// exactly one cluster long (the extent's bytes then start at `extent.offset_in_cluster`).
    /// Errors: compressed_data, invalid_argument for a wrong extent or buffer size.
    Result<void> decompress_cluster(const Image& image, const Extent& extent,
                                    std::span<std::byte> cluster);

    /// Decompresses one compressed cluster's stream as stored in a file (`type` zlib: raw
    /// deflate; zstd: one frame) into `cluster`, the image's cluster size, which it must fill
    /// exactly; `input` may run on past the end of the stream (descriptors count whole
    /// sectors). For streams that do not lie in an opened Image (StreamDecoder).
    /// Errors: compressed_data, saying what the decoder found (no position: the caller knows it).
    Result<void> decompress_stream(CompressionType type, std::span<const std::byte> input,
                                   std::span<std::byte> cluster);

  private:
    Result<void> decompress_in_boundary(const Image& image, const Extent& extent,
                                        std::span<std::byte> cluster);
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

/// Installs the library's SIGBUS handler now, on top of any handler installed since it last
/// was. The library contains faults of its own reads of a mapping (a file truncated under it,
/// an I/O error behind a page): the call that met one returns an io_error and the process
/// lives on (README, "Errors and exit codes"). The handler is installed by the first call that
/// reads a mapping and hands every other SIGBUS to the handler it replaced; a program that
/// installs its own SIGBUS handler later (Python's faulthandler.enable()) calls this again,
/// or only its own handler sees the faults.
void install_fault_handler();

} // namespace qcowmap

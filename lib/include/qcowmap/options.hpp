// qcowmap — how an image is opened and how its disk is walked.
#pragma once

#if !defined(__cplusplus) || __cplusplus < 202002L
#error "qcowmap needs C++20: compile with -std=c++20 (Meson: cpp_std=c++20)"
#endif

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <span>
#include <string>

namespace qcowmap {

/// What to do with a backing file named in the header.
enum class BackingMode {
    follow, ///< read through the backing chain: unallocated ranges fall through to the layer below
    none,   ///< read only this image: unallocated ranges read as zeros and are not `present`
};

/// The deepest backing chain `open` follows (layers, the image itself included).
inline constexpr unsigned kMaxChainLayers = 64;

struct OpenOptions {
    BackingMode backing = BackingMode::follow;
    /// Use this file as the top image's backing file instead of the one the header names
    /// (relative paths are taken as they are, from the current directory).
    std::optional<std::filesystem::path> backing_file;
    /// Format of `backing_file` (or of the named one): "qcow2" or "raw". Without it the
    /// header's backing-format extension decides, else the file's magic.
    std::optional<std::string> backing_format;
    /// Use this file as the external data file instead of the one the header names.
    std::optional<std::filesystem::path> data_file;
    /// Read this internal snapshot (matched by ID first, then by name) instead of the active
    /// disk. Backing layers below are read as they are.
    std::optional<std::string> snapshot;
    /// Format of the image itself: "qcow2" (qcow version 1 included) or "raw" (every byte of
    /// the file is disk content; holes read as zeros). Unset: qcow2, and a file that is not
    /// one is refused with not_qcow2 (callers that probe, like `compare`, pass "raw").
    std::optional<std::string> format;
    /// False: an external data file that cannot be opened (or that the image does not name) is
    /// no error. The image opens without it, which is enough for its header (`info`), and
    /// `data_file_status()` (describe.hpp) says why it is missing; reading a data cluster of
    /// such an image then fails (the clusters lie beyond the end of an empty data file).
    bool require_data_file = true;
    /// For `open_bytes` only: resolves a backing file name (as stored in the image) to the
    /// bytes of that file, or nullopt when there is none. The bytes must outlive the Image.
    /// Lets tests and fuzzers build backing chains in memory; loops (the same bytes twice)
    /// and chains deeper than kMaxChainLayers are refused as with files.
    std::function<std::optional<std::span<const std::byte>>(const std::string& name)>
        backing_resolver;
    /// The image comes from outside (an upload, an exhibit, a template from the internet): a
    /// backing file or data file name read from any layer's header is followed only when it
    /// is relative, stays inside the directory of the image naming it once `..` and symlinks
    /// are resolved, and names a regular file (no device, FIFO, socket, /proc or /sys file).
    /// Otherwise open fails with unsupported_feature, naming the reference and why (the
    /// message ends in kUntrustedRefusalMark, <qcowmap/references.hpp>). Names the caller
    /// passes (`backing_file`, `data_file`) are trusted. The name is opened in the same step
    /// as it is checked (openat2 RESOLVE_BENEATH where the kernel has it), so a symlink
    /// swapped in meanwhile cannot escape. Images in memory: names go to backing_resolver.
    bool untrusted = false;
    /// Salvage a damaged image (truncated downloads, partial copies): instead of failing at
    /// the first bad table or cluster, read what can be read, as qemu-img reads a truncated
    /// file. L1/L2 table entries past the end of the file read as unallocated (a backing
    /// layer shows through), data past the end as zeros; entries with reserved bits or
    /// unaligned offsets, compressed clusters past the end of the file or that do not
    /// decompress read as zeros. The header must still parse. Open then walks the whole
    /// disk's metadata once and decompresses every compressed cluster once to find the
    /// damage, listed by salvage_report() (<qcowmap/salvage.hpp>); every read, walk and visit
    /// of the Image sees the same zeros.
    bool salvage = false;
    /// QEMU's image locks (advisory OFD byte-range locks, as qemu's block/file-posix.c takes
    /// them). false (the default): open takes on every file it maps (each layer, each external
    /// data file) the shared lock `qemu-img info` and `qemu-img convert` take as readers —
    /// "consistent read" held, "write" denied to others — and fails with image_in_use,
    /// `Failed to get shared "write" lock: is another process using the image?`, when a
    /// writer (a running VM, qemu-io, qemu-img commit) holds the image. The locks last as
    /// long as the Image (any copy of it) lives, and while they do a qemu that wants to write
    /// the image is refused (`Failed to get "write" lock`): an nbdkit export, a FUSE mount or
    /// a Python object keeps the image exactly as it was mapped, as `qemu-nbd --read-only`
    /// does. Release the Image to let a writer in.
    /// true (`qemu-img -U`, `--force-share`): no locks are taken or checked. The image may then
    /// change while it is read; results read from a changing image are not to be trusted, and
    /// operations that notice (Image::changed_since_open) fail with image_changed.
    /// open_bytes takes no locks (there is no file).
    bool force_share = false;
};

/// How data runs that lie in the image's files reach their consumer.
enum class DataAccess : std::uint8_t {
    /// Spans straight into the mapping: zero copies. The pages are faulted into the process as
    /// the visitor touches them, or made present ahead of it (VisitOptions::prefetch).
    mapping,
    /// pread(2) into a buffer owned by the walk, at most kReadPieceBytes at a time (a long run
    /// arrives as several visits), read ahead by the visit's threads when it has more than
    /// one. One copy, made by the kernel from the page cache. A data run cut short underneath
    /// gives pread's io_error (metadata and compressed clusters are still read through the
    /// mapping, where the library's fault boundary turns a fault into an io_error too).
    read,
    /// Whichever of the two costs less on this machine, measured once per process
    /// (`automatic_data_access()`). The default of hash_image, compare_images and the CLI.
    automatic,
};

/// What DataAccess::automatic stands for in this process: `mapping` unless making mapped pages
/// usable costs more than copying them. Measured on the first call (later calls return the
/// same answer) in thread CPU time, which a busy machine does not inflate: a few 256 KiB
/// windows of a memory file read with pread, and the same windows of a fresh mapping made
/// present (MADV_POPULATE_READ) and read one byte per page. On bare metal and on VMs whose
/// hardware walks the guest's page tables the mapping wins by several times; under shadow
/// paging (a "pvm" guest, where every first touch of a mapped page traps to the hypervisor
/// even after MADV_POPULATE_READ) pread does (README, "Benchmarks"). Takes well under a
/// millisecond; `mapping` if the measurement cannot be made.
DataAccess automatic_data_access();

/// The largest piece of a data run a `DataAccess::read` visit hands out at once: small enough
/// to stay in the core's L2 cache between the kernel's copy and the visitor's use.
inline constexpr std::size_t kReadPieceBytes = 256 * 1024;

/// What `Image::visit` does ahead of the visitor with data runs it hands out straight from a
/// file mapping (DataAccess::mapping). With anything but `none` the visit streams: long runs
/// arrive in pieces of at most kPrefetchWindowBytes, and the pages of mapped data are dropped
/// from the process (MADV_DONTNEED; they stay in the page cache) once the visitor has
/// returned from them, so the resident set stays a few MiB whatever the disk size. A span
/// used again later is still valid: its pages are faulted back in.
enum class Prefetch : std::uint8_t {
    /// Nothing: pages are faulted in as the visitor touches them and stay mapped. For visitors
    /// that never touch the bytes (copy_file_range from `Run::file`) and for random access.
    none,
    /// Worker threads make the next windows present (MADV_POPULATE_READ, Linux 5.14; reading
    /// them from the file where they are not cached) while the visitor consumes the current
    /// one. For visitors that hand the bytes to the kernel by reference (vmsplice).
    populate,
    /// As `populate`, and the workers also read one byte of every page: where the hypervisor
    /// shadows page tables, the first CPU access to a populated page still traps, and this
    /// moves that cost off the visitor's thread; elsewhere it costs little. For visitors that
    /// read the bytes (hash, compare).
    touch,
};

/// The largest piece of a mapped data run a prefetching visit hands out at once, and the amount
/// of data one prefetch job makes present.
inline constexpr std::size_t kPrefetchWindowBytes = 1024 * 1024;

/// How `Image::visit` walks.
struct VisitOptions {
    /// Threads producing bytes ahead of the visitor: decompressing compressed clusters and,
    /// with DataAccess::read, reading data pieces, or with `prefetch`, making mapped pages
    /// present. 0 or 1: everything on the calling thread (no prefetching then; pages are still
    /// dropped behind the visitor when `prefetch` is not `none`).
    unsigned threads = 1;
    DataAccess data_access = DataAccess::mapping;
    Prefetch prefetch = Prefetch::none;
};

} // namespace qcowmap

// qcowmap — how an image is opened and how its disk is walked.
#pragma once

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
};

/// How `Image::visit` hands data runs that lie in the image's files to the visitor.
enum class DataAccess : std::uint8_t {
    /// Spans straight into the mapping: zero copies. The pages are faulted into the process as
    /// the visitor touches them.
    mapping,
    /// pread(2) into a buffer owned by the walk, at most kReadPieceBytes at a time (a long run
    /// arrives as several visits), read ahead by the visit's threads when it has more than
    /// one. One copy, made by the kernel from the page cache. Which of the two is faster
    /// depends on the machine (README, "Benchmarks"). A data run cut short underneath gives an
    /// io_error where the mapping raises SIGBUS (metadata and compressed clusters are still
    /// read through the mapping).
    read,
};

/// The largest piece of a data run a `DataAccess::read` visit hands out at once: small enough
/// to stay in the core's L2 cache between the kernel's copy and the visitor's use.
inline constexpr std::size_t kReadPieceBytes = 256 * 1024;

/// How `Image::visit` walks.
struct VisitOptions {
    /// Threads producing bytes ahead of the visitor: decompressing compressed clusters and,
    /// with DataAccess::read, reading data pieces. 0 or 1: everything on the calling thread.
    unsigned threads = 1;
    DataAccess data_access = DataAccess::mapping;
};

} // namespace qcowmap

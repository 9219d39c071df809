// qcowmap — digests of the virtual disk, whole or per block, fed straight from the mapping.
#pragma once

#if !defined(__cplusplus) || __cplusplus < 202002L
#error "qcowmap needs C++20: compile with -std=c++20 (Meson: cpp_std=c++20)"
#endif

#include <qcowmap/image.hpp>
#include <qcowmap/result.hpp>

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>

namespace qcowmap {

/// The digest algorithms `hash_image` and `hash_blocks` offer. SHA-2 and BLAKE2 come from
/// OpenSSL's libcrypto (EVP, which uses SHA-NI where the CPU has it); xxh3-128 from libxxhash.
///
/// The first four digest the disk as one stream of bytes. The blkhash ones use the block
/// construction of the blkhash project (nirs/blkhash 0.11, the `blksum` command's default):
/// the disk is cut into blocks of kBlkhashBlockSize bytes (the last one may be shorter and is
/// hashed as it is), and the digest is H(H(block 0) || ... || H(block n-1) || le64(disk size)),
/// H being the named digest and || the concatenation of raw digest bytes (an empty disk is
/// H(le64(0))). Its value does not depend on the image format, a block of zeros costs nothing
/// but its precomputed digest, and blocks are hashed on every core: its cost follows the
/// allocated data, not the virtual size.
enum class HashAlgorithm : std::uint8_t {
    sha256,             ///< as `sha256sum`
    sha512,             ///< as `sha512sum` / `openssl dgst -sha512`
    blake2b512,         ///< as `openssl dgst -blake2b512` / `b2sum`
    xxh3_128,           ///< as `xxhsum -H2` (XXH3 128-bit, canonical big-endian byte order)
    blkhash_sha256,     ///< as `blksum` (its default digest)
    blkhash_sha512,     ///< as `blksum -d sha512`
    blkhash_blake2b512, ///< as `blksum -d blake2b512`
};

/// Bytes per block of the blkhash construction (blkhash's default block size).
inline constexpr std::uint64_t kBlkhashBlockSize = 65536;

/// "sha256", "sha512", "blake2b512", "xxh3-128", "blkhash-sha256", "blkhash-sha512",
/// "blkhash-blake2b512".
std::string_view to_string(HashAlgorithm algorithm);

/// The algorithm named `name` (the names `to_string` gives), or nullopt.
std::optional<HashAlgorithm> parse_hash_algorithm(std::string_view name);

/// Bytes of a digest of `algorithm`: 32, 64, 64 or 16 (a blkhash algorithm: those of its
/// block digest).
std::size_t digest_size(HashAlgorithm algorithm);

/// True for the blkhash algorithms (the block construction).
bool is_blkhash(HashAlgorithm algorithm);

/// The digest a blkhash algorithm applies to blocks and to their digests (sha256 for
/// blkhash-sha256); any other algorithm is returned as it is.
HashAlgorithm block_digest_algorithm(HashAlgorithm algorithm);

/// A digest of up to 64 bytes.
struct Digest {
    std::array<std::uint8_t, 64> bytes{};
    std::size_t size = 0;

    /// The digest bytes.
    std::span<const std::uint8_t> view() const { return {bytes.data(), size}; }
    /// Lowercase hex, as sha256sum and xxhsum print it.
    std::string hex() const;
    bool operator==(const Digest&) const = default;
};

/// An incremental digest of one algorithm. Own one per thread; it is reusable: `finish()`
/// returns the digest and starts afresh. A blkhash algorithm digests the bytes fed as one disk
/// (as `blksum < FILE` does), on the calling thread; blocks of zeros fed with `update_zeros`
/// (or whose bytes are all zero) cost only their precomputed digest.
class Hasher {
  public:
    /// Errors: io_error when libcrypto cannot provide the algorithm (message names it).
    static Result<Hasher> create(HashAlgorithm algorithm);
    ~Hasher();
    Hasher(Hasher&&) noexcept;
    Hasher& operator=(Hasher&&) noexcept;

    HashAlgorithm algorithm() const;
    /// Feeds `bytes`.
    void update(std::span<const std::byte> bytes);
    /// Feeds `length` zero bytes from one static zero page (nothing is allocated).
    void update_zeros(std::uint64_t length);
    /// The digest of everything fed since the last `finish()` (or creation); starts afresh.
    /// Errors: io_error if libcrypto failed on any update or on finalisation.
    Result<Digest> finish();

  private:
    struct Impl;
    explicit Hasher(std::unique_ptr<Impl> impl);
    std::unique_ptr<Impl> impl_;
};

/// The digest of `length` zero bytes (computed once per call; cheap next to hashing data;
/// blkhash algorithms included).
Result<Digest> zero_digest(HashAlgorithm algorithm, std::uint64_t length);

struct HashOptions {
    HashAlgorithm algorithm = HashAlgorithm::sha256;
    /// Threads decompressing compressed clusters and making data present (or reading it) ahead
    /// of the hash (the hash itself is one sequential stream); for a blkhash algorithm, the
    /// workers that read and hash the blocks holding data. 0: one per core; 1: everything on
    /// the calling thread.
    unsigned threads = 0;
    /// How data reaches the hash: straight from the mapping with no copy at all (made present
    /// and touched ahead by the threads, dropped once hashed), or read into a cache-sized
    /// buffer; by default whichever costs less on this machine (automatic_data_access()).
    DataAccess data_access = DataAccess::automatic;
    /// Called on the calling thread as the hash advances: bytes of the disk hashed so far, and
    /// the disk size.
    std::function<void(std::uint64_t done, std::uint64_t total)> progress;
};

/// The digest of the whole virtual disk, equal to hashing `qemu-img convert -O raw` output.
/// Data runs are fed straight from the mapping, made present ahead by the threads (or read into
/// a small buffer ahead of the hash, see HashOptions::data_access), compressed clusters come
/// from the decompressing threads, zero runs from one static zero block (never materialised).
/// The resident set stays a few MiB whatever the disk size.
///
/// A blkhash algorithm (equal to `blksum` of the same raw bytes) costs what the allocated data
/// costs: zero and unallocated runs of the map are never read (each whole block of them adds
/// its precomputed digest), and the blocks holding data are hashed by `options.threads`
/// workers, each reading (or decompressing) its own stretch of the disk, while the calling
/// thread walks the map and takes their digests in order. Data blocks that hold only zeros
/// are found by a zero check before any hashing.
/// Errors: those of the extent walk and decompression, or of the hasher.
Result<Digest> hash_image(const Image& image, const HashOptions& options = {});

/// One image's digest as `hash_images` delivers it.
struct ImageDigest {
    Digest digest;
    std::uint64_t size = 0; ///< the virtual disk's size
};

/// Opens image `index` of a `hash_images` call (on a worker thread; the Image is closed once
/// hashed).
using ImageOpener = std::function<Result<Image>(std::size_t index)>;
/// Receives the digest of image `index`, or why it could not be opened or hashed, in index
/// order, on the calling thread. Return an error to stop.
using ImageDigestSink =
    std::function<Result<void>(std::size_t index, const Result<ImageDigest>& digest)>;

/// Hashes images 0 .. count - 1 concurrently: one image per worker (options.threads, 0: one per
/// core; an image alone gets every thread, as with hash_image), each hashed as by hash_image.
/// Digests reach `sink` in index order, each as soon as it and those before it are known; an
/// image that cannot be opened or hashed is reported to the sink and the others go on. At most
/// a few images per worker are open at once. `options.progress` is not called (hash one image
/// at a time with hash_image for that). Errors: only the sink's own.
Result<void> hash_images(std::size_t count, const ImageOpener& open, const HashOptions& options,
                         const ImageDigestSink& sink);

/// The smallest block size `hash_blocks` accepts.
inline constexpr std::uint64_t kMinHashBlockSize = 4096;

struct BlockHashOptions {
    /// Not a blkhash algorithm (those are whole-disk digests; their blocks are this one's
    /// blocks of kBlkhashBlockSize with the block digest algorithm).
    HashAlgorithm algorithm = HashAlgorithm::sha256;
    /// Bytes per block: a power of two >= kMinHashBlockSize. The last block is shorter when
    /// the disk size is not a multiple of it.
    std::uint64_t block_size = 65536;
    /// Worker threads hashing blocks. 0: one per core; 1: all on the calling thread.
    unsigned threads = 0;
    /// How data reaches the hash (see HashOptions::data_access).
    DataAccess data_access = DataAccess::automatic;
};

/// The digest of one block of the virtual disk.
struct BlockDigest {
    std::uint64_t index = 0;  ///< block number: covers [index * block_size, + length)
    std::uint64_t offset = 0; ///< index * block_size
    std::uint64_t length = 0; ///< block_size, less for a short last block
    Digest digest;
    /// True when the allocation map says the whole block reads as zeros (zero clusters,
    /// unallocated ranges, holes of raw layers): its digest is the precomputed digest of a
    /// zero block and nothing was read. Data blocks that happen to hold only zeros are found
    /// by a zero check and get the same digest without hashing, but keep `zero` false.
    bool zero = false;
};

/// Receives each block's digest, in block order, on the calling thread. Return an error to stop.
using BlockDigestSink = std::function<Result<void>(const BlockDigest&)>;

/// Streams the digest of every block of the virtual disk to `sink`, in order. The calling
/// thread walks the map: blocks that only zero runs touch get the precomputed digest without
/// any reading; stretches of blocks holding data are hashed on `options.threads` workers (each
/// reads its own stretch with its own iterator and decompressor); memory stays bounded by a
/// window of a few MiB per worker, whatever the disk size. Errors: invalid_argument for a bad
/// block size or a blkhash algorithm; those of the extent walk, decompression and the hasher;
/// or the sink's own.
Result<void> hash_blocks(const Image& image, const BlockHashOptions& options,
                         const BlockDigestSink& sink);

} // namespace qcowmap

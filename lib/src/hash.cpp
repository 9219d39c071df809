// Digests of the virtual disk. Data reaches the hash straight from the mapping, made present
// and touched ahead by the visit's workers and dropped behind (Prefetch::touch), or read into a
// small buffer (HashOptions::data_access), or from the decompressor's buffer; zero runs from one
// static zero block. Block digests (manifests and the blkhash construction) come from one
// engine: the calling thread walks the map, gives blocks that only zero runs touch their
// precomputed digest, and hands stretches of blocks holding data to workers that each read
// their own stretch; their digests come back in order.
#include "digest_internal.hpp"
#include "fault.hpp"
#include "image_state.hpp"
#include "populate.hpp"
#include "workers.hpp"

#include <qcowmap/hash.hpp>

#include <fmt/format.h>
#include <openssl/evp.h>
#include <openssl/opensslv.h>
#include <xxhash.h>

#include <dlfcn.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

namespace qcowmap {
namespace {

// Zero runs are fed from here, 64 KiB at a time: small enough to stay in L2 while it is hashed
// over and over, large enough that the per-call cost of the hash is nothing.
alignas(4096) const std::byte kZeroBlock[64 * 1024] = {};

/// OpenSSL's libcrypto, opened on first use instead of linked: loading and relocating it cost
/// every command ~4 ms of start-up on our VM (of ~13 ms), and only the SHA-2/BLAKE2 digests
/// need it. The EVP functions are the ones the headers declare; only their addresses are
/// looked up at run time, from the libcrypto ABI version the headers belong to.
struct Libcrypto {
    decltype(&::EVP_MD_fetch) md_fetch = nullptr;
    decltype(&::EVP_MD_free) md_free = nullptr;
    decltype(&::EVP_MD_CTX_new) ctx_new = nullptr;
    decltype(&::EVP_MD_CTX_free) ctx_free = nullptr;
    decltype(&::EVP_DigestInit_ex2) init = nullptr;
    decltype(&::EVP_DigestUpdate) update = nullptr;
    decltype(&::EVP_DigestFinal_ex) finish = nullptr;
    std::string error; ///< why it is unusable; empty when every function was found
};

const Libcrypto& libcrypto() {
    static const Libcrypto lib = [] {
        Libcrypto l;
        const std::string name = fmt::format("libcrypto.so.{}", OPENSSL_SHLIB_VERSION);
        // Never closed: the functions stay in use until the process ends.
        void* handle = ::dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
        if (!handle) {
            const char* why = ::dlerror();
            l.error = fmt::format("cannot load {} (OpenSSL, for SHA-2 and BLAKE2): {}", name,
                                  why ? why : "unknown error");
            return l;
        }
        auto find = [&](auto& function, const char* symbol) {
            void* address = ::dlsym(handle, symbol);
            if (!address && l.error.empty()) {
                l.error = fmt::format("{} has no {}", name, symbol);
            }
            static_assert(sizeof function == sizeof address);
            std::memcpy(&function, &address, sizeof function); // object to function pointer
        };
        find(l.md_fetch, "EVP_MD_fetch");
        find(l.md_free, "EVP_MD_free");
        find(l.ctx_new, "EVP_MD_CTX_new");
        find(l.ctx_free, "EVP_MD_CTX_free");
        find(l.init, "EVP_DigestInit_ex2");
        find(l.update, "EVP_DigestUpdate");
        find(l.finish, "EVP_DigestFinal_ex");
        return l;
    }();
    return lib;
}

const char* evp_name(HashAlgorithm algorithm) {
    switch (block_digest_algorithm(algorithm)) {
    case HashAlgorithm::sha256:
        return "SHA256";
    case HashAlgorithm::sha512:
        return "SHA512";
    case HashAlgorithm::blake2b512:
        return "BLAKE2B-512";
    default:
        break;
    }
    return nullptr;
}

} // namespace

std::string_view to_string(HashAlgorithm algorithm) {
    switch (algorithm) {
    case HashAlgorithm::sha256:
        return "sha256";
    case HashAlgorithm::sha512:
        return "sha512";
    case HashAlgorithm::blake2b512:
        return "blake2b512";
    case HashAlgorithm::xxh3_128:
        return "xxh3-128";
    case HashAlgorithm::blkhash_sha256:
        return "blkhash-sha256";
    case HashAlgorithm::blkhash_sha512:
        return "blkhash-sha512";
    case HashAlgorithm::blkhash_blake2b512:
        return "blkhash-blake2b512";
    }
    return "unknown";
}

std::optional<HashAlgorithm> parse_hash_algorithm(std::string_view name) {
    for (HashAlgorithm a : {HashAlgorithm::sha256, HashAlgorithm::sha512, HashAlgorithm::blake2b512,
                            HashAlgorithm::xxh3_128, HashAlgorithm::blkhash_sha256,
                            HashAlgorithm::blkhash_sha512, HashAlgorithm::blkhash_blake2b512}) {
        if (to_string(a) == name)
            return a;
    }
    return std::nullopt;
}

bool is_blkhash(HashAlgorithm algorithm) {
    return block_digest_algorithm(algorithm) != algorithm;
}

HashAlgorithm block_digest_algorithm(HashAlgorithm algorithm) {
    switch (algorithm) {
    case HashAlgorithm::blkhash_sha256:
        return HashAlgorithm::sha256;
    case HashAlgorithm::blkhash_sha512:
        return HashAlgorithm::sha512;
    case HashAlgorithm::blkhash_blake2b512:
        return HashAlgorithm::blake2b512;
    default:
        return algorithm;
    }
}

std::size_t digest_size(HashAlgorithm algorithm) {
    switch (block_digest_algorithm(algorithm)) {
    case HashAlgorithm::sha256:
        return 32;
    case HashAlgorithm::sha512:
        return 64;
    case HashAlgorithm::blake2b512:
        return 64;
    case HashAlgorithm::xxh3_128:
        return 16;
    default:
        break;
    }
    return 0;
}

std::string Digest::hex() const {
    static constexpr char digits[] = "0123456789abcdef";
    std::string out(size * 2, '0');
    for (std::size_t i = 0; i < size; ++i) {
        out[2 * i] = digits[bytes[i] >> 4];
        out[2 * i + 1] = digits[bytes[i] & 0xf];
    }
    return out;
}

namespace {

/// The blkhash construction over a stream of bytes, on one thread (a Hasher of a blkhash
/// algorithm): blocks are assembled in order; a block whose bytes so far are all zero is not
/// hashed until a byte that is not zero arrives, and a whole block of zeros costs only its
/// precomputed digest.
class BlkhashStream {
  public:
    BlkhashStream(Hasher block, detail::BlockDigestFeed feed)
        : block_(std::move(block)), feed_(std::move(feed)) {}

    void update(std::span<const std::byte> bytes) {
        constexpr std::uint64_t bs = kBlkhashBlockSize;
        while (!bytes.empty()) {
            if (fill_ == 0 && bytes.size() >= bs) {
                // A whole block in place: no assembly.
                auto block = bytes.first(bs);
                if (detail::all_zero(block)) {
                    feed_.add_zero_blocks(1);
                } else {
                    block_.update(block);
                    add_block(block_.finish());
                }
                total_ += bs;
                bytes = bytes.subspan(bs);
                continue;
            }
            const std::size_t n =
                static_cast<std::size_t>(std::min<std::uint64_t>(bytes.size(), bs - fill_));
            auto piece = bytes.first(n);
            if (!has_data_ && detail::all_zero(piece)) {
                pending_zeros_ += n;
            } else {
                if (!has_data_) {
                    block_.update_zeros(pending_zeros_);
                    pending_zeros_ = 0;
                    has_data_ = true;
                }
                block_.update(piece);
            }
            advance(n);
            bytes = bytes.subspan(n);
        }
    }

    void update_zeros(std::uint64_t length) {
        constexpr std::uint64_t bs = kBlkhashBlockSize;
        while (length > 0) {
            if (fill_ == 0 && length >= bs) {
                const std::uint64_t blocks = length / bs;
                feed_.add_zero_blocks(blocks);
                total_ += blocks * bs;
                length -= blocks * bs;
                continue;
            }
            const std::uint64_t n = std::min(length, bs - fill_);
            if (has_data_)
                block_.update_zeros(n);
            else
                pending_zeros_ += n;
            advance(n);
            length -= n;
        }
    }

    Result<Digest> finish() {
        if (fill_ > 0)
            end_block(); // the short last block, hashed as it is
        Result<Digest> digest =
            error_ ? Result<Digest>(*error_) : Result<Digest>(feed_.finish(total_));
        total_ = 0;
        error_.reset();
        return digest;
    }

  private:
    void advance(std::uint64_t n) {
        fill_ += n;
        total_ += n;
        if (fill_ == kBlkhashBlockSize)
            end_block();
    }

    void end_block() {
        if (has_data_) {
            add_block(block_.finish());
        } else if (fill_ == kBlkhashBlockSize) {
            feed_.add_zero_blocks(1);
        } else {
            block_.update_zeros(fill_); // a short last block of zeros
            add_block(block_.finish());
        }
        fill_ = 0;
        pending_zeros_ = 0;
        has_data_ = false;
    }

    void add_block(const Result<Digest>& digest) {
        if (digest)
            feed_.add(*digest);
        else if (!error_)
            error_ = digest.error();
    }

    Hasher block_;
    detail::BlockDigestFeed feed_;
    std::uint64_t fill_ = 0;          // bytes of the current block so far
    std::uint64_t pending_zeros_ = 0; // its zero bytes not hashed yet (all it holds so far)
    bool has_data_ = false;           // it holds a byte that is not zero
    std::uint64_t total_ = 0;
    std::optional<Error> error_;
};

} // namespace

struct Hasher::Impl {
    HashAlgorithm algorithm;
    EVP_MD* md = nullptr; // fetched once: an implicit fetch per init costs more than a 4k block
    EVP_MD_CTX* ctx = nullptr;
    XXH3_state_t* xxh = nullptr;
    std::unique_ptr<BlkhashStream> blkhash;
    bool failed = false;

    ~Impl() {
        // Non-null only when libcrypto was loaded.
        if (ctx)
            libcrypto().ctx_free(ctx);
        if (md)
            libcrypto().md_free(md);
        if (xxh)
            XXH3_freeState(xxh);
    }

    bool start() {
        if (blkhash)
            return true;
        if (xxh)
            return XXH3_128bits_reset(xxh) == XXH_OK;
        return libcrypto().init(ctx, md, nullptr) == 1;
    }
};

Hasher::Hasher(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Hasher::~Hasher() = default;
Hasher::Hasher(Hasher&&) noexcept = default;
Hasher& Hasher::operator=(Hasher&&) noexcept = default;

Result<Hasher> Hasher::create(HashAlgorithm algorithm) {
    auto impl = std::make_unique<Impl>();
    impl->algorithm = algorithm;
    if (is_blkhash(algorithm)) {
        auto block = Hasher::create(block_digest_algorithm(algorithm));
        if (!block)
            return std::move(block).error();
        auto feed = detail::BlockDigestFeed::create(block_digest_algorithm(algorithm));
        if (!feed)
            return std::move(feed).error();
        impl->blkhash = std::make_unique<BlkhashStream>(std::move(*block), std::move(*feed));
    } else if (algorithm == HashAlgorithm::xxh3_128) {
        impl->xxh = XXH3_createState();
        if (!impl->xxh)
            return Error{ErrorCode::io_error, "cannot allocate an XXH3 state"};
    } else {
        const Libcrypto& lib = libcrypto();
        if (!lib.error.empty())
            return Error{ErrorCode::io_error, lib.error};
        impl->md = lib.md_fetch(nullptr, evp_name(algorithm), nullptr);
        impl->ctx = lib.ctx_new();
        if (!impl->md || !impl->ctx) {
            return Error{ErrorCode::io_error,
                         fmt::format("libcrypto does not provide {}", evp_name(algorithm))};
        }
    }
    if (!impl->start()) {
        return Error{ErrorCode::io_error,
                     fmt::format("cannot start a {} digest", to_string(algorithm))};
    }
    return Hasher(std::move(impl));
}

HashAlgorithm Hasher::algorithm() const {
    return impl_->algorithm;
}

void Hasher::update(std::span<const std::byte> bytes) {
    if (bytes.empty())
        return;
    if (impl_->blkhash) {
        impl_->blkhash->update(bytes);
    } else if (impl_->xxh) {
        impl_->failed |= XXH3_128bits_update(impl_->xxh, bytes.data(), bytes.size()) != XXH_OK;
    } else {
        impl_->failed |= libcrypto().update(impl_->ctx, bytes.data(), bytes.size()) != 1;
    }
}

void Hasher::update_zeros(std::uint64_t length) {
    if (impl_->blkhash) {
        impl_->blkhash->update_zeros(length);
        return;
    }
    while (length > 0) {
        std::size_t n =
            static_cast<std::size_t>(std::min<std::uint64_t>(length, sizeof kZeroBlock));
        update({kZeroBlock, n});
        length -= n;
    }
}

Result<Digest> Hasher::finish() {
    if (impl_->blkhash)
        return impl_->blkhash->finish();
    Digest digest;
    digest.size = digest_size(impl_->algorithm);
    bool ok = !impl_->failed;
    if (impl_->xxh) {
        // xxhsum prints the canonical (big-endian) form: high 64 bits first.
        XXH128_canonical_t canonical;
        XXH128_canonicalFromHash(&canonical, XXH3_128bits_digest(impl_->xxh));
        std::memcpy(digest.bytes.data(), canonical.digest, sizeof canonical.digest);
    } else {
        unsigned int size = 0;
        ok = ok && libcrypto().finish(impl_->ctx, digest.bytes.data(), &size) == 1 &&
             size == digest.size;
    }
    impl_->failed = false;
    ok = impl_->start() && ok;
    if (!ok) {
        return Error{ErrorCode::io_error, fmt::format("{} digest failed in the hash library",
                                                      to_string(impl_->algorithm))};
    }
    return digest;
}

Result<Digest> zero_digest(HashAlgorithm algorithm, std::uint64_t length) {
    auto hasher = Hasher::create(algorithm);
    if (!hasher)
        return std::move(hasher).error();
    hasher->update_zeros(length);
    return hasher->finish();
}

namespace {
Result<Digest> blkhash_image(const Image& image, const HashOptions& options);
} // namespace

/// Zeros hashed between two progress reports: ~35 ms of sha256 at 1.8 GB/s.
constexpr std::uint64_t kZeroSliceBytes = 64u << 20;

static Result<Digest> hash_image_in_boundary(const Image& image, const HashOptions& options) {
    if (is_blkhash(options.algorithm))
        return blkhash_image(image, options);
    auto hasher = Hasher::create(options.algorithm);
    if (!hasher)
        return std::move(hasher).error();
    if (options.progress)
        options.progress(0, image.size());
    // The visit starts workers once it meets bytes to produce: mapped data to make present
    // (and drop once hashed), compressed clusters, or pieces to read.
    auto ok = image.visit(
        0, UINT64_MAX,
        [&](const Run& run) -> Result<void> {
            if (run.bytes.empty()) {
                // A long zero run (a thin disk: 16 GiB take ~10 s) is hashed in slices with
                // progress after each, so that a caller can show it or stop (Python's Ctrl-C).
                for (std::uint64_t done = 0; done < run.length;) {
                    const std::uint64_t slice =
                        std::min<std::uint64_t>(run.length - done, kZeroSliceBytes);
                    hasher->update_zeros(slice);
                    done += slice;
                    if (options.progress && done < run.length)
                        options.progress(run.offset + done, image.size());
                }
            } else {
                hasher->update(run.bytes);
            }
            if (options.progress)
                options.progress(run.offset + run.length, image.size());
            return {};
        },
        VisitOptions{detail::resolve_threads(options.threads), detail::resolve(options.data_access),
                     Prefetch::touch});
    if (!ok)
        return std::move(ok).error();
    // A digest of a half-written state must not look like the disk's.
    if (auto unchanged = image.check_unchanged(); !unchanged)
        return std::move(unchanged).error();
    return hasher->finish();
}

Result<Digest> hash_image(const Image& image, const HashOptions& options) {
    return detail::contain_faults(
        image.path(), [&]() -> Result<Digest> { return hash_image_in_boundary(image, options); });
}

namespace {

/// One image of hash_images: its index, then its digest.
struct ImageJob {
    std::size_t index = 0;
    ImageDigest digest;
};

} // namespace

Result<void> hash_images(std::size_t count, const ImageOpener& open, const HashOptions& options_in,
                         const ImageDigestSink& sink) {
    // Progress is per image and its callback would run on the workers: not used here.
    HashOptions options = options_in;
    options.progress = nullptr;
    const unsigned threads = detail::resolve_threads(options.threads);
    auto hash_one = [&](std::size_t index, const HashOptions& one) -> Result<ImageDigest> {
        auto image = open(index);
        if (!image)
            return std::move(image).error();
        auto digest = hash_image(*image, one);
        if (!digest)
            return std::move(digest).error();
        return ImageDigest{*digest, image->size()};
    };
    if (count == 1 || threads == 1) {
        for (std::size_t i = 0; i < count; ++i) {
            if (auto ok = sink(i, hash_one(i, options)); !ok)
                return ok;
        }
        return {};
    }
    // One image per worker, each hashed on its worker's thread alone: the cores are busy
    // hashing, with nothing left over to produce bytes ahead. Fewer images than threads share
    // the threads out.
    const unsigned workers = static_cast<unsigned>(std::min<std::size_t>(threads, count));
    HashOptions one = options;
    one.threads = threads / workers;
    detail::OrderedWorkers<ImageJob> ring(workers, 2 * static_cast<std::size_t>(workers),
                                          [&]() -> Result<detail::OrderedWorkers<ImageJob>::Work> {
                                              return detail::OrderedWorkers<ImageJob>::Work(
                                                  [&](ImageJob& job) -> Result<void> {
                                                      auto digest = hash_one(job.index, one);
                                                      if (!digest)
                                                          return std::move(digest).error();
                                                      job.digest = *digest;
                                                      return {};
                                                  });
                                          });
    if (ring.started() == 0) {
        for (std::size_t i = 0; i < count; ++i) {
            if (auto ok = sink(i, hash_one(i, options)); !ok)
                return ok;
        }
        return {};
    }
    std::size_t submitted = 0;
    for (std::size_t delivered = 0; delivered < count; ++delivered) {
        while (submitted < count && !ring.full()) {
            ring.next_slot().index = submitted++;
            ring.submit();
        }
        auto job = ring.front();
        Result<ImageDigest> digest =
            job ? Result<ImageDigest>((*job)->digest) : Result<ImageDigest>(job.error());
        ring.release();
        if (auto ok = sink(delivered, digest); !ok)
            return ok; // the ring's destructor stops and joins the workers
    }
    return {};
}

namespace {

/// Hashes the blocks of `[first_block, first_block + count)` into `out`, walking that stretch
/// of the disk with its own iterator (and decompressor). A block that only zero runs touch is
/// not hashed (`zero`, the precomputed digest); neither is a block whose data holds only zeros
/// (the zero check before the digest). A block made of several runs (small clusters,
/// subclusters, data next to zeros) is fed to the digest piece by piece, in order.
class BlockHasher {
  public:
    BlockHasher(const Image& image, std::uint64_t block_size, DataAccess access, Hasher hasher,
                const Digest& full_zero, const Digest& tail_zero)
        : image_(image), block_size_(block_size), access_(access), hasher_(std::move(hasher)),
          full_zero_(full_zero), tail_zero_(tail_zero) {}

    Result<void> run(std::uint64_t first_block, std::uint64_t count,
                     std::vector<BlockDigest>& out) {
        out.clear();
        const std::uint64_t bs = block_size_;
        const std::uint64_t size = image_.size();
        const std::uint64_t start = first_block * bs;
        const std::uint64_t end = std::min(size, (first_block + count) * bs);
        begin_block(first_block, std::min(bs, size - start));
        auto ok = image_.visit(
            start, end,
            [&](const Run& run) -> Result<void> {
                std::uint64_t offset = run.offset;
                std::uint64_t length = run.length;
                std::span<const std::byte> bytes = run.bytes;
                while (length > 0) {
                    const std::uint64_t in_block = current_.offset + current_.length - offset;
                    const std::uint64_t n = std::min(length, in_block);
                    if (bytes.empty()) {
                        if (has_data_) {
                            hasher_.update_zeros(n);
                        } else {
                            pending_zeros_ += n;
                        }
                    } else {
                        auto piece = bytes.first(static_cast<std::size_t>(n));
                        bytes = bytes.subspan(static_cast<std::size_t>(n));
                        mapped_data_ = true;
                        if (has_data_) {
                            hasher_.update(piece);
                        } else if (detail::all_zero(piece)) {
                            pending_zeros_ += n; // data that holds zeros: hashed only if
                                                 // something that is not zero follows
                        } else {
                            has_data_ = true;
                            hasher_.update_zeros(pending_zeros_);
                            hasher_.update(piece);
                        }
                    }
                    offset += n;
                    length -= n;
                    if (offset == current_.offset + current_.length) {
                        if (auto done = end_block(out); !done)
                            return done;
                        if (offset < end) {
                            begin_block(current_.index + 1, std::min(bs, size - offset));
                        }
                    }
                }
                return {};
            },
            // One thread per stretch (the workers are the parallelism): mapped pages are
            // dropped once hashed, which keeps the resident set small.
            VisitOptions{1, access_, Prefetch::touch});
        return ok;
    }

  private:
    void begin_block(std::uint64_t index, std::uint64_t length) {
        current_ = BlockDigest{};
        current_.index = index;
        current_.offset = index * block_size_;
        current_.length = length;
        has_data_ = false;
        mapped_data_ = false;
        pending_zeros_ = 0;
    }

    Result<void> end_block(std::vector<BlockDigest>& out) {
        if (has_data_) {
            auto digest = hasher_.finish();
            if (!digest)
                return std::move(digest).error();
            current_.digest = *digest;
        } else {
            current_.zero = !mapped_data_;
            current_.digest = current_.length == block_size_ ? full_zero_ : tail_zero_;
        }
        out.push_back(current_);
        return {};
    }

    const Image& image_;
    std::uint64_t block_size_;
    DataAccess access_;
    Hasher hasher_;
    const Digest& full_zero_;
    const Digest& tail_zero_;
    BlockDigest current_;
    bool has_data_ = false;    // a byte that is not zero was fed for the current block
    bool mapped_data_ = false; // the current block has data runs (maybe of zeros)
    std::uint64_t pending_zeros_ = 0;
};

/// One unit of the block engine's work: a stretch of blocks holding data, hashed by one worker.
struct Stretch {
    std::uint64_t first = 0;
    std::uint64_t count = 0;
    std::vector<BlockDigest> digests;
};

/// Receives blocks `[first, first + count)`, which only zero runs touch (so each has the
/// digest of a zero block of its length), in order with the hashed ones.
using ZeroBlocksSink = std::function<Result<void>(std::uint64_t first, std::uint64_t count)>;
/// Receives the digests of a stretch of blocks, in order.
using StretchSink = std::function<Result<void>(std::span<const BlockDigest> digests)>;

/// The block engine behind hash_blocks and the blkhash algorithms. The calling thread walks
/// the map once: blocks that only zero runs touch are handed to `zero_blocks` without being
/// read; blocks that hold data (or compressed clusters) are grouped into stretches of about
/// kStretchBytes of them (a stretch takes in short zero gaps rather than cost a hand-over per
/// fragment) that the workers hash, each reading its stretch with its own walk; the stretches
/// come back in order. With one thread everything runs on the calling thread.
Result<void> digest_blocks(const Image& image, HashAlgorithm algorithm, std::uint64_t block_size,
                           unsigned threads_wanted, DataAccess data_access,
                           const ZeroBlocksSink& zero_blocks, const StretchSink& stretches) {
    const std::uint64_t bs = block_size;
    const std::uint64_t size = image.size();
    if (size == 0)
        return {};
    const std::uint64_t blocks = size / bs + (size % bs != 0);
    auto full_zero = zero_digest(algorithm, bs);
    if (!full_zero)
        return std::move(full_zero).error();
    auto tail_zero = zero_digest(algorithm, size % bs == 0 ? bs : size % bs);
    if (!tail_zero)
        return std::move(tail_zero).error();
    const DataAccess access = detail::resolve(data_access);
    // A stretch holds about 2 MiB of data blocks (a millisecond of SHA-256: a hand-over costs
    // far less), and zero gaps up to that size inside it.
    constexpr std::uint64_t kStretchBytes = 2 << 20;
    const std::uint64_t stretch_blocks = std::max<std::uint64_t>(1, kStretchBytes / bs);
    const unsigned threads = detail::resolve_threads(threads_wanted);

    auto make_worker = [&]() -> Result<BlockHasher> {
        auto hasher = Hasher::create(algorithm);
        if (!hasher)
            return std::move(hasher).error();
        return BlockHasher(image, bs, access, std::move(*hasher), *full_zero, *tail_zero);
    };
    using Workers = detail::OrderedWorkers<Stretch>;
    std::optional<Workers> workers;
    if (threads > 1) {
        workers.emplace(threads, 4 * static_cast<std::size_t>(threads),
                        [&]() -> Result<Workers::Work> {
                            auto worker = make_worker();
                            if (!worker)
                                return std::move(worker).error();
                            auto hasher = std::make_shared<BlockHasher>(std::move(*worker));
                            return Workers::Work([hasher](Stretch& stretch) -> Result<void> {
                                return hasher->run(stretch.first, stretch.count, stretch.digests);
                            });
                        });
        if (workers->started() == 0)
            workers.reset();
    }
    std::optional<BlockHasher> inline_worker;
    Stretch inline_stretch;

    std::uint64_t delivered = 0; // blocks handed to the sinks
    auto deliver = [&](const Stretch& stretch) -> Result<void> {
        if (stretch.first > delivered) {
            if (auto ok = zero_blocks(delivered, stretch.first - delivered); !ok)
                return ok;
        }
        delivered = stretch.first + stretch.count;
        return stretches(stretch.digests);
    };
    auto take_front = [&]() -> Result<void> {
        auto front = workers->front();
        if (!front)
            return std::move(front).error(); // the ring's destructor stops and joins the workers
        auto ok = deliver(**front);
        workers->release();
        return ok;
    };
    auto submit = [&](std::uint64_t first, std::uint64_t end) -> Result<void> {
        if (!workers) {
            if (!inline_worker) {
                auto worker = make_worker();
                if (!worker)
                    return std::move(worker).error();
                inline_worker.emplace(std::move(*worker));
            }
            inline_stretch.first = first;
            inline_stretch.count = end - first;
            if (auto ok = inline_worker->run(first, end - first, inline_stretch.digests); !ok)
                return ok;
            return deliver(inline_stretch);
        }
        if (workers->full()) {
            if (auto ok = take_front(); !ok)
                return ok;
        }
        Stretch& slot = workers->next_slot();
        slot.first = first;
        slot.count = end - first;
        workers->submit();
        return {};
    };

    bool open = false;
    std::uint64_t open_first = 0, open_end = 0, open_data = 0;
    auto extents = image.extents(0, size);
    for (const Extent& e : extents) {
        if (e.kind == ExtentKind::zero)
            continue;
        // Blocks before open_end are in a stretch already, open or handed out (it stays the
        // end of the last one): a run that starts inside the last of them (clusters smaller
        // than a block, compressed clusters) adds only the blocks beyond it.
        const std::uint64_t b1 = (e.offset + e.length) / bs + ((e.offset + e.length) % bs != 0);
        std::uint64_t b0 = std::max(e.offset / bs, open_end);
        if (b0 >= b1)
            continue;
        if (open && b0 - open_end > stretch_blocks) {
            if (auto ok = submit(open_first, open_end); !ok)
                return ok;
            open = false;
        }
        while (b0 < b1) {
            if (!open) {
                open = true;
                open_first = b0;
                open_data = 0;
            }
            const std::uint64_t n = std::min(b1 - b0, stretch_blocks - open_data);
            b0 += n;
            open_end = b0;
            open_data += n;
            if (open_data >= stretch_blocks) {
                if (auto ok = submit(open_first, open_end); !ok)
                    return ok;
                open = false;
            }
        }
    }
    // Stretches before a damaged table come first: errors are reported in disk order.
    if (open) {
        if (auto ok = submit(open_first, open_end); !ok)
            return ok;
    }
    while (workers && !workers->empty()) {
        if (auto ok = take_front(); !ok)
            return ok;
    }
    if (extents.error())
        return *extents.error();
    if (delivered < blocks)
        return zero_blocks(delivered, blocks - delivered);
    return {};
}

} // namespace

static Result<void> hash_blocks_in_boundary(const Image& image, const BlockHashOptions& options,
                                            const BlockDigestSink& sink) {
    const std::uint64_t bs = options.block_size;
    if (bs < kMinHashBlockSize || (bs & (bs - 1)) != 0) {
        return Error{ErrorCode::invalid_argument,
                     fmt::format("block size {} is not a power of two of at least {}", bs,
                                 kMinHashBlockSize)};
    }
    if (is_blkhash(options.algorithm)) {
        return Error{ErrorCode::invalid_argument,
                     fmt::format("{} digests the whole disk: a block manifest takes {}",
                                 to_string(options.algorithm),
                                 to_string(block_digest_algorithm(options.algorithm)))};
    }
    const std::uint64_t size = image.size();
    if (size == 0)
        return {};
    auto full_zero = zero_digest(options.algorithm, bs);
    if (!full_zero)
        return std::move(full_zero).error();
    auto tail_zero = zero_digest(options.algorithm, size % bs == 0 ? bs : size % bs);
    if (!tail_zero)
        return std::move(tail_zero).error();
    return digest_blocks(
        image, options.algorithm, bs, options.threads, options.data_access,
        [&](std::uint64_t first, std::uint64_t count) -> Result<void> {
            BlockDigest block;
            block.zero = true;
            for (std::uint64_t i = first; i < first + count; ++i) {
                block.index = i;
                block.offset = i * bs;
                block.length = std::min(bs, size - block.offset);
                block.digest = block.length == bs ? *full_zero : *tail_zero;
                if (auto ok = sink(block); !ok)
                    return ok;
            }
            return {};
        },
        [&](std::span<const BlockDigest> digests) -> Result<void> {
            for (const BlockDigest& d : digests) {
                if (auto ok = sink(d); !ok)
                    return ok;
            }
            return {};
        });
}

Result<void> hash_blocks(const Image& image, const BlockHashOptions& options,
                         const BlockDigestSink& sink) {
    return detail::contain_faults(image.path(), [&]() -> Result<void> {
        return hash_blocks_in_boundary(image, options, sink);
    });
}

namespace detail {

BlockDigestFeed::BlockDigestFeed(Hasher outer, const Digest& zero_block)
    : outer_(std::move(outer)), zero_block_(zero_block) {
    // 64 KiB of the digest repeated: one update call per 2048 zero blocks (sha256).
    const std::size_t copies = 65536 / zero_block_.size;
    repeated_zero_.reserve(copies * zero_block_.size);
    for (std::size_t i = 0; i < copies; ++i) {
        auto bytes = as_bytes(zero_block_);
        repeated_zero_.insert(repeated_zero_.end(), bytes.begin(), bytes.end());
    }
}

Result<BlockDigestFeed> BlockDigestFeed::create(HashAlgorithm block_algorithm) {
    auto outer = Hasher::create(block_algorithm);
    if (!outer)
        return std::move(outer).error();
    auto zero = zero_digest(block_algorithm, kBlkhashBlockSize);
    if (!zero)
        return std::move(zero).error();
    return BlockDigestFeed(std::move(*outer), *zero);
}

void BlockDigestFeed::add_zero_blocks(std::uint64_t count) {
    const std::uint64_t per_buffer = repeated_zero_.size() / zero_block_.size;
    while (count > 0) {
        const std::uint64_t n = std::min(count, per_buffer);
        outer_.update(std::span<const std::byte>(repeated_zero_)
                          .first(static_cast<std::size_t>(n * zero_block_.size)));
        count -= n;
    }
}

Result<Digest> BlockDigestFeed::finish(std::uint64_t disk_size) {
    std::byte size_le[8];
    for (int i = 0; i < 8; ++i)
        size_le[i] = static_cast<std::byte>(disk_size >> (8 * i));
    outer_.update(size_le);
    return outer_.finish();
}

} // namespace detail

namespace {

/// hash_image for the blkhash algorithms: the block engine's digests (64 KiB blocks) fed to
/// the outer digest in order; runs of zero blocks as their precomputed digest, many at once.
Result<Digest> blkhash_image(const Image& image, const HashOptions& options) {
    const HashAlgorithm block_algorithm = block_digest_algorithm(options.algorithm);
    auto feed = detail::BlockDigestFeed::create(block_algorithm);
    if (!feed)
        return std::move(feed).error();
    const std::uint64_t size = image.size();
    constexpr std::uint64_t bs = kBlkhashBlockSize;
    const std::uint64_t blocks = size / bs + (size % bs != 0);
    std::optional<Digest> tail_zero; // the short last block's, when it reads as zeros
    if (options.progress)
        options.progress(0, size);
    auto report = [&](std::uint64_t blocks_done) {
        if (options.progress)
            options.progress(std::min(size, blocks_done * bs), size);
    };
    auto ok = digest_blocks(
        image, block_algorithm, bs, options.threads, options.data_access,
        [&](std::uint64_t first, std::uint64_t count) -> Result<void> {
            const bool short_tail = size % bs != 0 && first + count == blocks;
            feed->add_zero_blocks(short_tail ? count - 1 : count);
            if (short_tail) {
                if (!tail_zero) {
                    auto digest = zero_digest(block_algorithm, size % bs);
                    if (!digest)
                        return std::move(digest).error();
                    tail_zero = *digest;
                }
                feed->add(*tail_zero);
            }
            report(first + count);
            return {};
        },
        [&](std::span<const BlockDigest> digests) -> Result<void> {
            for (const BlockDigest& d : digests)
                feed->add(d.digest);
            if (!digests.empty())
                report(digests.back().index + 1);
            return {};
        });
    if (!ok)
        return std::move(ok).error();
    return feed->finish(size);
}

} // namespace

} // namespace qcowmap

// Digests of the virtual disk. Data reaches the hash straight from the mapping, made present
// and touched ahead by the visit's workers and dropped behind (Prefetch::touch), or read into a
// small buffer (HashOptions::data_access), or from the decompressor's buffer; zero runs from one
// static zero block. Block manifests are hashed by workers that each walk their own slice of the
// disk, and handed out in order.
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
    switch (algorithm) {
    case HashAlgorithm::sha256:
        return "SHA256";
    case HashAlgorithm::sha512:
        return "SHA512";
    case HashAlgorithm::blake2b512:
        return "BLAKE2B-512";
    case HashAlgorithm::xxh3_128:
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
    }
    return "unknown";
}

std::optional<HashAlgorithm> parse_hash_algorithm(std::string_view name) {
    for (HashAlgorithm a : {HashAlgorithm::sha256, HashAlgorithm::sha512, HashAlgorithm::blake2b512,
                            HashAlgorithm::xxh3_128}) {
        if (to_string(a) == name)
            return a;
    }
    return std::nullopt;
}

std::size_t digest_size(HashAlgorithm algorithm) {
    switch (algorithm) {
    case HashAlgorithm::sha256:
        return 32;
    case HashAlgorithm::sha512:
        return 64;
    case HashAlgorithm::blake2b512:
        return 64;
    case HashAlgorithm::xxh3_128:
        return 16;
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

struct Hasher::Impl {
    HashAlgorithm algorithm;
    EVP_MD* md = nullptr; // fetched once: an implicit fetch per init costs more than a 4k block
    EVP_MD_CTX* ctx = nullptr;
    XXH3_state_t* xxh = nullptr;
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
    if (algorithm == HashAlgorithm::xxh3_128) {
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
    if (impl_->xxh) {
        impl_->failed |= XXH3_128bits_update(impl_->xxh, bytes.data(), bytes.size()) != XXH_OK;
    } else {
        impl_->failed |= libcrypto().update(impl_->ctx, bytes.data(), bytes.size()) != 1;
    }
}

void Hasher::update_zeros(std::uint64_t length) {
    while (length > 0) {
        std::size_t n =
            static_cast<std::size_t>(std::min<std::uint64_t>(length, sizeof kZeroBlock));
        update({kZeroBlock, n});
        length -= n;
    }
}

Result<Digest> Hasher::finish() {
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

/// Zeros hashed between two progress reports: ~35 ms of sha256 at 1.8 GB/s.
constexpr std::uint64_t kZeroSliceBytes = 64u << 20;

static Result<Digest> hash_image_in_boundary(const Image& image, const HashOptions& options) {
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

/// Hashes the blocks of `[first_block, first_block + count)` into `out`, walking that slice of
/// the disk with its own iterator. A block only ever touched by zero runs is not hashed.
class BlockHasher {
  public:
    BlockHasher(const Image& image, const BlockHashOptions& options, Hasher hasher,
                const Digest& full_zero, const Digest& tail_zero)
        : image_(image), options_(options), hasher_(std::move(hasher)), full_zero_(full_zero),
          tail_zero_(tail_zero) {}

    Result<void> run(std::uint64_t first_block, std::uint64_t count,
                     std::vector<BlockDigest>& out) {
        out.clear();
        const std::uint64_t bs = options_.block_size;
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
                        if (!has_data_) {
                            has_data_ = true;
                            hasher_.update_zeros(pending_zeros_);
                        }
                        hasher_.update(bytes.first(static_cast<std::size_t>(n)));
                        bytes = bytes.subspan(static_cast<std::size_t>(n));
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
            // One thread per chunk (the workers are the parallelism): mapped pages are dropped
            // once hashed, which keeps the resident set small.
            VisitOptions{1, detail::resolve(options_.data_access), Prefetch::touch});
        return ok;
    }

  private:
    void begin_block(std::uint64_t index, std::uint64_t length) {
        current_ = BlockDigest{};
        current_.index = index;
        current_.offset = index * options_.block_size;
        current_.length = length;
        has_data_ = false;
        pending_zeros_ = 0;
    }

    Result<void> end_block(std::vector<BlockDigest>& out) {
        if (has_data_) {
            auto digest = hasher_.finish();
            if (!digest)
                return std::move(digest).error();
            current_.digest = *digest;
        } else {
            current_.zero = true;
            current_.digest = current_.length == options_.block_size ? full_zero_ : tail_zero_;
        }
        out.push_back(current_);
        return {};
    }

    const Image& image_;
    const BlockHashOptions& options_;
    Hasher hasher_;
    const Digest& full_zero_;
    const Digest& tail_zero_;
    BlockDigest current_;
    bool has_data_ = false;
    std::uint64_t pending_zeros_ = 0;
};

// Blocks per unit of work: about 4 MiB of disk, so a worker's iterator and decompressor are
// set up rarely, and the in-order window stays a few MiB of digests at most.
std::uint64_t blocks_per_chunk(std::uint64_t block_size) {
    return std::max<std::uint64_t>(1, (std::uint64_t{4} << 20) / block_size);
}

/// One unit of hash_blocks' work: the blocks of about 4 MiB of disk, hashed by one worker.
struct Chunk {
    std::uint64_t number = 0;
    std::vector<BlockDigest> digests;
};

} // namespace

static Result<void> hash_blocks_in_boundary(const Image& image, const BlockHashOptions& options,
                                            const BlockDigestSink& sink) {
    const std::uint64_t bs = options.block_size;
    if (bs < kMinHashBlockSize || (bs & (bs - 1)) != 0) {
        return Error{ErrorCode::invalid_argument,
                     fmt::format("block size {} is not a power of two of at least {}", bs,
                                 kMinHashBlockSize)};
    }
    const std::uint64_t size = image.size();
    if (size == 0)
        return {};
    const std::uint64_t blocks = size / bs + (size % bs != 0);
    auto full_zero = zero_digest(options.algorithm, bs);
    if (!full_zero)
        return std::move(full_zero).error();
    auto tail_zero = zero_digest(options.algorithm, size % bs == 0 ? bs : size % bs);
    if (!tail_zero)
        return std::move(tail_zero).error();

    const std::uint64_t per_chunk = blocks_per_chunk(bs);
    const std::uint64_t chunks = blocks / per_chunk + (blocks % per_chunk != 0);
    unsigned threads = static_cast<unsigned>(
        std::min<std::uint64_t>(detail::resolve_threads(options.threads), chunks));

    auto make_worker = [&]() -> Result<BlockHasher> {
        auto hasher = Hasher::create(options.algorithm);
        if (!hasher)
            return std::move(hasher).error();
        return BlockHasher(image, options, std::move(*hasher), *full_zero, *tail_zero);
    };

    if (threads <= 1) {
        auto worker = make_worker();
        if (!worker)
            return std::move(worker).error();
        std::vector<BlockDigest> digests;
        for (std::uint64_t c = 0; c < chunks; ++c) {
            auto ok = worker->run(c * per_chunk, per_chunk, digests);
            if (!ok)
                return ok;
            for (const BlockDigest& d : digests) {
                if (auto sunk = sink(d); !sunk)
                    return sunk;
            }
        }
        return {};
    }

    // Chunks go to the workers in order through the ordered job ring, and come back to the
    // sink in the same order; at most 4 per thread are in flight.
    detail::OrderedWorkers<Chunk> workers(
        threads, 4 * static_cast<std::size_t>(threads),
        [&]() -> Result<detail::OrderedWorkers<Chunk>::Work> {
            auto worker = make_worker();
            if (!worker)
                return std::move(worker).error();
            auto hasher = std::make_shared<BlockHasher>(std::move(*worker));
            return detail::OrderedWorkers<Chunk>::Work(
                [hasher, per_chunk](Chunk& chunk) -> Result<void> {
                    return hasher->run(chunk.number * per_chunk, per_chunk, chunk.digests);
                });
        });
    if (workers.started() == 0) {
        return Error{ErrorCode::io_error, "cannot start a hashing thread"};
    }
    std::uint64_t submitted = 0;
    for (std::uint64_t emitted = 0; emitted < chunks; ++emitted) {
        while (submitted < chunks && !workers.full()) {
            workers.next_slot().number = submitted++;
            workers.submit();
        }
        auto chunk = workers.front();
        if (!chunk)
            return std::move(chunk).error(); // the ring's destructor stops and joins the workers
        for (const BlockDigest& d : (*chunk)->digests) {
            if (auto sunk = sink(d); !sunk)
                return sunk;
        }
        workers.release();
    }
    return {};
}

Result<void> hash_blocks(const Image& image, const BlockHashOptions& options,
                         const BlockDigestSink& sink) {
    return detail::contain_faults(image.path(), [&]() -> Result<void> {
        return hash_blocks_in_boundary(image, options, sink);
    });
}

} // namespace qcowmap

// Pieces of the blkhash construction (hash.hpp, HashAlgorithm) shared by hash_image's block
// engine, the streaming Hasher and the digest tap of the writers (digest_tap.hpp).
#pragma once

#include <qcowmap/hash.hpp>
#include <qcowmap/result.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

namespace qcowmap::detail {

/// True when every byte is zero. Data that is not zero almost always differs in its first
/// bytes, so the check stops there; a block of zeros costs a memcmp, a small fraction of a
/// digest of it.
inline bool all_zero(std::span<const std::byte> bytes) {
    const std::size_t head = std::min<std::size_t>(bytes.size(), 16);
    for (std::size_t i = 0; i < head; ++i)
        if (bytes[i] != std::byte{0})
            return false;
    return bytes.size() <= head ||
           std::memcmp(bytes.data(), bytes.data() + 1, bytes.size() - 1) == 0;
}

/// The outer digest of the blkhash construction: takes block digests in disk order, then the
/// disk size (blkhash's lib/blkhash.c: `outer_digest`, `hash_message_length`).
class BlockDigestFeed {
  public:
    /// `block_algorithm`: the digest of blocks and of the outer stream (sha256 for
    /// blkhash-sha256). Computes the digest of a whole block of zeros once.
    static Result<BlockDigestFeed> create(HashAlgorithm block_algorithm);

    /// The digest of kBlkhashBlockSize zero bytes.
    const Digest& zero_block() const { return zero_block_; }

    /// Adds the digest of the next block.
    void add(const Digest& block) { outer_.update(as_bytes(block)); }

    /// Adds `count` whole blocks of zeros: their digest fed from a buffer holding it many times
    /// over, so that a 1 TiB hole costs the outer digest of 16 Mi digests and nothing else.
    void add_zero_blocks(std::uint64_t count);

    /// Adds le64(`disk_size`) and returns the digest; starts afresh.
    Result<Digest> finish(std::uint64_t disk_size);

  private:
    BlockDigestFeed(Hasher outer, const Digest& zero_block);
    static std::span<const std::byte> as_bytes(const Digest& digest) {
        return std::as_bytes(digest.view());
    }

    Hasher outer_;
    Digest zero_block_;
    std::vector<std::byte> repeated_zero_; // zero_block_ over and over
};

} // namespace qcowmap::detail

// The digest of a disk taken from the bytes a writer already has in hand (ExportOptions::digest,
// WriteOptions::digest): the copy and its checksum cost one read of the source.
#pragma once

#include <qcowmap/extent.hpp>
#include <qcowmap/hash.hpp>
#include <qcowmap/options.hpp>
#include <qcowmap/result.hpp>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>

namespace qcowmap::detail {

/// Digests a disk of `disk_size` bytes fed in disk order, as hash_image would give it for the
/// same contents. Whole-disk algorithms are fed to one worker thread in order (off the
/// writer's thread); blkhash algorithms cut the disk into blocks that `threads` workers hash
/// out of order while the outer digest takes them in order. Whole blocks of zeros cost only
/// their precomputed digest. Memory: a few 1 MiB job buffers per worker.
class DigestTap {
  public:
    /// `access`: how the workers take stable bytes that lie in a file (see `data`): from the
    /// mapping, or read with pread (where touching mapped pages costs more, as
    /// automatic_data_access() measures). Errors: io_error when libcrypto cannot provide the
    /// algorithm.
    static Result<DigestTap> create(HashAlgorithm algorithm, std::uint64_t disk_size,
                                    unsigned threads, DataAccess access = DataAccess::automatic);
    ~DigestTap();
    DigestTap(DigestTap&&) noexcept;
    DigestTap& operator=(DigestTap&&) noexcept;

    /// The disk's bytes at `offset`, which must be at or past the end of what was fed so far
    /// (the range in between reads as zeros). Bytes past the disk size are ignored (a
    /// writer's last cluster). `stable`: the bytes stay valid and unchanged while the Image
    /// that produced them lives (its file mapping), so they are hashed in place later (or, when
    /// `file` says where they lie and the access is DataAccess::read, read from there by the
    /// workers); other bytes are copied before this returns. Errors: invalid_argument for an
    /// offset before the end of what was fed; a worker's digest or read failure.
    Result<void> data(std::uint64_t offset, std::span<const std::byte> bytes, bool stable,
                      std::optional<FilePosition> file = std::nullopt);

    /// Zeros up to the disk size, then the digest. Errors: as `data`.
    Result<Digest> finish();

  private:
    struct Impl;
    explicit DigestTap(std::unique_ptr<Impl> impl);
    std::unique_ptr<Impl> impl_;
};

} // namespace qcowmap::detail

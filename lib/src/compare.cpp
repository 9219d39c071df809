// Two disks compared the way qemu-img compare does (qemu-img.c, img_compare): walk both
// allocation maps together; ranges zero on both sides need no reading; data is compared in
// pieces read with pread (or straight from the mappings); a mismatch is reported at the start
// of the first differing 512-byte sector (compare_buffers / find_nonzero work sector by sector).
#include "image_state.hpp"
#include "workers.hpp"

#include <qcowmap/compare.hpp>

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

namespace qcowmap {
namespace {

constexpr std::uint64_t kSector = 512; // BDRV_SECTOR_SIZE

// Bytes read per side and step when data is read: large enough that handing the second side's
// read to the helper thread costs little per byte, small enough to stay in the cache for memcmp.
constexpr std::uint64_t kCompareReadPiece = 1024 * 1024;

alignas(4096) const std::byte kZeros[64 * 1024] = {};

/// Index of the first non-zero byte of `bytes`, or nullopt.
std::optional<std::size_t> first_nonzero(std::span<const std::byte> bytes) {
    std::size_t done = 0;
    while (done < bytes.size()) {
        std::size_t n = std::min(bytes.size() - done, sizeof kZeros);
        if (std::memcmp(bytes.data() + done, kZeros, n) != 0) {
            for (std::size_t i = 0; i < n; ++i) {
                if (bytes[done + i] != std::byte{0})
                    return done + i;
            }
        }
        done += n;
    }
    return std::nullopt;
}

/// Index of the first byte where `a` and `b` (same size) differ, or nullopt.
std::optional<std::size_t> first_difference(std::span<const std::byte> a,
                                            std::span<const std::byte> b) {
    constexpr std::size_t kPiece = 64 * 1024;
    for (std::size_t done = 0; done < a.size(); done += kPiece) {
        std::size_t n = std::min(a.size() - done, kPiece);
        if (std::memcmp(a.data() + done, b.data() + done, n) != 0) {
            for (std::size_t i = 0; i < n; ++i) {
                if (a[done + i] != b[done + i])
                    return done + i;
            }
        }
    }
    return std::nullopt;
}

/// One side of the walk: the current extent and, for a compressed one, its bytes.
class Side {
  public:
    Side(const Image& image, int index, DataAccess access)
        : image_(image), extents_(image.extents()), index_(index), access_(access) {}
    Side(const Side&) = delete; // `cursor_` points into `extents_`
    Side& operator=(const Side&) = delete;

    /// Makes the current extent the one containing `pos`. False at the end or on error.
    bool seek(std::uint64_t pos) {
        while (!have_ || extent_.offset + extent_.length <= pos) {
            if (!started_) {
                started_ = true;
                cursor_ = extents_.begin();
            } else if (cursor_ != std::default_sentinel) {
                ++cursor_;
            }
            if (cursor_ == std::default_sentinel) {
                have_ = false;
                return false;
            }
            extent_ = *cursor_;
            have_ = true;
            decompressed_ = {};
            decompressed_ok_ = false;
        }
        return true;
    }

    const Extent& extent() const { return extent_; }
    std::uint64_t end() const { return extent_.offset + extent_.length; }
    bool zero() const { return extent_.kind == ExtentKind::zero; }
    bool failed() const { return extents_.error().has_value(); }
    const Error& error() const { return *extents_.error(); }
    int index() const { return index_; }

    /// qemu's block-status flags for the current extent (DATA, ZERO, OFFSET_VALID, ALLOCATED,
    /// EOF), as far as they depend on the map; `strict` mode compares them.
    unsigned status() const {
        unsigned s = 0;
        if (extent_.kind == ExtentKind::zero)
            s |= 1u << 1;
        else
            s |= 1u << 0;
        if (extent_.host_offset)
            s |= 1u << 2;
        if (extent_.present)
            s |= 1u << 4;
        if (end() == image_.size())
            s |= 1u << 5;
        return s;
    }

    /// The bytes of `[pos, pos + length)`, inside the current non-zero extent.
    Result<std::span<const std::byte>> bytes(std::uint64_t pos, std::uint64_t length) {
        const std::uint64_t skip = pos - extent_.offset;
        if (extent_.kind == ExtentKind::data) {
            auto mapped = extent_.bytes.subspan(static_cast<std::size_t>(skip),
                                                static_cast<std::size_t>(length));
            if (access_ == DataAccess::read && extent_.file) {
                return read(FilePosition{extent_.file->fd, extent_.file->offset + skip}, length);
            }
            return mapped;
        }
        if (!decompressed_ok_) {
            auto produced = decompressor_.decompress(image_, extent_);
            if (!produced)
                return std::move(produced).error();
            decompressed_ = *produced;
            decompressed_ok_ = true;
        }
        return decompressed_.subspan(static_cast<std::size_t>(skip),
                                     static_cast<std::size_t>(length));
    }

    /// The file and file offset of `pos` in a data extent, to recognise the same bytes.
    std::optional<std::pair<std::pair<std::uint64_t, std::uint64_t>, std::uint64_t>>
    host_identity(std::uint64_t pos) const {
        if (extent_.kind != ExtentKind::data || !extent_.host_offset)
            return std::nullopt;
        const detail::ImageState* layer = detail::layer_at(detail_state(image_), extent_.depth);
        if (!layer)
            return std::nullopt;
        const auto& file = layer->data_file ? layer->data_file : layer->file;
        if (!file)
            return std::nullopt;
        return std::pair{file->identity(), *extent_.host_offset + (pos - extent_.offset)};
    }

    /// True when data bytes are read into a buffer, at most kCompareReadPiece at a time.
    bool reads() const { return access_ == DataAccess::read && extent_.kind == ExtentKind::data; }
    /// True when getting the bytes costs work worth doing on another thread: a read, or a
    /// compressed cluster not decompressed yet.
    bool produces() const {
        return reads() || (extent_.kind == ExtentKind::compressed && !decompressed_ok_);
    }

  private:
    Result<std::span<const std::byte>> read(const FilePosition& from, std::uint64_t length) {
        buffer_.resize(kCompareReadPiece);
        auto out = std::span<std::byte>(buffer_).first(static_cast<std::size_t>(length));
        if (auto ok = detail::read_exactly(from, out); !ok)
            return std::move(ok).error();
        return std::span<const std::byte>(out);
    }

    const Image& image_;
    ExtentRange extents_;
    ExtentRange::iterator cursor_;
    bool started_ = false;
    int index_;
    DataAccess access_;
    std::vector<std::byte> buffer_;
    Extent extent_;
    bool have_ = false;
    Decompressor decompressor_;
    std::span<const std::byte> decompressed_;
    bool decompressed_ok_ = false;
};

CompareResult mismatch(std::uint64_t offset, bool size_warning = false) {
    CompareResult r;
    r.outcome = CompareResult::Outcome::content_mismatch;
    r.offset = offset / kSector * kSector;
    r.size_warning = size_warning;
    return r;
}

Error walk_error(Side& side, CompareError* detail) {
    Error e = side.failed() ? side.error()
                            : Error{ErrorCode::invalid_table, "allocation map ended early"};
    if (detail)
        *detail = CompareError{e, side.index(), false};
    return e;
}

Error read_error(Side& side, Error e, CompareError* detail) {
    if (detail)
        *detail = CompareError{e, side.index(), true};
    return e;
}

/// The second side's bytes, produced on the helper thread while this one produces the first.
struct SecondSide {
    Side* side = nullptr;
    std::uint64_t pos = 0;
    std::uint64_t length = 0;
    Result<std::span<const std::byte>> bytes = std::span<const std::byte>{};
};

/// One helper thread (started on first use: comparisons that never produce both sides pay
/// nothing) reading or decompressing the second side while this thread does the first.
class SecondReader {
  public:
    /// `bytes_b` = b.bytes(pos, length) on the helper thread, `bytes_a` = a.bytes(...) here.
    void run_both(Side& a, Side& b, std::uint64_t pos, std::uint64_t length,
                  Result<std::span<const std::byte>>& bytes_a,
                  Result<std::span<const std::byte>>& bytes_b) {
        if (!workers_ && !failed_) {
            workers_.emplace(1, 1, []() -> Result<detail::OrderedWorkers<SecondSide>::Work> {
                return detail::OrderedWorkers<SecondSide>::Work(
                    [](SecondSide& job) -> Result<void> {
                        job.bytes = job.side->bytes(job.pos, job.length);
                        return {};
                    });
            });
            failed_ = workers_->started() == 0;
        }
        if (failed_) {
            bytes_a = a.bytes(pos, length);
            bytes_b = b.bytes(pos, length);
            return;
        }
        workers_->next_slot() = SecondSide{&b, pos, length};
        workers_->submit();
        bytes_a = a.bytes(pos, length); // if this throws, the ring's destructor joins first
        auto job = workers_->front();
        bytes_b = job ? std::move((*job)->bytes) : Result<std::span<const std::byte>>(job.error());
        workers_->release();
    }

  private:
    std::optional<detail::OrderedWorkers<SecondSide>> workers_;
    bool failed_ = false;
};

} // namespace

Result<CompareResult> compare_images(const Image& a, const Image& b, const CompareOptions& options,
                                     CompareError* error_detail) {
    const std::uint64_t size_a = a.size();
    const std::uint64_t size_b = b.size();
    if (options.strict && size_a != size_b) {
        CompareResult r;
        r.outcome = CompareResult::Outcome::size_mismatch;
        return r;
    }
    Side sa(a, 0, options.data_access);
    Side sb(b, 1, options.data_access);
    SecondReader second_reader;
    const std::uint64_t common = std::min(size_a, size_b);
    const std::uint64_t larger = std::max(size_a, size_b);
    auto progress = [&](std::uint64_t done) {
        if (options.progress)
            options.progress(done, larger);
    };
    std::uint64_t pos = 0;
    while (pos < common) {
        progress(pos);
        if (!sa.seek(pos))
            return walk_error(sa, error_detail);
        if (!sb.seek(pos))
            return walk_error(sb, error_detail);
        std::uint64_t end = std::min({sa.end(), sb.end(), common});
        if (options.strict && sa.status() != sb.status()) {
            CompareResult r;
            r.outcome = CompareResult::Outcome::status_mismatch;
            r.offset = pos;
            return r;
        }
        if (sa.zero() && sb.zero()) {
            pos = end;
            continue;
        }
        auto ida = sa.host_identity(pos);
        if (ida && ida == sb.host_identity(pos)) {
            pos = end; // the same bytes of the same file
            continue;
        }
        if (sa.reads() || sb.reads()) {
            end = std::min(end, pos + kCompareReadPiece); // one buffer's worth at a time
        }
        const std::uint64_t length = end - pos;
        std::optional<std::size_t> diff;
        if (sa.zero() || sb.zero()) {
            Side& data = sa.zero() ? sb : sa;
            auto bytes = data.bytes(pos, length);
            if (!bytes)
                return read_error(data, std::move(bytes).error(), error_detail);
            diff = first_nonzero(*bytes);
        } else {
            Result<std::span<const std::byte>> bytes_a = std::span<const std::byte>{};
            Result<std::span<const std::byte>> bytes_b = std::span<const std::byte>{};
            // Short reads are cheaper than the hand-over (the fragmented benchmark image:
            // 64 KiB runs were 30% slower with it); decompression always pays.
            const bool worth_sharing =
                (sa.reads() && sb.reads()) ? length >= kReadPieceBytes : true;
            if (sa.produces() && sb.produces() && worth_sharing) {
                // Both sides read or decompress: one on the helper thread, one here.
                second_reader.run_both(sa, sb, pos, length, bytes_a, bytes_b);
            } else {
                bytes_a = sa.bytes(pos, length);
                if (bytes_a)
                    bytes_b = sb.bytes(pos, length);
            }
            if (!bytes_a)
                return read_error(sa, std::move(bytes_a).error(), error_detail);
            if (!bytes_b)
                return read_error(sb, std::move(bytes_b).error(), error_detail);
            diff = first_difference(*bytes_a, *bytes_b);
        }
        if (diff)
            return mismatch(pos + *diff);
        pos = end;
    }
    if (size_a == size_b) {
        progress(larger);
        return CompareResult{};
    }
    // The longer disk's tail must read as zeros.
    Side& longer = size_a > size_b ? sa : sb;
    const std::uint64_t total = std::max(size_a, size_b);
    while (pos < total) {
        progress(pos);
        if (!longer.seek(pos))
            return walk_error(longer, error_detail);
        std::uint64_t end = longer.end();
        if (longer.reads())
            end = std::min(end, pos + kCompareReadPiece);
        if (!longer.zero()) {
            auto bytes = longer.bytes(pos, end - pos);
            if (!bytes)
                return read_error(longer, std::move(bytes).error(), error_detail);
            if (auto nz = first_nonzero(*bytes))
                return mismatch(pos + *nz, true);
        }
        pos = end;
    }
    progress(larger);
    CompareResult r;
    r.size_warning = true;
    return r;
}

} // namespace qcowmap

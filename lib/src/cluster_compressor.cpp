#include "cluster_compressor.hpp"

#include <algorithm>
#include <cstring>
#include <vector>
#include <zlib.h>
#include <zstd.h>

#if QCOWMAP_HAVE_ISAL
#include <isa-l/igzip_lib.h>
#endif

namespace qcowmap::detail {

struct ClusterCompressor::Impl {
    CompressionType type;
    // zlib: qemu's parameters (qcow2_compress in block/qcow2-threads.c): default level, raw
    // deflate (negative window bits), a 4 KiB window (12), memLevel 9.
    z_stream zlib{};
    bool zlib_ready = false;
    ZSTD_CCtx* zstd = nullptr;
#if QCOWMAP_HAVE_ISAL
    std::vector<std::uint8_t> isal_level_buffer;
#endif

    explicit Impl(CompressionType t) : type(t) {
        if (type == CompressionType::zstd) {
            zstd = ZSTD_createCCtx();
            return;
        }
#if QCOWMAP_HAVE_ISAL
        isal_level_buffer.resize(
            std::max<std::size_t>(ISAL_DEF_LVL1_DEFAULT, ISAL_DEF_LVL3_DEFAULT));
#else
        zlib_ready = deflateInit2(&zlib, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9,
                                  Z_DEFAULT_STRATEGY) == Z_OK;
#endif
    }
    ~Impl() {
        if (zstd)
            ZSTD_freeCCtx(zstd);
        if (zlib_ready)
            deflateEnd(&zlib);
    }

    std::optional<std::size_t> deflate_cluster(std::span<const std::byte> in,
                                               std::span<std::byte> out) {
#if QCOWMAP_HAVE_ISAL
        // Level 1 is fast (its hash chains are short) but weak on highly repetitive data such
        // as text, where it stays several times larger than zlib's level 6 (4323 against 316
        // bytes for a 64 KiB cluster of repeated text); level 3 matches zlib
        // there at about a seventh of level 1's speed. So: level 1, and level 3 again for the
        // clusters level 1 left between 1/64 and 1/8 of their size, the smaller one kept.
        auto first = isal_deflate(in, out, 1);
        if (!first || *first <= in.size() / 64 || *first > in.size() / 8)
            return first;
        if (retry_.size() < out.size())
            retry_.resize(out.size());
        auto second = isal_deflate(in, std::span(retry_).first(out.size()), 3);
        if (second && *second < *first) {
            std::memcpy(out.data(), retry_.data(), *second);
            return second;
        }
        return first;
#else
        if (!zlib_ready || deflateReset(&zlib) != Z_OK)
            return std::nullopt;
        zlib.next_in = reinterpret_cast<Bytef*>(const_cast<std::byte*>(in.data()));
        zlib.avail_in = static_cast<uInt>(in.size());
        zlib.next_out = reinterpret_cast<Bytef*>(out.data());
        zlib.avail_out = static_cast<uInt>(out.size());
        if (deflate(&zlib, Z_FINISH) != Z_STREAM_END)
            return std::nullopt;
        return out.size() - zlib.avail_out;
#endif
    }

#if QCOWMAP_HAVE_ISAL
    std::vector<std::byte> retry_;

    std::optional<std::size_t> isal_deflate(std::span<const std::byte> in, std::span<std::byte> out,
                                            std::uint32_t level) {
        isal_zstream stream;
        isal_deflate_stateless_init(&stream);
        stream.level = level;
        stream.level_buf = isal_level_buffer.data();
        stream.level_buf_size = static_cast<std::uint32_t>(isal_level_buffer.size());
        stream.hist_bits = 12; // the 4 KiB window qemu's inflateInit2(-12) can follow
        stream.gzip_flag = IGZIP_DEFLATE;
        stream.end_of_stream = 1;
        stream.flush = NO_FLUSH;
        stream.next_in = reinterpret_cast<std::uint8_t*>(const_cast<std::byte*>(in.data()));
        stream.avail_in = static_cast<std::uint32_t>(in.size());
        stream.next_out = reinterpret_cast<std::uint8_t*>(out.data());
        stream.avail_out = static_cast<std::uint32_t>(out.size());
        if (isal_deflate_stateless(&stream) != COMP_OK || stream.avail_in != 0) {
            return std::nullopt; // STATELESS_OVERFLOW: it does not fit
        }
        return static_cast<std::size_t>(stream.total_out);
    }
#endif

    std::optional<std::size_t> zstd_cluster(std::span<const std::byte> in,
                                            std::span<std::byte> out) {
        if (!zstd)
            return std::nullopt;
        // One frame per cluster at the default level, as qemu's qcow2_zstd_compress writes.
        std::size_t n = ZSTD_compressCCtx(zstd, out.data(), out.size(), in.data(), in.size(),
                                          ZSTD_CLEVEL_DEFAULT);
        if (ZSTD_isError(n))
            return std::nullopt;
        return n;
    }
};

ClusterCompressor::ClusterCompressor(CompressionType type) : impl_(std::make_unique<Impl>(type)) {}
ClusterCompressor::~ClusterCompressor() = default;
ClusterCompressor::ClusterCompressor(ClusterCompressor&&) noexcept = default;
ClusterCompressor& ClusterCompressor::operator=(ClusterCompressor&&) noexcept = default;

std::optional<std::size_t> ClusterCompressor::compress(std::span<const std::byte> in,
                                                       std::span<std::byte> out) {
    return impl_->type == CompressionType::zstd ? impl_->zstd_cluster(in, out)
                                                : impl_->deflate_cluster(in, out);
}

const char* ClusterCompressor::deflate_engine() {
#if QCOWMAP_HAVE_ISAL
    return "isa-l";
#else
    return "zlib";
#endif
}

} // namespace qcowmap::detail

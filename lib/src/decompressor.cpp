// Compressed clusters (spec "Compressed Clusters Descriptor"; qemu block/qcow2-threads.c).
// zlib clusters are raw deflate streams; zstd clusters are zstd frames. Either way decoding
// must yield exactly one cluster: qemu accepts a stream whose input runs on past that point
// (the descriptor only knows the size to 512-byte precision) and so do we.
//
// Deflate streams are decoded whole-buffer by libdeflate when the build has it: each cluster is
// one call with the whole compressed stream and the whole cluster as output, no state kept
// between calls, several times faster than zlib's inflate on qemu-made clusters and byte-exact
// (README, "Benchmarks"). zlib stays as the fallback and as the judge: whenever
// libdeflate does not produce exactly one cluster (a corrupt stream, a stream that ends early,
// or one that goes on past the cluster, which qemu's inflate(Z_FINISH) accepts) the cluster is
// decoded again by zlib, so what is accepted and the error messages are zlib's, as before.
#include "fault.hpp"
#include "image_state.hpp"

#include <vector>
#include <zlib.h>
#include <zstd.h>

#if defined(QCOWMAP_HAVE_LIBDEFLATE) && QCOWMAP_HAVE_LIBDEFLATE
#include <libdeflate.h>
#define QCOWMAP_USE_LIBDEFLATE 1
#else
#define QCOWMAP_USE_LIBDEFLATE 0
#endif

namespace qcowmap {

struct Decompressor::Impl {
    std::vector<std::byte> cluster;
    // The image whose cluster is cached: a weak reference, so that a later image allocated at
    // the same address is never mistaken for it.
    std::weak_ptr<const detail::ImageState> cached_image;
    std::uint32_t cached_depth = 0;
    std::uint64_t cached_host_offset = 0;
    bool cached = false;
    z_stream zlib{};
    bool zlib_ready = false;
    ZSTD_DCtx* zstd = nullptr;
#if QCOWMAP_USE_LIBDEFLATE
    libdeflate_decompressor* deflate = nullptr;
    bool deflate_failed = false; // could not allocate one: zlib does everything
#endif

    ~Impl() {
        if (zlib_ready) {
            inflateEnd(&zlib);
        }
        ZSTD_freeDCtx(zstd);
#if QCOWMAP_USE_LIBDEFLATE
        libdeflate_free_decompressor(deflate);
#endif
    }

    // Fills `cluster` completely from `input`; returns an empty string on success.
    std::string inflate_cluster(std::span<const std::byte> input, std::span<std::byte> cluster) {
#if QCOWMAP_USE_LIBDEFLATE
        if (!deflate && !deflate_failed) {
            deflate = libdeflate_alloc_decompressor();
            deflate_failed = deflate == nullptr;
        }
        if (deflate) {
            // With both "actual" pointers libdeflate accepts input left over after the end of
            // the stream (qemu's sector count rounds up) and output shorter than the buffer.
            std::size_t in_used = 0;
            std::size_t produced = 0;
            const auto status = libdeflate_deflate_decompress_ex(
                deflate, input.data(), input.size(), cluster.data(), cluster.size(), &in_used,
                &produced);
            if (status == LIBDEFLATE_SUCCESS && produced == cluster.size()) {
                return {};
            }
            // Anything else: zlib judges (see the top of the file).
        }
#endif
        return inflate_with_zlib(input, cluster);
    }

    std::string inflate_with_zlib(std::span<const std::byte> input, std::span<std::byte> cluster) {
        if (!zlib_ready) {
            // Raw deflate (negative window bits): qcow2 stores no zlib header.
            if (inflateInit2(&zlib, -15) != Z_OK) {
                return "cannot initialise zlib";
            }
            zlib_ready = true;
        } else if (inflateReset(&zlib) != Z_OK) {
            return "cannot reset zlib";
        }
        zlib.next_in = reinterpret_cast<Bytef*>(const_cast<std::byte*>(input.data()));
        zlib.avail_in = static_cast<uInt>(input.size());
        zlib.next_out = reinterpret_cast<Bytef*>(cluster.data());
        zlib.avail_out = static_cast<uInt>(cluster.size());
        int ret = inflate(&zlib, Z_FINISH);
        if ((ret == Z_STREAM_END || ret == Z_BUF_ERROR) && zlib.avail_out == 0) {
            return {};
        }
        if (ret == Z_STREAM_END || ret == Z_BUF_ERROR) {
            return fmt::format("zlib stream ended after {} of {} bytes",
                               cluster.size() - zlib.avail_out, cluster.size());
        }
        return fmt::format("zlib error {}: {}", ret, zlib.msg ? zlib.msg : "corrupt stream");
    }

    std::string unzstd_cluster(std::span<const std::byte> input, std::span<std::byte> cluster) {
        if (!zstd) {
            zstd = ZSTD_createDCtx();
            if (!zstd) {
                return "cannot create a zstd context";
            }
        }
        ZSTD_DCtx_reset(zstd, ZSTD_reset_session_only);
        ZSTD_inBuffer in{input.data(), input.size(), 0};
        ZSTD_outBuffer out{cluster.data(), cluster.size(), 0};
        std::size_t ret = 0;
        while (out.pos < out.size) {
            std::size_t last_in = in.pos;
            std::size_t last_out = out.pos;
            ret = ZSTD_decompressStream(zstd, &out, &in);
            if (ZSTD_isError(ret)) {
                return fmt::format("zstd error: {}", ZSTD_getErrorName(ret));
            }
            if (in.pos <= last_in && out.pos <= last_out) {
                return fmt::format("zstd stream ended after {} of {} bytes", out.pos, out.size);
            }
        }
        // The frame must end with the cluster: more output means the stream is not ours.
        if (ret > 0) {
            return fmt::format("zstd frame holds more than one cluster ({} bytes)", out.size);
        }
        return {};
    }
};

Decompressor::Decompressor() : impl_(std::make_unique<Impl>()) {}
Decompressor::~Decompressor() = default;
Decompressor::Decompressor(Decompressor&&) noexcept = default;
Decompressor& Decompressor::operator=(Decompressor&&) noexcept = default;

Result<void> Decompressor::decompress_cluster(const Image& image, const Extent& extent,
                                              std::span<std::byte> cluster) {
    return detail::contain_faults(image.path(), [&]() -> Result<void> {
        // A page of the stream that cannot be read faults here, in our own code, rather than
        // inside the decoder (which only meets a fault if the file changes between the two).
        detail::touch_every_page(extent.bytes);
        return decompress_in_boundary(image, extent, cluster);
    });
}

Result<void> Decompressor::decompress_in_boundary(const Image& image, const Extent& extent,
                                                  std::span<std::byte> cluster) {
    const detail::ImageState* layer = detail::layer_at(*image.state_, extent.depth);
    if (!layer || layer->format != detail::LayerFormat::qcow2) {
        return Error{ErrorCode::invalid_argument, "extent does not come from a qcow2 layer"};
    }
    const detail::ImageState& state = *layer;
    if (extent.kind != ExtentKind::compressed ||
        extent.offset_in_cluster + extent.length > state.cluster_size ||
        cluster.size() != state.cluster_size) {
        return Error{ErrorCode::invalid_argument,
                     "not a compressed extent of this image, or the buffer is not one cluster"};
    }
    Impl& impl = *impl_;
    std::string problem = state.info.compression_type == CompressionType::zstd
                              ? impl.unzstd_cluster(extent.bytes, cluster)
                              : impl.inflate_cluster(extent.bytes, cluster);
    if (!problem.empty()) {
        std::uint64_t cluster_start = extent.offset - extent.offset_in_cluster;
        return Error{ErrorCode::compressed_data,
                     fmt::format("compressed cluster for virtual offset {:#x} at host offset "
                                 "{:#x} (+{:#x}): {}",
                                 cluster_start, extent.compressed_host_offset, extent.bytes.size(),
                                 problem)};
    }
    return {};
}

Result<void> Decompressor::decompress_stream(CompressionType type, std::span<const std::byte> input,
                                             std::span<std::byte> cluster) {
    std::string problem = type == CompressionType::zstd ? impl_->unzstd_cluster(input, cluster)
                                                        : impl_->inflate_cluster(input, cluster);
    if (!problem.empty()) {
        return Error{ErrorCode::compressed_data, std::move(problem)};
    }
    return {};
}

Result<std::span<const std::byte>> Decompressor::decompress(const Image& image,
                                                            const Extent& extent) {
    const detail::ImageState* layer = detail::layer_at(*image.state_, extent.depth);
    if (!layer) {
        return Error{ErrorCode::invalid_argument, "extent does not come from this image"};
    }
    const detail::ImageState& state = *layer;
    Impl& impl = *impl_;
    // read() may visit one cluster in several calls: keep the last cluster produced.
    const bool same_image = !impl.cached_image.expired() &&
                            !impl.cached_image.owner_before(image.state_) &&
                            !image.state_.owner_before(impl.cached_image);
    if (!(impl.cached && same_image && impl.cached_depth == extent.depth &&
          impl.cached_host_offset == extent.compressed_host_offset &&
          impl.cluster.size() == state.cluster_size)) {
        impl.cached = false;
        impl.cluster.resize(state.cluster_size);
        if (auto ok = decompress_cluster(image, extent, impl.cluster); !ok) {
            return std::move(ok).error();
        }
        impl.cached = true;
        impl.cached_image = image.state_;
        impl.cached_depth = extent.depth;
        impl.cached_host_offset = extent.compressed_host_offset;
    }
    return std::span<const std::byte>(impl.cluster)
        .subspan(extent.offset_in_cluster, extent.length);
}

} // namespace qcowmap

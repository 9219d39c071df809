// Legacy qcow version 1 (qemu block/qcow.c): a 48-byte header, an L1 table of plain offsets and
// L2 tables of (1 << l2_bits) entries; bit 63 of an L2 entry marks a zlib-compressed cluster
// whose size in bytes sits in the bits just below it.
#include "image_state.hpp"

namespace qcowmap::detail {
namespace {

Error header_error(std::string message) {
    return Error{ErrorCode::invalid_header, std::move(message)};
}

} // namespace

Result<void> parse_v1_image(ImageState& state) {
    ImageInfo& info = state.info;
    auto header = slice(state.bytes, 0, header_v1::kLength, "header", ErrorCode::invalid_header);
    if (!header) {
        return header_error(fmt::format(
            "file is truncated: {} bytes, shorter than the 48-byte qcow version 1 header",
            state.bytes.size()));
    }
    Bytes h = *header;
    const std::uint64_t backing_file_offset = load_be64(h, header_v1::kBackingFileOffset);
    const std::uint32_t backing_file_size = load_be32(h, header_v1::kBackingFileSize);
    info.mtime = load_be32(h, header_v1::kMtime);
    info.virtual_size = load_be64(h, header_v1::kSize);
    info.cluster_bits = load_u8(h, header_v1::kClusterBits);
    const unsigned l2_bits = load_u8(h, header_v1::kL2Bits);
    info.crypt_method = load_be32(h, header_v1::kCryptMethod);
    info.l1_table_offset = load_be64(h, header_v1::kL1TableOffset);
    info.header_length = header_v1::kLength;
    info.refcount_order = 0;

    if (info.virtual_size <= 1) {
        return header_error(
            fmt::format("virtual size {} is too small (at least 2 bytes)", info.virtual_size));
    }
    if (info.cluster_bits < 9 || info.cluster_bits > 16) {
        return header_error(
            fmt::format("cluster_bits {} is outside 9..16 (qcow version 1)", info.cluster_bits));
    }
    // l2_bits counts 8-byte entries: the table is 2^(l2_bits + 3) bytes, 512 B to 64 KiB.
    if (l2_bits < 6 || l2_bits > 13) {
        return header_error(fmt::format("l2_bits {} is outside 6..13 (qcow version 1)", l2_bits));
    }
    if (info.crypt_method > 1) {
        return header_error(fmt::format("crypt_method {} is unknown", info.crypt_method));
    }
    if (info.crypt_method != 0) {
        return Error{ErrorCode::encrypted,
                     "encrypted images are not supported (qcow version 1, crypt_method 1: AES)"};
    }
    info.cluster_size = std::uint64_t{1} << info.cluster_bits;
    state.cluster_bits = info.cluster_bits;
    state.cluster_size = info.cluster_size;
    state.l2_bits = l2_bits;
    state.l2_entry_bytes = 8;
    state.l2_table_bytes = std::uint64_t{8} << l2_bits;
    state.subcluster_bits = info.cluster_bits;
    // Compressed entries: size in bits (63 - cluster_bits)..62, offset below.
    state.compressed_layout = CompressedLayout::for_v1(info.cluster_bits);

    const unsigned shift = info.cluster_bits + l2_bits;
    const std::uint64_t l1_size = (info.virtual_size >> shift) +
                                  ((info.virtual_size & ((std::uint64_t{1} << shift) - 1)) != 0);
    if (l1_size > INT32_MAX / 8) {
        return Error{ErrorCode::invalid_table,
                     fmt::format("virtual size {} needs an L1 table of {} entries (too large)",
                                 info.virtual_size, l1_size)};
    }
    info.l1_size = static_cast<std::uint32_t>(l1_size);
    auto l1 = slice(state.bytes, info.l1_table_offset, l1_size * 8, "L1 table");
    if (!l1) {
        return std::move(l1).error();
    }
    state.l1_table = *l1;
    state.disk_size = info.virtual_size;

    if (backing_file_offset != 0) {
        if (backing_file_size > kMaxBackingNameLength) {
            return header_error(fmt::format("backing file name of {} bytes exceeds {} bytes",
                                            backing_file_size, kMaxBackingNameLength));
        }
        auto name = slice(state.bytes, backing_file_offset, backing_file_size, "backing file name",
                          ErrorCode::invalid_header);
        if (!name) {
            return std::move(name).error();
        }
        if (backing_file_size > 0) {
            info.backing_file = std::string(as_text(*name));
        }
    }
    return {};
}

} // namespace qcowmap::detail

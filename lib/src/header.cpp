// The header: decoded once at open and validated like qemu's qcow2_do_open (block/qcow2.c) and
// the spec (docs/interop/qcow2.txt, "Header"), then the subjects it points at, each parsed by
// its own file (parsers.hpp): header extensions, snapshot table, bitmap directory, L1 table.
#include "cluster.hpp"
#include "parsers.hpp"

#include <algorithm>
#include <string>

namespace qcowmap::detail {
namespace {

/// The magic and version (bytes 0-7): the version, or not_qcow2 / a truncated header.
Result<std::uint32_t> read_version(Bytes file) {
    if (file.size() < 4) {
        return Error{ErrorCode::not_qcow2,
                     fmt::format("not a qcow2 image (only {} bytes, no magic)", file.size())};
    }
    if (std::uint32_t magic = load_be32(file, header::kMagic); magic != kQcowMagic) {
        return Error{ErrorCode::not_qcow2,
                     fmt::format("not a qcow2 image (bad magic {:#010x}, expected {:#010x})", magic,
                                 kQcowMagic)};
    }
    if (file.size() < 8) {
        return header_error(
            fmt::format("file is truncated: {} bytes, shorter than the header", file.size()));
    }
    return load_be32(file, header::kVersion);
}

/// The version 3 header length (spec "Header", bytes 100-103) and the compression type byte.
Result<void> read_v3_length(ImageState& state) {
    ImageInfo& info = state.info;
    const Bytes file = state.bytes;
    if (info.header_length < kMinV3HeaderLength) {
        return header_error(fmt::format("header_length {} is less than {}", info.header_length,
                                        kMinV3HeaderLength));
    }
    if (info.header_length % 8 != 0) {
        return header_error(
            fmt::format("header_length {} is not a multiple of 8", info.header_length));
    }
    if (info.header_length > info.cluster_size) {
        return header_error(fmt::format("header_length {} is larger than the cluster size {}",
                                        info.header_length, info.cluster_size));
    }
    if (info.header_length > file.size()) {
        return header_error(fmt::format("header_length {} runs past the end of the file "
                                        "({} bytes)",
                                        info.header_length, file.size()));
    }
    if (info.header_length > header::kCompressionType) {
        info.compression_type =
            static_cast<CompressionType>(load_u8(file, header::kCompressionType));
    }
    return {};
}

/// The fixed header fields into `state.info`, with the checks that need nothing else: cluster
/// size, header length, refcount order, crypt method.
Result<DiskHeader> read_header(ImageState& state) {
    ImageInfo& info = state.info;
    const Bytes file = state.bytes;
    std::uint32_t min_length = info.version == 2 ? kV2HeaderLength : kMinV3HeaderLength;
    auto header = slice(file, 0, min_length, "header", ErrorCode::invalid_header);
    if (!header) {
        return header_error(
            fmt::format("file is truncated: {} bytes, shorter than the {}-byte version {} header",
                        file.size(), min_length, info.version));
    }
    const DiskHeader h = decode_header(*header);
    info.cluster_bits = h.cluster_bits;
    info.virtual_size = h.size;
    info.crypt_method = h.crypt_method;
    info.l1_size = h.l1_size;
    info.l1_table_offset = h.l1_table_offset;
    info.refcount_table_offset = h.refcount_table_offset;
    info.refcount_table_clusters = h.refcount_table_clusters;
    info.snapshot_count = h.nb_snapshots;
    info.snapshots_offset = h.snapshots_offset;

    if (info.cluster_bits < kMinClusterBits || info.cluster_bits > kMaxClusterBits) {
        return header_error(fmt::format("cluster_bits {} is outside {}..{}", info.cluster_bits,
                                        kMinClusterBits, kMaxClusterBits));
    }
    info.cluster_size = std::uint64_t{1} << info.cluster_bits;
    state.cluster_bits = info.cluster_bits;
    state.cluster_size = info.cluster_size;

    if (info.version == 3) {
        info.incompatible_features = h.incompatible_features;
        info.compatible_features = h.compatible_features;
        info.autoclear_features = h.autoclear_features;
        info.refcount_order = h.refcount_order;
        info.header_length = h.header_length;
        if (auto ok = read_v3_length(state); !ok) {
            return std::move(ok).error();
        }
    }
    if (info.refcount_order > kMaxRefcountOrder) {
        return header_error(fmt::format("refcount_order {} is larger than {}", info.refcount_order,
                                        kMaxRefcountOrder));
    }
    if (info.crypt_method > kMaxCryptMethod) {
        return header_error(fmt::format("crypt_method {} is unknown", info.crypt_method));
    }
    return h;
}

/// Unknown incompatible bits (named from the feature name table, so checked after the
/// extensions), the compression type against its bit, encryption, extended L2 entries; then
/// the geometry of the L2 tables that follows from them.
Result<void> check_features(ImageState& state) {
    ImageInfo& info = state.info;
    if (std::uint64_t unknown = info.incompatible_features & ~kKnownIncompatible) {
        std::string names;
        for (unsigned bit = 0; bit < 64; ++bit) {
            if (unknown & (std::uint64_t{1} << bit)) {
                if (!names.empty())
                    names += ", ";
                const auto name = named_feature(info, FeatureName::Type::incompatible, bit);
                names += name ? fmt::format("{} (bit {})", printable(*name), bit)
                              : fmt::format("bit {}", bit);
            }
        }
        return Error{ErrorCode::unsupported_feature,
                     fmt::format("unsupported incompatible feature(s): {}", names)};
    }
    bool compression_bit = (info.incompatible_features & kIncompatCompressionType) != 0;
    auto compression_value = static_cast<unsigned>(info.compression_type);
    if (compression_bit && compression_value == 0) {
        return header_error("compression type bit is set but compression_type is 0 (zlib)");
    }
    if (!compression_bit && compression_value != 0) {
        return header_error(fmt::format(
            "compression_type is {} but the compression type bit is not set", compression_value));
    }
    if (compression_value > 1) {
        return header_error(fmt::format("unknown compression_type {}", compression_value));
    }

    if (info.crypt_method != 0 && !state.mode.check) {
        return Error{ErrorCode::encrypted,
                     fmt::format("encrypted images are not supported (crypt_method {}: {})",
                                 info.crypt_method, info.crypt_method == 1 ? "AES" : "LUKS")};
    }

    info.extended_l2 = (info.incompatible_features & kIncompatExtendedL2) != 0;
    if (info.extended_l2 && info.cluster_bits < kMinExtendedL2ClusterBits) {
        return header_error(fmt::format("extended L2 entries need cluster_bits >= {}, got {}",
                                        kMinExtendedL2ClusterBits, info.cluster_bits));
    }
    state.l2_entry_bytes = info.extended_l2 ? 16 : 8;
    state.l2_table_bytes = info.cluster_size;
    state.l2_bits = info.cluster_bits - (info.extended_l2 ? 4 : 3);
    state.subcluster_bits = info.extended_l2 ? info.cluster_bits - 5 : info.cluster_bits;
    state.compressed_layout = CompressedLayout::for_v2(info.cluster_bits);

    if ((info.autoclear_features & kAutoclearDataFileRaw) &&
        !(info.incompatible_features & kIncompatDataFile)) {
        return header_error("raw external data bit is set without the external data file bit");
    }
    return {};
}

/// The backing file name: inside the first cluster and at most kMaxBackingNameLength bytes
/// (qcow2_do_open). An empty name means no backing file, as in qemu.
Result<void> read_backing_name(ImageState& state, const DiskHeader& h) {
    ImageInfo& info = state.info;
    if (h.backing_file_offset == 0) {
        return {};
    }
    if (h.backing_file_offset > info.cluster_size ||
        h.backing_file_size > std::min<std::uint64_t>(kMaxBackingNameLength,
                                                      info.cluster_size - h.backing_file_offset)) {
        return header_error(fmt::format(
            "backing file name at {:#x} of {} bytes does not fit in the first cluster or "
            "exceeds {} bytes",
            h.backing_file_offset, h.backing_file_size, kMaxBackingNameLength));
    }
    auto name = slice(state.bytes, h.backing_file_offset, h.backing_file_size, "backing file name",
                      ErrorCode::invalid_header);
    if (!name) {
        return std::move(name).error();
    }
    if (h.backing_file_size > 0) {
        info.backing_file = std::string(as_text(*name));
    }
    return {};
}

/// The refcount table's place (qcow2_do_open / qcow2_validate_table). qemu-img check opens an
/// image without one (BDRV_O_CHECK) and reports every cluster's refcount as 0 (iotests 060,
/// 108); reads refuse it, and a table at offset 0.
Result<void> check_refcount_table(const ImageState& state) {
    const ImageInfo& info = state.info;
    const bool check = state.mode.check;
    if (info.refcount_table_clusters == 0 && !check) {
        return Error{ErrorCode::invalid_table, "image has no refcount table (0 clusters)"};
    }
    std::uint64_t refcount_table_bytes = std::uint64_t{info.refcount_table_clusters}
                                         << info.cluster_bits;
    if (refcount_table_bytes > kMaxRefcountTableBytes) {
        return Error{ErrorCode::invalid_table,
                     fmt::format("refcount table of {} clusters ({:#x} bytes) exceeds qemu's limit "
                                 "of {:#x} bytes",
                                 info.refcount_table_clusters, refcount_table_bytes,
                                 kMaxRefcountTableBytes)};
    }
    if (!is_aligned(info.refcount_table_offset, info.cluster_size) ||
        (info.refcount_table_offset == 0 && !check) ||
        info.refcount_table_offset > kMaxTableEnd - refcount_table_bytes) {
        return Error{ErrorCode::invalid_table,
                     fmt::format("refcount table offset {:#x} is not a non-zero multiple of the "
                                 "cluster size {:#x}",
                                 info.refcount_table_offset, info.cluster_size)};
    }
    // (Salvage reads without refcounts: a table cut off by the end of the file is no damage.)
    if (!state.mode.salvage && !state.mode.stream) {
        if (auto t = slice(state.bytes, info.refcount_table_offset, refcount_table_bytes,
                           "refcount table");
            !t) {
            return std::move(t).error();
        }
    }
    return {};
}

/// The snapshot table: the offset is validated whatever the count, as qemu validates it
/// ("Snapshot table offset invalid", iotest 080); its entries are variable-length.
Result<void> read_snapshot_table(ImageState& state) {
    const ImageInfo& info = state.info;
    if (info.snapshot_count > kMaxSnapshots) {
        return Error{ErrorCode::invalid_table, fmt::format("{} snapshots exceed qemu's limit of {}",
                                                           info.snapshot_count, kMaxSnapshots)};
    }
    const std::uint64_t snapshot_fixed_bytes =
        std::uint64_t{info.snapshot_count} * kSnapshotEntryFixed;
    if (!is_aligned(info.snapshots_offset, info.cluster_size) ||
        (info.snapshots_offset == 0 && info.snapshot_count > 0) ||
        info.snapshots_offset > kMaxTableEnd - snapshot_fixed_bytes) {
        return Error{ErrorCode::invalid_table,
                     fmt::format("snapshot table offset {:#x} is not a non-zero multiple of "
                                 "the cluster size {:#x}",
                                 info.snapshots_offset, info.cluster_size)};
    }
    if (info.snapshot_count == 0 || state.mode.stream) {
        return {};
    }
    // Every entry has a fixed 40-byte part: a table that cannot even hold those is refused
    // before walking it (check reads what lies past the end as zeros, as qemu).
    const bool zero_fill = state.mode.check || state.mode.salvage;
    if (!zero_fill) {
        if (auto t =
                slice(state.bytes, info.snapshots_offset, snapshot_fixed_bytes, "snapshot table");
            !t) {
            return std::move(t).error();
        }
    }
    return parse_snapshot_table(state, zero_fill);
}

/// The bitmap directory: every entry validated; the bitmap data is read only when used. A
/// directory of a stale extension (autoclear bit clear) that does not parse is remembered.
Result<void> read_bitmap_directory(ImageState& state) {
    ImageInfo& info = state.info;
    if (!info.bitmaps || !info.bitmaps->directory_error.empty() || state.mode.stream) {
        return {};
    }
    BitmapsExtension& ext = *info.bitmaps;
    if (auto ok = parse_bitmap_directory(state, ext); !ok) {
        if (ext.consistent) {
            return ok;
        }
        ext.directory_error = ok.error().message;
        ext.entries.clear();
        ext.names.clear();
    }
    return {};
}

} // namespace

Result<void> parse_image(ImageState& state) {
    const Bytes file = state.bytes;
    ImageInfo& info = state.info;
    info.file_size = file.size();
    auto version = read_version(file);
    if (!version) {
        return std::move(version).error();
    }
    info.version = *version;
    if (info.version == 1) {
        return parse_v1_image(state);
    }
    if (info.version != 2 && info.version != 3) {
        return Error{ErrorCode::unsupported_version,
                     fmt::format("unsupported qcow2 version {} (2 and 3 are known)", info.version)};
    }
    auto h = read_header(state);
    if (!h) {
        return std::move(h).error();
    }
    // Header extensions end where the backing file name starts, else at the end of the first
    // cluster (qcow2_read_extensions).
    const std::uint64_t extensions_start = info.version == 2 ? kV2HeaderLength : info.header_length;
    std::uint64_t extensions_end =
        h->backing_file_offset != 0
            ? std::min<std::uint64_t>(h->backing_file_offset, info.cluster_size)
            : info.cluster_size;
    extensions_end = std::min<std::uint64_t>(extensions_end, file.size());
    if (auto ok = parse_extensions(state, extensions_start, extensions_end); !ok) {
        return ok;
    }
    if (auto ok = check_features(state); !ok) {
        return ok;
    }
    if (auto ok = read_backing_name(state, *h); !ok) {
        return ok;
    }
    if (auto ok = check_refcount_table(state); !ok) {
        return ok;
    }
    if (auto ok = read_snapshot_table(state); !ok) {
        return ok;
    }
    if (auto ok = read_bitmap_directory(state); !ok) {
        return ok;
    }
    // Active L1 table: no larger than qemu allows, large enough for the virtual size.
    auto l1 = l1_table(state, info.l1_table_offset, info.l1_size, info.virtual_size, "L1 table");
    if (!l1) {
        return std::move(l1).error();
    }
    state.l1_table = *l1;
    state.disk_size = info.virtual_size;
    return {};
}

} // namespace qcowmap::detail

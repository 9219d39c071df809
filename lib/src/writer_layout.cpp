#include "writer_layout.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <cstring>

namespace qcowmap::detail::writer {

Result<Geometry> make_geometry(const WriteOptions& options, std::uint64_t virtual_size) {
    const std::uint32_t cluster = options.cluster_size;
    if (cluster < (1u << kMinClusterBits) || cluster > (1u << kMaxClusterBits) ||
        !std::has_single_bit(cluster)) {
        return Error{ErrorCode::invalid_argument,
                     fmt::format("cluster_size {} is not a power of two between 512 and 2M "
                                 "(2097152)",
                                 cluster)};
    }
    // Extended L2: 32 subclusters of at least 512 bytes (qemu's qcow2_co_create).
    if (options.extended_l2 && cluster < (1u << kMinExtendedL2ClusterBits)) {
        return Error{
            ErrorCode::invalid_argument,
            fmt::format("extended_l2 needs a cluster size of at least 16k (not {})", cluster)};
    }
    const std::uint32_t bits = options.refcount_bits;
    if (bits == 0 || bits > 64 || !std::has_single_bit(bits)) {
        return Error{ErrorCode::invalid_argument,
                     fmt::format("refcount_bits {} is not a power of two between 1 and 64", bits)};
    }
    Geometry g;
    g.cluster_bits = static_cast<std::uint32_t>(std::countr_zero(cluster));
    g.cluster_size = cluster;
    g.extended_l2 = options.extended_l2;
    g.refcount_order = static_cast<std::uint32_t>(std::countr_zero(bits));
    g.virtual_size = virtual_size;
    if (g.l1_size() * 8 > kMaxL1Bytes) {
        return Error{ErrorCode::invalid_argument,
                     fmt::format("a disk of {} bytes needs an L1 table of {} entries with "
                                 "{}-byte clusters, more than qemu accepts (32 MiB): use "
                                 "larger clusters",
                                 virtual_size, g.l1_size(), cluster)};
    }
    return g;
}

Result<Layout> make_layout(const Geometry& g, std::uint64_t l2_tables,
                           std::uint64_t data_clusters) {
    Layout layout;
    layout.l1_clusters = std::max<std::uint64_t>(1, g.clusters_for(g.l1_size() * 8));
    layout.l2_count = l2_tables;
    layout.data_clusters = data_clusters;
    const std::uint64_t fixed = 1 + layout.l1_clusters + l2_tables + data_clusters;
    // The refcount blocks count every cluster, their own and the refcount table's included:
    // grow both until they cover the total (a fixed point reached in a few rounds).
    std::uint64_t blocks = 1, table = 1;
    for (;;) {
        const std::uint64_t total = fixed + blocks + table;
        const std::uint64_t need_blocks = (total + g.refs_per_block() - 1) / g.refs_per_block();
        const std::uint64_t need_table =
            std::max<std::uint64_t>(1, g.clusters_for(need_blocks * 8));
        if (need_blocks <= blocks && need_table <= table)
            break;
        blocks = std::max(blocks, need_blocks);
        table = std::max(table, need_table);
    }
    if (table * g.cluster_size > kMaxRefcountTableBytes) {
        return Error{ErrorCode::invalid_argument,
                     fmt::format("the image would need a refcount table of {} bytes, more than "
                                 "qemu accepts (8 MiB): use larger clusters or refcount_bits",
                                 table * g.cluster_size)};
    }
    layout.reftable = 1;
    layout.reftable_clusters = table;
    layout.refblocks = layout.reftable + table;
    layout.refblock_count = blocks;
    layout.l1 = layout.refblocks + blocks;
    layout.l2 = layout.l1 + layout.l1_clusters;
    layout.data = layout.l2 + l2_tables;
    if (layout.total() > (kMaxHostOffset >> g.cluster_bits)) {
        return Error{ErrorCode::invalid_argument, "the image would pass qemu's largest host "
                                                  "offset (2^56)"};
    }
    return layout;
}

namespace {

/// The header fields of the output (clean: no dirty bit; no snapshots). Version 2 headers end
/// at byte 72: refcount order 4, no feature bits (else invalid_argument).
Result<DiskHeader> header_fields(const Geometry& g, const Layout& layout,
                                 const HeaderFields& fields) {
    DiskHeader h;
    h.version = fields.version;
    h.cluster_bits = g.cluster_bits;
    h.size = g.virtual_size;
    h.l1_size = static_cast<std::uint32_t>(g.l1_size());
    h.l1_table_offset = layout.l1 << g.cluster_bits;
    h.refcount_table_offset = layout.reftable << g.cluster_bits;
    h.refcount_table_clusters = static_cast<std::uint32_t>(layout.reftable_clusters);
    if (fields.compression_type == CompressionType::zstd)
        h.incompatible_features |= kIncompatCompressionType;
    if (g.extended_l2)
        h.incompatible_features |= kIncompatExtendedL2;
    if (fields.data_file)
        h.incompatible_features |= kIncompatDataFile;
    if (fields.version < 3) {
        if (h.incompatible_features || g.refcount_order != 4 || fields.lazy_refcounts) {
            return Error{ErrorCode::invalid_argument,
                         "compat=0.10 (version 2) images cannot have extended L2 entries, zstd "
                         "compression, an external data file, lazy refcounts or refcount_bits "
                         "other than 16"};
        }
        h.refcount_order = 4;
        h.header_length = kV2HeaderLength;
        return h;
    }
    h.compatible_features = fields.lazy_refcounts ? kCompatLazyRefcounts : 0;
    h.autoclear_features = fields.data_file_raw ? kAutoclearDataFileRaw : 0;
    h.refcount_order = g.refcount_order;
    h.header_length = kV3HeaderLength;
    h.compression_type = static_cast<std::uint8_t>(fields.compression_type);
    return h;
}

} // namespace

Result<std::vector<std::byte>> encode_header(const Geometry& g, const Layout& layout,
                                             const HeaderFields& fields) {
    const std::uint64_t cluster = g.cluster_size;
    auto disk = header_fields(g, layout, fields);
    if (!disk)
        return std::move(disk).error();
    const bool v3 = disk->version >= 3;
    const std::uint64_t header_length = disk->header_length;
    const std::string backing = fields.backing_file.value_or("");
    if (backing.size() > kMaxBackingNameLength) {
        return Error{ErrorCode::invalid_argument,
                     fmt::format("backing file name is {} bytes long; qemu accepts at most {}",
                                 backing.size(), kMaxBackingNameLength)};
    }
    const std::string format = fields.backing_format.value_or("");
    const std::uint64_t format_ext =
        format.empty() ? 0 : kExtensionHeaderSize + align_up8(format.size());
    const std::uint64_t table_ext =
        kExtensionHeaderSize + kKnownFeatures.size() * kFeatureNameEntrySize;
    const std::string data_file = fields.data_file.value_or("");
    const std::uint64_t data_file_ext =
        data_file.empty() ? 0 : kExtensionHeaderSize + align_up8(data_file.size());
    std::uint64_t needed =
        header_length + format_ext + data_file_ext + kExtensionHeaderSize + backing.size();
    // The feature-name table only helps tools name bits; with 512-byte clusters it does not fit
    // beside a backing name, and is left out.
    const bool with_table = v3 && needed + table_ext <= cluster; // qemu: version 3 only
    if (with_table)
        needed += table_ext;
    if (needed > cluster) {
        return Error{ErrorCode::invalid_argument,
                     fmt::format("the header with a backing file name of {} bytes does not fit "
                                 "in one {}-byte cluster",
                                 backing.size(), cluster)};
    }
    std::vector<std::byte> header(cluster);
    std::byte* h = header.data();
    std::uint64_t at = header_length;
    if (!format.empty()) {
        at += encode_extension(h + at, kExtensionBackingFormat,
                               std::as_bytes(std::span(format.data(), format.size())));
    }
    if (!data_file.empty()) {
        at += encode_extension(h + at, kExtensionDataFile,
                               std::as_bytes(std::span(data_file.data(), data_file.size())));
    }
    if (with_table) {
        std::vector<std::byte> table(kKnownFeatures.size() * kFeatureNameEntrySize);
        for (std::size_t i = 0; i < kKnownFeatures.size(); ++i)
            encode_feature_name(table.data() + i * kFeatureNameEntrySize, kKnownFeatures[i]);
        at += encode_extension(h + at, kExtensionFeatureNames, table);
    }
    at += kExtensionHeaderSize; // the end of the extension area: type 0, length 0 (zeros)
    if (!backing.empty()) {
        disk->backing_file_offset = at;
        disk->backing_file_size = static_cast<std::uint32_t>(backing.size());
        std::memcpy(h + at, backing.data(), backing.size());
    }
    detail::encode_header(*disk, h);
    return header;
}

void encode_l2_entry(const Geometry& g, std::span<std::byte> table, std::uint64_t index,
                     const L2Plan& entry) {
    L2Entry encoded; // unallocated: all zero
    switch (entry.kind) {
    case L2Plan::Kind::unallocated:
        break;
    case L2Plan::Kind::data:
        encoded = L2Entry::data(entry.host);
        break;
    case L2Plan::Kind::zero:
        encoded = L2Entry::zero(g.extended_l2);
        break;
    case L2Plan::Kind::compressed:
        encoded = L2Entry::compressed_cluster(encode_compressed(
            CompressedLayout::for_v2(g.cluster_bits), entry.host, entry.compressed_size));
        break;
    }
    encode_l2(table.data() + index * g.l2_entry_bytes(), encoded, g.extended_l2);
}

std::vector<std::uint64_t> l2_tables_of(const Geometry& g, const std::vector<PlanRun>& plan) {
    std::vector<std::uint64_t> tables;
    const std::uint64_t per_table = g.l2_entries();
    for (const PlanRun& run : plan) {
        if (run.count == 0)
            continue;
        std::uint64_t first = run.first / per_table, last = (run.first + run.count - 1) / per_table;
        if (!tables.empty() && tables.back() >= first)
            first = tables.back() + 1;
        for (std::uint64_t t = first; t <= last; ++t)
            tables.push_back(t);
    }
    return tables;
}

} // namespace qcowmap::detail::writer

#include "writer_layout.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <cstring>

namespace qcowmap::detail::writer {

void store_be32(std::byte* p, std::uint32_t value) {
    for (int i = 3; i >= 0; --i) {
        p[i] = static_cast<std::byte>(value & 0xff);
        value >>= 8;
    }
}

void store_be64(std::byte* p, std::uint64_t value) {
    store_be32(p, static_cast<std::uint32_t>(value >> 32));
    store_be32(p + 4, static_cast<std::uint32_t>(value));
}

Result<Geometry> make_geometry(const WriteOptions& options, std::uint64_t virtual_size) {
    const std::uint32_t cluster = options.cluster_size;
    // qemu: MIN_CLUSTER_BITS 9 .. MAX_CLUSTER_BITS 21.
    if (cluster < 512 || cluster > (2u << 20) || !std::has_single_bit(cluster)) {
        return Error{ErrorCode::invalid_argument,
                     fmt::format("cluster_size {} is not a power of two between 512 and 2M "
                                 "(2097152)",
                                 cluster)};
    }
    // Extended L2: 32 subclusters of at least 512 bytes (qemu's qcow2_co_create).
    if (options.extended_l2 && cluster < 16384) {
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
    if (table * g.cluster_size > kMaxReftableBytes) {
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

// Header extension types (spec "Header extensions").
constexpr std::uint32_t kExtBackingFormat = 0xe2792aca;
constexpr std::uint32_t kExtFeatureTable = 0x6803f857;
constexpr std::uint32_t kExtDataFileName = 0x44415441;
constexpr std::uint32_t kHeaderLength = 112; // v3 header with the compression type byte, padded

struct FeatureEntry {
    std::uint8_t type, bit;
    const char* name;
};
// The table qemu 7.2 writes (qcow2_update_header), so `qemu-img info` names the same bits.
constexpr FeatureEntry kFeatures[] = {
    {0, 0, "dirty bit"},        {0, 1, "corrupt bit"},         {0, 2, "external data file"},
    {0, 3, "compression type"}, {0, 4, "extended L2 entries"}, {1, 0, "lazy refcounts"},
    {2, 0, "bitmaps"},          {2, 1, "raw external data"},
};

} // namespace

Result<std::vector<std::byte>> encode_header(const Geometry& g, const Layout& layout,
                                             const HeaderFields& fields) {
    const std::uint64_t cluster = g.cluster_size;
    std::vector<std::byte> header(cluster);
    std::byte* h = header.data();
    std::memcpy(h, "QFI\xfb", 4);
    store_be32(h + 4, fields.version);
    store_be32(h + 20, g.cluster_bits);
    store_be64(h + 24, g.virtual_size);
    store_be32(h + 32, 0); // crypt_method
    store_be32(h + 36, static_cast<std::uint32_t>(g.l1_size()));
    store_be64(h + 40, layout.l1 << g.cluster_bits);
    store_be64(h + 48, layout.reftable << g.cluster_bits);
    store_be32(h + 56, static_cast<std::uint32_t>(layout.reftable_clusters));
    const bool v3 = fields.version >= 3;
    std::uint64_t incompatible = 0;
    if (fields.compression_type == CompressionType::zstd)
        incompatible |= kIncompatCompressionType;
    if (g.extended_l2)
        incompatible |= kIncompatExtendedL2;
    if (fields.data_file)
        incompatible |= kIncompatDataFile;
    if (v3) { // version 2 headers end at byte 72 (refcount order 4, no feature bits)
        store_be64(h + 72, incompatible);
        store_be64(h + 80, fields.lazy_refcounts ? kCompatLazyRefcounts : 0);
        store_be64(h + 88, fields.data_file_raw ? kAutoclearDataFileRaw : 0);
        store_be32(h + 96, g.refcount_order);
        store_be32(h + 100, kHeaderLength);
        h[104] = static_cast<std::byte>(fields.compression_type);
    } else if (incompatible || g.refcount_order != 4 || fields.lazy_refcounts) {
        return Error{ErrorCode::invalid_argument,
                     "compat=0.10 (version 2) images cannot have extended L2 entries, zstd "
                     "compression, an external data file, lazy refcounts or refcount_bits other "
                     "than 16"};
    }
    const std::uint64_t header_length = v3 ? kHeaderLength : 72;

    const std::string backing = fields.backing_file.value_or("");
    if (backing.size() > 1023) { // qemu's limit (1023 bytes, inside the first cluster)
        return Error{ErrorCode::invalid_argument,
                     fmt::format("backing file name is {} bytes long; qemu accepts at most 1023",
                                 backing.size())};
    }
    auto padded = [](std::uint64_t n) { return (n + 7) & ~std::uint64_t{7}; };
    const std::string format = fields.backing_format.value_or("");
    const std::uint64_t format_ext = format.empty() ? 0 : 8 + padded(format.size());
    const std::uint64_t table_ext = 8 + sizeof kFeatures / sizeof kFeatures[0] * 48;
    const std::string data_file = fields.data_file.value_or("");
    const std::uint64_t data_file_ext = data_file.empty() ? 0 : 8 + padded(data_file.size());
    std::uint64_t needed = header_length + format_ext + data_file_ext + 8 + backing.size();
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
    std::uint64_t at = header_length;
    if (!format.empty()) {
        store_be32(h + at, kExtBackingFormat);
        store_be32(h + at + 4, static_cast<std::uint32_t>(format.size()));
        std::memcpy(h + at + 8, format.data(), format.size());
        at += format_ext;
    }
    if (!data_file.empty()) {
        store_be32(h + at, kExtDataFileName);
        store_be32(h + at + 4, static_cast<std::uint32_t>(data_file.size()));
        std::memcpy(h + at + 8, data_file.data(), data_file.size());
        at += data_file_ext;
    }
    if (with_table) {
        store_be32(h + at, kExtFeatureTable);
        store_be32(h + at + 4, static_cast<std::uint32_t>(table_ext - 8));
        at += 8;
        for (const FeatureEntry& f : kFeatures) {
            h[at] = static_cast<std::byte>(f.type);
            h[at + 1] = static_cast<std::byte>(f.bit);
            std::memcpy(h + at + 2, f.name, std::strlen(f.name));
            at += 48;
        }
    }
    at += 8; // end of the extension area: type 0, length 0 (already zero)
    if (!backing.empty()) {
        store_be64(h + 8, at);
        store_be32(h + 16, static_cast<std::uint32_t>(backing.size()));
        std::memcpy(h + at, backing.data(), backing.size());
    }
    return header;
}

void encode_l2_entry(const Geometry& g, std::span<std::byte> table, std::uint64_t index,
                     const L2Entry& entry) {
    std::byte* p = table.data() + index * g.l2_entry_bytes();
    std::uint64_t word = 0, bitmap = 0;
    switch (entry.kind) {
    case L2Entry::Kind::unallocated:
        break;
    case L2Entry::Kind::data:
        word = entry.host | kOflagCopied;
        bitmap = 0xffffffffull; // every subcluster allocated
        break;
    case L2Entry::Kind::zero:
        // Extended L2: bit 0 is reserved and the zero bits (32..63) say it per subcluster.
        if (g.extended_l2)
            bitmap = 0xffffffffull << 32;
        else
            word = kOflagZero;
        break;
    case L2Entry::Kind::compressed: {
        // Spec "Compressed Clusters Descriptor": x = 62 - (cluster_bits - 8) bits of offset,
        // then the number of 512-byte sectors after the first that the stream touches.
        const unsigned shift = 62 - (g.cluster_bits - 8);
        const std::uint64_t sectors =
            ((entry.host + entry.compressed_size - 1) >> 9) - (entry.host >> 9);
        word = kOflagCompressed | (sectors << shift) | entry.host;
        break; // the subcluster bitmap of a compressed cluster must be zero
    }
    }
    store_be64(p, word);
    if (g.extended_l2)
        store_be64(p + 8, bitmap);
}

void set_refcount(std::span<std::byte> block, std::uint64_t index, std::uint64_t value,
                  std::uint32_t order) {
    const unsigned bits = 1u << order;
    if (bits < 8) {
        const std::uint64_t per_byte = 8 / bits;
        auto& byte = block[index / per_byte];
        const unsigned shift = static_cast<unsigned>((index % per_byte) * bits);
        const unsigned mask = ((1u << bits) - 1) << shift;
        byte = static_cast<std::byte>((std::to_integer<unsigned>(byte) & ~mask) |
                                      ((static_cast<unsigned>(value) << shift) & mask));
        return;
    }
    std::byte* p = block.data() + index * (bits / 8);
    for (int i = static_cast<int>(bits / 8) - 1; i >= 0; --i) {
        p[i] = static_cast<std::byte>(value & 0xff);
        value >>= 8;
    }
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

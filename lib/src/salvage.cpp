// The salvage scan (OpenOptions::salvage): one walk of the whole disk at open, the way every
// reader will walk it, recording the damaged ranges and the compressed clusters that do not
// decompress (which the walk then reads as zeros).
#include "cluster.hpp"

#include <set>
#include <utility>

namespace qcowmap::detail {

Result<std::shared_ptr<const SalvageState>> scan_for_salvage(const Image& image) {
    const ImageState& top = detail_state(image);
    auto out = std::make_shared<SalvageState>();
    SalvageReport& report = out->report;
    // Distinct bad streams: at most one per 512 bytes of the file, however often referenced.
    std::set<std::pair<std::uint32_t, std::uint64_t>> bad;
    Decompressor decompressor;
    std::vector<std::byte> cluster;
    auto add = [&](std::uint64_t offset, std::uint64_t length, std::uint32_t depth,
                   bool unallocated, bool falls_through, std::string reason) {
        report.damaged_bytes += length;
        if (!report.ranges.empty()) {
            DamagedRange& last = report.ranges.back();
            if (last.offset + last.length == offset && last.depth == depth &&
                last.unallocated == unallocated && last.falls_through == falls_through &&
                last.reason == reason) {
                last.length += length;
                return;
            }
        }
        if (report.ranges.size() >= kMaxListedDamagedRanges) {
            ++report.ranges_not_listed;
            return;
        }
        report.ranges.push_back(
            {offset, length, depth, unallocated, falls_through, std::move(reason)});
    };
    // The walk every reader will make (classify_chain in salvage mode never fails), with no
    // compressed cluster known bad yet: each one met is tried here.
    for (std::uint64_t pos = 0; pos < top.disk_size;) {
        auto run = classify_chain(top, 0, pos, top.disk_size, nullptr);
        if (!run) {
            return std::move(run).error();
        }
        if (!run->damage.empty()) {
            const bool through = run->damage_falls_through;
            add(pos, run->length, through ? run->damage_depth : run->depth,
                through || !run->present, through, std::move(run->damage));
        } else if (run->kind == ExtentKind::compressed) {
            const ImageState& layer = *run->layer;
            Extent extent;
            extent.offset = pos;
            extent.length = run->length;
            extent.kind = ExtentKind::compressed;
            extent.present = true;
            extent.depth = run->depth;
            extent.bytes = layer.bytes.subspan(run->compressed_host_offset, run->compressed_size);
            extent.compressed_host_offset = run->compressed_host_offset;
            extent.offset_in_cluster = run->offset_in_cluster;
            cluster.resize(layer.cluster_size);
            const std::pair key{run->depth, run->compressed_host_offset};
            if (bad.contains(key)) {
                add(pos, run->length, run->depth, false, false,
                    fmt::format("compressed cluster at host offset {:#x} does not decompress "
                                "(as above)",
                                key.second));
            } else if (auto ok = decompressor.decompress_cluster(image, extent, cluster); !ok) {
                bad.insert(key);
                add(pos, run->length, run->depth, false, false, std::move(ok).error().message);
            }
        }
        pos += run->length;
    }
    out->bad_compressed.assign(bad.begin(), bad.end());
    return std::shared_ptr<const SalvageState>(std::move(out));
}

} // namespace qcowmap::detail

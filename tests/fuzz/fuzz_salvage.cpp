// Fuzz target: salvage. An image that opens with OpenOptions::salvage must never fail to be
// walked or read: every range that cannot be read reads as zeros and is in the salvage report.
// Invariants checked on every input (a violation traps):
//  - the extent walk over the whole disk ends without an error;
//  - reads over the whole disk succeed (decompression included);
//  - the report lists ranges inside the disk, in order, not overlapping, and its damaged bytes
//    are at most the disk size.
// Disks larger than 64 MiB are skipped: salvage walks the whole disk's metadata at open.
#include <qcowmap/image.hpp>
#include <qcowmap/salvage.hpp>

#include <cstddef>
#include <cstdint>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (size < 32)
        return 0;
    std::uint64_t virtual_size = 0;
    for (int i = 24; i < 32; ++i) // header bytes 24-31, in qcow2 and qcow version 1 alike
        virtual_size = virtual_size << 8 | data[i];
    if (virtual_size > (64u << 20))
        return 0;
    std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
    qcowmap::OpenOptions options;
    options.backing = qcowmap::BackingMode::none;
    options.salvage = true;
    auto image = qcowmap::Image::open_bytes(bytes, options);
    if (!image)
        return 0;
    const qcowmap::SalvageReport& report = qcowmap::salvage_report(*image);
    std::uint64_t end = 0;
    for (const qcowmap::DamagedRange& r : report.ranges) {
        if (r.length == 0 || r.offset < end || r.offset > image->size() ||
            r.length > image->size() - r.offset)
            __builtin_trap();
        end = r.offset + r.length;
    }
    if (report.damaged_bytes > image->size())
        __builtin_trap();
    auto extents = image->extents();
    std::uint64_t covered = 0;
    for (const qcowmap::Extent& extent : extents)
        covered += extent.length;
    if (extents.error() || covered != image->size())
        __builtin_trap(); // salvage walks never fail, and cover the whole disk
    std::vector<std::byte> buffer(1 << 20);
    for (std::uint64_t at = 0; at < image->size(); at += buffer.size()) {
        auto n = image->read(buffer, at);
        if (!n)
            __builtin_trap(); // nor do its reads
    }
    return 0;
}

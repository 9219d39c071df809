// Fuzz target: the snapshot table (variable-length entries, extra data, ID and name) and each
// snapshot's L1 table, opened by ID and walked like the active disk. Bounded work per input.
#include <qcowmap/image.hpp>

#include <cstddef>
#include <cstdint>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
    qcowmap::OpenOptions options;
    options.backing = qcowmap::BackingMode::none;
    auto image = qcowmap::Image::open_bytes(bytes, options);
    if (!image) {
        return 0;
    }
    unsigned sink = 0;
    const auto& snapshots = image->info().snapshots;
    for (std::size_t i = 0; i < snapshots.size() && i < 8; ++i) {
        for (const std::string* key : {&snapshots[i].id, &snapshots[i].name}) {
            qcowmap::OpenOptions by_key = options;
            by_key.snapshot = *key;
            auto snap = qcowmap::Image::open_bytes(bytes, by_key);
            if (!snap)
                continue;
            qcowmap::ExtentRange it = snap->extents();
            int n = 0;
            for (const qcowmap::Extent& extent : it) {
                if (n++ == 1024)
                    break;
                if (!extent.bytes.empty())
                    sink += std::to_integer<unsigned>(extent.bytes.back());
            }
            std::byte buffer[4096];
            (void)snap->read(buffer, snap->size() / 2);
        }
    }
    (void)sink;
    return 0;
}

// Fuzz target: open + header/extension parsing, the extent walk over the whole disk, the map,
// and reads at offsets chosen from the input. Work is bounded independently of header claims.
#include <qcowmap/image.hpp>
#include <qcowmap/map.hpp>

#include <cstddef>
#include <cstdint>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
    for (auto backing : {qcowmap::BackingMode::none, qcowmap::BackingMode::follow}) {
        qcowmap::OpenOptions options;
        options.backing = backing;
        auto image = qcowmap::Image::open_bytes(bytes, options);
        if (!image) {
            continue;
        }
        (void)image->info().feature_name(qcowmap::FeatureName::Type::incompatible, 7);
        // Walk extents: at most 4096 of them, touching every data byte's first and last byte.
        qcowmap::ExtentRange it = image->extents();
        unsigned sink = 0;
        int n = 0;
        for (const qcowmap::Extent& extent : it) {
            if (n++ == 4096)
                break;
            if (!extent.bytes.empty()) {
                sink += std::to_integer<unsigned>(extent.bytes.front()) +
                        std::to_integer<unsigned>(extent.bytes.back());
            }
        }
        // The map over the first 64 MiB.
        qcowmap::MapOptions map_options;
        map_options.length = 64ull << 20;
        (void)qcowmap::map_image(*image, map_options, [&](const qcowmap::MapEntry& e) {
            sink += static_cast<unsigned>(e.length);
            return qcowmap::Result<void>{};
        });
        // Reads: a few windows derived from the input, 256 KiB in all.
        std::vector<std::byte> buffer(64 * 1024);
        for (std::size_t i = 0; i < 4; ++i) {
            std::uint64_t offset =
                image->size() == 0 ? 0 : (size * 7919u * (i + 1)) % image->size();
            (void)image->read(buffer, offset);
        }
        (void)image->read(buffer, image->size() > buffer.size() ? image->size() - 100 : 0);
        // Refcounts of the first clusters.
        for (std::uint64_t c = 0; c < 16; ++c) {
            (void)qcowmap::refcount_of(*image, c);
        }
        (void)sink;
    }
    return 0;
}

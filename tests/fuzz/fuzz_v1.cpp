// Fuzz target: legacy qcow version 1 (block/qcow.c layout): header, L1, L2 walk, compressed
// clusters. Inputs that do not claim version 1 are made to, so every run exercises that parser.
#include <qcowmap/image.hpp>

#include <cstddef>
#include <cstdint>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    std::vector<std::byte> bytes(reinterpret_cast<const std::byte*>(data),
                                 reinterpret_cast<const std::byte*>(data) + size);
    if (bytes.size() >= 8) {
        const std::byte header[8] = {std::byte{'Q'},  std::byte{'F'}, std::byte{'I'},
                                     std::byte{0xfb}, std::byte{0},   std::byte{0},
                                     std::byte{0},    std::byte{1}};
        std::copy(std::begin(header), std::end(header), bytes.begin());
    }
    qcowmap::OpenOptions options;
    options.backing = qcowmap::BackingMode::none;
    auto image = qcowmap::Image::open_bytes(bytes, options);
    if (!image) {
        return 0;
    }
    unsigned sink = 0;
    qcowmap::ExtentRange it = image->extents();
    int n = 0;
    for (const qcowmap::Extent& extent : it) {
        if (n++ == 2048)
            break;
        if (!extent.bytes.empty())
            sink += std::to_integer<unsigned>(extent.bytes.front());
    }
    std::vector<std::byte> buffer(64 * 1024);
    for (std::uint64_t i = 0; i < 4; ++i) {
        (void)image->read(buffer,
                          image->size() == 0 ? 0 : (i * 0x9e3779b97f4a7c15ULL) % image->size());
    }
    (void)sink;
    return 0;
}

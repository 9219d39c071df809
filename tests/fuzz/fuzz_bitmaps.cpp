// Fuzz target: the bitmaps header extension and bitmap directory as open parses them, then
// the bitmap tables and their data clusters as check walks them.
#include <qcowmap/check.hpp>
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
    std::size_t sink = 0;
    if (const auto& bitmaps = image->info().bitmaps) {
        for (const std::string& name : bitmaps->names)
            sink += name.size();
        qcowmap::CheckOptions check_options;
        check_options.max_messages = 16;
        auto result = qcowmap::check_image(bytes, check_options);
        if (result)
            sink += result->corruptions;
    }
    (void)sink;
    return 0;
}

// Fuzz target: backing-chain resolution in memory. The input is split into up to four "files"
// at each "\n--\n"; file i is named "f<i>" (and "f<i>.qcow2"), so images whose backing name is
// one of those form chains, loops (f0 -> f1 -> f0, f0 -> f0) and raw layers. The chain is
// opened through OpenOptions::backing_resolver, then walked and read across layers.
#include <qcowmap/image.hpp>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    std::string_view all(reinterpret_cast<const char*>(data), size);
    std::vector<std::span<const std::byte>> files;
    constexpr std::string_view kSeparator = "\n--\n";
    while (files.size() < 4) {
        std::size_t end = files.size() == 3 ? std::string_view::npos : all.find(kSeparator);
        std::string_view part = all.substr(0, end);
        files.emplace_back(reinterpret_cast<const std::byte*>(part.data()), part.size());
        if (end == std::string_view::npos)
            break;
        all.remove_prefix(end + kSeparator.size());
    }
    qcowmap::OpenOptions options;
    options.backing_resolver =
        [&](const std::string& name) -> std::optional<std::span<const std::byte>> {
        for (std::size_t i = 0; i < files.size(); ++i) {
            const std::string base = "f" + std::to_string(i);
            if (name == base || name == base + ".qcow2")
                return files[i];
        }
        return std::nullopt;
    };
    auto image = qcowmap::Image::open_bytes(files[0], options);
    if (!image) {
        return 0;
    }
    unsigned sink = static_cast<unsigned>(image->layers().size());
    qcowmap::ExtentRange it = image->extents();
    int n = 0;
    for (const qcowmap::Extent& extent : it) {
        if (n++ == 2048)
            break;
        if (!extent.bytes.empty())
            sink += std::to_integer<unsigned>(extent.bytes.back());
    }
    std::vector<std::byte> buffer(64 * 1024);
    (void)image->read(buffer, 0);
    (void)image->read(buffer, image->size() / 3);
    (void)sink;
    return 0;
}

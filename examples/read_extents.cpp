// The README's library example: open an image, walk its extents, read some bytes.
// Built and run by the test suite so that it cannot rot.
#include <qcowmap/image.hpp>

#include <cstdio>
#include <vector>

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s IMAGE.qcow2\n", argv[0]);
        return 2;
    }
    auto image = qcowmap::Image::open(argv[1]);
    if (!image) {
        std::fprintf(stderr, "%s: %s\n", argv[1], image.error().message.c_str());
        return 1;
    }

    // Walk the virtual disk: data extents point straight into the mapping (no copy).
    std::uint64_t data_bytes = 0;
    qcowmap::ExtentIterator it = image->extents();
    qcowmap::Extent extent;
    while (it.next(extent)) {
        const char* kind = extent.kind == qcowmap::ExtentKind::data         ? "data"
                           : extent.kind == qcowmap::ExtentKind::compressed ? "compressed"
                                                                            : "zero";
        std::printf("%12llu +%-12llu %s%s\n", static_cast<unsigned long long>(extent.offset),
                    static_cast<unsigned long long>(extent.length), kind,
                    extent.present ? "" : " (unallocated)");
        if (extent.kind == qcowmap::ExtentKind::data) {
            data_bytes += extent.bytes.size(); // a std::span<const std::byte> into the mapping
        }
    }
    if (it.failed()) {
        std::fprintf(stderr, "%s: %s\n", argv[1], it.error().message.c_str());
        return 1;
    }

    // read() copies any range, whatever backs it.
    std::vector<std::byte> buffer(4096);
    auto copied = image->read(buffer, 0);
    if (!copied) {
        std::fprintf(stderr, "%s: %s\n", argv[1], copied.error().message.c_str());
        return 1;
    }
    std::printf("%llu data bytes mapped; read %zu bytes at offset 0\n",
                static_cast<unsigned long long>(data_bytes), *copied);
    return 0;
}

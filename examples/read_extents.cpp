// The README's library example: open an image, walk its extents as a C++20 range, compose a
// view over part of the disk, read some bytes, read every byte with the bytes produced ahead. Built
// against the installed library and run by the test suite so that it cannot rot.
#include <qcowmap/image.hpp>

#include <cstdio>
#include <ranges>
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
    auto extents = image->extents(); // or image->extents(start, end)
    static_assert(std::ranges::input_range<decltype(extents)>);
    std::uint64_t data_bytes = 0;
    for (const qcowmap::Extent& e : extents) {
        std::printf("%12llu +%-12llu %s%s\n", static_cast<unsigned long long>(e.offset),
                    static_cast<unsigned long long>(e.length),
                    std::string(qcowmap::to_string(e.kind)).c_str(),
                    e.present ? "" : " (unallocated)");
        if (e.kind == qcowmap::ExtentKind::data) {
            data_bytes += e.bytes.size(); // a std::span<const std::byte> into the mapping
        }
    }
    if (extents.error()) { // const std::optional<qcowmap::Error>&
        std::fprintf(stderr, "%s: %s\n", argv[1], extents.error()->message.c_str());
        return 1;
    }

    // Views compose: the non-zero extents of the first half of the disk.
    auto part = image->extents(0, image->size() / 2);
    std::uint64_t stored_in_first_half = 0;
    for (const auto& e : part | std::views::filter([](const qcowmap::Extent& e) {
                             return e.kind != qcowmap::ExtentKind::zero;
                         })) {
        stored_in_first_half += e.length;
    }
    if (part.error()) {
        std::fprintf(stderr, "%s: %s\n", argv[1], part.error()->message.c_str());
        return 1;
    }

    // read() copies any range, whatever backs it.
    std::vector<std::byte> buffer(4096);
    auto copied = image->read(buffer, 0);
    if (!copied) {
        std::fprintf(stderr, "%s: %s\n", argv[1], copied.error().message.c_str());
        return 1;
    }
    std::printf("%llu data bytes mapped; %llu stored bytes in the first half; read %zu bytes at "
                "offset 0\n",
                static_cast<unsigned long long>(data_bytes),
                static_cast<unsigned long long>(stored_in_first_half), *copied);

    // A loop that reads every byte: runs() steps through the disk with its bytes produced
    // ahead of the loop on worker threads (read with pread, or mapped pages made present,
    // whichever is cheaper here), compressed clusters decompressed. A run's bytes live until
    // the next step; zero runs have none.
    qcowmap::VisitOptions ahead;
    ahead.threads = 2;
    ahead.data_access = qcowmap::DataAccess::automatic;
    ahead.prefetch = qcowmap::Prefetch::touch;
    auto runs = image->runs(0, image->size(), ahead);
    std::uint64_t byte_sum = 0;
    for (const qcowmap::Run& run : runs) {
        for (std::byte b : run.bytes)
            byte_sum += static_cast<unsigned char>(b);
    }
    if (runs.error()) {
        std::fprintf(stderr, "%s: %s\n", argv[1], runs.error()->message.c_str());
        return 1;
    }
    std::printf("byte sum of the disk %llu\n", static_cast<unsigned long long>(byte_sum));
    return 0;
}

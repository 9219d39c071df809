// README "Writing in place": create an image, write into it, read back, close.
// usage: write_in_place IMAGE
#include <qcowmap/writable.hpp>

#include <cstdio>
#include <vector>

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s IMAGE\n", argv[0]);
        return 2;
    }
    qcowmap::CreateOptions options; // qemu-img create -o, same names
    if (auto ok = qcowmap::parse_create_options("cluster_size=64k,extended_l2=on", options); !ok) {
        std::fprintf(stderr, "%s\n", ok.error().message.c_str());
        return 1;
    }
    if (auto ok = qcowmap::create(argv[1], 64ull << 20, options); !ok) {
        std::fprintf(stderr, "%s\n", ok.error().message.c_str());
        return 1;
    }
    auto image = qcowmap::WritableImage::open(argv[1]); // takes QEMU's image locks
    if (!image) {
        std::fprintf(stderr, "%s\n", image.error().message.c_str());
        return 1;
    }
    std::vector<std::byte> data(100000, std::byte{0xab});
    bool ok = image->write(1 << 20, data) &&               // allocates 2 clusters' subclusters
              image->write_zeroes(1 << 20, 4096, false) && // a zero subcluster
              image->discard(32 << 20, 32 << 20) && image->flush();
    std::vector<std::byte> back(8192);
    auto n = image->read(back, 1 << 20); // reads see every write, flushed or not
    ok = ok && n && back[0] == std::byte{0} && back[4096] == std::byte{0xab};
    auto closed = image->close(); // flush, store bitmaps, release the locks
    std::printf("%s: %s\n", argv[1], ok && closed ? "written" : "failed");
    return ok && closed ? 0 : 1;
}

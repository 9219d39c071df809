// Writes a full backup of a disk as qcow2, or an incremental one holding only the clusters a
// persistent dirty bitmap marks, on top of the previous backup. Compiled and run by the tests.
//
// usage: write_qcow2 SOURCE TARGET                    a full backup (flattened)
//        write_qcow2 SOURCE TARGET BACKING BITMAP     an incremental over BACKING
#include <qcowmap/image.hpp>
#include <qcowmap/writer.hpp>

#include <cstdio>

int main(int argc, char** argv) {
    if (argc != 3 && argc != 5) {
        std::fprintf(stderr, "usage: %s SOURCE TARGET [BACKING BITMAP]\n", argv[0]);
        return 2;
    }
    auto image = qcowmap::Image::open(argv[1]); // Result<Image>
    if (!image) {
        std::fprintf(stderr, "%s: %s\n", argv[1], image.error().message.c_str());
        return 1;
    }
    qcowmap::WriteOptions options; // 64 KiB clusters, v3
    options.compress = true;       // zlib, on every core
    if (argc == 5) {
        options.selection = qcowmap::WriteSelection::bitmap_dirty; // only the dirty clusters
        options.bitmap = argv[4];
        options.backing_file = argv[3]; // stored as given
        options.backing_format = "qcow2";
    }
    // Written under a temporary name and renamed into place once complete and synced.
    auto stats = qcowmap::write_qcow2_file(*image, argv[2], options);
    if (!stats) {
        std::fprintf(stderr, "%s\n", stats.error().message.c_str());
        return 1;
    }
    std::printf("%s: %llu bytes, %llu clusters compressed, %llu plain, %llu zero\n", argv[2],
                static_cast<unsigned long long>(stats->file_size),
                static_cast<unsigned long long>(stats->compressed_clusters),
                static_cast<unsigned long long>(stats->data_clusters),
                static_cast<unsigned long long>(stats->zero_clusters));
    return 0;
}

// The README's Boost.Iostreams example: the virtual disk as a std::istream, gzipped in one
// copy, plus a seek and a read.
//
//   gzip_disk IMAGE.qcow2 > disk.raw.gz
//
// Built out of tree against the installed library by the install test:
//   c++ -std=c++20 gzip_disk.cpp $(pkg-config --cflags --libs qcowmap) -lboost_iostreams
#include <qcowmap/stream.hpp>

#include <boost/iostreams/copy.hpp>
#include <boost/iostreams/filter/gzip.hpp>
#include <boost/iostreams/filtering_stream.hpp>
#include <boost/iostreams/stream.hpp>

#include <cstdio>
#include <iostream>

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s IMAGE.qcow2 > disk.raw.gz\n", argv[0]);
        return 2;
    }
    auto image = qcowmap::Image::open(argv[1]);
    if (!image) {
        std::fprintf(stderr, "%s: %s\n", argv[1], image.error().message.c_str());
        return 1;
    }

    namespace io = boost::iostreams;
    io::stream<qcowmap::Source> disk(*image); // a std::istream over the virtual disk

    // Random access like a file.
    disk.seekg(-512, std::ios_base::end);
    char last_sector[512];
    disk.read(last_sector, sizeof last_sector);
    std::fprintf(stderr, "size %lld, last sector starts with 0x%02x\n",
                 static_cast<long long>(disk.tellg()),
                 static_cast<unsigned>(static_cast<unsigned char>(last_sector[0])));

    // The whole disk through a gzip filter.
    disk.seekg(0);
    io::filtering_ostream gz;
    gz.push(io::gzip_compressor());
    gz.push(std::cout);
    try {
        io::copy(disk, gz); // a corrupt cluster throws std::ios_base::failure with our message
    } catch (const std::exception& e) {
        std::fprintf(stderr, "%s: %s\n", argv[1], e.what());
        return 1;
    }
    return 0;
}

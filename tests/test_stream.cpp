// The Boost.Iostreams device (qcowmap/stream.hpp): a std::istream over the virtual disk must
// give exactly qemu-img convert -O raw's bytes, seek and tell like a file, work with
// boost::iostreams::copy and filters (gzip round trip), and turn library errors into badbit.
#include "support.hpp"

#include <qcowmap/stream.hpp>

#include <boost/iostreams/copy.hpp>
#include <boost/iostreams/device/back_inserter.hpp>
#include <boost/iostreams/filter/gzip.hpp>
#include <boost/iostreams/filtering_stream.hpp>
#include <boost/iostreams/stream.hpp>

#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <limits>
#include <random>
#include <sstream>

namespace qcowmap {
namespace {

namespace io = boost::iostreams;
using test::TempDir;

std::string as_string(const std::vector<std::byte>& bytes) {
    return {reinterpret_cast<const char*>(bytes.data()), bytes.size()};
}

Image open_ok(const std::filesystem::path& path) {
    auto image = Image::open(path);
    EXPECT_TRUE(image) << (image ? "" : image.error().message);
    if (!image) {
        std::abort();
    }
    return std::move(*image);
}

class StreamTest : public ::testing::Test {
  protected:
    void SetUp() override {
        test::make_image(path_, "cluster_size=4096", "3000320",
                         {"write -P 0xab 0 10000", "write -z 20480 8192", "write -P 0x17 65536 1M",
                          "write -P 0xee 2999000 1000"});
        raw_ = as_string(test::qemu_raw(path_, dir_));
        ASSERT_EQ(raw_.size(), 3000320u); // a multiple of 512
    }
    TempDir dir_;
    std::filesystem::path path_ = dir_ / "disk.qcow2";
    std::string raw_;
};

TEST_F(StreamTest, WholeDiskEqualsQemuRaw) {
    io::stream<Source> in(open_ok(path_));
    std::ostringstream out;
    out << in.rdbuf();
    EXPECT_EQ(out.str().size(), raw_.size());
    EXPECT_TRUE(out.str() == raw_);
}

TEST_F(StreamTest, CopyWithSmallAndLargeBuffers) {
    for (std::streamsize buffer :
         {std::streamsize{1}, std::streamsize{511}, std::streamsize{1 << 20}}) {
        io::stream<Source> in(Source(open_ok(path_)), buffer);
        std::string out;
        const std::streamsize copied = io::copy(in, io::back_inserter(out));
        EXPECT_EQ(copied, static_cast<std::streamsize>(raw_.size())) << "buffer " << buffer;
        EXPECT_TRUE(out == raw_) << "buffer " << buffer;
    }
}

TEST_F(StreamTest, SeekgTellgAndRandomReads) {
    io::stream<Source> in(open_ok(path_));
    std::mt19937_64 rng(8);
    std::vector<char> buffer(70000);
    for (int i = 0; i < 200; ++i) {
        const std::uint64_t offset = rng() % raw_.size();
        const std::size_t length = rng() % buffer.size();
        in.clear();
        in.seekg(static_cast<std::streamoff>(offset));
        ASSERT_TRUE(in) << offset;
        ASSERT_EQ(static_cast<std::uint64_t>(in.tellg()), offset);
        in.read(buffer.data(), static_cast<std::streamsize>(length));
        const std::size_t expect = std::min<std::size_t>(length, raw_.size() - offset);
        ASSERT_EQ(static_cast<std::size_t>(in.gcount()), expect) << offset << "+" << length;
        ASSERT_EQ(std::memcmp(buffer.data(), raw_.data() + offset, expect), 0)
            << offset << "+" << length;
        if (expect == length) {
            EXPECT_EQ(static_cast<std::uint64_t>(in.tellg()), offset + length);
        } else {
            EXPECT_TRUE(in.eof()); // read past the end: eof + fail, like a file
        }
    }
}

TEST_F(StreamTest, SeekRelativeToCurrentAndEnd) {
    io::stream<Source> in(open_ok(path_));
    in.seekg(-1000, std::ios_base::end);
    EXPECT_EQ(static_cast<std::uint64_t>(in.tellg()), raw_.size() - 1000);
    char c = 0;
    in.get(c);
    EXPECT_EQ(static_cast<unsigned char>(c), 0xee);
    in.seekg(65536 - static_cast<std::streamoff>(raw_.size() - 999), std::ios_base::cur);
    EXPECT_EQ(static_cast<std::uint64_t>(in.tellg()), 65536u);
    in.get(c);
    EXPECT_EQ(c, 0x17);
    in.seekg(0, std::ios_base::end);
    EXPECT_EQ(static_cast<std::uint64_t>(in.tellg()), raw_.size());
    EXPECT_EQ(in.get(), std::char_traits<char>::eof()); // at the end: end of stream, no error
    EXPECT_TRUE(in.eof());
    EXPECT_FALSE(in.bad());
}

TEST_F(StreamTest, SeekOutsideTheDiskFails) {
    io::stream<Source> in(open_ok(path_));
    in.seekg(10);
    in.seekg(-11, std::ios_base::cur);
    EXPECT_TRUE(in.fail());
    in.clear();
    in.seekg(static_cast<std::streamoff>(raw_.size() + 1));
    EXPECT_TRUE(in.fail());
    in.clear();
    in.seekg(1, std::ios_base::end);
    EXPECT_TRUE(in.fail());

    // The device itself says why.
    Source source(open_ok(path_));
    try {
        source.seek(static_cast<io::stream_offset>(raw_.size() + 1), std::ios_base::beg);
        FAIL() << "no exception";
    } catch (const std::ios_base::failure& e) {
        EXPECT_NE(std::string(e.what()).find("past the end of the disk (3000320 bytes)"),
                  std::string::npos)
            << e.what();
    }
    EXPECT_EQ(source.seek(0, std::ios_base::cur), std::streampos(0)); // position unchanged
    EXPECT_THROW(source.seek(std::numeric_limits<io::stream_offset>::min(), std::ios_base::end),
                 std::ios_base::failure);
    EXPECT_EQ(source.seek(-1, std::ios_base::end), std::streampos(3000319));
}

TEST_F(StreamTest, GzipFilterRoundTrip) {
    // Gzip the virtual disk in one line, then gunzip it and compare.
    std::string compressed;
    {
        io::filtering_ostream gz;
        gz.push(io::gzip_compressor());
        gz.push(io::back_inserter(compressed));
        io::stream<Source> in(open_ok(path_));
        io::copy(in, gz);
    }
    EXPECT_LT(compressed.size(), raw_.size() / 10);
    io::filtering_istream gunzip;
    gunzip.push(io::gzip_decompressor());
    gunzip.push(io::array_source(compressed.data(), compressed.size()));
    std::string back;
    io::copy(gunzip, io::back_inserter(back));
    EXPECT_TRUE(back == raw_);

    // And the same through the system's gunzip, for an independent check.
    {
        std::ofstream f(dir_ / "disk.raw.gz", std::ios::binary);
        f.write(compressed.data(), static_cast<std::streamsize>(compressed.size()));
    }
    test::run_ok("gunzip -f " + test::shell_quote((dir_ / "disk.raw.gz").string()));
    EXPECT_TRUE(as_string(test::read_file(dir_ / "disk.raw")) == raw_);
}

TEST(Stream, CompressedAndBackingImages) {
    TempDir dir;
    test::make_image(dir / "base.qcow2", "", "4M", {"write -P 0x42 0 4M"});
    test::run_ok("cd " + test::shell_quote(dir.path().string()) +
                 " && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 && "
                 "qemu-io -f qcow2 -c 'write -P 0x24 1M 64k' top.qcow2 >/dev/null && "
                 "qemu-img convert -c -O qcow2 top.qcow2 zip.qcow2");
    for (const char* name : {"top.qcow2", "zip.qcow2"}) {
        const std::string raw = as_string(test::qemu_raw(dir / name, dir));
        io::stream<Source> in(open_ok(dir / name));
        std::string out;
        io::copy(in, io::back_inserter(out));
        EXPECT_TRUE(out == raw) << name;
    }
}

TEST(Stream, CorruptClusterSetsBadbit) {
    TempDir dir;
    auto path = dir / "bad.qcow2";
    test::make_image(path, "", "1M", {"write -P 0x77 0 128k"});
    // Point the L2 entry of cluster 1 past the end of the file.
    test::point_cluster_past_eof(path, 1);

    io::stream<Source> in(open_ok(path));
    std::vector<char> buffer(65536);
    in.read(buffer.data(), 65536);
    EXPECT_TRUE(in);
    EXPECT_EQ(buffer[0], 0x77);
    in.read(buffer.data(), 4096);
    EXPECT_TRUE(in.bad());

    io::stream<Source> throwing(open_ok(path));
    throwing.exceptions(std::ios_base::badbit);
    throwing.seekg(65536);
    try {
        throwing.read(buffer.data(), 10);
        FAIL() << "no exception";
    } catch (const std::ios_base::failure& e) {
        EXPECT_NE(std::string(e.what()).find("0x40000000000"), std::string::npos) << e.what();
    }
}

} // namespace
} // namespace qcowmap

// White-box and API unit tests: the bounds check, big-endian loads, Result, and the promises of
// the public API (zero-copy spans, ranges, read semantics, compressed clusters).
#include "bytes.hpp"
#include "image_state.hpp"
#include "qcow2_format.hpp"
#include "refcount.hpp"
#include "support.hpp"
#include "sys_io.hpp"
#include "writable_io.hpp"

#include <qcowmap/image.hpp>
#include <qcowmap/map.hpp>

#include <gtest/gtest.h>

#include <array>
#include <cerrno>
#include <vector>

#include <fcntl.h>
#include <unistd.h>

namespace qcowmap {
namespace {

using detail::fits;
using detail::load_be16;
using detail::load_be32;
using detail::load_be64;
using detail::slice;
using test::TempDir;

TEST(Bounds, FitsHandlesEdgesWithoutOverflow) {
    EXPECT_TRUE(fits(100, 0, 100));
    EXPECT_TRUE(fits(100, 100, 0));
    EXPECT_FALSE(fits(100, 100, 1));
    EXPECT_FALSE(fits(100, 101, 0));
    EXPECT_FALSE(fits(100, 99, 2));
    // offset + length would wrap around to a small number.
    EXPECT_FALSE(fits(100, UINT64_MAX, 2));
    EXPECT_FALSE(fits(100, 2, UINT64_MAX));
    EXPECT_FALSE(fits(UINT64_MAX, UINT64_MAX - 1, 2));
    EXPECT_TRUE(fits(UINT64_MAX, UINT64_MAX - 1, 1));
}

TEST(Bounds, SliceNamesWhatAndWhere) {
    std::array<std::byte, 16> buffer{};
    auto ok = slice(buffer, 4, 8, "thing");
    ASSERT_TRUE(ok);
    EXPECT_EQ(ok->data(), buffer.data() + 4);
    EXPECT_EQ(ok->size(), 8u);
    auto bad = slice(buffer, 12, 0x10, "L2 table");
    ASSERT_FALSE(bad);
    EXPECT_EQ(bad.error().code, ErrorCode::invalid_table);
    EXPECT_EQ(bad.error().message, "L2 table at 0xc (+0x10) lies beyond end of file (0x10)");
}

TEST(BigEndian, LoadsByShifts) {
    const std::array<std::byte, 8> b = {std::byte{0x01}, std::byte{0x23}, std::byte{0x45},
                                        std::byte{0x67}, std::byte{0x89}, std::byte{0xab},
                                        std::byte{0xcd}, std::byte{0xef}};
    EXPECT_EQ(load_be16(b.data()), 0x0123u);
    EXPECT_EQ(load_be32(b.data()), 0x01234567u);
    EXPECT_EQ(load_be64(b.data()), 0x0123456789abcdefull);
    EXPECT_EQ(load_be32(std::span<const std::byte>(b), 4), 0x89abcdefu);
}

// The one format definition: each encoder is read back by its decoder.
TEST(Format, HeaderEncodesAndDecodesAtTheSpecOffsets) {
    detail::DiskHeader h;
    h.backing_file_offset = 0x1a0;
    h.backing_file_size = 11;
    h.cluster_bits = 16;
    h.size = 0x123456789;
    h.l1_size = 3;
    h.l1_table_offset = 0x30000;
    h.refcount_table_offset = 0x10000;
    h.refcount_table_clusters = 1;
    h.incompatible_features = kIncompatExtendedL2;
    h.refcount_order = 5;
    h.compression_type = 1;
    std::array<std::byte, detail::kV3HeaderLength> bytes{};
    detail::encode_header(h, bytes.data());
    EXPECT_EQ(load_be32(bytes.data()), 0x514649fbu);       // "QFI\xfb"
    EXPECT_EQ(load_be64(bytes.data() + 24), 0x123456789u); // spec: size at byte 24
    EXPECT_EQ(load_be32(bytes.data() + 96), 5u);           // refcount_order at 96
    EXPECT_EQ(std::to_integer<unsigned>(bytes[104]), 1u);  // compression type at 104
    const detail::DiskHeader back = detail::decode_header(bytes);
    EXPECT_EQ(back.version, 3u);
    EXPECT_EQ(back.backing_file_offset, h.backing_file_offset);
    EXPECT_EQ(back.backing_file_size, h.backing_file_size);
    EXPECT_EQ(back.size, h.size);
    EXPECT_EQ(back.l1_table_offset, h.l1_table_offset);
    EXPECT_EQ(back.refcount_table_offset, h.refcount_table_offset);
    EXPECT_EQ(back.incompatible_features, h.incompatible_features);
    EXPECT_EQ(back.refcount_order, h.refcount_order);
    EXPECT_EQ(back.header_length, detail::kV3HeaderLength);
    EXPECT_EQ(back.compression_type, 1u);
}

TEST(Format, L2EntriesAndCompressedDescriptorsRoundTrip) {
    for (bool extended : {false, true}) {
        std::array<std::byte, 16> p{};
        detail::encode_l2(p.data(), detail::L2Entry::data(0x50000), extended);
        auto e = detail::decode_l2(p.data(), extended);
        EXPECT_EQ(detail::cluster_type(e, extended, false), detail::ClusterType::normal);
        EXPECT_EQ(e.host_offset(), 0x50000u);
        EXPECT_TRUE(e.copied());
        detail::encode_l2(p.data(), detail::L2Entry::zero(extended), extended);
        e = detail::decode_l2(p.data(), extended);
        if (extended) {
            EXPECT_EQ(e.zero_subclusters(), 0xffffffffu);
            EXPECT_EQ(e.allocated_subclusters(), 0u);
        } else {
            EXPECT_EQ(detail::cluster_type(e, false, false), detail::ClusterType::zero_plain);
        }
    }
    for (unsigned cluster_bits : {9u, 16u, 21u}) {
        const auto layout = detail::CompressedLayout::for_v2(cluster_bits);
        const std::uint64_t host = 0x12345678 + 3; // inside a sector
        // A stream is shorter than its cluster (qemu stores it uncompressed otherwise).
        const std::uint64_t size =
            std::min<std::uint64_t>(1000, (std::uint64_t{1} << cluster_bits) - 1);
        const auto entry =
            detail::L2Entry::compressed_cluster(detail::encode_compressed(layout, host, size));
        EXPECT_TRUE(entry.compressed());
        EXPECT_FALSE(entry.copied());
        const auto d = detail::decode_compressed(entry.raw, layout);
        EXPECT_EQ(d.host_offset, host);
        // Whole sectors from the first byte: covers the stream, ends on a sector boundary.
        EXPECT_GE(d.size, size);
        EXPECT_EQ((d.host_offset + d.size) % 512, 0u);
        EXPECT_LT(d.size - size, 512u);
    }
}

TEST(Format, RefcountEntriesOfEveryOrder) {
    for (unsigned order = 0; order <= detail::kMaxRefcountOrder; ++order) {
        SCOPED_TRACE(order);
        const detail::RefcountGeometry g{16, order};
        EXPECT_EQ(g.entries_per_block(), (std::uint64_t{65536} * 8) >> order);
        EXPECT_EQ(g.table_index(g.entries_per_block() + 5), 1u);
        EXPECT_EQ(g.block_index(g.entries_per_block() + 5), 5u);
        EXPECT_EQ(g.blocks_for(g.entries_per_block() + 1), 2u);
        std::vector<std::byte> block(65536);
        const std::uint64_t max = g.max_refcount();
        for (std::uint64_t i : {0u, 1u, 7u, 100u}) {
            detail::set_refcount_entry(block.data(), i, i == 7 ? max : i, order);
        }
        EXPECT_EQ(detail::refcount_entry(block.data(), 7, order), max);
        EXPECT_EQ(detail::refcount_entry(block.data(), 1, order), 1u & max);
        EXPECT_EQ(detail::refcount_entry(block.data(), 100, order), 100 & max);
        EXPECT_EQ(detail::refcount_entry(block.data(), 2, order), 0u); // neighbours untouched
    }
}

TEST(Errors, OneErrnoMapping) {
    Error e{ErrorCode::invalid_table, "x"};
    EXPECT_EQ(to_errno(e), EIO);
    e.code = ErrorCode::unsupported_feature;
    EXPECT_EQ(to_errno(e), ENOTSUP);
    e.code = ErrorCode::invalid_header;
    EXPECT_EQ(to_errno(e), EINVAL);
    e.code = ErrorCode::io_error;
    e.system_errno = ENOSPC;
    EXPECT_EQ(to_errno(e), EIO); // a source file that cannot be read
    e.origin = ErrorOrigin::target;
    EXPECT_EQ(to_errno(e), ENOSPC); // the output's own errno
    e.refusal = Refusal::out_of_memory;
    EXPECT_EQ(to_errno(e), ENOMEM);
    EXPECT_EQ(to_string(ErrorOrigin::data_file), "data_file");
    EXPECT_EQ(to_string(Refusal::backing_chain_loop), "backing_chain_loop");
    e = Error{ErrorCode::image_in_use, "x"};
    EXPECT_EQ(to_errno(e), EAGAIN);
    e.code = ErrorCode::image_changed;
    EXPECT_EQ(to_errno(e), EIO);
    EXPECT_EQ(to_string(ErrorCode::image_changed), "image_changed");
}

// sys_io.hpp: the one retry loop. A fake system call shows what is retried and what is not.
TEST(SysIo, RetryEintrRetriesOnlyEintr) {
    int calls = 0;
    auto interrupted_twice = [&]() -> int {
        if (++calls <= 2) {
            errno = EINTR;
            return -1;
        }
        return 7;
    };
    EXPECT_EQ(detail::retry_eintr(interrupted_twice), 7);
    EXPECT_EQ(calls, 3);
    calls = 0;
    auto fails = [&]() -> int {
        ++calls;
        errno = EBADF;
        return -1;
    };
    EXPECT_EQ(detail::retry_eintr(fails), -1);
    EXPECT_EQ(errno, EBADF);
    EXPECT_EQ(calls, 1);
}

TEST(SysIo, TransferContinuesShortCallsCapsChunksAndStops) {
    // Moves at most 3 bytes a call, interrupted every other call.
    std::vector<std::pair<std::uint64_t, std::size_t>> asked;
    int calls = 0;
    auto short_moves = [&](std::uint64_t done, std::size_t want) -> ssize_t {
        if (++calls % 2 == 0) {
            errno = EINTR;
            return -1;
        }
        asked.emplace_back(done, want);
        return static_cast<ssize_t>(std::min<std::size_t>(want, 3));
    };
    detail::Transfer t = detail::transfer_all(10, 4, short_moves);
    EXPECT_EQ(t.done, 10u);
    EXPECT_EQ(t.error, 0);
    const std::vector<std::pair<std::uint64_t, std::size_t>> expected = {
        {0, 4}, {3, 4}, {6, 4}, {9, 1}};
    EXPECT_EQ(asked, expected);
    // A call that moves nothing ends it (the end of a file): error 0, EIO by transfer_errno.
    t = detail::transfer_all(10, detail::kUncapped, [](std::uint64_t done, std::size_t) -> ssize_t {
        return done ? 0 : 6;
    });
    EXPECT_EQ(t.done, 6u);
    EXPECT_EQ(t.error, 0);
    EXPECT_EQ(detail::transfer_errno(t), EIO);
    // An error ends it with its errno.
    t = detail::transfer_all(10, detail::kUncapped, [](std::uint64_t done, std::size_t) -> ssize_t {
        if (done == 0)
            return 2;
        errno = ENOSPC;
        return -1;
    });
    EXPECT_EQ(t.done, 2u);
    EXPECT_EQ(t.error, ENOSPC);
    EXPECT_EQ(detail::transfer_errno(t), ENOSPC);
}

TEST(SysIo, RealCallsGiveTheirErrno) {
    TempDir dir;
    const auto path = dir / "file";
    test::write_file(path, std::vector<std::byte>(100, std::byte{0x5a}));
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    ASSERT_GE(fd, 0);
    std::vector<std::byte> buffer(300);
    detail::Transfer t = detail::pread_full(fd, buffer.data(), buffer.size(), 40);
    EXPECT_EQ(t.done, 60u); // the end of the file
    EXPECT_EQ(t.error, 0);
    EXPECT_EQ(buffer[59], std::byte{0x5a});
    // Writing a descriptor opened read-only: EBADF, kept.
    errno = 0;
    EXPECT_FALSE(detail::pwrite_all(fd, buffer.data(), 10, 0));
    EXPECT_EQ(errno, EBADF);
    ::close(fd);
    const int full = ::open("/dev/full", O_WRONLY | O_CLOEXEC);
    ASSERT_GE(full, 0);
    errno = 0;
    EXPECT_FALSE(detail::write_all(full, buffer.data(), buffer.size()));
    EXPECT_EQ(errno, ENOSPC);
    // The in-place writer's file: the errno travels in the error.
    detail::FileIo io(full, "/dev/full");
    auto written = io.pwrite(buffer, 0);
    ASSERT_FALSE(written);
    EXPECT_EQ(written.error().code, ErrorCode::io_error);
    EXPECT_EQ(written.error().system_errno, ENOSPC);
    EXPECT_EQ(written.error().message, "cannot write /dev/full: No space left on device");
    EXPECT_EQ(to_errno(written.error()), EIO); // not the output of an export: EIO
    // A read of a directory: EISDIR, with the offset in the message.
    const int directory = ::open(dir.path().c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    ASSERT_GE(directory, 0);
    auto read = detail::read_exactly(FilePosition{directory, 4096}, std::span(buffer).first(16));
    ::close(directory);
    ASSERT_FALSE(read);
    EXPECT_EQ(read.error().code, ErrorCode::io_error);
    EXPECT_EQ(read.error().system_errno, EISDIR);
    EXPECT_EQ(read.error().message, "cannot read 16 bytes at file offset 0x1000: Is a directory");
}

TEST(ResultType, CarriesValueOrError) {
    Result<int> good = 42;
    ASSERT_TRUE(good);
    EXPECT_EQ(*good, 42);
    Result<int> bad = Error{ErrorCode::out_of_range, "too far"};
    ASSERT_FALSE(bad);
    EXPECT_EQ(bad.error().code, ErrorCode::out_of_range);
    EXPECT_EQ(bad.error().message, "too far");
    Result<void> done;
    EXPECT_TRUE(done);
    Result<void> failed = Error{ErrorCode::io_error, "x"};
    EXPECT_FALSE(failed);
    EXPECT_EQ(to_string(ErrorCode::invalid_cluster), "invalid_cluster");
}

class SampleImage : public ::testing::Test {
  protected:
    void SetUp() override {
        path_ = dir_ / "sample.qcow2";
        test::make_image(path_, "cluster_size=4k", "1M",
                         {"write -P 0xab 4k 12k", "write -P 0xcd 100k 5000", "write -z 200k 8k",
                          "write -P 0x11 1020k 4k"});
        auto image = Image::open(path_);
        ASSERT_TRUE(image) << image.error().message;
        image_.emplace(std::move(*image));
        raw_ = test::qemu_raw(path_, dir_);
        ASSERT_EQ(raw_.size(), image_->size());
    }
    TempDir dir_;
    std::filesystem::path path_;
    std::optional<Image> image_;
    std::vector<std::byte> raw_;
};

TEST_F(SampleImage, DataExtentsPointIntoTheMapping) {
    auto file = image_->file_bytes();
    ExtentRange it = image_->extents();
    int data_extents = 0;
    for (const Extent& e : it) {
        if (e.kind != ExtentKind::data) {
            EXPECT_TRUE(e.bytes.empty());
            continue;
        }
        ++data_extents;
        ASSERT_TRUE(e.host_offset);
        EXPECT_EQ(e.bytes.size(), e.length);
        // The span is the mapping itself at the host offset: no copy was made.
        EXPECT_EQ(e.bytes.data(), file.data() + *e.host_offset);
        EXPECT_GE(e.bytes.data(), file.data());
        EXPECT_LE(e.bytes.data() + e.bytes.size(), file.data() + file.size());
        EXPECT_EQ(0, std::memcmp(e.bytes.data(), raw_.data() + e.offset, e.length));
    }
    EXPECT_FALSE(it.error().has_value());
    EXPECT_GE(data_extents, 3);
}

TEST_F(SampleImage, ExtentsCoverTheRangeInOrder) {
    for (auto [start, end] :
         std::vector<std::pair<std::uint64_t, std::uint64_t>>{{0, UINT64_MAX},
                                                              {4097, 4099},
                                                              {5000, 110000},
                                                              {1000000, 1048576},
                                                              {1048576, 2000000}}) {
        ExtentRange it = image_->extents(start, end);
        std::uint64_t expected = start;
        Extent previous;
        bool first = true;
        for (const Extent& e : it) {
            EXPECT_EQ(e.offset, expected);
            EXPECT_GT(e.length, 0u);
            if (!first && previous.kind == e.kind && e.kind == ExtentKind::data) {
                // Adjacent data extents exist only where the host side is not contiguous.
                EXPECT_NE(*previous.host_offset + previous.length, *e.host_offset);
            }
            expected += e.length;
            previous = e;
            first = false;
        }
        EXPECT_FALSE(it.error().has_value());
        EXPECT_EQ(expected, std::max(start, std::min<std::uint64_t>(end, image_->size())));
    }
}

TEST_F(SampleImage, UnalignedStartAdjustsHostOffset) {
    ExtentRange it = image_->extents(4096 + 100, 4096 + 200);
    Extent e;
    ASSERT_TRUE(it.next(e));
    EXPECT_EQ(e.kind, ExtentKind::data);
    EXPECT_EQ(e.offset, 4196u);
    EXPECT_EQ(e.length, 100u);
    EXPECT_EQ(std::to_integer<int>(e.bytes[0]), 0xab);
    EXPECT_FALSE(it.next(e));
    EXPECT_FALSE(it.error().has_value());
}

TEST_F(SampleImage, ReadSemantics) {
    std::vector<std::byte> buffer(10000);
    auto n = image_->read(buffer, 4000);
    ASSERT_TRUE(n);
    EXPECT_EQ(*n, 10000u);
    EXPECT_EQ(0, std::memcmp(buffer.data(), raw_.data() + 4000, 10000));
    // Short only at the end of the disk.
    n = image_->read(buffer, image_->size() - 10);
    ASSERT_TRUE(n);
    EXPECT_EQ(*n, 10u);
    EXPECT_EQ(0, std::memcmp(buffer.data(), raw_.data() + raw_.size() - 10, 10));
    n = image_->read(buffer, image_->size());
    ASSERT_TRUE(n);
    EXPECT_EQ(*n, 0u);
    n = image_->read(buffer, image_->size() + 1);
    ASSERT_FALSE(n);
    EXPECT_EQ(n.error().code, ErrorCode::out_of_range);
    EXPECT_NE(n.error().message.find("0x100001"), std::string::npos) << n.error().message;
}

TEST_F(SampleImage, VisitReproducesTheDisk) {
    std::vector<std::byte> rebuilt(image_->size(), std::byte{0x5a});
    std::uint64_t expected = 0;
    auto ok = image_->visit(0, UINT64_MAX, [&](const qcowmap::Run& run) {
        const std::uint64_t offset = run.offset;
        const std::uint64_t length = run.length;
        const std::span<const std::byte> bytes = run.bytes;
        EXPECT_EQ(offset, expected);
        expected += length;
        if (bytes.empty()) {
            std::fill_n(rebuilt.begin() + static_cast<std::ptrdiff_t>(offset), length,
                        std::byte{0});
        } else {
            EXPECT_EQ(bytes.size(), length);
            std::copy(bytes.begin(), bytes.end(),
                      rebuilt.begin() + static_cast<std::ptrdiff_t>(offset));
        }
        return Result<void>{};
    });
    ASSERT_TRUE(ok) << ok.error().message;
    EXPECT_EQ(expected, image_->size());
    EXPECT_TRUE(rebuilt == raw_);
}

TEST_F(SampleImage, VisitorErrorStopsTheWalk) {
    int calls = 0;
    auto ok = image_->visit(0, UINT64_MAX, [&](const qcowmap::Run&) {
        ++calls;
        return Result<void>{Error{ErrorCode::io_error, "stop here"}};
    });
    ASSERT_FALSE(ok);
    EXPECT_EQ(ok.error().message, "stop here");
    EXPECT_EQ(calls, 1);
}

TEST_F(SampleImage, ImageCopiesShareTheMapping) {
    Image copy = *image_;
    EXPECT_EQ(copy.file_bytes().data(), image_->file_bytes().data());
    ExtentRange it = copy.extents();
    image_.reset(); // the range and the copy keep the mapping alive
    std::uint64_t covered = 0;
    for (const Extent& e : it)
        covered += e.length;
    EXPECT_EQ(covered, copy.size());
}

TEST_F(SampleImage, RefcountsOfHeaderAndDataClusters) {
    auto header = refcount_of(*image_, 0);
    ASSERT_TRUE(header) << header.error().message;
    EXPECT_EQ(*header, 1u);
    auto beyond = refcount_of(*image_, 1u << 30);
    ASSERT_TRUE(beyond);
    EXPECT_EQ(*beyond, 0u);
    EXPECT_FALSE(looks_metadata_preallocated(*image_));
}

struct CompressedCase {
    const char* name;
    const char* options;
};

class Compressed : public ::testing::TestWithParam<CompressedCase> {};

TEST_P(Compressed, ReadsAndExtentsMatchQemu) {
    TempDir dir;
    auto path = dir / "c.qcow2";
    test::make_image(path, GetParam().options, "1M",
                     // qemu refuses compressed writes over allocated clusters: compress first.
                     {"write -c -P 0x33 64k 64k", "write -c -P 0x44 256k 64k",
                      "write -P 0x22 0 64k", "write -P 0x23 128k 128k", "write -z 512k 64k",
                      "discard 768k 64k"});
    auto image = Image::open(path);
    ASSERT_TRUE(image) << image.error().message;
    auto raw = test::qemu_raw(path, dir);
    int compressed = 0;
    ExtentRange it = image->extents();
    Decompressor decompressor;
    for (const Extent& e : it) {
        if (e.kind != ExtentKind::compressed)
            continue;
        ++compressed;
        EXPECT_FALSE(e.host_offset);
        EXPECT_FALSE(e.bytes.empty());
        EXPECT_EQ(e.bytes.data(), image->file_bytes().data() + e.compressed_host_offset);
        auto bytes = decompressor.decompress(*image, e);
        ASSERT_TRUE(bytes) << bytes.error().message;
        EXPECT_EQ(0, std::memcmp(bytes->data(), raw.data() + e.offset, e.length));
    }
    EXPECT_FALSE(it.error().has_value());
    EXPECT_GE(compressed, 2);
    std::vector<std::byte> all(image->size());
    auto n = image->read(all, 0);
    ASSERT_TRUE(n) << n.error().message;
    EXPECT_TRUE(all == raw);
    // Unaligned reads inside and across compressed clusters.
    std::vector<std::byte> part(70000);
    ASSERT_TRUE(image->read(part, 64 * 1024 + 333));
    EXPECT_EQ(0, std::memcmp(part.data(), raw.data() + 64 * 1024 + 333, part.size()));
}

INSTANTIATE_TEST_SUITE_P(Types, Compressed,
                         ::testing::Values(CompressedCase{"zlib", "cluster_size=64k"},
                                           CompressedCase{"zstd",
                                                          "cluster_size=64k,compression_type=zstd"},
                                           CompressedCase{"zlib4k", "cluster_size=4k"}),
                         [](const auto& info) { return std::string(info.param.name); });

} // namespace
} // namespace qcowmap

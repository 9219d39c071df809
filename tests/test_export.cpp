// Library work that used to live in the CLI:
// the raw export engine, the dirty-range map and copy, the map's File column, format probing,
// header extension names, the info JSON and the data file status, progress callbacks.
#include "support.hpp"

#include <qcowmap/bitmap.hpp>
#include <qcowmap/compare.hpp>
#include <qcowmap/describe.hpp>
#include <qcowmap/export.hpp>
#include <qcowmap/format.hpp>
#include <qcowmap/hash.hpp>
#include <qcowmap/map.hpp>

#include <gtest/gtest.h>

#include <fcntl.h>
#include <filesystem>
#include <string>
#include <sys/stat.h>
#include <thread>
#include <unistd.h>
#include <vector>

namespace qcowmap {
namespace {

using test::q;

using test::run_ok;
using test::shell_quote;
using test::TempDir;

Image open_ok(const std::filesystem::path& path, const OpenOptions& options = {}) {
    auto image = Image::open(path, options);
    EXPECT_TRUE(image) << image.error().message;
    return std::move(*image);
}

class Export : public ::testing::Test {
  protected:
    void SetUp() override {
        image_ = dir_ / "disk.qcow2";
        test::make_image(image_, "cluster_size=64k", "8M",
                         {"write -P 0xab 0 100k", "write -P 0 1M 64k", "write -P 0xcd 3M 1M",
                          "write -z 5M 1M", "write -c -P 0x5e 6M 256k"});
        raw_ = test::qemu_raw(image_, dir_);
    }
    TempDir dir_;
    std::filesystem::path image_;
    std::vector<std::byte> raw_;
};

/// Progress reports as seen by a callback: every (done, total) pair.
struct Recorder {
    std::vector<std::pair<std::uint64_t, std::uint64_t>> calls;
    std::function<void(std::uint64_t, std::uint64_t)> callback() {
        return [this](std::uint64_t done, std::uint64_t total) { calls.emplace_back(done, total); };
    }
    /// Starts at 0, never goes back, ends at `total`, and always says `total`.
    void expect_complete(std::uint64_t total) const {
        ASSERT_FALSE(calls.empty());
        EXPECT_EQ(calls.front().first, 0u);
        EXPECT_EQ(calls.back().first, total);
        for (std::size_t i = 0; i < calls.size(); ++i) {
            EXPECT_EQ(calls[i].second, total);
            if (i) {
                EXPECT_GE(calls[i].first, calls[i - 1].first);
            }
        }
    }
};

/// export_raw into a pipe, with a thread reading the other end into `received`.
Result<void> export_into_pipe(const Image& image, const ExportOptions& options,
                              std::vector<std::byte>& received) {
    int fds[2];
    if (::pipe(fds) != 0)
        return Error{ErrorCode::io_error, "pipe failed"};
    std::thread reader([&] {
        std::byte buffer[65536];
        for (ssize_t n; (n = ::read(fds[0], buffer, sizeof buffer)) > 0;)
            received.insert(received.end(), buffer, buffer + n);
    });
    auto ok = export_raw(image, fds[1], options);
    ::close(fds[1]);
    reader.join();
    ::close(fds[0]);
    return ok;
}

TEST_F(Export, RawToANewFileIsQemusBytesWithHoles) {
    const Image image = open_ok(image_);
    // Each data access (mapped data is made present ahead and dropped behind), on one thread
    // and on several.
    for (const auto& [access, threads] :
         std::vector<std::pair<DataAccess, unsigned>>{{DataAccess::automatic, 0},
                                                      {DataAccess::read, 1},
                                                      {DataAccess::read, 3},
                                                      {DataAccess::mapping, 1},
                                                      {DataAccess::mapping, 3}}) {
        for (std::uint64_t zero_block : {4096ull, 0ull}) {
            SCOPED_TRACE(testing::Message() << "zero block " << zero_block << ", access "
                                            << static_cast<int>(access) << ", threads " << threads);
            const auto out = dir_ / ("out-" + std::to_string(zero_block) + "-" +
                                     std::to_string(static_cast<int>(access)) + "-" +
                                     std::to_string(threads) + ".raw");
            int fd = ::open(out.c_str(), O_WRONLY | O_CREAT | O_EXCL, 0644);
            ASSERT_GE(fd, 0);
            Recorder progress;
            ExportOptions options;
            options.zero_block = zero_block;
            options.data_access = access;
            options.threads = threads;
            options.progress = progress.callback();
            auto ok = export_raw(image, fd, options);
            ASSERT_EQ(::close(fd), 0);
            ASSERT_TRUE(ok) << ok.error().message;
            EXPECT_TRUE(test::read_file(out) == raw_);
            progress.expect_complete(8u << 20);
            struct stat st {};
            ASSERT_EQ(::stat(out.c_str(), &st), 0);
            // Data: 100k + 1M + 256k; zero_block 0 is qemu-img's -S 0, a fully allocated file
            // (issue 25: the zero runs were holes).
            const std::uint64_t allocated = static_cast<std::uint64_t>(st.st_blocks) * 512;
            if (zero_block)
                EXPECT_LE(allocated, 1400u * 1024) << allocated;
            else
                EXPECT_GE(allocated, 8u << 20) << allocated;
        }
    }
}

TEST_F(Export, RawIntoAPipeIsSequentialWithZeros) {
    const Image image = open_ok(image_);
    for (DataAccess access : {DataAccess::automatic, DataAccess::read, DataAccess::mapping}) {
        SCOPED_TRACE(static_cast<int>(access));
        ExportOptions options;
        options.data_access = access;
        std::vector<std::byte> received;
        auto ok = export_into_pipe(image, options, received);
        ASSERT_TRUE(ok) << ok.error().message;
        EXPECT_TRUE(received == raw_);
    }
}

/// A part of the disk, written in order: into a pipe (where mapped data and zeros go by
/// vmsplice) and into a file with `sequential`; the bytes are qemu's, the progress counts the
/// part. Other targets refuse a part.
TEST_F(Export, PartOfTheDiskInOrder) {
    const Image image = open_ok(image_);
    // From inside the first data run to inside the compressed one: data, zeros, a zero run and
    // compressed clusters.
    const std::uint64_t start = 50 * 1024, end = (6u << 20) + 100 * 1024;
    const std::vector<std::byte> expected(raw_.begin() + start, raw_.begin() + end);
    for (DataAccess access : {DataAccess::read, DataAccess::mapping}) {
        for (unsigned threads : {1u, 3u}) {
            SCOPED_TRACE(testing::Message()
                         << "access " << static_cast<int>(access) << ", threads " << threads);
            Recorder progress;
            ExportOptions options;
            options.data_access = access;
            options.threads = threads;
            options.start = start;
            options.end = end;
            options.progress = progress.callback();
            std::vector<std::byte> received;
            auto ok = export_into_pipe(image, options, received);
            ASSERT_TRUE(ok) << ok.error().message;
            EXPECT_TRUE(received == expected);
            progress.expect_complete(end - start);

            const auto out = dir_ / "part.raw";
            int fd = ::open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
            ASSERT_GE(fd, 0);
            options.sequential = true;
            options.progress = nullptr;
            ok = export_raw(image, fd, options);
            ASSERT_EQ(::close(fd), 0);
            ASSERT_TRUE(ok) << ok.error().message;
            EXPECT_TRUE(test::read_file(out) == expected);
        }
    }
    // Past the end: nothing; a file written in place refuses a part.
    const auto out = dir_ / "refused.raw";
    int fd = ::open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ASSERT_GE(fd, 0);
    ExportOptions options;
    options.start = 4096;
    auto ok = export_raw(image, fd, options);
    ASSERT_FALSE(ok);
    EXPECT_EQ(ok.error().code, ErrorCode::invalid_argument);
    EXPECT_EQ(ok.error().origin, ErrorOrigin::target);
    options.sequential = true;
    options.start = 9u << 20;
    ok = export_raw(image, fd, options);
    ::close(fd);
    ASSERT_TRUE(ok) << ok.error().message;
    EXPECT_EQ(std::filesystem::file_size(out), 0u);
}

TEST_F(Export, RawRefusesTheImageItselfAndBadOptions) {
    const Image image = open_ok(image_);
    int fd = ::open(image_.c_str(), O_WRONLY);
    ASSERT_GE(fd, 0);
    const auto before = test::read_file(image_);
    auto ok = export_raw(image, fd, {});
    ::close(fd);
    ASSERT_FALSE(ok);
    EXPECT_EQ(ok.error().code, ErrorCode::invalid_argument);
    EXPECT_EQ(ok.error().message, "is the image being read (or one of its layers or its data "
                                  "file): refusing to overwrite it");
    EXPECT_EQ(ok.error().origin, ErrorOrigin::target);
    EXPECT_TRUE(test::read_file(image_) == before);

    fd = ::open((dir_ / "x.raw").c_str(), O_WRONLY | O_CREAT, 0644);
    ExportOptions options;
    options.zero_block = 1000;
    ok = export_raw(image, fd, options);
    ::close(fd);
    ASSERT_FALSE(ok);
    EXPECT_EQ(ok.error().code, ErrorCode::invalid_argument);
    EXPECT_EQ(ok.error().message, "zero block size 1000 is not a multiple of 512");
}

TEST_F(Export, AnImageErrorIsNotATargetError) {
    test::point_cluster_past_eof(image_, 3 * 16); // guest cluster at 3M
    const Image image = open_ok(image_);
    int fd = ::open((dir_ / "bad.raw").c_str(), O_WRONLY | O_CREAT, 0644);
    auto ok = export_raw(image, fd, {});
    ::close(fd);
    ASSERT_FALSE(ok);
    EXPECT_NE(ok.error().origin, ErrorOrigin::target);
    EXPECT_NE(ok.error().message.find("0x40000000000"), std::string::npos) << ok.error().message;
}

TEST_F(Export, DirtyRangesOntoACopy) {
    const auto copy = dir_ / "copy.raw";
    test::write_file(copy, raw_);
    run_ok("qemu-img bitmap --add " + q(image_) + " inc");
    run_ok("qemu-io -f qcow2 -c 'write -P 0x77 64k 64k' -c 'write -z 3M 128k' " + q(image_));
    const Image image = open_ok(image_);
    auto bitmap = DirtyBitmap::open(image, "inc");
    ASSERT_TRUE(bitmap) << bitmap.error().message;
    int fd = ::open(copy.c_str(), O_WRONLY);
    Recorder progress;
    ExportOptions options;
    options.progress = progress.callback();
    auto ok = export_dirty(image, *bitmap, fd, options);
    ::close(fd);
    ASSERT_TRUE(ok) << ok.error().message;
    EXPECT_TRUE(test::read_file(copy) == test::qemu_raw(image_, dir_));
    progress.expect_complete(bitmap->dirty_bytes());
    EXPECT_EQ(bitmap->dirty_bytes(), 192u * 1024);
    // A copy of another size is refused.
    test::write_file(dir_ / "short.raw", std::vector<std::byte>(4096));
    fd = ::open((dir_ / "short.raw").c_str(), O_WRONLY);
    ok = export_dirty(image, *bitmap, fd, {});
    ::close(fd);
    ASSERT_FALSE(ok);
    EXPECT_EQ(ok.error().origin, ErrorOrigin::target);
    EXPECT_EQ(ok.error().message, "is 4096 bytes but the disk is 8388608 bytes: an incremental "
                                  "update needs a copy of the same size");
}

TEST_F(Export, MapDirtyIsMapImageOfEachDirtyRange) {
    run_ok("qemu-img bitmap --add " + q(image_) + " b");
    run_ok("qemu-io -f qcow2 -c 'write -P 1 32k 64k' -c 'write -P 2 3100k 8k' -c 'write -z 5M "
           "64k' " +
           q(image_));
    const Image image = open_ok(image_);
    auto bitmap = DirtyBitmap::open(image, "b");
    ASSERT_TRUE(bitmap);
    for (const auto& [start, length] : std::vector<std::pair<std::uint64_t, std::uint64_t>>{
             {0, UINT64_MAX}, {40000, 3 << 20}, {5 << 20, 1}, {7 << 20, 1 << 20}}) {
        SCOPED_TRACE(start);
        std::vector<MapEntry> expected;
        auto ranges =
            bitmap->dirty_ranges(start, length > UINT64_MAX - start ? UINT64_MAX : start + length);
        for (const BitmapRange& r : ranges) {
            MapOptions one{r.offset, r.length};
            ASSERT_TRUE(map_image(image, one, [&](const MapEntry& e) -> Result<void> {
                expected.push_back(e);
                return {};
            }));
        }
        std::vector<MapEntry> got;
        auto ok = map_dirty(image, *bitmap, MapOptions{start, length},
                            [&](const MapEntry& e) -> Result<void> {
                                got.push_back(e);
                                return {};
                            });
        ASSERT_TRUE(ok) << ok.error().message;
        EXPECT_EQ(got, expected);
    }
    // A sink's error stops the walk and comes back.
    auto stopped = map_dirty(image, *bitmap, {}, [](const MapEntry&) -> Result<void> {
        return Error{ErrorCode::invalid_argument, "enough"};
    });
    ASSERT_FALSE(stopped);
    EXPECT_EQ(stopped.error().message, "enough");
}

TEST(MapFile, NamesTheFileHoldingEachLayersBytes) {
    TempDir dir;
    run_ok("cd " + q(dir.path()) +
           " && qemu-img create -q -f raw base.raw 1M && "
           "qemu-img create -q -f qcow2 -o data_file=mid.data -b base.raw "
           "-F raw mid.qcow2 && mkdir sub && qemu-img create -q -f qcow2 "
           "-b ../mid.qcow2 -F qcow2 sub/top.qcow2");
    const Image image = open_ok(dir / "sub/top.qcow2");
    EXPECT_EQ(map_file(image, 0), dir / "sub/top.qcow2");
    EXPECT_EQ(map_file(image, 1), dir / "sub/../mid.data");
    EXPECT_EQ(map_file(image, 2), dir / "sub/../base.raw");
    EXPECT_EQ(map_file(image, 3), std::filesystem::path());
    OpenOptions moved;
    moved.data_file = dir / "elsewhere.data";
    std::filesystem::copy(dir / "mid.data", dir / "elsewhere.data");
    EXPECT_EQ(map_file(open_ok(dir / "mid.qcow2", moved), 0), dir / "elsewhere.data");
}

TEST(Format, ProbesAndNamesExtensions) {
    TempDir dir;
    test::make_image(dir / "a.qcow2", "", "1M");
    run_ok("qemu-img create -q -f qcow " + q(dir / "v1.qcow") + " 1M");
    run_ok("qemu-img create -q -f raw " + q(dir / "a.raw") + " 1M");
    run_ok("truncate -s 0 " + q(dir / "empty"));
    EXPECT_EQ(*probe_format(dir / "a.qcow2"), "qcow2");
    EXPECT_EQ(*probe_format(dir / "v1.qcow"), "qcow2");
    EXPECT_EQ(*probe_format(dir / "a.raw"), "raw");
    EXPECT_EQ(*probe_format(dir / "empty"), "raw");
    auto missing = probe_format(dir / "missing");
    ASSERT_FALSE(missing);
    EXPECT_EQ(missing.error().code, ErrorCode::io_error);
    EXPECT_EQ(missing.error().message, (dir / "missing").string() + ": No such file or directory");
    EXPECT_EQ(header_extension_name(kExtensionBackingFormat), "backing file format");
    EXPECT_EQ(header_extension_name(kExtensionFeatureNames), "feature name table");
    EXPECT_EQ(header_extension_name(kExtensionBitmaps), "bitmaps");
    EXPECT_EQ(header_extension_name(kExtensionEncryption), "full disk encryption header");
    EXPECT_EQ(header_extension_name(kExtensionDataFile), "external data file");
    EXPECT_EQ(header_extension_name(0x12345678), "unknown (0x12345678)");
}

TEST(Describe, DataFileStatusAndInfoJson) {
    TempDir dir;
    run_ok("cd " + q(dir.path()) +
           " && qemu-img create -q -f qcow2 -o data_file=vm.data "
           "vm.qcow2 1M");
    std::filesystem::remove(dir / "vm.data");
    // Without the data file, open fails unless it is not required.
    auto strict = Image::open(dir / "vm.qcow2");
    ASSERT_FALSE(strict);
    EXPECT_EQ(strict.error().message,
              "data file " + (dir / "vm.data").string() + ": No such file or directory");
    OpenOptions lenient;
    lenient.require_data_file = false;
    const Image image = open_ok(dir / "vm.qcow2", lenient);
    auto status = data_file_status(image);
    ASSERT_TRUE(status);
    EXPECT_EQ(status->path, dir / "vm.data");
    EXPECT_FALSE(status->found());
    EXPECT_EQ(status->error->code, ErrorCode::io_error);
    const std::string json = info_json(image);
    EXPECT_NE(json.find("\"data-file\": \"vm.data\",\n"), std::string::npos) << json;
    EXPECT_NE(json.find("\"data-file-found\": false,\n"), std::string::npos) << json;
    EXPECT_NE(json.find("\"format-specific\": {\n        \"type\": \"qcow2\",\n"),
              std::string::npos)
        << json;
    EXPECT_NE(json.find("            \"data-file\": \"vm.data\",\n"
                        "            \"data-file-raw\": false,\n"),
              std::string::npos)
        << json;
    EXPECT_TRUE(json.starts_with("{\n    \"filename\": ")) << json;
    EXPECT_TRUE(json.ends_with("\n}")) << json;
    // Reading a data cluster of such an image fails instead of reading the image file.
    run_ok("cd " + q(dir.path()) +
           " && qemu-img create -q -f qcow2 -o data_file=w.data w.qcow2 "
           "1M && qemu-io -f qcow2 -c 'write -P 1 0 64k' w.qcow2");
    std::filesystem::remove(dir / "w.data");
    const Image without = open_ok(dir / "w.qcow2", lenient);
    std::vector<std::byte> buffer(4096);
    EXPECT_FALSE(without.read(buffer, 0));
    // An image without a data file has no status.
    test::make_image(dir / "plain.qcow2", "", "1M");
    EXPECT_FALSE(data_file_status(open_ok(dir / "plain.qcow2")));
}

TEST_F(Export, HashAndCompareReportProgress) {
    const Image image = open_ok(image_);
    Recorder hashed;
    HashOptions hash;
    hash.progress = hashed.callback();
    ASSERT_TRUE(hash_image(image, hash));
    hashed.expect_complete(8u << 20);
    for (DataAccess access : {DataAccess::read, DataAccess::mapping}) {
        SCOPED_TRACE(static_cast<int>(access));
        Recorder compared;
        CompareOptions compare;
        compare.data_access = access;
        compare.progress = compared.callback();
        auto same = compare_images(image, image, compare);
        ASSERT_TRUE(same);
        EXPECT_EQ(same->outcome, CompareResult::Outcome::identical);
        compared.expect_complete(8u << 20);
    }
}

} // namespace
} // namespace qcowmap

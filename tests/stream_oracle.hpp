// The stream decoder held against Image: the same bytes streamed once in file order must give
// the disk Image::open_bytes gives, or fail; and a header Image refuses, the stream refuses with
// the same error code (both use parse_image). Used by the stream suite and, on every image the
// corrupt-image suite builds, through its open() helper.
#pragma once

#include <qcowmap/image.hpp>
#include <qcowmap/stream_import.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <vector>

namespace qcowmap::test {

/// Collects what a StreamDecoder delivers: data runs (up to a cap) and the bytes accounted.
class CollectingSink : public StreamSink {
  public:
    std::uint64_t disk_size = 0;
    bool began = false;
    std::map<std::uint64_t, std::vector<std::byte>> data_runs;
    std::uint64_t data_bytes = 0, zero_bytes = 0;
    bool overlapped = false; ///< a byte was reported twice

    Result<void> begin(const ImageInfo&, std::uint64_t size) override {
        began = true;
        disk_size = size;
        return {};
    }
    Result<void> data(std::uint64_t offset, std::span<const std::byte> bytes) override {
        note(offset, bytes.size());
        data_bytes += bytes.size();
        if (data_bytes <= kMaxKept)
            data_runs.emplace(offset, std::vector<std::byte>(bytes.begin(), bytes.end()));
        return {};
    }
    Result<void> zero(std::uint64_t offset, std::uint64_t length, bool) override {
        note(offset, length);
        zero_bytes += length;
        return {};
    }

  private:
    static constexpr std::uint64_t kMaxKept = 64u << 20;
    void note(std::uint64_t offset, std::uint64_t length) {
        // Ranges are checked for overlap only while few: enough for the small test images.
        if (ranges_.size() > 100000)
            return;
        auto next = ranges_.lower_bound(offset);
        if (next != ranges_.end() && next->first < offset + length)
            overlapped = true;
        if (next != ranges_.begin() && std::prev(next)->second > offset)
            overlapped = true;
        ranges_.emplace(offset, offset + length);
    }
    std::map<std::uint64_t, std::uint64_t> ranges_;
};

/// Feeds `bytes` to `decoder` in pieces of the sizes in `pieces` (cycled), then finishes.
inline Result<StreamStats> feed_in_pieces(StreamDecoder& decoder, std::span<const std::byte> bytes,
                                          const std::vector<std::size_t>& pieces) {
    std::size_t at = 0, i = 0;
    while (at < bytes.size()) {
        const std::size_t n = std::min(pieces[i++ % pieces.size()], bytes.size() - at);
        if (auto ok = decoder.feed(bytes.subspan(at, n)); !ok)
            return ok.error();
        at += n;
    }
    return decoder.finish();
}

/// Streams `bytes` (in odd pieces, without worker threads) and checks the result against
/// Image::open_bytes: header refusals agree by code; a stream that decodes gives every byte of
/// the disk once, and its data equals what the Image reads there.
inline void expect_stream_agrees(std::span<const std::byte> bytes) {
    OpenOptions open_options;
    open_options.backing = BackingMode::none;
    auto image = Image::open_bytes(bytes, open_options);
    StreamOptions options;
    options.backing = BackingMode::none;
    options.threads = 1;
    options.max_spool = 64u << 20;
    CollectingSink sink;
    StreamDecoder decoder(sink, options);
    auto stats = feed_in_pieces(decoder, bytes, {4093, 1, 65536, 300000, 7});
    const bool v1 = bytes.size() >= 8 && std::to_integer<int>(bytes[7]) == 1 &&
                    std::to_integer<int>(bytes[4]) == 0 && std::to_integer<int>(bytes[5]) == 0 &&
                    std::to_integer<int>(bytes[6]) == 0;
    if (!image && !v1) {
        const ErrorCode code = image.error().code;
        if (code == ErrorCode::not_qcow2 || code == ErrorCode::unsupported_version ||
            code == ErrorCode::invalid_header || code == ErrorCode::encrypted) {
            ASSERT_FALSE(stats) << "the stream decoded an image Image::open refuses: "
                                << image.error().message;
            EXPECT_EQ(stats.error().code, code)
                << "image: " << image.error().message << "\nstream: " << stats.error().message;
        }
    }
    if (!stats) {
        EXPECT_FALSE(stats.error().message.empty());
        EXPECT_EQ(stats.error().message.find('\n'), std::string::npos) << stats.error().message;
        return;
    }
    EXPECT_FALSE(sink.overlapped) << "a byte of the disk was reported twice";
    EXPECT_EQ(sink.data_bytes + sink.zero_bytes, sink.disk_size);
    if (!image) {
        // The stream reads past the snapshot table's entries and the bitmap directory's (the
        // disk does not need them; their positions and sizes are checked): Image parses them.
        const std::string& why = image.error().message;
        ASSERT_TRUE(image.error().code == ErrorCode::invalid_table &&
                    (why.starts_with("snapshot") || why.starts_with("bitmap")))
            << "the stream decoded an image Image::open refuses: " << why;
        return;
    }
    std::vector<std::byte> expected;
    for (const auto& [offset, run] : sink.data_runs) {
        expected.resize(run.size());
        auto n = image->read(expected, offset);
        if (!n)
            continue; // the walk of the mapping refuses what the stream read (a later cluster)
        ASSERT_EQ(*n, run.size());
        ASSERT_TRUE(std::equal(run.begin(), run.end(), expected.begin()))
            << "data at " << offset << " differs from Image::read";
    }
}

} // namespace qcowmap::test

// Fuzz target: the stream decoder (issue 29) fed the input once, in pieces whose sizes come
// from the input itself, on one thread and on a few, as `cat | qcowmap convert -` would feed
// it. Work is bounded by the input's length whatever the header claims: each cluster of the
// stream is looked at once, each L2 table read once; spools go to unnamed temporary files.
#include <qcowmap/stream_import.hpp>

#include <cstddef>
#include <cstdint>
#include <span>

namespace {

class TouchingSink : public qcowmap::StreamSink {
  public:
    unsigned sum = 0;
    qcowmap::Result<void> begin(const qcowmap::ImageInfo& info, std::uint64_t size) override {
        sum += static_cast<unsigned>(info.cluster_size + size);
        return {};
    }
    qcowmap::Result<void> data(std::uint64_t offset, std::span<const std::byte> bytes) override {
        sum += static_cast<unsigned>(offset) + std::to_integer<unsigned>(bytes.front()) +
               std::to_integer<unsigned>(bytes.back());
        return {};
    }
    qcowmap::Result<void> zero(std::uint64_t offset, std::uint64_t length, bool present) override {
        sum += static_cast<unsigned>(offset + length) + present;
        return {};
    }
};

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
    for (unsigned threads : {1u, 3u}) {
        qcowmap::StreamOptions options;
        options.threads = threads;
        options.backing = qcowmap::BackingMode::none;
        options.max_spool = 16u << 20;
        TouchingSink sink;
        qcowmap::StreamDecoder decoder(sink, options);
        std::size_t at = 0;
        std::size_t piece =
            size == 0 ? 1 : (std::to_integer<std::size_t>(bytes[size - 1]) * 97 + 1);
        bool failed = false;
        while (at < size && !failed) {
            const std::size_t n = piece < size - at ? piece : size - at;
            failed = !decoder.feed(bytes.subspan(at, n));
            at += n;
            piece = piece * 3 % 70001 + 1;
        }
        if (!failed)
            (void)decoder.finish();
        (void)decoder.stats();
        (void)sink.sum;
    }
    return 0;
}

// `-` as the image of convert, hash, info and check: the image read from standard input, once,
// by the library's stream decoder (<qcowmap/stream_import.hpp>). Only parsing and printing here.
#include "cli.hpp"

#include <qcowmap/stream_import.hpp>
#include <qcowmap/writer.hpp>

#include <fmt/format.h>

#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace qcowmap::cli {
namespace {

constexpr const char* kStdin = "<stdin>";

/// Options `-` cannot honour, refused before anything is read.
void refuse_for_stream(const ImageArgs& image) {
    if (!image.snapshot.empty())
        throw UsageError("--snapshot: a streamed image's snapshots are not read (convert the "
                         "file instead)");
    if (image.salvage)
        throw UsageError("--salvage cannot read a stream (the damage is found by a walk of the "
                         "whole file)");
    if (image.format == "raw")
        throw UsageError("-f raw with -: a raw disk on standard input needs no qcowmap");
}

/// The progress meter for a stream: a percentage of standard input's size when it is a file,
/// else nothing (a pipe has no total).
std::uint64_t stdin_size() {
    struct stat st {};
    if (::fstat(STDIN_FILENO, &st) == 0 && S_ISREG(st.st_mode))
        return static_cast<std::uint64_t>(st.st_size);
    return 0;
}

int report_stream_error(const Error& error, std::string_view target) {
    if (is_target_error(error)) {
        std::string_view why = error.message;
        why.remove_prefix(kWriteTargetError.size());
        return report(target, why, kExitOutputError);
    }
    return report_error(kStdin, error, kExitImageError);
}

std::string stats_json(const StreamStats& s) {
    return fmt::format("{{\"stream-bytes\": {}, \"disk-size\": {}, \"data-bytes\": {}, "
                       "\"compressed-clusters\": {}, \"l2-tables\": {}, \"spooled-bytes\": {}, "
                       "\"spool-peak\": {}, \"spool-used-bytes\": {}, \"skipped-tail-bytes\": {}, "
                       "\"reorder-spooled-bytes\": {}{}}}",
                       s.stream_bytes, s.disk_size, s.data_bytes, s.compressed_clusters,
                       s.l2_tables, s.spooled_bytes, s.spool_peak, s.spool_used_bytes,
                       s.skipped_tail_bytes, s.reorder_spooled_bytes,
                       s.input_digest
                           ? fmt::format(", \"input-digest\": \"{}\"", s.input_digest->hex())
                           : std::string());
}

void print_stats(const StreamArgs& stream, const StreamStats& stats) {
    if (stream.stats)
        fmt::print(stderr, "{}\n", stats_json(stats));
}

} // namespace

void StreamArgs::add_to(CLI::App& command) {
    command
        .add_option("--max-spool", max_spool,
                    "With - as the image: the most temporary space ($TMPDIR) the stream may need "
                    "for clusters that arrive before the tables mapping them (default: the disk "
                    "size); an image needing more is refused")
        ->option_text("SIZE");
    command
        .add_option("--expect-checksum", expect_checksum,
                    "With - as the image: the digest the streamed bytes must have "
                    "(sha256:HEX, sha512:HEX, blake2b512:HEX, xxh3-128:HEX); a mismatch fails "
                    "the command and leaves no target file")
        ->option_text("ALGO:HEX");
    command.add_flag("--stream-stats", stats,
                     "With - as the image: print the decoder's statistics (spool use...) as "
                     "one JSON line on stderr");
}

bool StreamArgs::given() const {
    return !max_spool.empty() || !expect_checksum.empty() || stats;
}

StreamOptions StreamArgs::options(const ImageArgs& image, unsigned threads) const {
    refuse_for_stream(image);
    StreamOptions options;
    options.threads = threads;
    options.backing = image.backing == "none" ? BackingMode::none : BackingMode::follow;
    if (!image.data_file.empty())
        options.data_file = image.data_file;
    if (!max_spool.empty())
        options.max_spool = size_option("--max-spool", max_spool);
    if (!expect_checksum.empty()) {
        auto expected = parse_expected_digest(expect_checksum);
        if (!expected) {
            throw UsageError(
                fmt::format("invalid --expect-checksum: {}", expected.error().message));
        }
        options.expect_digest = *expected;
    }
    return options;
}

int convert_from_stream(const ImageArgs& source, const StreamArgs& stream,
                        const StreamConvert& job) {
    StreamOptions options = stream.options(source);
    Progress meter(job.progress && stdin_size() != 0, stdin_size());
    options.progress = [&meter](std::uint64_t done) { meter.update(done); };
    const std::string target_name = job.target == "-" ? "<stdout>" : job.target;
    if (job.write_other) {
        // Formats that lay out the whole disk first: from a temporary raw copy of the disk.
        auto streamed = stream_to_temporary_image(STDIN_FILENO, options);
        if (!streamed)
            return report_stream_error(streamed.error(), target_name);
        meter.finish();
        print_stats(stream, streamed->stats);
        return job.write_other(streamed->image);
    }
    Result<StreamStats> stats = Error{ErrorCode::io_error, ""};
    if (job.target == "-") {
        if (!job.force && ::isatty(STDOUT_FILENO)) {
            return report("<stdout>",
                          "is a terminal: refusing to write a disk image to it (redirect the "
                          "output, or use --force)",
                          kExitOutputError);
        }
        stats = stream_to_raw(STDIN_FILENO, STDOUT_FILENO, options, job.sparse_size);
    } else {
        struct stat st {};
        const bool device =
            ::stat(job.target.c_str(), &st) == 0 && (S_ISBLK(st.st_mode) || S_ISCHR(st.st_mode));
        if (device) {
            int fd = ::open(job.target.c_str(), O_WRONLY | O_CLOEXEC);
            if (fd < 0)
                return report(job.target, std::strerror(errno), kExitOutputError);
            stats = stream_to_raw(STDIN_FILENO, fd, options, job.sparse_size);
            if (::close(fd) != 0 && stats)
                return report(job.target, std::strerror(errno), kExitOutputError);
        } else {
            // A file appears complete or not at all (written under a temporary name).
            stats =
                stream_to_raw_file(STDIN_FILENO, job.target, job.force, options, job.sparse_size);
        }
    }
    if (!stats)
        return report_stream_error(stats.error(), target_name);
    meter.finish();
    print_stats(stream, *stats);
    return kExitOk;
}

int hash_from_stream(const ImageArgs& source, const StreamArgs& stream, HashAlgorithm algorithm,
                     std::uint64_t block_size, bool json, bool progress, unsigned threads) {
    StreamOptions options = stream.options(source, threads);
    Progress meter(progress && stdin_size() != 0, stdin_size());
    options.progress = [&meter](std::uint64_t done) { meter.update(done); };
    auto hasher = Hasher::create(algorithm);
    if (!hasher)
        return report_error(kStdin, hasher.error(), kExitImageError);
    std::string out;
    // Block manifests: one hasher per block, fed by the runs in disk order.
    std::uint64_t block_index = 0, block_filled = 0;
    bool block_zero = true;
    auto end_block = [&]() -> Result<void> {
        auto digest = hasher->finish();
        if (!digest)
            return digest.error();
        if (json) {
            out += fmt::format("{}\n{{\"index\": {}, \"offset\": {}, \"length\": {}, \"digest\": "
                               "\"{}\", \"zero\": {}}}",
                               block_index == 0 ? "" : ",", block_index, block_index * block_size,
                               block_filled, digest->hex(), block_zero);
        } else {
            out += fmt::format("{} {} {} {}\n", block_index, block_index * block_size,
                               digest->hex(), block_zero ? "zero" : "data");
        }
        if (out.size() > (1 << 16)) {
            std::fwrite(out.data(), 1, out.size(), stdout);
            out.clear();
        }
        ++block_index;
        block_filled = 0;
        block_zero = true;
        return {};
    };
    RunVisitor feed = [&](const Run& run) -> Result<void> {
        std::uint64_t at = 0;
        while (at < run.length) {
            std::uint64_t piece = run.length - at;
            if (block_size)
                piece = std::min(piece, block_size - block_filled);
            if (run.kind == ExtentKind::zero) {
                hasher->update_zeros(piece);
            } else {
                hasher->update(run.bytes.subspan(static_cast<std::size_t>(at),
                                                 static_cast<std::size_t>(piece)));
                block_zero = false;
            }
            at += piece;
            block_filled += piece;
            if (block_size && block_filled == block_size) {
                if (auto ok = end_block(); !ok)
                    return ok;
            }
        }
        return {};
    };
    // The manifest's header needs the disk size: written once the stream's header is read.
    auto begin = [&](const ImageInfo&, std::uint64_t size) -> Result<void> {
        if (!block_size)
            return {};
        const std::uint64_t blocks = size / block_size + (size % block_size != 0);
        out = json ? fmt::format("[\n{{\"image\": \"-\", \"algorithm\": \"{}\", \"size\": {}, "
                                 "\"block-size\": {}, \"blocks\": [",
                                 to_string(algorithm), size, block_size)
                   : fmt::format("# qcowmap block manifest: algorithm={} block-size={} size={} "
                                 "blocks={} image=-\n",
                                 to_string(algorithm), block_size, size, blocks);
        return {};
    };
    auto stats = decode_stream_ordered(STDIN_FILENO, feed, options, begin);
    if (!stats)
        return report_stream_error(stats.error(), "<stdout>");
    if (block_size && block_filled > 0) {
        if (auto ok = end_block(); !ok)
            return report_error(kStdin, ok.error(), kExitImageError);
    }
    meter.finish();
    const std::uint64_t size = stats->disk_size;
    std::string text;
    if (block_size) {
        text = out + (json ? "\n]}\n]\n" : "");
    } else {
        auto digest = hasher->finish();
        if (!digest)
            return report_error(kStdin, digest.error(), kExitImageError);
        text = json ? fmt::format("[\n{{\"image\": \"-\", \"algorithm\": \"{}\", \"size\": {}, "
                                  "\"digest\": \"{}\"}}\n]\n",
                                  to_string(algorithm), size, digest->hex())
                    : fmt::format("{}  -\n", digest->hex());
    }
    std::fwrite(text.data(), 1, text.size(), stdout);
    print_stats(stream, *stats);
    return finish_stdout();
}

namespace {

/// Receives nothing: `info` and `check` only want the decoder to walk the tables.
class NullSink : public StreamSink {
  public:
    Result<void> begin(const ImageInfo&, std::uint64_t) override { return {}; }
    Result<void> data(std::uint64_t, std::span<const std::byte>) override { return {}; }
    Result<void> zero(std::uint64_t, std::uint64_t, bool) override { return {}; }
};

std::string feature_list(const ImageInfo& info, std::uint64_t mask, FeatureName::Type type) {
    std::string out;
    for (unsigned bit = 0; bit < 64; ++bit) {
        if (mask & (std::uint64_t{1} << bit))
            out += (out.empty() ? "" : ", ") + printable(info.feature_name(type, bit));
    }
    return out.empty() ? "none" : out;
}

} // namespace

int describe_stream(const ImageArgs& source, const StreamArgs& stream, bool json, bool check) {
    StreamOptions options = stream.options(source);
    options.describe_only = true;
    NullSink sink;
    StreamDecoder decoder(sink, options);
    auto stats = decode_fd(decoder, STDIN_FILENO);
    const ImageInfo* info = decoder.info();
    if (!info) // the header itself is unusable
        return report_error(kStdin, stats.error(), kExitImageError);
    const StreamStats& s = stats ? *stats : decoder.stats();
    std::string text;
    if (json) {
        text = fmt::format(
            "{{\n    \"filename\": \"-\",\n    \"format\": \"qcow2\",\n    \"version\": {},\n"
            "    \"virtual-size\": {},\n    \"cluster-size\": {},\n{}"
            "    \"compression-type\": \"{}\",\n    \"extended-l2\": {},\n"
            "    \"dirty-flag\": {},\n    \"corrupt\": {},\n    \"snapshots\": {},\n"
            "    \"stream\": {},\n    \"errors\": {}\n}}\n",
            info->version, info->virtual_size, info->cluster_size,
            info->backing_file
                ? fmt::format("    \"backing-filename\": {},\n", json_string(*info->backing_file))
                : std::string(),
            info->compression_type == CompressionType::zstd ? "zstd" : "zlib", info->extended_l2,
            (info->incompatible_features & kIncompatDirty) != 0,
            (info->incompatible_features & kIncompatCorrupt) != 0, info->snapshot_count,
            stats_json(s),
            stats ? std::string("[]") : "[" + json_string(stats.error().message) + "]");
    } else if (!check) {
        text += "image: -\n";
        text += "file format: qcow2\n";
        text += fmt::format("version: {}{}\n", info->version,
                            info->version == 2 ? " (compat 0.10)" : " (compat 1.1)");
        text += fmt::format("virtual size: {} ({} bytes)\n", human_size(info->virtual_size),
                            info->virtual_size);
        text += fmt::format("file size: {} bytes\n", s.stream_bytes);
        text += fmt::format("cluster_size: {}\n", info->cluster_size);
        if (info->backing_file)
            text += fmt::format("backing file: {}\n", printable(*info->backing_file));
        if (info->data_file)
            text += fmt::format("data file: {}\n", printable(*info->data_file));
        text += fmt::format("refcount bits: {}\n", info->refcount_bits());
        text += fmt::format("compression type: {}\n",
                            info->compression_type == CompressionType::zstd ? "zstd" : "zlib");
        text += fmt::format("extended l2: {}\n", info->extended_l2);
        text += fmt::format("dirty: {}\n", (info->incompatible_features & kIncompatDirty) != 0);
        text += fmt::format("corrupt: {}\n", (info->incompatible_features & kIncompatCorrupt) != 0);
        text += fmt::format(
            "incompatible features: {}\n",
            feature_list(*info, info->incompatible_features, FeatureName::Type::incompatible));
        text += fmt::format("snapshots: {} (not read from a stream)\n", info->snapshot_count);
        text +=
            fmt::format("data: {} ({} bytes), {} compressed clusters, {} L2 tables\n",
                        human_size(s.data_bytes), s.data_bytes, s.compressed_clusters, s.l2_tables);
        text += fmt::format("spool: {} bytes of clusters arrived before their tables\n",
                            s.spooled_bytes);
    } else {
        if (stats) {
            text += "No errors were found on the image.\n";
        } else {
            text += "\n1 errors were found on the image.\nData may be corrupted, or further "
                    "writes to the image may corrupt it.\n";
        }
        text += "(A stream is checked in one pass: its header and every table and cluster the "
                "disk uses; reference counts are not checked.)\n";
    }
    std::fwrite(text.data(), 1, text.size(), stdout);
    if (int code = finish_stdout(); code != kExitOk)
        return code;
    if (!stats) {
        const ErrorCode code = stats.error().code;
        const bool corruption = code == ErrorCode::invalid_table ||
                                code == ErrorCode::invalid_cluster ||
                                code == ErrorCode::compressed_data;
        // check: corruptions give 2 like qemu-img check; anything else could not check (1).
        return report_error(kStdin, stats.error(),
                            check && corruption ? 2 : static_cast<int>(kExitImageError));
    }
    print_stats(stream, s);
    return kExitOk;
}

} // namespace qcowmap::cli

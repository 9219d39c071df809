// qcowmap — a qcow2 image read from a byte stream (a pipe, a socket, an HTTP body), once, in
// file order: the one input a memory mapping cannot cover. (Not to be confused with
// <qcowmap/stream.hpp>, the Boost.Iostreams device that reads an opened Image.)
#pragma once

#include <qcowmap/hash.hpp>
#include <qcowmap/image.hpp>
#include <qcowmap/info.hpp>
#include <qcowmap/options.hpp>
#include <qcowmap/result.hpp>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <span>

namespace qcowmap {

/// Receives the virtual disk of a streamed image from a StreamDecoder, on the thread that
/// feeds the decoder. Every byte of the disk is reported exactly once, by `data` or `zero`,
/// in the order the stream delivers it: not in disk order (an image's clusters lie in the
/// file in the order they were allocated).
class StreamSink {
  public:
    virtual ~StreamSink() = default;
    /// Called once, when the header has been read and validated, before any other call and
    /// before any data: the place to create the target. `disk_size` is the virtual size.
    /// Return an error to refuse the image.
    virtual Result<void> begin(const ImageInfo& info, std::uint64_t disk_size) = 0;
    /// `bytes.size()` bytes of the disk at `offset` (never empty). The span lives during the
    /// call only.
    virtual Result<void> data(std::uint64_t offset, std::span<const std::byte> bytes) = 0;
    /// `length` bytes at `offset` read as zeros: zero clusters (`present`) or ranges the image
    /// does not allocate (`present` false).
    virtual Result<void> zero(std::uint64_t offset, std::uint64_t length, bool present) = 0;
};

/// What the stream decoder measured, for reports and tests.
struct StreamStats {
    std::uint64_t stream_bytes = 0;        ///< bytes of the stream consumed (the image file's size)
    std::uint64_t disk_size = 0;           ///< the virtual size
    std::uint64_t data_bytes = 0;          ///< disk bytes delivered from data clusters
    std::uint64_t compressed_clusters = 0; ///< compressed clusters decompressed
    std::uint64_t l2_tables = 0;           ///< L2 tables read
    /// Bytes of clusters written to the spool: clusters that arrived before the table that maps
    /// them was known (all-zero clusters are remembered, not written). The spool holds them
    /// until used; then they are freed (punched out of the spool file).
    std::uint64_t spooled_bytes = 0;
    std::uint64_t spool_peak = 0; ///< the most the spool held at once (what max_spool limits)
    /// Spooled bytes that were used: the data and tables the image maps.
    std::uint64_t spool_used_bytes = 0;
    /// Bytes of the stream past the last byte the disk needs (snapshots, bitmaps, leaked
    /// clusters at the end): read, checked against an expected digest, otherwise ignored.
    std::uint64_t skipped_tail_bytes = 0;
    /// Disk bytes that went through the reordering spool of an ordered consumer
    /// (decode_stream_ordered), which holds data that arrives ahead of its place in the disk.
    std::uint64_t reorder_spooled_bytes = 0;
    /// The digest of the stream's bytes (StreamOptions::expect_digest), when one was asked.
    std::optional<Digest> input_digest;
};

/// A digest the stream's bytes must have: "sha256:HEX" as a publisher gives it.
struct ExpectedDigest {
    HashAlgorithm algorithm = HashAlgorithm::sha256;
    Digest digest;
};

/// Parses "ALGO:HEX" (one of `hash`'s algorithm names, and as many hex digits as the
/// algorithm's digest has). Errors: invalid_argument saying what is wrong.
Result<ExpectedDigest> parse_expected_digest(std::string_view text);

/// How a stream is decoded.
struct StreamOptions {
    /// The most spool the image may need at once, in bytes: clusters that arrive before the
    /// table mapping them, and (a separate spool of decode_stream_ordered, limited alike) disk
    /// data that arrives ahead of its place. nullopt: the virtual disk size. An image needing more
    /// is refused (invalid_table, "needs more than ... of spool") as soon as the limit is crossed.
    std::optional<std::uint64_t> max_spool;
    /// Where the spool's unnamed temporary files are made: empty means $TMPDIR, else /tmp.
    /// Nothing is left there: the files are unlinked at once (O_TMPFILE where possible).
    std::filesystem::path spool_directory;
    /// Threads decompressing compressed clusters: 0 one per core, 1 none (inline).
    unsigned threads = 0;
    /// `follow` (the default): an image naming a backing file is refused (a stream has no
    /// directory to resolve the name in, and the name comes from outside: OSSA-2024-001).
    /// `none`: the image is read alone; ranges it does not allocate read as zeros.
    BackingMode backing = BackingMode::follow;
    /// The external data file, for an image that has one (it is refused otherwise: the name in
    /// the header is never followed). Data clusters are read from it at their host offsets.
    std::optional<std::filesystem::path> data_file;
    /// Digest the stream's bytes as they pass and fail at the end (checksum_mismatch, both
    /// digests in the message) when they do not have this digest. The whole stream is read
    /// then, also what the disk does not need.
    std::optional<ExpectedDigest> expect_digest;
    /// Called as the stream advances: bytes consumed (no total: a stream has none).
    std::function<void(std::uint64_t consumed)> progress;
    /// For describing an image (`info`, `check`) rather than reading its disk: the corrupt bit,
    /// a backing file and an external data file are not refused (nothing is opened), and
    /// clusters of an external data file are reported as zeros without being read.
    bool describe_only = false;
};

/// A push decoder for a qcow2 image that arrives as a byte stream, in file order, once.
///
/// Feed it the bytes as they come (`feed`, any piece sizes), then call `finish` at the end of
/// the stream. It validates the header as `Image::open` does (the same decoder and checks,
/// from the first cluster), refuses the corrupt bit, encryption, unknown incompatible features,
/// backing and data file references not allowed by the options, before the sink sees
/// anything; then reads the L1 and refcount tables as they pass, each L2 table the L1 entries
/// name, and each data or compressed cluster the L2 entries seen so far name, and hands the
/// disk to the sink. Compressed clusters are decompressed on `threads` workers. Clusters that
/// arrive before any table maps them are spooled to an unnamed temporary file (never kept in
/// memory) and used once their table arrives; all-zero clusters are only remembered. Memory
/// stays bounded whatever the disk or table sizes: entries waiting for their cluster are kept
/// in a few MiB and spill to another unnamed temporary file beyond that.
///
/// Errors: those of `Image::open` (not_qcow2, unsupported_version, invalid_header,
/// invalid_table, unsupported_feature, encrypted), invalid_cluster / invalid_table for
/// entries like those an extent walk refuses, and for a table or cluster the stream delivered
/// before it was known and that was not kept (a cluster used twice, or as metadata and data),
/// compressed_data, invalid_table when the spool limit is crossed, io_error for the spool, the
/// stream ending early (finish: "stream ended at ... before ..."), checksum_mismatch, and any
/// error of the sink. After an error the decoder stays failed.
class StreamDecoder {
  public:
    StreamDecoder(StreamSink& sink, const StreamOptions& options = {});
    ~StreamDecoder();
    StreamDecoder(StreamDecoder&&) noexcept;
    StreamDecoder& operator=(StreamDecoder&&) noexcept;

    /// Consumes the next bytes of the stream.
    Result<void> feed(std::span<const std::byte> bytes);
    /// The end of the stream: completes what is waiting for it and checks that everything the
    /// disk needs arrived (and the digest). Returns the statistics.
    Result<StreamStats> finish();
    /// True once the header is validated (and `begin` returned).
    bool header_read() const;
    /// The decoded header, once `header_read()`; snapshots and bitmaps are not read.
    const ImageInfo* info() const;
    /// The statistics so far.
    const StreamStats& stats() const;
    /// True when nothing more of the stream is needed for the disk (the rest is only read
    /// to its end; `feed` then costs only the digest, if one is asked).
    bool disk_complete() const;

  private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

/// Where a stream's bytes come from: fills the start of `buffer` and returns how many bytes
/// it put there, 0 at the end of the stream, or an error (which stops the decoding).
using StreamReader = std::function<Result<std::size_t>(std::span<std::byte> buffer)>;

/// A StreamReader over the descriptor `fd` (read(2), retrying EINTR; a pipe is enlarged to
/// 1 MiB where allowed). Errors: io_error.
StreamReader fd_reader(int fd);

/// Reads `read` to its end, feeding `decoder`, then finishes it.
/// Errors: the reader's, and the decoder's.
Result<StreamStats> decode_stream(StreamDecoder& decoder, const StreamReader& read);
/// decode_stream from the descriptor `fd`.
Result<StreamStats> decode_fd(StreamDecoder& decoder, int fd);

/// Decodes the stream on `in_fd` onto `out_fd`, raw, with the bytes `qemu-img convert -O raw`
/// writes: a regular file is emptied, sized to the disk and given only its data (zero runs and
/// data blocks of `zero_block` zero bytes stay holes); a block device must hold the disk and
/// gets its zero runs zeroed; anything else (a pipe, standard output) is written in disk order,
/// zeros included, data that arrives ahead of its place held in a spool file meanwhile.
/// The target is not touched before the header is validated. Errors: the decoder's; io_error
/// for the target (message starting with kWriteTargetError, <qcowmap/writer.hpp>).
Result<StreamStats> stream_to_raw(int in_fd, int out_fd, const StreamOptions& options = {},
                                  std::uint64_t zero_block = 4096);

/// As `stream_to_raw`, into the regular file `target`, which appears complete or not at all:
/// it is written under an unnamed temporary file in its directory and linked into place only
/// when the whole stream decoded (and its digest matched). An existing `target` is refused
/// unless `replace`. Errors: as stream_to_raw.
Result<StreamStats> stream_to_raw_file(int in_fd, const std::filesystem::path& target, bool replace,
                                       const StreamOptions& options = {},
                                       std::uint64_t zero_block = 4096);
/// As above, the stream read from `read` (a Python file object, an HTTP body...).
Result<StreamStats> stream_to_raw_file(const StreamReader& read,
                                       const std::filesystem::path& target, bool replace,
                                       const StreamOptions& options = {},
                                       std::uint64_t zero_block = 4096);

/// Decodes the stream on `in_fd` and hands the disk to `visitor` in disk order, as
/// `Image::visit` does (data runs with bytes, zero runs without): for digests and for outputs
/// that must be written in order. Data that arrives ahead of its place goes through a spool
/// file (counted against max_spool). `begin`, when set, is called once the header is valid,
/// before the first run (a manifest's header line needs the disk size). Errors: the decoder's
/// and the visitor's (or begin's).
Result<StreamStats> decode_stream_ordered(
    int in_fd, const RunVisitor& visitor, const StreamOptions& options = {},
    const std::function<Result<void>(const ImageInfo&, std::uint64_t disk_size)>& begin = {});

/// A streamed disk made random-access: decodes the stream on `in_fd` into an unnamed sparse
/// temporary file (in StreamOptions::spool_directory; its data counts against max_spool) and
/// opens that as a raw Image, for outputs that need the whole disk before they start (the
/// qcow2 writer decides its layout from the allocation map first). The file goes away with
/// the last copy of the Image. Errors: the decoder's, io_error for the temporary file.
struct StreamedImage {
    Image image;
    StreamStats stats;
};
Result<StreamedImage> stream_to_temporary_image(int in_fd, const StreamOptions& options = {});

} // namespace qcowmap

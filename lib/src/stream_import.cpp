// The stream decoder: a qcow2 image read once, in file order, from a byte stream.
//
// The header is parsed by parse_image (ParseMode::stream) from the first cluster, so a streamed
// image is validated exactly as Image::open validates one. After that every cluster of the
// stream is given a role from what has been read before it: the L1 and refcount tables (the
// header places them), an L2 table (an L1 entry named it), a data cluster or part of a
// compressed stream (an L2 entry named it), a refcount block (the refcount table named it), or
// nothing known yet. Entries that name clusters still to come wait in a queue ordered by host
// offset (PendingQueue); clusters of no known role are kept in a spool file at their own host
// offsets (Spool) in case a table read later names them, as happens when qemu reuses freed
// clusters or copies L2 tables on write after a snapshot. Spec: docs/interop/qcow2.txt,
// "Cluster mapping", "Compressed Clusters Descriptor", "Extended L2 Entries".
#include "atomic_file.hpp"
#include "image_state.hpp"
#include "qcow2_format.hpp"
#include "raw_io.hpp"
#include "workers.hpp"
#include "writer_internal.hpp"

#include <qcowmap/stream_import.hpp>
#include <qcowmap/writer.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <map>
#include <unordered_map>
#include <vector>

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace qcowmap {
namespace {

using detail::Bytes;

using detail::kMaxClusterBits;
using detail::kMinClusterBits;
using detail::kQcowMagic;
/// Bytes of the header up to and with cluster_bits: enough to know the size of the first
/// cluster, which holds the whole header with its extensions and backing file name.
constexpr std::size_t kClusterBitsEnd = detail::header::kClusterBits + 4;

/// "WHAT: strerror(err)", the errno kept.
Error errno_error(std::string_view what, int err = errno) {
    return detail::errno_error(err, fmt::format("{}: {}", what, std::strerror(err)));
}

/// The output's errors: ErrorOrigin::target, as the writer's (writer_internal.hpp).
Error target_error(std::string_view what) {
    return detail::writer::target_error(what);
}

Error target_errno() {
    return detail::writer::target_errno(errno);
}

/// Runs `work`, turning std::bad_alloc (a buffer the system refuses: `ulimit -v`) into an error:
/// no exception leaves the library's stream functions.
template <typename Work> auto out_of_memory_as_error(Work work) -> decltype(work()) {
    try {
        return work();
    } catch (const std::bad_alloc&) {
        return Error{ErrorCode::io_error, "out of memory"};
    }
}

// ---------------------------------------------------------------------------------------------
// What waits for a cluster still to come.

enum class Role : std::uint8_t { l2_table, data, compressed, refcount_block };

struct Pending {
    std::uint64_t host = 0;  ///< byte offset in the image file
    std::uint64_t index = 0; ///< l2_table: the L1 index; data, compressed: the guest cluster
    std::uint32_t aux = 0;   ///< data: allocated subclusters; compressed: stream size in bytes
    Role role = Role::data;
};

/// Entries ordered by host offset, a few MiB in memory; beyond that, sorted runs spill to an
/// unnamed temporary file and are merged back as the stream reaches them, so that an image
/// whose L2 tables all come first (our writer's layout) costs no memory per data cluster.
class PendingQueue {
  public:
    static constexpr std::size_t kInMemory = 256 * 1024; // entries: 6 MiB
    /// Entries read back at once, over all spilled runs (4 MiB; at least 16 per run).
    static constexpr std::size_t kRunBuffer = (4u << 20) / sizeof(Pending);

    explicit PendingQueue(std::filesystem::path directory) : directory_(std::move(directory)) {}
    PendingQueue(const PendingQueue&) = delete;
    ~PendingQueue() {
        if (spill_fd_ >= 0)
            ::close(spill_fd_);
    }

    std::uint64_t size() const { return size_; }
    bool empty() const { return size_ == 0; }

    Result<void> push(const Pending& entry) {
        if (heap_.size() >= kInMemory) {
            if (auto ok = spill(); !ok)
                return ok;
        }
        heap_.push_back(entry);
        std::push_heap(heap_.begin(), heap_.end(), later);
        ++size_;
        return {};
    }

    /// The entry with the lowest host offset if it is below `limit`.
    Result<std::optional<Pending>> pop_below(std::uint64_t limit) {
        const Pending* best = heap_.empty() ? nullptr : &heap_.front();
        SpillRun* best_run = nullptr;
        for (SpillRun& run : runs_) {
            if (run.pos == run.buffer.size()) {
                if (auto ok = refill(run); !ok)
                    return ok.error();
            }
            if (run.pos < run.buffer.size() && (!best || run.buffer[run.pos].host < best->host)) {
                best = &run.buffer[run.pos];
                best_run = &run;
            }
        }
        if (!best || best->host >= limit)
            return std::optional<Pending>{};
        const Pending entry = *best;
        if (best_run) {
            ++best_run->pos;
        } else {
            std::pop_heap(heap_.begin(), heap_.end(), later);
            heap_.pop_back();
        }
        --size_;
        return std::optional<Pending>{entry};
    }

  private:
    struct SpillRun {
        std::uint64_t offset = 0;    // next entry to read back, in bytes of the spill file
        std::uint64_t remaining = 0; // entries not read back yet
        std::vector<Pending> buffer;
        std::size_t pos = 0;
    };

    static bool later(const Pending& a, const Pending& b) { return a.host > b.host; }

    Result<void> spill() {
        if (spill_fd_ < 0) {
            auto fd = detail::open_spool_file(directory_);
            if (!fd)
                return fd.error();
            spill_fd_ = *fd;
        }
        std::sort(heap_.begin(), heap_.end(),
                  [](const Pending& a, const Pending& b) { return a.host < b.host; });
        const std::uint64_t bytes = heap_.size() * sizeof(Pending);
        // Our own in-memory records, read back by this process only: not an on-disk format.
        if (!detail::pwrite_all(spill_fd_, reinterpret_cast<const std::byte*>(heap_.data()), bytes,
                                spill_end_)) {
            return errno_error("cannot write the stream decoder's table spool");
        }
        SpillRun run;
        run.offset = spill_end_;
        run.remaining = heap_.size();
        runs_.push_back(std::move(run));
        spill_end_ += bytes;
        heap_.clear();
        return {};
    }

    Result<void> refill(SpillRun& run) {
        run.buffer.clear();
        run.pos = 0;
        if (run.remaining == 0) {
            run.buffer.shrink_to_fit();
            return {};
        }
        // The read-back buffers share 4 MiB: with many runs each reads fewer entries at once.
        const std::size_t share = std::max<std::size_t>(16, kRunBuffer / runs_.size());
        const std::size_t count =
            static_cast<std::size_t>(std::min<std::uint64_t>(run.remaining, share));
        run.buffer.resize(count);
        if (run.buffer.capacity() > 2 * count)
            run.buffer.shrink_to_fit();
        const std::size_t bytes = count * sizeof(Pending);
        const detail::Transfer read = detail::pread_full(
            spill_fd_, reinterpret_cast<std::byte*>(run.buffer.data()), bytes, run.offset);
        if (read.done < bytes) {
            return errno_error("cannot read the stream decoder's table spool",
                               detail::transfer_errno(read));
        }
        run.offset += bytes;
        run.remaining -= count;
        return {};
    }

    std::filesystem::path directory_;
    std::vector<Pending> heap_; // a min-heap on host offset
    std::vector<SpillRun> runs_;
    int spill_fd_ = -1;
    std::uint64_t spill_end_ = 0;
    std::uint64_t size_ = 0;
};

/// A set of cluster numbers, one bit each, in chunks allocated where bits are set.
class ClusterSet {
  public:
    bool test(std::uint64_t cluster) const {
        auto it = chunks_.find(cluster >> kChunkBits);
        return it != chunks_.end() && (it->second[word(cluster)] & bit(cluster)) != 0;
    }
    void set(std::uint64_t cluster) {
        auto& chunk = chunks_[cluster >> kChunkBits];
        if (!chunk)
            chunk = std::make_unique<std::uint64_t[]>(kWords);
        chunk[word(cluster)] |= bit(cluster);
    }
    void clear(std::uint64_t cluster) {
        auto it = chunks_.find(cluster >> kChunkBits);
        if (it != chunks_.end())
            it->second[word(cluster)] &= ~bit(cluster);
    }

  private:
    static constexpr unsigned kChunkBits = 15; // 32 Ki clusters: 4 KiB per chunk
    static constexpr std::size_t kWords = (std::size_t{1} << kChunkBits) / 64;
    static std::size_t word(std::uint64_t c) {
        return static_cast<std::size_t>((c & ((1u << kChunkBits) - 1)) / 64);
    }
    static std::uint64_t bit(std::uint64_t c) { return std::uint64_t{1} << (c % 64); }
    std::unordered_map<std::uint64_t, std::unique_ptr<std::uint64_t[]>> chunks_;
};

/// Clusters kept because no table read so far explains them, in a sparse unnamed file at their
/// own host offsets (so no index is needed: an all-zero cluster is only remembered, and reads
/// back as the hole it is). Accounted against the limit while held; freed once used.
class Spool {
  public:
    Spool(std::filesystem::path directory, std::uint64_t limit, std::uint64_t cluster_size)
        : directory_(std::move(directory)), limit_(limit), cluster_size_(cluster_size) {}
    Spool(const Spool&) = delete;
    ~Spool() {
        if (fd_ >= 0)
            ::close(fd_);
    }

    std::uint64_t held() const { return held_; }
    std::uint64_t peak() const { return peak_; }
    std::uint64_t total() const { return total_; }
    std::uint64_t used() const { return used_; }
    void set_external(std::uint64_t bytes) { external_ = bytes; }

    bool kept(std::uint64_t cluster) const { return kept_.test(cluster); }

    /// Keeps cluster number `cluster` whose bytes are `bytes` (shorter at the end of stream).
    Result<void> keep(std::uint64_t cluster, Bytes bytes) {
        kept_.set(cluster);
        if (detail::all_zero(bytes.data(), bytes.size()))
            return {};
        if (held_ + external_ + bytes.size() > limit_) {
            return Error{ErrorCode::invalid_table,
                         fmt::format("the image needs more than {} bytes of spool (clusters that "
                                     "arrive before the table that maps them, here at host "
                                     "offset {:#x}); allow more with max_spool (--max-spool)",
                                     limit_, cluster * cluster_size_)};
        }
        if (fd_ < 0) {
            auto fd = detail::open_spool_file(directory_);
            if (!fd)
                return fd.error();
            fd_ = *fd;
        }
        if (!detail::pwrite_all(fd_, bytes.data(), bytes.size(), cluster * cluster_size_))
            return errno_error("cannot write the spool");
        written_.set(cluster);
        held_ += bytes.size();
        total_ += bytes.size();
        peak_ = std::max(peak_, held_ + external_);
        return {};
    }

    /// Reads `out.size()` bytes at `host` (inside cluster `cluster`, which is kept).
    Result<void> read(std::uint64_t cluster, std::uint64_t host, std::span<std::byte> out) {
        if (!written_.test(cluster)) {
            std::memset(out.data(), 0, out.size());
            return {};
        }
        const detail::Transfer read = detail::pread_full(fd_, out.data(), out.size(), host);
        if (read.error != 0)
            return errno_error("cannot read the spool", read.error);
        // Past the end of a short last cluster: zeros.
        const auto done = static_cast<std::size_t>(read.done);
        if (done < out.size())
            std::memset(out.data() + done, 0, out.size() - done);
        used_ += out.size();
        return {};
    }

    /// Frees cluster `cluster` once its one user has it: a second user then finds it gone.
    void release(std::uint64_t cluster, std::uint64_t length) {
        kept_.clear(cluster);
        if (written_.test(cluster)) {
            written_.clear(cluster);
            (void)detail::zero_range(fd_, cluster * cluster_size_, length, true);
            held_ -= std::min(held_, length);
        }
    }

  private:
    std::filesystem::path directory_;
    std::uint64_t limit_;
    std::uint64_t cluster_size_;
    int fd_ = -1;
    ClusterSet kept_;    // spooled or all-zero
    ClusterSet written_; // spooled with data
    std::uint64_t held_ = 0, peak_ = 0, total_ = 0, used_ = 0, external_ = 0;
};

/// A compressed cluster being gathered from the stream, or handed to a worker.
struct CompressedJob {
    std::vector<std::byte> input;
    std::vector<std::byte> output;
    std::uint64_t guest = 0;  ///< disk offset of the cluster
    std::uint64_t length = 0; ///< bytes of it inside the disk
    std::uint64_t host = 0;
    std::uint64_t size = 0; ///< descriptor's size in bytes
};

Error compressed_error(const CompressedJob& job, const Error& why) {
    return Error{ErrorCode::compressed_data,
                 fmt::format("compressed cluster for virtual offset {:#x} at host offset {:#x} "
                             "(+{:#x}): {}",
                             job.guest, job.host, job.input.size(), why.message)};
}

/// A byte range [start, end) of the file.
struct Span {
    std::uint64_t start = 0, end = 0;
};

} // namespace

// ---------------------------------------------------------------------------------------------

struct StreamDecoder::Impl {
    StreamSink& sink;
    StreamOptions options;
    StreamStats stats;
    std::optional<Error> failed;
    std::optional<Hasher> hasher;

    // Header.
    std::vector<std::byte> header;
    std::size_t header_needed = kClusterBitsEnd;
    bool header_done = false;
    detail::ImageState state;
    std::uint64_t cluster_size = 0;
    std::uint64_t disk_size = 0;
    std::uint64_t l1_needed = 0; ///< L1 entries that cover the disk
    Span l1_span, refcount_span;
    std::vector<Span> skip_spans; ///< snapshot table, bitmap directory: known, not needed
    std::optional<Image> data_file;
    bool compressed_zstd = false;

    // Position in the stream.
    std::uint64_t position = 0;      ///< bytes consumed (after the header phase)
    std::uint64_t current_start = 0; ///< host offset of the cluster being processed
    Bytes current;                   ///< its bytes
    std::vector<std::byte> carry;    ///< a cluster split across feed calls
    bool tail = false;               ///< nothing more is needed: the rest is only read

    // What waits.
    std::optional<PendingQueue> queue;
    std::optional<Spool> spool;
    std::uint64_t needed_pending = 0; ///< queue entries that are not refcount blocks
    std::uint64_t l1_entries_seen = 0;
    std::uint64_t last_l2_host = UINT64_MAX;
    std::uint64_t last_l2_index = 0;
    std::vector<CompressedJob> open_jobs;

    // Output.
    std::uint64_t emitted = 0; ///< disk bytes reported to the sink
    std::uint64_t run_guest = 0;
    const std::byte* run_data = nullptr;
    std::size_t run_length = 0;
    std::uint64_t zero_start = 0, zero_length = 0;
    bool zero_present = false;
    std::vector<std::byte> scratch;
    std::vector<Span> pieces_scratch;
    std::vector<CompressedJob> done_jobs_scratch;
    std::vector<Pending> roles_scratch;
    bool l2_read_from_current = false; ///< an L2 table was read from the current cluster

    // Decompression.
    std::unique_ptr<detail::OrderedWorkers<CompressedJob>> workers;
    std::optional<Decompressor> inline_decompressor;
    CompressedJob inline_job;

    Impl(StreamSink& s, const StreamOptions& o) : sink(s), options(o) {}

    // ----- small helpers
    std::uint64_t round_up(std::uint64_t v) const {
        return v > UINT64_MAX - cluster_size ? UINT64_MAX
                                             : (v + cluster_size - 1) & ~(cluster_size - 1);
    }
    std::uint64_t cluster_of(std::uint64_t host) const { return host >> state.cluster_bits; }

    Result<void> flush_data() {
        if (run_length == 0)
            return {};
        const std::size_t length = run_length;
        run_length = 0;
        emitted += length;
        stats.data_bytes += length;
        return sink.data(run_guest, {run_data, length});
    }

    /// Data whose bytes stay valid until the next flush (the caller's piece of stream).
    Result<void> emit_data(std::uint64_t guest, Bytes bytes) {
        if (bytes.empty())
            return {};
        if (run_length && guest == run_guest + run_length &&
            bytes.data() == run_data + run_length) {
            run_length += bytes.size();
            return {};
        }
        if (auto ok = flush_data(); !ok)
            return ok;
        run_guest = guest;
        run_data = bytes.data();
        run_length = bytes.size();
        return {};
    }

    /// Data in a buffer about to be reused: out at once.
    Result<void> emit_data_now(std::uint64_t guest, Bytes bytes) {
        if (auto ok = flush_data(); !ok)
            return ok;
        emitted += bytes.size();
        stats.data_bytes += bytes.size();
        return sink.data(guest, bytes);
    }

    Result<void> flush_zero() {
        if (zero_length == 0)
            return {};
        const std::uint64_t length = zero_length;
        zero_length = 0;
        emitted += length;
        return sink.zero(zero_start, length, zero_present);
    }

    Result<void> emit_zero(std::uint64_t guest, std::uint64_t length, bool present) {
        if (length == 0)
            return {};
        if (zero_length && guest == zero_start + zero_length && present == zero_present) {
            zero_length += length;
            return {};
        }
        if (auto ok = flush_zero(); !ok)
            return ok;
        zero_start = guest;
        zero_length = length;
        zero_present = present;
        return {};
    }

    Result<void> flush() {
        if (auto ok = flush_data(); !ok)
            return ok;
        return flush_zero();
    }

    /// Bytes `[host, host + out.size())`, which lie before the end of the current cluster:
    /// from the current cluster or the spool. `release`: the clusters have one user (a data
    /// cluster, an L2 table) and are freed.
    Result<void> read_past(std::uint64_t host, std::span<std::byte> out, std::string_view what,
                           bool release) {
        std::uint64_t at = host;
        std::size_t done = 0;
        while (done < out.size()) {
            const std::uint64_t cluster = cluster_of(at);
            const std::uint64_t cluster_end = (cluster + 1) << state.cluster_bits;
            const std::size_t piece = static_cast<std::size_t>(
                std::min<std::uint64_t>(out.size() - done, cluster_end - at));
            if (at >= current_start && !current.empty()) {
                const std::uint64_t in = at - current_start;
                if (in + piece > current.size()) {
                    return Error{ErrorCode::invalid_cluster,
                                 fmt::format("{} at host offset {:#x} (+{:#x}) lies beyond end of "
                                             "stream ({:#x})",
                                             what, host, out.size(),
                                             current_start + current.size())};
                }
                std::memcpy(out.data() + done, current.data() + in, piece);
            } else {
                if (!spool->kept(cluster)) {
                    return Error{ErrorCode::invalid_cluster,
                                 fmt::format("{} at host offset {:#x} arrived in the stream "
                                             "before a table named it, as a cluster already used "
                                             "for something else (a cluster used twice: the "
                                             "image is corrupt)",
                                             what, host)};
                }
                if (auto ok = spool->read(cluster, at, out.subspan(done, piece)); !ok)
                    return ok;
                if (release)
                    spool->release(cluster, cluster_size);
            }
            done += piece;
            at += piece;
        }
        return {};
    }

    // ----- header

    Result<void> parse_header(bool at_end) {
        if (header.size() >= 8 && detail::load_be32(header.data()) == kQcowMagic &&
            detail::load_be32(header.data() + detail::header::kVersion) == 1) {
            return Error{ErrorCode::unsupported_feature,
                         "qcow version 1 images cannot be read from a stream (convert them "
                         "from a file)"};
        }
        if (header.size() >= kClusterBitsEnd && detail::load_be32(header.data()) == kQcowMagic) {
            const std::uint32_t bits =
                detail::load_be32(header.data() + detail::header::kClusterBits);
            if (bits >= kMinClusterBits && bits <= kMaxClusterBits)
                header_needed = std::size_t{1} << bits;
        }
        if (header.size() < header_needed && !at_end)
            return {};
        state.bytes = Bytes(header.data(), std::min(header.size(), header_needed));
        state.mode.stream = true;
        if (auto ok = detail::parse_image(state); !ok)
            return ok;
        const ImageInfo& info = state.info;
        if (header.size() < header_needed) {
            return Error{ErrorCode::invalid_header,
                         fmt::format("stream ended after {} bytes, inside the first cluster "
                                     "({} bytes)",
                                     header.size(), header_needed)};
        }
        if ((info.incompatible_features & kIncompatCorrupt) && !options.describe_only) {
            return Error{ErrorCode::invalid_header,
                         "the corrupt bit is set: qemu found this image inconsistent (repair it "
                         "with qemu-img check -r all before converting it)"};
        }
        if (info.backing_file && options.backing != BackingMode::none && !options.describe_only) {
            return Error{ErrorCode::unsupported_feature,
                         fmt::format("the image names a backing file '{}': a streamed image may "
                                     "not make us open other files (read it alone with "
                                     "--backing=none, or convert the chain from files)",
                                     detail::printable(*info.backing_file))};
        }
        if (state.has_data_file() && !(options.describe_only && !options.data_file)) {
            if (!options.data_file) {
                return Error{
                    ErrorCode::unsupported_feature,
                    fmt::format("the image keeps its data in an external data file{}: "
                                "a streamed image may not make us open other files "
                                "(name the data file with --data-file)",
                                info.data_file
                                    ? fmt::format(" ('{}')", detail::printable(*info.data_file))
                                    : std::string())};
            }
            OpenOptions raw;
            raw.format = "raw";
            auto file = Image::open(*options.data_file, raw);
            if (!file) {
                return Error{file.error().code,
                             fmt::format("data file {}: {}", options.data_file->string(),
                                         file.error().message)};
            }
            data_file.emplace(std::move(*file));
        } else if (options.data_file) {
            return Error{ErrorCode::invalid_argument,
                         "a data file was given, but the image has no external data file"};
        }
        cluster_size = state.cluster_size;
        disk_size = state.disk_size;
        stats.disk_size = disk_size;
        compressed_zstd = info.compression_type == CompressionType::zstd;
        const std::uint64_t coverage = state.l2_coverage();
        l1_needed = disk_size / coverage + (disk_size % coverage != 0);
        l1_span = {info.l1_table_offset, info.l1_table_offset + std::uint64_t{info.l1_size} * 8};
        refcount_span = {info.refcount_table_offset,
                         info.refcount_table_offset +
                             (std::uint64_t{info.refcount_table_clusters} << state.cluster_bits)};
        if (info.snapshot_count > 0) {
            // At least the fixed parts of the entries (the rest is spooled if it is longer).
            skip_spans.push_back(
                {info.snapshots_offset,
                 round_up(info.snapshots_offset +
                          std::uint64_t{info.snapshot_count} * detail::kSnapshotEntryFixed)});
        }
        if (info.bitmaps && info.bitmaps->directory_offset != 0 &&
            info.bitmaps->directory_size <= UINT64_MAX - info.bitmaps->directory_offset) {
            skip_spans.push_back(
                {info.bitmaps->directory_offset,
                 round_up(info.bitmaps->directory_offset + info.bitmaps->directory_size)});
        }
        queue.emplace(options.spool_directory);
        spool.emplace(options.spool_directory, options.max_spool.value_or(disk_size), cluster_size);
        if (auto ok = sink.begin(info, disk_size); !ok)
            return ok;
        header_done = true;
        // The first cluster is the header's; the stream goes on after it.
        position = cluster_size;
        carry.reserve(cluster_size);
        scratch.resize(cluster_size);
        if (l1_needed == 0)
            return check_complete();
        return {};
    }

    // ----- scheduling what the tables name

    Result<void> schedule_l2(std::uint64_t l1_index, std::uint64_t host) {
        if (host >= current_start + cluster_size) {
            ++needed_pending;
            return queue->push({host, l1_index, 0, Role::l2_table});
        }
        // Arrived already (an L2 table written before its L1 table, as after a resize). One
        // read per table: a spooled one is freed once read. One in the current cluster shares
        // it with the L1 entries naming it (a corrupt image qemu still reads): read once, so
        // that an L1 table naming its own cluster many times cannot make us read it over and
        // over.
        if (host >= current_start) {
            if (l2_read_from_current) {
                return Error{ErrorCode::invalid_table,
                             fmt::format("L2 table at {:#x} (L1 index {}) lies in the cluster "
                                         "of the L1 table, named again (the image is corrupt)",
                                         host, l1_index)};
            }
            l2_read_from_current = true;
        }
        auto ok = read_past(host, scratch, fmt::format("L2 table (L1 index {})", l1_index), true);
        if (!ok)
            return ok;
        std::vector<std::byte> table(scratch.begin(), scratch.end());
        return read_l2(l1_index, host, table);
    }

    Result<void> schedule_data(std::uint64_t guest, std::uint64_t host, std::uint32_t mask) {
        if (data_file)
            return data_from_file(guest, host, mask);
        if (state.has_data_file()) // describe_only, without the data file: zeros
            return emit_zero(guest, std::min(cluster_size, disk_size - guest), true);
        if (host >= current_start + cluster_size) {
            ++needed_pending;
            return queue->push({host, guest >> state.cluster_bits, mask, Role::data});
        }
        const std::uint64_t length = std::min(cluster_size, disk_size - guest);
        std::span<std::byte> out(scratch.data(), static_cast<std::size_t>(length));
        auto ok =
            read_past(host, out, fmt::format("data cluster for virtual offset {:#x}", guest), true);
        if (!ok)
            return ok;
        return deliver_data(guest, out, mask, true);
    }

    Result<void> schedule_compressed(std::uint64_t guest, std::uint64_t host, std::uint64_t size) {
        if (host >= current_start + cluster_size) {
            ++needed_pending;
            return queue->push({host, guest >> state.cluster_bits, static_cast<std::uint32_t>(size),
                                Role::compressed});
        }
        return start_compressed(guest, host, size);
    }

    /// A compressed stream that starts before the end of the current cluster: its bytes so far
    /// are gathered; the rest arrives with the next clusters.
    Result<void> start_compressed(std::uint64_t guest, std::uint64_t host, std::uint64_t size) {
        CompressedJob job;
        job.guest = guest;
        job.length = std::min(cluster_size, disk_size - guest);
        job.host = host;
        job.size = size;
        const std::uint64_t available_end = current_start + current.size();
        const std::uint64_t have = std::min(host + size, available_end) - host;
        job.input.resize(static_cast<std::size_t>(have));
        auto ok =
            read_past(host, job.input,
                      fmt::format("compressed cluster for virtual offset {:#x}", guest), false);
        if (!ok)
            return ok;
        if (have == size)
            return submit(std::move(job));
        open_jobs.push_back(std::move(job));
        return {};
    }

    Result<void> data_from_file(std::uint64_t guest, std::uint64_t host, std::uint32_t mask) {
        const std::uint64_t length = std::min(cluster_size, disk_size - guest);
        std::span<std::byte> out(scratch.data(), static_cast<std::size_t>(length));
        auto got = data_file->read(out, host);
        if (!got)
            return std::move(got).error();
        // Past the end of the data file reads as zeros, as qemu reads a file cut short.
        std::memset(out.data() + *got, 0, out.size() - *got);
        return deliver_data(guest, out, mask, true);
    }

    /// A data cluster's bytes for disk offset `guest`: the allocated subclusters (`mask`; all of
    /// them with standard L2 entries). `now`: the bytes are in a reused buffer.
    Result<void> deliver_data(std::uint64_t guest, Bytes bytes, std::uint32_t mask, bool now) {
        const std::uint64_t length = std::min<std::uint64_t>(bytes.size(), disk_size - guest);
        if (mask == UINT32_MAX || !state.info.extended_l2) {
            Bytes part = bytes.first(static_cast<std::size_t>(length));
            return now ? emit_data_now(guest, part) : emit_data(guest, part);
        }
        const std::uint64_t sub = std::uint64_t{1} << state.subcluster_bits;
        for (unsigned i = 0; i < detail::kSubclustersPerCluster;) {
            if (!(mask & (1u << i))) {
                ++i;
                continue;
            }
            unsigned j = i;
            while (j < detail::kSubclustersPerCluster && (mask & (1u << j)))
                ++j;
            const std::uint64_t start = i * sub;
            if (start >= length)
                break;
            const std::uint64_t end = std::min<std::uint64_t>(j * sub, length);
            Bytes part = bytes.subspan(static_cast<std::size_t>(start),
                                       static_cast<std::size_t>(end - start));
            auto ok = now ? emit_data_now(guest + start, part) : emit_data(guest + start, part);
            if (!ok)
                return ok;
            i = j;
        }
        return {};
    }

    // ----- tables

    /// Entries `[first, first + count)` of the L1 table, whose bytes are `bytes`.
    Result<void> read_l1(std::uint64_t first, Bytes bytes) {
        const std::uint64_t coverage = state.l2_coverage();
        for (std::size_t i = 0; i * 8 + 8 <= bytes.size(); ++i) {
            const std::uint64_t index = first + i;
            if (index >= l1_needed)
                break;
            ++l1_entries_seen;
            const detail::L1Entry l1 = detail::decode_l1(bytes.data() + i * 8);
            // As the extent walk (extent_iterator.cpp, classify) refuses them.
            if (l1.reserved_bits()) {
                return Error{
                    ErrorCode::invalid_table,
                    fmt::format("L1 entry {} ({:#018x}) has reserved bits set", index, l1.raw)};
            }
            const std::uint64_t guest = index * coverage;
            const std::uint64_t length = std::min(coverage, disk_size - guest);
            const std::uint64_t l2 = l1.l2_offset();
            if (l2 == 0) {
                if (auto ok = emit_zero(guest, length, false); !ok)
                    return ok;
                continue;
            }
            if (l2 & (cluster_size - 1)) {
                return Error{ErrorCode::invalid_table,
                             fmt::format("L2 table offset {:#x} (L1 index {}) is not aligned to "
                                         "the cluster size {:#x}",
                                         l2, index, cluster_size)};
            }
            if (auto ok = schedule_l2(index, l2); !ok)
                return ok;
        }
        return {};
    }

    Error cluster_error(std::string message) {
        return Error{ErrorCode::invalid_cluster, std::move(message)};
    }

    /// One L2 table (L1 entry `l1_index`): its entries classified as the extent walk classifies
    /// them (extent_iterator.cpp, classify), with the same refusals.
    Result<void> read_l2(std::uint64_t l1_index, std::uint64_t host, Bytes table) {
        using detail::ClusterType;
        ++stats.l2_tables;
        const bool extended = state.info.extended_l2;
        const bool has_data_file = state.has_data_file();
        const std::uint64_t entries = std::uint64_t{1} << state.l2_bits;
        const std::uint64_t first_guest = l1_index * state.l2_coverage();
        if (table.size() < entries * state.l2_entry_bytes) {
            return Error{ErrorCode::invalid_table,
                         fmt::format("L2 table at {:#x} (+{:#x}) lies beyond end of file ({:#x})",
                                     host, cluster_size, host + table.size())};
        }
        for (std::uint64_t i = 0; i < entries; ++i) {
            const std::uint64_t guest = first_guest + (i << state.cluster_bits);
            if (guest >= disk_size)
                break;
            const std::uint64_t length = std::min(cluster_size, disk_size - guest);
            const detail::L2Entry entry =
                detail::decode_l2(table.data() + i * state.l2_entry_bytes, extended);
            const ClusterType type = detail::cluster_type(entry, extended, has_data_file);
            if (type == ClusterType::compressed) {
                if (has_data_file) {
                    return cluster_error(fmt::format("compressed cluster at virtual offset {:#x} "
                                                     "in an image with an external data file",
                                                     guest));
                }
                const detail::CompressedDescriptor d =
                    detail::decode_compressed(entry.raw, state.compressed_layout);
                if (auto ok = schedule_compressed(guest, d.host_offset, d.size); !ok)
                    return ok;
                continue;
            }
            if (entry.reserved_bits()) {
                return cluster_error(fmt::format("L2 entry for virtual offset {:#x} ({:#018x}) "
                                                 "has reserved bits set",
                                                 guest, entry.raw));
            }
            const std::uint64_t host_offset = entry.host_offset();
            if (host_offset & (cluster_size - 1)) {
                return cluster_error(fmt::format("L2 entry for virtual offset {:#x} has host "
                                                 "offset {:#x} not aligned to the cluster size "
                                                 "{:#x}",
                                                 guest, host_offset, cluster_size));
            }
            const bool host_valid = type == ClusterType::normal || type == ClusterType::zero_alloc;
            if (!extended) {
                Result<void> ok;
                switch (type) {
                case ClusterType::zero_plain:
                case ClusterType::zero_alloc:
                    if (state.info.version < 3) {
                        return cluster_error(fmt::format("zero cluster at virtual offset {:#x} in "
                                                         "a version 2 image",
                                                         guest));
                    }
                    ok = emit_zero(guest, length, true);
                    break;
                case ClusterType::unallocated:
                    ok = emit_zero(guest, length, false);
                    break;
                default:
                    ok = schedule_data(guest, host_offset, UINT32_MAX);
                    break;
                }
                if (!ok)
                    return ok;
                continue;
            }
            const std::uint32_t allocated = entry.allocated_subclusters();
            const std::uint32_t zero = entry.zero_subclusters();
            if (allocated & zero) {
                return cluster_error(fmt::format("L2 entry for virtual offset {:#x}: subcluster "
                                                 "bitmap {:#018x} marks subclusters both "
                                                 "allocated and zero",
                                                 guest, entry.bitmap));
            }
            if (!host_valid && allocated != 0) {
                return cluster_error(fmt::format("L2 entry for virtual offset {:#x}: subclusters "
                                                 "are allocated (bitmap {:#018x}) but the host "
                                                 "offset is 0",
                                                 guest, entry.bitmap));
            }
            // Zero and unallocated subclusters now; allocated ones when their cluster arrives.
            const std::uint64_t sub = std::uint64_t{1} << state.subcluster_bits;
            for (unsigned s = 0; s < detail::kSubclustersPerCluster; ++s) {
                const std::uint64_t start = s * sub;
                if (start >= length)
                    break;
                const std::uint32_t bit = 1u << s;
                if (allocated & bit)
                    continue;
                const std::uint64_t piece = std::min(sub, length - start);
                if (auto ok = emit_zero(guest + start, piece, (zero & bit) != 0); !ok)
                    return ok;
            }
            if (allocated != 0) {
                if (auto ok = schedule_data(guest, host_offset, allocated); !ok)
                    return ok;
            }
        }
        return {};
    }

    // ----- decompression

    Result<void> deliver_job(CompressedJob& job) {
        ++stats.compressed_clusters;
        return emit_data_now(job.guest,
                             Bytes(job.output).first(static_cast<std::size_t>(job.length)));
    }

    Result<void> submit(CompressedJob job) {
        const CompressionType type =
            compressed_zstd ? CompressionType::zstd : CompressionType::zlib;
        const unsigned threads = detail::resolve_threads(options.threads);
        if (threads > 1 && !workers) {
            const std::size_t size = cluster_size;
            workers = std::make_unique<detail::OrderedWorkers<CompressedJob>>(
                threads, std::size_t{4} * threads,
                [type, size]() -> Result<detail::OrderedWorkers<CompressedJob>::Work> {
                    auto decompressor = std::make_shared<Decompressor>();
                    return detail::OrderedWorkers<CompressedJob>::Work(
                        [decompressor, type, size](CompressedJob& j) -> Result<void> {
                            j.output.resize(size);
                            auto ok = decompressor->decompress_stream(type, j.input, j.output);
                            if (!ok)
                                return compressed_error(j, ok.error());
                            return {};
                        });
                });
        }
        if (!workers || workers->started() == 0) {
            if (!inline_decompressor)
                inline_decompressor.emplace();
            std::swap(job.output, inline_job.output); // reuse one output buffer
            job.output.resize(cluster_size);
            auto ok = inline_decompressor->decompress_stream(type, job.input, job.output);
            if (ok)
                ok = deliver_job(job);
            else
                ok = compressed_error(job, ok.error());
            std::swap(job.output, inline_job.output);
            return ok;
        }
        if (workers->full()) {
            if (auto ok = drain_one(); !ok)
                return ok;
        }
        CompressedJob& slot = workers->next_slot();
        // Swap the buffers in, so that the slot's old buffers are reused next time.
        std::swap(slot.input, job.input);
        slot.guest = job.guest;
        slot.length = job.length;
        slot.host = job.host;
        slot.size = job.size;
        workers->submit();
        return {};
    }

    Result<void> drain_one() {
        auto job = workers->front();
        if (!job)
            return std::move(job).error();
        auto ok = deliver_job(**job);
        workers->release();
        return ok;
    }

    Result<void> drain_all() {
        while (workers && !workers->empty()) {
            if (auto ok = drain_one(); !ok)
                return ok;
        }
        return {};
    }

    // ----- the stream, cluster by cluster

    bool needs_more() const {
        return l1_entries_seen < l1_needed || needed_pending > 0 || !open_jobs.empty();
    }

    Result<void> check_complete() {
        if (!needs_more() && header_done && !tail) {
            tail = true;
            if (auto ok = flush(); !ok)
                return ok;
            if (auto ok = drain_all(); !ok)
                return ok;
        }
        return {};
    }

    /// Processes the cluster at `current_start` whose bytes are `bytes` (a full cluster, or
    /// the shorter last one at the end of the stream).
    Result<void> process_cluster(Bytes bytes) {
        current = bytes;
        l2_read_from_current = false;
        const std::uint64_t start = current_start;
        const std::uint64_t end = start + bytes.size();
        const std::uint64_t cluster = cluster_of(start);
        // What explains this cluster: a whole-cluster role, or pieces that cover all of it.
        bool whole = false;
        std::vector<Span>& pieces = pieces_scratch;
        pieces.clear();
        auto cover = [&](Span s) {
            const Span c{std::max(s.start, start), std::min(s.end, end)};
            if (c.start < c.end)
                pieces.push_back(c);
        };
        // qemu gives the tables whole clusters: the rest of their last cluster is unused.
        cover({l1_span.start, round_up(l1_span.end)});
        cover({refcount_span.start, round_up(refcount_span.end)});
        for (const Span& s : skip_spans)
            cover(s);
        // Compressed streams begun earlier, continuing here.
        std::vector<CompressedJob>& done_jobs = done_jobs_scratch;
        done_jobs.clear();
        for (auto it = open_jobs.begin(); it != open_jobs.end();) {
            const std::uint64_t have_end = it->host + it->input.size();
            const std::uint64_t want_end = std::min(it->host + it->size, end);
            if (want_end > have_end) {
                const std::size_t old = it->input.size();
                it->input.resize(static_cast<std::size_t>(want_end - it->host));
                std::memcpy(it->input.data() + old, bytes.data() + (have_end - start),
                            static_cast<std::size_t>(want_end - have_end));
                cover({have_end, want_end});
            }
            if (it->input.size() == it->size) {
                done_jobs.push_back(std::move(*it));
                it = open_jobs.erase(it);
            } else {
                ++it;
            }
        }
        // Roles named earlier for this cluster.
        std::vector<Pending>& roles = roles_scratch;
        roles.clear();
        for (;;) {
            auto next = queue->pop_below(end);
            if (!next)
                return std::move(next).error();
            if (!*next)
                break;
            const Pending& p = **next;
            if (p.role != Role::refcount_block)
                --needed_pending;
            if (p.role == Role::compressed)
                cover({p.host, p.host + p.aux});
            else
                whole = true;
            roles.push_back(p);
        }
        if (!whole && !tail && !covered(pieces, start, end)) {
            if (auto ok = spool->keep(cluster, bytes); !ok)
                return ok;
        }
        for (CompressedJob& job : done_jobs) {
            if (auto ok = submit(std::move(job)); !ok)
                return ok;
        }
        // The tables this cluster holds part of.
        if (l1_span.start < end && start < l1_span.end) {
            const std::uint64_t from = std::max(l1_span.start, start);
            const std::uint64_t to = std::min(l1_span.end, end);
            auto ok = read_l1((from - l1_span.start) / 8,
                              bytes.subspan(static_cast<std::size_t>(from - start),
                                            static_cast<std::size_t>(to - from)));
            if (!ok)
                return ok;
        }
        if (refcount_span.start < end && start < refcount_span.end) {
            const std::uint64_t from = std::max(refcount_span.start, start);
            const std::uint64_t to = std::min(refcount_span.end, end);
            for (std::uint64_t at = from; at + 8 <= to; at += 8) {
                const std::uint64_t block = detail::load_be64(bytes.data() + (at - start)) &
                                            detail::kRefcountTableOffsetMask;
                // Only to know the blocks when they pass; a bad entry is check's business.
                if (block != 0 && (block & (cluster_size - 1)) == 0 && block >= end) {
                    if (auto ok = queue->push({block, 0, 0, Role::refcount_block}); !ok)
                        return ok;
                }
            }
        }
        for (const Pending& p : roles) {
            Result<void> ok;
            switch (p.role) {
            case Role::l2_table:
                if (p.host == last_l2_host) {
                    return Error{ErrorCode::invalid_table,
                                 fmt::format("L2 table at {:#x} is named by L1 entries {} and {} "
                                             "(the image is corrupt)",
                                             p.host, last_l2_index, p.index)};
                }
                last_l2_host = p.host;
                last_l2_index = p.index;
                ok = read_l2(p.index, p.host,
                             bytes.subspan(static_cast<std::size_t>(p.host - start)));
                break;
            case Role::data: {
                const std::uint64_t guest = p.index << state.cluster_bits;
                const std::uint64_t length = std::min(cluster_size, disk_size - guest);
                if (bytes.size() < length) {
                    // The file ends inside the cluster (qemu allocates extended L2 subclusters
                    // without growing the file to the cluster's end): the rest reads as zeros,
                    // as qemu's block layer reads past the end of a file.
                    std::memcpy(scratch.data(), bytes.data(), bytes.size());
                    std::memset(scratch.data() + bytes.size(), 0,
                                static_cast<std::size_t>(length - bytes.size()));
                    ok =
                        deliver_data(guest, Bytes(scratch.data(), static_cast<std::size_t>(length)),
                                     p.aux, true);
                    break;
                }
                ok = deliver_data(guest, bytes, p.aux, false);
                break;
            }
            case Role::compressed:
                ok = start_compressed(p.index << state.cluster_bits, p.host, p.aux);
                break;
            case Role::refcount_block:
                break;
            }
            if (!ok)
                return ok;
        }
        if (bytes.size() == cluster_size)
            return check_complete();
        return {};
    }

    static bool covered(std::vector<Span>& pieces, std::uint64_t start, std::uint64_t end) {
        std::sort(pieces.begin(), pieces.end(),
                  [](const Span& a, const Span& b) { return a.start < b.start; });
        std::uint64_t reached = start;
        for (const Span& s : pieces) {
            if (s.start > reached)
                return false;
            reached = std::max(reached, s.end);
        }
        return reached >= end;
    }

    Result<void> consume(Bytes bytes) {
        while (!bytes.empty()) {
            if (!header_done) {
                const std::size_t take = std::min(bytes.size(), header_needed > header.size()
                                                                    ? header_needed - header.size()
                                                                    : std::size_t{0});
                header.insert(header.end(), bytes.begin(), bytes.begin() + take);
                bytes = bytes.subspan(take);
                if (header.size() >= header_needed) {
                    const std::size_t before = header_needed;
                    if (auto ok = parse_header(false); !ok)
                        return ok;
                    if (!header_done && header_needed == before)
                        return Error{ErrorCode::invalid_header, "cannot read the header"};
                }
                continue;
            }
            if (tail) {
                stats.skipped_tail_bytes += bytes.size();
                position += bytes.size();
                return {};
            }
            if (!carry.empty() || bytes.size() < cluster_size) {
                const std::size_t take = std::min<std::size_t>(
                    bytes.size(), static_cast<std::size_t>(cluster_size - carry.size()));
                carry.insert(carry.end(), bytes.begin(), bytes.begin() + take);
                bytes = bytes.subspan(take);
                if (carry.size() == cluster_size) {
                    current_start = position;
                    auto ok = process_cluster(carry);
                    if (ok)
                        ok = flush_data(); // the carry buffer is reused
                    position += cluster_size;
                    carry.clear();
                    if (!ok)
                        return ok;
                }
                continue;
            }
            while (bytes.size() >= cluster_size && !tail) {
                current_start = position;
                auto ok = process_cluster(bytes.first(static_cast<std::size_t>(cluster_size)));
                position += cluster_size;
                bytes = bytes.subspan(static_cast<std::size_t>(cluster_size));
                if (!ok)
                    return ok;
            }
            if (auto ok = flush_data(); !ok) // the caller's bytes are theirs again
                return ok;
        }
        return {};
    }

    Result<void> finish() {
        if (!header_done) {
            if (auto ok = parse_header(true); !ok)
                return ok;
        }
        if (!tail && !carry.empty()) {
            current_start = position;
            auto ok = process_cluster(carry);
            position += carry.size();
            if (!ok)
                return ok;
        }
        current = {};
        const std::uint64_t file_size = position;
        // Compressed streams cut by the end of the file: only the last, partial sector may be
        // (qemu writes compressed data byte-exact; extent_iterator.cpp, classify).
        for (CompressedJob& job : open_jobs) {
            const std::uint64_t sectors =
                (file_size + detail::kCompressedSectorSize - 1) / detail::kCompressedSectorSize;
            if (!detail::fits(sectors * detail::kCompressedSectorSize, job.host, job.size)) {
                return cluster_error(fmt::format("compressed cluster for virtual offset {:#x} at "
                                                 "host offset {:#x} (+{:#x}) lies beyond end of "
                                                 "file ({:#x})",
                                                 job.guest, job.host, job.size, file_size));
            }
            if (auto ok = submit(std::move(job)); !ok)
                return ok;
        }
        open_jobs.clear();
        // The tables the header places lie inside the file, as parse_image checks for a file
        // (the stream only knows at its end). Their contents past what the disk needs (the
        // snapshot table's entries, the bitmap directory's) are not parsed.
        const ImageInfo& info = state.info;
        auto inside = [&](std::string_view what, std::uint64_t offset,
                          std::uint64_t length) -> Result<void> {
            if (detail::fits(file_size, offset, length))
                return {};
            return Error{ErrorCode::invalid_table,
                         fmt::format("{} at {:#x} (+{:#x}) lies beyond end of file ({:#x})", what,
                                     offset, length, file_size)};
        };
        if (auto ok = inside("refcount table", refcount_span.start,
                             refcount_span.end - refcount_span.start);
            !ok)
            return ok;
        if (info.snapshot_count > 0) {
            auto ok = inside("snapshot table", info.snapshots_offset,
                             std::uint64_t{info.snapshot_count} * detail::kSnapshotEntryFixed);
            if (!ok)
                return ok;
        }
        if (info.bitmaps && info.bitmaps->directory_error.empty() && info.bitmaps->consistent) {
            auto ok = inside("bitmap directory", info.bitmaps->directory_offset,
                             info.bitmaps->directory_size);
            if (!ok)
                return ok;
        }
        if (auto ok = inside("L1 table", l1_span.start, l1_span.end - l1_span.start); !ok)
            return ok;
        if (needed_pending > 0) {
            for (;;) {
                auto next = queue->pop_below(UINT64_MAX);
                if (!next)
                    return std::move(next).error();
                if (!*next)
                    break;
                const Pending& p = **next;
                switch (p.role) {
                case Role::l2_table:
                    return Error{ErrorCode::invalid_table,
                                 fmt::format("L2 table at {:#x} (+{:#x}) lies beyond end of file "
                                             "({:#x})",
                                             p.host, cluster_size, file_size)};
                case Role::data:
                    return cluster_error(fmt::format("data cluster for virtual offset {:#x} at "
                                                     "host offset {:#x} lies beyond end of file "
                                                     "({:#x})",
                                                     p.index << state.cluster_bits, p.host,
                                                     file_size));
                case Role::compressed:
                    return cluster_error(fmt::format("compressed cluster for virtual offset {:#x} "
                                                     "at host offset {:#x} (+{:#x}) lies beyond "
                                                     "end of file ({:#x})",
                                                     p.index << state.cluster_bits, p.host, p.aux,
                                                     file_size));
                case Role::refcount_block:
                    break;
                }
            }
        }
        if (auto ok = flush(); !ok)
            return ok;
        if (auto ok = drain_all(); !ok)
            return ok;
        if (emitted != disk_size) {
            return Error{
                ErrorCode::invalid_table,
                fmt::format("the tables describe {} of the disk's {} bytes", emitted, disk_size)};
        }
        return {};
    }
};

// ---------------------------------------------------------------------------------------------

StreamDecoder::StreamDecoder(StreamSink& sink, const StreamOptions& options)
    : impl_(std::make_unique<Impl>(sink, options)) {
    if (options.expect_digest) {
        auto hasher = Hasher::create(options.expect_digest->algorithm);
        if (hasher)
            impl_->hasher.emplace(std::move(*hasher));
        else
            impl_->failed = hasher.error();
    }
}
StreamDecoder::~StreamDecoder() = default;
StreamDecoder::StreamDecoder(StreamDecoder&&) noexcept = default;
StreamDecoder& StreamDecoder::operator=(StreamDecoder&&) noexcept = default;

Result<void> StreamDecoder::feed(std::span<const std::byte> bytes) {
    Impl& impl = *impl_;
    if (impl.failed)
        return *impl.failed;
    if (impl.hasher)
        impl.hasher->update(bytes);
    impl.stats.stream_bytes += bytes.size();
    Result<void> ok = [&]() -> Result<void> {
        try {
            return impl.consume(bytes);
        } catch (const std::bad_alloc&) {
            return Error{ErrorCode::io_error, "out of memory"};
        }
    }();
    if (!ok) {
        impl.failed = ok.error();
        return ok;
    }
    if (impl.options.progress)
        impl.options.progress(impl.stats.stream_bytes);
    return {};
}

Result<StreamStats> StreamDecoder::finish() {
    Impl& impl = *impl_;
    if (impl.failed)
        return *impl.failed;
    Result<void> ok = [&]() -> Result<void> {
        try {
            return impl.finish();
        } catch (const std::bad_alloc&) {
            return Error{ErrorCode::io_error, "out of memory"};
        }
    }();
    if (ok && impl.hasher) {
        auto digest = impl.hasher->finish();
        if (!digest) {
            ok = digest.error();
        } else {
            impl.stats.input_digest = *digest;
            const ExpectedDigest& expected = *impl.options.expect_digest;
            if (!(*digest == expected.digest)) {
                ok = Error{ErrorCode::checksum_mismatch,
                           fmt::format("checksum mismatch: the stream's {} is {}, expected {}",
                                       to_string(expected.algorithm), digest->hex(),
                                       expected.digest.hex())};
            }
        }
    }
    if (!ok) {
        impl.failed = ok.error();
        return ok.error();
    }
    if (impl.spool) {
        impl.stats.spooled_bytes = impl.spool->total();
        impl.stats.spool_peak = impl.spool->peak();
        impl.stats.spool_used_bytes = impl.spool->used();
    }
    impl.failed = Error{ErrorCode::invalid_argument, "the stream decoder has finished"};
    return impl.stats;
}

bool StreamDecoder::header_read() const {
    return impl_->header_done;
}

const ImageInfo* StreamDecoder::info() const {
    return impl_->header_done ? &impl_->state.info : nullptr;
}

const StreamStats& StreamDecoder::stats() const {
    if (impl_->spool) {
        impl_->stats.spooled_bytes = impl_->spool->total();
        impl_->stats.spool_peak = impl_->spool->peak();
        impl_->stats.spool_used_bytes = impl_->spool->used();
    }
    return impl_->stats;
}

bool StreamDecoder::disk_complete() const {
    return impl_->tail;
}

// ---------------------------------------------------------------------------------------------

Result<ExpectedDigest> parse_expected_digest(std::string_view text) {
    const std::size_t colon = text.find(':');
    if (colon == std::string_view::npos) {
        return Error{
            ErrorCode::invalid_argument,
            fmt::format("'{}' is not ALGO:HEX (e.g. sha256:...)", detail::printable(text))};
    }
    auto algorithm = parse_hash_algorithm(text.substr(0, colon));
    if (!algorithm) {
        return Error{ErrorCode::invalid_argument,
                     fmt::format("unknown digest algorithm '{}' (sha256, sha512, blake2b512, "
                                 "xxh3-128)",
                                 detail::printable(text.substr(0, colon)))};
    }
    const std::string_view hex = text.substr(colon + 1);
    const std::size_t size = digest_size(*algorithm);
    if (hex.size() != size * 2) {
        return Error{ErrorCode::invalid_argument,
                     fmt::format("a {} digest has {} hex digits, not {}", to_string(*algorithm),
                                 size * 2, hex.size())};
    }
    ExpectedDigest expected;
    expected.algorithm = *algorithm;
    expected.digest.size = size;
    for (std::size_t i = 0; i < size; ++i) {
        auto nibble = [&](char c) -> int {
            if (c >= '0' && c <= '9')
                return c - '0';
            if (c >= 'a' && c <= 'f')
                return c - 'a' + 10;
            if (c >= 'A' && c <= 'F')
                return c - 'A' + 10;
            return -1;
        };
        const int high = nibble(hex[2 * i]);
        const int low = nibble(hex[2 * i + 1]);
        if (high < 0 || low < 0) {
            return Error{ErrorCode::invalid_argument,
                         fmt::format("'{}' is not hexadecimal", detail::printable(hex))};
        }
        expected.digest.bytes[i] = static_cast<std::uint8_t>(high * 16 + low);
    }
    return expected;
}

StreamReader fd_reader(int fd) {
    // A larger pipe means fewer hand-overs between the writer and us (each one waits for a
    // core on a busy machine): 4 MiB where allowed, else the unprivileged limit's 1 MiB.
    const int pipe_size = ::fcntl(fd, F_GETPIPE_SZ);
    if (pipe_size > 0 && pipe_size < (4 << 20) && ::fcntl(fd, F_SETPIPE_SZ, 4 << 20) < 0 &&
        pipe_size < (1 << 20))
        (void)::fcntl(fd, F_SETPIPE_SZ, 1 << 20);
    return [fd](std::span<std::byte> buffer) -> Result<std::size_t> {
        const ssize_t n = detail::read_some(fd, buffer.data(), buffer.size());
        if (n < 0)
            return errno_error("cannot read the stream");
        return static_cast<std::size_t>(n);
    };
}

Result<StreamStats> decode_stream(StreamDecoder& decoder, const StreamReader& read) {
    return out_of_memory_as_error([&]() -> Result<StreamStats> {
        std::vector<std::byte> buffer(std::size_t{4} << 20);
        for (;;) {
            auto n = read(buffer);
            if (!n)
                return n.error();
            if (*n == 0)
                break;
            if (auto ok = decoder.feed(Bytes(buffer.data(), std::min(*n, buffer.size()))); !ok)
                return ok.error();
        }
        return decoder.finish();
    });
}

Result<StreamStats> decode_fd(StreamDecoder& decoder, int fd) {
    return decode_stream(decoder, fd_reader(fd));
}

namespace {

/// Raw disk onto a regular file or a block device, at its disk offsets.
class SeekableRawSink : public StreamSink {
  public:
    SeekableRawSink(int fd, std::uint64_t zero_block) : fd_(fd), zero_block_(zero_block) {}

    Result<void> begin(const ImageInfo&, std::uint64_t disk_size) override {
        struct stat st {};
        if (::fstat(fd_, &st) != 0)
            return target_errno();
        if (S_ISBLK(st.st_mode)) {
            device_ = true;
            std::uint64_t size = 0;
            if (::ioctl(fd_, BLKGETSIZE64, &size) != 0)
                return target_errno();
            if (size < disk_size) {
                return target_error(fmt::format("is a block device of {} bytes, smaller than the "
                                                "disk ({} bytes)",
                                                size, disk_size));
            }
            return {};
        }
        if (!S_ISREG(st.st_mode))
            return target_error("is neither a regular file nor a block device");
        if ((st.st_size != 0 && ::ftruncate(fd_, 0) != 0) ||
            ::ftruncate(fd_, static_cast<off_t>(disk_size)) != 0) {
            return target_errno();
        }
        return {};
    }
    /// Refuse to write more than `limit` bytes of data (a spool file rather than a target).
    void limit(std::uint64_t bytes) { limit_ = bytes; }

    Result<void> data(std::uint64_t offset, std::span<const std::byte> bytes) override {
        written_ += bytes.size();
        if (written_ > limit_) {
            return Error{ErrorCode::invalid_table,
                         fmt::format("the disk holds more than {} bytes of data, more than the "
                                     "spool may take; allow more with max_spool (--max-spool)",
                                     limit_)};
        }
        if (!detail::pwrite_sparse(fd_, bytes.data(), bytes.size(), offset,
                                   device_ ? 0 : zero_block_)) {
            return target_errno();
        }
        return {};
    }
    Result<void> zero(std::uint64_t offset, std::uint64_t length, bool) override {
        if (device_ && !detail::zero_range(fd_, offset, length, false))
            return target_errno();
        return {};
    }

  private:
    int fd_;
    std::uint64_t zero_block_;
    bool device_ = false;
    std::uint64_t limit_ = UINT64_MAX;
    std::uint64_t written_ = 0;
};

/// The regular file `target`, written atomically (see AtomicFile). Its temporary is created
/// with the first data: an image refused before (a bad table, the spool limit crossed while
/// everything so far was spooled) never touches the target's directory. Whether the target
/// may be written is checked once the header is valid, before the stream goes on.
class AtomicRawSink : public StreamSink {
  public:
    AtomicRawSink(std::filesystem::path target, bool replace, std::uint64_t zero_block)
        : target_(std::move(target)), replace_(replace), zero_block_(zero_block) {}

    Result<void> begin(const ImageInfo& info, std::uint64_t disk_size) override {
        info_ = &info;
        disk_size_ = disk_size;
        struct stat st {};
        if (::stat(target_.c_str(), &st) == 0) {
            if (S_ISDIR(st.st_mode))
                return target_error("is a directory");
            if (!S_ISREG(st.st_mode))
                return target_error("exists and is not a regular file");
            if (!replace_)
                return target_error("already exists (use --force to replace it)");
        }
        return {};
    }
    Result<void> data(std::uint64_t offset, std::span<const std::byte> bytes) override {
        if (auto ok = open(); !ok)
            return ok;
        return raw_->data(offset, bytes);
    }
    Result<void> zero(std::uint64_t, std::uint64_t, bool) override {
        return {}; // a fresh regular file: its holes read as zeros
    }
    Result<void> commit() {
        if (auto ok = open(); !ok) // a disk without data: an empty sparse file
            return ok;
        if (auto ok = file_->commit(); !ok)
            return target_error(ok.error().message);
        return {};
    }

  private:
    Result<void> open() {
        if (file_)
            return {};
        if (!info_)
            return target_error("was not created");
        auto file = detail::AtomicFile::create(target_, replace_);
        if (!file)
            return target_error(file.error().message);
        file_.emplace(std::move(*file));
        raw_.emplace(file_->fd(), zero_block_);
        return raw_->begin(*info_, disk_size_);
    }

    std::filesystem::path target_;
    bool replace_;
    std::uint64_t zero_block_;
    const ImageInfo* info_ = nullptr;
    std::uint64_t disk_size_ = 0;
    std::optional<detail::AtomicFile> file_;
    std::optional<SeekableRawSink> raw_;
};

/// Turns the decoder's any-order output into disk order for a RunVisitor: what arrives at the
/// next offset to hand out goes straight through; what arrives ahead of it is written to a
/// sparse spool file at its disk offset (or, for zeros, only remembered) until its turn.
class OrderedSink : public StreamSink {
  public:
    using Begin = std::function<Result<void>(const ImageInfo&, std::uint64_t)>;
    OrderedSink(const RunVisitor& visitor, const StreamOptions& options, const Begin& begin)
        : visitor_(visitor), options_(options), begin_(begin) {}
    ~OrderedSink() override {
        if (fd_ >= 0)
            ::close(fd_);
    }

    std::uint64_t spooled() const { return total_; }
    std::uint64_t peak() const { return peak_; }

    Result<void> begin(const ImageInfo& info, std::uint64_t disk_size) override {
        disk_size_ = disk_size;
        limit_ = options_.max_spool.value_or(disk_size);
        return begin_ ? begin_(info, disk_size) : Result<void>{};
    }

    Result<void> data(std::uint64_t offset, std::span<const std::byte> bytes) override {
        if (offset == cursor_) {
            Run run;
            run.offset = offset;
            run.length = bytes.size();
            run.kind = ExtentKind::data;
            run.present = true;
            run.bytes = bytes;
            if (auto ok = visitor_(run); !ok)
                return ok;
            cursor_ += bytes.size();
            return drain();
        }
        if (held_ + bytes.size() > limit_) {
            return Error{ErrorCode::invalid_table,
                         fmt::format("the image needs more than {} bytes of spool (disk data "
                                     "that arrives ahead of its place, here for virtual offset "
                                     "{:#x}); allow more with max_spool (--max-spool)",
                                     limit_, offset)};
        }
        if (fd_ < 0) {
            auto fd = detail::open_spool_file(options_.spool_directory);
            if (!fd)
                return fd.error();
            fd_ = *fd;
        }
        if (!detail::pwrite_all(fd_, bytes.data(), bytes.size(), offset))
            return errno_error("cannot write the spool");
        held_ += bytes.size();
        total_ += bytes.size();
        peak_ = std::max(peak_, held_);
        add(offset, bytes.size(), Piece::Kind::data, true);
        return {};
    }

    Result<void> zero(std::uint64_t offset, std::uint64_t length, bool present) override {
        if (offset == cursor_) {
            if (auto ok = zero_run(offset, length, present); !ok)
                return ok;
            cursor_ += length;
            return drain();
        }
        add(offset, length, Piece::Kind::zero, present);
        return {};
    }

    Result<void> finish() {
        if (auto ok = drain(); !ok)
            return ok;
        if (cursor_ != disk_size_ || !pieces_.empty()) {
            return Error{ErrorCode::invalid_table,
                         fmt::format("the disk is incomplete at virtual offset {:#x}", cursor_)};
        }
        return {};
    }

  private:
    struct Piece {
        enum class Kind : std::uint8_t { data, zero };
        std::uint64_t end = 0;
        Kind kind = Kind::zero;
        bool present = false;
    };

    Result<void> zero_run(std::uint64_t offset, std::uint64_t length, bool present) {
        Run run;
        run.offset = offset;
        run.length = length;
        run.kind = ExtentKind::zero;
        run.present = present;
        return visitor_(run);
    }

    void add(std::uint64_t offset, std::uint64_t length, Piece::Kind kind, bool present) {
        // Joined to the piece before it when they touch and read alike: the map stays as
        // small as the out-of-order islands.
        auto next = pieces_.lower_bound(offset);
        if (next != pieces_.begin()) {
            auto before = std::prev(next);
            if (before->second.end == offset && before->second.kind == kind &&
                before->second.present == present) {
                before->second.end += length;
                if (next != pieces_.end() && next->first == before->second.end &&
                    next->second.kind == kind && next->second.present == present) {
                    before->second.end = next->second.end;
                    pieces_.erase(next);
                }
                return;
            }
        }
        if (next != pieces_.end() && next->first == offset + length && next->second.kind == kind &&
            next->second.present == present) {
            Piece piece = next->second;
            pieces_.erase(next);
            pieces_.emplace(offset, piece);
            return;
        }
        pieces_.emplace(offset, Piece{offset + length, kind, present});
    }

    Result<void> drain() {
        for (auto it = pieces_.find(cursor_); it != pieces_.end(); it = pieces_.find(cursor_)) {
            const Piece piece = it->second;
            pieces_.erase(it);
            if (piece.kind == Piece::Kind::zero) {
                if (auto ok = zero_run(cursor_, piece.end - cursor_, piece.present); !ok)
                    return ok;
                cursor_ = piece.end;
                continue;
            }
            if (buffer_.empty())
                buffer_.resize(1u << 20);
            const std::uint64_t start = cursor_;
            while (cursor_ < piece.end) {
                const std::size_t want = static_cast<std::size_t>(
                    std::min<std::uint64_t>(piece.end - cursor_, buffer_.size()));
                const ssize_t n = detail::pread_some(fd_, buffer_.data(), want, cursor_);
                if (n <= 0)
                    return errno_error("cannot read the spool", n < 0 ? errno : EIO);
                Run run;
                run.offset = cursor_;
                run.length = static_cast<std::uint64_t>(n);
                run.kind = ExtentKind::data;
                run.present = true;
                run.bytes = std::span<const std::byte>(buffer_.data(), static_cast<std::size_t>(n));
                if (auto ok = visitor_(run); !ok)
                    return ok;
                cursor_ += static_cast<std::uint64_t>(n);
            }
            (void)detail::zero_range(fd_, start, piece.end - start, true);
            held_ -= std::min(held_, piece.end - start);
        }
        return {};
    }

    const RunVisitor& visitor_;
    const StreamOptions& options_;
    const Begin& begin_;
    std::uint64_t disk_size_ = 0;
    std::uint64_t limit_ = 0;
    std::uint64_t cursor_ = 0;
    std::map<std::uint64_t, Piece> pieces_;
    int fd_ = -1;
    std::uint64_t held_ = 0, total_ = 0, peak_ = 0;
    std::vector<std::byte> buffer_;
};

} // namespace

Result<StreamStats> decode_stream_ordered(
    int in_fd, const RunVisitor& visitor, const StreamOptions& options,
    const std::function<Result<void>(const ImageInfo&, std::uint64_t disk_size)>& begin) {
    return out_of_memory_as_error([&]() -> Result<StreamStats> {
        OrderedSink sink(visitor, options, begin);
        StreamDecoder decoder(sink, options);
        auto stats = decode_fd(decoder, in_fd);
        if (!stats)
            return stats;
        if (auto ok = sink.finish(); !ok)
            return ok.error();
        stats->reorder_spooled_bytes = sink.spooled();
        stats->spool_peak = std::max(stats->spool_peak, sink.peak());
        return stats;
    });
}

Result<StreamStats> stream_to_raw(int in_fd, int out_fd, const StreamOptions& options,
                                  std::uint64_t zero_block) {
    return out_of_memory_as_error([&]() -> Result<StreamStats> {
        struct stat st {};
        if (::fstat(out_fd, &st) != 0)
            return target_errno();
        if (S_ISREG(st.st_mode) || S_ISBLK(st.st_mode)) {
            SeekableRawSink sink(out_fd, zero_block);
            StreamDecoder decoder(sink, options);
            return decode_fd(decoder, in_fd);
        }
        RunVisitor write = [out_fd](const Run& run) -> Result<void> {
            if (run.kind == ExtentKind::data) {
                if (!detail::write_all(out_fd, run.bytes.data(), run.bytes.size()))
                    return target_errno();
                return {};
            }
            for (std::uint64_t done = 0; done < run.length;) {
                const std::uint64_t n =
                    std::min<std::uint64_t>(run.length - done, sizeof detail::kZeros);
                if (!detail::write_all(out_fd, detail::kZeros, n))
                    return target_errno();
                done += n;
            }
            return {};
        };
        return decode_stream_ordered(in_fd, write, options);
    });
}

Result<StreamStats> stream_to_raw_file(int in_fd, const std::filesystem::path& target, bool replace,
                                       const StreamOptions& options, std::uint64_t zero_block) {
    return stream_to_raw_file(fd_reader(in_fd), target, replace, options, zero_block);
}

Result<StreamStats> stream_to_raw_file(const StreamReader& read,
                                       const std::filesystem::path& target, bool replace,
                                       const StreamOptions& options, std::uint64_t zero_block) {
    return out_of_memory_as_error([&]() -> Result<StreamStats> {
        AtomicRawSink sink(target, replace, zero_block);
        StreamDecoder decoder(sink, options);
        auto stats = decode_stream(decoder, read);
        if (!stats)
            return stats; // the temporary goes with the sink
        if (auto ok = sink.commit(); !ok)
            return ok.error();
        return stats;
    });
}

Result<StreamedImage> stream_to_temporary_image(int in_fd, const StreamOptions& options) {
    return out_of_memory_as_error([&]() -> Result<StreamedImage> {
        auto fd = detail::open_spool_file(options.spool_directory);
        if (!fd)
            return fd.error();
        struct Closer {
            int fd;
            ~Closer() { ::close(fd); }
        } closer{*fd};
        SeekableRawSink sink(*fd, 4096);
        // The limit is set once the header gives the disk size (the default limit).
        struct Limited : StreamSink {
            SeekableRawSink& raw;
            const StreamOptions& options;
            Limited(SeekableRawSink& r, const StreamOptions& o) : raw(r), options(o) {}
            Result<void> begin(const ImageInfo& info, std::uint64_t disk_size) override {
                raw.limit(options.max_spool.value_or(disk_size));
                return raw.begin(info, disk_size);
            }
            Result<void> data(std::uint64_t offset, std::span<const std::byte> bytes) override {
                return raw.data(offset, bytes);
            }
            Result<void> zero(std::uint64_t offset, std::uint64_t length, bool present) override {
                return raw.zero(offset, length, present);
            }
        } limited(sink, options);
        StreamDecoder decoder(limited, options);
        auto stats = decode_fd(decoder, in_fd);
        if (!stats)
            return stats.error();
        OpenOptions raw;
        raw.format = "raw";
        // The unnamed file is opened again through /proc: the Image owns its own descriptor.
        auto image = Image::open(fmt::format("/proc/self/fd/{}", *fd), raw);
        if (!image)
            return image.error();
        return StreamedImage{std::move(*image), *stats};
    });
}

} // namespace qcowmap

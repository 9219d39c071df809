// Two disks compared the way qemu-img compare does (qemu-img.c, img_compare): walk both
// allocation maps together; ranges zero on both sides, and data ranges that are the same bytes
// of the same file, need no reading; the rest is compared in steps, and a mismatch is reported
// at the start of the first differing 512-byte sector (compare_buffers / find_nonzero work
// sector by sector).
//
// The calling thread compares: memcmp straight from both mappings (DataAccess::mapping), or
// from buffers read with pread (DataAccess::read), or from decompressed clusters. With threads
// a second walk of both maps runs ahead of it (the same Planner, so both meet the same steps in
// the same order) and queues jobs into the ordered ring of detail::OrderedWorkers: mapped pages
// to make present (grouped about kPrefetchWindowBytes to a job), pieces to read, clusters to
// decompress. The caller takes each job's result out of its slot as soon as it is done (a
// buffer swap, or the list of pages), so holding one side's bytes never blocks the other's;
// pages it has compared are dropped from the process by the worker of a later job.
#include "errors.hpp"
#include "fault.hpp"
#include "image_state.hpp"
#include "populate.hpp"
#include "scratch_bytes.hpp"
#include "workers.hpp"

#include <qcowmap/compare.hpp>

#include <algorithm>
#include <cstring>
#include <deque>
#include <functional>
#include <optional>
#include <vector>

namespace qcowmap {
namespace {

constexpr std::uint64_t kSector = 512; // BDRV_SECTOR_SIZE

// The longest step when a side's bytes are read or prefetched: a read buffer's size, and the
// prefetch window (both sides' pieces of a step go into the same job).
constexpr std::uint64_t kComparePiece = 1024 * 1024;
constexpr std::size_t kMaxGroupedPieces = 64;
// Compressed clusters one job decompresses (of either side, in the order the caller takes
// them), up to kPrefetchWindowBytes of output: waking a sleeping worker for each cluster cost
// more than decompressing a 64 KiB zstd cluster on a 2-core VM.
constexpr std::size_t kMaxGroupedClusters = 16;
// Compared pages are dropped this many bytes at a time.
constexpr std::uint64_t kReleaseBatch = 4 * 1024 * 1024;
// Below this many bytes in all the files of both images (so at most this much data to read),
// the comparison runs on the calling thread. Threads cost a fixed amount: starting them, the
// look-ahead's second walk of both maps, and handing every byte to another core. On this 2-core
// VM that was 35 ms (a 1 TiB disk with 18 MiB of data in 35 MiB files: 0.055 s on one thread,
// 0.09 s with two), and two threads compare about 6 GB/s against one thread's 2 GB/s, so they
// gain that back only beyond ~100 MB.
constexpr std::uint64_t kThreadedFileBytes = 128 << 20;
// Small files can still hold much work: compressed clusters expand. Once this many bytes were
// decompressed on the calling thread, the threads start after all.
constexpr std::uint64_t kInlineDecompressedBytes = 8 << 20;

alignas(4096) const std::byte kZeros[64 * 1024] = {};

/// Index of the first non-zero byte of `bytes`, or nullopt.
std::optional<std::size_t> first_nonzero(std::span<const std::byte> bytes) {
    std::size_t done = 0;
    while (done < bytes.size()) {
        std::size_t n = std::min(bytes.size() - done, sizeof kZeros);
        if (std::memcmp(bytes.data() + done, kZeros, n) != 0) {
            for (std::size_t i = 0; i < n; ++i) {
                if (bytes[done + i] != std::byte{0})
                    return done + i;
            }
        }
        done += n;
    }
    return std::nullopt;
}

/// Index of the first byte where `a` and `b` (same size) differ, or nullopt.
std::optional<std::size_t> first_difference(std::span<const std::byte> a,
                                            std::span<const std::byte> b) {
    constexpr std::size_t kPiece = 64 * 1024;
    for (std::size_t done = 0; done < a.size(); done += kPiece) {
        std::size_t n = std::min(a.size() - done, kPiece);
        if (std::memcmp(a.data() + done, b.data() + done, n) != 0) {
            for (std::size_t i = 0; i < n; ++i) {
                if (a[done + i] != b[done + i])
                    return done + i;
            }
        }
    }
    return std::nullopt;
}

/// Where a side's bytes for a step come from.
enum class Source : std::uint8_t {
    none,       // the side takes no part (past the end of the shorter disk) or the step is skipped
    zero,       // reads as zeros: no bytes
    direct,     // data in memory rather than a file mapping (open_bytes)
    mapped,     // data from the mapping, made present ahead by workers or dropped behind
    read,       // data read with pread into a buffer
    compressed, // a compressed cluster, decompressed
};

/// One side of the walk: the current extent, without bytes.
class Side {
  public:
    Side(const Image& image, std::uint64_t start) : image_(image), extents_(image.extents(start)) {}
    Side(const Side&) = delete; // one walk, one owner
    Side& operator=(const Side&) = delete;

    /// Makes the current extent the one containing `pos`. False at the end or on error.
    bool seek(std::uint64_t pos) {
        while (!have_ || extent_.offset + extent_.length <= pos) {
            have_ = extents_.next(extent_);
            if (!have_)
                return false;
            ++serial_;
        }
        return true;
    }

    const Image& image() const { return image_; }
    const Extent& extent() const { return extent_; }
    /// Counts the extents met: tells a step that starts a new compressed cluster.
    std::uint64_t serial() const { return serial_; }
    std::uint64_t end() const { return extent_.offset + extent_.length; }
    bool zero() const { return extent_.kind == ExtentKind::zero; }
    bool failed() const { return extents_.error().has_value(); }
    const Error& error() const { return *extents_.error(); }

    /// qemu's block-status flags for the current extent (DATA, ZERO, OFFSET_VALID, ALLOCATED,
    /// EOF), as far as they depend on the map; `strict` mode compares them.
    unsigned status() const {
        unsigned s = 0;
        if (extent_.kind == ExtentKind::zero)
            s |= 1u << 1;
        else
            s |= 1u << 0;
        if (extent_.host_offset)
            s |= 1u << 2;
        if (extent_.present)
            s |= 1u << 4;
        if (end() == image_.size())
            s |= 1u << 5;
        return s;
    }

    /// The file and file offset of `pos` in a data extent, to recognise the same bytes.
    std::optional<std::pair<std::pair<std::uint64_t, std::uint64_t>, std::uint64_t>>
    host_identity(std::uint64_t pos) const {
        if (extent_.kind != ExtentKind::data || !extent_.host_offset)
            return std::nullopt;
        const detail::ImageState* layer = detail::layer_at(detail_state(image_), extent_.depth);
        if (!layer)
            return std::nullopt;
        const auto& file = layer->data_file ? layer->data_file : layer->file;
        if (!file)
            return std::nullopt;
        return std::pair{file->identity(), *extent_.host_offset + (pos - extent_.offset)};
    }

  private:
    const Image& image_;
    ExtentRange extents_; // stepped by hand (next)
    Extent extent_;
    bool have_ = false;
    std::uint64_t serial_ = 0;
};

/// One step of the comparison: `[pos, end)`, inside one extent of each side.
struct Step {
    std::uint64_t pos = 0;
    std::uint64_t end = 0;
    bool tail = false;            // past the end of the shorter disk: only `longer` counts
    bool status_mismatch = false; // strict: the block-status flags differ here
    std::array<Source, 2> source{Source::none, Source::none};
    std::array<Extent, 2> extent{};
    /// compressed: the first step inside this cluster on that side (one decompression).
    std::array<bool, 2> new_cluster{false, false};
};

/// Walks both disks together and cuts the comparison into steps. The caller and the
/// look-ahead each run one; started at the same position they meet the same steps.
class Planner {
  public:
    Planner(const Image& a, const Image& b, const CompareOptions& options, DataAccess access,
            std::uint64_t start = 0)
        : sides_{std::make_unique<Side>(a, start), std::make_unique<Side>(b, start)},
          strict_(options.strict), access_(access), pos_(start),
          common_(std::min(a.size(), b.size())), total_(std::max(a.size(), b.size())),
          longer_(a.size() >= b.size() ? 0 : 1) {}

    /// The next step; false at the end of the comparison or when a walk stopped (`failed()`).
    bool next(Step& step) {
        step = Step{};
        step.pos = pos_;
        if (pos_ < common_) {
            for (int i = 0; i < 2; ++i) {
                if (!sides_[i]->seek(pos_))
                    return fail(i);
            }
            Side& a = *sides_[0];
            Side& b = *sides_[1];
            step.end = std::min({a.end(), b.end(), common_});
            step.status_mismatch = strict_ && a.status() != b.status();
            auto identity = a.host_identity(pos_);
            const bool skip = (a.zero() && b.zero()) ||
                              (identity && identity == b.host_identity(pos_)); // same bytes
            if (!skip && !step.status_mismatch) {
                for (int i = 0; i < 2; ++i)
                    describe(step, i);
            }
        } else if (pos_ < total_) {
            if (!sides_[longer_]->seek(pos_))
                return fail(longer_);
            step.tail = true;
            step.end = sides_[longer_]->end();
            if (!sides_[longer_]->zero())
                describe(step, longer_);
        } else {
            return false;
        }
        pos_ = step.end;
        return true;
    }

    /// Which side's walk stopped early (an error, or a map that ended before the disk).
    std::optional<int> failed() const { return failed_; }
    const Side& side(int i) const { return *sides_[i]; }
    int longer() const { return longer_; }

  private:
    bool fail(int side) {
        failed_ = side;
        return false;
    }

    void describe(Step& step, int i) {
        const Side& side = *sides_[i];
        const Extent& e = side.extent();
        Source source = Source::zero;
        if (e.kind == ExtentKind::compressed) {
            source = Source::compressed;
            step.new_cluster[i] = side.serial() != decompressed_serial_[i];
            decompressed_serial_[i] = side.serial();
        } else if (e.kind == ExtentKind::data) {
            if (!e.file)
                source = Source::direct;
            else if (access_ == DataAccess::read)
                source = Source::read;
            else
                source = Source::mapped;
        }
        if (source == Source::read || source == Source::mapped)
            step.end = std::min(step.end, step.pos + kComparePiece);
        step.source[i] = source;
        step.extent[i] = e;
    }

    std::array<std::unique_ptr<Side>, 2> sides_;
    bool strict_;
    DataAccess access_;
    std::uint64_t pos_;
    std::uint64_t common_;
    std::uint64_t total_;
    int longer_;
    std::array<std::uint64_t, 2> decompressed_serial_{0, 0};
    std::optional<int> failed_;
};

/// Adds `bytes` to `ranges`, extending a range it continues: a step's pieces alternate
/// between the two files, each of whose runs usually follow on from the last.
void add_pages(std::vector<std::span<const std::byte>>& ranges, std::span<const std::byte> bytes) {
    for (auto it = ranges.rbegin(); it != ranges.rend(); ++it) {
        if (it->data() + it->size() == bytes.data()) {
            *it = {it->data(), it->size() + bytes.size()};
            return;
        }
    }
    ranges.push_back(bytes);
}

/// A compressed cluster of one side, decompressed by a job. Its own error is reported only
/// when the caller takes it: an earlier cluster of the group may already differ, and which
/// image is damaged depends on the cluster.
struct Cluster {
    int side = 0;
    Extent extent;
    detail::ScratchBytes buffer;
    std::optional<Error> error;
};

/// One job of the ring: compressed clusters to decompress, or a group of data pieces to make
/// present or to read into one buffer, back to back, about kPrefetchWindowBytes in all (a
/// fragmented image's 64 KiB runs would otherwise cost a hand-over each). Either side's, in
/// the order the caller compares them.
struct Job {
    Source source = Source::none;  // mapped, read or compressed
    std::vector<Cluster> clusters; // compressed
    detail::ScratchBytes buffer;
    struct Tag {
        int side;
        std::uint64_t pos;
        std::uint64_t length;
        FilePosition from; // read: where the piece is in its file
        std::size_t at;    // read: where it goes in `buffer`
    };
    std::vector<Tag> pieces;                               // mapped and read
    std::vector<std::span<const std::byte>> pages;         // mapped: the address ranges, merged
    std::vector<std::span<const std::byte>> release_first; // pages the caller is done with
};

/// A unit of work the look-ahead found, before it becomes (part of) a job.
struct Unit {
    Source source;
    int side;
    std::uint64_t pos;
    std::uint64_t length;
    Extent extent;
};

/// The look-ahead walk, the job ring, and the bytes the caller took out of it.
class Prefetcher {
  public:
    Prefetcher(const Image& a, const Image& b, const CompareOptions& options, DataAccess access,
               unsigned threads, std::uint64_t start)
        : cluster_size_{cluster_size_of(a), cluster_size_of(b)},
          ahead_(a, b, options, access, start), capacity_(4 * static_cast<std::size_t>(threads)),
          slot_pages_(capacity_) {
        workers_.emplace(threads, capacity_, [a, b]() -> Result<detail::OrderedWorkers<Job>::Work> {
            auto decompressor = std::make_shared<Decompressor>();
            return detail::OrderedWorkers<Job>::Work(
                [a, b, decompressor](Job& job) -> Result<void> {
                    return run(job, a, b, *decompressor);
                });
        });
    }

    ~Prefetcher() {
        workers_.reset(); // stop and join first, then drop what is still mapped
        for (const auto& slot : slot_pages_) {
            for (const auto& pages : slot)
                detail::release_pages(pages);
        }
        for (const auto& pages : group_.pages)
            detail::release_pages(pages);
        for (const auto& pages : done_pages_)
            detail::release_pages(pages);
    }

    Prefetcher(const Prefetcher&) = delete;
    Prefetcher& operator=(const Prefetcher&) = delete;

    bool idle() const { return workers_->started() == 0; }

    /// The bytes of side `i` for `step`, taken from the job that produced them. Data stays in
    /// the mapping or in the group's buffer (valid until the group after next is taken, so both
    /// sides of a step stay valid); a decompressed cluster is swapped into `cluster` (the old
    /// buffer goes back to the ring with the next job of clusters).
    Result<std::span<const std::byte>> take(const Step& step, int i,
                                            detail::ScratchBytes& cluster) {
        const Source source = step.source[i];
        const Extent& e = step.extent[i];
        const std::uint64_t length = step.end - step.pos;
        if (source == Source::compressed) {
            if (used_clusters_ == clusters_.size()) {
                auto job = front(source);
                if (!job)
                    return std::move(job).error();
                clusters_.swap((*job)->clusters);
                used_clusters_ = 0;
                workers_->release();
            }
            Cluster& next = clusters_[used_clusters_++];
            if (next.side != i || next.extent.offset != e.offset ||
                next.extent.compressed_host_offset != e.compressed_host_offset) {
                return lost_place();
            }
            if (next.error)
                return *next.error;
            cluster.swap(next.buffer);
            return std::span<const std::byte>(cluster);
        }
        if (used_ == group_.pieces.size()) {
            auto job = front(source);
            if (!job)
                return std::move(job).error();
            finish_group();
            group_.pieces.swap((*job)->pieces);
            group_.pages.swap((*job)->pages);
            // The other buffer may still hold the other side's bytes of this step.
            current_ ^= 1;
            group_buffers_[current_].swap((*job)->buffer);
            workers_->release();
        }
        const Job::Tag& tag = group_.pieces[used_];
        if (tag.side != i || tag.pos != step.pos || tag.length != length)
            return lost_place();
        ++used_;
        if (source == Source::mapped)
            return e.bytes.subspan(step.pos - e.offset, length);
        return std::span<const std::byte>(group_buffers_[current_]).subspan(tag.at, length);
    }

  private:
    static Result<void> run(Job& job, const Image& a, const Image& b, Decompressor& decompressor) {
        for (const auto& pages : job.release_first)
            detail::release_pages(pages);
        job.release_first.clear();
        switch (job.source) {
        case Source::mapped:
            for (const auto& pages : job.pages)
                detail::populate_pages(pages, Prefetch::touch);
            return {};
        case Source::read: {
            // Each side's pieces lie back to back in the buffer: pieces that follow on from
            // each other in the file too (a fragmented image's runs usually do) are one pread.
            std::size_t total = 0;
            for (const Job::Tag& tag : job.pieces)
                total = std::max(total, tag.at + static_cast<std::size_t>(tag.length));
            reserve_once(job.buffer);
            job.buffer.resize(total);
            for (int side = 0; side < 2; ++side) {
                std::optional<FilePosition> from;
                std::size_t at = 0, length = 0;
                auto flush = [&]() -> Result<void> {
                    if (length == 0)
                        return {};
                    return detail::read_exactly(
                        *from, std::span<std::byte>(job.buffer).subspan(at, length));
                };
                for (const Job::Tag& tag : job.pieces) {
                    if (tag.side != side)
                        continue;
                    if (length > 0 && tag.from.fd == from->fd &&
                        tag.from.offset == from->offset + length && tag.at == at + length) {
                        length += static_cast<std::size_t>(tag.length);
                        continue;
                    }
                    if (auto ok = flush(); !ok)
                        return ok;
                    from = tag.from;
                    at = tag.at;
                    length = static_cast<std::size_t>(tag.length);
                }
                if (auto ok = flush(); !ok)
                    return ok;
            }
            return {};
        }
        default:
            for (Cluster& c : job.clusters)
                c.error.reset();
            for (Cluster& c : job.clusters) {
                const Image& image = c.side == 0 ? a : b;
                const detail::ImageState* layer =
                    detail::layer_at(detail_state(image), c.extent.depth);
                c.buffer.resize(layer ? layer->cluster_size : 0);
                if (auto ok = decompressor.decompress_cluster(image, c.extent, c.buffer); !ok)
                    c.error = std::move(ok).error();
            }
            return {};
        }
    }

    /// The cluster size of each layer of `image`, by depth.
    static std::function<std::uint64_t(std::uint32_t)> cluster_size_of(const Image& image) {
        return [image](std::uint32_t depth) -> std::uint64_t {
            const detail::ImageState* layer = detail::layer_at(detail_state(image), depth);
            return layer ? layer->cluster_size : 0;
        };
    }

    /// Buffers move between slots, the caller and the groups (swapped, never copied), and a
    /// job's size varies: reserving the largest common size at a buffer's first use keeps them
    /// from being reallocated (fresh pages, faulted in again) as they pass around.
    static void reserve_once(detail::ScratchBytes& buffer) {
        if (buffer.capacity() < kComparePiece)
            buffer.reserve(kComparePiece);
    }

    static Error lost_place() {
        return detail::image_changed("two walks of its metadata disagree");
    }

    Result<Job*> front(Source source) {
        top_up();
        if (workers_->empty())
            return lost_place(); // the look-ahead stopped before: the caller's walk will too
        auto job = workers_->front();
        if (job && (*job)->source != source)
            return lost_place();
        return job;
    }

    void finish_group() {
        for (const auto& pages : group_.pages) {
            add_pages(done_pages_, pages);
            done_bytes_ += pages.size();
        }
        group_.pages.clear();
        group_.pieces.clear();
        used_ = 0;
    }

    /// Turns the look-ahead's steps into units of work; false when it has no more.
    bool more_units() {
        Step step;
        while (units_.empty()) {
            if (stopped_ || !ahead_.next(step) || step.status_mismatch) {
                stopped_ = true; // the caller stops at the same place
                return false;
            }
            for (int i = 0; i < 2; ++i) {
                const Source s = step.source[i];
                if (s == Source::mapped || s == Source::read) {
                    units_.push_back(Unit{s, i, step.pos, step.end - step.pos, step.extent[i]});
                } else if (s == Source::compressed && step.new_cluster[i]) {
                    units_.push_back(
                        Unit{s, i, step.extent[i].offset, step.extent[i].length, step.extent[i]});
                }
            }
        }
        return true;
    }

    /// Fills `job` with the next compressed clusters, up to kMaxGroupedClusters, or with data
    /// pieces up to a window's worth. False when the look-ahead has nothing more.
    bool fill(Job& job) {
        std::uint64_t grouped = 0;
        std::array<std::size_t, 2> side_bytes{0, 0};
        std::size_t clusters = 0; // of job.clusters, whose buffers are reused
        std::uint64_t cluster_bytes = 0;
        while (more_units()) {
            const Unit& u = units_.front();
            if (u.source == Source::compressed) {
                const std::uint64_t size = cluster_size_[u.side](u.extent.depth);
                if (!job.pieces.empty() || clusters == kMaxGroupedClusters ||
                    (clusters > 0 && cluster_bytes + size > kPrefetchWindowBytes))
                    break; // close the group first
                cluster_bytes += size;
                job.source = u.source;
                if (clusters == job.clusters.size())
                    job.clusters.emplace_back();
                job.clusters[clusters].side = u.side;
                job.clusters[clusters].extent = u.extent;
                ++clusters;
                units_.pop_front();
                continue;
            }
            if (clusters > 0)
                break; // close the clusters first
            if (!job.pieces.empty() && (grouped + u.length > kPrefetchWindowBytes ||
                                        job.pieces.size() == kMaxGroupedPieces)) {
                break; // this job is full; the piece starts the next one
            }
            job.source = u.source;
            const std::uint64_t skip = u.pos - u.extent.offset;
            FilePosition from{};
            if (u.extent.file)
                from = FilePosition{u.extent.file->fd, u.extent.file->offset + skip};
            job.pieces.push_back(Job::Tag{u.side, u.pos, u.length, from, side_bytes[u.side]});
            if (u.source == Source::mapped)
                add_pages(job.pages, u.extent.bytes.subspan(skip, u.length));
            grouped += u.length;
            side_bytes[u.side] += static_cast<std::size_t>(u.length);
            units_.pop_front();
        }
        if (clusters > 0) {
            job.clusters.resize(clusters);
            return true;
        }
        // Side 1's pieces go after side 0's.
        for (Job::Tag& tag : job.pieces) {
            if (tag.side == 1)
                tag.at += side_bytes[0];
        }
        return !job.pieces.empty();
    }

    void top_up() {
        while (!workers_->full()) {
            Job& job = workers_->next_slot();
            std::vector<std::span<const std::byte>> previous = std::move(job.pages);
            job.pages.clear();
            job.pieces.clear();
            if (!fill(job)) {
                job.pages = std::move(previous);
                return;
            }
            // What the caller is done with goes with the next job to a worker, a few MiB at a
            // time: each madvise flushes the TLBs of every CPU running this process.
            if (done_bytes_ >= kReleaseBatch) {
                job.release_first.insert(job.release_first.end(), done_pages_.begin(),
                                         done_pages_.end());
                done_pages_.clear();
                done_bytes_ = 0;
            }
            slot_pages_[submitted_ % capacity_] = job.pages;
            workers_->submit();
            ++submitted_;
        }
    }

    std::array<std::function<std::uint64_t(std::uint32_t)>, 2> cluster_size_; // by layer depth
    Planner ahead_;
    bool stopped_ = false;
    std::deque<Unit> units_;
    const std::size_t capacity_;
    std::uint64_t submitted_ = 0;
    std::vector<std::vector<std::span<const std::byte>>> slot_pages_;
    Job group_; // the data group the caller is in (pieces and pages only)
    std::size_t used_ = 0;
    std::array<detail::ScratchBytes, 2> group_buffers_;
    std::vector<Cluster> clusters_; // the clusters the caller is taking
    std::size_t used_clusters_ = 0;
    int current_ = 0;
    std::vector<std::span<const std::byte>> done_pages_; // compared, not yet dropped
    std::uint64_t done_bytes_ = 0;
    std::optional<detail::OrderedWorkers<Job>> workers_; // reset first by the destructor
};

/// Produces a side's bytes on the calling thread (no workers); compared mapped pages are
/// dropped from the process in batches.
class InlineSide {
  public:
    explicit InlineSide(const Image& image) : image_(image), releaser_(image) {}

    Result<std::span<const std::byte>> bytes(const Step& step, int i,
                                             detail::ScratchBytes& buffer) {
        const Extent& e = step.extent[i];
        const std::uint64_t length = step.end - step.pos;
        switch (step.source[i]) {
        case Source::read: {
            buffer.resize(static_cast<std::size_t>(length));
            auto ok = detail::read_exactly(
                FilePosition{e.file->fd, e.file->offset + (step.pos - e.offset)}, buffer);
            if (!ok)
                return std::move(ok).error();
            return std::span<const std::byte>(buffer);
        }
        case Source::compressed: {
            if (step.new_cluster[i]) {
                const detail::ImageState* layer = detail::layer_at(detail_state(image_), e.depth);
                buffer.resize(layer ? layer->cluster_size : 0);
                if (auto ok = decompressor_.decompress_cluster(image_, e, buffer); !ok)
                    return std::move(ok).error();
            }
            return std::span<const std::byte>(buffer);
        }
        default: {
            auto bytes = e.bytes.subspan(step.pos - e.offset, length);
            if (step.source[i] == Source::mapped)
                releaser_.consumed(bytes);
            return bytes;
        }
        }
    }

  private:
    const Image& image_;
    Decompressor decompressor_;
    detail::PageReleaser releaser_;
};

CompareResult mismatch(std::uint64_t offset, bool size_warning = false) {
    CompareResult r;
    r.outcome = CompareResult::Outcome::content_mismatch;
    r.offset = offset / kSector * kSector;
    r.size_warning = size_warning;
    return r;
}

/// The bytes of every file of `image` (its layers and their data files): the most a
/// comparison can read from it.
std::uint64_t file_bytes(const Image& image) {
    std::uint64_t total = 0;
    for (const detail::ImageState* layer = &detail_state(image); layer;
         layer = layer->backing.get()) {
        total += layer->bytes.size();
        if (layer->data_file)
            total += layer->data_bytes.size();
    }
    return total;
}

} // namespace

namespace {

/// An error of `image` (the compare's first or second) at `stage`: said to be about that image
/// unless it already names its origin.
Error compare_error(Error error, const Image& image, ErrorStage stage) {
    error.stage = stage;
    return detail::attribute(std::move(error), ErrorOrigin::image, image.path().string());
}

Result<CompareResult> compare_walk(const Image& a, const Image& b, const CompareOptions& options) {
    const std::uint64_t size_a = a.size();
    const std::uint64_t size_b = b.size();
    if (options.strict && size_a != size_b) {
        CompareResult r;
        r.outcome = CompareResult::Outcome::size_mismatch;
        return r;
    }
    const DataAccess access = detail::resolve(options.data_access);
    const unsigned threads = detail::resolve_threads(options.threads);
    Planner plan(a, b, options, access);
    std::optional<Prefetcher> prefetcher;
    bool no_threads = threads <= 1;
    const bool small_files =
        options.threads == 0 && file_bytes(a) + file_bytes(b) < kThreadedFileBytes;
    std::uint64_t decompressed_here = 0;
    std::array<InlineSide, 2> inline_sides{InlineSide(a), InlineSide(b)};
    // Read pieces and decompressed clusters the caller holds, per side.
    std::array<detail::ScratchBytes, 2> buffers;
    const std::uint64_t larger = std::max(size_a, size_b);
    auto progress = [&](std::uint64_t done) {
        if (options.progress)
            options.progress(done, larger);
    };
    Step step;
    while (plan.next(step)) {
        progress(step.pos);
        if (step.status_mismatch) {
            CompareResult r;
            r.outcome = CompareResult::Outcome::status_mismatch;
            r.offset = step.pos;
            return r;
        }
        const bool needs_a = step.source[0] != Source::none && step.source[0] != Source::zero;
        const bool needs_b = step.source[1] != Source::none && step.source[1] != Source::zero;
        if (!needs_a && !needs_b)
            continue; // zero on both sides, the same bytes, or a zero tail
        const bool produced = [&] {
            for (int i = 0; i < 2; ++i) {
                const Source s = step.source[i];
                if (s == Source::mapped || s == Source::read ||
                    (s == Source::compressed && step.new_cluster[i]))
                    return true;
            }
            return false;
        }();
        // The look-ahead starts at this step: not where a side is inside a cluster decompressed
        // here (it would count that cluster as new).
        const bool mid_cluster = [&] {
            for (int i = 0; i < 2; ++i) {
                if (step.source[i] == Source::compressed && !step.new_cluster[i])
                    return true;
            }
            return false;
        }();
        const bool worth_threads =
            !small_files || (decompressed_here >= kInlineDecompressedBytes && !mid_cluster);
        if (produced && !prefetcher && !no_threads && worth_threads) {
            try {
                prefetcher.emplace(a, b, options, access, threads, step.pos);
                if (prefetcher->idle()) {
                    prefetcher.reset();
                    no_threads = true;
                }
            } catch (const std::exception&) {
                prefetcher.reset();
                no_threads = true;
            }
        }
        std::array<std::span<const std::byte>, 2> bytes;
        for (int i = 0; i < 2; ++i) {
            const Source s = step.source[i];
            if (s == Source::none || s == Source::zero)
                continue;
            const Extent& e = step.extent[i];
            Result<std::span<const std::byte>> got = std::span<const std::byte>{};
            const bool from_job = prefetcher && (s == Source::mapped || s == Source::read ||
                                                 (s == Source::compressed && step.new_cluster[i]));
            if (from_job) {
                got = prefetcher->take(step, i, buffers[i]);
            } else if (s == Source::compressed && !step.new_cluster[i]) {
                got = std::span<const std::byte>(buffers[i]); // the cluster taken before
            } else {
                got = inline_sides[i].bytes(step, i, buffers[i]);
                if (got && s == Source::compressed)
                    decompressed_here += got->size();
            }
            if (!got) {
                return compare_error(std::move(got).error(), i == 0 ? a : b, ErrorStage::read);
            }
            bytes[i] = *got;
            if (s == Source::compressed) {
                bytes[i] = bytes[i].subspan(
                    static_cast<std::size_t>(e.offset_in_cluster + (step.pos - e.offset)),
                    static_cast<std::size_t>(step.end - step.pos));
            }
        }
        std::optional<std::size_t> diff;
        if (needs_a && needs_b) {
            diff = first_difference(bytes[0], bytes[1]);
        } else {
            diff = first_nonzero(needs_a ? bytes[0] : bytes[1]);
        }
        if (diff)
            return mismatch(step.pos + *diff, step.tail);
    }
    if (auto side = plan.failed()) {
        const Side& s = plan.side(*side);
        Error e =
            s.failed() ? s.error() : Error{ErrorCode::invalid_table, "allocation map ended early"};
        return compare_error(std::move(e), *side == 0 ? a : b, ErrorStage::map);
    }
    progress(larger);
    CompareResult r;
    r.size_warning = size_a != size_b;
    return r;
}

} // namespace

Result<CompareResult> compare_images(const Image& a, const Image& b,
                                     const CompareOptions& options) {
    // A read of either image's mapping that faults: a read error of the image it belongs to.
    detail::FaultBoundary boundary;
    auto result = compare_walk(a, b, options);
    auto fault = boundary.finish({});
    if (fault && (result || boundary.own_fault())) {
        int side = 0;
        if (boundary.own_fault()) {
            side = detail::maps_address(detail_state(a), boundary.fault_address()) ? 0 : 1;
            fault =
                detail::describe_fault(boundary.fault_address(), side == 0 ? a.path() : b.path());
        }
        return compare_error(std::move(*fault), side == 0 ? a : b, ErrorStage::read);
    }
    // A mismatch or a failure met while a file changed under the walk is the change's doing.
    for (int side = 0; side < 2; ++side) {
        if (auto unchanged = (side == 0 ? a : b).check_unchanged(); !unchanged) {
            return compare_error(std::move(unchanged).error(), side == 0 ? a : b, ErrorStage::read);
        }
    }
    return result;
}

} // namespace qcowmap

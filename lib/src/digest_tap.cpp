// DigestTap: the digest of the disk a writer produces, from the bytes it already has in hand.
//
// The writer's thread only cuts what it is given into jobs of about kJobBytes: references to
// bytes of the image's mapping (stable), copies of anything else (decompressed clusters, read
// buffers), and counts of zeros. Jobs go through the library's ordered worker ring
// (detail::OrderedWorkers). A whole-disk digest is one stream, so it has one worker, which
// takes the jobs in order. A blkhash digest has a job entry per block (a block that several
// pieces make up, or that is part zeros, is assembled in the job's buffer): the workers hash
// blocks in any order and the writer's thread feeds their digests to the outer digest in
// order as it takes jobs back.
#include "digest_tap.hpp"

#include "digest_internal.hpp"
#include "image_state.hpp"
#include "populate.hpp"
#include "workers.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

namespace qcowmap::detail {
namespace {

/// Bytes of data one job holds (referenced or copied): a millisecond of SHA-256, so that the
/// hand-over of a job costs little next to it.
constexpr std::size_t kJobBytes = 1 << 20;
/// Entries one job holds at most (blocks of one job, or pieces of a stream).
constexpr std::size_t kJobEntries = 64;

/// One entry of a job: zeros (a count of zero bytes for a stream, of whole zero blocks for
/// blkhash) or bytes (a piece of the stream, or one whole block), which the worker reads from
/// `file` instead of the mapping when that is set.
struct Entry {
    std::uint64_t zeros = 0;
    std::span<const std::byte> bytes;
    std::optional<FilePosition> file;
};

struct Job {
    std::vector<Entry> entries;
    std::vector<std::byte> buffer; // copies; sized kJobBytes once, so spans into it stay valid
    std::size_t used = 0;          // bytes of `buffer` in use
    std::size_t weight = 0;        // bytes of data the job holds
    std::vector<Digest> digests;   // blkhash: the digest of each entry with bytes
    bool last = false;             // stream: finish the digest after this job
    Digest digest;                 // stream: the digest, once `last` ran

    void reset() {
        entries.clear();
        used = 0;
        weight = 0;
        last = false;
    }
    std::span<std::byte> take(std::size_t n) {
        if (buffer.size() < kJobBytes)
            buffer.resize(kJobBytes);
        auto out = std::span<std::byte>(buffer).subspan(used, n);
        used += n;
        return out;
    }
    std::size_t room() const { return kJobBytes - used; }
};

/// What a worker keeps: its hasher, and for blkhash the digests of zero blocks.
class JobWork {
  public:
    JobWork(Hasher hasher, bool blocks, const Digest& full_zero, std::uint64_t block_size)
        : hasher_(std::move(hasher)), blocks_(blocks), full_zero_(full_zero),
          block_size_(block_size) {}

    /// The bytes of `e`: in place, or read from its file into this worker's buffer.
    Result<std::span<const std::byte>> bytes_of(const Entry& e) {
        if (!e.file)
            return e.bytes;
        if (read_buffer_.size() < e.bytes.size())
            read_buffer_.resize(e.bytes.size());
        auto out = std::span<std::byte>(read_buffer_).first(e.bytes.size());
        if (auto ok = read_exactly(*e.file, out); !ok)
            return std::move(ok).error();
        return std::span<const std::byte>(out);
    }

    Result<void> run(Job& job) {
        if (!blocks_) {
            for (const Entry& e : job.entries) {
                if (e.bytes.empty()) {
                    hasher_.update_zeros(e.zeros);
                    continue;
                }
                auto bytes = bytes_of(e);
                if (!bytes)
                    return std::move(bytes).error();
                hasher_.update(*bytes);
            }
            if (job.last) {
                auto digest = hasher_.finish();
                if (!digest)
                    return std::move(digest).error();
                job.digest = *digest;
            }
            return {};
        }
        job.digests.resize(job.entries.size());
        for (std::size_t i = 0; i < job.entries.size(); ++i) {
            const Entry& e = job.entries[i];
            if (e.bytes.empty())
                continue;
            auto bytes = bytes_of(e);
            if (!bytes)
                return std::move(bytes).error();
            if (bytes->size() == block_size_ && all_zero(*bytes)) {
                job.digests[i] = full_zero_;
                continue;
            }
            hasher_.update(*bytes); // a short last block of zeros is rare: hashed as it is
            auto digest = hasher_.finish();
            if (!digest)
                return std::move(digest).error();
            job.digests[i] = *digest;
        }
        return {};
    }

  private:
    Hasher hasher_;
    bool blocks_;
    Digest full_zero_;
    std::uint64_t block_size_;
    std::vector<std::byte> read_buffer_;
};

} // namespace

struct DigestTap::Impl {
    using Workers = OrderedWorkers<Job>;

    HashAlgorithm algorithm;
    bool blocks = false;      // blkhash
    bool read_stable = false; // DataAccess::read: workers pread stable bytes that lie in a file
    std::uint64_t size = 0;
    std::uint64_t position = 0; // bytes of the disk fed so far
    std::optional<BlockDigestFeed> feed;
    std::optional<Workers> workers;
    std::optional<JobWork> inline_work; // no thread could be started
    Job inline_job;
    Job* job = nullptr;                // the job being filled
    std::span<std::byte> assembly;     // blkhash: the block being assembled in `job`'s buffer
    std::optional<Digest> stream_done; // stream: the digest, once the last job ran

    /// The job to fill, making room in the ring first.
    Result<Job*> current() {
        if (job)
            return job;
        if (workers) {
            if (workers->full()) {
                if (auto ok = take_front(); !ok)
                    return std::move(ok).error();
            }
            job = &workers->next_slot();
        } else {
            job = &inline_job;
        }
        job->reset();
        return job;
    }

    Result<void> consume(const Job& done) {
        if (!blocks) {
            if (done.last)
                stream_done = done.digest;
            return {};
        }
        for (std::size_t i = 0; i < done.entries.size(); ++i) {
            const Entry& e = done.entries[i];
            if (e.bytes.empty())
                feed->add_zero_blocks(e.zeros);
            else
                feed->add(done.digests[i]);
        }
        return {};
    }

    Result<void> take_front() {
        auto front = workers->front();
        if (!front)
            return std::move(front).error(); // the ring's destructor stops and joins the workers
        auto ok = consume(**front);
        workers->release();
        return ok;
    }

    /// Hands the job being filled to the workers (or runs it here).
    Result<void> submit() {
        if (!job)
            return {};
        Job* full = job;
        job = nullptr;
        if (workers) {
            workers->submit();
            return {};
        }
        if (auto ok = inline_work->run(*full); !ok)
            return ok;
        return consume(*full);
    }

    Result<void> maybe_submit() {
        if (job && assembly.empty() &&
            (job->weight >= kJobBytes || job->entries.size() >= kJobEntries))
            return submit();
        return {};
    }

    Result<void> add_bytes(std::span<const std::byte> bytes, std::size_t weight,
                           std::optional<FilePosition> file = std::nullopt) {
        auto j = current();
        if (!j)
            return std::move(j).error();
        (*j)->entries.push_back(Entry{0, bytes, file});
        (*j)->weight += weight;
        return maybe_submit();
    }

    Result<void> add_zeros(std::uint64_t count) {
        auto j = current();
        if (!j)
            return std::move(j).error();
        auto& entries = (*j)->entries;
        if (!entries.empty() && entries.back().bytes.empty())
            entries.back().zeros += count;
        else
            entries.push_back(Entry{count, {}, std::nullopt});
        if (!blocks) {
            (*j)->weight += static_cast<std::size_t>(std::min<std::uint64_t>(count, kJobBytes));
            return maybe_submit();
        }
        return {};
    }

    // ---- a stream (whole-disk algorithms) ----

    /// Where the byte `done` bytes into a stable piece lies in its file, when the workers
    /// are to read it from there.
    std::optional<FilePosition> file_at(const std::optional<FilePosition>& file,
                                        std::uint64_t done) const {
        if (!file || !read_stable)
            return std::nullopt;
        return FilePosition{file->fd, file->offset + done};
    }

    Result<void> stream_data(std::span<const std::byte> bytes, bool stable,
                             const std::optional<FilePosition>& file) {
        std::uint64_t done = 0;
        while (!bytes.empty()) {
            if (stable) {
                const std::size_t n = std::min(bytes.size(), kJobBytes);
                if (auto ok = add_bytes(bytes.first(n), n, file_at(file, done)); !ok)
                    return ok;
                bytes = bytes.subspan(n);
                done += n;
                continue;
            }
            auto j = current();
            if (!j)
                return std::move(j).error();
            if ((*j)->room() == 0) {
                if (auto ok = submit(); !ok)
                    return ok;
                continue;
            }
            const std::size_t n = std::min(bytes.size(), (*j)->room());
            auto copy = (*j)->take(n);
            std::memcpy(copy.data(), bytes.data(), n);
            if (auto ok = add_bytes(copy, n); !ok)
                return ok;
            bytes = bytes.subspan(n);
        }
        return {};
    }

    // ---- blocks (blkhash) ----

    /// The block holding `position`: its start and length.
    std::pair<std::uint64_t, std::uint64_t> block_at(std::uint64_t at) const {
        const std::uint64_t start = at - at % kBlkhashBlockSize;
        return {start, std::min(kBlkhashBlockSize, size - start)};
    }

    /// Starts assembling the block at `position` in the job's buffer.
    Result<void> start_assembly(std::uint64_t length) {
        auto j = current();
        if (!j)
            return std::move(j).error();
        if ((*j)->room() < length) {
            if (auto ok = submit(); !ok)
                return ok;
            j = current();
            if (!j)
                return std::move(j).error();
        }
        assembly = (*j)->take(static_cast<std::size_t>(length));
        return {};
    }

    /// Copies `bytes` (or zeros, with an empty span and `zeros`) into the block being
    /// assembled at `position`; hands the block over once complete.
    Result<void> assemble(std::span<const std::byte> bytes, std::uint64_t zeros) {
        const auto [start, length] = block_at(position);
        if (assembly.empty()) {
            if (auto ok = start_assembly(length); !ok)
                return ok;
        }
        const std::uint64_t in = position - start;
        const std::uint64_t n = bytes.empty() ? zeros : bytes.size();
        if (bytes.empty())
            std::memset(assembly.data() + in, 0, static_cast<std::size_t>(n));
        else
            std::memcpy(assembly.data() + in, bytes.data(), bytes.size());
        position += n;
        if (in + n == length) {
            auto block = assembly;
            assembly = {};
            return add_bytes(block, block.size());
        }
        return {};
    }

    Result<void> block_data(std::span<const std::byte> bytes, bool stable,
                            const std::optional<FilePosition>& file) {
        std::uint64_t done = 0;
        while (!bytes.empty()) {
            const auto [start, length] = block_at(position);
            const std::uint64_t in = position - start;
            if (in == 0 && assembly.empty() && stable && bytes.size() >= length) {
                if (auto ok = add_bytes(bytes.first(length), length, file_at(file, done)); !ok)
                    return ok;
                position += length;
                bytes = bytes.subspan(length);
                done += length;
                continue;
            }
            const std::size_t n =
                static_cast<std::size_t>(std::min<std::uint64_t>(bytes.size(), length - in));
            if (auto ok = assemble(bytes.first(n), 0); !ok)
                return ok;
            bytes = bytes.subspan(n);
            done += n;
        }
        return {};
    }

    Result<void> block_zeros(std::uint64_t length) {
        while (length > 0) {
            const auto [start, block_length] = block_at(position);
            const std::uint64_t in = position - start;
            if (in == 0 && assembly.empty() && block_length == kBlkhashBlockSize &&
                length >= kBlkhashBlockSize) {
                const std::uint64_t count = length / kBlkhashBlockSize;
                if (auto ok = add_zeros(count); !ok)
                    return ok;
                position += count * kBlkhashBlockSize;
                length -= count * kBlkhashBlockSize;
                continue;
            }
            const std::uint64_t n = std::min(length, block_length - in);
            if (auto ok = assemble({}, n); !ok)
                return ok;
            length -= n;
        }
        return {};
    }

    Result<void> zeros_to(std::uint64_t offset) {
        if (offset <= position)
            return {};
        const std::uint64_t length = offset - position;
        if (blocks)
            return block_zeros(length);
        position = offset;
        return add_zeros(length);
    }
};

DigestTap::DigestTap(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
DigestTap::~DigestTap() = default;
DigestTap::DigestTap(DigestTap&&) noexcept = default;
DigestTap& DigestTap::operator=(DigestTap&&) noexcept = default;

Result<DigestTap> DigestTap::create(HashAlgorithm algorithm, std::uint64_t disk_size,
                                    unsigned threads, DataAccess access) {
    auto impl = std::make_unique<Impl>();
    impl->algorithm = algorithm;
    impl->blocks = is_blkhash(algorithm);
    impl->read_stable = resolve(access) == DataAccess::read;
    impl->size = disk_size;
    const HashAlgorithm worker_algorithm = block_digest_algorithm(algorithm);
    Digest full_zero;
    if (impl->blocks) {
        auto feed = BlockDigestFeed::create(worker_algorithm);
        if (!feed)
            return std::move(feed).error();
        full_zero = feed->zero_block();
        impl->feed.emplace(std::move(*feed));
    }
    // Check the algorithm here, where its failure can be reported.
    auto probe = Hasher::create(worker_algorithm);
    if (!probe)
        return std::move(probe).error();
    const bool blocks = impl->blocks;
    // A stream has one order: one worker. Blocks: every core.
    const unsigned workers = blocks ? resolve_threads(threads) : 1;
    if (workers > 1 || !blocks) {
        impl->workers.emplace(
            workers, 4 * static_cast<std::size_t>(workers),
            [worker_algorithm, blocks, full_zero]() -> Result<Impl::Workers::Work> {
                auto hasher = Hasher::create(worker_algorithm);
                if (!hasher)
                    return std::move(hasher).error();
                auto work = std::make_shared<JobWork>(std::move(*hasher), blocks, full_zero,
                                                      kBlkhashBlockSize);
                return Impl::Workers::Work([work](Job& job) { return work->run(job); });
            });
        if (!blocks)
            impl->workers->keep_jobs_on_workers(); // one stream, one hasher: one thread
        if (impl->workers->started() == 0)
            impl->workers.reset();
    }
    if (!impl->workers)
        impl->inline_work.emplace(std::move(*probe), blocks, full_zero, kBlkhashBlockSize);
    return DigestTap(std::move(impl));
}

Result<void> DigestTap::data(std::uint64_t offset, std::span<const std::byte> bytes, bool stable,
                             std::optional<FilePosition> file) {
    Impl& t = *impl_;
    if (offset < t.position) {
        return Error{
            ErrorCode::invalid_argument,
            fmt::format("digest fed out of order: bytes at {:#x} after {:#x}", offset, t.position)};
    }
    if (offset >= t.size)
        return {};
    bytes = bytes.first(
        static_cast<std::size_t>(std::min<std::uint64_t>(bytes.size(), t.size - offset)));
    if (auto ok = t.zeros_to(offset); !ok)
        return ok;
    if (t.blocks)
        return t.block_data(bytes, stable, file);
    t.position += bytes.size();
    return t.stream_data(bytes, stable, file);
}

Result<Digest> DigestTap::finish() {
    Impl& t = *impl_;
    if (auto ok = t.zeros_to(t.size); !ok)
        return std::move(ok).error();
    if (!t.blocks) {
        auto j = t.current();
        if (!j)
            return std::move(j).error();
        (*j)->last = true;
    }
    if (auto ok = t.submit(); !ok)
        return std::move(ok).error();
    while (t.workers && !t.workers->empty()) {
        if (auto ok = t.take_front(); !ok)
            return std::move(ok).error();
    }
    if (t.blocks)
        return t.feed->finish(t.size);
    if (!t.stream_done)
        return Error{ErrorCode::io_error, "the digest's last job did not run"};
    return *t.stream_done;
}

} // namespace qcowmap::detail

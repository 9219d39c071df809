// Ordered parallel production of byte runs: workers walk and decompress fixed-size chunks of
// the virtual disk into a bounded ring of slots; the calling thread consumes them in order.
// Data and zero runs are never copied (a slot holds spans into the mapping); only compressed
// clusters are materialised, in the slot's own buffer.
#include "image_state.hpp"

#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace qcowmap {
namespace {

constexpr std::uint64_t kChunkBytes = 8ull << 20;

struct PendingRun {
    std::uint64_t offset;
    std::uint64_t length;
    const std::byte* data;       // into the mapping; null for zero or produced runs
    std::size_t produced_at;     // offset into the slot buffer when `produced`
    bool produced;
};

struct Slot {
    std::uint64_t index = UINT64_MAX; // chunk held, UINT64_MAX while free
    bool ready = false;
    std::vector<PendingRun> runs;
    std::vector<std::byte> buffer;
    std::optional<Error> error;
};

} // namespace

Result<void> Image::visit_runs_parallel(std::uint64_t start, std::uint64_t end, unsigned threads,
                                        const RunVisitor& visitor) const {
    end = std::min(end, size());
    if (threads <= 1 || start >= end) {
        return visit_runs(start, end, visitor);
    }
    const std::uint64_t chunk = std::max<std::uint64_t>(kChunkBytes, state_->cluster_size);
    // Chunk i covers [boundary(i), boundary(i + 1)), with chunk-aligned inner boundaries so
    // that no compressed cluster straddles two chunks.
    const std::uint64_t first_boundary = (start / chunk + 1) * chunk;
    const std::uint64_t chunk_count =
        first_boundary >= end ? 1 : 2 + (end - 1 - first_boundary) / chunk;
    auto chunk_start = [&](std::uint64_t i) {
        return i == 0 ? start : std::min(end, first_boundary + (i - 1) * chunk);
    };

    std::vector<Slot> slots(2 * threads + 2);
    std::mutex mutex;
    std::condition_variable changed;
    std::uint64_t next_chunk = 0;
    std::uint64_t consumed = 0; // chunks fully handed to the visitor
    bool stop = false;

    auto work = [&] {
        Decompressor decompressor;
        for (;;) {
            std::uint64_t index;
            Slot* slot;
            {
                std::unique_lock lock(mutex);
                if (stop || next_chunk >= chunk_count) return;
                index = next_chunk++;
                // Wait for the slot this chunk will use to be consumed.
                changed.wait(lock, [&] { return stop || index < consumed + slots.size(); });
                if (stop) return;
                slot = &slots[index % slots.size()];
                slot->index = index;
                slot->ready = false;
            }
            slot->runs.clear();
            slot->buffer.clear();
            slot->error.reset();
            ExtentIterator it = extents(chunk_start(index), chunk_start(index + 1));
            Extent e;
            while (it.next(e)) {
                PendingRun run{e.offset, e.length, nullptr, 0, false};
                if (e.kind == ExtentKind::data) {
                    run.data = e.bytes.data();
                } else if (e.kind == ExtentKind::compressed) {
                    auto bytes = decompressor.decompress(*this, e);
                    if (!bytes) {
                        slot->error = std::move(bytes).error();
                        break;
                    }
                    run.produced = true;
                    run.produced_at = slot->buffer.size();
                    slot->buffer.insert(slot->buffer.end(), bytes->begin(), bytes->end());
                }
                slot->runs.push_back(run);
            }
            if (it.failed() && !slot->error) {
                slot->error = it.error();
            }
            {
                std::lock_guard lock(mutex);
                slot->ready = true;
            }
            changed.notify_all();
        }
    };

    std::vector<std::thread> workers;
    workers.reserve(threads);
    for (unsigned i = 0; i < threads; ++i) {
        workers.emplace_back(work);
    }

    Result<void> result;
    for (std::uint64_t index = 0; index < chunk_count && result; ++index) {
        Slot& slot = slots[index % slots.size()];
        {
            std::unique_lock lock(mutex);
            changed.wait(lock, [&] { return slot.index == index && slot.ready; });
        }
        if (slot.error) {
            result = *slot.error;
            break;
        }
        for (const PendingRun& run : slot.runs) {
            std::span<const std::byte> bytes;
            if (run.data) {
                bytes = {run.data, static_cast<std::size_t>(run.length)};
            } else if (run.produced) {
                bytes = {slot.buffer.data() + run.produced_at, static_cast<std::size_t>(run.length)};
            }
            if (auto ok = visitor(run.offset, run.length, bytes); !ok) {
                result = std::move(ok);
                break;
            }
        }
        {
            std::lock_guard lock(mutex);
            slot.index = UINT64_MAX;
            slot.ready = false;
            consumed = index + 1;
        }
        changed.notify_all();
    }
    {
        std::lock_guard lock(mutex);
        stop = true;
    }
    changed.notify_all();
    for (std::thread& worker : workers) {
        worker.join();
    }
    return result;
}

} // namespace qcowmap

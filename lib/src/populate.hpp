// Pages of the read-only file mappings made present ahead of their use and dropped behind it,
// and the measured choice between the mapping and pread (DataAccess::automatic).
#pragma once

#include <qcowmap/image.hpp>

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace qcowmap::detail {

/// Makes the pages of `bytes`, a range of one of an Image's read-only shared file mappings,
/// present in the process: madvise(MADV_POPULATE_READ), which reads them from the file where
/// they are not cached; with Prefetch::touch, then reads one byte of every page. Where the
/// kernel lacks MADV_POPULATE_READ (EINVAL before Linux 5.14) `touch` reads one byte per page
/// and `populate` asks for read-ahead (MADV_WILLNEED). A range that cannot be populated (the
/// file shrank under its mapping, or a page cannot be read: EFAULT) is touched, so the fault is
/// raised here: call it inside the fault boundary (fault.hpp), which makes it an io_error.
void populate_pages(std::span<const std::byte> bytes, Prefetch how);

/// Drops the whole pages inside `bytes` (a range of a read-only shared file mapping, never
/// heap memory: MADV_DONTNEED would zero that) from the process. They stay in the page cache;
/// a later access faults them back in.
void release_pages(std::span<const std::byte> bytes);

/// DataAccess::automatic made concrete (automatic_data_access()); other values unchanged.
DataAccess resolve(DataAccess access);

/// Drops the pages of consumed mapped data from the process in batches, so that the resident
/// set stays a few MiB whatever the disk size, for consumers on one thread. Only spans inside
/// the image's file mappings qualify: decompressed runs live in heap buffers.
///
/// Runs of a fragmented image are scattered over the file, and one madvise per 64 KiB run
/// costs a TLB flush per call (seconds of system time per GiB). So the releaser
/// collects the address range [lo, hi) spanned by consumed runs of one mapping and drops it all
/// once 32 MiB were consumed: pages in between that were not consumed yet are dropped too,
/// which is harmless for a read-only shared file mapping (they are faulted back in from the
/// page cache when read).
class PageReleaser {
  public:
    explicit PageReleaser(const Image& image);
    ~PageReleaser() { flush(); }
    PageReleaser(const PageReleaser&) = delete;
    PageReleaser& operator=(const PageReleaser&) = delete;
    PageReleaser(PageReleaser&&) = default;
    PageReleaser& operator=(PageReleaser&&) = delete;

    void consumed(std::span<const std::byte> bytes);
    void flush();

  private:
    int mapping_of(std::uintptr_t begin, std::uintptr_t end) const;

    static constexpr std::uint64_t kBatch = 32u << 20;
    std::vector<std::span<const std::byte>> mappings_;
    int current_ = -1;
    std::uintptr_t lo_ = 0;
    std::uintptr_t hi_ = 0;
    std::uint64_t volume_ = 0;
};

} // namespace qcowmap::detail

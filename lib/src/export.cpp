// The raw export engine: sparse writes, in-kernel copies, hole punching, zero detection and
// block-device targets (qemu-img.c convert_do_copy / convert_write, with -S as
// is_allocated_sectors_min's zero check).
#include "atomic_file.hpp"
#include "digest_tap.hpp"
#include "errors.hpp"
#include "fault.hpp"
#include "image_state.hpp"
#include "raw_io.hpp"
#include "workers.hpp"

#include <qcowmap/bitmap.hpp>
#include <qcowmap/export.hpp>

#include <fmt/format.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <dirent.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <linux/loop.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/uio.h>
#include <unistd.h>
#include <vector>

namespace qcowmap {
namespace {

using detail::all_zero;
using detail::kChunkCap;
using detail::kZeros;
using detail::pread_some;
using detail::pwrite_all;
using detail::pwrite_sparse;
using detail::retry_eintr;
using detail::transfer_all;
using detail::write_all;
using detail::zero_range;

/// The target's errors: ErrorOrigin::target (the export's target has no path here).
Error target_error(Error error) {
    return detail::attribute(std::move(error), ErrorOrigin::target, {});
}

Error image_changed() {
    return detail::image_changed("the file shrank under its mapping");
}

enum class CopyResult { ok, target_failed, source_changed };

/// Copies `length` bytes at `from` to `out` at `offset` inside the kernel (copy_file_range: no
/// user-space copy, and file systems with reflinks share the blocks). Falls back to
/// pread/pwrite through `buffer` where the kernel cannot copy between the two (a block device
/// on either side, different file system types).
CopyResult copy_range(const FilePosition& from, int out, std::uint64_t offset, std::uint64_t length,
                      std::vector<std::byte>& buffer, int& source_errno) {
    source_errno = 0;
    std::uint64_t host_offset = from.offset;
    // Stops where the kernel cannot copy (not supported here, or EOF): pread/pwrite finish.
    const std::uint64_t done =
        transfer_all(length, kChunkCap, [&](std::uint64_t at, std::size_t want) {
            loff_t in_at = static_cast<loff_t>(host_offset + at);
            loff_t out_at = static_cast<loff_t>(offset + at);
            return ::copy_file_range(from.fd, &in_at, out, &out_at, want, 0);
        }).done;
    host_offset += done;
    offset += done;
    length -= done;
    if (length > 0 && buffer.empty())
        buffer.resize(1u << 20);
    while (length > 0) {
        std::size_t want = static_cast<std::size_t>(std::min<std::uint64_t>(length, buffer.size()));
        const ssize_t n = pread_some(from.fd, buffer.data(), want, host_offset);
        if (n <= 0) {
            // The extent walk checked this range: 0 means the file shrank; else a read error.
            source_errno = n < 0 ? errno : 0;
            return CopyResult::source_changed;
        }
        if (!pwrite_all(out, buffer.data(), static_cast<std::uint64_t>(n), offset)) {
            return CopyResult::target_failed;
        }
        host_offset += static_cast<std::uint64_t>(n);
        offset += static_cast<std::uint64_t>(n);
        length -= static_cast<std::uint64_t>(n);
    }
    return CopyResult::ok;
}

/// Allocates `[offset, offset + length)` of a regular file whose range reads as zeros
/// already (a hole of a fresh file): fallocate(2), else written zeros.
bool allocate_range(int fd, std::uint64_t offset, std::uint64_t length) {
    if (::fallocate(fd, 0, static_cast<off_t>(offset), static_cast<off_t>(length)) == 0)
        return true;
    if (errno != EOPNOTSUPP && errno != ENOSYS)
        return false;
    for (std::uint64_t done = 0; done < length;) {
        std::uint64_t n = std::min<std::uint64_t>(length - done, sizeof kZeros);
        if (!pwrite_all(fd, kZeros, n, offset + done))
            return false;
        done += n;
    }
    return true;
}

/// The first line of a sysfs file, or empty.
std::string sysfs_line(const std::string& path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return {};
    char text[4096];
    const ssize_t n = ::read(fd, text, sizeof text - 1);
    ::close(fd);
    if (n <= 0)
        return {};
    std::string line(text, static_cast<std::size_t>(n));
    return line.substr(0, line.find('\n'));
}

/// True when the block device `device` (major:minor) stores its bytes in one of the image's
/// files: a loop device over it (/sys/dev/block/M:m/loop/backing_file), or a partition of one,
/// or a device-mapper or md device stacked on one (slaves/). Writing to it would destroy the
/// image while it is being read, as writing to the file itself would.
bool device_backed_by_image(const Image& image, dev_t device, int depth = 0) {
    if (depth > 8)
        return false;
    const std::string sys = fmt::format("/sys/dev/block/{}:{}", major(device), minor(device));
    std::string backing = sysfs_line(sys + "/loop/backing_file");
    if (!backing.empty()) {
        // The kernel marks a backing file unlinked since with " (deleted)".
        constexpr std::string_view kDeleted = " (deleted)";
        if (backing.ends_with(kDeleted))
            backing.resize(backing.size() - kDeleted.size());
        struct stat st {};
        if (::stat(backing.c_str(), &st) == 0 && image.maps_file(st.st_dev, st.st_ino))
            return true;
    }
    auto by_dev_file = [&](const std::string& dev_file) {
        unsigned major_number = 0, minor_number = 0;
        const std::string text = sysfs_line(dev_file);
        return std::sscanf(text.c_str(), "%u:%u", &major_number, &minor_number) == 2 &&
               device_backed_by_image(image, makedev(major_number, minor_number), depth + 1);
    };
    // A partition: its disk is the directory above it.
    if (::access((sys + "/partition").c_str(), F_OK) == 0 && by_dev_file(sys + "/../dev"))
        return true;
    if (DIR* slaves = ::opendir((sys + "/slaves").c_str())) {
        bool found = false;
        while (dirent* entry = ::readdir(slaves)) {
            if (entry->d_name[0] != '.' && by_dev_file(sys + "/slaves/" + entry->d_name + "/dev")) {
                found = true;
                break;
            }
        }
        ::closedir(slaves);
        if (found)
            return true;
    }
    return false;
}

/// True when the loop device open on `fd` is backed by one of the image's files: the kernel's
/// own record of the backing file's device and inode (exact, whatever its path is now).
bool loop_backed_by_image(const Image& image, int fd) {
    loop_info64 info{};
    return ::ioctl(fd, LOOP_GET_STATUS64, &info) == 0 &&
           image.maps_file(info.lo_device, info.lo_inode);
}

/// The target as found by fstat, after refusing the image's own files.
struct Target {
    enum class Kind { file, block_device, stream };
    Kind kind = Kind::stream;
    std::uint64_t size = 0; ///< regular file: current size; block device: device size
    bool pipe = false;
};

Result<Target> inspect_target(const Image& image, int fd, bool sequential) {
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
        return detail::errno_error(errno);
    }
    if (image.maps_file(st.st_dev, st.st_ino)) {
        return Error{ErrorCode::invalid_argument,
                     "is the image being read (or one of its layers or its data file): "
                     "refusing to overwrite it"};
    }
    Target target;
    if (S_ISREG(st.st_mode)) {
        target.kind = Target::Kind::file;
        target.size = static_cast<std::uint64_t>(st.st_size);
    } else if (S_ISBLK(st.st_mode)) {
        if (loop_backed_by_image(image, fd) || device_backed_by_image(image, st.st_rdev)) {
            return Error{ErrorCode::invalid_argument,
                         "is a block device backed by the image being read (or one of its "
                         "layers or its data file): refusing to overwrite it"};
        }
        target.kind = Target::Kind::block_device;
        if (::ioctl(fd, BLKGETSIZE64, &target.size) != 0) {
            const int err = errno;
            return detail::errno_error(
                err,
                fmt::format("cannot get the size of the block device: {}", std::strerror(err)));
        }
    } else if (S_ISDIR(st.st_mode)) {
        return Error{ErrorCode::invalid_argument, "is a directory"};
    } else if (S_ISFIFO(st.st_mode)) {
        target.pipe = true;
    }
    if (sequential)
        target.kind = Target::Kind::stream;
    return target;
}

/// Writes runs of the disk to a target; shared by the whole-disk and the dirty-range exports.
class Writer {
  public:
    Writer(int fd, const Target& target, std::uint64_t zero_block)
        : fd_(fd), kind_(target.kind), zero_block_(zero_block),
          splice_(target.kind == Target::Kind::stream && target.pipe) {
        if (splice_ && ::fcntl(fd_, F_GETPIPE_SZ) < (1 << 20)) {
            // A bigger pipe means fewer round trips with the reader; refused is fine. Never
            // smaller than the caller made it.
            (void)::fcntl(fd_, F_SETPIPE_SZ, 1 << 20);
        }
    }

    /// True when bytes of the mapping go to the target by reference: the kernel never reads
    /// them, so they need to be present but not touched.
    bool splices() const { return splice_; }

    /// A data run at its offset, its bytes as the visit produced them. Without zero detection
    /// (and onto block devices), data that lies in one of the image's files is copied inside
    /// the kernel from the file position the run carries.
    Result<void> data(const Run& run) {
        const std::span<const std::byte> bytes = run.bytes;
        if (kind_ == Target::Kind::stream) {
            // A character device may take the bytes without reading them (/dev/null): read
            // one byte of every page first, so that data that cannot be read fails the export
            // whatever the target (a fault here is the export's error: fault.hpp).
            if (run.mapped && !splice_)
                detail::touch_every_page(bytes);
            if (put(bytes, run.mapped))
                return {};
            // The kernel reading the mapping for write() or vmsplice() fails with EFAULT
            // where a page cannot be read (the file shrank, or an I/O error): touching the
            // pages raises the fault in our code, which says which.
            if (errno == EFAULT && run.mapped) {
                detail::touch_every_page(bytes);
                return detail::image_changed("a page of its mapping could not be read");
            }
            return failed();
        }
        if ((zero_block_ == 0 || kind_ == Target::Kind::block_device) && run.file) {
            int source_errno = 0;
            switch (copy_range(*run.file, fd_, run.offset, bytes.size(), buffer_, source_errno)) {
            case CopyResult::ok:
                return {};
            case CopyResult::source_changed:
                if (source_errno != 0) {
                    return detail::errno_error(
                        source_errno, fmt::format("cannot read the image's data at file offset "
                                                  "{:#x}: {}",
                                                  run.file->offset, std::strerror(source_errno)));
                }
                return image_changed();
            case CopyResult::target_failed:
                return failed();
            }
        }
        const std::uint64_t block = kind_ == Target::Kind::file ? zero_block_ : 0;
        if (!pwrite_sparse(fd_, bytes.data(), bytes.size(), run.offset, block))
            return failed();
        return {};
    }

    /// A zero run. `punch`: make it a hole where possible (an incremental update of a copy);
    /// else a fresh regular file keeps it as the hole it already is.
    Result<void> zeros(std::uint64_t offset, std::uint64_t length, bool punch) {
        if (kind_ == Target::Kind::stream) {
            for (std::uint64_t done = 0; done < length;) {
                std::uint64_t n = std::min<std::uint64_t>(length - done, sizeof kZeros);
                if (!put({kZeros, static_cast<std::size_t>(n)}, true))
                    return failed();
                done += n;
            }
            return {};
        }
        if (kind_ == Target::Kind::file && !punch && zero_block_ != 0)
            return {};
        if (kind_ == Target::Kind::file && !punch) {
            // zero_block 0 is qemu-img's -S 0: the file fully allocated. The fresh file reads
            // zeros here already; allocating (unwritten extents) is all that is left to do.
            return allocate_range(fd_, offset, length) ? Result<void>{} : failed();
        }
        return zero_range(fd_, offset, length, punch) ? Result<void>{} : failed();
    }

  private:
    /// Writes `bytes` in order; false with errno set. `immutable`: the bytes stay as they are
    /// while we run (the mapping, the zeros), so a pipe may take references to their pages
    /// instead of a copy, which saves one of the two copies a pipe costs. Read buffers are
    /// reused at once and always copied.
    bool put(std::span<const std::byte> bytes, bool immutable) {
        if (!(splice_ && immutable))
            return write_all(fd_, bytes.data(), bytes.size());
        while (!bytes.empty()) {
            iovec iov{const_cast<std::byte*>(bytes.data()), bytes.size()};
            const ssize_t n = retry_eintr([&] { return ::vmsplice(fd_, &iov, 1, 0); });
            if (n < 0) {
                if (errno == EINVAL || errno == ENOSYS) { // not splice-able after all
                    splice_ = false;
                    return write_all(fd_, bytes.data(), bytes.size());
                }
                return false;
            }
            bytes = bytes.subspan(static_cast<std::size_t>(n));
        }
        return true;
    }

    Result<void> failed() { return target_error(detail::errno_error(errno)); }

    int fd_;
    Target::Kind kind_;
    std::uint64_t zero_block_;
    bool splice_;
    std::vector<std::byte> buffer_; // for copies the kernel cannot make
};

Result<void> fail_target(Error error) {
    return target_error(std::move(error));
}

} // namespace

static Result<void> export_raw_in_boundary(const Image& image, int fd,
                                           const ExportOptions& options) {
    if (options.zero_block % 512 != 0) {
        return Error{
            ErrorCode::invalid_argument,
            fmt::format("zero block size {} is not a multiple of 512", options.zero_block)};
    }
    if (options.digest && !options.digest_out)
        return Error{ErrorCode::invalid_argument, "a digest was asked for without digest_out"};
    auto target = inspect_target(image, fd, options.sequential);
    if (!target)
        return fail_target(std::move(target).error());
    const std::uint64_t size = image.size();
    const std::uint64_t start = std::min(options.start, size);
    const std::uint64_t end = std::min(options.end, size);
    const bool whole_disk = start == 0 && end == size;
    if (!whole_disk && target->kind != Target::Kind::stream) {
        return fail_target(Error{ErrorCode::invalid_argument,
                                 "a part of the disk can only be written to a stream"});
    }
    if (target->kind == Target::Kind::block_device && target->size < size) {
        return fail_target(Error{ErrorCode::invalid_argument,
                                 fmt::format("block device is {} bytes, smaller than the disk "
                                             "({} bytes)",
                                             target->size, size)});
    }
    if (target->kind == Target::Kind::file) {
        // An existing file is emptied first (its old blocks must not show through the holes).
        // A new one is not: on ext4 truncating even an empty file arms the "replace via
        // truncate" heuristic (auto_da_alloc), and close() then starts writeback of every
        // byte written (+0.3 s per GiB here).
        if ((target->size != 0 && ::ftruncate(fd, 0) != 0) ||
            ::ftruncate(fd, static_cast<off_t>(size)) != 0) {
            return fail_target(detail::errno_error(errno));
        }
    }
    Writer writer(fd, *target, options.zero_block);
    const std::uint64_t total = end > start ? end - start : 0;
    if (options.progress)
        options.progress(0, total);
    // Without zero detection (or onto a block device) data runs in files are copied inside
    // the kernel, which needs their file positions (mapping mode, nothing made present); with
    // it, and onto streams, data comes from the mapping made present ahead by the workers
    // (DataAccess::mapping) or is read ahead into small buffers (DataAccess::read) that the
    // zero check and the write then find in the cache; DataAccess::automatic picks the cheaper
    // on this machine.
    const bool copies = (options.zero_block == 0 && target->kind == Target::Kind::file) ||
                        target->kind == Target::Kind::block_device;
    // A pipe given pages by reference needs them present, not read (Prefetch::populate).
    const VisitOptions visit =
        copies ? VisitOptions{detail::resolve_threads(options.threads), DataAccess::mapping,
                              Prefetch::none}
               : VisitOptions{detail::resolve_threads(options.threads), options.data_access,
                              writer.splices() ? Prefetch::populate : Prefetch::touch};
    // The digest is fed the bytes the writer is given (zeros between them are implied).
    std::optional<detail::DigestTap> tap;
    if (options.digest) {
        auto made = detail::DigestTap::create(
            *options.digest, total, detail::resolve_threads(options.threads), options.data_access);
        if (!made)
            return std::move(made).error();
        tap.emplace(std::move(*made));
    }
    if (total == 0 && !tap)
        return {};
    auto result = image.visit(
        start, end,
        [&](const Run& run) -> Result<void> {
            auto ok =
                run.bytes.empty() ? writer.zeros(run.offset, run.length, false) : writer.data(run);
            if (!ok)
                return ok;
            if (tap && !run.bytes.empty()) {
                if (auto fed = tap->data(run.offset - start, run.bytes, run.mapped, run.file); !fed)
                    return fed;
            }
            if (options.progress)
                options.progress(run.offset + run.length - start, total);
            return {};
        },
        visit);
    if (result)
        result = image.check_unchanged(); // bytes of two states must not pass for the disk
    if (result && tap) {
        auto digest = tap->finish();
        if (!digest)
            return std::move(digest).error();
        *options.digest_out = *digest;
    }
    return result;
}

Result<void> export_raw(const Image& image, int fd, const ExportOptions& options) {
    return detail::contain_faults(
        image.path(), [&]() -> Result<void> { return export_raw_in_boundary(image, fd, options); });
}

Result<void> export_raw_file(const Image& image, const std::filesystem::path& given,
                             const ExportOptions& options, bool replace) {
    // Through a symlink, as qemu-img writes (AtomicFile follows it too): the file it points to
    // is what gets replaced.
    const std::filesystem::path target = detail::resolve_output_path(given);
    struct stat st {};
    if (::stat(target.c_str(), &st) == 0) {
        if (image.maps_file(st.st_dev, st.st_ino)) {
            return fail_target(Error{ErrorCode::invalid_argument,
                                     "is the image being read (or one of its layers or its "
                                     "data file): refusing to overwrite it"});
        }
        if (S_ISREG(st.st_mode) && !replace) {
            return fail_target(
                Error{ErrorCode::io_error, "already exists (use --force to overwrite)"});
        }
    }
    auto file = detail::AtomicFile::create(target, replace);
    if (!file)
        return fail_target(std::move(file).error());
    if (auto written = export_raw(image, file->fd(), options); !written)
        return written; // the temporary goes with `file`
    if (auto named = file->commit(); !named)
        return fail_target(std::move(named).error());
    return {};
}

static Result<void> export_dirty_in_boundary(const Image& image, const DirtyBitmap& bitmap, int fd,
                                             const ExportOptions& options) {
    auto target = inspect_target(image, fd, false);
    if (!target)
        return fail_target(std::move(target).error());
    if (target->kind == Target::Kind::stream) {
        return fail_target(
            Error{ErrorCode::invalid_argument, "is neither a regular file nor a block device"});
    }
    if (target->size != image.size()) {
        return fail_target(Error{ErrorCode::invalid_argument,
                                 fmt::format("is {} bytes but the disk is {} bytes: an "
                                             "incremental update needs a copy of the same size",
                                             target->size, image.size())});
    }
    Writer writer(fd, *target, 0);
    const std::uint64_t total = bitmap.dirty_bytes();
    std::uint64_t done = 0;
    if (options.progress)
        options.progress(0, total);
    // Data is copied inside the kernel, from the file positions the runs carry.
    const VisitOptions visit{detail::resolve_threads(options.threads), DataAccess::mapping};
    auto visitor = [&](const Run& run) -> Result<void> {
        auto ok = run.bytes.empty() ? writer.zeros(run.offset, run.length, true) : writer.data(run);
        if (!ok)
            return ok;
        done += run.length;
        if (options.progress)
            options.progress(done, total);
        return {};
    };
    Result<void> result;
    for (const BitmapRange& range : bitmap.dirty_ranges()) {
        result = image.visit(range.offset, range.offset + range.length, visitor, visit);
        if (!result)
            break;
    }
    if (result)
        result = image.check_unchanged();
    return result;
}

Result<void> export_dirty(const Image& image, const DirtyBitmap& bitmap, int fd,
                          const ExportOptions& options) {
    return detail::contain_faults(image.path(), [&]() -> Result<void> {
        return export_dirty_in_boundary(image, bitmap, fd, options);
    });
}

} // namespace qcowmap

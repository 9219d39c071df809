// qcowmap mount: the virtual disk as one read-only file, MOUNTPOINT/disk, served through FUSE.
//
// libfuse's low-level API, because a read is answered with a fuse_bufvec: data runs name the
// image's own file descriptor and offset (FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK), and with splice
// writes enabled libfuse splices them from the image's page cache into /dev/fuse, so data bytes
// never pass through this process. Zero runs point at a static zero buffer; compressed clusters
// are decompressed into a per-thread buffer. lseek(SEEK_DATA/SEEK_HOLE) is answered from the
// extent map, so sparse-aware tools (cp --sparse, tar -S, qemu-img map -f raw) see the holes.
//
// With --rw the file is writable, served by a WritableImage (which takes QEMU's write lock and
// serialises requests itself): reads copy through it so they see the writes, writes and
// fallocate go to it as qemu's FUSE export (block/export/fuse.c) sends them to the block layer,
// fsync and close flush it, and unmounting closes it.
#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>

#include "cli.hpp"

#include <qcowmap/writable.hpp>

#include <algorithm>
#include <cerrno>
#include <cstdarg>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>
#include <vector>

namespace qcowmap::cli {

namespace {

constexpr fuse_ino_t kDiskInode = 2;
constexpr const char* kDiskName = "disk";
/// The image cannot change while it is mapped, so names and attributes never go stale.
constexpr double kForever = 365.0 * 24 * 3600;
/// With --rw the block count and times change with writes: attributes are asked for again.
constexpr double kWritableAttrTimeout = 1.0;
/// st_blksize of the disk file: tools size their reads by it (cat, cp read 128 KiB or this).
constexpr blksize_t kPreferredIo = 1 << 20;
/// The largest read request: 1 MiB less 16 pages, room for libfuse's estimate of the pipe it
/// splices a reply through (a page per buffer of the reply, plus the header).
constexpr unsigned kMaxRequest = (1u << 20) - 16 * 4096;

/// Zero runs are answered from here, in pieces of at most this size. Never written: its pages
/// stay the kernel's shared zero page.
alignas(4096) const char kZeros[1 << 20] = {};

struct MountState {
    std::optional<Image> image;            ///< a read-only mount
    std::optional<WritableImage> writable; ///< --rw
    std::string image_path;                ///< for error messages
    std::uint64_t size = 0;                ///< virtual disk size
    std::uint64_t data_bytes = 0;          ///< bytes of data and compressed runs: st_blocks
    struct stat image_stat {};             ///< times shown on the disk file
    std::string mountpoint{};              ///< absolute
};

/// Calls `visit(extent)` for the extents of [start, end) in order while it returns true.
/// Errors: those of the extent walk.
template <typename Visit>
Result<void> walk_extents(const Image& image, std::uint64_t start, std::uint64_t end,
                          Visit&& visit) {
    ExtentRange extents = image.extents(start, end);
    for (const Extent& extent : extents) {
        if (!visit(extent))
            return {};
    }
    if (extents.error())
        return *extents.error();
    return {};
}

MountState& state_of(fuse_req_t req) {
    return *static_cast<MountState*>(fuse_req_userdata(req));
}

/// An error met while answering the kernel: said on stderr (the terminal with -f, /dev/null
/// once daemonized) and answered with EIO.
void reply_error(fuse_req_t req, const MountState& state, const Error& error) {
    report(state.image_path, error.message, kExitImageError);
    fuse_reply_err(req, EIO);
}

/// An error of the writable image: said on stderr, answered with its errno (to_errno: ENOSPC,
/// EIO, EINVAL... as the library classifies it).
void reply_writable_error(fuse_req_t req, const MountState& state, const Error& error) {
    report(state.image_path, error.message, kExitImageError);
    fuse_reply_err(req, to_errno(error));
}

/// Bytes of the writable disk that are not holes (block_status: ranges that do not read as
/// zeros), for st_blocks as the read-only mount counts them; the disk's size when the walk
/// fails (a dense file is the safe guess for cp and tar).
std::uint64_t writable_data_bytes(MountState& state) {
    std::uint64_t data = 0;
    for (std::uint64_t at = 0; at < state.size;) {
        auto status = state.writable->block_status(at, state.size - at);
        if (!status || status->length == 0)
            return state.size;
        if (!status->zero)
            data += status->length;
        at += status->length;
    }
    return data;
}

struct stat attributes(MountState& state, fuse_ino_t inode) {
    struct stat st {};
    st.st_ino = inode;
    st.st_uid = ::getuid();
    st.st_gid = ::getgid();
    const bool writable = state.writable.has_value();
    if (writable) {
        struct stat now {}; // writes change the image's times
        if (::stat(state.image_path.c_str(), &now) == 0)
            state.image_stat = now;
    }
    st.st_atim = state.image_stat.st_atim;
    st.st_mtim = state.image_stat.st_mtim;
    st.st_ctim = state.image_stat.st_ctim;
    if (inode == FUSE_ROOT_ID) {
        st.st_mode = S_IFDIR | (writable ? 0755 : 0555);
        st.st_nlink = 2;
    } else {
        st.st_mode = S_IFREG | (writable ? 0644 : 0444);
        st.st_nlink = 1;
        st.st_size = static_cast<off_t>(state.size);
        // Honest block counts matter: cp and tar look for holes only when st_blocks says the
        // file is sparse.
        const std::uint64_t data = writable ? writable_data_bytes(state) : state.data_bytes;
        st.st_blocks = static_cast<blkcnt_t>((data + 511) / 512);
        st.st_blksize = kPreferredIo;
    }
    return st;
}

// Every callback catches everything: exceptions must not unwind into libfuse's C frames.
#define GUARD_BEGIN try {
#define GUARD_END                                                                                  \
    }                                                                                              \
    catch (const std::bad_alloc&) {                                                                \
        fuse_reply_err(req, ENOMEM);                                                               \
    }                                                                                              \
    catch (...) {                                                                                  \
        fuse_reply_err(req, EIO);                                                                  \
    }

/// The "major:minor" of the newest qcowmap mount on `mountpoint` (/proc/self/mountinfo, whose
/// fields escape blanks and backslashes as \ooo), or "" when there is none.
std::string mount_device(const std::string& mountpoint) {
    auto unescape = [](std::string_view field) {
        std::string out;
        for (std::size_t i = 0; i < field.size(); ++i) {
            if (field[i] == '\\' && i + 3 < field.size()) {
                out += static_cast<char>((field[i + 1] - '0') * 64 + (field[i + 2] - '0') * 8 +
                                         (field[i + 3] - '0'));
                i += 3;
            } else {
                out += field[i];
            }
        }
        return out;
    };
    std::string device;
    std::FILE* in = std::fopen("/proc/self/mountinfo", "re");
    if (!in)
        return device;
    std::vector<char> line(16384);
    while (std::fgets(line.data(), static_cast<int>(line.size()), in)) {
        // ID PARENT MAJOR:MINOR ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE OPTIONS
        std::istringstream fields(line.data());
        std::string id, parent, major_minor, root, point;
        fields >> id >> parent >> major_minor >> root >> point;
        if (unescape(point) == mountpoint && std::strstr(line.data(), " - fuse.qcowmap "))
            device = major_minor;
    }
    std::fclose(in);
    return device;
}

void on_init(void* userdata, fuse_conn_info* conn) {
    // Let fuse_reply_data splice file-descriptor buffers into /dev/fuse instead of reading them
    // into memory first (libfuse leaves this off by default).
    if (conn->capable & FUSE_CAP_SPLICE_WRITE)
        conn->want |= FUSE_CAP_SPLICE_WRITE;
    // The kernel's largest read request is max_write rounded up to pages (libfuse derives
    // max_pages from it). Keep a reply and its header within a 1 MiB pipe (the default
    // pipe-max-size): a larger one cannot be spliced, and libfuse then copies it through a
    // buffer it allocates per request, ten times slower (measured).
    conn->max_write = std::min<unsigned>(conn->max_write, kMaxRequest);

    // A FUSE mount starts with the kernel's default read-ahead, 128 KiB, and the INIT reply can
    // only lower it (the kernel keeps the smaller of its window and ours). Streaming the disk
    // costs a round trip per window, so where we may (root) this mount's own window -- its BDI,
    // which goes with the mount -- is raised to the largest request through sysfs before the
    // reply. On the 1 GiB dense image it cut the CPU time of `cat disk` by a quarter to a third.
    const auto& state = *static_cast<const MountState*>(userdata);
    const std::string device = mount_device(state.mountpoint);
    if (!device.empty()) {
        const std::string knob = "/sys/class/bdi/" + device + "/read_ahead_kb";
        if (std::FILE* out = std::fopen(knob.c_str(), "we")) {
            const bool written = std::fprintf(out, "%u", kMaxRequest / 1024) > 0;
            if (std::fclose(out) == 0 && written)
                conn->max_readahead = kMaxRequest;
        }
    }
}

void on_lookup(fuse_req_t req, fuse_ino_t parent, const char* name) {
    GUARD_BEGIN
    if (parent != FUSE_ROOT_ID || std::strcmp(name, kDiskName) != 0) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    fuse_entry_param entry{};
    entry.ino = kDiskInode;
    entry.generation = 1;
    MountState& state = state_of(req);
    entry.attr = attributes(state, kDiskInode);
    entry.attr_timeout = state.writable ? kWritableAttrTimeout : kForever;
    entry.entry_timeout = kForever;
    fuse_reply_entry(req, &entry);
    GUARD_END
}

void on_getattr(fuse_req_t req, fuse_ino_t inode, fuse_file_info*) {
    GUARD_BEGIN
    if (inode != FUSE_ROOT_ID && inode != kDiskInode) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    MountState& state = state_of(req);
    struct stat st = attributes(state, inode);
    fuse_reply_attr(req, &st, state.writable ? kWritableAttrTimeout : kForever);
    GUARD_END
}

void on_setattr(fuse_req_t req, fuse_ino_t inode, struct stat* wanted, int to_set,
                fuse_file_info*) {
    GUARD_BEGIN
    MountState& state = state_of(req);
    if (!state.writable) {
        fuse_reply_err(req, EROFS); // the mount is read-only; the kernel refuses first
        return;
    }
    // The disk has a fixed size, owner and mode. Times are accepted and not kept (the file
    // shows the image's own), so that touch and tools that set them do not fail; truncating
    // to the disk's own size is a no-op. Anything else (O_TRUNC, chmod) is refused.
    constexpr int kTimes = FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_MTIME | FUSE_SET_ATTR_ATIME_NOW |
                           FUSE_SET_ATTR_MTIME_NOW | FUSE_SET_ATTR_CTIME;
    const bool same_size = !(to_set & FUSE_SET_ATTR_SIZE) ||
                           (inode == kDiskInode && wanted->st_size >= 0 &&
                            static_cast<std::uint64_t>(wanted->st_size) == state.size);
    if ((to_set & ~(kTimes | FUSE_SET_ATTR_SIZE)) || !same_size) {
        fuse_reply_err(req, EPERM);
        return;
    }
    struct stat st = attributes(state, inode);
    fuse_reply_attr(req, &st, kWritableAttrTimeout);
    GUARD_END
}

void on_open(fuse_req_t req, fuse_ino_t inode, fuse_file_info* fi) {
    GUARD_BEGIN
    if (inode != kDiskInode) {
        fuse_reply_err(req, inode == FUSE_ROOT_ID ? EISDIR : ENOENT);
        return;
    }
    const MountState& state = state_of(req);
    if (fi->flags & O_TRUNC) {
        fuse_reply_err(req, state.writable ? EPERM : EROFS); // the disk's size is fixed
        return;
    }
    if ((fi->flags & O_ACCMODE) != O_RDONLY && !state.writable) {
        fuse_reply_err(req, EROFS);
        return;
    }
    // The bytes change only through this mount, whose writes go through the kernel's page
    // cache (write-through): keep the cache across opens.
    fi->keep_cache = 1;
    // A descriptor that wrote is flushed on close, as qemu's FUSE export does (fuse_flush).
    fi->noflush = (fi->flags & O_ACCMODE) == O_RDONLY;
    fuse_reply_open(req, fi);
    GUARD_END
}

/// What one worker thread keeps between reads.
struct ReadScratch {
    Decompressor decompressor;
    /// Compressed runs of one reply, end to end; grown (never zeroed) to the largest reply
    /// that held one.
    std::unique_ptr<std::byte[]> decompressed;
    std::size_t decompressed_capacity = 0;
    std::vector<fuse_buf> pieces;
    std::vector<std::byte> vector_storage; ///< a fuse_bufvec with room for `pieces`
};
thread_local ReadScratch t_scratch;

fuse_buf memory_piece(const void* bytes, std::size_t length) {
    fuse_buf piece{};
    piece.size = length;
    piece.mem = const_cast<void*>(bytes);
    return piece;
}

fuse_buf file_piece(const FilePosition& where, std::size_t length) {
    fuse_buf piece{};
    piece.size = length;
    piece.flags =
        static_cast<fuse_buf_flags>(FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK | FUSE_BUF_FD_RETRY);
    piece.fd = where.fd;
    piece.pos = static_cast<off_t>(where.offset);
    return piece;
}

/// A read of the writable disk: copied through the WritableImage (its cache holds writes not
/// yet in the file). `[start, end)` lies inside the disk.
void read_writable(fuse_req_t req, MountState& state, std::uint64_t start, std::uint64_t end) {
    thread_local std::vector<std::byte> buffer;
    buffer.resize(static_cast<std::size_t>(end - start));
    auto copied = state.writable->read(buffer, start);
    if (!copied) {
        reply_writable_error(req, state, copied.error());
        return;
    }
    fuse_reply_buf(req, reinterpret_cast<const char*>(buffer.data()), *copied);
}

void on_read(fuse_req_t req, fuse_ino_t inode, std::size_t size, off_t off, fuse_file_info*) {
    GUARD_BEGIN
    MountState& state = state_of(req);
    if (inode != kDiskInode) {
        fuse_reply_err(req, EISDIR);
        return;
    }
    if (off < 0) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    const auto start = static_cast<std::uint64_t>(off);
    if (start >= state.size || size == 0) {
        fuse_reply_buf(req, nullptr, 0);
        return;
    }
    const std::uint64_t end = start + std::min<std::uint64_t>(size, state.size - start);
    if (state.writable) {
        read_writable(req, state, start, end);
        return;
    }

    ReadScratch& scratch = t_scratch;
    scratch.pieces.clear();
    std::size_t decompressed_used = 0;
    std::optional<Error> failure;
    auto walked = walk_extents(*state.image, start, end, [&](const Extent& extent) {
        const auto length = static_cast<std::size_t>(extent.length);
        switch (extent.kind) {
        case ExtentKind::data:
            if (extent.file) {
                scratch.pieces.push_back(file_piece(*extent.file, length));
            } else {
                scratch.pieces.push_back(memory_piece(extent.bytes.data(), length));
            }
            return true;
        case ExtentKind::zero:
            for (std::size_t done = 0; done < length;) {
                std::size_t n = std::min(length - done, sizeof kZeros);
                scratch.pieces.push_back(memory_piece(kZeros, n));
                done += n;
            }
            return true;
        case ExtentKind::compressed: {
            auto bytes = scratch.decompressor.decompress(*state.image, extent);
            if (!bytes) {
                failure = bytes.error();
                return false;
            }
            // Room for the whole reply, made before the first piece points into it.
            if (decompressed_used == 0 && scratch.decompressed_capacity < end - start) {
                scratch.decompressed.reset(new std::byte[end - start]);
                scratch.decompressed_capacity = end - start;
            }
            std::byte* into = scratch.decompressed.get() + decompressed_used;
            std::memcpy(into, bytes->data(), bytes->size());
            decompressed_used += bytes->size();
            scratch.pieces.push_back(memory_piece(into, bytes->size()));
            return true;
        }
        }
        return true;
    });
    if (!walked) {
        reply_error(req, state, walked.error());
        return;
    }
    if (failure) {
        reply_error(req, state, *failure);
        return;
    }
    // libfuse answers a splice that meets the end of its file with a short reply, and the
    // kernel takes a short read for the end of the disk (and shrinks the file it caches):
    // a truncated image would read as a silently shorter disk. Check the files first, and say
    // what happened instead. (A file cut between this check and the splice still reads short.)
    for (const fuse_buf& piece : scratch.pieces) {
        struct stat st {};
        if ((piece.flags & FUSE_BUF_IS_FD) &&
            (::fstat(piece.fd, &st) != 0 ||
             static_cast<std::uint64_t>(st.st_size) <
                 static_cast<std::uint64_t>(piece.pos) + piece.size)) {
            reply_error(req, state, Error{ErrorCode::io_error, kImageChanged});
            return;
        }
    }

    // fuse_bufvec ends in a one-element array that libfuse indexes past, as a flexible array.
    const std::size_t count = scratch.pieces.size();
    scratch.vector_storage.resize(sizeof(fuse_bufvec) + count * sizeof(fuse_buf));
    auto* vector = new (scratch.vector_storage.data()) fuse_bufvec{};
    vector->count = count;
    std::memcpy(scratch.vector_storage.data() + offsetof(fuse_bufvec, buf), scratch.pieces.data(),
                count * sizeof(fuse_buf));
    fuse_reply_data(req, vector, static_cast<fuse_buf_copy_flags>(0));
    GUARD_END
}

/// SEEK_DATA/SEEK_HOLE on the writable disk: the first offset from `start` whose block status
/// is data (does not read as zeros) or a hole, as the read-only mount tells them apart.
Result<std::optional<std::uint64_t>> seek_writable(MountState& state, std::uint64_t start,
                                                   bool want_data) {
    for (std::uint64_t at = start; at < state.size;) {
        auto status = state.writable->block_status(at, state.size - at);
        if (!status)
            return status.error();
        const bool data = !status->zero;
        if (data == want_data)
            return std::optional<std::uint64_t>(at);
        if (status->length == 0)
            return Error{ErrorCode::io_error, "block status made no progress"};
        at += status->length;
    }
    return std::optional<std::uint64_t>();
}

void on_lseek(fuse_req_t req, fuse_ino_t inode, off_t off, int whence, fuse_file_info*) {
    GUARD_BEGIN
    MountState& state = state_of(req);
    if (inode != kDiskInode || (whence != SEEK_DATA && whence != SEEK_HOLE)) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    // lseek(2): ENXIO when the offset is at or past the end (a negative one too).
    if (off < 0 || static_cast<std::uint64_t>(off) >= state.size) {
        fuse_reply_err(req, ENXIO);
        return;
    }
    const auto start = static_cast<std::uint64_t>(off);
    const bool want_data = whence == SEEK_DATA;
    std::optional<std::uint64_t> found;
    if (state.writable) {
        auto sought = seek_writable(state, start, want_data);
        if (!sought) {
            reply_writable_error(req, state, sought.error());
            return;
        }
        found = *sought;
    } else {
        // Data and compressed runs are data; zero runs (zero clusters, unallocated ranges,
        // holes of raw layers) are holes, as qemu-img map says "data": false for them.
        auto walked = walk_extents(*state.image, start, state.size, [&](const Extent& extent) {
            if ((extent.kind != ExtentKind::zero) == want_data) {
                found = std::max(start, extent.offset);
                return false;
            }
            return true;
        });
        if (!walked) {
            reply_error(req, state, walked.error());
            return;
        }
    }
    if (!found) {
        if (want_data) {
            fuse_reply_err(req, ENXIO); // only holes up to the end
            return;
        }
        found = state.size; // the end of the file counts as a hole
    }
    fuse_reply_lseek(req, static_cast<off_t>(*found));
    GUARD_END
}

/// The mount's state when `inode` is the disk of a --rw mount and the request's range is valid
/// (`range_ok`); otherwise the request is answered (EISDIR, EROFS, EINVAL) and null returned.
MountState* writable_disk(fuse_req_t req, fuse_ino_t inode, bool range_ok) {
    MountState& state = state_of(req);
    if (inode != kDiskInode || !state.writable) {
        fuse_reply_err(req, inode == kDiskInode ? EROFS : EISDIR);
        return nullptr;
    }
    if (!range_ok) {
        fuse_reply_err(req, EINVAL);
        return nullptr;
    }
    return &state;
}

void on_write(fuse_req_t req, fuse_ino_t inode, const char* data, std::size_t size, off_t off,
              fuse_file_info*) {
    GUARD_BEGIN
    MountState* writable = writable_disk(req, inode, off >= 0);
    if (!writable)
        return;
    MountState& state = *writable;
    const auto start = static_cast<std::uint64_t>(off);
    if (size == 0) {
        fuse_reply_write(req, 0);
        return;
    }
    // A disk does not grow: a write at the end has no room, one across it is cut short there
    // (as qemu's FUSE export does for an image that is not growable).
    if (start >= state.size) {
        fuse_reply_err(req, ENOSPC);
        return;
    }
    const auto length = static_cast<std::size_t>(std::min<std::uint64_t>(size, state.size - start));
    auto written = state.writable->write(start, {reinterpret_cast<const std::byte*>(data), length});
    if (!written) {
        reply_writable_error(req, state, written.error());
        return;
    }
    fuse_reply_write(req, length);
    GUARD_END
}

void on_fallocate(fuse_req_t req, fuse_ino_t inode, int mode, off_t off, off_t length,
                  fuse_file_info*) {
    GUARD_BEGIN
    MountState* writable = writable_disk(req, inode, off >= 0 && length > 0);
    if (!writable)
        return;
    MountState& state = *writable;
    // As qemu's FUSE export (fuse_fallocate): PUNCH_HOLE and ZERO_RANGE within the disk;
    // plain preallocation inside a file that cannot grow is not supported (EOPNOTSUPP, which
    // makes posix_fallocate and tools fall back or give up), nor are other modes.
    const bool punch = (mode & FALLOC_FL_PUNCH_HOLE) != 0;
    const bool zero = (mode & FALLOC_FL_ZERO_RANGE) != 0;
    if ((mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)) ||
        punch == zero) {
        fuse_reply_err(req, EOPNOTSUPP);
        return;
    }
    const auto start = static_cast<std::uint64_t>(off);
    std::uint64_t end = start + static_cast<std::uint64_t>(length);
    if (end > state.size) {
        // With KEEP_SIZE the part past the end has nothing to do; without it, it would grow.
        if (!(mode & FALLOC_FL_KEEP_SIZE)) {
            fuse_reply_err(req, ENOSPC);
            return;
        }
        end = state.size;
    }
    if (start < end) {
        // A punched range must read back as zeros (fallocate(2)), which discard does not
        // promise for partial clusters or over a backing file: write_zeroes does, freeing the
        // host clusters it can (unmap). ZERO_RANGE keeps them (qemu: blk_pwrite_zeroes, 0).
        auto done = state.writable->write_zeroes(start, end - start, /*unmap=*/punch);
        if (!done) {
            reply_writable_error(req, state, done.error());
            return;
        }
    }
    fuse_reply_err(req, 0);
    GUARD_END
}

/// fsync, and close of a descriptor that could write: every write so far made durable.
void flush_writable(fuse_req_t req, fuse_ino_t inode) {
    GUARD_BEGIN
    MountState& state = state_of(req);
    if (inode == kDiskInode && state.writable) {
        auto flushed = state.writable->flush();
        if (!flushed) {
            reply_writable_error(req, state, flushed.error());
            return;
        }
    }
    fuse_reply_err(req, 0);
    GUARD_END
}

void on_fsync(fuse_req_t req, fuse_ino_t inode, int, fuse_file_info*) {
    flush_writable(req, inode);
}

void on_flush(fuse_req_t req, fuse_ino_t inode, fuse_file_info*) {
    flush_writable(req, inode);
}

void on_opendir(fuse_req_t req, fuse_ino_t inode, fuse_file_info* fi) {
    if (inode != FUSE_ROOT_ID) {
        fuse_reply_err(req, ENOTDIR);
        return;
    }
    fi->cache_readdir = 1;
    fi->keep_cache = 1;
    fuse_reply_open(req, fi);
}

void on_readdir(fuse_req_t req, fuse_ino_t inode, std::size_t size, off_t off, fuse_file_info*) {
    GUARD_BEGIN
    if (inode != FUSE_ROOT_ID) {
        fuse_reply_err(req, ENOTDIR);
        return;
    }
    struct Entry {
        const char* name;
        fuse_ino_t inode;
        mode_t mode;
    };
    static constexpr Entry entries[] = {{".", FUSE_ROOT_ID, S_IFDIR},
                                        {"..", FUSE_ROOT_ID, S_IFDIR},
                                        {kDiskName, kDiskInode, S_IFREG}};
    std::vector<char> buffer(size);
    std::size_t used = 0;
    for (auto i = static_cast<std::size_t>(std::max<off_t>(off, 0)); i < std::size(entries); ++i) {
        struct stat st {};
        st.st_ino = entries[i].inode;
        st.st_mode = entries[i].mode;
        std::size_t need = fuse_add_direntry(req, buffer.data() + used, size - used,
                                             entries[i].name, &st, static_cast<off_t>(i + 1));
        if (need > size - used)
            break;
        used += need;
    }
    fuse_reply_buf(req, buffer.data(), used);
    GUARD_END
}

void on_statfs(fuse_req_t req, fuse_ino_t) {
    const MountState& state = state_of(req);
    struct statvfs st {};
    st.f_bsize = 4096;
    st.f_frsize = 4096;
    st.f_blocks = (state.size + 4095) / 4096;
    st.f_files = 2;
    st.f_namemax = 255;
    st.f_flag = state.writable ? 0 : ST_RDONLY;
    fuse_reply_statfs(req, &st);
}

fuse_lowlevel_ops operations() {
    fuse_lowlevel_ops ops{};
    ops.init = on_init;
    ops.lookup = on_lookup;
    ops.getattr = on_getattr;
    ops.setattr = on_setattr;
    ops.open = on_open;
    ops.read = on_read;
    ops.lseek = on_lseek;
    ops.write = on_write;
    ops.fallocate = on_fallocate;
    ops.fsync = on_fsync;
    ops.flush = on_flush;
    ops.opendir = on_opendir;
    ops.readdir = on_readdir;
    ops.statfs = on_statfs;
    return ops;
}

/// libfuse's own messages ("fuse: mount failed: Permission denied") in our one-line format.
std::string g_log_prefix;
void log_to_stderr(enum fuse_log_level level, const char* format, va_list ap) {
    if (level > FUSE_LOG_WARNING)
        return;
    char text[1024];
    std::vsnprintf(text, sizeof text, format, ap);
    std::string_view message = text;
    if (message.starts_with("fuse: "))
        message.remove_prefix(6);
    while (!message.empty() && message.back() == '\n')
        message.remove_suffix(1);
    report(g_log_prefix, message, kExitOutputError);
}

struct MountArgs {
    ImageArgs image;
    std::string mountpoint;
    bool foreground = false;
    bool writable = false; ///< --rw
};

/// The mount options: read-only unless --rw, the kernel checks permissions, and `mount` shows
/// "IMAGE on MOUNTPOINT type fuse.qcowmap".
std::string mount_options(const std::string& image_path, bool writable) {
    std::string options =
        std::string(writable ? "rw" : "ro") + ",default_permissions,subtype=qcowmap";
    char* escaped = nullptr; // fsname may hold commas: libfuse unescapes "\,"
    std::string fsname = "fsname=" + image_path;
    if (fuse_opt_add_opt_escaped(&escaped, fsname.c_str()) == 0 && escaped) {
        options += ",";
        options += escaped;
    }
    std::free(escaped);
    return options;
}

/// True when `dir` is a mount point already (listed in /proc/self/mountinfo, whose fifth
/// field is the mount point with spaces and the like escaped as \ooo).
bool is_mount_point(const std::string& dir) {
    char* resolved = ::realpath(dir.c_str(), nullptr);
    if (!resolved)
        return false;
    const std::string wanted(resolved);
    std::free(resolved);
    std::FILE* table = std::fopen("/proc/self/mountinfo", "re");
    if (!table)
        return false;
    bool found = false;
    char* line = nullptr;
    std::size_t capacity = 0;
    while (!found && ::getline(&line, &capacity, table) > 0) {
        std::istringstream fields(line);
        std::string field;
        for (int i = 0; i < 5; ++i)
            fields >> field; // mount ID, parent ID, major:minor, root, mount point
        std::string unescaped;
        for (std::size_t i = 0; i < field.size(); ++i) {
            if (field[i] == '\\' && i + 3 < field.size()) {
                unescaped +=
                    static_cast<char>(std::strtol(field.substr(i + 1, 3).c_str(), nullptr, 8));
                i += 3;
            } else {
                unescaped += field[i];
            }
        }
        found = unescaped == wanted;
    }
    std::free(line);
    std::fclose(table);
    return found;
}

int run_mount(const MountArgs& args) {
    struct stat mountpoint {};
    if (::stat(args.mountpoint.c_str(), &mountpoint) != 0)
        return report(args.mountpoint, std::strerror(errno), kExitOutputError);
    if (!S_ISDIR(mountpoint.st_mode))
        return report(args.mountpoint, "not a directory", kExitOutputError);
    if (is_mount_point(args.mountpoint)) {
        // Mounting over it would hide what is mounted there, and a later unmount would
        // unmount the wrong one.
        return report(args.mountpoint,
                      "is a mount point already (unmount it first: fusermount3 -u DIR)",
                      kExitOutputError);
    }

    MountState state;
    state.image_path = args.image.path;
    if (args.writable) {
        // Opened (and locked, and checked) before the mount exists: a locked or damaged image
        // is one error line here rather than EIO later.
        WritableOptions options;
        options.open = args.image.open_options();
        auto image = WritableImage::open(args.image.path, options);
        if (!image) {
            return report_error(args.image.path, image.error(), kExitImageError,
                                ImageAccess::write);
        }
        state.writable.emplace(std::move(*image));
        state.size = state.writable->size();
    } else {
        auto image = open_or_report(args.image);
        if (!image)
            return kExitImageError;
        state.image.emplace(std::move(*image));
        state.size = state.image->size();
    }
    if (::stat(args.image.path.c_str(), &state.image_stat) != 0)
        return report(args.image.path, std::strerror(errno), kExitImageError);
    if (state.image) {
        // One walk of the whole map now, before the mount exists: counts the blocks for
        // st_blocks and turns a broken table into an error line here rather than EIO later.
        auto counted = walk_extents(*state.image, 0, state.size, [&](const Extent& extent) {
            if (extent.kind != ExtentKind::zero)
                state.data_bytes += extent.length;
            return true;
        });
        if (!counted)
            return report(args.image.path, counted.error().message, kExitImageError);
    }

    // Absolute: the daemon leaves the current directory, and unmounts by this name on SIGTERM.
    std::error_code ignored;
    state.mountpoint = std::filesystem::canonical(args.mountpoint, ignored).string();
    if (state.mountpoint.empty())
        state.mountpoint = args.mountpoint;

    g_log_prefix = args.mountpoint;
    fuse_set_log_func(log_to_stderr);
    std::string options =
        mount_options(std::filesystem::absolute(args.image.path).string(), args.writable);
    const char* argv[] = {"qcowmap", "-o", options.c_str(), nullptr};
    fuse_args fargs = FUSE_ARGS_INIT(3, const_cast<char**>(argv));
    const fuse_lowlevel_ops ops = operations();
    fuse_session* session = fuse_session_new(&fargs, &ops, sizeof ops, &state);
    fuse_opt_free_args(&fargs);
    if (!session)
        return report(args.mountpoint, "could not create the FUSE session", kExitOutputError);
    if (fuse_set_signal_handlers(session) != 0) {
        fuse_session_destroy(session);
        return report(args.mountpoint, "could not install signal handlers", kExitOutputError);
    }
    if (fuse_session_mount(session, state.mountpoint.c_str()) != 0) {
        // libfuse said why, through log_to_stderr.
        fuse_remove_signal_handlers(session);
        fuse_session_destroy(session);
        return kExitOutputError;
    }
    // The mount exists from here on. In the background, the parent returns 0 once the child
    // has detached (setsid, std descriptors on /dev/null).
    if (fuse_daemonize(args.foreground ? 1 : 0) != 0) {
        fuse_session_unmount(session);
        fuse_remove_signal_handlers(session);
        fuse_session_destroy(session);
        return report(args.mountpoint, "could not run in the background", kExitOutputError);
    }
    fuse_loop_config* config = fuse_loop_cfg_create();
    // Returns on unmount (0) or on SIGTERM/SIGINT/SIGHUP (the signal number): both are a clean
    // end. A negative value is an error reading /dev/fuse.
    int looped = fuse_session_loop_mt(session, config);
    fuse_loop_cfg_destroy(config);
    fuse_session_unmount(session); // nothing to do when `umount` came first
    fuse_remove_signal_handlers(session);
    fuse_session_destroy(session);
    int code = kExitOk;
    if (looped < 0)
        code = report(args.mountpoint, std::strerror(-looped), kExitOutputError);
    if (state.writable) {
        // Unmounted: store what is cached, the bitmaps, and release the locks. A failure here
        // is the last word on the writes, so it is said (stderr: the terminal with -f) and
        // ends the process with an error.
        if (auto closed = state.writable->close(); !closed) {
            code =
                report_error(args.image.path, closed.error(), kExitImageError, ImageAccess::write);
        }
    }
    return code;
}

} // namespace

Command add_mount(CLI::App& app) {
    auto* command = app.add_subcommand(
        "mount", "Show the virtual disk as the file MOUNTPOINT/disk (FUSE), read-only unless "
                 "--rw; runs in the background until `umount MOUNTPOINT`");
    auto args = std::make_shared<MountArgs>();
    args->image.add_to(*command);
    // -f keeps its meaning in FUSE tools here (libfuse -f, sshfs -f): foreground. The image format
    // is --format only.
    command->remove_option(command->get_option("--format"));
    command
        ->add_option("--format", args->image.format,
                     "Format of the image: qcow2 (qcow version 1 too) or raw; default: probed "
                     "as qemu-img does")
        ->check(one_of({"qcow2", "qcow", "raw"}))
        ->option_text("FMT");
    command->add_option("MOUNTPOINT", args->mountpoint, "Directory to mount the disk on")
        ->required();
    command->add_flag("-f,--foreground", args->foreground,
                      "Stay in the foreground (until unmounted or sent SIGTERM)");
    command->add_flag("--rw", args->writable,
                      "Make the disk file writable: writes, fallocate (punch hole, zero range) "
                      "and fsync go into the qcow2 image in place, under QEMU's write lock; "
                      "unmounting closes the image");
    return {command, [args] {
                if (args->writable) {
                    // A snapshot is a past state, -U would let someone else write too, a raw
                    // file has no qcow2 to keep consistent, and --backing=none would fill
                    // partial clusters from zeros instead of the backing file.
                    if (!args->image.snapshot.empty())
                        throw UsageError("--rw cannot write a snapshot (--snapshot)");
                    if (args->image.force_share)
                        throw UsageError("--rw cannot share the image (-U): a writer locks it");
                    if (args->image.format == "raw")
                        throw UsageError("--rw writes qcow2 images only, not -f raw");
                    if (args->image.backing == "none")
                        throw UsageError("--rw needs the backing file (not --backing=none)");
                    if (args->image.format.empty() && !args->image.path.empty()) {
                        // Probed as qemu-img probes, without its raw warning: a raw file is
                        // refused either way.
                        args->image.format = probe_image_format(args->image.path, false, false);
                        if (args->image.format == "raw")
                            throw UsageError(printable(args->image.path) +
                                             ": --rw writes qcow2 images only, and this is not "
                                             "one (probed as raw)");
                    }
                }
                return run_mount(*args);
            }};
}

} // namespace qcowmap::cli

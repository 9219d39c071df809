// nbdkit-qcowmap-plugin: serves a qcow2 image's virtual disk over NBD, read-only unless
// readonly=false.
//
//   nbdkit qcowmap file=IMAGE.qcow2 [snapshot=ID_OR_NAME] [backing=none] [data-file=PATH]
//          [untrusted=true] [force-share=true] [readonly=false]
//
// (installed into nbdkit's plugin directory, so nbdkit finds it by name).
//
// One Image is opened when nbdkit is ready and shared by every connection and every thread:
// an Image is immutable, so reads need no lock (NBDKIT_THREAD_MODEL_PARALLEL) and all
// connections see the same bytes (can_multi_conn). Block status comes straight from the extent
// iterator: zero and unallocated runs are reported as holes that read as zeros. A read that
// faults (the image truncated under the server, EIO from a bad sector) is contained by the
// library: that request gets EIO, every other client carries on (README, "Errors and exit
// codes").
//
// readonly=false serves a WritableImage instead (QEMU's write lock taken at start): pwrite,
// zero, trim and flush go into the image in place, and block status comes from its
// block_status. It serialises requests by its own mutex, so the thread model stays parallel,
// and one image shared by every connection keeps multi-conn safe (a flush on any connection
// flushes every write). nbdkit -r still serves it read-only (nbdkit never calls the write
// callbacks then), but the image is opened, and locked, for writing.
#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include <qcowmap/image.hpp>
#include <qcowmap/writable.hpp>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <string_view>

#include <sys/mman.h>
#include <unistd.h>

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

namespace {

std::string file_name;
qcowmap::OpenOptions options;
bool writable = false;               // readonly=false
std::optional<qcowmap::Image> image; // set by get_ready, before any connection
// Instead of `image` when writable. On the heap, closed and deleted only by the process that
// serves (close_writable): nbdkit forks into the background after get_ready, and the parent's
// exit must not close the image the child goes on writing (it would clear the bitmaps'
// in_use flag under the child, as a global's destructor did).
qcowmap::WritableImage* written = nullptr;
pid_t serving_pid = 0; // set by after_fork in the process that serves

void report(const qcowmap::Error& error) {
    // The file named once: the library names it itself where it could not open it.
    if (error.message_names_path && error.path == file_name)
        nbdkit_error("%s", error.message.c_str());
    else
        nbdkit_error("%s: %s", file_name.c_str(), error.message.c_str());
    nbdkit_set_error(qcowmap::to_errno(error));
}

// Every callback catches everything: exceptions must not unwind into nbdkit's C frames.
#define GUARD_BEGIN try {
#define GUARD_END(fail_value)                                                                      \
    }                                                                                              \
    catch (const std::exception& e) {                                                              \
        nbdkit_error("qcowmap: %s", e.what());                                                     \
        nbdkit_set_error(ENOMEM);                                                                  \
        return fail_value;                                                                         \
    }                                                                                              \
    catch (...) {                                                                                  \
        nbdkit_error("qcowmap: unexpected exception");                                             \
        nbdkit_set_error(EIO);                                                                     \
        return fail_value;                                                                         \
    }

int serve_config(const char* key, const char* value) {
    GUARD_BEGIN
    if (std::strcmp(key, "file") == 0) {
        char* absolute = nbdkit_absolute_path(value); // nbdkit may chdir("/") when daemonising
        if (!absolute) {
            return -1;
        }
        file_name = absolute;
        std::free(absolute);
    } else if (std::strcmp(key, "data-file") == 0) {
        char* absolute = nbdkit_absolute_path(value);
        if (!absolute) {
            return -1;
        }
        options.data_file = absolute;
        std::free(absolute);
    } else if (std::strcmp(key, "snapshot") == 0) {
        options.snapshot = value;
    } else if (std::strcmp(key, "backing") == 0) {
        if (std::strcmp(value, "none") == 0) {
            options.backing = qcowmap::BackingMode::none;
        } else if (std::strcmp(value, "follow") == 0) {
            options.backing = qcowmap::BackingMode::follow;
        } else {
            nbdkit_error("backing=%s: expected 'none' or 'follow'", value);
            return -1;
        }
    } else if (std::strcmp(key, "untrusted") == 0) {
        const int flag = nbdkit_parse_bool(value);
        if (flag < 0) {
            return -1; // nbdkit_parse_bool reported it
        }
        options.untrusted = flag != 0;
    } else if (std::strcmp(key, "force-share") == 0) {
        // qemu-img -U: no QEMU image locks. Without it the image is locked as a reader while
        // served (a VM cannot start writing it), and a writer already there is refused.
        const int flag = nbdkit_parse_bool(value);
        if (flag < 0) {
            return -1;
        }
        options.force_share = flag != 0;
    } else if (std::strcmp(key, "readonly") == 0) {
        const int flag = nbdkit_parse_bool(value);
        if (flag < 0) {
            return -1;
        }
        writable = flag == 0;
    } else {
        nbdkit_error("unknown parameter '%s'", key);
        return -1;
    }
    return 0;
    GUARD_END(-1)
}

int serve_config_complete() {
    if (file_name.empty()) {
        nbdkit_error("you must supply the file=IMAGE.qcow2 parameter");
        return -1;
    }
    if (writable && options.snapshot) {
        nbdkit_error("readonly=false cannot write a snapshot (snapshot=%s)",
                     options.snapshot->c_str());
        return -1;
    }
    if (writable && options.force_share) {
        nbdkit_error("readonly=false cannot share the image (force-share=true): a writer locks it");
        return -1;
    }
    if (writable && options.backing == qcowmap::BackingMode::none) {
        // Partial clusters would be filled from zeros instead of the backing file.
        nbdkit_error("readonly=false needs the backing file (not backing=none)");
        return -1;
    }
    return 0;
}

void close_writable();

// Opening in get_ready (not config_complete) still happens before nbdkit forks into the
// background or accepts a connection, so a bad image fails nbdkit's start with our message.
int serve_get_ready() {
    GUARD_BEGIN
    if (writable) {
        qcowmap::WritableOptions writable_options;
        writable_options.open = options;
        auto opened = qcowmap::WritableImage::open(file_name, writable_options);
        if (!opened) {
            report(opened.error());
            return -1;
        }
        written = new qcowmap::WritableImage(std::move(*opened));
        // nbdkit 1.32 in captive mode (--run) exits without calling cleanup or unload: the
        // image is closed by this handler then. Registered after open, it runs before the
        // destructors of the library's statics made during open (a close after them was a
        // heap-use-after-free in FileIo::close under ASan).
        std::atexit(close_writable);
        return 0;
    }
    auto opened = qcowmap::Image::open(file_name, options);
    if (!opened) {
        report(opened.error());
        return -1;
    }
    image.emplace(std::move(*opened));
    return 0;
    GUARD_END(-1)
}

// Stores the cached metadata and bitmaps, releases the locks and destroys the writable image.
// nbdkit has no way to fail at this point; an error is logged.
// Only in the process that serves: the parent that forked into the background leaves it.
void close_writable() {
    try {
        if (written && ::getpid() == serving_pid) {
            if (auto closed = written->close(); !closed)
                report(closed.error());
            delete written;
            written = nullptr;
        }
    } catch (...) {
        nbdkit_error("%s: could not close the image", file_name.c_str());
    }
}

// Called in the process that serves, whether nbdkit forked into the background or not.
int serve_after_fork() {
    serving_pid = ::getpid();
    return 0;
}

// Runs once the last connection is gone, before unload, while nbdkit can still report.
void serve_cleanup() {
    close_writable();
}

void serve_unload() {
    close_writable();
    image.reset();
}

void* serve_open(int /*readonly*/) {
    // Every connection shares the one image; the handle only has to be non-NULL (nbdkit checks
    // -r and readonly connections itself before any write callback).
    return written ? static_cast<void*>(written) : static_cast<void*>(&*image);
}

void serve_close(void* /*handle*/) {}

int64_t serve_get_size(void* /*handle*/) {
    return static_cast<int64_t>(written ? written->size() : image->size());
}

int serve_can_write(void*) {
    return written ? 1 : 0;
}
int serve_can_flush(void*) {
    return written ? 1 : 0;
}
int serve_can_trim(void*) {
    return written ? 1 : 0;
}
int serve_can_zero(void*) {
    return written ? 1 : 0;
}
int serve_can_fua(void*) {
    // nbdkit follows a write that asks for FUA by a flush, which is what FUA needs here.
    return written ? NBDKIT_FUA_EMULATE : NBDKIT_FUA_NONE;
}
int serve_can_multi_conn(void*) {
    return 1;
}
int serve_can_extents(void*) {
    return 1;
}
int serve_can_cache(void*) {
    // Prefetch advises the mapping; the writable image has no mapping to advise.
    return written ? NBDKIT_CACHE_NONE : NBDKIT_CACHE_NATIVE;
}

int serve_pread(void* /*handle*/, void* buf, uint32_t count, uint64_t offset, uint32_t /*flags*/) {
    GUARD_BEGIN
    const std::span<std::byte> into{static_cast<std::byte*>(buf), count};
    auto copied = written ? written->read(into, offset) : image->read(into, offset);
    if (!copied) {
        report(copied.error());
        return -1;
    }
    if (*copied != count) { // nbdkit checks bounds first; a short read means a bug here
        nbdkit_error("%s: short read at %llu", file_name.c_str(),
                     static_cast<unsigned long long>(offset));
        nbdkit_set_error(EIO);
        return -1;
    }
    return 0;
    GUARD_END(-1)
}

int serve_pwrite(void* /*handle*/, const void* buf, uint32_t count, uint64_t offset,
                 uint32_t /*flags: FUA is emulated by nbdkit*/) {
    GUARD_BEGIN
    auto done = written->write(offset, {static_cast<const std::byte*>(buf), count});
    if (!done) {
        report(done.error());
        return -1;
    }
    return 0;
    GUARD_END(-1)
}

int serve_zero(void* /*handle*/, uint32_t count, uint64_t offset, uint32_t flags) {
    GUARD_BEGIN
    // NBD_CMD_WRITE_ZEROES without NO_HOLE: the client lets the clusters be freed (qemu-nbd
    // passes BDRV_REQ_MAY_UNMAP the same way).
    auto done = written->write_zeroes(offset, count, (flags & NBDKIT_FLAG_MAY_TRIM) != 0);
    if (!done) {
        report(done.error());
        return -1;
    }
    return 0;
    GUARD_END(-1)
}

int serve_trim(void* /*handle*/, uint32_t count, uint64_t offset, uint32_t /*flags*/) {
    GUARD_BEGIN
    auto done = written->discard(offset, count);
    if (!done) {
        report(done.error());
        return -1;
    }
    return 0;
    GUARD_END(-1)
}

int serve_flush(void* /*handle*/, uint32_t /*flags*/) {
    GUARD_BEGIN
    auto done = written->flush();
    if (!done) {
        report(done.error());
        return -1;
    }
    return 0;
    GUARD_END(-1)
}

// Block status of the writable image: ranges that read as zeros are holes, the rest data, as
// the read-only path says of zero and data extents.
int writable_extents(uint32_t count, uint64_t offset, uint32_t flags,
                     struct nbdkit_extents* extents) {
    const uint64_t end = offset + count;
    for (uint64_t at = offset; at < end;) {
        auto status = written->block_status(at, end - at);
        if (!status) {
            report(status.error());
            return -1;
        }
        if (status->length == 0) {
            nbdkit_error("%s: block status made no progress at %llu", file_name.c_str(),
                         static_cast<unsigned long long>(at));
            nbdkit_set_error(EIO);
            return -1;
        }
        const uint32_t type = status->zero ? NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO : 0;
        if (nbdkit_add_extent(extents, at, status->length, type) == -1) {
            return -1;
        }
        if (flags & NBDKIT_FLAG_REQ_ONE) {
            return 0;
        }
        at += status->length;
    }
    return 0;
}

int serve_extents(void* /*handle*/, uint32_t count, uint64_t offset, uint32_t flags,
                  struct nbdkit_extents* extents) {
    GUARD_BEGIN
    if (written) {
        return writable_extents(count, offset, flags, extents);
    }
    const auto& img = *image;
    auto range = img.extents(offset, offset + count);
    for (const qcowmap::Extent& extent : range) {
        // Like qemu-nbd: what is not data is a hole reading as zeros (unallocated ranges, zero
        // clusters, holes of raw layers); data and compressed clusters are plain data.
        const uint32_t type =
            extent.kind == qcowmap::ExtentKind::zero ? NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO : 0;
        if (nbdkit_add_extent(extents, extent.offset, extent.length, type) == -1) {
            return -1;
        }
        if (flags & NBDKIT_FLAG_REQ_ONE) {
            return 0;
        }
    }
    if (range.error()) {
        report(*range.error());
        return -1;
    }
    return 0;
    GUARD_END(-1)
}

// Prefetch: ask the kernel to read ahead the mapped data runs of the range (madvise
// WILLNEED), so a later pread finds them in the page cache. Zero runs need nothing, and
// compressed clusters would have to be decompressed anyway; an advice failure is not an error.
int serve_cache(void* /*handle*/, uint32_t count, uint64_t offset, uint32_t /*flags*/) {
    GUARD_BEGIN
    const auto& img = *image;
    const auto page = static_cast<std::uintptr_t>(sysconf(_SC_PAGESIZE));
    auto range = img.extents(offset, offset + count);
    for (const qcowmap::Extent& extent : range) {
        if (extent.kind != qcowmap::ExtentKind::data || extent.bytes.empty()) {
            continue;
        }
        const auto begin = reinterpret_cast<std::uintptr_t>(extent.bytes.data());
        const auto aligned = begin & ~(page - 1);
        (void)madvise(reinterpret_cast<void*>(aligned), begin - aligned + extent.bytes.size(),
                      MADV_WILLNEED);
    }
    if (range.error()) {
        report(*range.error());
        return -1;
    }
    return 0;
    GUARD_END(-1)
}

struct nbdkit_plugin make_plugin() {
    struct nbdkit_plugin p {};
    p.name = "qcowmap";
    p.longname = "qcowmap: qcow2 images through one read-only memory mapping";
    p.version = QCOWMAP_VERSION;
    p.description = "Serves the virtual disk of a qcow2 image, read-only unless readonly=false";
    p.unload = serve_unload;
    p.cleanup = serve_cleanup;
    p.after_fork = serve_after_fork;
    p.config = serve_config;
    p.config_complete = serve_config_complete;
    p.config_help = "file=IMAGE.qcow2    (required) the image to serve\n"
                    "snapshot=ID|NAME    serve this internal snapshot\n"
                    "data-file=PATH      the external data file to use instead of the named one\n"
                    "backing=none        ignore the backing file (unallocated reads as zeros)\n"
                    "untrusted=true      follow backing/data file names only inside the image's "
                    "directory\n"
                    "force-share=true    take no QEMU image locks (qemu-img -U): serve an image "
                    "a writer holds\n"
                    "readonly=false      serve it writable: writes, zero, trim and flush go into "
                    "the image in place (QEMU's write lock held)";
    p.magic_config_key = "file";
    p.get_ready = serve_get_ready;
    p.open = serve_open;
    p.close = serve_close;
    p.get_size = serve_get_size;
    p.can_write = serve_can_write;
    p.can_multi_conn = serve_can_multi_conn;
    p.can_extents = serve_can_extents;
    p.can_cache = serve_can_cache;
    p.can_flush = serve_can_flush;
    p.can_trim = serve_can_trim;
    p.can_zero = serve_can_zero;
    p.can_fua = serve_can_fua;
    p.pread = serve_pread;
    p.pwrite = serve_pwrite;
    p.zero = serve_zero;
    p.trim = serve_trim;
    p.flush = serve_flush;
    p.extents = serve_extents;
    p.cache = serve_cache;
    p.errno_is_preserved = 0;
    return p;
}

struct nbdkit_plugin plugin = make_plugin();

} // namespace

NBDKIT_REGISTER_PLUGIN(plugin)

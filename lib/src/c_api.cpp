// The C API (qcowmap/qcow2.h): the drop-in qcow2_* reader functions and the qcowmap_* extras,
// as thin wrappers over Image. Every entry point catches everything: no C++ exception may
// unwind into C frames (std::bad_alloc is the realistic one; it becomes ENOMEM).
#include <qcowmap/hash.hpp>
#include <qcowmap/image.hpp>
#include <qcowmap/qcow2.h>
#include <qcowmap/writable.hpp>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <thread>

#include <sys/stat.h>
#include <unistd.h>

struct qcow2 {
    qcowmap::Image image;
    int fd; // the caller's fd, closed by qcow2_close (-1 for qcowmap_open)
    /// Opened for writing (qcowmap_open_options::writable): reads and writes go through it;
    /// `image` is a read-only view as of the open, for walks a fresh one is taken.
    std::unique_ptr<qcowmap::WritableImage> writable = nullptr;
};

struct qcowmap_extents {
    qcowmap::Image image;             // keeps the mapping alive for the spans handed out
    qcowmap::detail::ExtentWalk walk; // the machinery of Image::extents(), stepped one by one
    qcowmap::Decompressor decompressor;
    std::string error;
    bool failed = false;
    /// qcowmap_extents_open_ahead: the walk that produces bytes ahead (Image::runs) instead.
    std::unique_ptr<qcowmap::detail::RunWalk> ahead = nullptr;
};

namespace {

// The message behind `*error_ret` and qcowmap_last_error(). The original reader hands out
// string literals; ours are built at run time (they name offsets and paths), so they live in
// one buffer per thread: the caller never frees it, and concurrent failures on other threads
// cannot overwrite it. It stays valid until the next failure on the same thread.
thread_local std::string last_error;

const char* remember(std::string message) noexcept {
    try {
        last_error = std::move(message);
    } catch (...) {
        last_error.clear(); // keeps its old capacity: the assignment of "" cannot throw
    }
    return last_error.c_str();
}

/// Sets errno and the thread's message; returns the message for `error_ret`.
const char* fail(const qcowmap::Error& error) noexcept {
    const char* message = remember(error.message);
    errno = qcowmap::to_errno(error);
    return message;
}

const char* fail_errno(int err, const char* what) noexcept {
    const char* message = nullptr;
    try {
        message = remember(std::string(what) + ": " + std::strerror(err));
    } catch (...) { // building the message itself ran out of memory
        message = remember(std::string());
    }
    errno = err;
    return message;
}

/// Closes `fd` without disturbing errno (the failure's errno is what the caller wants).
void close_keep_errno(int fd) {
    const int saved = errno;
    if (fd >= 0) {
        ::close(fd);
    }
    errno = saved;
}

/// Maps the file open on `fd`, whose fstat is `st`.
qcowmap::Result<qcowmap::Image> open_fd(int fd, const struct stat& st) {
    // Mapping through the file's own path lets relative backing and data file names resolve
    // against its directory, as qemu does; /proc/self/fd/N (a magic link that reopens the very
    // same file) is the fallback for files without a usable path.
    const std::string proc = "/proc/self/fd/" + std::to_string(fd);
    std::string target(PATH_MAX, '\0');
    const ssize_t n = ::readlink(proc.c_str(), target.data(), target.size());
    std::string path = proc;
    if (n > 0 && static_cast<std::size_t>(n) < target.size() && target[0] == '/') {
        target.resize(static_cast<std::size_t>(n));
        struct stat named {};
        if (::stat(target.c_str(), &named) == 0 && named.st_dev == st.st_dev &&
            named.st_ino == st.st_ino) {
            path = target;
        }
    }
    auto image = qcowmap::Image::open(path);
    if (image && !image->maps_file(st.st_dev, st.st_ino)) {
        // The path was replaced by another file between stat and open.
        image = qcowmap::Image::open(proc);
    }
    return image;
}

} // namespace

extern "C" {

struct qcow2* qcow2_open(int fd, const char** error_ret) {
    try {
        if (fd < 0) {
            const char* message = fail_errno(EBADF, "qcow2_open");
            if (error_ret) {
                *error_ret = message;
            }
            return nullptr;
        }
        struct stat st {};
        if (::fstat(fd, &st) != 0) {
            const int err = errno;
            const char* message = fail_errno(err, ("fd " + std::to_string(fd)).c_str());
            if (error_ret) {
                *error_ret = message;
            }
            close_keep_errno(fd);
            return nullptr;
        }
        auto image = open_fd(fd, st);
        if (!image) {
            const char* message = fail(image.error());
            if (error_ret) {
                *error_ret = message;
            }
            close_keep_errno(fd);
            return nullptr;
        }
        return new qcow2{std::move(*image), fd};
    } catch (...) {
        const char* message = fail_errno(ENOMEM, "qcow2_open");
        if (error_ret) {
            *error_ret = message;
        }
        close_keep_errno(fd);
        return nullptr;
    }
}

struct qcow2* qcowmap_open(const char* path, const struct qcowmap_open_options* options,
                           const char** error_ret) {
    try {
        if (!path) {
            const char* message = fail_errno(EINVAL, "qcowmap_open: no path");
            if (error_ret) {
                *error_ret = message;
            }
            return nullptr;
        }
        qcowmap::OpenOptions open_options;
        if (options && options->snapshot) {
            open_options.snapshot = options->snapshot;
        }
        if (options && options->no_backing) {
            open_options.backing = qcowmap::BackingMode::none;
        }
        if (options && options->untrusted) {
            open_options.untrusted = true;
        }
        if (options && options->writable) {
            qcowmap::WritableOptions writable_options;
            writable_options.open = open_options;
            auto writable = qcowmap::WritableImage::open(path, writable_options);
            auto view = writable ? writable->snapshot_view()
                                 : qcowmap::Result<qcowmap::Image>(writable.error());
            if (!view) {
                const char* message = fail(view.error());
                if (error_ret) {
                    *error_ret = message;
                }
                return nullptr;
            }
            return new qcow2{std::move(*view), -1,
                             std::make_unique<qcowmap::WritableImage>(std::move(*writable))};
        }
        auto image = qcowmap::Image::open(path, open_options);
        if (!image) {
            const char* message = fail(image.error());
            if (error_ret) {
                *error_ret = message;
            }
            return nullptr;
        }
        return new qcow2{std::move(*image), -1};
    } catch (...) {
        const char* message = fail_errno(ENOMEM, "qcowmap_open");
        if (error_ret) {
            *error_ret = message;
        }
        return nullptr;
    }
}

void qcow2_close(struct qcow2* q) {
    if (!q) {
        return;
    }
    const int fd = q->fd;
    if (q->writable) {
        (void)q->writable->close(); // qcowmap_close() reports its errors
    }
    delete q; // Image's destructor does not throw
    if (fd >= 0) {
        ::close(fd);
    }
}

uint64_t qcow2_get_size(struct qcow2* q) {
    return !q ? 0 : q->writable ? q->writable->size() : q->image.size();
}

int qcow2_read(struct qcow2* q, void* dest, size_t len, uint64_t offset) {
    try {
        if (!q || (!dest && len > 0)) {
            fail_errno(EINVAL, "qcow2_read");
            return -1;
        }
        const std::uint64_t size = qcow2_get_size(q);
        // Like the original: reads at or past the end copy nothing, reads across it are cut.
        if (offset >= size) {
            return 0;
        }
        if (len > size - offset) {
            len = static_cast<size_t>(size - offset);
        }
        if (len > static_cast<size_t>(INT_MAX)) {
            fail_errno(EOVERFLOW, "qcow2_read: more than INT_MAX bytes requested");
            return -1;
        }
        auto copied = q->writable ? q->writable->read({static_cast<std::byte*>(dest), len}, offset)
                                  : q->image.read({static_cast<std::byte*>(dest), len}, offset);
        if (!copied) {
            fail(copied.error());
            return -1;
        }
        return static_cast<int>(*copied);
    } catch (...) {
        fail_errno(ENOMEM, "qcow2_read");
        return -1;
    }
}

const char* qcowmap_last_error(void) {
    return last_error.c_str();
}

struct qcowmap_extents* qcowmap_extents_open(struct qcow2* q, uint64_t start, uint64_t end) {
    if (!q) {
        fail_errno(EINVAL, "qcowmap_extents_open");
        return nullptr;
    }
    try {
        if (q->writable) {
            // A walk sees the writes so far: they are flushed and the file opened again (the
            // iterator owns that view; `q` is not changed, other threads may be using it).
            auto view = q->writable->snapshot_view();
            if (!view) {
                fail(view.error());
                return nullptr;
            }
            auto walk = view->extents(start, end).walk();
            return new qcowmap_extents{std::move(*view), std::move(walk), {}, {}, false};
        }
        return new qcowmap_extents{q->image, q->image.extents(start, end).walk(), {}, {}, false};
    } catch (...) {
        fail_errno(ENOMEM, "qcowmap_extents_open");
        return nullptr;
    }
}

struct qcowmap_extents* qcowmap_extents_open_ahead(struct qcow2* q, uint64_t start, uint64_t end,
                                                   unsigned threads) {
    qcowmap_extents* it = qcowmap_extents_open(q, start, end);
    if (!it)
        return nullptr;
    try {
        qcowmap::VisitOptions options;
        options.threads =
            threads != 0 ? threads : std::max(2u, std::thread::hardware_concurrency());
        options.data_access = qcowmap::DataAccess::automatic;
        options.prefetch = qcowmap::Prefetch::touch;
        it->ahead = std::make_unique<qcowmap::detail::RunWalk>(it->image, start, end, options);
        return it;
    } catch (...) {
        delete it;
        fail_errno(ENOMEM, "qcowmap_extents_open_ahead");
        return nullptr;
    }
}

namespace {

/// Ends the walk of `it` with `error`: qcowmap_extents_next() returns -1 from now on.
int fail_walk(qcowmap_extents* it, const qcowmap::Error& error) {
    it->failed = true;
    it->error = error.message;
    fail(error);
    return -1;
}

/// What the map says of `[offset, offset + length)`, a piece of `extent` (or all of it): all but
/// `data`, which the caller sets for DATA and COMPRESSED.
qcowmap_extent map_fields(const qcowmap::Extent& extent, std::uint64_t offset,
                          std::uint64_t length) {
    qcowmap_extent out{};
    out.offset = offset;
    out.length = length;
    out.present = extent.present ? 1 : 0;
    out.depth = extent.depth;
    out.has_host_offset = extent.host_offset ? 1 : 0;
    out.host_offset = extent.host_offset.value_or(0);
    switch (extent.kind) {
    case qcowmap::ExtentKind::data:
        out.kind = QCOWMAP_EXTENT_DATA;
        out.host_offset += offset - extent.offset;
        break;
    case qcowmap::ExtentKind::zero:
        out.kind = QCOWMAP_EXTENT_ZERO;
        break;
    case qcowmap::ExtentKind::compressed:
        out.kind = QCOWMAP_EXTENT_COMPRESSED;
        out.compressed = extent.bytes.data();
        out.compressed_length = extent.bytes.size();
        break;
    }
    return out;
}

/// qcowmap_extents_next() of a walk that reads ahead: the next run, described by the extent
/// it is a piece of.
int next_run(qcowmap_extents* it, qcowmap_extent* out) {
    qcowmap::Run run;
    if (!it->ahead->next(run))
        return it->ahead->error() ? fail_walk(it, *it->ahead->error()) : 0;
    *out = map_fields(it->ahead->extent(), run.offset, run.length);
    if (run.kind != qcowmap::ExtentKind::zero)
        out->data = run.bytes.data();
    return 1;
}

} // namespace

int qcowmap_extents_next(struct qcowmap_extents* it, struct qcowmap_extent* out) {
    if (!it || !out) {
        fail_errno(EINVAL, "qcowmap_extents_next");
        return -1;
    }
    try {
        if (it->failed) {
            remember(it->error); // so qcowmap_last_error() describes this iterator's failure
            errno = EIO;
            return -1;
        }
        if (it->ahead)
            return next_run(it, out);
        qcowmap::Extent extent;
        if (!it->walk.next(extent))
            return it->walk.error() ? fail_walk(it, *it->walk.error()) : 0;
        *out = map_fields(extent, extent.offset, extent.length);
        if (extent.kind == qcowmap::ExtentKind::data) {
            out->data = extent.bytes.data();
        } else if (extent.kind == qcowmap::ExtentKind::compressed) {
            auto bytes = it->decompressor.decompress(it->image, extent);
            if (!bytes)
                return fail_walk(it, bytes.error());
            out->data = bytes->data();
        }
        return 1;
    } catch (...) {
        it->failed = true;
        try {
            it->error = "out of memory";
        } catch (...) { // nothing may leave a C function: keep whatever error text is there
        }
        fail_errno(ENOMEM, "qcowmap_extents_next");
        return -1;
    }
}

const char* qcowmap_extents_error(const struct qcowmap_extents* it) {
    return it && it->failed ? it->error.c_str() : nullptr;
}

void qcowmap_extents_free(struct qcowmap_extents* it) {
    delete it;
}

int qcowmap_hash(struct qcow2* q, const char* algo, unsigned threads, char* hex, size_t hex_size) {
    try {
        if (!q || !hex) {
            fail_errno(EINVAL, "qcowmap_hash");
            return -1;
        }
        const std::string name = algo ? algo : "sha256";
        auto algorithm = qcowmap::parse_hash_algorithm(name);
        if (!algorithm) {
            remember("qcowmap_hash: unknown algorithm '" + name +
                     "' (sha256, sha512, blake2b512, xxh3-128, blkhash-sha256, "
                     "blkhash-sha512, blkhash-blake2b512)");
            errno = EINVAL;
            return -1;
        }
        if (hex_size < 2 * qcowmap::digest_size(*algorithm) + 1) {
            fail_errno(ERANGE, "qcowmap_hash: the hex buffer is too small");
            return -1;
        }
        qcowmap::HashOptions options;
        options.algorithm = *algorithm;
        options.threads = threads;
        auto digest = qcowmap::hash_image(q->image, options);
        if (!digest) {
            fail(digest.error());
            return -1;
        }
        const std::string text = digest->hex();
        std::memcpy(hex, text.c_str(), text.size() + 1);
        return static_cast<int>(digest->size);
    } catch (...) {
        fail_errno(ENOMEM, "qcowmap_hash");
        return -1;
    }
}

// ---- Writing in place (issue 27) -------------------------------------------------------------

namespace {

/// The writable image behind `q`, or null with errno set (EINVAL: no image; EBADF: opened
/// read-only, as write(2) says of a descriptor opened O_RDONLY).
qcowmap::WritableImage* writable_of(struct qcow2* q, const char* what) {
    if (!q) {
        fail_errno(EINVAL, what);
        return nullptr;
    }
    if (!q->writable) {
        remember(std::string(what) + ": the image was opened read-only (set "
                                     "qcowmap_open_options.writable)");
        errno = EBADF;
        return nullptr;
    }
    return q->writable.get();
}

int status(const qcowmap::Result<void>& result) {
    if (!result) {
        fail(result.error());
        return -1;
    }
    return 0;
}

} // namespace

int qcowmap_create(const char* path, uint64_t size, const char* options) {
    try {
        if (!path) {
            fail_errno(EINVAL, "qcowmap_create: no path");
            return -1;
        }
        qcowmap::CreateOptions create_options;
        if (options) {
            if (auto ok = qcowmap::parse_create_options(options, create_options); !ok)
                return status(ok);
        }
        return status(qcowmap::create(path, size, create_options));
    } catch (...) {
        fail_errno(ENOMEM, "qcowmap_create");
        return -1;
    }
}

int qcowmap_write(struct qcow2* q, const void* buf, size_t len, uint64_t offset) {
    try {
        auto* w = writable_of(q, "qcowmap_write");
        if (!w)
            return -1;
        if (!buf && len > 0) {
            fail_errno(EINVAL, "qcowmap_write: no buffer");
            return -1;
        }
        return status(w->write(offset, {static_cast<const std::byte*>(buf), len}));
    } catch (...) {
        fail_errno(ENOMEM, "qcowmap_write");
        return -1;
    }
}

int qcowmap_write_zeroes(struct qcow2* q, uint64_t offset, uint64_t len, int unmap) {
    try {
        auto* w = writable_of(q, "qcowmap_write_zeroes");
        return w ? status(w->write_zeroes(offset, len, unmap != 0)) : -1;
    } catch (...) {
        fail_errno(ENOMEM, "qcowmap_write_zeroes");
        return -1;
    }
}

int qcowmap_discard(struct qcow2* q, uint64_t offset, uint64_t len) {
    try {
        auto* w = writable_of(q, "qcowmap_discard");
        return w ? status(w->discard(offset, len)) : -1;
    } catch (...) {
        fail_errno(ENOMEM, "qcowmap_discard");
        return -1;
    }
}

int qcowmap_flush(struct qcow2* q) {
    try {
        auto* w = writable_of(q, "qcowmap_flush");
        return w ? status(w->flush()) : -1;
    } catch (...) {
        fail_errno(ENOMEM, "qcowmap_flush");
        return -1;
    }
}

int qcowmap_resize(struct qcow2* q, uint64_t size) {
    try {
        auto* w = writable_of(q, "qcowmap_resize");
        return w ? status(w->resize(size)) : -1;
    } catch (...) {
        fail_errno(ENOMEM, "qcowmap_resize");
        return -1;
    }
}

int qcowmap_close(struct qcow2* q) {
    int result = 0;
    try {
        if (q && q->writable)
            result = status(q->writable->close());
    } catch (...) {
        fail_errno(ENOMEM, "qcowmap_close");
        result = -1;
    }
    const int saved = errno;
    qcow2_close(q);
    errno = saved;
    return result;
}

} // extern "C"

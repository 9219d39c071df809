/* qcowmap — C API.
 *
 * Part one is a drop-in replacement for the small standalone C qcow2 reader (qcow2.c/qcow2.h:
 * qcow2_open, qcow2_close, qcow2_get_size, qcow2_read) with the same signatures and behaviour.
 * Unlike that reader it has no page-size limit on clusters and reads compressed clusters (zlib
 * and zstd), extended L2 entries, backing chains and external data files.
 *
 * Part two (qcowmap_*) is for C callers who want more: open by path with options (internal
 * snapshot, no backing file), the message of the last error, the extent iterator with
 * zero-copy pointers to the data runs, and digests of the disk (qcowmap_hash).
 *
 * Usable from C99 and C++. Link with `pkg-config --libs qcowmap`. No C++ exception crosses
 * these functions. All functions are thread-safe; one `struct qcow2` may be read from any
 * number of threads at once (it is immutable after open).
 */
#ifndef QCOWMAP_QCOW2_H
#define QCOWMAP_QCOW2_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/** An opened image: the file's read-only mapping and its chain. Opaque. */
struct qcow2;

/** Opens the qcow2 (or qcow version 1) image open on `fd`.
 *
 * On success returns a context and takes ownership of `fd` (the caller must not use it any
 * more; qcow2_close() closes it), and leaves `*error_ret` unchanged.
 *
 * On failure returns NULL, closes `fd`, sets errno (see below) and, when `error_ret` is not
 * NULL, stores a one-line message in `*error_ret`. The message must not be freed: it lives in
 * a thread-local buffer that stays valid until the next failing call of this API (any
 * qcow2_* or qcowmap_* function) on the same thread, or the thread's exit. Copy it if you need
 * it longer.
 *
 * errno: EBADF (fd not open), the errno of fstat/readlink, EIO (the file or a backing/data
 * file could not be opened or mapped), EINVAL (not a qcow image, invalid header or tables),
 * ENOTSUP (unsupported version or feature, encryption), ENOMEM, EAGAIN (a writer holds the
 * image: QEMU's image locks, which every open through this API takes as a reader, as
 * qemu-img does, for as long as the image stays open; see OpenOptions::force_share in
 * <qcowmap/options.hpp>).
 *
 * The image is mapped by its path, found through /proc/self/fd/N; relative backing and data
 * file names resolve against that path's directory, as qemu does. When the fd has no usable
 * path (a deleted or anonymous file) the image is mapped through /proc/self/fd/N itself and
 * relative backing file names cannot be found (the error names the path looked for). */
struct qcow2* qcow2_open(int fd, const char** error_ret);

/** Releases `q`: unmaps the image and closes the fd given to qcow2_open(). NULL: no effect. */
void qcow2_close(struct qcow2* q);

/** The image's virtual size in bytes (0 for NULL). */
uint64_t qcow2_get_size(struct qcow2* q);

/** Copies at most `len` bytes of the virtual disk starting at `offset` into `dest`.
 *
 * Returns the bytes copied: `len` unless the image ends first (0 when `offset` is at or past
 * the end). Never a short read while more data is available. Unallocated ranges read as
 * zeros (or from the backing file). On error returns -1 and sets errno (EINVAL: NULL `q` or
 * `dest`; EOVERFLOW: `len` above INT_MAX, which the int result cannot count; EIO: corrupt
 * tables or compressed data met on the way); the content of `dest` is then unspecified and
 * qcowmap_last_error() says what was wrong. */
int qcow2_read(struct qcow2* q, void* dest, size_t len, uint64_t offset);

/* ---- qcowmap extensions ------------------------------------------------------------------ */

/** Options for qcowmap_open(); zero-initialise, then set what you need. */
struct qcowmap_open_options {
    /** Read this internal snapshot (ID first, then name) instead of the active disk, or NULL. */
    const char* snapshot;
    /** Non-zero: ignore the backing file; unallocated ranges read as zeros. */
    int no_backing;
    /** Non-zero: the image is untrusted. A backing or data file name it holds is followed only
     * when relative, inside the image's directory (after `..` and symlinks) and a regular file;
     * otherwise qcowmap_open fails with ENOTSUP and a message saying which name and why. */
    int untrusted;
    /** Non-zero: open the image for writing in place (qcowmap_write() and friends). The file
     * gets QEMU's image locks, so a VM or qemu-io writing it makes this fail (errno EIO, the
     * message says so) and they cannot write it while it is open here. qcow2_read() sees every
     * write; an extent walk flushes first. Release with qcowmap_close() to learn whether the
     * final flush worked (qcow2_close() does the same and forgets errors). */
    int writable;
};

/** Opens the image at `path` (relative backing names resolve against its directory).
 * `options` may be NULL. Returns NULL on failure, with errno and `*error_ret` as qcow2_open()
 * (no fd to close). Release with qcow2_close(). */
struct qcow2* qcowmap_open(const char* path, const struct qcowmap_open_options* options,
                           const char** error_ret);

/** The message of the last failure of any function of this API on the calling thread, or ""
 * when none failed. Same lifetime as the `error_ret` message of qcow2_open(). */
const char* qcowmap_last_error(void);

/** How the bytes of an extent are obtained. */
enum qcowmap_extent_kind {
    QCOWMAP_EXTENT_DATA = 0,      /**< allocated data: `data` points into the mapping */
    QCOWMAP_EXTENT_ZERO = 1,      /**< reads as zeros: `data` is NULL */
    QCOWMAP_EXTENT_COMPRESSED = 2 /**< one compressed cluster (or part of it) */
};

/** One run of the virtual disk `[offset, offset + length)`. */
struct qcowmap_extent {
    uint64_t offset; /**< start in the virtual disk */
    uint64_t length; /**< bytes covered, never 0 */
    int kind;        /**< enum qcowmap_extent_kind */
    int present;     /**< 0 where no layer of the chain allocates the range (reads as zeros) */
    uint32_t depth;  /**< layer that supplied the range: 0 is the image itself */
    /** DATA: the `length` bytes, straight from the mapping (no copy), valid until the iterator
     * is freed. COMPRESSED: the `length` decompressed bytes in a buffer owned by the iterator,
     * valid until the next qcowmap_extents_next() call. ZERO: NULL. */
    const void* data;
    /** COMPRESSED: the compressed stream in the mapping (valid until the iterator is freed)
     * and its length in bytes. Otherwise NULL and 0. */
    const void* compressed;
    size_t compressed_length;
    /** Non-zero when `host_offset` says where the run starts in its host file. */
    int has_host_offset;
    uint64_t host_offset;
};

/** An extent iterator. Opaque. */
struct qcowmap_extents;

/** Starts a walk over `[start, min(end, size))` of `q` (pass UINT64_MAX as `end` for the rest
 * of the disk). The iterator keeps the image mapped: it may outlive qcow2_close(q). Returns
 * NULL with errno EINVAL (NULL `q`) or ENOMEM. */
struct qcowmap_extents* qcowmap_extents_open(struct qcow2* q, uint64_t start, uint64_t end);

/** As qcowmap_extents_open(), for a caller that reads every byte (hashing, copying): the walk
 * produces the bytes ahead of the caller on `threads` worker threads (0: one per core).
 * DATA extents arrive in pieces of at most 1 MiB, their bytes read with pread(2) into buffers
 * or made present in the mapping and read once (whichever costs less on this machine, as the
 * CLI's --io=auto chooses), and their `data` is valid until the next qcowmap_extents_next()
 * call; COMPRESSED pieces are decompressed ahead; pages of the mapping the caller has passed
 * are dropped from the process. A page that cannot be read is an error of the walk (EIO),
 * never a SIGBUS in the caller. */
struct qcowmap_extents* qcowmap_extents_open_ahead(struct qcow2* q, uint64_t start, uint64_t end,
                                                   unsigned threads);

/** Produces the next extent into `*out`. Returns 1 when it did, 0 at the end of the range,
 * -1 on error (errno EIO or EINVAL; qcowmap_extents_error() says what). After an error the
 * iterator stays failed and returns -1 again. */
int qcowmap_extents_next(struct qcowmap_extents* it, struct qcowmap_extent* out);

/** The error that stopped the walk, or NULL while none did. Owned by the iterator. */
const char* qcowmap_extents_error(const struct qcowmap_extents* it);

/** Releases the iterator (NULL: no effect). */
void qcowmap_extents_free(struct qcowmap_extents* it);

/** Room for the longest hex digest qcowmap_hash() writes (64 bytes: 128 digits) and its NUL. */
#define QCOWMAP_HASH_HEX_SIZE 129

/** The digest of the whole virtual disk of `q`, as `qcowmap hash --algo=ALGO` prints it.
 *
 * `algo`: "sha256", "sha512", "blake2b512", "xxh3-128" (the digest of the raw disk, as
 * sha256sum & co. give it for `qemu-img convert -O raw` output), or "blkhash-sha256",
 * "blkhash-sha512", "blkhash-blake2b512" (the blkhash block construction, as the `blksum`
 * command gives it: its cost follows the allocated data, and blocks are hashed on every core).
 * NULL means "sha256". `threads`: worker threads, 0 for one per core.
 *
 * Writes the lowercase hex digest and a NUL into `hex`, which holds `hex_size` bytes
 * (QCOWMAP_HASH_HEX_SIZE always suffices), and returns the digest's size in bytes (32, 64 or
 * 16). On error returns -1 and sets errno: EINVAL (NULL `q` or `hex`, unknown `algo`),
 * ERANGE (`hex` too small), EIO (corrupt tables or compressed data, or the digest library
 * failed), ENOMEM; qcowmap_last_error() says what. Releases nothing: `q` stays open. */
int qcowmap_hash(struct qcow2* q, const char* algo, unsigned threads, char* hex, size_t hex_size);

/* ---- writing in place ---------------------------------------------------------------------
 * Every function returns 0 on success, -1 with errno and qcowmap_last_error() on failure:
 * EBADF (the image was opened read-only), EINVAL (a range past the end of the disk, a bad
 * option), EIO (the file could not be written or its tables are damaged where the request goes),
 * ENOTSUP (an image that cannot be written: qcow version 1, the corrupt or dirty bit, encrypted),
 * ENOMEM. Calls on one `struct qcow2` are serialised internally; any thread may make them. A
 * crash never leaves the image corrupt (`qemu-img check`): writes made before the last
 * successful qcowmap_flush() read back, later ones may be lost, and clusters may leak. */

/** Creates an empty qcow2 image of `size` bytes (rounded up to 512) at `path`, as
 * `qemu-img create -f qcow2 -o OPTIONS` does. `options` is qemu-img's -o string ("cluster_size=
 * 64k,extended_l2=on,compression_type=zstd,refcount_bits=16,lazy_refcounts=on,backing_file=B,
 * backing_fmt=qcow2,data_file=D,data_file_raw=on,compat=1.1"), or NULL. With a backing file and
 * `size` 0 the backing file's size is used. */
int qcowmap_create(const char* path, uint64_t size, const char* options);

/** Writes `len` bytes from `buf` at virtual offset `offset`. */
int qcowmap_write(struct qcow2* q, const void* buf, size_t len, uint64_t offset);

/** Makes `[offset, offset + len)` read as zeros; with `unmap` non-zero whole clusters give
 * their space back. */
int qcowmap_write_zeroes(struct qcow2* q, uint64_t offset, uint64_t len, int unmap);

/** Discards `[offset, offset + len)` as qemu does (whole clusters are freed). */
int qcowmap_discard(struct qcow2* q, uint64_t offset, uint64_t len);

/** Makes every write so far durable (in the crash-safe order). */
int qcowmap_flush(struct qcow2* q);

/** Changes the virtual size (growing; shrinking only an unallocated tail). */
int qcowmap_resize(struct qcow2* q, uint64_t size);

/** Flushes, stores persistent bitmaps, releases the locks and frees `q` (also when it fails, or
 * for a read-only image, where it is qcow2_close()). Returns 0, or -1 when the final flush
 * failed. */
int qcowmap_close(struct qcow2* q);

#ifdef __cplusplus
}
#endif

#endif /* QCOWMAP_QCOW2_H */

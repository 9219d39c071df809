/* The README's C example: the drop-in qcow2_* reader API, the zero-copy extent API and the
 * extent walk that reads ahead.
 *
 *   read_disk IMAGE.qcow2 > disk.raw
 *
 * Writes the whole virtual disk to stdout with qcow2_read() and lists the extents on stderr.
 * Built out of tree against the installed library by the install test:
 *   cc -std=c99 read_disk.c $(pkg-config --cflags --libs qcowmap) */
#define _POSIX_C_SOURCE 200809L
#include <qcowmap/qcow2.h>

#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char** argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s IMAGE.qcow2 > disk.raw\n", argv[0]);
        return 2;
    }
    int status = 1;
    struct qcow2* q = NULL;
    struct qcowmap_extents* it = NULL;
    char* buffer = NULL;

    int fd = open(argv[1], O_RDONLY);
    if (fd == -1) {
        perror(argv[1]);
        goto cleanup;
    }
    const char* error;
    q = qcow2_open(fd, &error); /* takes the fd: qcow2_close() closes it */
    if (!q) {
        fprintf(stderr, "%s: %s\n", argv[1], error);
        goto cleanup;
    }

    /* Zero-copy: data extents point into the image's mapping. */
    uint64_t data_bytes = 0;
    it = qcowmap_extents_open(q, 0, UINT64_MAX);
    struct qcowmap_extent e;
    int rc;
    while (it && (rc = qcowmap_extents_next(it, &e)) == 1) {
        static const char* const kinds[] = {"data", "zero", "compressed"};
        fprintf(stderr, "%12" PRIu64 " +%-12" PRIu64 " %s%s\n", e.offset, e.length, kinds[e.kind],
                e.present ? "" : " (unallocated)");
        if (e.kind != QCOWMAP_EXTENT_ZERO) {
            data_bytes += e.length;
        }
    }
    if (!it || rc < 0) {
        fprintf(stderr, "%s: %s\n", argv[1], it ? qcowmap_extents_error(it) : "out of memory");
        goto cleanup;
    }

    /* Copying reads: any range, whatever backs it. */
    const size_t chunk = 1 << 20;
    buffer = malloc(chunk);
    uint64_t size = qcow2_get_size(q);
    for (uint64_t offset = 0; buffer && offset < size;) {
        int n = qcow2_read(q, buffer, chunk, offset);
        if (n <= 0) {
            fprintf(stderr, "%s: read at %" PRIu64 ": %s\n", argv[1], offset, qcowmap_last_error());
            goto cleanup;
        }
        if (fwrite(buffer, 1, (size_t)n, stdout) != (size_t)n) {
            perror("stdout");
            goto cleanup;
        }
        offset += (uint64_t)n;
    }
    fprintf(stderr, "%" PRIu64 " bytes, %" PRIu64 " in data extents\n", size, data_bytes);

    /* Reading every byte: the walk that produces the bytes ahead on worker threads (0: one per
     * core); data arrives in pieces whose bytes live until the next call. */
    struct qcowmap_extents* ahead = qcowmap_extents_open_ahead(q, 0, UINT64_MAX, 0);
    uint64_t byte_sum = 0;
    while (ahead && (rc = qcowmap_extents_next(ahead, &e)) == 1) {
        const unsigned char* bytes = e.data;
        for (uint64_t i = 0; bytes && i < e.length; ++i)
            byte_sum += bytes[i];
    }
    if (!ahead || rc < 0) {
        fprintf(stderr, "%s: %s\n", argv[1],
                ahead ? qcowmap_extents_error(ahead) : "out of memory");
        qcowmap_extents_free(ahead);
        goto cleanup;
    }
    qcowmap_extents_free(ahead);
    fprintf(stderr, "byte sum of the disk %" PRIu64 "\n", byte_sum);
    status = buffer ? 0 : 1;

cleanup:
    free(buffer);
    qcowmap_extents_free(it);
    qcow2_close(q); /* NULL is fine */
    return status;
}

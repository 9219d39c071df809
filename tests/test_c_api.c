/* Tests of the C API (qcowmap/qcow2.h), compiled as C99. Images are made at run time with
 * qemu-img/qemu-io; the oracle for bytes is `qemu-img convert -O raw`. Exits 0 when every
 * check passed, 1 otherwise (each failed check prints file:line and what it expected). */
#define _GNU_SOURCE
#include <qcowmap/qcow2.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int failures = 0;
static int checks = 0;

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        ++checks;                                                                                  \
        if (!(cond)) {                                                                             \
            ++failures;                                                                            \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);               \
        }                                                                                          \
    } while (0)

static char dir[] = "/tmp/qcowmap-c-api-XXXXXX";

static void sh(const char* format, ...) {
    char command[4096];
    va_list args;
    va_start(args, format);
    vsnprintf(command, sizeof command, format, args);
    va_end(args);
    int rc = system(command);
    if (rc != 0) {
        fprintf(stderr, "command failed (%d): %s\n", rc, command);
        exit(1);
    }
}

static char* path_of(const char* name) {
    static char paths[8][512];
    static int next = 0;
    char* p = paths[next++ % 8];
    snprintf(p, 512, "%s/%s", dir, name);
    return p;
}

/* Reads a whole file into memory; sets *size. */
static unsigned char* slurp(const char* path, size_t* size) {
    FILE* f = fopen(path, "rb");
    if (!f) {
        perror(path);
        exit(1);
    }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char* bytes = malloc(n > 0 ? (size_t)n : 1);
    if (n > 0 && fread(bytes, 1, (size_t)n, f) != (size_t)n) {
        perror(path);
        exit(1);
    }
    fclose(f);
    *size = (size_t)n;
    return bytes;
}

/* qemu-img's view of the image (`extra` like "-l snapshot.name=s1"), as bytes. */
static unsigned char* qemu_raw(const char* image, const char* extra, size_t* size) {
    const char* raw = path_of("oracle.raw");
    sh("qemu-img convert %s -O raw '%s' '%s'", extra, image, raw);
    return slurp(raw, size);
}

static struct qcow2* open_path(const char* path) {
    int fd = open(path, O_RDONLY);
    CHECK(fd >= 0);
    const char* error = "unchanged";
    struct qcow2* q = qcow2_open(fd, &error);
    CHECK(q != NULL);
    CHECK(strcmp(error, "unchanged") == 0); /* success leaves *error_ret alone */
    if (!q) {
        fprintf(stderr, "%s: %s\n", path, error);
        exit(1);
    }
    return q;
}

/* The whole disk through qcow2_read in odd-sized pieces equals qemu-img's bytes. */
static void check_read_matches(struct qcow2* q, const unsigned char* raw, size_t raw_size) {
    CHECK(qcow2_get_size(q) == raw_size);
    unsigned char* buffer = malloc(raw_size);
    size_t step = 12345, done = 0;
    while (done < raw_size) {
        int n = qcow2_read(q, buffer + done, step, done);
        size_t want = raw_size - done < step ? raw_size - done : step;
        CHECK(n == (int)want);
        if (n <= 0) {
            break;
        }
        done += (size_t)n;
    }
    CHECK(done == raw_size && memcmp(buffer, raw, raw_size) == 0);
    free(buffer);
}

/* Walks `it` to its end and checks that it reconstructs `raw`, with DATA extents of at most
 * `max_data` bytes; counts the extents of each kind into `counts`. Frees `it`. */
static void check_walk(struct qcowmap_extents* it, const unsigned char* raw, size_t raw_size,
                       uint64_t max_data, int counts[3]) {
    CHECK(it != NULL);
    struct qcowmap_extent e;
    uint64_t expect = 0;
    int rc, mismatches = 0;
    counts[0] = counts[1] = counts[2] = 0;
    while ((rc = qcowmap_extents_next(it, &e)) == 1) {
        CHECK(e.offset == expect);
        CHECK(e.length > 0 && e.offset + e.length <= raw_size);
        counts[e.kind]++;
        if (e.kind == QCOWMAP_EXTENT_ZERO) {
            CHECK(e.data == NULL);
            for (uint64_t i = 0; i < e.length; ++i) {
                mismatches += raw[e.offset + i] != 0;
            }
        } else {
            CHECK(e.data != NULL);
            mismatches += memcmp(e.data, raw + e.offset, e.length) != 0;
            if (e.kind == QCOWMAP_EXTENT_COMPRESSED) {
                CHECK(e.compressed != NULL && e.compressed_length > 0);
                CHECK(!e.has_host_offset);
            } else {
                CHECK(e.has_host_offset && e.present && e.length <= max_data);
            }
        }
        expect = e.offset + e.length;
    }
    CHECK(rc == 0);
    CHECK(qcowmap_extents_error(it) == NULL);
    CHECK(mismatches == 0);
    CHECK(expect == raw_size);
    qcowmap_extents_free(it);
}

/* The extent API reconstructs the same bytes; returns the number of extents of each kind. */
static void check_extents_match(struct qcow2* q, const unsigned char* raw, size_t raw_size,
                                int counts[3]) {
    check_walk(qcowmap_extents_open(q, 0, UINT64_MAX), raw, raw_size, UINT64_MAX, counts);
}

/* The read-ahead walk (qcowmap_extents_open_ahead) gives the same bytes, data in pieces of at
 * most 1 MiB, with and without extra worker threads. */
static void check_extents_ahead_match(struct qcow2* q, const unsigned char* raw, size_t raw_size) {
    int counts[3];
    for (unsigned threads = 1; threads <= 3; threads += 2) {
        check_walk(qcowmap_extents_open_ahead(q, 0, UINT64_MAX, threads), raw, raw_size, 1048576,
                   counts);
    }
}

static void test_plain(void) {
    const char* image = path_of("plain.qcow2");
    sh("qemu-img create -q -f qcow2 '%s' 1M", image);
    sh("qemu-io -f qcow2 -c 'write -P 0xab 64k 64k' -c 'write -z 256k 64k' -c 'write -P 0x5c "
       "300k 5k' '%s' >/dev/null",
       image);
    size_t raw_size;
    unsigned char* raw = qemu_raw(image, "", &raw_size);
    struct qcow2* q = open_path(image);
    CHECK(qcow2_get_size(q) == 1048576);
    check_read_matches(q, raw, raw_size);

    /* At and past the end: 0 bytes; across it: cut at the end (never an error). */
    unsigned char buffer[8192];
    CHECK(qcow2_read(q, buffer, sizeof buffer, 1048576) == 0);
    CHECK(qcow2_read(q, buffer, sizeof buffer, 1048576 + 5) == 0);
    CHECK(qcow2_read(q, buffer, sizeof buffer, UINT64_MAX) == 0);
    CHECK(qcow2_read(q, buffer, sizeof buffer, 1048576 - 100) == 100);
    CHECK(qcow2_read(q, buffer, 0, 0) == 0);
    CHECK(qcow2_read(q, buffer, 1, 65536) == 1 && buffer[0] == 0xab);
    errno = 0;
    CHECK(qcow2_read(NULL, buffer, 1, 0) == -1 && errno == EINVAL);
    errno = 0;
    CHECK(qcow2_read(q, NULL, 1, 0) == -1 && errno == EINVAL);

    int counts[3];
    check_extents_match(q, raw, raw_size, counts);
    check_extents_ahead_match(q, raw, raw_size);
    CHECK(counts[QCOWMAP_EXTENT_DATA] == 2 && counts[QCOWMAP_EXTENT_COMPRESSED] == 0);

    /* The first extents, exactly: a hole, then 64 KiB of 0xab straight from the mapping. */
    struct qcowmap_extents* it = qcowmap_extents_open(q, 0, 200000);
    struct qcowmap_extent e;
    CHECK(qcowmap_extents_next(it, &e) == 1);
    CHECK(e.offset == 0 && e.length == 65536 && e.kind == QCOWMAP_EXTENT_ZERO && !e.present);
    CHECK(qcowmap_extents_next(it, &e) == 1);
    CHECK(e.offset == 65536 && e.length == 65536 && e.kind == QCOWMAP_EXTENT_DATA && e.present);
    CHECK(e.depth == 0 && ((const unsigned char*)e.data)[65535] == 0xab);
    CHECK(qcowmap_extents_next(it, &e) == 1);
    CHECK(e.offset == 131072 && e.offset + e.length == 200000 && !e.present); /* cut at end */
    CHECK(qcowmap_extents_next(it, &e) == 0);
    CHECK(qcowmap_extents_next(it, &e) == 0);
    qcow2_close(q); /* the iterator keeps the mapping: it may outlive the image */
    qcowmap_extents_free(it);
    free(raw);
}

static void test_big_read_and_holes(void) {
    const char* image = path_of("big.qcow2");
    sh("qemu-img create -q -f qcow2 '%s' 3G", image);
    struct qcow2* q = open_path(image);
    CHECK(qcow2_get_size(q) == 3ull << 30);
    unsigned char byte = 1;
    errno = 0;
    /* More than an int can count: refused rather than a wrapped count. */
    CHECK(qcow2_read(q, &byte, (size_t)INT_MAX + 1, 0) == -1 && errno == EOVERFLOW);
    CHECK(strstr(qcowmap_last_error(), "INT_MAX") != NULL);
    /* ... unless the end of the disk cuts it first. */
    unsigned char* tail = malloc(4096);
    CHECK(qcow2_read(q, tail, (size_t)INT_MAX + 1, (3ull << 30) - 4096) == 4096);
    CHECK(tail[0] == 0 && tail[4095] == 0);
    free(tail);
    qcow2_close(q);
}

static void test_compressed(void) {
    const char* plain = path_of("source.qcow2");
    const char* image = path_of("compressed.qcow2");
    sh("qemu-img create -q -f qcow2 '%s' 2M", plain);
    sh("qemu-io -f qcow2 -c 'write -P 0x61 0 768k' -c 'write -P 0x3 1M 100k' '%s' >/dev/null",
       plain);
    sh("qemu-img convert -c -O qcow2 -o compression_type=zstd '%s' '%s'", plain, image);
    size_t raw_size;
    unsigned char* raw = qemu_raw(image, "", &raw_size);
    struct qcow2* q = open_path(image);
    check_read_matches(q, raw, raw_size);
    int counts[3];
    check_extents_match(q, raw, raw_size, counts);
    check_extents_ahead_match(q, raw, raw_size);
    CHECK(counts[QCOWMAP_EXTENT_COMPRESSED] > 0);
    qcow2_close(q);
    free(raw);
}

static void test_backing_chain_by_fd(void) {
    const char* base = path_of("base.qcow2");
    const char* overlay = path_of("overlay.qcow2");
    sh("qemu-img create -q -f qcow2 '%s' 1M", base);
    sh("qemu-io -f qcow2 -c 'write -P 0x11 0 512k' '%s' >/dev/null", base);
    /* A relative backing name: found next to the image, whatever the current directory. */
    sh("cd '%s' && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2", dir);
    sh("qemu-io -f qcow2 -c 'write -P 0x22 64k 64k' '%s' >/dev/null", overlay);
    size_t raw_size;
    unsigned char* raw = qemu_raw(overlay, "", &raw_size);
    CHECK(chdir("/") == 0);
    struct qcow2* q = open_path(overlay);
    check_read_matches(q, raw, raw_size);
    int counts[3];
    check_extents_match(q, raw, raw_size, counts);
    check_extents_ahead_match(q, raw, raw_size);
    qcow2_close(q);

    /* qcowmap_open with no_backing: only the overlay's own cluster. */
    struct qcowmap_open_options options = {NULL, 1, 0, 0};
    q = qcowmap_open(overlay, &options, NULL);
    CHECK(q != NULL);
    unsigned char buffer[2];
    CHECK(qcow2_read(q, buffer, 1, 0) == 1 && buffer[0] == 0);
    CHECK(qcow2_read(q, buffer, 1, 65536) == 1 && buffer[0] == 0x22);
    qcow2_close(q);

    /* A missing backing file: the error names what was looked for. */
    sh("mv '%s' '%s.moved'", base, base);
    int fd = open(overlay, O_RDONLY);
    const char* error = NULL;
    errno = 0;
    CHECK(qcow2_open(fd, &error) == NULL);
    CHECK(errno == EIO);
    CHECK(error != NULL && strstr(error, "base.qcow2") != NULL);
    CHECK(fcntl(fd, F_GETFD) == -1 && errno == EBADF); /* closed on failure */
    sh("mv '%s.moved' '%s'", base, base);
    free(raw);
}

static void test_snapshot(void) {
    const char* image = path_of("snap.qcow2");
    sh("qemu-img create -q -f qcow2 '%s' 1M", image);
    sh("qemu-io -f qcow2 -c 'write -P 0x44 0 128k' '%s' >/dev/null", image);
    sh("qemu-img snapshot -c before '%s'", image);
    sh("qemu-io -f qcow2 -c 'write -P 0x55 0 64k' '%s' >/dev/null", image);
    size_t raw_size;
    unsigned char* raw = qemu_raw(image, "-l snapshot.name=before", &raw_size);
    struct qcowmap_open_options options = {"before", 0, 0, 0};
    const char* error = "unchanged";
    struct qcow2* q = qcowmap_open(image, &options, &error);
    CHECK(q != NULL && strcmp(error, "unchanged") == 0);
    check_read_matches(q, raw, raw_size);
    qcow2_close(q);

    options.snapshot = "no-such-snapshot";
    errno = 0;
    CHECK(qcowmap_open(image, &options, &error) == NULL);
    CHECK(errno == EINVAL && strstr(error, "no-such-snapshot") != NULL);
    free(raw);
}

static void test_open_errors(void) {
    const char* text = path_of("not-an-image.txt");
    sh("printf 'hello, this is not a disk image\\n' > '%s'", text);
    int fd = open(text, O_RDONLY);
    const char* error = NULL;
    errno = 0;
    CHECK(qcow2_open(fd, &error) == NULL);
    CHECK(errno == EINVAL);
    CHECK(error != NULL && error[0] != '\0');
    CHECK(strcmp(error, qcowmap_last_error()) == 0);
    CHECK(fcntl(fd, F_GETFD) == -1 && errno == EBADF);
    printf("not an image: %s\n", error);

    /* error_ret is optional. */
    fd = open(text, O_RDONLY);
    errno = 0;
    CHECK(qcow2_open(fd, NULL) == NULL && errno == EINVAL);

    errno = 0;
    error = NULL;
    CHECK(qcow2_open(-1, &error) == NULL && errno == EBADF && error != NULL);
    /* An fd that is not open. */
    int spare = open(text, O_RDONLY);
    close(spare);
    errno = 0;
    CHECK(qcow2_open(spare, &error) == NULL && errno == EBADF);

    /* An encrypted image is refused with ENOTSUP. */
    const char* luks = path_of("luks.qcow2");
    /* qemu-img sometimes fails with "Unable to get accurate CPU usage" on a busy machine. */
    sh("for i in 1 2 3 4 5; do qemu-img create -q -f qcow2 --object secret,id=s,data=pass -o "
       "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=200 '%s' 1M && exit 0; "
       "done; exit 1",
       luks);
    fd = open(luks, O_RDONLY);
    errno = 0;
    CHECK(qcow2_open(fd, &error) == NULL && errno == ENOTSUP);
    CHECK(strstr(error, "encrypt") != NULL);

    qcow2_close(NULL); /* no effect */
    CHECK(qcow2_get_size(NULL) == 0);
    CHECK(qcowmap_extents_open(NULL, 0, 1) == NULL);
    qcowmap_extents_free(NULL);
}

static void put_be64(unsigned char* p, uint64_t v) {
    for (int i = 7; i >= 0; --i, v >>= 8) {
        p[i] = (unsigned char)v;
    }
}

static uint64_t get_be64(const unsigned char* p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; ++i) {
        v = v << 8 | p[i];
    }
    return v;
}

/* An L2 entry pointing far past the end of the file: open succeeds (L2 tables are read
 * lazily), reads and the extent walk of that cluster fail with EIO and a message. */
static void test_corrupt_l2(void) {
    const char* image = path_of("corrupt.qcow2");
    sh("qemu-img create -q -f qcow2 '%s' 1M", image);
    sh("qemu-io -f qcow2 -c 'write -P 0x77 0 128k' '%s' >/dev/null", image);
    int fd = open(image, O_RDWR);
    unsigned char header[48], entry[8];
    CHECK(pread(fd, header, sizeof header, 0) == (ssize_t)sizeof header);
    uint64_t l1_offset = get_be64(header + 40);
    CHECK(pread(fd, entry, 8, (off_t)l1_offset) == 8);
    uint64_t l2_offset = get_be64(entry) & UINT64_C(0x00fffffffffffe00);
    put_be64(entry, UINT64_C(0x8000000000000000) | UINT64_C(0x40000000000)); /* 4 TiB */
    CHECK(pwrite(fd, entry, 8, (off_t)(l2_offset + 8)) == 8);                /* cluster 1 */
    close(fd);

    struct qcow2* q = open_path(image);
    unsigned char buffer[4096];
    CHECK(qcow2_read(q, buffer, sizeof buffer, 0) == (int)sizeof buffer && buffer[0] == 0x77);
    errno = 0;
    CHECK(qcow2_read(q, buffer, sizeof buffer, 65536) == -1 && errno == EIO);
    CHECK(strstr(qcowmap_last_error(), "0x40000000000") != NULL);
    printf("corrupt read: %s\n", qcowmap_last_error());

    struct qcowmap_extents* it = qcowmap_extents_open(q, 0, UINT64_MAX);
    struct qcowmap_extent e;
    CHECK(qcowmap_extents_next(it, &e) == 1 && e.offset == 0 && e.length == 65536);
    CHECK(qcowmap_extents_error(it) == NULL);
    errno = 0;
    CHECK(qcowmap_extents_next(it, &e) == -1 && errno == EIO);
    CHECK(qcowmap_extents_error(it) != NULL &&
          strstr(qcowmap_extents_error(it), "0x40000000000") != NULL);
    CHECK(qcowmap_extents_next(it, &e) == -1); /* stays failed */
    qcowmap_extents_free(it);
    qcow2_close(q);
}

/* qcowmap_hash: sha256 against sha256sum, blkhash-sha256 against the construction computed by
 * Python's hashlib, both over qemu-img's raw output; errors. */
static void test_hash(void) {
    const char* image = path_of("hash.qcow2");
    const char* raw = path_of("hash.raw");
    const char* expected_path = path_of("hash.expected");
    sh("qemu-img create -q -f qcow2 -o cluster_size=4k '%s' 1000448", image);
    sh("qemu-io -f qcow2 -c 'write -P 0x61 0 70k' -c 'write -z 70k 8k' -c 'write -P 0x62 900k 4k' "
       "'%s' >/dev/null",
       image);
    sh("qemu-img convert -O raw '%s' '%s'", image, raw);
    sh("python3 -c \"import hashlib, struct, sys; d = open(sys.argv[1], 'rb').read(); "
       "o = hashlib.sha256(); "
       "[o.update(hashlib.sha256(d[i:i + 65536]).digest()) for i in range(0, len(d), 65536)]; "
       "o.update(struct.pack('<Q', len(d))); print(o.hexdigest())\" '%s' > '%s' && "
       "sha256sum '%s' | cut -c1-64 >> '%s'",
       raw, expected_path, raw, expected_path);
    size_t size;
    unsigned char* expected = slurp(expected_path, &size);
    CHECK(size == 130);
    struct qcow2* q = open_path(image);
    char hex[QCOWMAP_HASH_HEX_SIZE];
    CHECK(qcowmap_hash(q, "blkhash-sha256", 0, hex, sizeof hex) == 32);
    CHECK(strncmp(hex, (const char*)expected, 64) == 0 && strlen(hex) == 64);
    CHECK(qcowmap_hash(q, "blkhash-sha256", 1, hex, sizeof hex) == 32);
    CHECK(strncmp(hex, (const char*)expected, 64) == 0);
    CHECK(qcowmap_hash(q, NULL, 0, hex, sizeof hex) == 32); /* sha256 */
    CHECK(strncmp(hex, (const char*)expected + 65, 64) == 0);
    CHECK(qcowmap_hash(q, "blkhash-sha512", 0, hex, sizeof hex) == 64 && strlen(hex) == 128);
    errno = 0;
    CHECK(qcowmap_hash(q, "md5", 0, hex, sizeof hex) == -1 && errno == EINVAL);
    CHECK(strstr(qcowmap_last_error(), "md5") != NULL);
    errno = 0;
    CHECK(qcowmap_hash(q, "sha256", 0, hex, 64) == -1 && errno == ERANGE);
    errno = 0;
    CHECK(qcowmap_hash(NULL, "sha256", 0, hex, sizeof hex) == -1 && errno == EINVAL);
    qcow2_close(q);
    free(expected);
}

/* Writing in place: create, open writable, write/zero/discard/flush, qemu-io reads it back;
 * a read-only handle refuses writes with EBADF. */
static void test_write_in_place(void) {
    const char* image = path_of("w.qcow2");
    CHECK(qcowmap_create(image, 4 << 20, "cluster_size=4k,extended_l2=off") == 0);
    CHECK(qcowmap_create(path_of("bad.qcow2"), 1 << 20, "cluster_size=3k") == -1 &&
          errno == EINVAL);
    struct qcowmap_open_options options;
    memset(&options, 0, sizeof options);
    options.writable = 1;
    const char* error = NULL;
    struct qcow2* q = qcowmap_open(image, &options, &error);
    CHECK(q != NULL);
    if (!q) {
        fprintf(stderr, "%s\n", error);
        return;
    }
    unsigned char data[10000];
    memset(data, 0xab, sizeof data);
    CHECK(qcowmap_write(q, data, sizeof data, 5000) == 0);
    CHECK(qcowmap_write_zeroes(q, 8192, 4096, 1) == 0);
    CHECK(qcowmap_discard(q, 1 << 20, 1 << 20) == 0);
    CHECK(qcowmap_write(q, data, 1, (4 << 20) - 0) == -1 && errno == EINVAL);
    unsigned char back[10000];
    CHECK(qcow2_read(q, back, sizeof back, 5000) == (int)sizeof back);
    CHECK(back[0] == 0xab && back[8192 - 5000] == 0 && back[12288 - 5000] == 0xab);
    CHECK(qcowmap_flush(q) == 0);
    /* A walk sees the writes (the image is flushed and mapped again for it). */
    struct qcowmap_extents* it = qcowmap_extents_open(q, 0, UINT64_MAX);
    CHECK(it != NULL);
    struct qcowmap_extent e;
    uint64_t data_bytes = 0;
    while (it && qcowmap_extents_next(it, &e) == 1) {
        if (e.kind == QCOWMAP_EXTENT_DATA) {
            data_bytes += e.length;
            /* cluster 1 holds the write from 5000 on; cluster 2 was zeroed */
            if (e.offset == 4096)
                CHECK(((const unsigned char*)e.data)[5000 - 4096] == 0xab);
        }
    }
    qcowmap_extents_free(it);
    CHECK(data_bytes == 2 * 4096);
    CHECK(qcowmap_resize(q, 8 << 20) == 0);
    CHECK(qcow2_get_size(q) == 8u << 20);
    CHECK(qcowmap_close(q) == 0);
    sh("qemu-img check -q '%s' && qemu-io -c 'read -P 0xab 5000 3192' -c 'read -P 0 8192 4096' "
       "-c 'read -P 0xab 12288 2712' '%s' >/dev/null",
       image, image);
    struct qcow2* ro = open_path(image);
    CHECK(qcowmap_write(ro, data, 1, 0) == -1 && errno == EBADF);
    CHECK(strstr(qcowmap_last_error(), "read-only") != NULL);
    qcow2_close(ro);
}

int main(void) {
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    test_plain();
    test_big_read_and_holes();
    test_compressed();
    test_backing_chain_by_fd();
    test_snapshot();
    test_open_errors();
    test_corrupt_l2();
    test_hash();
    test_write_in_place();
    sh("rm -rf '%s'", dir);
    printf("test_c_api: %d checks, %d failed\n", checks, failures);
    return failures ? 1 : 0;
}

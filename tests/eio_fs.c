// eio_fs: a read-only FUSE pass-through of one directory whose reads fail with EIO over chosen
// ranges, as a disk with a bad sector or a network file system does. For the fault tests
// (tests/test_faults.cpp, tests/python/test_faults.py): an image on it is read through a
// mapping, and a page inside a bad range raises SIGBUS in whoever touches it.
//
//   eio_fs SOURCE_DIR MOUNTPOINT [fuse options]
//
// Bad ranges come from SOURCE_DIR/.eio, read at every read request (so a test changes them
// while mounted): lines "NAME OFFSET LENGTH"; a read of NAME overlapping [OFFSET,
// OFFSET + LENGTH) fails with EIO as a whole. The kernel keeps no page cache across opens
// (keep_cache off), and attributes are not cached, so what a test sets is what it gets.
#define FUSE_USE_VERSION 31
#include <fuse.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int g_source = -1; // the source directory, open

/// The path inside the source directory: "/a.qcow2" -> "a.qcow2", "/" -> ".".
static const char* relative(const char* path) {
    while (*path == '/')
        ++path;
    return *path ? path : ".";
}

static int bad_range(const char* name, uint64_t offset, uint64_t length) {
    int fd = openat(g_source, ".eio", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    char text[4096];
    ssize_t n = read(fd, text, sizeof text - 1);
    close(fd);
    if (n <= 0)
        return 0;
    text[n] = '\0';
    int bad = 0;
    for (char* line = strtok(text, "\n"); line && !bad; line = strtok(NULL, "\n")) {
        char file[256];
        uint64_t from = 0, count = 0;
        if (sscanf(line, "%255s %" SCNu64 " %" SCNu64, file, &from, &count) == 3 &&
            strcmp(file, name) == 0 && offset < from + count && from < offset + length) {
            bad = 1;
        }
    }
    return bad;
}

static void* on_init(struct fuse_conn_info* conn, struct fuse_config* config) {
    (void)conn;
    config->kernel_cache = 0;
    config->attr_timeout = 0;
    config->entry_timeout = 0;
    config->negative_timeout = 0;
    config->use_ino = 1;
    return NULL;
}

static int on_getattr(const char* path, struct stat* st, struct fuse_file_info* fi) {
    (void)fi;
    if (fstatat(g_source, relative(path), st, AT_SYMLINK_NOFOLLOW) != 0)
        return -errno;
    return 0;
}

static int on_readdir(const char* path, void* buffer, fuse_fill_dir_t fill, off_t offset,
                      struct fuse_file_info* fi, enum fuse_readdir_flags flags) {
    (void)offset;
    (void)fi;
    (void)flags;
    int fd = openat(g_source, relative(path), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    DIR* dir = fdopendir(fd);
    if (!dir) {
        close(fd);
        return -errno;
    }
    for (struct dirent* entry; (entry = readdir(dir));)
        fill(buffer, entry->d_name, NULL, 0, 0);
    closedir(dir);
    return 0;
}

static int on_open(const char* path, struct fuse_file_info* fi) {
    if ((fi->flags & O_ACCMODE) != O_RDONLY)
        return -EROFS;
    int fd = openat(g_source, relative(path), O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    fi->fh = (uint64_t)fd;
    fi->keep_cache = 0;
    return 0;
}

static int on_read(const char* path, char* buffer, size_t size, off_t offset,
                   struct fuse_file_info* fi) {
    if (bad_range(relative(path), (uint64_t)offset, size))
        return -EIO;
    ssize_t n = pread((int)fi->fh, buffer, size, offset);
    return n < 0 ? -errno : (int)n;
}

static int on_release(const char* path, struct fuse_file_info* fi) {
    (void)path;
    close((int)fi->fh);
    return 0;
}

int main(int argc, char** argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: eio_fs SOURCE_DIR MOUNTPOINT [fuse options]\n");
        return 2;
    }
    g_source = open(argv[1], O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (g_source < 0) {
        perror(argv[1]);
        return 1;
    }
    static const struct fuse_operations ops = {
        .getattr = on_getattr,
        .open = on_open,
        .read = on_read,
        .release = on_release,
        .readdir = on_readdir,
        .init = on_init,
    };
    // fuse_main's arguments: the program, the mount point and the caller's options; the
    // source directory is ours.
    char** fuse_argv = calloc((size_t)argc, sizeof *fuse_argv);
    int fuse_argc = 0;
    fuse_argv[fuse_argc++] = argv[0];
    for (int i = 2; i < argc; ++i)
        fuse_argv[fuse_argc++] = argv[i];
    int status = fuse_main(fuse_argc, fuse_argv, &ops, NULL);
    free(fuse_argv);
    return status;
}

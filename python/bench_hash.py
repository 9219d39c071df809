#!/usr/bin/env python3
"""Times hashing a disk in Python from the extents' memoryviews against `img.hash()`, `qcowmap hash` and pyqcow.

    PYTHONPATH=build/python /usr/bin/python3 python/bench_hash.py [--runs N] [--cache as-is|reread]
        [--io auto|mmap|read] QCOWMAP_BIN IMAGE

Contenders (issue 30): the plain loop `for e in img.extents(): h.update(e.data)` (read ahead on
the other cores), `img.hash()` in Python, `qcowmap hash` as a process, and libqcow's pyqcow
(Debian python3-libqcow, when /usr/bin/python3 can import it), which copies every byte
(`read_buffer` of 1 MiB + hashlib). The in-process times (open to digest) are compared with
`img.hash()`'s.

Each run is a fresh process per contender, each contender going first in turn. Prints the
median wall times (whole processes; range in brackets), CPU times, and the open-to-digest time
inside the Python processes.

--cache reread first drops the image from the page cache (posix_fadvise DONTNEED) and reads it
back with plain reads, as a file read from disk is cached; `as-is` leaves the cache as it is
(a file just written by qemu-io is cached in small folios, which makes every first touch of a
mapping cost one page fault per 4 KiB on some VMs: see README "Python").
"""

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

CHILD = r"""
import hashlib, sys, time
import qcowmap
t = time.perf_counter()
img = qcowmap.open(sys.argv[1])
h = hashlib.sha256()
zeros = memoryview(bytes(1 << 20))
for e in img.extents():
    d = e.data
    if d is None:
        for at in range(0, e.length, len(zeros)):
            h.update(zeros[: min(len(zeros), e.length - at)])
    else:
        h.update(d)
seconds = time.perf_counter() - t
# How much of the image's mapping the kernel mapped with 2 MiB entries (page cache folios of
# PMD size): each such entry costs one fault where 4 KiB pages cost 512.
import os
pmd = rss = 0
target = os.path.realpath(sys.argv[1])
lines = open("/proc/self/smaps").read().splitlines()
for i, line in enumerate(lines):
    if line.endswith(" " + target):
        for field in lines[i + 1 : i + 30]:
            if field.startswith("Rss:"):
                rss += int(field.split()[1])
            elif field.startswith("FilePmdMapped:"):
                pmd += int(field.split()[1])
                break
print(h.hexdigest(), seconds, pmd / rss if rss else 0.0)
"""


def reread(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        while os.read(fd, 1 << 20):
            pass
    finally:
        os.close(fd)


def timed(args):
    """(wall seconds, CPU seconds (user + system), stdout) of a child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu, out


PYQCOW_CHILD = r"""
import hashlib, sys, time
import pyqcow
t = time.perf_counter()
f = pyqcow.file()
f.open(sys.argv[1])
h = hashlib.sha256()
size = f.get_media_size()
at = 0
while at < size:
    chunk = f.read_buffer(min(1 << 20, size - at))
    h.update(chunk)
    at += len(chunk)
f.close()
print(h.hexdigest(), time.perf_counter() - t, 0.0)
"""

IMG_HASH_CHILD = r"""
import sys, time
import qcowmap
t = time.perf_counter()
with qcowmap.open(sys.argv[1]) as img:
    digest = img.hash()
print(digest, time.perf_counter() - t, 0.0)
"""


def have_pyqcow():
    try:
        import pyqcow  # noqa: F401 (Debian: python3-libqcow, for /usr/bin/python3)
    except ImportError:
        return False
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cache", choices=["as-is", "reread"], default="as-is")
    parser.add_argument("--io", choices=["auto", "mmap", "read", "none"], default="auto",
                        help="the extents' io= (default auto; none: prefetch=False)")
    parser.add_argument("qcowmap")
    parser.add_argument("image")
    args = parser.parse_args()
    if args.cache == "reread":
        reread(args.image)
    # --io none: prefetch=False, the loop as it was before the read-ahead (issue 30's 1.36 s).
    ahead = "prefetch=False" if args.io == "none" else f"io={args.io!r}"
    child = CHILD.replace("img.extents()", f"img.extents({ahead})")
    contenders = {
        "qcowmap hash (CLI process)": lambda: [args.qcowmap, "hash", args.image],
        "python img.hash()": lambda: [sys.executable, "-c", IMG_HASH_CHILD, args.image],
        f"python extents({ahead}) + hashlib": lambda: [sys.executable, "-c", child, args.image],
    }
    if have_pyqcow():
        contenders["pyqcow read_buffer(1 MiB) + hashlib"] = lambda: [
            sys.executable, "-c", PYQCOW_CHILD, args.image]
    names = list(contenders)
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    inner = {n: [] for n in names}
    pmd_share = []
    digests = set()
    for run in range(args.runs):
        # Each contender goes first in turn: a slow neighbour or a cold cache hits all alike.
        order = names[run % len(names):] + names[: run % len(names)]
        for name in order:
            seconds, used, out = timed(contenders[name]())
            wall[name].append(seconds)
            cpu[name].append(used)
            fields = out.split()
            digests.add(fields[0])
            if len(fields) == 3:
                inner[name].append(float(fields[1]))
                if name.startswith("python extents"):
                    pmd_share.append(float(fields[2]))
    if len(digests) != 1:
        sys.exit(f"digests differ: {digests}")
    print(f"image {args.image} (cache {args.cache}), {args.runs} runs each, sha256 {digests.pop()[:16]}...")
    reference = statistics.median(inner["python img.hash()"])
    for name in names:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        line = f"{name:40s} {w:7.3f} s wall [{min(wall[name]):.3f}-{max(wall[name]):.3f}]  {c:7.3f} s CPU"
        if inner[name]:
            i = statistics.median(inner[name])
            line += f"   in-process {i:6.3f} s = {i / reference:.2f}x img.hash()"
        print(line)
    if pmd_share:
        print(f"mapping entries of 2 MiB: {statistics.median(pmd_share):.0%} of the image's resident pages")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

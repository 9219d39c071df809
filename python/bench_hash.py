#!/usr/bin/env python3
"""Times hashing a disk in Python from the extents' memoryviews against `qcowmap hash`.

    PYTHONPATH=build/python /usr/bin/python3 python/bench_hash.py [--runs N] [--cache as-is|reread]
        QCOWMAP_BIN IMAGE

Each run is a fresh process, alternating which goes first: `qcowmap hash IMAGE` (sha256, its
defaults: data read with pread ahead of the hash on a second thread), and a Python process that
opens the image and feeds hashlib.sha256 every data extent's memoryview (straight from the
mapping) and zero runs from one buffer of zeros. Prints the median wall times (whole processes,
and the Python side's open-to-digest time) and the ratio.

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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cache", choices=["as-is", "reread"], default="as-is")
    parser.add_argument("qcowmap")
    parser.add_argument("image")
    args = parser.parse_args()
    if args.cache == "reread":
        reread(args.image)
    cli, py_process, py_inner, cli_cpu, py_cpu, pmd_share = [], [], [], [], [], []
    digests = set()
    for run in range(args.runs):
        order = ["cli", "py"] if run % 2 == 0 else ["py", "cli"]
        for which in order:
            if which == "cli":
                seconds, cpu, out = timed([args.qcowmap, "hash", args.image])
                cli.append(seconds)
                cli_cpu.append(cpu)
                digests.add(out.split()[0])
            else:
                seconds, cpu, out = timed([sys.executable, "-c", CHILD, args.image])
                digest, inner, pmd = out.split()
                pmd_share.append(float(pmd))
                py_process.append(seconds)
                py_cpu.append(cpu)
                py_inner.append(float(inner))
                digests.add(digest)
    if len(digests) != 1:
        sys.exit(f"digests differ: {digests}")
    c, p, i = statistics.median(cli), statistics.median(py_process), statistics.median(py_inner)
    print(f"image {args.image} (cache {args.cache}), {args.runs} runs each, sha256 {digests.pop()[:16]}...")
    cc, pc = statistics.median(cli_cpu), statistics.median(py_cpu)
    print(f"qcowmap hash (process)                 {c:7.3f} s wall  {cc:7.3f} s CPU")
    print(f"python extents' memoryviews (process)  {p:7.3f} s wall  {pc:7.3f} s CPU   ratio {p / c:.2f} wall, {pc / cc:.2f} CPU")
    print(f"python extents' memoryviews (in-proc)  {i:7.3f} s wall            ratio {i / c:.2f}")
    print(f"mapping entries of 2 MiB: {statistics.median(pmd_share):.0%} of the image's resident pages")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

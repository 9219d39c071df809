"""Several threads using one Image at once (reads, extent walks, hashes, memoryviews), and the
GIL released during long operations so that other Python threads run meanwhile."""

import hashlib
import random
import threading
import time

import pytest

import qcowmap
from conftest import KiB, MiB, make_image, run, sha256


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """16 MiB with every kind of extent: data (patterned per MiB), zero clusters, holes and
    compressed clusters, 16 KiB clusters with subclusters."""
    d = tmp_path_factory.mktemp("threads")
    path = d / "t.qcow2"
    io = [f"write -P {0x10 + i:#x} {i * MiB} {MiB - 4 * KiB}" for i in range(0, 16, 2)]
    io += ["write -z 2M 1M", "write -c -P 0x7e 5M 256k", "discard 8M 100k", "write -P 0x3c 9M 17k"]
    make_image(path, "cluster_size=16k,extended_l2=on", "16M", io)
    raw = d / "t.raw"
    run(["qemu-img", "convert", "-O", "raw", str(path), str(raw)])
    return path, raw.read_bytes()


def run_threads(count, target):
    errors = []

    def body(index):
        try:
            target(index)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append((index, e))

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_threads_read_one_image_at_once(image):
    path, raw = image
    img = qcowmap.open(path)
    done = [0] * 8

    def reader(index):
        rng = random.Random(index)
        for _ in range(150):
            offset = rng.randrange(len(raw))
            length = rng.choice([1, 513, 4096, 70000, 1 << 20])
            if rng.random() < 0.5:
                assert img.read(offset, length) == raw[offset : offset + length]
            else:
                buf = bytearray(length)
                n = img.readinto(offset, buf)
                assert buf[:n] == raw[offset : offset + n]
            done[index] += 1

    run_threads(8, reader)
    assert done == [150] * 8


def test_threads_walk_extents_and_hash_at_once(image):
    path, raw = image
    img = qcowmap.open(path)
    digests = {}

    def walker(index):
        if index % 3 == 0:
            digests[index] = img.hash()
            return
        if index % 3 == 1:
            with img.open_raw() as f:
                digests[index] = hashlib.file_digest(f, "sha256").hexdigest()
            return
        h = hashlib.sha256()
        zeros = memoryview(bytes(MiB))
        for e in img.extents():
            if e.data is None:
                for at in range(0, e.length, MiB):
                    h.update(zeros[: min(MiB, e.length - at)])
            else:
                h.update(e.data)
        digests[index] = h.hexdigest()

    run_threads(9, walker)
    assert set(digests.values()) == {sha256(raw)}
    assert len(digests) == 9


def test_one_extent_iterator_shared_by_threads(image):
    # An iterator is one walk: threads taking from it together get each extent exactly once
    # (or are told the walk is busy), never a torn extent.
    path, raw = image
    img = qcowmap.open(path)
    it = img.extents()
    taken = []
    lock = threading.Lock()

    def taker(index):
        while True:
            try:
                e = next(it)
            except StopIteration:
                return
            except ValueError as busy:
                assert "already executing" in str(busy)
                continue
            with lock:
                taken.append((e.offset, e.length))

    run_threads(4, taker)
    taken.sort()
    position = 0
    for offset, length in taken:
        assert offset == position
        position += length
    assert position == len(raw)


def test_one_raw_disk_read_by_threads_at_once(image):
    # A RawDisk's reads that follow each other stream through one read-ahead walk; threads
    # reading the same RawDisk together (each with its own positions: pread-style through the
    # reader) get the right bytes, the walk staying one thread's.
    path, raw = image
    img = qcowmap.open(path)
    disk = img.open_raw()
    reader = disk._reader
    errors = []

    def reads(index):
        chunk = 64 * 1024 + index * 4096
        for start in range(index * 4096, len(raw), chunk * 3):
            for at in (start, start + chunk):  # the second follows the first
                got = reader.read(at, chunk)
                if got != raw[at : at + chunk]:
                    errors.append((index, at))

    run_threads(6, reads)
    assert errors == []
    disk.close()
    img.close()


def test_memoryviews_shared_across_threads_after_close(image):
    path, raw = image
    img = qcowmap.open(path)
    views = [(e.offset, e.data) for e in img.extents() if e.kind == "data"]
    img.close()

    def check(index):
        for offset, view in views[index::4]:
            assert hashlib.sha256(view).digest() == hashlib.sha256(raw[offset : offset + len(view)]).digest()

    run_threads(4, check)


def progress_during(call):
    """Runs `call` on a thread while this thread counts loop iterations; returns how many ran
    in the middle half of the call. With the GIL held throughout the call there are none."""
    state = {}

    def worker():
        state["start"] = time.monotonic()
        call()
        state["end"] = time.monotonic()

    stamps = []
    t = threading.Thread(target=worker)
    t.start()
    while t.is_alive():
        stamps.append(time.monotonic())
    t.join()
    start, end = state["start"], state["end"]
    quarter = (end - start) / 4
    inside = [s for s in stamps if start <= s <= end]
    gaps = [b - a for a, b in zip(inside, inside[1:])]
    print(f"{len(stamps)} iterations, {len(inside)} during the call of {end - start:.3f} s, "
          f"longest pause {max(gaps, default=0):.3f} s, first {inside[0] - start if inside else -1:.3f} "
          f"last {inside[-1] - start if inside else -1:.3f}")
    return sum(1 for s in stamps if start + quarter <= s <= end - quarter), end - start


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    d = tmp_path_factory.mktemp("big")
    path = d / "big.qcow2"
    make_image(path, "", "256M", [f"write -P {i + 1:#x} {i * 16 * MiB} 16M" for i in range(16)])
    return path


@pytest.mark.parametrize("operation", ["hash", "read", "readinto", "manifest"])
def test_long_operations_release_the_gil(big, operation):
    img = qcowmap.open(big)
    img.hash()  # warm the page cache
    buffer = bytearray(img.size)
    calls = {
        "hash": lambda: img.hash(threads=1),
        "read": lambda: img.read(0, img.size),
        "readinto": lambda: img.readinto(0, buffer),
        "manifest": lambda: img.hash(block_size=1 << 20, threads=1),
    }
    for _ in range(3):  # a busy machine may deschedule this thread for a while
        iterations, seconds = progress_during(calls[operation])
        if iterations > 0:
            break
    assert iterations > 0, f"no Python ran during {seconds:.3f} s of {operation}"

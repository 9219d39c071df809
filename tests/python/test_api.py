"""The Python API beyond bytes and maps: lifetime of memoryviews, the context manager, errors
(qcowmap.Error and its codes), arguments, RawDisk with shutil/hashlib/tarfile, bitmaps and
dirty extents against the CLI, the 1 TiB sparse image, the type stub, and the install layout.
"""

import errno
import gc
import hashlib
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import time

import pytest

import qcowmap
from conftest import (
    KiB,
    MiB,
    buffer_address,
    cli,
    cli_json,
    file_mappings,
    make_image,
    mapping_of,
    qemu_io,
    run,
    sha256,
    wait_for_writer_lock,
)


@pytest.fixture
def small(tmp_path):
    """A 4 MiB image: data at 64k (128k of 0xab), zero cluster at 1M, data at 2M (0xcd)."""
    path = tmp_path / "small.qcow2"
    make_image(path, "cluster_size=64k", "4M", ["write -P 0xab 64k 128k", "write -z 1M 64k", "write -P 0xcd 2M 64k"])
    raw = tmp_path / "small.raw"
    run(["qemu-img", "convert", "-O", "raw", str(path), str(raw)])
    return path, raw.read_bytes()


def data_extents(img):
    return [e for e in img.extents() if e.kind == "data"]


# ---------------------------------------------------------------------------------------------
# Lifetime: a memoryview owns the mapping.


def test_memoryview_outlives_the_image(small):
    path, raw = small
    img = qcowmap.open(path)
    first = data_extents(img)[0]
    view = first.data
    address, length, _ = buffer_address(view)
    del img, first
    gc.collect()
    # Still mapped, still the image's bytes.
    assert mapping_of(address, length)[0] == str(path.resolve())
    assert view == raw[64 * KiB : 192 * KiB]
    assert view[0] == 0xAB and view[-1] == 0xAB


def test_mapping_is_released_with_the_last_view(small):
    path, _ = small
    resolved = str(path.resolve())

    def mapped():
        return any(p == resolved for _, _, _, p in file_mappings())

    img = qcowmap.open(path)
    view = data_extents(img)[0].data
    img.close()
    gc.collect()
    assert mapped(), "the memoryview must keep the mapping"
    slice_ = view[10:20]  # a slice shares the view's owner
    del view
    gc.collect()
    assert mapped(), "a slice of the memoryview must keep the mapping"
    assert bytes(slice_) == b"\xab" * 10
    del slice_
    gc.collect()
    assert not mapped(), "the mapping must go with the last reference"


def test_memoryview_is_read_only(small):
    path, _ = small
    with qcowmap.open(path) as img:
        view = data_extents(img)[0].data
        assert view.readonly
        with pytest.raises(TypeError):
            view[0] = 1
        assert view.format == "B" and view.ndim == 1 and view.contiguous
        # numpy-free consumers see one flat byte buffer.
        assert view.cast("B").nbytes == 128 * KiB


# ---------------------------------------------------------------------------------------------
# Read-ahead extents (prefetch=True, the default): pieces produced ahead of the loop.


@pytest.fixture
def dense(tmp_path):
    """12 MiB: 5 MiB of data, a zero cluster, two compressed clusters, 3 MiB more data."""
    path = tmp_path / "dense.qcow2"
    make_image(
        path,
        "cluster_size=64k",
        "12M",
        ["write -P 0x5a 0 5M", "write -z 5M 64k", "write -c -P 0x6b 6M 128k", "write -P 0x7c 8M 3M"],
    )
    raw = tmp_path / "dense.raw"
    run(["qemu-img", "convert", "-O", "raw", str(path), str(raw)])
    return path, raw.read_bytes()


@pytest.mark.parametrize("io", ["auto", "mmap", "read"])
def test_read_ahead_extents_give_the_disk_and_their_views_outlive_the_walk(dense, io):
    path, raw = dense
    kept = []
    with qcowmap.open(path) as img:
        position = 0
        kinds = set()
        for e in img.extents(io=io, threads=2):
            assert e.offset == position, e
            kinds.add(e.kind)
            data = e.data
            if e.kind == "data":
                assert e.length <= MiB, e
                if io == "read":
                    assert e.length <= 256 * KiB, e
                assert isinstance(data, memoryview) and data.readonly and data.nbytes == e.length
                kept.append((e.offset, data))
            elif e.kind == "compressed":
                assert data == raw[e.offset : e.offset + e.length]
            else:
                assert data is None
            position += e.length
        assert position == len(raw)
        assert kinds == {"data", "zero", "compressed"}
    gc.collect()
    # The walk read on into fresh buffers while these views kept theirs.
    assert sum(len(v) for _, v in kept) == 8 * MiB
    for offset, view in kept:
        assert view == raw[offset : offset + len(view)], offset


def rchar():
    """Bytes this process has read with read(2)/pread(2) so far."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def test_read_ahead_starts_only_when_the_loop_reads_data(dense):
    path, raw = dense
    with qcowmap.open(path) as img:
        before = rchar()
        pieces = [(e.offset, e.length, e.kind) for e in img.extents(io="read")]
        map_only = rchar() - before
        before = rchar()
        digest = hashlib.sha256()
        for e in img.extents(io="read"):
            digest.update(e.data if e.data is not None else bytes(e.length))
        reading = rchar() - before
        whole = [(e.offset, e.length, e.kind) for e in img.extents(prefetch=False)]
    assert digest.hexdigest() == sha256(raw)
    # A loop over offsets and kinds reads nothing (the walk reads tables in the mapping)...
    assert map_only < 64 * KiB, map_only
    # ...one that reads the data reads it with pread ahead of the loop, from the piece after the
    # first one it asked for (that one is read from the mapping when asked: 256 KiB).
    assert reading >= 8 * MiB - 256 * KiB, reading
    # Pieces of at most 256 KiB there; prefetch=False keeps the map's runs whole.
    assert (0, 5 * MiB, "data") in whole
    assert (0, 256 * KiB, "data") in pieces
    assert sum(length for _, length, _ in pieces) == len(raw)


def test_a_long_data_run_is_cut_batch_by_batch(tmp_path):
    # One 80 MiB run is 320 pieces of 256 KiB (io="read"): more than one batch of the map walk
    # (the pieces are made a batch at a time, never all at once), and the read-ahead may take
    # over in the middle of the run.
    path = tmp_path / "long.qcow2"
    make_image(path, "cluster_size=64k", "96M", ["write -P 0x3d 0 80M"])
    raw = tmp_path / "long.raw"
    run(["qemu-img", "convert", "-O", "raw", str(path), str(raw)])
    expected = raw.read_bytes()
    with qcowmap.open(path) as img:
        pieces = [(e.offset, e.length, e.kind) for e in img.extents(io="read")]
        assert sum(1 for p in pieces if p[2] == "data") == 320
        assert all(length == 256 * KiB for _, length, kind in pieces if kind == "data")
        position = 0
        for offset, length, _ in pieces:
            assert offset == position
            position += length
        assert position == len(expected)
        # Data first asked for in the second batch: the read-ahead starts from there.
        got = bytearray()
        for i, e in enumerate(img.extents(io="read")):
            if i >= 300 and e.kind == "data":
                got += e.data
            elif i >= 300:
                got += bytes(e.length)
        assert bytes(got) == expected[300 * 256 * KiB :]


def test_read_ahead_arguments_are_checked(dense):
    path, _ = dense
    with qcowmap.open(path) as img:
        with pytest.raises(ValueError):
            img.extents(io="fast")
        with pytest.raises(TypeError):
            img.extents(0, None, True)  # keyword-only


def test_context_manager_and_close(small):
    path, raw = small
    with qcowmap.open(path) as img:
        assert not img.closed
        assert img.read(64 * KiB, 4) == b"\xab" * 4
    assert img.closed
    assert "closed" in repr(img)
    for call in (lambda: img.size, lambda: img.read(0, 1), lambda: img.extents(), lambda: img.map(),
                 lambda: img.hash(), lambda: img.info, lambda: img.readinto(0, bytearray(4))):
        with pytest.raises(ValueError, match="closed image"):
            call()
    img.close()  # twice is fine


def test_extent_iterator_outlives_the_image(small):
    path, raw = small
    img = qcowmap.open(path)
    it = img.extents()
    del img
    gc.collect()
    got = b"".join(bytes(e.length) if e.data is None else bytes(e.data) for e in it)
    assert got == raw


def test_extents_attributes(small):
    path, _ = small
    with qcowmap.open(path) as img:
        es = list(img.extents())
    assert [(e.offset, e.length, e.kind, e.present, e.depth) for e in es] == [
        (0, 64 * KiB, "zero", False, 0),
        (64 * KiB, 128 * KiB, "data", True, 0),
        (192 * KiB, MiB - 192 * KiB, "zero", False, 0),
        (MiB, 64 * KiB, "zero", True, 0),
        (MiB + 64 * KiB, MiB - 64 * KiB, "zero", False, 0),
        (2 * MiB, 64 * KiB, "data", True, 0),
        (2 * MiB + 64 * KiB, 2 * MiB - 64 * KiB, "zero", False, 0),
    ]
    assert repr(es[1]) == "Extent(offset=65536, length=131072, kind='data', present=True, depth=0)"
    assert es[1].data is es[1].data  # made once


# ---------------------------------------------------------------------------------------------
# Errors.


def expect_error(code, fragment, call):
    with pytest.raises(qcowmap.Error) as caught:
        call()
    error = caught.value
    assert isinstance(error, OSError)
    assert error.code == code, str(error)
    assert fragment in str(error), str(error)
    assert fragment in error.message
    return error


def test_open_errors(tmp_path):
    missing = tmp_path / "missing.qcow2"
    e = expect_error("io_error", "No such file or directory", lambda: qcowmap.open(missing))
    assert str(e).startswith(str(missing) + ": ")
    assert (e.origin, e.path, e.refusal, e.errno) == ("image", str(missing), None, errno.EIO)

    text = tmp_path / "text.qcow2"
    text.write_bytes(b"hello, not an image" * 10)
    expect_error("not_qcow2", "not a qcow2 image (bad magic 0x68656c6c", lambda: qcowmap.open(text))

    empty = tmp_path / "empty.qcow2"
    empty.write_bytes(b"")
    expect_error("not_qcow2", "file is empty", lambda: qcowmap.open(empty))
    expect_error("not_qcow2", "is a directory", lambda: qcowmap.open(tmp_path))

    image = tmp_path / "i.qcow2"
    make_image(image, "", "1M")
    expect_error("invalid_argument", "no snapshot", lambda: qcowmap.open(image, snapshot="nope"))

    # A missing backing file names the path that was looked for.
    run("qemu-img create -q -f qcow2 -u -b gone.qcow2 -F qcow2 top.qcow2 1M", cwd=tmp_path)
    e = expect_error("io_error", str(tmp_path / "gone.qcow2"), lambda: qcowmap.open(tmp_path / "top.qcow2"))
    assert (e.origin, e.path) == ("backing", str(tmp_path / "gone.qcow2"))
    with qcowmap.open(tmp_path / "top.qcow2", backing=False) as img:
        assert img.read(0, 4) == bytes(4)

    # An encrypted image.
    luks = tmp_path / "luks.qcow2"
    for _ in range(10):  # qemu-img fails now and then with "Unable to get accurate CPU usage"
        created = run(["qemu-img", "create", "-q", "-f", "qcow2", "--object", "secret,id=s,data=pw", "-o",
                       "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=100", str(luks), "1M"],
                      check=False)
        if created.returncode == 0:
            break
    assert created.returncode == 0, created.stderr
    e = expect_error("encrypted", "encrypted images are not supported", lambda: qcowmap.open(luks))
    assert (e.origin, e.path, e.errno) == ("image", str(luks), errno.ENOTSUP)

    # An unsupported version (header bytes 4-7).
    bad = bytearray(image.read_bytes())
    bad[7] = 9
    (tmp_path / "v9.qcow2").write_bytes(bad)
    expect_error("unsupported_version", "9", lambda: qcowmap.open(tmp_path / "v9.qcow2"))


def point_cluster_past_eof(path, cluster):
    """tests/support.cpp point_cluster_past_eof: the first L2 table's entry for `cluster`
    becomes a COPIED standard entry at 0x40000000000, far past the end of the file."""
    data = bytearray(path.read_bytes())
    l1 = int.from_bytes(data[40:48], "big")
    l2 = int.from_bytes(data[l1 : l1 + 8], "big") & 0x00FFFFFFFFFFFE00
    entry = (1 << 63) | 0x40000000000
    data[l2 + cluster * 8 : l2 + cluster * 8 + 8] = entry.to_bytes(8, "big")
    path.write_bytes(data)


def test_walk_errors_after_the_good_extents(tmp_path):
    path = tmp_path / "bad.qcow2"
    make_image(path, "cluster_size=64k", "1M", ["write -P 0x11 0 64k", "write -P 0x22 128k 64k"])
    point_cluster_past_eof(path, 2)
    with qcowmap.open(path) as img:
        it = img.extents()
        first = next(it)
        assert (first.offset, first.kind, bytes(first.data[:2])) == (0, "data", b"\x11\x11")
        rest = []
        with pytest.raises(qcowmap.Error) as caught:
            for e in it:
                rest.append(e)
        assert caught.value.code == "invalid_cluster", str(caught.value)
        assert "0x40000000000" in str(caught.value)
        assert [e.offset for e in rest] == [64 * KiB]  # the zero run before the bad cluster
        with pytest.raises(StopIteration):  # a failed walk raises once, then ends
            next(it)
        # read, map and hash meet the same error; the good part still reads.
        expect_error("invalid_cluster", "0x40000000000", lambda: img.read(0, MiB))
        expect_error("invalid_cluster", "0x40000000000", lambda: img.map())
        expect_error("invalid_cluster", "0x40000000000", lambda: img.hash())
        assert img.read(0, 64 * KiB) == b"\x11" * (64 * KiB)
    r = cli("cat", path, check=False)
    assert r.returncode == 1
    assert caught.value.message in r.stderr.decode()


def test_compressed_cluster_that_does_not_decompress(tmp_path):
    path = tmp_path / "c.qcow2"
    make_image(path, "cluster_size=64k", "1M", ["write -c -P 0x5c 0 64k"])
    data = bytearray(path.read_bytes())
    l1 = int.from_bytes(data[40:48], "big")
    l2 = int.from_bytes(data[l1 : l1 + 8], "big") & 0x00FFFFFFFFFFFE00
    entry = int.from_bytes(data[l2 : l2 + 8], "big")
    assert entry & (1 << 62)
    stream = entry & ((1 << 54) - 1)  # 64 KiB clusters: host offset in bits 0..53
    data[stream : stream + 64] = b"\xff" * 64  # not a deflate stream
    path.write_bytes(data)
    with qcowmap.open(path) as img:
        (e, *_) = list(img.extents())
        assert e.kind == "compressed"
        expect_error("compressed_data", "", lambda: e.data)
        expect_error("compressed_data", "", lambda: img.read(0, 10))


def test_argument_errors(small):
    path, _ = small
    with qcowmap.open(path) as img:
        expect_error("out_of_range", "beyond the end of the disk", lambda: img.read(img.size + 1, 1))
        expect_error("out_of_range", "beyond the end of the disk", lambda: img.readinto(img.size + 1, bytearray(1)))
        assert img.read(img.size, 5) == b""
        with pytest.raises(ValueError, match="offset must not be negative"):
            img.read(-1, 1)
        with pytest.raises(ValueError, match="length must not be negative"):
            img.read(0, -1)
        with pytest.raises(ValueError, match="start must not be negative"):
            img.extents(-5)
        with pytest.raises(ValueError, match="unknown hash algorithm 'md5'"):
            img.hash("md5")
        with pytest.raises(ValueError, match="block_size 1000 is not a power of two"):
            img.hash(block_size=1000)
        with pytest.raises(TypeError):  # bytes are read-only
            img.readinto(0, b"xxxx")
        expect_error("invalid_argument", "no bitmap named 'x'", lambda: img.dirty_extents("x"))
        with pytest.raises(TypeError, match="snapshot must be"):
            qcowmap.open(path, snapshot=b"1")


def blkhash(data, name="sha256"):
    """The blkhash construction (blksum's digest), from its definition."""
    outer = hashlib.new(name)
    for at in range(0, len(data), 64 * KiB):
        outer.update(hashlib.new(name, data[at : at + 64 * KiB]).digest())
    outer.update(len(data).to_bytes(8, "little"))
    return outer.hexdigest()


def test_hash_blkhash(small):
    path, raw = small
    with qcowmap.open(path) as img:
        assert img.hash("blkhash-sha256") == blkhash(raw)
        assert img.hash("blkhash-sha256", threads=1) == blkhash(raw)
        assert img.hash("blkhash-sha512") == blkhash(raw, "sha512")
        assert img.hash("blkhash-sha256") == cli("hash", "--algo=blkhash-sha256", str(path)).stdout.decode().split()[0]
        # A whole-disk digest: no block manifest of it.
        expect_error("invalid_argument", "block manifest", lambda: img.hash("blkhash-sha256", block_size=65536))
    assert blkhash(b"") == "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc"


def test_untrusted_argument(small, tmp_path):
    path, raw = small
    with qcowmap.open(path, untrusted=False) as img:
        assert img.size == len(raw)
    with qcowmap.open(path, untrusted=True) as img:
        assert img.read(0, img.size) == raw
    # A backing name that leaves the image's directory is refused under untrusted=True (the
    # library's confinement: OpenOptions::untrusted), one inside it is followed.
    make_image(tmp_path / "base.qcow2", "", "1M", ["write -P 0x42 0 64k"])
    (tmp_path / "sub").mkdir()
    run("qemu-img create -q -f qcow2 -b ../base.qcow2 -F qcow2 escaping.qcow2 1M", cwd=tmp_path / "sub")
    run("qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 inside.qcow2 1M", cwd=tmp_path)
    with qcowmap.open(tmp_path / "sub" / "escaping.qcow2") as img:
        assert img.read(0, 2) == b"\x42\x42"
    error = expect_error("unsupported_feature", "../base.qcow2",
                         lambda: qcowmap.open(tmp_path / "sub" / "escaping.qcow2", untrusted=True))
    assert str(error).startswith(str(tmp_path / "sub" / "escaping.qcow2"))
    with qcowmap.open(tmp_path / "inside.qcow2", untrusted=True) as img:
        assert img.read(0, 2) == b"\x42\x42"


def test_paths_as_pathlike_str_and_bytes(small):
    path, raw = small
    for p in (path, str(path), os.fsencode(path)):
        with qcowmap.open(p) as img:
            assert img.path == str(path)
            assert img.read(64 * KiB, 2) == b"\xab\xab"
    # A file name that is not UTF-8 (bytes): kept as surrogates, as os.fsdecode does.
    odd = os.fsencode(path.parent) + b"/disk\xff.qcow2"
    error = expect_error("io_error", "No such file", lambda: qcowmap.open(odd))
    assert str(error).startswith(os.fsdecode(odd) + ": ")
    os.link(path, odd)
    with qcowmap.open(odd) as img:
        assert img.path == os.fsdecode(odd) and "\udcff" in img.path
        assert img.info["filename"] == img.path


# ---------------------------------------------------------------------------------------------
# read / readinto.


def test_readinto_buffers(small):
    path, raw = small
    with qcowmap.open(path) as img:
        b = bytearray(100)
        assert img.readinto(64 * KiB - 50, b) == 100
        assert b == raw[64 * KiB - 50 : 64 * KiB + 50]
        m = memoryview(bytearray(300 * KiB))
        assert img.readinto(2 * MiB - 1, m[5:]) == 300 * KiB - 5
        assert m[5:] == raw[2 * MiB - 1 : 2 * MiB - 1 + 300 * KiB - 5]
        # At the end: short.
        tail = bytearray(10)
        assert img.readinto(img.size - 3, tail) == 3
        assert tail[:3] == raw[-3:]
        import array

        a = array.array("I", [0] * 8)  # any writable contiguous buffer; counts bytes
        assert img.readinto(64 * KiB, a) == 32
        assert a.tobytes() == raw[64 * KiB : 64 * KiB + 32]


# ---------------------------------------------------------------------------------------------
# RawDisk: io.RawIOBase for the standard library.


def test_open_raw_is_a_raw_io(small):
    path, raw = small
    with qcowmap.open(path) as img:
        f = img.open_raw()
        assert isinstance(f, io.RawIOBase)
        assert f.readable() and f.seekable() and not f.writable()
        assert f.size == len(raw) and f.name == str(path) and f.mode == "rb"
        assert f.read(10) == raw[:10]
        assert f.tell() == 10
        assert f.seek(-5, io.SEEK_END) == len(raw) - 5
        assert f.read() == raw[-5:]
        assert f.read(10) == b""
        assert f.readinto(bytearray(4)) == 0
        assert f.seek(64 * KiB) == 64 * KiB
        assert f.seek(3, io.SEEK_CUR) == 64 * KiB + 3
        buf = bytearray(7)
        assert f.readinto(buf) == 7 and buf == raw[64 * KiB + 3 : 64 * KiB + 10]
        assert f.seek(len(raw) + 100) == len(raw) + 100  # past the end, like a file
        assert f.read(1) == b""
        with pytest.raises(ValueError):
            f.seek(-1)
        with pytest.raises(io.UnsupportedOperation):
            f.write(b"x")
        f.seek(0)
        assert f.readall() == raw
        buffered = io.BufferedReader(img.open_raw(), buffer_size=4096)
        assert buffered.read(3) == raw[:3] and buffered.peek(1)[:1] == raw[3:4]
        f.close()
        assert f.closed
        with pytest.raises(ValueError):
            f.read(1)
        assert not img.closed  # closing the file does not close the image


def test_open_raw_reads_that_follow_each_other_are_read_ahead_and_others_are_not(dense):
    path, raw = dense
    with qcowmap.open(path) as img:
        # hashlib.file_digest: readinto of 256 KiB, one after the other.
        with img.open_raw() as f:
            assert hashlib.file_digest(f, "sha256").hexdigest() == sha256(raw)
        # Sequential reads of odd sizes across data, zero and compressed runs, then jumps
        # (back, forward, past the end) and sequential again from there.
        with img.open_raw() as f:
            got = bytearray()
            for size in (1, 4095, 300 * KiB, 5 * MiB, 12345, MiB):
                got += f.read(size)
            assert bytes(got) == raw[: len(got)]
            for at, size in ((3, 70 * KiB), (6 * MiB - 5, 200 * KiB), (11 * MiB, 2 * MiB)):
                f.seek(at)
                first = f.read(size)
                second = f.read(size)
                assert first + second == raw[at : at + 2 * size], at
            f.seek(len(raw) + 10)
            assert f.read(10) == b""
            buffer = bytearray(3 * MiB)
            f.seek(4 * MiB)
            assert f.readinto(buffer) == 3 * MiB and bytes(buffer) == raw[4 * MiB : 7 * MiB]
            assert f.readinto(buffer) == 3 * MiB and bytes(buffer) == raw[7 * MiB : 10 * MiB]
            assert f.readinto(buffer) == 2 * MiB and bytes(buffer[: 2 * MiB]) == raw[10 * MiB :]
    # A RawDisk of a closed Image refuses, as before.
    img = qcowmap.open(path)
    f = img.open_raw()
    assert f.read(10) == raw[:10]
    img.close()
    with pytest.raises(ValueError):
        f.read(10)


def test_open_raw_with_shutil_hashlib_and_tarfile(small, tmp_path):
    path, raw = small
    with qcowmap.open(path) as img:
        # shutil.copyfileobj
        out = tmp_path / "copy.raw"
        with img.open_raw() as f, open(out, "wb") as o:
            shutil.copyfileobj(f, o)
        assert out.read_bytes() == raw
        # hashlib.file_digest (readinto in 256 KiB pieces)
        with img.open_raw() as f:
            assert hashlib.file_digest(f, "sha256").hexdigest() == sha256(raw)
        # tarfile: the disk as a member of an archive
        archive = tmp_path / "disk.tar"
        with tarfile.open(archive, "w") as tar, img.open_raw() as f:
            member = tarfile.TarInfo("disk.raw")
            member.size = f.size
            tar.addfile(member, f)
        with tarfile.open(archive) as tar:
            assert tar.extractfile("disk.raw").read() == raw


def test_tarfile_reads_a_tar_that_is_the_disk(tmp_path):
    # A disk whose contents are a tar archive (as a forensic image of a tape or a tar-backed
    # disk would be): tarfile opens it through RawDisk, seeking and reading members.
    files = {"a.txt": b"alpha\n" * 1000, "dir/b.bin": os.urandom(300000), "empty": b""}
    raw_tar = tmp_path / "content.tar"
    with tarfile.open(raw_tar, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    image = tmp_path / "tar.qcow2"
    run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw_tar), str(image)])
    with qcowmap.open(image) as img, img.open_raw() as f:
        assert any(e.kind == "compressed" for e in img.extents())
        with tarfile.open(fileobj=f) as tar:
            assert sorted(tar.getnames()) == sorted(files)
            for name, data in files.items():
                assert tar.extractfile(name).read() == data


# ---------------------------------------------------------------------------------------------
# Bitmaps.


@pytest.fixture
def with_bitmaps(tmp_path):
    """The README's incremental-backup setup: a full write, a bitmap, then changes."""
    path = tmp_path / "vm.qcow2"
    make_image(path, "", "64M", ["write -P 0x11 0 8M"])
    run(["qemu-img", "bitmap", "--add", str(path), "since-full"])
    run(["qemu-img", "bitmap", "--add", "-g", "512", str(path), "fine"])
    qemu_io(path, ["write -P 0x22 1M 64k", "write -z 4M 1M", "discard 6M 128k", "write -P 0x33 60M 4k",
                   "write -c -P 0x44 40M 64k", "write -P 0x55 50M 700"])
    run(["qemu-img", "bitmap", "--disable", str(path), "since-full"])
    raw = tmp_path / "vm.raw"
    run(["qemu-img", "convert", "-O", "raw", str(path), str(raw)])
    return path, raw.read_bytes()


def test_bitmaps_match_the_cli(with_bitmaps):
    path, _ = with_bitmaps
    with qcowmap.open(path) as img:
        bitmaps = img.bitmaps()
        assert bitmaps == cli_json("bitmaps", "--output=json", path)
        assert [b["name"] for b in bitmaps] == ["since-full", "fine"]
        assert bitmaps[0]["enabled"] is False and bitmaps[1]["enabled"] is True
        assert bitmaps[0]["usable"] and bitmaps[0]["dirty-bytes"] > 0
        assert img.info["bitmaps"] == cli_json("info", "--output=json", path)["bitmaps"]


@pytest.mark.parametrize("name", ["since-full", "fine"])
def test_dirty_extents_cover_exactly_the_dirty_ranges(with_bitmaps, name):
    path, raw = with_bitmaps
    ranges = cli_json("map", f"--bitmap={name}", "--bitmap-only", "--output=json", path)
    dirty = [(r["start"], r["start"] + r["length"]) for r in ranges if r["dirty"]]
    assert dirty
    with qcowmap.open(path) as img:
        covered = []
        for e in img.dirty_extents(name):
            expected = raw[e.offset : e.offset + e.length]
            got = bytes(e.length) if e.data is None else bytes(e.data)
            assert got == expected, e
            if covered and covered[-1][1] == e.offset:
                covered[-1] = (covered[-1][0], e.offset + e.length)
            else:
                covered.append((e.offset, e.offset + e.length))
        assert covered == dirty
        # A range of it.
        start, end = dirty[0][0] + 100, dirty[-1][1] - 100
        part = list(img.dirty_extents(name, start, end))
        assert part[0].offset == start and part[-1].offset + part[-1].length == end


def bitmap_directory_offset(data):
    """The bitmap directory's file offset, from the bitmaps header extension (0x23852875:
    directory offset at extension bytes 16-23). Extensions start at header_length (v3)."""
    at = int.from_bytes(data[100:104], "big")
    while True:
        kind = int.from_bytes(data[at : at + 4], "big")
        length = int.from_bytes(data[at + 4 : at + 8], "big")
        if kind == 0:
            raise AssertionError("no bitmaps extension")
        if kind == 0x23852875:
            return int.from_bytes(data[at + 8 + 16 : at + 8 + 24], "big")
        at += 8 + (length + 7) // 8 * 8


def test_bitmap_in_use_is_refused(with_bitmaps):
    path, _ = with_bitmaps
    data = bytearray(path.read_bytes())
    directory = bitmap_directory_offset(data)
    # The first directory entry's flags (entry bytes 12-15): set bit 0, in_use.
    data[directory + 15] |= 1
    path.write_bytes(data)
    with qcowmap.open(path) as img:
        b = img.bitmaps()[0]
        assert b["name"] == "since-full"
        assert b["in-use"] and not b["usable"] and b["dirty-bytes"] is None
        assert "flag in_use is set" in b["error"]
        expect_error("invalid_table", "flag in_use is set", lambda: img.dirty_extents("since-full"))
        assert img.bitmaps() == cli_json("bitmaps", "--output=json", path)


# ---------------------------------------------------------------------------------------------
# Large sparse image: the walk and the map stay cheap; reads around the writes.


def test_sparse_1tib(tmp_path):
    path = tmp_path / "sparse.qcow2"
    writes = [(0, 0x11, 4096), (1 << 39, 0x22, 65536), ((1 << 40) - 8192, 0x33, 8192), (123456789 * 512, 0x44, 1000)]
    make_image(path, "", "1T", [f"write -P {p:#x} {o} {n}" for o, p, n in writes])
    with qcowmap.open(path) as img:
        assert img.size == 1 << 40
        ours = img.map()
        qemu = json.loads(run(["qemu-img", "map", "--output=json", str(path)]).stdout)
        assert [{k: v for k, v in e.items() if k != "compressed"} for e in ours] == qemu
        es = list(img.extents())
        assert sum(e.length for e in es) == 1 << 40
        assert sum(e.length for e in es if e.kind == "data") == sum(e["length"] for e in qemu if e["data"])
        for offset, pattern, length in writes:
            assert img.read(offset, length) == bytes([pattern]) * length
            if offset:
                assert img.read(offset - 10, 10) == bytes(10)
        assert img.read((1 << 40) - 3, 100) == b"\x33" * 3


# ---------------------------------------------------------------------------------------------
# Packaging: the stub covers the API; meson install puts a working package in the prefix.


def test_stub_names_every_public_name():
    stub = pathlib.Path(qcowmap.__file__).with_name("__init__.pyi")
    assert stub.exists(), "the .pyi stub must sit beside the package"
    assert pathlib.Path(qcowmap.__file__).with_name("py.typed").exists()
    text = stub.read_text()
    import ast

    tree = ast.parse(text)  # valid Python syntax
    assert any(isinstance(n, ast.ClassDef) and n.name == "Image" for n in tree.body)
    for name in qcowmap.__all__:
        assert f"class {name}" in text or f"def {name}(" in text or f"{name}:" in text, name
    for method in ("size", "info", "extents", "read", "readinto", "map", "bitmaps", "dirty_extents", "hash", "open_raw", "close"):
        assert hasattr(qcowmap.Image, method)
        assert f"def {method}(" in text, method


def test_meson_install_puts_an_importable_package_in_the_prefix(tmp_path, small):
    build_root = os.environ.get("QCOWMAP_BUILD_ROOT")
    meson = shutil.which("meson")
    if not build_root or not meson:
        pytest.skip("needs QCOWMAP_BUILD_ROOT (set by meson test) and meson")
    path, raw = small
    destdir = tmp_path / "root"
    run([meson, "install", "-C", build_root, "--no-rebuild", "--quiet", "--destdir", str(destdir),
         "--tags", "python-runtime"])
    found = sorted(destdir.rglob("qcowmap/__init__.py"))
    assert len(found) == 1, found
    package = found[0].parent
    names = sorted(p.name for p in package.iterdir())
    assert "__init__.pyi" in names and "py.typed" in names
    assert any(n.startswith("_qcowmap.") and n.endswith(".so") for n in names), names
    # The extension links the library statically: nothing to find on the loader's path.
    ext = next(package.glob("_qcowmap.*.so"))
    assert b"libqcowmap" not in run(["ldd", str(ext)]).stdout
    site = package.parent
    assert "-packages" in site.name, site
    # Issue 25: where this interpreter's own local installs go lies under the prefix (Debian's
    # python3 and the default /usr/local), the package goes there, on its sys.path, not to
    # Meson 1.0's /usr/local/lib/python3/dist-packages that no Python searches.
    options = json.loads(run([meson, "introspect", build_root, "--buildoptions"]).stdout)
    prefix = next(o["value"] for o in options if o["name"] == "prefix").rstrip("/")
    own = run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_path('platlib'))"]
              ).stdout.decode().strip()
    final = "/" + str(site.relative_to(destdir))
    if own.startswith(prefix + "/"):
        assert final == own
        on_path = run([sys.executable, "-c", "import sys; print(sys.argv[1] in sys.path)", final])
        assert on_path.stdout.decode().strip() == "True"
    else:
        assert final.startswith(prefix + "/"), final
    # A fresh interpreter that sees only the installed package (not the build tree's).
    env = dict(os.environ, PYTHONPATH=str(site))
    code = "import qcowmap, sys; img = qcowmap.open(sys.argv[1]); print(qcowmap.__file__); print(img.hash())"
    out = subprocess.run([sys.executable, "-c", code, str(path)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == str(package / "__init__.py")
    assert out[1] == sha256(raw)


# Issue 25: QEMU's image locks. By default an image a writer holds is refused (as qemu-img
# refuses it); force_share=True reads it anyway (qemu-img -U). A live qemu-io is the writer.
def test_an_image_a_writer_holds_is_refused_unless_force_share(small):
    path, raw = small
    writer = subprocess.Popen(["timeout", "60", "qemu-io", "-f", "qcow2", "-c", "sleep 60000", str(path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if not wait_for_writer_lock(path):
            pytest.fail(f"qemu-io never locked the image (exit {writer.poll()})")
        expect_error("image_in_use", 'Failed to get shared "write" lock', lambda: qcowmap.open(path))
        with qcowmap.open(path, force_share=True) as img:
            assert img.hash() == sha256(raw)
    finally:
        writer.terminate()
        writer.wait()
    # Once the writer is gone, the default open works, and holds qemu's writers off.
    with qcowmap.open(path) as img:
        refused = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write 0 4k", str(path)], capture_output=True,
                                 text=True)
        assert refused.returncode != 0
        assert 'Failed to get "write" lock' in refused.stdout + refused.stderr
        assert img.size == 4 << 20


def test_stream_convert_from_a_pipe(tmp_path):
    """qcowmap.stream_convert reads an image once from a pipe (a subprocess's stdout, as an HTTP
    body would be read) and writes the raw disk, byte-identical to qemu-img convert; a wrong
    checksum or a cut stream raises qcowmap.Error and leaves no target."""
    image = tmp_path / "img.qcow2"
    make_image(image, "cluster_size=4k", "16M", ["write -P 0xab 0 1M", "write -c -P 0xcd 4M 256k", "write -z 8M 64k"])
    # Out of order: the L1 table moves to the end after a resize, so the data arrives first.
    run(["qemu-img", "resize", "-q", str(image), "64M"])
    qemu_io(image, ["write -P 0x5a 60M 64k"])
    expected = tmp_path / "expected.raw"
    run(["qemu-img", "convert", "-O", "raw", str(image), str(expected)])
    digest = hashlib.sha256(image.read_bytes()).hexdigest()

    target = tmp_path / "out.raw"
    with subprocess.Popen(["cat", str(image)], stdout=subprocess.PIPE) as cat:
        stats = qcowmap.stream_convert(cat.stdout, target, expect_checksum="sha256:" + digest)
    assert sha256(target.read_bytes()) == sha256(expected.read_bytes())
    assert stats["disk_size"] == 64 * MiB
    assert stats["stream_bytes"] == image.stat().st_size
    assert stats["input_digest"] == digest
    assert stats["spool_used_bytes"] > 0  # the data before the resized L1 table
    assert stats["compressed_clusters"] == 64

    # A file object without fileno (io.BytesIO, read through readinto) works the same.
    target.unlink()
    qcowmap.stream_convert(io.BytesIO(image.read_bytes()), target)
    assert sha256(target.read_bytes()) == sha256(expected.read_bytes())

    target.unlink()
    wrong = ("0" if digest[0] != "0" else "1") + digest[1:]
    with subprocess.Popen(["cat", str(image)], stdout=subprocess.PIPE) as cat:
        with pytest.raises(qcowmap.Error) as raised:
            qcowmap.stream_convert(cat.stdout, target, expect_checksum="sha256:" + wrong)
        cat.stdout.read()
    assert raised.value.code == "checksum_mismatch"
    assert digest in str(raised.value) and wrong in str(raised.value)
    assert not target.exists()

    cut = io.BytesIO(image.read_bytes()[: 300 * KiB])
    with pytest.raises(qcowmap.Error) as raised:
        qcowmap.stream_convert(cut, target)
    assert "beyond end of file" in str(raised.value)
    assert not target.exists()
    with pytest.raises(ValueError):
        qcowmap.stream_convert(io.BytesIO(b""), target, expect_checksum="md5:00")

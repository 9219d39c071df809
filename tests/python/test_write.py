"""Writing in place from Python (issue 27): qcowmap.create, qcowmap.open(..., writable=True),
write from any buffer, write_zeroes, discard, flush, resize, and RawDisk writable so that
shutil.copyfileobj restores a disk. qemu-img judges every image."""

import array
import io
import os
import shutil
import threading

import pytest

import qcowmap
from conftest import MiB, run


def qemu_check(path):
    result = run(["qemu-img", "check", "-q", str(path)], check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_create_options_match_qemu_img(tmp_path):
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    qcowmap.create(ours, 3 * MiB, cluster_size="16k", extended_l2=True, compression_type="zstd",
                   refcount_bits=8, lazy_refcounts=True)
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
         "cluster_size=16k,extended_l2=on,compression_type=zstd,refcount_bits=8,lazy_refcounts=on",
         str(theirs), "3M"])
    qemu_check(ours)
    info = lambda p: {k: v for k, v in __import__("json").loads(
        run(["qemu-img", "info", "--output=json", str(p)]).stdout).items()
        if k not in ("filename", "actual-size", "dirty-flag")}
    assert info(ours) == info(theirs)


def test_create_refuses_bad_options(tmp_path):
    with pytest.raises(qcowmap.Error) as raised:
        qcowmap.create(tmp_path / "a.qcow2", MiB, cluster_size=3000)
    assert raised.value.code == "invalid_argument"
    with pytest.raises(qcowmap.Error):
        qcowmap.create(tmp_path / "a.qcow2", MiB, encryption=True)


def test_write_from_any_buffer_and_read_back(tmp_path):
    path = tmp_path / "a.qcow2"
    qcowmap.create(path, 4 * MiB)
    with qcowmap.open(path, writable=True) as img:
        assert isinstance(img, qcowmap.WritableImage)
        assert img.write(0, b"\x01" * 4096) == 4096
        img.write(4096, bytearray(b"\x02" * 4096))
        img.write(8192, memoryview(b"\x03" * 8192)[4096:])
        img.write(12288, array.array("B", [4] * 4096))
        assert img.read(0, 16384) == b"\x01" * 4096 + b"\x02" * 4096 + b"\x03" * 4096 + b"\x04" * 4096
        img.write_zeroes(4096, 4096)
        img.discard(MiB, MiB)
        buffer = bytearray(8192)
        assert img.readinto(0, buffer) == 8192
        assert buffer == b"\x01" * 4096 + b"\x00" * 4096
        status = img.block_status(0, 4 * MiB)
        assert status["allocated"] and status["offset"] == 0
        view = img.snapshot()
        assert view.read(12288, 4096) == b"\x04" * 4096
        img.flush()
    assert img.closed
    qemu_check(path)
    run(["qemu-io", "-c", "read -P 1 0 4k", "-c", "read -P 0 4k 4k", "-c", "read -P 4 12k 4k",
         str(path)])


def test_errors(tmp_path):
    path = tmp_path / "a.qcow2"
    qcowmap.create(path, MiB)
    with qcowmap.open(path, writable=True) as img:
        with pytest.raises(qcowmap.Error) as raised:
            img.write(MiB - 10, b"x" * 20)
        assert raised.value.code == "out_of_range"
        with pytest.raises(ValueError):
            img.write(-1, b"x")
        with pytest.raises(TypeError):
            img.write(0, "not bytes")
    with pytest.raises(ValueError):
        img.write(0, b"x")  # closed
    with pytest.raises(ValueError):
        qcowmap.open(path, snapshot="s", writable=True)
    # Read-only images cannot be written.
    with qcowmap.open(path) as ro:
        assert not hasattr(ro, "write")
        raw = ro.open_raw()
        assert not raw.writable()
        with pytest.raises(io.UnsupportedOperation):
            raw.write(b"x")
    run(["qemu-img", "create", "-q", "-f", "qcow", str(tmp_path / "v1.qcow"), "1M"])
    with pytest.raises(qcowmap.Error) as raised:
        qcowmap.open(tmp_path / "v1.qcow", writable=True)
    assert raised.value.code == "unsupported_version"


def test_copyfileobj_restores_a_disk(tmp_path):
    source = tmp_path / "disk.raw"
    data = os.urandom(3 * MiB) + bytes(MiB)
    source.write_bytes(data)
    path = tmp_path / "restored.qcow2"
    qcowmap.create(path, len(data))
    with qcowmap.open(path, writable=True) as img, open(source, "rb") as src:
        raw = img.open_raw()
        assert raw.writable() and raw.mode == "r+b"
        shutil.copyfileobj(src, raw)
        raw.close()
    qemu_check(path)
    run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(source), str(path)])


def test_resize_and_backing(tmp_path):
    base = tmp_path / "base.qcow2"
    qcowmap.create(base, 2 * MiB)
    with qcowmap.open(base, writable=True) as img:
        img.write(0, b"\x07" * (2 * MiB))
    top = tmp_path / "top.qcow2"
    qcowmap.create(top, 0, backing_file="base.qcow2", backing_fmt="qcow2")
    with qcowmap.open(top, writable=True) as img:
        assert img.size == 2 * MiB
        img.write(100, b"\x08" * 10)  # a partial cluster: the rest is copied up from base
        img.resize(4 * MiB)
        assert img.read(0, 120) == b"\x07" * 100 + b"\x08" * 10 + b"\x07" * 10
        assert img.read(3 * MiB, 10) == bytes(10)
    qemu_check(top)
    run(["qemu-io", "-c", "read -P 7 0 100", "-c", "read -P 8 100 10", "-c", "read -P 7 110 64k",
         str(top)])


def test_threads_share_one_writable_image(tmp_path):
    path = tmp_path / "a.qcow2"
    qcowmap.create(path, 8 * MiB)
    with qcowmap.open(path, writable=True) as img:
        def worker(n):
            for i in range(16):
                img.write((n * 16 + i) * 65536, bytes([n + 1]) * 65536)
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for n in range(4):
            assert img.read(n * 16 * 65536, 65536) == bytes([n + 1]) * 65536
    qemu_check(path)

"""Issue 26 in Python: a read that faults (the file truncated under us, EIO from the file system)
raises qcowmap.Error and the interpreter lives on; Ctrl-C stops long calls; paths refuse NUL;
argument errors are TypeError/ValueError; messages name the path once.
"""

import os
import signal
import subprocess
import threading
import time

import pytest

import qcowmap
from conftest import KiB, MiB, make_image, run

GiB = 1024 * MiB


def host_offset(path, virtual_offset):
    """Where the data cluster at `virtual_offset` lives in the file (qemu-img map)."""
    import json

    entries = json.loads(run(["qemu-img", "map", "--output=json", str(path)]).stdout)
    for e in entries:
        if e["start"] <= virtual_offset < e["start"] + e["length"] and e["data"]:
            return e["offset"] + virtual_offset - e["start"]
    raise AssertionError(f"no data at {virtual_offset}")


@pytest.fixture
def disk(tmp_path):
    """16 MiB: 64 KiB of 0xcd at 0, 4 MiB of 0xab at 8 MiB, 64 KiB clusters."""
    path = tmp_path / "disk.qcow2"
    make_image(path, "cluster_size=64k", "16M", ["write -P 0xcd 0 64k", "write -P 0xab 8M 4M"])
    return path


# ---------------------------------------------------------------------------------------------
# Faults


def test_read_of_a_truncated_image_raises_and_the_image_still_serves(disk):
    with qcowmap.open(disk) as img:
        extents = [e for e in img.extents() if e.kind == "data" and e.offset == 8 * MiB]
        os.truncate(disk, host_offset(disk, 8 * MiB) + 64 * KiB)
        with pytest.raises(qcowmap.Error) as caught:
            img.read(8 * MiB, 4 * MiB)
        assert caught.value.code == "image_changed"
        assert "image changed while being read" in str(caught.value)
        assert "shrank under its mapping" in str(caught.value)
        assert str(caught.value).count(str(disk)) == 1, str(caught.value)
        with pytest.raises(qcowmap.Error):
            img.hash()
        with pytest.raises(qcowmap.Error):
            img.readinto(8 * MiB, bytearray(MiB))
        # A memoryview is made only of pages that can be read now.
        with pytest.raises(qcowmap.Error):
            extents[0].data
        assert img.read(0, 64 * KiB) == b"\xcd" * (64 * KiB)
        assert img.read(8 * MiB, 64 * KiB) == b"\xab" * (64 * KiB)


@pytest.mark.parametrize("io", ["mmap", "read"])
def test_read_ahead_extents_of_a_truncated_image_raise_and_the_interpreter_lives(disk, io):
    # The pieces read ahead on the workers meet the end of the file: the loop gets
    # qcowmap.Error (never SIGBUS: with io="mmap" the workers read every page of a piece inside
    # the library's fault boundary before the loop may touch it), at the latest where the cut is.
    with qcowmap.open(disk) as img:
        os.truncate(disk, host_offset(disk, 8 * MiB) + 1 * MiB)
        good = 0
        with pytest.raises(qcowmap.Error) as caught:
            for e in img.extents(io=io, threads=2):
                if e.kind == "data":
                    data = bytes(e.data)
                    assert data == bytes([data[0]]) * len(data)
                    good += len(data)
        assert caught.value.code == "image_changed", str(caught.value)
        assert "image changed while being read" in str(caught.value)
        assert img.read(0, 64 * KiB) == b"\xcd" * (64 * KiB)


@pytest.fixture
def eio_mount(tmp_path, disk):
    """disk.qcow2 seen through eio_fs (tests/eio_fs.c): returns (mounted path, fail_reads)."""
    helper = os.environ.get("QCOWMAP_EIO_FS")
    if not helper or not os.access("/dev/fuse", os.R_OK | os.W_OK):
        pytest.skip("no eio_fs helper or no /dev/fuse")
    source = disk.parent
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    before = os.stat(mnt).st_dev
    server = subprocess.Popen([helper, str(source), str(mnt), "-f"])
    try:
        for _ in range(500):
            if os.stat(mnt).st_dev != before:
                break
            time.sleep(0.01)
        else:
            pytest.skip("eio_fs did not mount")

        def fail_reads(offset, length):
            (source / ".eio").write_text(f"disk.qcow2 {offset} {length}\n")

        yield mnt / "disk.qcow2", fail_reads
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        server.terminate()
        server.wait()


def test_eio_raises_an_io_error_and_the_rest_reads(disk, eio_mount):
    image, fail_reads = eio_mount
    fail_reads(host_offset(disk, 10 * MiB), 4096)
    with qcowmap.open(image) as img:
        with pytest.raises(qcowmap.Error) as caught:
            img.read(8 * MiB, 4 * MiB)
        assert caught.value.code == "io_error"
        assert "Input/output error" in str(caught.value)
        assert "shrank" not in str(caught.value)
        with pytest.raises(qcowmap.Error):
            img.hash(threads=2)
        assert img.read(0, 64 * KiB) == b"\xcd" * (64 * KiB)
        assert img.read(8 * MiB, MiB) == b"\xab" * MiB


# ---------------------------------------------------------------------------------------------
# Signals


def test_sigint_during_hash_raises_keyboard_interrupt_before_the_end(tmp_path):
    thin = tmp_path / "thin.qcow2"
    make_image(thin, "", "16G")
    seen = []
    with qcowmap.open(thin) as img:
        # sha256 of 16 GiB of zeros takes >= 9 s at this machine's best speed: the signal,
        # sent after 0.3 s, must stop it long before the end.
        timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                img.hash(threads=1, progress=lambda done, total: seen.append(done))
        finally:
            timer.cancel()
        assert seen, "no progress was reported before the interrupt"
        assert max(seen) < img.size, "the hash ran to the end: the signal waited for it"
        # The image is fine afterwards.
        assert img.read(0, 4) == bytes(4)


def test_progress_reports_the_end(tmp_path, disk):
    seen = []
    with qcowmap.open(disk) as img:
        img.hash(progress=lambda done, total: seen.append((done, total)))
        assert seen[-1] == (img.size, img.size)
        blocks = []
        img.hash(block_size=MiB, progress=lambda done, total: blocks.append((done, total)))
        assert blocks[-1] == (img.size, img.size)


def test_an_exception_in_progress_stops_the_hash(tmp_path):
    thin = tmp_path / "thin.qcow2"
    make_image(thin, "", "4G")

    def stop(done, total):
        if done > 0:
            raise RuntimeError("enough")

    with qcowmap.open(thin) as img:
        with pytest.raises(RuntimeError, match="enough"):
            img.hash(threads=1, progress=stop)


# ---------------------------------------------------------------------------------------------
# Arguments and messages


def test_paths_with_nul_are_refused(disk, tmp_path):
    for bad in (str(disk) + "\0.raw", os.fsencode(disk) + b"\0x", f"{disk}\0"):
        with pytest.raises(ValueError, match="embedded null byte"):
            qcowmap.open(bad)
    with pytest.raises(ValueError, match="data_file: embedded null byte"):
        qcowmap.open(disk, data_file=str(tmp_path / "d.raw") + "\0")
    with pytest.raises(TypeError):
        qcowmap.open(123)
    with pytest.raises(TypeError):
        qcowmap.open(disk, data_file=4.5)


def test_argument_errors_are_type_and_value_errors(disk):
    with qcowmap.open(disk) as img:
        with pytest.raises(ValueError, match="threads must not be negative"):
            img.hash(threads=-1)
        with pytest.raises(ValueError, match="block_size 1000 is not a power of two"):
            img.hash(block_size=1000)
        with pytest.raises(ValueError, match="block_size must not be negative"):
            img.hash(block_size=-4096)
        with pytest.raises(TypeError, match="progress must be callable"):
            img.hash(progress=5)
        with pytest.raises(TypeError):
            img.read("0", 5)
        with pytest.raises(TypeError):
            img.hash(threads="2")
        with pytest.raises(ValueError):
            img.map(-1)


def test_errors_name_the_path_once(tmp_path):
    missing = tmp_path / "missing.qcow2"
    with pytest.raises(qcowmap.Error) as caught:
        qcowmap.open(missing)
    assert str(caught.value).count(str(missing)) == 1, str(caught.value)
    text = tmp_path / "text.qcow2"
    text.write_bytes(b"x" * 1024)
    with pytest.raises(qcowmap.Error) as caught:
        qcowmap.open(text)
    assert str(caught.value).count(str(text)) == 1, str(caught.value)

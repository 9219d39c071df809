"""Every image kind the C++ suites build, read through the Python binding and compared with
qemu-img 7.2: bytes (read, readinto, extents, open_raw), the map, the extents' presence and
depth, and with the CLI: info, map, hash. Data extents are checked to be zero-copy: their
memoryview lies in a file mapping of one of the image's files, at the extent's host offset.
"""

import hashlib
import random

import pytest

import qcowmap
from conftest import cli, cli_json, mapping_of, buffer_address, qemu_map, sha256


def test_read_whole_disk_matches_qemu(case):
    raw = case.raw()
    with case.open() as img:
        assert img.size == len(raw)
        data = img.read(0, img.size)
        assert len(data) == len(raw)
        assert data == raw
        # Asking for more stops at the end of the disk.
        assert img.read(img.size - 10, 1000) == raw[-10:]
        assert img.read(img.size, 10) == b""


def test_extents_tile_the_disk_and_give_its_bytes(case):
    raw = case.raw()
    with case.open() as img:
        position = 0
        kinds = set()
        for e in img.extents():
            assert e.offset == position, e
            assert e.length > 0
            kinds.add(e.kind)
            expected = raw[e.offset : e.offset + e.length]
            if e.kind == "zero":
                assert e.data is None
                assert expected == bytes(e.length), e
            elif e.kind == "data":
                view = e.data
                assert isinstance(view, memoryview)
                assert view.readonly
                assert view.nbytes == e.length
                assert view == expected, e
                assert e.host_offset is not None
            else:
                assert e.kind == "compressed"
                assert isinstance(e.data, bytes)
                assert e.data == expected, e
                assert e.host_offset is None
            position += e.length
        assert position == img.size
        if case.name.startswith(("compressed_", "converted_", "v1_")):
            assert "compressed" in kinds


def test_extents_of_a_range(case):
    raw = case.raw()
    with case.open() as img:
        start, end = img.size // 3 + 17, 2 * img.size // 3 + 5
        pieces = []
        position = start
        for e in img.extents(start, end):
            assert e.offset == position
            pieces.append(bytes(e.length) if e.data is None else bytes(e.data))
            position += e.length
        assert position == end
        assert b"".join(pieces) == raw[start:end]


def test_data_extents_are_zero_copy(case):
    files = case.files()
    with case.open() as img:
        # io="mmap": views of the mapping, read ahead once the loop reads data (io="auto" may
        # read into buffers where that is cheaper); prefetch=False: the map's runs whole.
        for extents in (img.extents(io="mmap"), img.extents(prefetch=False)):
            checked = 0
            for e in extents:
                if e.kind != "data":
                    continue
                address, length, readonly = buffer_address(e.data)
                assert readonly and length == e.length
                where = mapping_of(address, length)
                assert where is not None, f"{e} does not lie in a file mapping"
                path, file_offset = where
                assert path in files, f"{e} maps {path}, not a file of the image"
                assert file_offset == e.host_offset, e
                checked += 1
            assert checked > 0


def test_map_matches_qemu_and_the_cli(case):
    with case.open() as img:
        ours = img.map()
    assert ours == cli_json("map", "--output=json", *case.cli_args, case.path)
    if case.qemu_map_source is None:
        pytest.skip(f"{case.name}: qemu-img map cannot show it (cli map compared)")
    # qemu-img 7.2 prints no "compressed" key (8.2 does).
    assert [{k: v for k, v in e.items() if k != "compressed"} for e in ours] == qemu_map(case)


def test_extents_agree_with_qemu_map(case):
    if case.qemu_map_source is None:
        pytest.skip(f"{case.name}: qemu-img map cannot show it")
    lines = qemu_map(case)
    with case.open() as img:
        checked = 0
        for e in img.extents():
            for line in lines:
                if line["start"] >= e.offset + e.length or line["start"] + line["length"] <= e.offset:
                    continue
                assert (e.depth, e.present) == (line["depth"], line["present"]), (e, line)
                checked += 1
        assert checked >= len(lines)


def info_args(case):
    """The case's open options that `qcowmap info` takes (it reads no snapshot)."""
    return [a for a in case.cli_args if a.startswith(("--data-file", "--backing"))]


def test_info_is_the_cli_json(case):
    with case.open() as img:
        info = img.info
    assert info == cli_json("info", "--output=json", *info_args(case), case.path)
    assert info["filename"] == str(case.path)
    assert info["data-file-found"] is (True if info["data-file"] else None)


def test_layers_are_the_cli_backing_chain(case):
    with case.open() as img:
        layers = img.layers
    chain = cli_json("info", "--backing-chain", "--output=json", *info_args(case), case.path)
    assert [(layer["filename"], layer["format"]) for layer in layers] == [
        (c["filename"], c["format"]) for c in chain
    ]
    assert layers[0]["virtual-size"] == len(case.raw())
    assert [layer["virtual-size"] for layer in layers[1:]] == [c["virtual-size"] for c in chain[1:]]
    if case.name.startswith("chain_top") and "backing" not in case.open_kwargs:
        assert [layer["format"] for layer in layers] == ["qcow2", "qcow2", "raw"]


def test_hash_matches_sha256_of_qemu_bytes(case):
    raw = case.raw()
    with case.open() as img:
        assert img.hash() == sha256(raw)
        assert img.hash("sha512") == hashlib.sha512(raw).hexdigest()
        assert img.hash(threads=1) == sha256(raw)
        manifest = img.hash(block_size=65536)
    expected = cli_json("hash", "--block-size=64k", "--output=json", *case.cli_args, case.path)[0]["blocks"]
    assert manifest == expected
    assert [m["digest"] for m in manifest] == [
        sha256(raw[i : i + 65536]) for i in range(0, len(raw), 65536)
    ]


def test_random_reads_and_readinto(case):
    raw = case.raw()
    rng = random.Random(case.name)
    with case.open() as img:
        for _ in range(60):
            offset = rng.randrange(len(raw))
            length = rng.choice([1, 7, 512, 4095, 65537, 300000])
            assert img.read(offset, length) == raw[offset : offset + length]
            buffer = bytearray(length)
            n = img.readinto(offset, buffer)
            assert n == min(length, len(raw) - offset)
            assert buffer[:n] == raw[offset : offset + n]


def test_open_raw_digest(case):
    raw = case.raw()
    with case.open() as img, img.open_raw() as f:
        assert hashlib.file_digest(f, "sha256").hexdigest() == sha256(raw)
        f.seek(len(raw) // 2 + 3)
        assert f.read(1000) == raw[len(raw) // 2 + 3 :][:1000]

"""Shared pieces of the Python binding's tests: running qemu-img/qemu-io and the qcowmap CLI,
and the table of images (every kind the C++ suites build), generated at test time.

Run by `meson test` (suites python-*), which puts the build tree's package on PYTHONPATH and
names the CLI in QCOWMAP_BIN.
"""

import dataclasses
import hashlib
import json
import os
import pathlib
import random
import shlex
import subprocess
import time

import pytest

KiB = 1024
MiB = 1024 * 1024

QCOWMAP_BIN = os.environ.get("QCOWMAP_BIN", "qcowmap")


# Under AddressSanitizer, meson preloads the ASan runtime for this interpreter (see
# meson.build); the tools run here (qemu-img, qemu-io, the CLI, which links its own) do
# without it.
TOOL_ENV = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD",)}


def run(args, cwd=None, check=True):
    """Runs a command (list, or a string for /bin/sh); returns the CompletedProcess."""
    result = subprocess.run(args, cwd=cwd, shell=isinstance(args, str), capture_output=True, env=TOOL_ENV)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{args!r} exited {result.returncode}: {result.stdout!r} {result.stderr!r}"
        )
    return result


def qemu_io(image, commands, fmt="qcow2", cwd=None):
    """Applies qemu-io commands; fails when one fails (qemu-io exits 0 even then)."""
    args = ["qemu-io", "-f", fmt]
    for command in commands:
        args += ["-c", command]
    result = run(args + [str(image)], cwd=cwd)
    out = result.stdout + result.stderr
    assert b"failed" not in out, out


def make_image(path, options, size, io=(), cwd=None):
    args = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if options:
        args += ["-o", options]
    run(args + [str(path), str(size)], cwd=cwd)
    if io:
        qemu_io(path, io, cwd=cwd)


def cli(*args, cwd=None, check=True):
    """Runs the qcowmap CLI built with the tests."""
    return run([QCOWMAP_BIN, *map(str, args)], cwd=cwd, check=check)


def cli_json(*args, cwd=None):
    return json.loads(cli(*args, cwd=cwd).stdout)


def sha256(data):
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# The table of images.


@dataclasses.dataclass
class Case:
    name: str
    path: pathlib.Path = None
    open_kwargs: dict = dataclasses.field(default_factory=dict)
    # qemu-img's view of the same disk: arguments naming the source for `convert` and `map`
    # (map None: qemu-img map cannot show it, e.g. a snapshot), run from qemu_cwd.
    qemu_source: list = None
    qemu_map_source: list = None
    qemu_cwd: pathlib.Path = None
    # The same options for the qcowmap CLI (map, hash).
    cli_args: list = dataclasses.field(default_factory=list)
    raw_path: pathlib.Path = None

    def open(self):
        import qcowmap

        return qcowmap.open(self.path, **self.open_kwargs)

    def raw(self):
        return self.raw_path.read_bytes()

    def files(self):
        """Every file of the case (images, backing and data files), resolved."""
        return {str(p.resolve()) for p in self.path.parent.rglob("*") if p.is_file()}


def common_workload(c, size):
    """The C++ oracle suite's workload over the first 16 clusters (c = cluster size) and the
    end of the disk (tests/test_oracle.cpp, common_workload)."""
    return [
        f"write -P 0x11 {c // 2 + 3} {2 * c + 100}",
        f"write -P 0x22 {4 * c - 7} 14",
        f"write -z {c + 100} {c // 3}",
        f"write -z {4 * c + c // 4} {c // 2}",
        f"write -z {5 * c} {2 * c}",
        f"write -P 0x33 {7 * c} {3 * c}",
        f"discard {8 * c} {c}",
        f"write -P 0x55 {8 * c + c // 4} {c // 2}",
        f"write -P 0x44 {10 * c} {2 * c}",
        f"write -z {10 * c + c // 2} {c}",
        f"write -P 0x66 {12 * c} {c}",
        f"discard {12 * c + c // 2} {c // 2}",
        f"write -P 0x77 {13 * c} {c}",
        f"write -P 0x78 {13 * c + 1} {c - 2}",
        f"write -P 0x99 {size - 5000} 5000",
        f"write -P 0x9a {size // 2 + 333} {3 * c + 1000}",
        f"discard {size // 2 + c} {c}",
    ]


def subcluster_workload(c):
    """Subcluster work for extended L2 in clusters 14..15 (test_oracle.cpp)."""
    sc = c // 32
    base = 14 * c
    return [
        f"write -P 0xa1 {base + 3 * sc + 17} {2 * sc}",
        f"write -P 0xa2 {base + 10 * sc} {sc}",
        f"write -z {base + 20 * sc} {3 * sc}",
        f"write -z {base + 3 * sc + 100} {sc // 2}",
        f"write -P 0xa3 {base + 31 * sc + 5} {2 * sc}",
        f"discard {base + 10 * sc} {sc}",
        f"write -P 0xa4 {base + 15 * c // 16} 1",
    ]


def mixed_raw(path, mebibytes):
    """Random bytes, text, zeros and runs of one byte, a MiB each in turn (compressible in
    parts, like test_compressed.cpp's make_mixed_raw)."""
    rng = random.Random(1234)
    text = b"The quick brown fox jumps over the lazy dog; qcow2 cluster "
    chunks = []
    for mib in range(mebibytes):
        kind = mib % 4
        if kind == 0:
            chunks.append(rng.randbytes(MiB))
        elif kind == 1:
            chunks.append((text * (MiB // len(text) + 1))[mib : mib + MiB])
        elif kind == 2:
            chunks.append(bytes(MiB))
        else:
            block = bytearray([mib & 0xFF]) * MiB
            for _ in range(64):
                block[rng.randrange(MiB)] = rng.randrange(256)
            chunks.append(bytes(block))
    path.write_bytes(b"".join(chunks))
    return path


def oracle_cases():
    """(name, create options, size, qemu-io commands): test_oracle.cpp's oracle_cases()."""
    cases = []

    def add(name, options, size, c, extra=()):
        cases.append((name, options, size, common_workload(c, size) + list(extra)))

    add("v2_64k", "compat=0.10", 4 * MiB, 64 * KiB)
    add("v2_4k", "compat=0.10,cluster_size=4k", 2 * MiB, 4 * KiB)
    add("v3_512", "compat=1.1,cluster_size=512", 2 * MiB, 512)
    add("v3_4k", "compat=1.1,cluster_size=4k", 4 * MiB, 4 * KiB)
    add("v3_64k", "compat=1.1,cluster_size=64k", 4 * MiB, 64 * KiB)
    add("v3_2M", "compat=1.1,cluster_size=2M", 32 * MiB, 2 * MiB)
    add("xl2_16k", "extended_l2=on,cluster_size=16k", 2 * MiB, 16 * KiB, subcluster_workload(16 * KiB))
    add("xl2_64k", "extended_l2=on,cluster_size=64k", 4 * MiB, 64 * KiB, subcluster_workload(64 * KiB))
    add("xl2_2M", "extended_l2=on,cluster_size=2M", 32 * MiB, 2 * MiB, subcluster_workload(2 * MiB))
    add("refcount1_4k", "refcount_bits=1,cluster_size=4k", 2 * MiB, 4 * KiB)
    add("refcount64_64k", "refcount_bits=64", 4 * MiB, 64 * KiB)
    add("prealloc_metadata", "preallocation=metadata", 4 * MiB, 64 * KiB)
    add(
        "prealloc_metadata_xl2",
        "preallocation=metadata,extended_l2=on,cluster_size=32k",
        2 * MiB,
        32 * KiB,
        subcluster_workload(32 * KiB),
    )
    add("prealloc_falloc", "preallocation=falloc", 4 * MiB, 64 * KiB)
    add("prealloc_full", "preallocation=full", 4 * MiB, 64 * KiB)
    c = 64 * KiB
    add(
        "compressed_zlib",
        "compression_type=zlib",
        4 * MiB,
        c,
        [f"write -c -P 0xc1 {20 * c} {2 * c}", f"write -c -P 0xc2 {24 * c} {c}", f"write -P 0xc3 {21 * c + 100} 50"],
    )
    add(
        "compressed_zstd",
        "compression_type=zstd",
        4 * MiB,
        c,
        [f"write -c -P 0xd1 {20 * c} {2 * c}", f"write -c -P 0xd2 {30 * c} {c}", f"write -z {30 * c + 4096} 4096"],
    )
    odd = 1000448
    cases.append(
        (
            "odd_size_64k",
            "cluster_size=64k",
            1000000,
            [
                "write -P 0xe1 1000 70000",
                "write -z 196608 65536",
                "write -P 0xe2 300000 123457",
                "discard 458752 65536",
                f"write -P 0xe3 {odd - 1448 - 20000} 20000",
                f"write -P 0xcc 999000 {odd - 999000}",
                "write -z 999500 100",
            ],
        )
    )
    return cases


def build_case(name, root):
    """Builds case `name` in its own directory under `root`; returns the Case (raw_path unset)."""
    d = root / name
    d.mkdir()
    qcow2 = ["-f", "qcow2"]
    for case_name, options, size, io in oracle_cases():
        if case_name == name:
            path = d / "disk.qcow2"
            make_image(path, options, size, io)
            return Case(name, path, qemu_source=qcow2 + [str(path)], qemu_map_source=qcow2 + [str(path)])

    if name in ("converted_zlib", "converted_zstd", "converted_xl2_zstd"):
        source = mixed_raw(d / "mixed.raw.src", 8)
        options = {
            "converted_zlib": "cluster_size=64k",
            "converted_zstd": "cluster_size=64k,compression_type=zstd",
            "converted_xl2_zstd": "cluster_size=64k,extended_l2=on,compression_type=zstd",
        }[name]
        path = d / "disk.qcow2"
        run(["qemu-img", "convert", "-c", "-O", "qcow2", "-o", options, str(source), str(path)])
        source.unlink()
        return Case(name, path, qemu_source=qcow2 + [str(path)], qemu_map_source=qcow2 + [str(path)])

    qcow = ["-f", "qcow"]
    if name == "v1_plain":
        path = d / "disk.qcow"
        run(["qemu-img", "create", "-q", "-f", "qcow", str(path), "4M"])
        # v1 compressed writes must be exactly one cluster (4 KiB here).
        qemu_io(
            path,
            ["write -P 0xab 4k 8k", "write -c -P 0x12 1M 4k", "write -c -P 0x13 1028k 4k",
             "write -P 0xcd 3M 100k", "write -P 0xce 4190000 4304"],
            fmt="qcow",
        )
        return Case(name, path, qemu_source=qcow + [str(path)], qemu_map_source=qcow + [str(path)])
    if name == "v1_converted_zlib":
        source = mixed_raw(d / "mixed.raw.src", 4)
        path = d / "disk.qcow"
        # qemu-img 7.2 exits 1 here although the image is complete: compare checks it.
        run(["qemu-img", "convert", "-c", "-O", "qcow", str(source), str(path)], check=False)
        run(["qemu-img", "compare", "-f", "raw", "-F", "qcow", str(source), str(path)])
        source.unlink()
        return Case(name, path, qemu_source=qcow + [str(path)], qemu_map_source=qcow + [str(path)])

    if name.startswith("chain_"):
        # test_layers.cpp make_three_layers: raw base (8M) < qcow2 mid (6M) < qcow2 top (10M),
        # relative backing names.
        base, mid, top = d / "base.raw", d / "mid.qcow2", d / "top.qcow2"
        run(["truncate", "-s", "8M", str(base)])
        qemu_io(
            base,
            ["write -P 0x11 0 1M", "write -P 0x12 3M 512k", "write -z 3M 64k",
             "write -P 0x13 7M 1M", "discard 7M 256k", "write -P 0x14 5000k 3000"],
            fmt="raw",
        )
        run("qemu-img create -q -f qcow2 -b base.raw -F raw mid.qcow2 6M", cwd=d)
        qemu_io(mid, ["write -P 0x21 512k 1M", "write -z 3200k 100k", "discard 0 64k",
                      "write -P 0x22 5M 1M", "write -P 0x23 6000k 7"])
        run("qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=32k -b mid.qcow2 -F qcow2 top.qcow2 10M", cwd=d)
        qemu_io(top, ["write -P 0x31 100k 33k", "write -z 5M 128k", "discard 512k 64k",
                      "write -P 0x32 9M 500k", "write -P 0x33 6000k 10k", "write -P 0x34 10239k 1k"])
        if name == "chain_top":
            return Case(name, top, qemu_source=qcow2 + [str(top)], qemu_map_source=qcow2 + [str(top)])
        if name == "chain_mid":
            return Case(name, mid, qemu_source=qcow2 + [str(mid)], qemu_map_source=qcow2 + [str(mid)])
        if name == "chain_top_no_backing":
            spec = "json:" + json.dumps(
                {"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": str(top)}}
            )
            return Case(
                name, top, open_kwargs={"backing": False}, qemu_source=[spec], qemu_map_source=[spec],
                cli_args=["--backing=none"],
            )

    if name.startswith("data_file_"):
        raw_flag = "on" if name == "data_file_raw" else "off"
        path = d / "disk.qcow2"
        # qemu 7.2 resolves a relative data file name against its cwd: run it from the image's.
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file=disk-data.raw,data_file_raw={raw_flag}",
             "disk.qcow2", "4M"], cwd=d)
        qemu_io(
            path,
            ["write -P 0x41 0 200k", "write -z 64k 64k", "discard 128k 64k", "write -P 0x42 1M 1M",
             "write -z 3M 128k", "write -P 0x43 3500k 3k", "write -P 0x44 4000k 5"],
            cwd=d,
        )
        if name == "data_file_moved":
            (d / "elsewhere").mkdir()
            moved = d / "elsewhere" / "moved.raw"
            (d / "disk-data.raw").rename(moved)
            spec = "json:" + json.dumps(
                {"driver": "qcow2", "file": {"driver": "file", "filename": str(path)},
                 "data-file": {"driver": "file", "filename": str(moved)}}
            )
            return Case(
                name, path, open_kwargs={"data_file": str(moved)}, qemu_source=[spec], qemu_map_source=[spec],
                cli_args=[f"--data-file={moved}"],
            )
        return Case(name, path, qemu_source=qcow2 + ["disk.qcow2"], qemu_map_source=qcow2 + ["disk.qcow2"], qemu_cwd=d)

    if name.startswith("snapshot_"):
        # test_layers.cpp: snapshots of zstd/extended-L2 images, picked by name or by ID.
        path = d / "disk.qcow2"
        make_image(path, "cluster_size=64k,compression_type=zstd,extended_l2=on", "4M",
                   ["write -P 0x51 0 1M", "write -c -P 0x52 2M 128k", "write -z 3M 64k"])
        run(["qemu-img", "snapshot", "-c", "first", str(path)])
        qemu_io(path, ["write -P 0x53 512k 1M", "discard 2M 64k", "write -P 0x54 3M 4k"])
        run(["qemu-img", "snapshot", "-c", "second", str(path)])
        qemu_io(path, ["write -P 0x55 0 4M"])
        which = {"snapshot_first": "first", "snapshot_second_by_id": "2"}[name]
        key = "snapshot.name=first" if which == "first" else "snapshot.id=2"
        return Case(
            name, path, open_kwargs={"snapshot": which}, qemu_source=["-f", "qcow2", "-l", key, str(path)],
            qemu_map_source=None, cli_args=[f"--snapshot={which}"],
        )

    raise KeyError(name)


IMAGE_CASES = [c[0] for c in oracle_cases()] + [
    "converted_zlib",
    "converted_zstd",
    "converted_xl2_zstd",
    "v1_plain",
    "v1_converted_zlib",
    "chain_top",
    "chain_mid",
    "chain_top_no_backing",
    "data_file_plain",
    "data_file_raw",
    "data_file_moved",
    "snapshot_first",
    "snapshot_second_by_id",
]


class CaseCache:
    """Builds each case once per session, with qemu's raw bytes and map beside it."""

    def __init__(self, root):
        self.root = root
        self.cases = {}

    def get(self, name):
        if name not in self.cases:
            case = build_case(name, self.root)
            case.raw_path = self.root / (name + ".qemu.raw")
            run(["qemu-img", "convert", *case.qemu_source, "-O", "raw", str(case.raw_path)], cwd=case.qemu_cwd)
            self.cases[name] = case
        return self.cases[name]


@pytest.fixture(scope="session")
def case_cache(tmp_path_factory):
    return CaseCache(tmp_path_factory.mktemp("cases"))


@pytest.fixture(params=IMAGE_CASES)
def case(request, case_cache):
    return case_cache.get(request.param)


def qemu_map(case):
    """`qemu-img map --output=json` of the case, parsed."""
    out = run(["qemu-img", "map", "--output=json", *case.qemu_map_source], cwd=case.qemu_cwd).stdout
    return json.loads(out)


def buffer_address(view):
    """The address of the first byte of a buffer (ctypes over PyObject_GetBuffer: works for
    read-only buffers, which ctypes' from_buffer refuses)."""
    import ctypes

    class Py_buffer(ctypes.Structure):
        _fields_ = [
            ("buf", ctypes.c_void_p),
            ("obj", ctypes.c_void_p),
            ("len", ctypes.c_ssize_t),
            ("itemsize", ctypes.c_ssize_t),
            ("readonly", ctypes.c_int),
            ("ndim", ctypes.c_int),
            ("format", ctypes.c_char_p),
            ("shape", ctypes.c_void_p),
            ("strides", ctypes.c_void_p),
            ("suboffsets", ctypes.c_void_p),
            ("internal", ctypes.c_void_p),
        ]

    buf = Py_buffer()
    get = ctypes.pythonapi.PyObject_GetBuffer
    get.argtypes = [ctypes.py_object, ctypes.POINTER(Py_buffer), ctypes.c_int]
    if get(view, ctypes.byref(buf), 0) != 0:
        raise RuntimeError("PyObject_GetBuffer failed")
    try:
        return buf.buf, buf.len, bool(buf.readonly)
    finally:
        release = ctypes.pythonapi.PyBuffer_Release
        release.argtypes = [ctypes.POINTER(Py_buffer)]
        release(ctypes.byref(buf))


def file_mappings():
    """This process's file mappings: [(start, end, file offset, path)] from /proc/self/maps."""
    out = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split(None, 5)
            if len(parts) < 6 or not parts[5].startswith("/"):
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append((start, end, int(parts[2], 16), parts[5].rstrip("\n")))
    return out


def mapping_of(address, length):
    """(path, file offset) of the file mapping holding [address, address + length), or None."""
    for start, end, offset, path in file_mappings():
        if start <= address and address + length <= end:
            return path, offset + (address - start)
    return None


def shell(args):
    return " ".join(shlex.quote(str(a)) for a in args)


def wait_for_writer_lock(path):
    """Waits until a writer (qemu-io started just before) holds its locks on `path`: first until
    /proc/locks lists a lock on the file, and only then asks qemu-img info, which is refused
    once the writer holds them. Asking qemu-img while the writer starts races it: qemu-img's
    own brief lock can make the writer's fail (tests/support.cpp, wait_for_writer_lock)."""
    inode = f":{os.stat(path).st_ino} "
    for _ in range(600):
        with open("/proc/locks") as f:
            if inode in f.read():
                info = subprocess.run(["qemu-img", "info", str(path)], capture_output=True, text=True)
                return info.returncode != 0 and "lock" in info.stderr
        time.sleep(0.05)
    return False

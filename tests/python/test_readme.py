"""README.md's Python section: the example between the python-example markers runs on an image
made with qemu-io and prints what it should; the build-tree import command works with the
module's interpreter and with the `python3` first on PATH."""

import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from conftest import make_image, run

SOURCE_ROOT = pathlib.Path(os.environ.get("QCOWMAP_SOURCE_ROOT", pathlib.Path(__file__).parents[2]))


def readme_example():
    text = (SOURCE_ROOT / "README.md").read_text()
    found = re.search(
        r"<!-- python-example:begin -->\n```python\n(.*?)```\n<!-- python-example:end -->", text, re.S
    )
    assert found, "README.md has no python-example block"
    return found.group(1)


def test_readme_example_runs(tmp_path):
    image = tmp_path / "vm.qcow2"
    make_image(image, "", "4M", ["write -P 0x5a 0 64k", "write -z 1M 64k", "write -c -P 0x77 2M 64k"])
    raw = tmp_path / "qemu.raw"
    run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)])
    digest = hashlib.sha256(raw.read_bytes()).hexdigest()
    (tmp_path / "example.py").write_text(readme_example())
    out = subprocess.run(
        [sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout
    assert out.splitlines() == [
        "4194304 65536 zlib",
        "0 65536 data True 0",
        "65536 983040 zero False 0",
        "1048576 65536 zero True 0",
        "1114112 983040 zero False 0",
        "2097152 65536 compressed True 0",
        "2162688 2031616 zero False 0",
        f"sha256 {digest} True",
        "b'ZZZZ'",
        "not_qcow2 | disk.raw: not a qcow2 image (bad magic 0x5a5a5a5a, expected 0x514649fb)",
    ]
    assert (tmp_path / "disk.raw").read_bytes() == raw.read_bytes()


def import_command():
    """The README's build-tree command, `PYTHONPATH=build/python python3 -c '...'`."""
    text = (SOURCE_ROOT / "README.md").read_text()
    found = re.search(r"^PYTHONPATH=build/python python3 -c '([^']*)'", text, re.M)
    assert found, "README.md lost its build-tree import command"
    return found.group(1)


def build_tree_python_path():
    path = os.environ.get("PYTHONPATH", "").split(os.pathsep)[0]
    assert (pathlib.Path(path) / "qcowmap" / "__init__.py").exists(), path
    return path


def test_build_tree_import_with_the_module_interpreter():
    import qcowmap

    env = dict(os.environ, PYTHONPATH=build_tree_python_path())
    out = subprocess.run([sys.executable, "-c", import_command()], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == qcowmap.__version__ != "unknown"


def test_build_tree_import_with_python3_on_path():
    import importlib.machinery

    import qcowmap

    python3 = shutil.which("python3")
    if not python3:
        pytest.skip("no python3 on PATH")
    extension = pathlib.Path(qcowmap._qcowmap.__file__).name
    suffix = extension[len("_qcowmap") :]
    probe = subprocess.run(
        [python3, "-c", "import importlib.machinery, sys; print(sys.version.split()[0]); print(' '.join(importlib.machinery.EXTENSION_SUFFIXES))"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()
    if suffix not in probe[1].split():
        pytest.skip(f"{python3} is Python {probe[0]}, which does not load {suffix} modules: build with -Dpython_interpreter={python3}")
    env = dict(os.environ, PYTHONPATH=build_tree_python_path())
    out = subprocess.run([python3, "-c", import_command()], env=env, capture_output=True, text=True)
    assert out.returncode == 0, (python3, probe[0], out.stderr)
    assert out.stdout.strip() == qcowmap.__version__

#!/usr/bin/env bash
# Installs everything qcowmap needs to build, test, benchmark and demo on Debian 12, from
# Debian's own packages. Safe to run again.
set -euo pipefail

packages=(
  g++ meson ninja-build pkg-config
  libboost-iostreams-dev libfmt-dev libcli11-dev zlib1g-dev libzstd-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  libssl-dev libxxhash-dev libdeflate-dev libisal-dev
  qemu-utils time xxhash libnbd-bin nbdkit nbdkit-plugin-dev
  clang libclang-rt-14-dev clang-format git
  python3  # tests/test_cli.cpp compares JSON documents with it
  python3-dev pybind11-dev python3-pybind11 python3-pytest
  fuse3 libfuse3-dev
  bindfs  # tests: atomic outputs on a FUSE file system without O_TMPFILE or RENAME_NOREPLACE
  e2fsprogs  # tests: mkfs.ext4, debugfs and e2fsck on the writable mount (mount --rw)
  python3-libqcow  # python/bench_hash.py: libqcow's pyqcow, the copying peer the extents are timed against
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
  echo "install-deps: all packages present"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "install-deps: run as root (or install sudo)" >&2; exit 1; }
  SUDO=sudo
fi
echo "install-deps: installing ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-deps: done"

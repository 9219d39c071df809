#!/usr/bin/env bash
# The demo: install dependencies, build, make a sample image with qemu-img/qemu-io, and run
# qcowmap info, map and convert on it (checking the result against qemu-img).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { echo "demo: $*"; }
seconds() { echo $(($(date +%s) - $1)); }

step "installing the Debian packages qcowmap needs (scripts/install-deps.sh)..."
./scripts/install-deps.sh
started=$(date +%s)
if [ ! -d build ]; then
  step "configuring the build in build/ (meson setup)..."
  meson setup build --buildtype=release -Dtests=false -Dbench=false >/dev/null
fi
# Only the CLI: a few minutes on 2 cores the first time (the library's ~25 files and the CLI's
# ~12 compile in release mode), seconds afterwards.
step "building the qcowmap CLI (ninja -C build apps/qcowmap; a few minutes the first time on 2 cores)..."
if ! ninja -C build apps/qcowmap 2>&1 | tee build/demo-build.log |
  sed -un 's/^\[\([0-9]*\/[0-9]*\)\].*/\1/p' | while read -r n; do
    printf '\rdemo: compiled %s steps' "$n"
  done; then
  echo
  tail -30 build/demo-build.log >&2
  exit 1
fi
echo
qcowmap=build/apps/qcowmap
step "built $qcowmap in $(seconds "$started") s"

step "making a sample image demo/sample.qcow2 with qemu-img and qemu-io..."
mkdir -p demo
img=demo/sample.qcow2
rm -f "$img" demo/sample.raw demo/sample.qemu.raw
qemu-img create -q -f qcow2 -o cluster_size=64k "$img" 64M
qemu-io -f qcow2 \
  -c "write -P 0xab 0 1M" \
  -c "write -P 0xcd 8M 300k" \
  -c "write -z 16M 4M" \
  -c "write -P 0xef 40M 64k" \
  -c "discard 8M 64k" \
  "$img" >/dev/null

step "running qcowmap on it (each command shown with +):"
set -x
"$qcowmap" info "$img"
"$qcowmap" map "$img"
"$qcowmap" map --output=json "$img"
"$qcowmap" convert -p "$img" demo/sample.raw
{ set +x; } 2>/dev/null

step "checking the raw copy against qemu-img convert -O raw..."
qemu-img convert -O raw "$img" demo/sample.qemu.raw
if cmp -s demo/sample.raw demo/sample.qemu.raw; then
  echo "demo: qcowmap convert output is byte-identical to qemu-img convert -O raw"
else
  echo "demo: MISMATCH between qcowmap and qemu-img output" >&2
  exit 1
fi
echo "demo: sparse output uses $(du -k demo/sample.raw | cut -f1) KiB on disk for $(stat -c %s demo/sample.raw) bytes"

#!/usr/bin/env bash
# The demo: install dependencies, build, make a sample image with qemu-img/qemu-io, and run
# qcowmap info, map and convert on it (checking the result against qemu-img).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh
[ -d build ] || meson setup build --buildtype=release -Dtests=false -Dbench=false >/dev/null
ninja -C build apps/qcowmap >/dev/null
qcowmap=build/apps/qcowmap

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

set -x
"$qcowmap" info "$img"
"$qcowmap" map "$img"
"$qcowmap" map --output=json "$img"
"$qcowmap" convert -p "$img" demo/sample.raw
{ set +x; } 2>/dev/null

qemu-img convert -O raw "$img" demo/sample.qemu.raw
if cmp -s demo/sample.raw demo/sample.qemu.raw; then
  echo "demo: qcowmap convert output is byte-identical to qemu-img convert -O raw"
else
  echo "demo: MISMATCH between qcowmap and qemu-img output" >&2
  exit 1
fi
echo "demo: sparse output uses $(du -k demo/sample.raw | cut -f1) KiB on disk for $(stat -c %s demo/sample.raw) bytes"

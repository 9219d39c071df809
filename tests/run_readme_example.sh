#!/bin/sh
# Runs the README's example program on an image made by qemu-img and checks its output.
set -eu
example=$1
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
qemu-img create -q -f qcow2 "$dir/disk.qcow2" 1M
qemu-io -f qcow2 -c "write -P 0xab 64k 4k" "$dir/disk.qcow2" >/dev/null
out=$("$example" "$dir/disk.qcow2")
echo "$out"
echo "$out" | grep -Eq "65536 [+]65536 +data$" || { echo "missing data extent"; exit 1; }
echo "$out" | grep -q "65536 data bytes mapped; 65536 stored bytes in the first half; read 4096 bytes at offset 0" || { echo "bad summary"; exit 1; }

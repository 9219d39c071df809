#!/bin/sh
# Builds a tiny consumer project that pulls qcowmap in as a Meson subproject (qcowmap_dep via
# meson.override_dependency), its meson.build copied from README.md's snippet, and runs its two
# example programs on a qemu-img image; then checks that the headers refuse C++17 with one
# clear #error.
#   subproject.sh SOURCE_ROOT
set -eu
source_root=$(cd "$1" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
mkdir -p "$tmp/consumer/subprojects"
# The consumer's meson.build is README's block, as a reader would copy it.
awk '/^<!-- tests\/install\/subproject.sh builds the next block/ { armed = 1; next }
     armed && /^```meson$/ { inside = 1; next }
     inside && /^```$/ { exit }
     inside { print }' "$source_root/README.md" >"$tmp/consumer/meson.build"
grep -q "dependency('qcowmap'" "$tmp/consumer/meson.build" ||
  fail "README.md has no subproject block after the marker"
cp "$source_root/examples/read_extents.cpp" "$source_root/examples/read_disk.c" "$tmp/consumer/"
ln -s "$source_root" "$tmp/consumer/subprojects/qcowmap"
# --force-fallback-for: use the subproject even where an installed qcowmap.pc exists.
meson setup "$tmp/build" "$tmp/consumer" --force-fallback-for=qcowmap >"$tmp/setup.log" 2>&1 ||
  { cat "$tmp/setup.log"; fail "meson setup of the consumer failed"; }
grep -q "Dependency qcowmap found: YES .* (overridden)" "$tmp/setup.log" ||
  { cat "$tmp/setup.log"; fail "qcowmap_dep did not come from the subproject"; }
ninja -C "$tmp/build" read_extents read_disk >"$tmp/build.log" 2>&1 ||
  { tail -30 "$tmp/build.log"; fail "consumer build failed"; }
cd "$tmp"
qemu-img create -q -f qcow2 disk.qcow2 1M
qemu-io -f qcow2 -c "write -P 0xab 64k 4k" disk.qcow2 >/dev/null
qemu-img convert -O raw disk.qcow2 disk.raw
out=$("$tmp/build/read_extents" disk.qcow2)
echo "$out"
echo "$out" | grep -Eq "65536 [+]65536 +data$" || fail "read_extents: missing data extent"
"$tmp/build/read_disk" disk.qcow2 >out.raw 2>err.txt || { cat err.txt; fail "read_disk failed"; }
cmp out.raw disk.raw || fail "read_disk: bytes differ from qemu-img convert"
# Below C++20 the headers say so in one line, instead of pages of template errors.
if echo '#include <qcowmap/result.hpp>' |
  c++ -std=c++17 -fsyntax-only -x c++ -I "$source_root/lib/include" - 2>"$tmp/cxx17.txt"; then
  fail "a C++17 compile of <qcowmap/result.hpp> succeeded"
fi
grep -m1 'error:' "$tmp/cxx17.txt" | grep -q "needs C++20" ||
  { cat "$tmp/cxx17.txt"; fail "the first error is not the #error about C++20"; }
echo "subproject test: ok"

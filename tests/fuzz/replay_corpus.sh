#!/bin/sh
# Builds a seed corpus of small images of every kind with qemu-img/qemu-io (plus byte-flipped
# variants of each), then replays it and the checked-in regression inputs through a fuzz
# target's replay driver.
set -eu
driver=$1
srcdir=$2
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT

io() { img=$1; shift; for c in "$@"; do set -- "$@" -c "$c"; shift; done; qemu-io -f qcow2 "$@" "$img" >/dev/null; }
n=0
mk() { # mk OPTIONS SIZE [qemu-io commands...]
  n=$((n + 1)); img="$dir/seed$n.qcow2"; opts=$1; size=$2; shift 2
  qemu-img create -q -f qcow2 ${opts:+-o "$opts"} "$img" "$size"
  [ $# -eq 0 ] || io "$img" "$@"
}
mk "" 1M "write -P 0xab 64k 4k" "write -z 256k 64k" "discard 512k 64k"
mk "compat=0.10,cluster_size=4k" 1M "write -P 1 0 8k"
mk "cluster_size=512" 256k "write -P 2 1k 3k" "write -z 8k 4k"
mk "extended_l2=on,cluster_size=64k" 1M "write -P 3 4k 4k" "write -z 16k 2k"
mk "cluster_size=4k" 1M "write -c -P 4 0 4k" "write -c -P 5 64k 8k"
mk "compression_type=zstd,cluster_size=4k" 1M "write -c -P 6 0 4k"
mk "preallocation=metadata,cluster_size=4k" 256k "write -P 7 8k 4k"
mk "refcount_bits=1" 1M "write -P 8 0 64k"
mk "" 1000
# Legacy qcow version 1, plain and compressed clusters (compressed writes are one cluster).
n=$((n + 1)); qemu-img create -q -f qcow "$dir/seed$n.qcow2" 1M
qemu-io -f qcow -c "write -P 9 4k 8k" -c "write -c -P 10 64k 4k" "$dir/seed$n.qcow2" >/dev/null

# Internal snapshots and persistent bitmaps (snapshot table and bitmap directory targets).
mk "cluster_size=4k" 1M "write -P 11 0 8k"
qemu-img snapshot -c s1 "$img"; io "$img" "write -P 12 0 4k"; qemu-img snapshot -c second "$img"
mk "cluster_size=4k" 1M "write -P 13 0 8k"
qemu-img bitmap --add "$img" b0; qemu-img bitmap --add -g 8192 "$img" b1; io "$img" "write -P 14 64k 64k"
# Backing chains for the in-memory resolver target: files joined by "\n--\n", named f0, f1...
# (overlay on qcow2, overlay on raw, a loop f0 -> f1 -> f0 and a self-loop f0 -> f0).
chain() { # chain OUT FILES...
  out=$1; shift; first=1; : > "$out"
  for f in "$@"; do [ $first -eq 1 ] || printf '\n--\n' >> "$out"; first=0; cat "$f" >> "$out"; done
}
mkdir -p "$dir/c" && (
  cd "$dir/c"
  qemu-img create -q -f qcow2 -o cluster_size=4k f1 256k && qemu-io -f qcow2 -c "write -P 21 0 8k" f1 >/dev/null
  qemu-img create -q -f qcow2 -o cluster_size=4k -b f1 -F qcow2 f0 256k && qemu-io -f qcow2 -c "write -P 22 4k 4k" f0 >/dev/null
  head -c 65536 /dev/zero | tr '\0' '\27' > r1
  qemu-img create -q -f qcow2 -o cluster_size=4k -b f1 -F raw o0 64k
  qemu-img create -q -f qcow2 -o cluster_size=4k -u -b f1 -F qcow2 l0 256k
  qemu-img create -q -f qcow2 -o cluster_size=4k -u -b f0 -F qcow2 l1 256k
  qemu-img create -q -f qcow2 -o cluster_size=4k -u -b f0 -F qcow2 s0 256k
)
n=$((n + 1)); chain "$dir/seed$n.qcow2" "$dir/c/f0" "$dir/c/f1"
n=$((n + 1)); chain "$dir/seed$n.qcow2" "$dir/c/o0" "$dir/c/r1"
n=$((n + 1)); chain "$dir/seed$n.qcow2" "$dir/c/l0" "$dir/c/l1"
n=$((n + 1)); chain "$dir/seed$n.qcow2" "$dir/c/s0"

mkdir -p "$dir/flipped"
for seed in "$dir"/seed*.qcow2; do
  # Keep seeds small: the metadata lives in the first clusters.
  head -c 262144 "$seed" > "$seed.head"
  size=$(wc -c < "$seed.head")
  i=0
  while [ $i -lt 24 ]; do
    out="$dir/flipped/$(basename "$seed").$i"
    cp "$seed.head" "$out"
    off=$(( (i * 2654435761 + 97) % (size < 4096 ? size : 4096) ))
    printf '\377' | dd of="$out" bs=1 seek=$off conv=notrunc status=none
    i=$((i + 1))
  done
done

# Reference names for the untrusted-resolution target (fuzz_references resolves them in its
# own directory tree); the other targets see them as tiny junk files.
mkdir -p "$dir/names"
i=0
for name in a.raw sub/b.raw sub/deeper/c.raw link-in sub/up-in link-out sub/up-out abs proc \
    loop1 dirlink/b.raw fifo ../x sub/../a.raw a.raw/ ./a.raw sub/./deeper/../b.raw \
    sub/deeper/../../a.raw dirlink/../a.raw; do
  i=$((i + 1)); printf '%s' "$name" > "$dir/names/name$i"
done

# QCOWMAP_CORPUS_OUT=DIR keeps the generated seeds (heads only) for a libFuzzer run.
if [ -n "${QCOWMAP_CORPUS_OUT:-}" ]; then
  mkdir -p "$QCOWMAP_CORPUS_OUT"
  for seed in "$dir"/seed*.qcow2.head "$dir"/names/name*; do cp "$seed" "$QCOWMAP_CORPUS_OUT/"; done
fi

set -- "$dir"
[ -d "$srcdir/regressions" ] && set -- "$@" "$srcdir/regressions"
"$driver" "$@"

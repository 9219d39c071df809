#!/usr/bin/env bash
# In-place writes (issue 27), side by side in one run: qcowmap's WritableImage (through
# bench_write run) against `qemu-img bench -w` and qemu-io with the same pattern and cache mode,
# and a Python write loop against the C++ one. Every run writes into a fresh copy of its image
# (copied outside the timed part) and ends with the image closed: both tools flush (fdatasync)
# on close, so the figures include getting everything to disk. Cache mode: the page cache
# (qemu's -t writeback; qcowmap has no O_DIRECT mode), qemu-img bench with its default queue
# depth (64) and thread pool AIO.
#
#   seq 1M new      1024 writes of 1 MiB from offset 0 into a new 4 GiB image
#   step 4K new     20000 writes of 4 KiB at offsets i * 1028 KiB (qemu-img bench -S: every
#                   write allocates a new cluster, the closest qemu-img bench has to random)
#   rand 4K new     20000 writes of 4 KiB at seeded random offsets (qemu-io runs the same
#                   offsets from a script; qemu-img bench has no random pattern)
#   seq 1M zlib     512 writes of 1 MiB into a 1 GiB image made by qemu-img convert -c
#   rand 4K backed  5000 random 4 KiB writes into an empty overlay over a full 1 GiB base
#                   (each write copies its cluster's other 60 KiB up from the base)
#   python seq 1M   the seq 1M workload from a Python loop (qcowmap.open(writable=True), write)
#
# usage: bench/inplace-compare.sh [BENCH_WRITE] [WORKDIR]   (env RUNS, default 5)
# Called by bench/compare-qemu.sh; runs alone too.
set -euo pipefail
shopt -s inherit_errexit

BENCH_WRITE=${1:-./build/bench/bench_write}
WORKDIR=${2:-/var/tmp/qcowmap-bench}
RUNS=${RUNS:-5}
PYTHON=${PYTHON:-/usr/bin/python3}
die() { echo "inplace-compare.sh: $*" >&2; exit 1; }
[[ -x $BENCH_WRITE ]] || die "'$BENCH_WRITE' is not an executable (build with -Dbench=true)"
BENCH_WRITE=$(realpath "$BENCH_WRITE")
BUILD_PYTHON=$(dirname "$(dirname "$BENCH_WRITE")")/python
mkdir -p "$WORKDIR"
WORK=$WORKDIR/inplace-work.qcow2
SCRIPT=$WORKDIR/inplace-qemu-io.txt
trap 'rm -f "$WORK" "$WORK.data" "$SCRIPT"' EXIT

NEW=$WORKDIR/inplace-new-4G.qcow2
ZLIB=$WORKDIR/inplace-zlib-1G.qcow2
BASE=$WORKDIR/inplace-base-1G.qcow2
OVERLAY=$WORKDIR/inplace-overlay-1G.qcow2
[[ -f $NEW ]] || qemu-img create -q -f qcow2 "$NEW" 4G
if [[ ! -f $ZLIB ]]; then
    (set +o pipefail; yes 'qcowmap in-place writing benchmark line of text 0123456789' |
        head -c 1G >"$ZLIB.raw")
    qemu-img convert -c -f raw -O qcow2 "$ZLIB.raw" "$ZLIB"
    rm -f "$ZLIB.raw"
fi
if [[ ! -f $OVERLAY ]]; then
    qemu-img create -q -f qcow2 "$BASE" 1G
    qemu-io -f qcow2 -t writeback -c 'write -P 0x5a 0 1G' "$BASE" >/dev/null
    qemu-img create -q -f qcow2 -b "$BASE" -F qcow2 "$OVERLAY"
fi

. "$(dirname "${BASH_SOURCE[0]}")/stats.sh" # median, range
# Seconds taken by "$@" run on a fresh copy of $1 (the copy is made before the clock starts).
timed_on_copy() {
    local template=$1 t0 t1
    shift
    cp "$template" "$WORK"
    sync "$WORK"
    t0=$EPOCHREALTIME
    "$@" >/dev/null
    t1=$EPOCHREALTIME
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.6f\n", b - a }'
}

ours() { "$BENCH_WRITE" run "$1" "$WORK" "$2"; }
qemu_bench() { qemu-img bench -w -t writeback "$@" "$WORK"; }
qemu_io_script() { qemu-io -f qcow2 -t writeback "$WORK" <"$SCRIPT"; }
python_seq() {
    PYTHONPATH=$BUILD_PYTHON "$PYTHON" -c '
import sys, qcowmap
data = b"\xa5" * (1 << 20)
with qcowmap.open(sys.argv[1], writable=True) as img:
    for i in range(int(sys.argv[2])):
        img.write(i << 20, data)
' "$WORK" "$1"
}

rows=()
# $1 label, $2 image, $3 label of the peer, $4 our command (a function and its arguments as one
# string), $5 the peer's: RUNS runs each, alternating which goes first.
row() {
    local label=$1 image=$2 peer=$3 ours_cmd=$4 peer_cmd=$5 i
    local -a a=() b=()
    # Check once (also the warm-up): the result is a valid image holding the written bytes.
    timed_on_copy "$image" $ours_cmd >/dev/null
    qemu-img check -q "$WORK" || die "$label: qemu-img check finds errors after qcowmap's writes"
    for ((i = 0; i < RUNS; i++)); do
        if ((i % 2 == 0)); then
            a+=("$(timed_on_copy "$image" $ours_cmd)")
            b+=("$(timed_on_copy "$image" $peer_cmd)")
        else
            b+=("$(timed_on_copy "$image" $peer_cmd)")
            a+=("$(timed_on_copy "$image" $ours_cmd)")
        fi
    done
    local ma mb
    ma=$(median "${a[@]}")
    mb=$(median "${b[@]}")
    echo "  $label: qcowmap [${a[*]}] $peer [${b[*]}]"
    rows+=("$(awk -v l="$label" -v p="$peer" -v a="$ma" -v b="$mb" 'BEGIN {
        printf "%-16s %9.3f  %-22s %9.3f %7.2f", l, a, p, b, (a > 0 ? b / a : 0) }')")
}

echo "in-place writes, $RUNS runs each (seconds, open to close):"
row "seq 1M new" "$NEW" "qemu-img bench -w" "ours seq1m 1024" "qemu_bench -s 1M -c 1024"
"$BENCH_WRITE" offsets 1073741824 1024 | awk '{ printf "write -P 0xa5 %d 1M\n", (NR - 1) * 1048576 }' >"$SCRIPT"
row "seq 1M new" "$NEW" "qemu-io -t writeback" "ours seq1m 1024" "qemu_io_script"
row "step 4K new" "$NEW" "qemu-img bench -w" "ours step4k:1052672 20000" \
    "qemu_bench -s 4k -S 1052672 -c 20000"
"$BENCH_WRITE" offsets 4294967296 20000 >"$SCRIPT"
row "rand 4K new" "$NEW" "qemu-io -t writeback" "ours rand4k 20000" "qemu_io_script"
row "seq 1M zlib" "$ZLIB" "qemu-img bench -w" "ours seq1m 512" "qemu_bench -s 1M -c 512"
"$BENCH_WRITE" offsets 1073741824 5000 >"$SCRIPT"
row "rand 4K backed" "$OVERLAY" "qemu-io -t writeback" "ours rand4k 5000" "qemu_io_script"
row "step 4K backed" "$OVERLAY" "qemu-img bench -w" "ours step4k:1052672 5000" \
    "qemu_bench -s 4k -S 1052672 -c 5000"
if PYTHONPATH=$BUILD_PYTHON "$PYTHON" -c 'import qcowmap' 2>/dev/null; then
    row "seq 1M python" "$NEW" "(C++, same workload)" "python_seq 1024" "ours seq1m 1024"
fi
echo
echo "median wall time over $RUNS alternating runs; ratio = peer / qcowmap (> 1: qcowmap faster;"
echo "for the python row: C++ / Python, 1.00 = as fast); load average $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-16s %9s  %-22s %9s %7s\n' workload qcowmap peer "peer s" ratio
printf '%s\n' "${rows[@]}"

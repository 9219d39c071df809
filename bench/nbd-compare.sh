#!/usr/bin/env bash
# Times nbdcopy reading a whole virtual disk over NBD from our nbdkit plugin and from qemu-nbd,
# on the same images, and prints median wall times, throughput and their ratio
# (qemu-nbd time / plugin time: above 1 means the plugin is faster).
#
# usage: bench/nbd-compare.sh [PLUGIN] [IMAGE...]
#   PLUGIN  nbdkit-qcowmap-plugin.so (default ./build/apps/nbdkit/nbdkit-qcowmap-plugin.so)
#   IMAGE   qcow2 images; default: dense-1G, frag-4G and zlib-1G .qcow2 from the benchmarks'
#           work directory when present, else a 1 GiB image of random data built once there
# env: RUNS (default 3) timed runs per server and image, alternating; WORKDIR
#      (default /var/tmp/qcowmap-bench); COPY_ARGS extra nbdcopy arguments
# Two ways, each printed as its own table:
#  fresh       every copy starts its own server through socket activation (`nbdcopy -- [ server
#              ... ]`): the server's start-up and first touch of the image are timed too
#  persistent  one long-running server per tool on a Unix socket, one untimed copy first, then
#              the timed copies: what a client of a server that has been up for a while sees
# The data goes to nbdcopy's null: sink, so what is timed is the server side plus the protocol.
# qemu-nbd gets --shared=16 so that nbdcopy can open its 4 multi-conn connections to both.
# Everything is warm in the page cache: one untimed copy of each first.
set -euo pipefail
PLUGIN=${1:-./build/apps/nbdkit/nbdkit-qcowmap-plugin.so}
shift || true
WORKDIR=${WORKDIR:-/var/tmp/qcowmap-bench}
RUNS=${RUNS:-3}
COPY_ARGS=${COPY_ARGS:-}
die() { echo "nbd-compare.sh: $*" >&2; exit 1; }
[[ -f $PLUGIN ]] || die "plugin '$PLUGIN' not found (build it, or pass its path)"
PLUGIN=$(realpath "$PLUGIN")
for tool in nbdkit nbdcopy qemu-nbd qemu-img sha256sum; do
    command -v "$tool" >/dev/null || die "$tool not found"
done

images=("$@")
if [[ ${#images[@]} -eq 0 ]]; then
    for name in dense-1G.qcow2 frag-4G.qcow2 zlib-1G.qcow2; do
        [[ -f $WORKDIR/$name && -f $WORKDIR/$name.done ]] && images+=("$WORKDIR/$name")
    done
    if [[ ${#images[@]} -eq 0 ]]; then
        image=$WORKDIR/nbd-random-1G.qcow2
        if [[ ! -f $image.done ]]; then
            echo "building $image ..."
            mkdir -p "$WORKDIR"
            head -c 1G /dev/urandom >"$WORKDIR/nbd-random-1G.raw"
            qemu-img convert -O qcow2 "$WORKDIR/nbd-random-1G.raw" "$image"
            rm -f "$WORKDIR/nbd-random-1G.raw"
            touch "$image.done"
        fi
        images=("$image")
    fi
fi

plugin_copy() { nbdcopy $COPY_ARGS -- [ nbdkit "$PLUGIN" file="$1" ] "$2"; }
qemu_copy() { nbdcopy $COPY_ARGS -- [ qemu-nbd -r --shared=16 -f qcow2 "$1" ] "$2"; }

seconds() { # runs "$@", prints its wall time in seconds
    local start end
    start=$(date +%s.%N)
    "$@" >/dev/null
    end=$(date +%s.%N)
    awk -v a="$start" -v b="$end" 'BEGIN { printf "%.3f\n", b - a }'
}
median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

tmp=$(mktemp -d)
server_pids=()
cleanup() {
    for pid in "${server_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$tmp"
}
trap cleanup EXIT
wait_socket() { for _ in $(seq 100); do [[ -S $1 ]] && return; sleep 0.1; done; die "no socket $1"; }
persistent_copy() { nbdcopy $COPY_ARGS "nbd+unix:///?socket=$1" "$2"; }

header() {
    printf '%-11s %-20s %9s %11s %10s %10s %7s\n' mode image "plugin s" "plugin MB/s" \
        "qemu-nbd s" "qemu MB/s" ratio
}
row() { # mode image size plugin-seconds qemu-seconds
    awk -v m="$1" -v n="$(basename "$2")" -v s="$3" -v p="$4" -v q="$5" 'BEGIN {
        printf "%-11s %-20s %9.3f %11.0f %10.3f %10.0f %7.2f\n", m, n, p, s / p / 1e6, q, s / q / 1e6, q / p }'
}

header
for image in "${images[@]}"; do
    size=$(qemu-img info --output=json "$image" | awk -F'[:,]' '/"virtual-size"/ { print $2 + 0; exit }')
    # Same bytes from both (and warms the cache).
    ours=$(plugin_copy "$image" - | sha256sum)
    theirs=$(qemu_copy "$image" - | sha256sum)
    [[ $ours == "$theirs" ]] || die "$image: plugin and qemu-nbd disagree ($ours vs $theirs)"
    p_times=() q_times=()
    for ((i = 0; i < RUNS; i++)); do
        p_times+=("$(seconds plugin_copy "$image" null:)")
        q_times+=("$(seconds qemu_copy "$image" null:)")
    done
    row fresh "$image" "$size" "$(printf '%s\n' "${p_times[@]}" | median)" \
        "$(printf '%s\n' "${q_times[@]}" | median)"

    rm -f "$tmp/p.sock" "$tmp/q.sock"
    nbdkit -f -U "$tmp/p.sock" "$PLUGIN" file="$image" &
    server_pids+=($!)
    qemu-nbd -r -t --shared=16 -f qcow2 -k "$tmp/q.sock" "$image" &
    server_pids+=($!)
    wait_socket "$tmp/p.sock"
    wait_socket "$tmp/q.sock"
    persistent_copy "$tmp/p.sock" null:
    persistent_copy "$tmp/q.sock" null:
    p_times=() q_times=()
    for ((i = 0; i < RUNS; i++)); do
        p_times+=("$(seconds persistent_copy "$tmp/p.sock" null:)")
        q_times+=("$(seconds persistent_copy "$tmp/q.sock" null:)")
    done
    row persistent "$image" "$size" "$(printf '%s\n' "${p_times[@]}" | median)" \
        "$(printf '%s\n' "${q_times[@]}" | median)"
    for pid in "${server_pids[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
    server_pids=()
done
echo "(virtual disk bytes / median wall time; data and holes alike, as nbdcopy sees them;"
echo " ratio = qemu-nbd time / plugin time, above 1: the plugin is faster)"

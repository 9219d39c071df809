#!/usr/bin/env bash
# Times the qcowmap CLI against qemu-img on the same images and prints median wall times and
# their ratio (qemu-img / qcowmap: above 1 means qcowmap is faster).
#
# usage: bench/compare-qemu.sh [QCOWMAP_CLI] [WORKDIR]
#   QCOWMAP_CLI  the qcowmap executable (default ./build/apps/qcowmap)
#   WORKDIR      where the images live (default /var/tmp/qcowmap-bench); images already there are
#                reused, convert outputs are removed after every run
# env: RUNS  timed runs per tool and operation (default 5), taken alternately qcowmap/qemu-img
#
# Images:
#   frag-4G.qcow2    4 GiB virtual, 64 KiB clusters, every 4th cluster written: 1 GiB of data in
#                    16384 data runs separated by 16384 unallocated runs
#   sparse-1T.qcow2  1 TiB virtual, 256 writes of 16 KiB at scattered offsets (a few MiB of data)
#   zlib-1G.qcow2, zstd-1G.qcow2
#                    `qemu-img convert -c` (64 KiB clusters) of a 1 GiB raw file mixing, MiB by
#                    MiB, random bytes, text, zeros and runs of one byte
# Everything runs warm: one untimed run of each command comes first and nothing is dropped from
# the page cache, for either tool.
set -euo pipefail
shopt -s inherit_errexit # a failing command inside $(...) stops the script too

QCOWMAP=${1:-./build/apps/qcowmap}
WORKDIR=${2:-/var/tmp/qcowmap-bench}
RUNS=${RUNS:-5}

die() { echo "compare-qemu.sh: $*" >&2; exit 1; }

[[ -x $QCOWMAP ]] || die "qcowmap CLI '$QCOWMAP' is not an executable (build it, or pass its path)"
QCOWMAP=$(realpath "$QCOWMAP")
for tool in qemu-img qemu-io awk sort; do
    command -v "$tool" >/dev/null || die "$tool not found"
done
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer, not '$RUNS'"

script_start=$(date +%s.%N)
mkdir -p "$WORKDIR"
OUT=$WORKDIR/out.raw
OUT_QEMU=$WORKDIR/out-qemu.raw
trap 'rm -f "$OUT" "$OUT_QEMU"' EXIT

# Bytes of the image that qemu-img map reports as data.
data_bytes() {
    qemu-img map -f qcow2 --output=json "$1" |
        awk -F'[:,]' '/"data": true/ { sum += $4 } END { printf "%.0f\n", sum }'
}

# Builds an image unless a complete one is there (a .done marker is written after a full build).
# $1 image path, $2 virtual size, $3 cluster size, $4 function printing qemu-io commands,
# $5 minimum bytes of data the result must hold
build_image() {
    local image=$1 size=$2 cluster=$3 commands=$4 min_data=$5 data
    if [[ -f $image && -f $image.done ]]; then
        echo "reusing $image"
        return
    fi
    echo "building $image ..."
    rm -f "$image" "$image.done"
    qemu-img create -q -f qcow2 -o cluster_size="$cluster" "$image.tmp" "$size"
    # qemu-io reads commands from stdin when given no -c: one process for all the writes.
    # -t unsafe: no flush per write (the image only has to be complete once qemu-io exits).
    "$commands" | qemu-io -t unsafe -f qcow2 "$image.tmp" >/dev/null
    qemu-img check -q "$image.tmp" || die "qemu-img check failed on $image.tmp"
    data=$(data_bytes "$image.tmp")
    ((data >= min_data)) || die "$image.tmp holds $data bytes of data, expected >= $min_data"
    mv "$image.tmp" "$image"
    touch "$image.done"
}

# Offsets are printed with %.0f: mawk's %d stops at 2^31 - 1.
frag_commands() {
    # Cluster 4*i of 65536 gets pattern byte 1..255 (never 0, so no write becomes a zero write).
    awk 'BEGIN { for (i = 0; i < 16384; i++)
                     printf "write -P 0x%x %.0f 64k\n", i % 255 + 1, i * 4 * 65536 }'
}

sparse_commands() {
    # 256 writes of 16 KiB at multiplicative-hash offsets spread over 1 TiB, 4 KiB aligned.
    awk 'BEGIN { for (i = 0; i < 256; i++) {
                     page = (i * 2654435761) % 268435452   # 1 TiB / 4 KiB, minus the write size
                     printf "write -P 0x%x %.0f 16k\n", i % 255 + 1, page * 4096 } }'
}

FRAG=$WORKDIR/frag-4G.qcow2
SPARSE=$WORKDIR/sparse-1T.qcow2
build_image "$FRAG" 4G 64k frag_commands $((1 << 30))
build_image "$SPARSE" 1T 64k sparse_commands $((256 * 16384))

# The compressed images: made from one mixed 1 GiB raw file, deleted once both exist.
build_compressed() { # $1 image, $2 compression type
    local image=$1 type=$2 source=$WORKDIR/mixed-1G.raw
    if [[ -f $image && -f $image.done ]]; then
        echo "reusing $image"
        return
    fi
    if [[ ! -f $source ]]; then
        echo "building $source ..."
        python3 - "$source" <<'PY'
import os, random, sys
random.seed(7)
text = b"The quick brown fox jumps over the lazy dog. qcow2 clusters, L2 tables, refcounts. " * 13000
with open(sys.argv[1], "wb") as f:
    for mib in range(1024):
        kind = mib % 4
        if kind == 0:
            f.write(random.randbytes(1 << 20))
        elif kind == 1:
            f.write(text[mib % 97:][: 1 << 20])
        elif kind == 2:
            f.write(bytes(1 << 20))
        else:
            block = bytearray([mib % 251 + 1]) * (1 << 20)
            for _ in range(256):
                block[random.randrange(1 << 20)] = random.randrange(256)
            f.write(block)
PY
    fi
    echo "building $image ..."
    qemu-img convert -c -O qcow2 -o cluster_size=64k,compression_type="$type" "$source" "$image.tmp"
    qemu-img compare -q -f raw -F qcow2 "$source" "$image.tmp" || die "$image.tmp differs from its source"
    mv "$image.tmp" "$image"
    touch "$image.done"
}
ZLIB=$WORKDIR/zlib-1G.qcow2
ZSTD=$WORKDIR/zstd-1G.qcow2
build_compressed "$ZLIB" zlib
build_compressed "$ZSTD" zstd
rm -f "$WORKDIR/mixed-1G.raw"

now() { date +%s.%N; }

# Prints the wall time of "$@" in seconds (stdout of the command goes to /dev/null).
time_it() {
    local t0 t1
    t0=$(now)
    "$@" >/dev/null
    t1=$(now)
    rm -f "$OUT" # outside the timed part: each run writes a fresh output
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.6f\n", b - a }'
}

median() { # of the numbers given as arguments
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 }
        END { if (NR % 2) printf "%.3f", v[(NR + 1) / 2]
              else printf "%.3f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

map_qcowmap() { "$QCOWMAP" map --output=json "$1"; }
map_qemu() { qemu-img map -f qcow2 --output=json "$1"; }
convert_qcowmap() { "$QCOWMAP" convert --force "$1" "$OUT"; }
convert_qemu() { qemu-img convert -f qcow2 -O raw "$1" "$OUT"; }

# One-time correctness check, which also serves as the warm-up: same entry count from both maps,
# and raw outputs that qemu-img compare finds identical (it skips holes, so 1 TiB is quick).
check_image() {
    local image=$1 n_ours n_qemu
    n_ours=$(map_qcowmap "$image" | grep -c '"start"')
    n_qemu=$(map_qemu "$image" | grep -c '"start"')
    [[ $n_ours == "$n_qemu" ]] ||
        die "$image: qcowmap map gives $n_ours entries, qemu-img map $n_qemu"
    "$QCOWMAP" convert --force "$image" "$OUT"
    qemu-img convert -f qcow2 -O raw "$image" "$OUT_QEMU"
    qemu-img compare -q -f raw -F raw "$OUT" "$OUT_QEMU" ||
        die "$image: qcowmap convert and qemu-img convert outputs differ"
    rm -f "$OUT" "$OUT_QEMU"
    echo "checked $(basename "$image"): $n_ours map entries, converted outputs identical"
}

rows=()
# $1 operation label, $2 image, $3 qcowmap function, $4 qemu-img function
compare() {
    local label=$1 image=$2 ours=$3 theirs=$4 i
    local -a t_ours=() t_qemu=()
    for ((i = 0; i < RUNS; i++)); do
        # Alternate which tool goes first so neither always runs right after the other.
        if ((i % 2 == 0)); then
            t_ours+=("$(time_it "$ours" "$image")")
            t_qemu+=("$(time_it "$theirs" "$image")")
        else
            t_qemu+=("$(time_it "$theirs" "$image")")
            t_ours+=("$(time_it "$ours" "$image")")
        fi
    done
    local m_ours m_qemu ratio
    m_ours=$(median "${t_ours[@]}")
    m_qemu=$(median "${t_qemu[@]}")
    ratio=$(awk -v a="$m_ours" -v b="$m_qemu" 'BEGIN { printf (a > 0 ? "%.2f" : "inf"), (a > 0 ? b / a : 0) }')
    echo "  $label $(basename "$image"): qcowmap [${t_ours[*]}] qemu-img [${t_qemu[*]}]"
    rows+=("$(printf '%-10s %-18s %12s %12s %8s' "$label" "$(basename "$image")" "$m_ours" "$m_qemu" "$ratio")")
}

echo "qcowmap: $QCOWMAP"
echo "qemu-img: $(qemu-img --version | head -n1)"
for image in "$FRAG" "$SPARSE" "$ZLIB" "$ZSTD"; do
    check_image "$image"
done
echo "timing, $RUNS runs each (seconds):"
for image in "$FRAG" "$SPARSE" "$ZLIB" "$ZSTD"; do
    compare map "$image" map_qcowmap map_qemu
    compare convert "$image" convert_qcowmap convert_qemu
done

echo
echo "median wall time over $RUNS alternating runs; page cache warm for both tools (nothing dropped)"
echo "ratio = qemu-img / qcowmap (> 1: qcowmap faster)"
printf '%-10s %-18s %12s %12s %8s\n' operation image "qcowmap s" "qemu-img s" ratio
printf '%s\n' "${rows[@]}"

echo
if [[ -x /usr/bin/time ]]; then
    rss() { # peak RSS in MiB of "$@"
        /usr/bin/time -v "$@" 2>&1 >/dev/null |
            awk -F': ' '/Maximum resident set size/ { printf "%.1f", $2 / 1024 }'
    }
    rss_ours=$(rss "$QCOWMAP" convert --force "$FRAG" "$OUT"); rm -f "$OUT"
    rss_qemu=$(rss qemu-img convert -f qcow2 -O raw "$FRAG" "$OUT"); rm -f "$OUT"
    echo "peak RSS, convert $(basename "$FRAG"): qcowmap ${rss_ours} MiB, qemu-img ${rss_qemu} MiB"
    echo "  (qcowmap's figure counts the page-cache pages of its read-only mapping it touched)"
else
    echo "peak RSS: skipped, /usr/bin/time is missing (apt-get install time)"
fi

script_end=$(date +%s.%N)
awk -v a="$script_start" -v b="$script_end" 'BEGIN { printf "compare-qemu.sh took %.1f s\n", b - a }'

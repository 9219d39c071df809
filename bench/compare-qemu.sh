#!/usr/bin/env bash
# Times the qcowmap CLI against qemu's tools on the same images and prints median wall times and
# their ratio (peer / qcowmap: above 1 means qcowmap is faster):
#   map      vs qemu-img map --output=json
#   convert  vs qemu-img convert -O raw
#   hash     (sha256) vs qemu-img convert -O raw to a temp file + sha256sum, and vs
#            nbdcopy -- [ qemu-nbd -r -f qcow2 IMG ] - | sha256sum
#   compare  vs qemu-img compare (each image against a copy of itself, so every data byte is read)
#   convert - (a qcow2 image on a pipe) vs qemu-img convert of the file and vs copy-then-convert
#            (bench/stream-compare.sh, run at the end)
# then openssl speed -evp sha256 against qcowmap hash's throughput on dense data, peak RSS of
# hash and convert, block-manifest scaling (--threads=1 vs 2), and hash, compare and convert
# with each data access: --io=auto (the default: measured at start), --io=read (pread into
# buffers) and --io=mmap (straight from the mapping, populated ahead).
#
# usage: bench/compare-qemu.sh [QCOWMAP_CLI] [WORKDIR]
#   QCOWMAP_CLI  the qcowmap executable (default ./build/apps/qcowmap)
#   WORKDIR      where the images live (default /var/tmp/qcowmap-bench); images already there are
#                reused. Outputs (convert, qemu-img convert for hash) go to /dev/shm when it has
#                room, so that ext4 writeback and discards of the previous run's output do not
#                swamp the figures; they are removed after every run.
# env: RUNS  timed runs per tool and operation (default 5), taken alternately qcowmap/qemu-img;
#            tables give the median and the min-max range
#      BLKSUM  a blksum executable (nirs/blkhash, not packaged in Debian): the blkhash rows then
#            check its digests and time it too
# At the end: hash --algo=blkhash-sha256 against --algo=sha256, and convert with and without
# --digest (issue 24); streamed input, in-place writes, the lifecycle commands; and Python's
# extents loop + hashlib against img.hash() and pyqcow (python/bench_hash.py, issue 30).
#
# Images:
#   dense-1G.qcow2   1 GiB virtual, every byte written (64 writes of 16 MiB)
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
for tool in qemu-img qemu-io qemu-nbd nbdcopy sha256sum openssl awk sort; do
    command -v "$tool" >/dev/null || die "$tool not found"
done
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer, not '$RUNS'"

script_start=$(date +%s.%N)
mkdir -p "$WORKDIR"
# Outputs in memory when /dev/shm has room for two 1 GiB outputs and some (sparse outputs keep
# their holes there too); else beside the images.
OUTDIR=$WORKDIR
if [[ -d /dev/shm && -w /dev/shm ]] &&
    (($(df -Pk /dev/shm | awk 'NR == 2 { print $4 }') > 4 * 1024 * 1024)); then
    OUTDIR=/dev/shm
fi
OUT=$OUTDIR/qcowmap-bench-$$-out.raw
OUT_QEMU=$OUTDIR/qcowmap-bench-$$-out-qemu.raw
COPY=$WORKDIR/copy.qcow2
trap 'rm -f "$OUT" "$OUT_QEMU" "$COPY"' EXIT

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

dense_commands() {
    awk 'BEGIN { for (i = 0; i < 64; i++) printf "write -P 0x%x %.0f 16M\n", i % 255 + 1, i * 16 * 1048576 }'
}

FRAG=$WORKDIR/frag-4G.qcow2
SPARSE=$WORKDIR/sparse-1T.qcow2
DENSE=$WORKDIR/dense-1G.qcow2
build_image "$DENSE" 1G 64k dense_commands $((1 << 30))
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

# Prints the wall time of "$@" in seconds (stdout of the command goes to /dev/null). Timed with
# bash's own clock: a `date` process per timestamp would add its start-up (a few ms on this VM)
# to every measurement, which swamps commands that take tens of milliseconds, like map.
time_it() {
    local t0 t1
    t0=$EPOCHREALTIME
    "$@" >/dev/null
    t1=$EPOCHREALTIME
    rm -f "$OUT" # outside the timed part: each run writes a fresh output
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.6f\n", b - a }'
}

. "$(dirname "${BASH_SOURCE[0]}")/stats.sh" # median, range

map_qcowmap() { "$QCOWMAP" map --output=json "$1"; }
map_qemu() { qemu-img map -f qcow2 --output=json "$1"; }
convert_qcowmap() { "$QCOWMAP" convert --force "$1" "$OUT"; }
convert_qemu() { qemu-img convert -f qcow2 -O raw "$1" "$OUT"; }
hash_qcowmap() { "$QCOWMAP" hash --algo=sha256 "$1"; }
hash_qemu_convert() { qemu-img convert -f qcow2 -O raw "$1" "$OUT" && sha256sum "$OUT"; }
hash_nbdcopy() { nbdcopy -- [ qemu-nbd -r -f qcow2 "$1" ] - | sha256sum; }
# compare: the image against $COPY, a byte copy of it made before the timed runs.
compare_qcowmap() { "$QCOWMAP" compare "$1" "$COPY"; }
compare_qemu() { qemu-img compare -f qcow2 -F qcow2 "$1" "$COPY"; }

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
# $1 operation label, $2 image, $3 qcowmap function, $4 peer function, $5 peer label
compare() {
    local label=$1 image=$2 ours=$3 theirs=$4 peer=${5:-qemu-img} i
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
    echo "  $label $(basename "$image"): qcowmap [${t_ours[*]}] $peer [${t_qemu[*]}]"
    rows+=("$(printf '%-10s %-16s %10s %13s  %-18s %10s %13s %7s' "$label" "$(basename "$image")" \
        "$m_ours" "$(range "${t_ours[@]}")" "$peer" "$m_qemu" "$(range "${t_qemu[@]}")" "$ratio")")
    last_ours=$m_ours
}

echo "qcowmap: $QCOWMAP"
echo "qemu-img: $(qemu-img --version | head -n1)"
echo "outputs in $OUTDIR; $(nproc) cores; load average $(cut -d' ' -f1-3 /proc/loadavg) at the start"
for image in "$DENSE" "$FRAG" "$SPARSE" "$ZLIB" "$ZSTD"; do
    check_image "$image"
done
# hash and compare agree with the qemu way (also the warm-up); 1 TiB is not hashed: every tool
# must feed 1 TiB of zeros to sha256 (minutes), so the sparse image is only mapped, converted
# and compared.
for image in "$DENSE" "$FRAG" "$ZLIB" "$ZSTD"; do
    ours=$(hash_qcowmap "$image" | awk '{ print $1 }')
    theirs=$(hash_nbdcopy "$image" | awk '{ print $1 }')
    [[ $ours == "$theirs" ]] || die "$image: qcowmap hash $ours, nbdcopy | sha256sum $theirs"
    echo "checked $(basename "$image"): sha256 $ours"
done
echo "timing, $RUNS runs each (seconds):"
for image in "$DENSE" "$FRAG" "$SPARSE" "$ZLIB" "$ZSTD"; do
    compare map "$image" map_qcowmap map_qemu
    compare convert "$image" convert_qcowmap convert_qemu
    if [[ $image != "$SPARSE" ]]; then
        compare hash "$image" hash_qcowmap hash_qemu_convert "convert+sha256sum"
        [[ $image == "$DENSE" ]] && hash_dense=$last_ours
        compare hash "$image" hash_qcowmap hash_nbdcopy "nbdcopy|sha256sum"
    fi
    cp "$image" "$COPY"
    "$QCOWMAP" compare "$image" "$COPY" >/dev/null || die "$image: qcowmap compare says the copy differs"
    compare compare "$image" compare_qcowmap compare_qemu
    rm -f "$COPY"
done

echo
echo "median wall time (and min-max) over $RUNS alternating runs; page cache warm for both tools"
echo "(nothing dropped); ratio = peer / qcowmap medians (> 1: qcowmap faster); hash is sha256 of"
echo "the whole virtual disk; qcowmap with its defaults (--io=auto)"
printf '%-10s %-16s %10s %13s  %-18s %10s %13s %7s\n' operation image "qcowmap s" min-max peer "peer s" min-max ratio
printf '%s\n' "${rows[@]}"
echo "load average $(cut -d' ' -f1-3 /proc/loadavg) at the end of the timed runs"

echo
# sha256 throughput: openssl speed divides by the user CPU time it used (not wall time), so
# qcowmap hash of the dense image is measured the same way (user + sys CPU seconds, median of
# RUNS) as well as by its median wall time from the table above.
openssl_kbs=$(openssl speed -evp sha256 -bytes 1048576 -seconds 3 2>/dev/null |
    awk '$1 == "sha256" { sub(/k$/, "", $2); print $2 }')
hash_cpu=$hash_dense
if [[ -x /usr/bin/time ]]; then
    cpu=()
    for ((i = 0; i < RUNS; i++)); do
        cpu+=("$(/usr/bin/time -f '%U %S' "$QCOWMAP" hash "$DENSE" 2>&1 >/dev/null |
            awk 'END { printf "%.3f", $1 + $2 }')")
    done
    hash_cpu=$(median "${cpu[@]}")
fi
awk -v k="$openssl_kbs" -v t="$hash_dense" -v c="$hash_cpu" 'BEGIN {
    theirs = k * 1000 / 1e6; wall = 1073741824 / t / 1e6; cpu = 1073741824 / c / 1e6
    printf "sha256 throughput: openssl speed -evp sha256 -bytes 1048576 %.0f MB/s (per CPU second); qcowmap hash dense-1G %.0f MB/s per CPU second (%.2fx), %.0f MB/s wall (%.2fx)\n", theirs, cpu, cpu / theirs, wall, wall / theirs }'

# Data access: each of --io=auto (the default), --io=read and --io=mmap for hash, compare and
# convert, on the same image, rotating which goes first; the copy for compare is made (and
# synced) before the timed runs.
io_rows=()
io_row() { # $1 label, $2 image, rest: the command with IO where the option goes
    local label=$1 image=$2 i j mode word
    shift 2
    local -A times=()
    local -a modes=(auto read mmap) command
    for ((i = 0; i < RUNS; i++)); do
        for ((j = 0; j < 3; j++)); do
            mode=${modes[(i + j) % 3]}
            command=()
            for word in "$@"; do
                [[ $word == IO ]] && word=--io=$mode
                command+=("$word")
            done
            times[$mode]+=" $(time_it "${command[@]}")"
        done
    done
    local row
    row=$(printf '%-8s %-16s' "$label" "$(basename "$image")")
    for mode in "${modes[@]}"; do
        # shellcheck disable=SC2086 # the times are space-separated numbers
        row+=$(printf ' %8s %13s' "$(median ${times[$mode]})" "$(range ${times[$mode]})")
    done
    io_rows+=("$row")
}
for image in "$DENSE" "$FRAG" "$ZLIB"; do
    cp "$image" "$COPY"
    sync
    for mode in auto read mmap; do # warm-up
        "$QCOWMAP" hash --io=$mode "$image" >/dev/null
        "$QCOWMAP" compare --io=$mode "$image" "$COPY" >/dev/null
    done
    io_row hash "$image" "$QCOWMAP" hash IO "$image"
    io_row compare "$image" "$QCOWMAP" compare IO "$image" "$COPY"
    io_row convert "$image" "$QCOWMAP" convert --force IO "$image" "$OUT"
    rm -f "$COPY"
done
echo
echo "data access: median and min-max wall seconds over $RUNS runs of each --io mode"
printf '%-8s %-16s %8s %13s %8s %13s %8s %13s\n' operation image auto min-max read min-max mmap min-max
printf '%s\n' "${io_rows[@]}"

# Block manifests: one thread against two.
manifest() { "$QCOWMAP" hash --block-size=64k --threads="$2" "$1"; }
for image in "$DENSE" "$ZSTD"; do
    t1=() t2=()
    for ((i = 0; i < RUNS; i++)); do
        t1+=("$(time_it manifest "$image" 1)")
        t2+=("$(time_it manifest "$image" 2)")
    done
    m1=$(median "${t1[@]}")
    m2=$(median "${t2[@]}")
    awk -v a="$m1" -v b="$m2" -v n="$(basename "$image")" 'BEGIN {
        printf "block manifest (sha256, 64 KiB blocks) %s: --threads=1 %.3f s, --threads=2 %.3f s, %.2fx\n", n, a, b, a / b }'
done

if [[ -x /usr/bin/time ]]; then
    rss() { # peak RSS in MiB of "$@"
        /usr/bin/time -v "$@" 2>&1 >/dev/null |
            awk -F': ' '/Maximum resident set size/ { printf "%.1f", $2 / 1024 }'
    }
    for image in "$DENSE" "$FRAG"; do
        rss_ours=$(rss "$QCOWMAP" convert --force "$image" "$OUT"); rm -f "$OUT"
        rss_qemu=$(rss qemu-img convert -f qcow2 -O raw "$image" "$OUT"); rm -f "$OUT"
        rss_hash=$(rss "$QCOWMAP" hash "$image")
        rss_manifest=$(rss "$QCOWMAP" hash --block-size=64k "$image")
        echo "peak RSS $(basename "$image"): qcowmap convert ${rss_ours} MiB (qemu-img convert ${rss_qemu} MiB), qcowmap hash ${rss_hash} MiB, hash --block-size=64k ${rss_manifest} MiB"
    done
    echo "  (mapped pages are dropped from the process once used: RSS stays small with either --io)"
else
    echo "peak RSS: skipped, /usr/bin/time is missing (apt-get install time)"
fi

script_end=$(date +%s.%N)
awk -v a="$script_start" -v b="$script_end" 'BEGIN { printf "compare-qemu.sh took %.1f s\n", b - a }'

# ---- Writing qcow2: qcowmap convert -O qcow2 against qemu-img convert -O qcow2 ----
# Same images, same alternating median timing; each output is checked once (qemu-img check and
# compare) before the timed runs. Sources:
#   frag-4G.qcow2   uncompressed output (the 1 GiB of data in 16384 runs)
#   mixed-1G.raw    the compressed images' source, recreated from zlib-1G.qcow2 (same bytes):
#                   -c with zlib and with zstd; output sizes printed beside qemu-img's
# Both tools sync their output before exiting (qemu-img flushes on close; qcowmap fsyncs the
# temporary file before renaming it into place).
writer_start=$EPOCHREALTIME
MIXED=$WORKDIR/mixed-1G.raw
W_OURS=$WORKDIR/w-ours.qcow2
W_QEMU=$WORKDIR/w-qemu.qcow2
trap 'rm -f "$OUT" "$OUT_QEMU" "$COPY" "$W_OURS" "$W_QEMU" "$MIXED"' EXIT
[[ -f $MIXED ]] || qemu-img convert -f qcow2 -O raw "$ZLIB" "$MIXED"
w_time() { # wall seconds of "$@", outputs removed afterwards
    local t0 t1
    t0=$EPOCHREALTIME
    "$@" >/dev/null
    t1=$EPOCHREALTIME
    rm -f "$W_OURS" "$W_QEMU"
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.6f\n", b - a }'
}
w_format() { # the source format, as both tools are told it (raw sources need -f raw)
    if [[ $1 == *.raw ]]; then echo raw; else echo qcow2; fi
}
w_ours() { # $1 source, rest: options
    local src=$1
    shift
    "$QCOWMAP" convert -f "$(w_format "$src")" -O qcow2 "$@" "$src" "$W_OURS"
}
# The same writer to stdout redirected to a file: no fsync, which is what qemu-img convert does
# by default (its output cache mode is unsafe: no flush of the data before it exits).
w_ours_stdout() {
    local src=$1
    shift
    "$QCOWMAP" convert -f "$(w_format "$src")" -O qcow2 "$@" "$src" - >"$W_OURS"
}
w_qemu() {
    local src=$1
    shift
    qemu-img convert -f "$(w_format "$src")" -O qcow2 "$@" "$src" "$W_QEMU"
}
w_rows=()
w_ours_fn=w_ours
w_compare() { # $1 label, $2 source, rest: options for both tools
    local label=$1 src=$2 i s_ours s_qemu
    shift 2
    # Check (also the warm-up), and the output sizes.
    "$w_ours_fn" "$src" "$@"
    w_qemu "$src" "$@"
    qemu-img check -q "$W_OURS" || die "$label: qemu-img check finds errors in qcowmap's output"
    qemu-img compare -q "$src" "$W_OURS" || die "$label: qcowmap's output differs from $src"
    s_ours=$(stat -c %s "$W_OURS")
    s_qemu=$(stat -c %s "$W_QEMU")
    rm -f "$W_OURS" "$W_QEMU"
    local -a t_ours=() t_qemu=()
    for ((i = 0; i < RUNS; i++)); do
        if ((i % 2 == 0)); then
            t_ours+=("$(w_time "$w_ours_fn" "$src" "$@")")
            t_qemu+=("$(w_time w_qemu "$src" "$@")")
        else
            t_qemu+=("$(w_time w_qemu "$src" "$@")")
            t_ours+=("$(w_time "$w_ours_fn" "$src" "$@")")
        fi
    done
    local m_ours m_qemu
    m_ours=$(median "${t_ours[@]}")
    m_qemu=$(median "${t_qemu[@]}")
    echo "  $label: qcowmap [${t_ours[*]}] qemu-img [${t_qemu[*]}]"
    w_rows+=("$(awk -v l="$label" -v a="$m_ours" -v b="$m_qemu" -v so="$s_ours" -v sq="$s_qemu" 'BEGIN {
        printf "%-34s %9.3f %9.3f %7.2f %14.0f %14.0f %+7.2f%%", l, a, b, (a > 0 ? b / a : 0), so, sq, (so / sq - 1) * 100 }')")
}
echo
echo "writing qcow2, $RUNS runs each (seconds):"
w_compare "convert -O qcow2 frag-4G" "$FRAG"
w_ours_fn=w_ours_stdout
w_compare "convert -O qcow2 frag-4G - >file" "$FRAG"
w_ours_fn=w_ours
w_compare "convert -O qcow2 -c mixed-1G (zlib)" "$MIXED" -c
w_compare "convert -O qcow2 -c mixed-1G (zstd)" "$MIXED" -c -o compression_type=zstd
echo
echo "median wall time; ratio = qemu-img / qcowmap (> 1: qcowmap faster); sizes in bytes"
printf '%-34s %9s %9s %7s %14s %14s %8s\n' operation qcowmap qemu-img ratio "qcowmap size" "qemu-img size" "size"
printf '%s\n' "${w_rows[@]}"
if [[ -x /usr/bin/time ]]; then
    w_rss() { /usr/bin/time -v "$@" 2>&1 >/dev/null | awk -F': ' '/Maximum resident set size/ { printf "%.1f", $2 / 1024 }'; }
    echo "peak RSS, convert -O qcow2 frag-4G: qcowmap $(w_rss "$QCOWMAP" convert -O qcow2 "$FRAG" "$W_OURS") MiB, qemu-img $(w_rss qemu-img convert -O qcow2 "$FRAG" "$W_QEMU") MiB"
    rm -f "$W_OURS" "$W_QEMU"
    echo "peak RSS, convert -O qcow2 -c mixed-1G: qcowmap $(w_rss "$QCOWMAP" convert -O qcow2 -c "$MIXED" "$W_OURS") MiB, qemu-img $(w_rss qemu-img convert -O qcow2 -c "$MIXED" "$W_QEMU") MiB"
    rm -f "$W_OURS" "$W_QEMU"
fi
awk -v a="$writer_start" -v b="$EPOCHREALTIME" 'BEGIN { printf "writing qcow2 rows took %.1f s\n", b - a }'

# ---- blkhash (issue 24): the block construction against the sha256 stream, and digests taken
# by convert from its own pass ----
# hash --algo=blkhash-sha256 against hash --algo=sha256 (the same CLI) on dense-1G, frag-4G and
# zlib-1G, interleaved; on sparse-1T (1 TiB holding 4 MiB) blkhash alone (sha256 must hash 1 TiB
# of zeros: minutes), and against blksum when BLKSUM names one (nirs/blkhash, not packaged in
# Debian; it reads qcow2 through qemu-nbd). convert -O raw with and without
# --digest=blkhash-sha256 on dense-1G. Targets (issue 24): sparse-1T < 0.5 s; dense-1G blkhash
# >= 1.8x sha256 on 2 cores; convert --digest <= 10% over convert.
blk_start=$EPOCHREALTIME
blk_rows=()
# $1 label, $2 image, $3 function A, $4 function B: interleaved medians, ratio B / A.
blk_pair() {
    local label=$1 image=$2 fa=$3 fb=$4 i
    local -a ta=() tb=()
    for ((i = 0; i < RUNS; i++)); do
        if ((i % 2 == 0)); then
            ta+=("$(time_it "$fa" "$image")")
            tb+=("$(time_it "$fb" "$image")")
        else
            tb+=("$(time_it "$fb" "$image")")
            ta+=("$(time_it "$fa" "$image")")
        fi
    done
    local ma mb
    ma=$(median "${ta[@]}")
    mb=$(median "${tb[@]}")
    echo "  $label $(basename "$image"): $fa [${ta[*]}] $fb [${tb[*]}]"
    blk_rows+=("$(awk -v l="$label" -v n="$(basename "$image")" -v a="$ma" -v ra="$(range "${ta[@]}")" \
        -v b="$mb" -v rb="$(range "${tb[@]}")" 'BEGIN {
        printf "%-22s %-16s %8.3f %13s %8.3f %13s %7.2f", l, n, a, ra, b, rb, (a > 0 ? b / a : 0) }')")
}
hash_blkhash() { "$QCOWMAP" hash --algo=blkhash-sha256 "$1"; }
hash_sha256() { "$QCOWMAP" hash --algo=sha256 "$1"; }
convert_digest() { "$QCOWMAP" convert --force --digest=blkhash-sha256 "$1" "$OUT" 2>/dev/null; }
convert_plain() { "$QCOWMAP" convert --force "$1" "$OUT"; }
blksum_nbd() { "$BLKSUM" "$1"; }
echo
echo "blkhash, $RUNS runs each (seconds):"
for image in "$DENSE" "$FRAG" "$ZLIB" "$SPARSE"; do
    # Checks (and warm-up): convert --digest reports the digest hash gives, and blksum agrees.
    ours=$(hash_blkhash "$image" | awk '{ print $1 }')
    if [[ $image != "$SPARSE" ]]; then
        taken=$("$QCOWMAP" convert --force --digest=blkhash-sha256 "$image" "$OUT" 2>&1 >/dev/null |
            awk '{ print $1 }')
        rm -f "$OUT"
        [[ $ours == "$taken" ]] || die "$image: hash --algo=blkhash-sha256 $ours, convert --digest $taken"
    fi
    if [[ -n ${BLKSUM:-} ]]; then
        theirs=$("$BLKSUM" "$image" | awk '{ print $1 }')
        [[ $ours == "$theirs" ]] || die "$image: qcowmap $ours, blksum $theirs"
    fi
    echo "checked $(basename "$image"): blkhash-sha256 $ours${BLKSUM:+ (blksum agrees)}"
done
for image in "$DENSE" "$FRAG" "$ZLIB"; do
    blk_pair "hash blkhash/sha256" "$image" hash_blkhash hash_sha256
done
if [[ -n ${BLKSUM:-} ]]; then
    blk_pair "hash blkhash/blksum" "$SPARSE" hash_blkhash blksum_nbd
    blk_pair "hash blkhash/blksum" "$DENSE" hash_blkhash blksum_nbd
else
    t=()
    for ((i = 0; i < RUNS; i++)); do t+=("$(time_it hash_blkhash "$SPARSE")"); done
    echo "  hash blkhash sparse-1T.qcow2: [${t[*]}]"
    blk_rows+=("$(printf '%-22s %-16s %8s %13s %8s %13s %7s' "hash blkhash" sparse-1T.qcow2 \
        "$(median "${t[@]}")" "$(range "${t[@]}")" - - -)")
fi
blk_pair "convert --digest/plain" "$DENSE" convert_digest convert_plain
echo
echo "median wall seconds (min-max) over $RUNS interleaved runs; ratio = B / A (hash rows: > 1 means"
echo "blkhash-sha256 is faster; convert row: < 1 is the cost of --digest, 0.91 = 10% more)"
printf '%-22s %-16s %8s %13s %8s %13s %7s\n' "A/B" image "A s" min-max "B s" min-max ratio
printf '%s\n' "${blk_rows[@]}"
awk -v a="$blk_start" -v b="$EPOCHREALTIME" 'BEGIN { printf "blkhash rows took %.1f s\n", b - a }'

# ---- Streamed input (issue 29): cat IMG | qcowmap convert - against qemu-img's file path and
# against copy-then-convert, with peak RSS; its own script, runnable alone on these images.
echo
"$(dirname "${BASH_SOURCE[0]}")/stream-compare.sh" "$QCOWMAP" "$WORKDIR"

# In-place writes (issue 27): bench/inplace-compare.sh, with bench_write from the same build.
BENCH_WRITE=$(dirname "$(dirname "$QCOWMAP")")/bench/bench_write
if [[ -x $BENCH_WRITE ]]; then
    echo
    RUNS=$RUNS "$(dirname "$0")/inplace-compare.sh" "$BENCH_WRITE" "$WORKDIR"
else
    echo "in-place writes skipped: $BENCH_WRITE not built (-Dbench=true)"
fi

# The backup lifecycle commands (issue 28): bench/lifecycle-compare.sh.
echo
RUNS=$RUNS "$(dirname "$0")/lifecycle-compare.sh" "$QCOWMAP" "$WORKDIR"

# Hashing in Python (issue 30): the plain extents loop + hashlib against img.hash(), the CLI and
# pyqcow, with the Python module of the same build, when it was built.
PY_BUILD=$(dirname "$(dirname "$QCOWMAP")")/python
if [[ -d $PY_BUILD/qcowmap ]] && [[ -x /usr/bin/python3 ]]; then
    echo
    PYTHONPATH=$PY_BUILD /usr/bin/python3 "$(dirname "$0")/../python/bench_hash.py" --runs "$RUNS" \
        "$QCOWMAP" "$DENSE"
else
    echo "python hashing skipped: no Python module in $PY_BUILD"
fi

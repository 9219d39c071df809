#!/usr/bin/env bash
# Streamed input (issue 29): a qcow2 image that arrives through a pipe, converted to raw.
#   cat IMG | qcowmap convert - OUT          the one-pass stream decoder
#   qemu-img convert -O raw IMG OUT          qemu's file path (which needs the file)
#   cat IMG > COPY; qemu-img convert COPY OUT   what importers do today with a download
#   cat IMG | cat > OUT                    the floor: bytes through a pipe into a file, as they are
# on dense-1G, zlib-1G and frag-4G (the images compare-qemu.sh builds, reused from WORKDIR), then
# the peak RSS of each (/usr/bin/time -v). Median wall time and min-max over RUNS alternating
# runs; every output is checked against qemu-img's once first.
#
# usage: bench/stream-compare.sh [QCOWMAP_CLI] [WORKDIR]   (compare-qemu.sh runs it at its end)
# env: RUNS (default 5)
set -euo pipefail
shopt -s inherit_errexit

QCOWMAP=$(realpath "${1:-./build/apps/qcowmap}")
WORKDIR=${2:-/var/tmp/qcowmap-bench}
RUNS=${RUNS:-5}
die() { echo "stream-compare.sh: $*" >&2; exit 1; }
for image in dense-1G frag-4G zlib-1G; do
    [[ -f $WORKDIR/$image.qcow2.done ]] || die "$WORKDIR/$image.qcow2 missing: run bench/compare-qemu.sh first"
done
OUTDIR=$WORKDIR
if [[ -d /dev/shm && -w /dev/shm ]] &&
    (($(df -Pk /dev/shm | awk 'NR == 2 { print $4 }') > 6 * 1024 * 1024)); then
    OUTDIR=/dev/shm
fi
OUT=$OUTDIR/qcowmap-stream-$$-out.raw
REF=$OUTDIR/qcowmap-stream-$$-ref.raw
# The download's copy lands where a download would: beside the images, on disk.
COPY=$WORKDIR/qcowmap-stream-$$-copy.qcow2
trap 'rm -f "$OUT" "$REF" "$COPY"' EXIT

stream_qcowmap() { cat "$1" | "$QCOWMAP" convert --force - "$OUT"; }
file_qemu() { qemu-img convert -f qcow2 -O raw "$1" "$OUT"; }
copy_then_qemu() { cat "$1" >"$COPY" && qemu-img convert -f qcow2 -O raw "$COPY" "$OUT"; rm -f "$COPY"; }
# The floor of any tool reading a pipe into a file: the bytes through a pipe and written, as is.
pipe_floor() { cat "$1" | cat >"$OUT"; }

time_it() {
    local t0 t1
    t0=$EPOCHREALTIME
    "$@" >/dev/null
    t1=$EPOCHREALTIME
    rm -f "$OUT"
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.6f\n", b - a }'
}
. "$(dirname "${BASH_SOURCE[0]}")/stats.sh" # median, range

echo "stream input: $(nproc) cores; load average $(cut -d' ' -f1-3 /proc/loadavg) at the start"
rows=()
for name in dense-1G zlib-1G frag-4G; do
    image=$WORKDIR/$name.qcow2
    # Correctness (and warm-up): the streamed output equals qemu-img's.
    stream_qcowmap "$image"
    qemu-img convert -f qcow2 -O raw "$image" "$REF"
    cmp -s "$OUT" "$REF" || die "$name: cat | qcowmap convert - differs from qemu-img convert"
    rm -f "$OUT" "$REF"
    t_s=() t_f=() t_c=() t_p=()
    for ((i = 0; i < RUNS; i++)); do
        # Rotate which goes first.
        case $((i % 3)) in
        0) t_s+=("$(time_it stream_qcowmap "$image")"); t_f+=("$(time_it file_qemu "$image")"); t_c+=("$(time_it copy_then_qemu "$image")") ;;
        1) t_f+=("$(time_it file_qemu "$image")"); t_c+=("$(time_it copy_then_qemu "$image")"); t_s+=("$(time_it stream_qcowmap "$image")") ;;
        2) t_c+=("$(time_it copy_then_qemu "$image")"); t_s+=("$(time_it stream_qcowmap "$image")"); t_f+=("$(time_it file_qemu "$image")") ;;
        esac
        t_p+=("$(time_it pipe_floor "$image")")
    done
    m_s=$(median "${t_s[@]}") m_f=$(median "${t_f[@]}") m_c=$(median "${t_c[@]}")
    echo "  $name: stream [${t_s[*]}] qemu-img file [${t_f[*]}] copy+qemu-img [${t_c[*]}]"
    echo "  $name: pipe floor (cat IMG | cat > OUT) median $(median "${t_p[@]}") [${t_p[*]}]"
    rows+=("$(printf '%-10s %8s %13s %8s %13s %8s %13s %8s %8s' "$name" \
        "$m_s" "$(range "${t_s[@]}")" "$m_f" "$(range "${t_f[@]}")" "$m_c" "$(range "${t_c[@]}")" \
        "$(awk -v a="$m_s" -v b="$m_f" 'BEGIN { printf "%.2f", b / a }')" \
        "$(awk -v a="$m_s" -v b="$m_c" 'BEGIN { printf "%.2f", b / a }')")")
done
echo
echo "stream input: median wall seconds (min-max) over $RUNS runs; file/stream and copy/stream"
echo "are qemu-img's time over the stream's (> 1: the stream is faster)"
printf '%-10s %8s %13s %8s %13s %8s %13s %8s %8s\n' image stream min-max "qemu file" min-max "copy+qemu" min-max file/str copy/str
printf '%s\n' "${rows[@]}"
echo "load average $(cut -d' ' -f1-3 /proc/loadavg) at the end"

if [[ -x /usr/bin/time ]]; then
    # CPU seconds (user + sys) of each way, the whole pipeline's (cat and qcowmap; cat and
    # qemu-img): on a loaded machine the wall times above mostly measure waiting for a core at
    # every pipe hand-over, the CPU times what each way costs.
    cpu() { /usr/bin/time -f '%U %S' "$@" 2>&1 >/dev/null | awk 'END { printf "%.3f", $1 + $2 }'; }
    echo
    echo "CPU seconds (user + sys, median of $RUNS)"
    printf '%-10s %8s %10s %10s\n' image stream "qemu file" "copy+qemu"
    for name in dense-1G zlib-1G frag-4G; do
        image=$WORKDIR/$name.qcow2
        c_s=() c_f=() c_c=()
        for ((i = 0; i < RUNS; i++)); do
            c_s+=("$(cpu sh -c 'cat "$1" | "$2" convert --force - "$3"' sh "$image" "$QCOWMAP" "$OUT")"); rm -f "$OUT"
            c_f+=("$(cpu qemu-img convert -f qcow2 -O raw "$image" "$OUT")"); rm -f "$OUT"
            c_c+=("$(cpu sh -c 'cat "$1" >"$2" && qemu-img convert -f qcow2 -O raw "$2" "$3"' sh "$image" "$COPY" "$OUT")"); rm -f "$OUT" "$COPY"
        done
        printf '%-10s %8s %10s %10s\n' "$name" "$(median "${c_s[@]}")" "$(median "${c_f[@]}")" "$(median "${c_c[@]}")"
    done
    rss() { /usr/bin/time -v "$@" 2>&1 >/dev/null | awk -F': ' '/Maximum resident set size/ { printf "%.1f", $2 / 1024 }'; }
    for name in dense-1G zlib-1G frag-4G; do
        image=$WORKDIR/$name.qcow2
        r_s=$(rss sh -c 'cat "$1" | exec "$2" convert --force - "$3"' sh "$image" "$QCOWMAP" "$OUT"); rm -f "$OUT"
        r_q=$(rss qemu-img convert -f qcow2 -O raw "$image" "$OUT"); rm -f "$OUT"
        echo "peak RSS $name: cat | qcowmap convert - ${r_s} MiB (the largest process of the pipeline), qemu-img convert ${r_q} MiB"
    done
fi

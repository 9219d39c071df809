#!/usr/bin/env bash
# The backup lifecycle commands (issue 28) against qemu-img's, side by side in one run, each on
# identical fresh copies of its images (copied before the clock starts) and judged once before
# the timed runs (qemu-img check clean, qemu-img compare identical between the two results):
#
#   commit 1G->4G     qcowmap commit / qemu-img commit of an overlay holding 1 GiB (1 MiB
#                     writes, every 4th MiB of the 4 GiB disk) into a 4 GiB base holding 1 GiB
#                     (other MiBs); the overlay is emptied afterwards by both
#   rebase sibling    rebase (safe mode) of that overlay from its base onto a sibling base that
#                     differs from it in 256 MiB (every 16th MiB): both compare the old and the
#                     new backing under the overlay's unallocated ranges and copy what differs
#   ... -t none       the same two with -t none for both tools (data past the page cache)
#   create 4G x50     50 creates of an empty 4 GiB qcow2 (one process each)
#   bitmap --merge    merging a bitmap with 1 GiB dirty (every 4th MiB) into another, 64 KiB
#                     granularity, on a 4 GiB image (the writes were zero writes: no data)
#
# Both tools sync what they write: qemu-img commit/rebase/bitmap flush on close; qcowmap syncs in
# its crash-safe order (several fdatasync per command).
# usage: bench/lifecycle-compare.sh [QCOWMAP_CLI] [WORKDIR]   (env RUNS, default 5)
# Called by bench/compare-qemu.sh; runs alone too.
set -euo pipefail
shopt -s inherit_errexit

QCOWMAP=${1:-./build/apps/qcowmap}
WORKDIR=${2:-/var/tmp/qcowmap-bench}
RUNS=${RUNS:-5}
die() { echo "lifecycle-compare.sh: $*" >&2; exit 1; }
[[ -x $QCOWMAP ]] || die "'$QCOWMAP' is not an executable (build it, or pass its path)"
QCOWMAP=$(realpath "$QCOWMAP")
mkdir -p "$WORKDIR"
L=$WORKDIR/lifecycle
mkdir -p "$L"
OURS=$L/ours
THEIRS=$L/theirs
trap 'rm -rf "$OURS" "$THEIRS"' EXIT
start=$EPOCHREALTIME

# The pristine images, made once and kept for later runs.
if [[ ! -f $L/top.qcow2 ]]; then
    rm -f "$L"/*.qcow2
    base_writes=() top_writes=() sibling_writes=()
    for ((m = 0; m < 4096; m += 4)); do base_writes+=(-c "write -P 0x11 ${m}M 1M"); done
    for ((m = 1; m < 4096; m += 4)); do top_writes+=(-c "write -P 0x22 ${m}M 1M"); done
    for ((m = 0; m < 4096; m += 16)); do sibling_writes+=(-c "write -P 0x33 ${m}M 1M"); done
    zero_writes=("${top_writes[@]//write -P 0x22/write -z}")
    qemu-img create -q -f qcow2 "$L/base.qcow2" 4G
    qemu-io -f qcow2 "${base_writes[@]}" "$L/base.qcow2" >/dev/null
    cp --sparse=always "$L/base.qcow2" "$L/sibling.qcow2"
    qemu-io -f qcow2 "${sibling_writes[@]}" "$L/sibling.qcow2" >/dev/null
    qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$L/top.qcow2"
    qemu-io -f qcow2 "${top_writes[@]}" "$L/top.qcow2" >/dev/null
    # Two bitmaps: `from` with 1 GiB dirty, `into` empty.
    qemu-img create -q -f qcow2 "$L/bitmaps.qcow2" 4G
    qemu-img bitmap --add "$L/bitmaps.qcow2" from
    qemu-io -f qcow2 "${zero_writes[@]}" "$L/bitmaps.qcow2" >/dev/null
    qemu-img bitmap --add "$L/bitmaps.qcow2" into
fi

# The images a row works on: COPIES are copied fresh (the command changes them), LINKS are
# hard-linked (only read).
COPIES=()
LINKS=()
fresh() { # $1 directory
    local name
    rm -rf "$1"
    mkdir -p "$1"
    for name in "${COPIES[@]}"; do cp --sparse=always "$L/$name" "$1/$name"; done
    for name in "${LINKS[@]}"; do ln "$L/$name" "$1/$name"; done
}
seconds() { # wall seconds of "$@" run in directory $1 (fresh copies made before)
    local dir=$1 t0 t1
    shift
    fresh "$dir"
    sync
    t0=$EPOCHREALTIME
    (cd "$dir" && "$@" >/dev/null)
    t1=$EPOCHREALTIME
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.6f\n", b - a }'
}
. "$(dirname "${BASH_SOURCE[0]}")/stats.sh" # median, range

commit_ours() { "$QCOWMAP" commit top.qcow2; }
commit_qemu() { qemu-img commit -q top.qcow2; }
# -t none: the data written past the page cache (O_DIRECT) by both tools.
commit_ours_direct() { "$QCOWMAP" commit -q -t none top.qcow2; }
commit_qemu_direct() { qemu-img commit -q -t none top.qcow2; }
rebase_ours() { "$QCOWMAP" rebase -b sibling.qcow2 -F qcow2 top.qcow2; }
rebase_qemu() { qemu-img rebase -b sibling.qcow2 -F qcow2 top.qcow2; }
rebase_ours_direct() { "$QCOWMAP" rebase -t none -b sibling.qcow2 -F qcow2 top.qcow2; }
rebase_qemu_direct() { qemu-img rebase -t none -b sibling.qcow2 -F qcow2 top.qcow2; }
create_ours() { for ((k = 0; k < 50; k++)); do "$QCOWMAP" create new.qcow2 4G; done; }
create_qemu() { for ((k = 0; k < 50; k++)); do qemu-img create -q -f qcow2 new.qcow2 4G; done; }
merge_ours() { "$QCOWMAP" bitmap --merge from bitmaps.qcow2 into; }
merge_qemu() { qemu-img bitmap --merge from bitmaps.qcow2 into; }

judge() { # $1 label, rest: the images to judge in ours/ against theirs/
    local label=$1 name
    shift
    for name in "$@"; do
        qemu-img check -q "$OURS/$name" || die "$label: qemu-img check finds errors in $name"
        (cd "$OURS" && qemu-img compare -q "$OURS/$name" "$THEIRS/$name") ||
            die "$label: $name differs from qemu-img's"
    done
}

rows=()
row() { # $1 label, $2 ours, $3 theirs, rest: images to judge
    local label=$1 ours=$2 theirs=$3 i
    shift 3
    fresh "$OURS"
    fresh "$THEIRS"
    (cd "$OURS" && "$ours" >/dev/null)
    (cd "$THEIRS" && "$theirs" >/dev/null)
    judge "$label" "$@"
    if [[ $label == "bitmap --merge" ]]; then
        [[ $("$QCOWMAP" bitmaps --json "$OURS/bitmaps.qcow2" | grep -o '"dirty-bytes": [0-9]*' | sort -u) == \
           $("$QCOWMAP" bitmaps --json "$THEIRS/bitmaps.qcow2" | grep -o '"dirty-bytes": [0-9]*' | sort -u) ]] ||
            die "bitmap --merge: dirty bytes differ from qemu-img's"
    fi
    local -a t_ours=() t_qemu=()
    for ((i = 0; i < RUNS; i++)); do
        if ((i % 2 == 0)); then
            t_ours+=("$(seconds "$OURS" "$ours")")
            t_qemu+=("$(seconds "$THEIRS" "$theirs")")
        else
            t_qemu+=("$(seconds "$THEIRS" "$theirs")")
            t_ours+=("$(seconds "$OURS" "$ours")")
        fi
    done
    local m_ours m_qemu
    m_ours=$(median "${t_ours[@]}")
    m_qemu=$(median "${t_qemu[@]}")
    echo "  $label: qcowmap [${t_ours[*]}] qemu-img [${t_qemu[*]}]"
    rows+=("$(printf '%-16s %9s %13s %9s %13s %7s' "$label" "$m_ours" "$(range "${t_ours[@]}")" \
        "$m_qemu" "$(range "${t_qemu[@]}")" \
        "$(awk -v a="$m_ours" -v b="$m_qemu" 'BEGIN { printf "%.2f", (a > 0 ? b / a : 0) }')")")
}

echo "lifecycle commands against qemu-img, $RUNS runs each (seconds; load average $(cut -d' ' -f1-3 /proc/loadavg)):"
COPIES=(base.qcow2 top.qcow2) LINKS=()
row "commit 1G->4G" commit_ours commit_qemu base.qcow2 top.qcow2
row "commit -t none" commit_ours_direct commit_qemu_direct base.qcow2 top.qcow2
COPIES=(top.qcow2) LINKS=(base.qcow2 sibling.qcow2)
row "rebase sibling" rebase_ours rebase_qemu top.qcow2
row "rebase -t none" rebase_ours_direct rebase_qemu_direct top.qcow2
COPIES=() LINKS=()
row "create 4G x50" create_ours create_qemu new.qcow2
COPIES=(bitmaps.qcow2) LINKS=()
row "bitmap --merge" merge_ours merge_qemu bitmaps.qcow2
echo
echo "median wall time (min-max); ratio = qemu-img / qcowmap (> 1: qcowmap faster)"
printf '%-16s %9s %13s %9s %13s %7s\n' operation qcowmap min-max qemu-img min-max ratio
printf '%s\n' "${rows[@]}"
awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "lifecycle rows took %.1f s\n", b - a }'

#!/usr/bin/env bash
# Fuzzing beyond CI: runs every libFuzzer target in turn for SECONDS each (default 60), with a
# persistent corpus per target in fuzz-corpus/<target>/ (git-ignored) that grows from run to run
# and is seeded from the test images (tests/fuzz/replay_corpus.sh) and the regression inputs.
# Builds build-fuzz with clang, ASan and UBSan, the library instrumented for coverage.
#
#   scripts/fuzz.sh [SECONDS]            every target, SECONDS each
#   FUZZ_TARGETS="fuzz_check" scripts/fuzz.sh 600
#
# Each target runs at `nice -n 19` (FUZZ_NICE to change; the machine stays usable), one at a time. A crash, leak or
# timeout is kept as fuzz-corpus/artifacts/<target>-crash-<sha1> (or -leak-, -timeout-); fix it
# and copy it to tests/fuzz/regressions/ under a name saying what it found. Ends with a table:
# executions, coverage (edges, "cov") and features ("ft") reached, corpus size and findings.
set -uo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
targets=${FUZZ_TARGETS:-"fuzz_image fuzz_snapshots fuzz_bitmaps fuzz_v1 fuzz_backing fuzz_check fuzz_references fuzz_salvage fuzz_stream fuzz_repair"}
build=build-fuzz
corpus=fuzz-corpus

if [ ! -d "$build" ]; then
  CC=clang CXX=clang++ meson setup "$build" --buildtype=debugoptimized -Dfuzzing=libfuzzer \
    -Db_sanitize=address,undefined -Db_lundef=false -Dbench=false >/dev/null || exit 1
fi
build_targets="tests/fuzz/fuzz_image_replay"
for t in $targets; do build_targets="$build_targets tests/fuzz/$t"; done
# shellcheck disable=SC2086
if ! nice -n 19 ninja -C "$build" $build_targets >"$build/fuzz-build.log" 2>&1; then
  tail -30 "$build/fuzz-build.log"
  echo "fuzz: build failed"
  exit 1
fi

# Seeds: the generated test images (heads), their byte-flipped variants are left to the fuzzer.
mkdir -p "$corpus/artifacts" "$corpus/seeds"
QCOWMAP_CORPUS_OUT=$PWD/$corpus/seeds sh tests/fuzz/replay_corpus.sh \
  "$build/tests/fuzz/fuzz_image_replay" tests/fuzz >/dev/null

status=0
summary=""
for t in $targets; do
  mkdir -p "$corpus/$t"
  log="$corpus/$t.log"
  # New inputs go to the first directory (the persistent corpus); seeds and regressions are
  # read only.
  nice -n "${FUZZ_NICE:-19}" "$build/tests/fuzz/$t" -max_total_time="$seconds" -max_len=262144 -timeout=20 \
    -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$PWD/$corpus/artifacts/$t-" \
    "$corpus/$t" "$corpus/seeds" tests/fuzz/regressions >"$log" 2>&1
  rc=$?
  execs=$(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}')
  last=$(grep -E '#[0-9]+.*cov: ' "$log" | tail -1)
  cov=$(sed -E 's/.* cov: ([0-9]+).*/\1/' <<<"$last")
  ft=$(sed -E 's/.* ft: ([0-9]+).*/\1/' <<<"$last")
  files=$(find "$corpus/$t" -type f | wc -l)
  findings=$(find "$corpus/artifacts" -name "$t-*" -type f | wc -l)
  summary+=$(printf '%-18s %12s %8s %8s %8s %9s %5s' "$t" "${execs:-?}" "${cov:-?}" "${ft:-?}" \
    "$files" "$findings" "$rc")$'\n'
  if [ "$rc" -ne 0 ]; then
    status=1
    grep -E 'ERROR|SUMMARY|Test unit written' "$log" | head -5
  fi
done

printf '%-18s %12s %8s %8s %8s %9s %5s\n' target executions cov ft corpus artifacts exit
printf '%s' "$summary"
exit $status

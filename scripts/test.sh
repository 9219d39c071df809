#!/usr/bin/env bash
# The whole test suite on a fresh machine: install dependencies, then build and run every test
# twice, once plainly (warnings as errors) and once under AddressSanitizer + UBSan with
# libstdc++ assertions. The fuzz seed corpus and regression inputs are replayed in both passes.
# Ends with one line "tests: N passed, N failed" summing both passes.
set -uo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh || exit 1

jobs=$(nproc)
passed=0
failed=0
status=0

run_pass() { # run_pass NAME BUILDDIR MESON-ARGS...
  local name=$1 dir=$2
  shift 2
  echo "=== $name: configure + build ($dir)"
  if [ ! -d "$dir" ]; then
    meson setup "$dir" "$@" >/dev/null || { echo "$name: configure failed"; status=1; failed=$((failed + 1)); return; }
  else
    # A build dir from an older checkout keeps its old options: the install test needs the
    # relocatable qcowmap.pc that meson.build now asks for.
    meson configure "$dir" -Dpkgconfig.relocatable=true >/dev/null
  fi
  if ! ninja -C "$dir" -j "$jobs" >"$dir/qcowmap-build.log" 2>&1; then
    tail -50 "$dir/qcowmap-build.log"
    echo "$name: build failed"
    status=1; failed=$((failed + 1)); return
  fi
  echo "=== $name: meson test"
  meson test -C "$dir" --num-processes "$jobs" --print-errorlogs 2>&1 | tee "$dir/qcowmap-test.log" | grep -vE '^\s*$' | tail -40
  local rc=${PIPESTATUS[0]}
  local ok fail
  ok=$(grep -E '^Ok:' "$dir/qcowmap-test.log" | awk '{print $2}')
  fail=$(grep -E '^(Fail|Timeout|Unexpected Pass):' "$dir/qcowmap-test.log" | awk '{s += $NF} END {print s + 0}')
  passed=$((passed + ${ok:-0}))
  failed=$((failed + fail))
  if [ "$rc" -ne 0 ]; then status=1; fi
}

run_pass plain build-test --buildtype=debugoptimized -Dwerror=true -Dbench=true
run_pass sanitize build-sanitize --buildtype=debug -Db_sanitize=address,undefined \
  -Db_lundef=false -Dcpp_args=-D_GLIBCXX_ASSERTIONS -Dbench=false

# ThreadSanitizer over the tests that read one Image from several threads at once (plain
# reads, the parallel decompression that cat/convert use, the read-ahead of Image::visit in
# DataAccess::read mode, compare's workers, the writer's compression and copy threads, the
# stream decoder's decompressing workers, and the blkhash block engine and digest tap).
echo "=== thread: ThreadSanitizer on the concurrency tests (build-tsan)"
if [ -d build-tsan ] || meson setup build-tsan --buildtype=debugoptimized -Db_sanitize=thread \
     -Dbench=false >/dev/null; then
  if ninja -C build-tsan -j "$jobs" apps/qcowmap tests/test_compressed tests/test_oracle \
       tests/test_visit tests/test_compare tests/test_api tests/test_writer tests/test_stream_import \
       tests/test_blkhash tests/test_writable >build-tsan/qcowmap-build.log 2>&1; then
    for run in compressed:'*Concurrency*' oracle:'*Concurrency*' visit:'*' compare:'*' api:'*' \
      writer:'*-WriterLibrary.ReadmeExampleRuns:WriterReadme.*' \
      stream_import:'*PiecesOfAnySize*' \
      blkhash:'Blkhash.*:DigestTap.*:ConvertDigest.LibraryWritersReportTheDigest:BlkhashImages.EqualsTheConstructionOverQemuRawOutput' \
      writable:'Threads.*'; do
      suite=${run%%:*}
      QCOWMAP_BIN=$PWD/build-tsan/apps/qcowmap TSAN_OPTIONS=halt_on_error=1 \
        "build-tsan/tests/test_$suite" --gtest_filter="${run#*:}" >"build-tsan/tsan-$suite.log" 2>&1
      rc=$?
      tail -3 "build-tsan/tsan-$suite.log"
      if [ "$rc" -eq 0 ]; then passed=$((passed + 1)); else failed=$((failed + 1)); status=1; fi
    done
  else
    tail -50 build-tsan/qcowmap-build.log; echo "thread: build failed"; failed=$((failed + 1)); status=1
  fi
else
  echo "thread: configure failed"; failed=$((failed + 1)); status=1
fi

# Bounded libFuzzer runs (clang, ASan + UBSan, library instrumented), one per fuzz target, from
# the generated seed corpus. Fixed seed and run count: the same inputs every time, so CI is
# reproducible; each target counts as one test. QCOWMAP_FUZZ_RUNS sets the runs per target
# (default 100000, each run capped at 60 s: ten targets stay under 11 minutes). A crash is kept by
# libFuzzer in build-fuzz/artifacts; fix it and add it to tests/fuzz/regressions/.
echo "=== fuzz: bounded libFuzzer runs (build-fuzz)"
fuzz_targets="fuzz_image fuzz_snapshots fuzz_bitmaps fuzz_v1 fuzz_backing fuzz_check fuzz_references fuzz_salvage fuzz_stream fuzz_repair"
if [ -d build-fuzz ] || CC=clang CXX=clang++ meson setup build-fuzz --buildtype=debugoptimized \
     -Dfuzzing=libfuzzer -Db_sanitize=address,undefined -Db_lundef=false -Dbench=false >/dev/null; then
  fuzz_build=tests/fuzz/fuzz_image_replay
  for t in $fuzz_targets; do fuzz_build="$fuzz_build tests/fuzz/$t"; done
  # shellcheck disable=SC2086
  if ninja -C build-fuzz -j "$jobs" $fuzz_build >build-fuzz/qcowmap-build.log 2>&1; then
    rm -rf build-fuzz/corpus && mkdir -p build-fuzz/artifacts
    QCOWMAP_CORPUS_OUT=$PWD/build-fuzz/corpus sh tests/fuzz/replay_corpus.sh \
      build-fuzz/tests/fuzz/fuzz_image_replay tests/fuzz >/dev/null
    for t in $fuzz_targets; do
      rm -rf "build-fuzz/work-$t" && mkdir -p "build-fuzz/work-$t"
      "build-fuzz/tests/fuzz/$t" -seed=1 -runs="${QCOWMAP_FUZZ_RUNS:-100000}" -max_total_time=60 \
        -max_len=262144 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$PWD/build-fuzz/artifacts/$t-" "build-fuzz/work-$t" build-fuzz/corpus \
        >"build-fuzz/fuzz-$t.log" 2>&1
      rc=$?
      echo "$t: $(grep -E '^stat::number_of_executed_units' "build-fuzz/fuzz-$t.log" | awk '{print $2}') executions, exit $rc"
      if [ "$rc" -eq 0 ]; then passed=$((passed + 1)); else tail -40 "build-fuzz/fuzz-$t.log"; failed=$((failed + 1)); status=1; fi
    done
  else
    tail -50 build-fuzz/qcowmap-build.log; echo "fuzz: build failed"; failed=$((failed + 1)); status=1
  fi
else
  echo "fuzz: configure failed"; failed=$((failed + 1)); status=1
fi

# House style: every tracked C/C++ source is formatted by the repository's .clang-format.
echo "=== format: clang-format --dry-run over every tracked source"
unformatted=$(git ls-files '*.cpp' '*.hpp' '*.h' '*.c' | xargs clang-format --dry-run 2>&1 | grep -c 'warning:' || true)
if [ "${unformatted:-0}" -eq 0 ]; then
  echo "format: clean"; passed=$((passed + 1))
else
  git ls-files '*.cpp' '*.hpp' '*.h' '*.c' | xargs clang-format --dry-run 2>&1 | grep 'warning:' | head -20
  echo "format: $unformatted places differ from .clang-format"; failed=$((failed + 1)); status=1
fi

echo "tests: $passed passed, $failed failed"
exit $status

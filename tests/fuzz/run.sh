#!/usr/bin/env bash
# Builds the fuzz targets with the stable toolchain (libFuzzer through
# libfuzzer-sys, SanitizerCoverage through rustc flags: what `cargo fuzz
# build -s none` does, without needing cargo-fuzz or nightly) and runs each
# for a bounded time on its seed corpus.
#
#   tests/fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]     (default 20 s, all)
#
# WALTAIL_FUZZ_SEED fixes libFuzzer's random seed (CI sets 1, so a run
# repeats the last one's inputs and goes red only for a change in the code);
# unset, each run explores anew.
#
# Corpus: the committed seeds are tests/fuzz/corpus/<target>/; what a run
# finds is kept in tests/fuzz/target/corpus/<target>/ for the next run.
# A crash leaves its input in tests/fuzz/artifacts/<target>/ and this script
# exits non-zero; replay it with
#   tests/fuzz/target/<triple>/release/<target> tests/fuzz/artifacts/<target>/crash-...
# (or `cargo fuzz run --fuzz-dir tests/fuzz -s none <target> <file>`).
set -euo pipefail
cd "$(dirname "$0")/../.."

secs=${1:-20}
shift || true
all=(frame_decode handshake wal_page wal_scan wal_names)
targets=("${@:-${all[@]}}")

# Longest input per target: a few frames, a handshake, two WAL pages, four
# pages of arbitrary WAL (or a fixture mutation recipe), a name or history.
max_len() {
  case $1 in
    frame_decode) echo 4096 ;;
    handshake) echo 1024 ;;
    wal_page) echo 16388 ;;
    wal_scan) echo 32771 ;;
    *) echo 1024 ;;
  esac
}

fuzz_dir=tests/fuzz
triple=$(rustc -vV | sed -n 's/^host: //p')
export RUSTFLAGS="-Cpasses=sancov-module \
 -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
 -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares \
 --cfg fuzzing -Cdebug-assertions -Coverflow-checks ${RUSTFLAGS:-}"
unset CARGO_TARGET_DIR CARGO_BUILD_TARGET

echo "== building fuzz targets (stable $(rustc --version | cut -d' ' -f2), $triple)"
t0=$(date +%s)
# --target keeps the coverage flags off build scripts and proc macros.
cargo build --release --locked --manifest-path "$fuzz_dir/Cargo.toml" \
  --target "$triple" --target-dir "$fuzz_dir/target" --bins
echo "   built in $(($(date +%s) - t0)) s"

bin_dir=$fuzz_dir/target/$triple/release
failed=()
summary=()
for t in "${targets[@]}"; do
  seeds=$fuzz_dir/corpus/$t
  work=$fuzz_dir/target/corpus/$t
  artifacts=$fuzz_dir/artifacts/$t
  mkdir -p "$work" "$artifacts"
  log=$fuzz_dir/target/fuzz-$t.log
  echo "== fuzzing $t for ${secs} s"
  t0=$(date +%s)
  rc=0
  # Corpus directories: new finds go to the first.
  "$bin_dir/$t" "$work" "$seeds" \
    -max_total_time="$secs" -max_len="$(max_len "$t")" -timeout=10 \
    -seed="${WALTAIL_FUZZ_SEED:-0}" \
    -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$artifacts/" \
    >"$log" 2>&1 || rc=$?
  took=$(($(date +%s) - t0))
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  last=$(grep -E '^#[0-9]+.*cov: ' "$log" | tail -1 || true)
  cov=$(sed -n 's/.*cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.*ft: \([0-9]*\).*/\1/p' <<<"$last")
  corp=$(sed -n 's/.*corp: \([0-9]*\).*/\1/p' <<<"$last")
  line=$(printf '%-13s runs %9s  exec/s %6s  cov %5s  ft %6s  corpus %5s  %3d s' \
    "$t" "${runs:-?}" "${speed:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" "$took")
  if [ "$rc" != 0 ]; then
    line="$line  FAILED (exit $rc)"
    failed+=("$t")
    echo "-- $t failed (exit $rc); from its log ($log):"
    grep -m1 -A3 'panicked at' "$log" || true
    tail -12 "$log"
    for a in "$artifacts"/*; do
      [ -e "$a" ] && echo "   reproducer: $a   replay: $bin_dir/$t $a"
    done
  fi
  echo "   $line"
  summary+=("$line")
done

echo "== fuzzing summary (${secs} s per target)"
printf '   %s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzzing FAILED: ${failed[*]} (reproducers in $fuzz_dir/artifacts/)"
fi
echo "fuzz: $((${#targets[@]} - ${#failed[@]})) passed, ${#failed[@]} failed"
[ ${#failed[@]} -eq 0 ]

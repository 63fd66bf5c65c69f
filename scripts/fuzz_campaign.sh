#!/usr/bin/env bash
# A fuzzing campaign over every libFuzzer target of fuzz/ (the clang ASan+UBSan build,
# `make test-asan` or `make fuzz`): each target runs for SECONDS on a private copy of its seed
# corpus (the checked-in corpus is never modified), JOBS targets at a time, one process each.
# Prints, per target, the executions, new coverage, corpus size and the outcome, then the total.
# Exit status 1 when any target crashed, leaked, hit a sanitizer report or broke an invariant
# (the reproducer is in BUILD/fuzz/campaign/<name>/artifacts/, replay it with
# BUILD/fuzz/<name>_replay <file>).
#
#   scripts/fuzz_campaign.sh BUILD_DIR SECONDS [JOBS]
set -uo pipefail
build=${1:?usage: fuzz_campaign.sh BUILD_DIR SECONDS [JOBS]}
seconds=${2:?usage: fuzz_campaign.sh BUILD_DIR SECONDS [JOBS]}
jobs=${3:-$(nproc)}
src=$(cd "$(dirname "$0")/.." && pwd)
build=$(cd "$build" && pwd)

# Target name -> corpus folder (fuzz/CMakeLists.txt's CORPUS arguments).
declare -A corpus=(
  [safetensors_header_fuzz]=safetensors [lora_format_fuzz]=lora
  [single_file_fuzz]=single_file [tokenizer_fuzz]=tokenizer
  [image_decode_fuzz]=image [generate_request_fuzz]=generate)

for name in "${!corpus[@]}"; do
  if [[ ! -x "$build/fuzz/$name" ]]; then
    echo "fuzz_campaign: $build/fuzz/$name is not built (configure with -DDS_SANITIZE=address)" >&2
    exit 2
  fi
done

export ASAN_OPTIONS=${ASAN_OPTIONS:-$(cat "$src/sanitizers/asan.options")}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-$(cat "$src/sanitizers/ubsan.options")}
export LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$src/sanitizers/lsan.supp:print_suppressions=0}
export OMP_NUM_THREADS=1 DS_GOLDEN_DIR=${DS_GOLDEN_DIR:-$src/../shared/golden}

run_one() {
  local name=$1 dir="$build/fuzz/campaign/$1"
  rm -rf "$dir" && mkdir -p "$dir/corpus" "$dir/artifacts"
  cp -R "$src/fuzz/corpus/${corpus[$name]}/." "$dir/corpus/"
  "$build/fuzz/$name" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="$dir/artifacts/" "$dir/corpus" >"$dir/log" 2>&1
  echo $? >"$dir/rc"
}
running=0
for name in $(printf '%s\n' "${!corpus[@]}" | sort); do
  run_one "$name" &
  running=$((running + 1))
  if ((running >= jobs)); then
    wait -n
    running=$((running - 1))
  fi
done
wait

total=0
failed=0
printf '%-26s %14s %10s %8s %8s  %s\n' target executions exec/s cov corpus outcome
for name in $(printf '%s\n' "${!corpus[@]}" | sort); do
  dir="$build/fuzz/campaign/$name"
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$dir/log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$dir/log" | tail -1)
  cov=$(grep -oE 'cov: [0-9]+' "$dir/log" | tail -1 | cut -d' ' -f2)
  units=$(find "$dir/corpus" -type f | wc -l)
  rc=$(cat "$dir/rc")
  outcome=ok
  if [[ "$rc" != 0 ]]; then
    outcome="FAILED (rc $rc; see $dir/log, artifacts in $dir/artifacts)"
    failed=1
  fi
  printf '%-26s %14s %10s %8s %8s  %s\n' "$name" "${execs:-?}" "${rate:-?}" "${cov:-?}" \
    "$units" "$outcome"
  total=$((total + ${execs:-0}))
done
printf '%-26s %14s\n' total "$total"
exit $failed

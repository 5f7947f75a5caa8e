#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (ASan + UBSan) and runs each for a bounded number of
# inputs with a fixed seed (reproducible on any machine), starting from the seed corpus in
# tests/fuzz/corpus/<target>; new inputs go to a scratch directory, the repository's corpus is left
# as it is. Two targets run at a time (each fuzzer is one process). Prints, per target, the
# inputs executed, the new inputs kept and the coverage reached.
#
# A campaign is reproducible: the same commit, seed, input count and paths give the same inputs on
# every run. libFuzzer re-reads its output folder every second by default (-reload=0 turns that off) and
# its mutations take comparison operands from memory, whose addresses move with ASLR (setarch -R
# turns it off for the fuzzer). Before the campaigns, each target runs a short one (20 000 inputs)
# twice, in the same paths, and reports whether both gave the same coverage, features and new
# inputs (a difference is a warning on the target's line).
# A failing input is kept in fuzz-artifacts/<target>/ (printed, with the log's tail); replay it
# with `build-dir/tests/fuzz/<target> fuzz-artifacts/<target>/crash-…`.
# Usage: scripts/fuzz.sh [inputs per target, default 400000] [seed, default 1]
# MMKD_FUZZ_BUILD=dir uses an existing clang build tree configured with -DMMKD_BUILD_FUZZERS=ON
# (.ci/run passes its sanitizer build) instead of configuring build-fuzz.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-400000}"
seed="${2:-1}"
build="${MMKD_FUZZ_BUILD:-}"
targets="fuzz_logit fuzz_multimodal fuzz_contrastive fuzz_review"
if [[ -z "$build" ]]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq cmake make clang libclang-rt-14-dev libeigen3-dev ccache time >/dev/null
  source scripts/build_env.sh
  build=build-fuzz
  cmake -S . -B "$build" -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=Debug \
    -DMMKD_BUILD_FUZZERS=ON -DMMKD_BUILD_TESTS=OFF -DMMKD_BUILD_BENCHMARKS=OFF \
    -DMMKD_BUILD_EXAMPLES=OFF -DMMKD_WITH_TORCH=OFF -DMMKD_INSTALL=OFF \
    "$(mmkd_launcher_option)" >/dev/null
fi
# shellcheck disable=SC2086
cmake --build "$build" --target $targets -j 2
build="$(cd "$build" && pwd)"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
artifacts="$PWD/fuzz-artifacts"
export build scratch runs seed artifacts
# campaign TARGET RUNS OUT LOG: one run from the seed corpus into the folder OUT.
campaign() {
  local target="$1" corpus="$PWD/tests/fuzz/corpus/$1"
  mkdir -p "$3" "$artifacts/$target"
  (cd "$scratch" && setarch -R "$build/tests/fuzz/$target" -runs="$2" -seed="$seed" -reload=0 \
     -print_final_stats=1 -artifact_prefix="$artifacts/$target/" "$3" "$corpus") >"$4" 2>&1
}
# The final line and counters of a campaign's log.
stats() { grep -E 'DONE|stat::(number_of_executed_units|new_units_added)' "$1" | sed 's/exec\/s.*//'; }
failed() {
  echo "== $1: FAILED; its input is kept in $artifacts/$1/:"
  ls -l "$artifacts/$1/"
  tail -60 "$2"
  return 1
}
run_one() {
  local target="$1" corpus="$PWD/tests/fuzz/corpus/$1" log="$scratch/$1.log"
  for k in 1 2; do
    # The same output path both times: the paths a campaign is given change its heap layout, and
    # with it the addresses libFuzzer's comparison tracing feeds back into the mutations.
    rm -rf "$scratch/$target.repro"
    campaign "$target" 20000 "$scratch/$target.repro" "$log.repro$k" || { failed "$target" "$log.repro$k"; return 1; }
  done
  local repro="reproducible: a 20 000-input campaign gave the same stats twice"
  if ! diff <(stats "$log.repro1") <(stats "$log.repro2") >/dev/null; then
    # Seen once in CI when the two runs wrote to different paths: the stage reports it on the
    # target's line, and the campaign's verdict is still its own.
    echo "== $target: warning: the same short campaign ran twice gave different results:"
    stats "$log.repro1"; stats "$log.repro2"
    repro="NOT reproducible: two 20 000-input campaigns differed, see the warning above"
  fi
  campaign "$target" "$runs" "$scratch/$target" "$log" || { failed "$target" "$log"; return 1; }
  echo "== $target: passed, $(awk '/stat::number_of_executed_units/ {print $2}' "$log") inputs," \
       "$(awk '/stat::new_units_added/ {print $2}' "$log") new inputs kept," \
       "$(grep -Eo 'cov: [0-9]+' "$log" | tail -1) edges, from $(ls "$corpus" | wc -l) seed inputs" \
       "($repro)"
}
export -f campaign stats failed run_one
# shellcheck disable=SC2086
printf '%s\n' $targets | xargs -P 2 -I{} bash -c 'run_one {}'

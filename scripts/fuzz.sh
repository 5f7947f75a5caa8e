#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (ASan + UBSan) and runs each for a bounded number of
# inputs with a fixed seed (reproducible on any machine), starting from the seed corpus in
# tests/fuzz/corpus/<target>; new inputs go to a scratch directory, the repository's corpus is left
# as it is. Two targets run at a time (each fuzzer is one process). Prints, per target, the
# inputs executed, the new inputs kept and the coverage reached.
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
  apt-get install -y -qq cmake make clang libclang-rt-14-dev libeigen3-dev >/dev/null
  build=build-fuzz
  cmake -S . -B "$build" -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=Debug \
    -DMMKD_BUILD_FUZZERS=ON -DMMKD_BUILD_TESTS=OFF -DMMKD_BUILD_BENCHMARKS=OFF \
    -DMMKD_BUILD_EXAMPLES=OFF -DMMKD_WITH_TORCH=OFF -DMMKD_INSTALL=OFF >/dev/null
fi
# shellcheck disable=SC2086
cmake --build "$build" --target $targets -j 2
build="$(cd "$build" && pwd)"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
export build scratch runs seed
run_one() {
  local target="$1" corpus="$PWD/tests/fuzz/corpus/$1"
  mkdir -p "$scratch/$target"
  if (cd "$scratch" && "$build/tests/fuzz/$target" -runs="$runs" -seed="$seed" \
        -print_final_stats=1 "$scratch/$target" "$corpus") >"$scratch/$target.log" 2>&1; then
    local log="$scratch/$target.log"
    echo "== $target: passed, $(awk '/stat::number_of_executed_units/ {print $2}' "$log") inputs," \
         "$(awk '/stat::new_units_added/ {print $2}' "$log") new inputs kept," \
         "$(grep -Eo 'cov: [0-9]+' "$log" | tail -1) edges, from $(ls "$corpus" | wc -l) seed inputs"
  else
    echo "== $target: FAILED"; tail -60 "$scratch/$target.log"; return 1
  fi
}
export -f run_one
# shellcheck disable=SC2086
printf '%s\n' $targets | xargs -P 2 -I{} bash -c 'run_one {}'

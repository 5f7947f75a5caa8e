#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (ASan + UBSan) and runs each for a bounded number of
# inputs with a fixed seed (reproducible on any machine), starting from the seed corpus in
# tests/fuzz/corpus/<target>; new inputs go to a scratch directory, the repository's corpus is left
# as it is. Usage: scripts/fuzz.sh [inputs per target, default 400000] [seed, default 1]
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-400000}"
seed="${2:-1}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq cmake make clang libclang-rt-14-dev libeigen3-dev >/dev/null
cmake -S . -B build-fuzz -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=Debug \
  -DMMKD_BUILD_FUZZERS=ON -DMMKD_BUILD_TESTS=OFF -DMMKD_BUILD_BENCHMARKS=OFF \
  -DMMKD_BUILD_EXAMPLES=OFF -DMMKD_WITH_TORCH=OFF -DMMKD_INSTALL=OFF
cmake --build build-fuzz -j 2
scratch="$(mktemp -d)"
for target in fuzz_logit fuzz_multimodal fuzz_contrastive fuzz_review; do
  mkdir -p "$scratch/$target"
  echo "== $target: $runs inputs, seed $seed"
  (cd "$scratch" && "$OLDPWD/build-fuzz/tests/fuzz/$target" -runs="$runs" -seed="$seed" \
     -print_final_stats=1 "$scratch/$target" "$OLDPWD/tests/fuzz/corpus/$target")
done
rm -rf "$scratch"

#!/usr/bin/env bash
# Installs what the demo needs from Debian's packages, builds it and runs it: the quickstart (every
# loss on a toy batch), then the end-to-end distillation demo on the UCI digits
# (examples/digits_distillation.cpp; results and curves in ./digits_results).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq cmake g++ make libeigen3-dev gnuplot-nox >/dev/null
cmake -S . -B build-demo -DCMAKE_BUILD_TYPE=Release \
  -DMMKD_BUILD_TESTS=OFF -DMMKD_BUILD_BENCHMARKS=OFF -DMMKD_BUILD_EXAMPLES=ON -DMMKD_WITH_TORCH=OFF
cmake --build build-demo --target quickstart digits_distillation -j 2
./build-demo/examples/quickstart
echo
./build-demo/examples/digits_distillation --out digits_results "$@"

#!/usr/bin/env bash
# Runs the benchmarks (mmkd and libtorch, single thread, same binary) and prints the README table.
# Extra arguments go to Google Benchmark, e.g. --benchmark_filter=LogitKD.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq cmake g++ make python3 libeigen3-dev catch2 libbenchmark-dev libtorch-dev \
  libopenblas0-openmp libopenblas-openmp-dev >/dev/null
cmake -S . -B build-bench -DCMAKE_BUILD_TYPE=Release -DMMKD_BUILD_TESTS=OFF -DMMKD_BUILD_EXAMPLES=OFF
cmake --build build-bench -j 2
mkdir -p build-bench/results
for b in build-bench/benchmarks/bench_*; do
  name=$(basename "$b")
  OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 "$b" --benchmark_out="build-bench/results/$name.json" --benchmark_out_format=json \
    --benchmark_repetitions=3 --benchmark_report_aggregates_only=true "$@"
done
python3 benchmarks/report.py build-bench/results/*.json

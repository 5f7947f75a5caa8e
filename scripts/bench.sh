#!/usr/bin/env bash
# Runs every benchmark (mmkd and libtorch in the same binary, with MMKD_OPENMP on) on 1 and on 2
# threads and prints the README's tables. Extra arguments go to Google Benchmark, e.g.
# --benchmark_filter=LogitKD.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq cmake g++ make python3 libeigen3-dev catch2 libbenchmark-dev libtorch-dev \
  libopenblas0-openmp libopenblas-openmp-dev >/dev/null
cmake -S . -B build-bench -DCMAKE_BUILD_TYPE=Release -DMMKD_OPENMP=ON -DMMKD_BUILD_TESTS=OFF \
  -DMMKD_BUILD_EXAMPLES=OFF
cmake --build build-bench -j 2
rm -rf build-bench/results
mkdir -p build-bench/results
for threads in 1 2; do
  for b in build-bench/benchmarks/bench_*; do
    name=$(basename "$b")
    # OMP_NUM_THREADS sets mmkd's loops and Eigen's products; libtorch is given the same count.
    OMP_NUM_THREADS=$threads OPENBLAS_NUM_THREADS=$threads "$b" \
      --benchmark_out="build-bench/results/${name}_t$threads.json" --benchmark_out_format=json \
      --benchmark_context=threads=$threads --benchmark_repetitions=3 \
      --benchmark_report_aggregates_only=true "$@"
  done
done
python3 benchmarks/report.py build-bench/results/*.json

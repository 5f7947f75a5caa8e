#!/usr/bin/env bash
# Runs every benchmark (mmkd and libtorch in the same binary, with MMKD_OPENMP on) on 1 and on 2
# threads and prints the tables of docs/benchmarks.md. Extra arguments go to Google Benchmark, e.g.
# --benchmark_filter=LogitKD.
# With --busy first: mmkd's benchmarks only, each while one busy process per core competes for the
# cores (MMKD_BENCH_BUSY), and a table of the 2-thread time over the 1-thread time under that load.
set -euo pipefail
cd "$(dirname "$0")/.."
busy=0
if [[ "${1:-}" == "--busy" ]]; then
  busy=$(nproc)
  shift
  set -- --benchmark_filter='^mmkd' "$@"
fi
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
    MMKD_BENCH_BUSY=$busy OMP_NUM_THREADS=$threads OPENBLAS_NUM_THREADS=$threads "$b" \
      --benchmark_out="build-bench/results/${name}_t$threads.json" --benchmark_out_format=json \
      --benchmark_context=threads=$threads --benchmark_repetitions=3 \
      --benchmark_report_aggregates_only=true "$@"
  done
done
if (( busy > 0 )); then
  python3 benchmarks/report.py --load build-bench/results/*.json
else
  python3 benchmarks/report.py build-bench/results/*.json
fi

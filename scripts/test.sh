#!/usr/bin/env bash
# Installs what the tests need from Debian's packages (libtorch for the cross-checks and the bridge,
# OpenBLAS so libtorch runs on a real BLAS, OpenMPI for the distributed InfoNCE check, Doxygen for
# the API reference check), builds
# everything and runs the whole suite.
#
#   bash scripts/test.sh                  the whole suite (build/)
#   bash scripts/test.sh --quick FAMILY   the quick loop after a change: builds and runs only the
#                                         unit and allocation tests of one family (build-quick/,
#                                         no libtorch, benchmarks or examples; no apt). FAMILY is
#                                         core, logit, multimodal, structure, contrastive or review.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=2
source scripts/build_env.sh

if [[ "${1:-}" == "--quick" ]]; then
  family="${2:?usage: scripts/test.sh --quick FAMILY}"
  cmake -S . -B build-quick -DCMAKE_BUILD_TYPE=Release -DMMKD_OPENMP=ON -DMMKD_WITH_TORCH=OFF \
    -DMMKD_BUILD_BENCHMARKS=OFF -DMMKD_BUILD_EXAMPLES=OFF -DMMKD_INSTALL=OFF -DMMKD_COMPILED=OFF \
    "$(mmkd_launcher_option)" >/dev/null
  cmake --build build-quick --target "mmkd_check_$family" -j "$jobs"
  exec ctest --test-dir build-quick -L "^$family\$" -j "$jobs" --output-on-failure
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq cmake g++ make libeigen3-dev catch2 libbenchmark-dev libtorch-dev \
  libopenblas0-openmp libopenblas-openmp-dev openmpi-bin libopenmpi-dev ccache time pkg-config doxygen \
  >/dev/null
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DMMKD_OPENMP=ON "$(mmkd_launcher_option)"
mmkd_ccache_zero
cmake --build build -j "$jobs"
mmkd_ccache_report
ctest --test-dir build -j "$jobs" --output-on-failure

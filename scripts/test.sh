#!/usr/bin/env bash
# Installs what the tests need from Debian's packages (libtorch for the cross-checks and the bridge,
# OpenBLAS so libtorch runs on a real BLAS, OpenMPI for the distributed InfoNCE check), builds
# everything and runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq cmake g++ make libeigen3-dev catch2 libbenchmark-dev libtorch-dev \
  libopenblas0-openmp libopenblas-openmp-dev openmpi-bin libopenmpi-dev >/dev/null
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DMMKD_OPENMP=ON
cmake --build build -j 2
ctest --test-dir build --output-on-failure

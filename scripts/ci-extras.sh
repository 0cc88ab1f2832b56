#!/usr/bin/env bash
# The builds `.ci/run` checks besides the README's test command:
#  1. data parallel: Open MPI (Debian's packages, installed here if missing) and
#     `cargo test --release --features mpi --test dist` (two ranks = one process; a killed rank);
#  2. the CUDA + NCCL build type-checks (scripts/cuda-check.sh; no GPU or toolkit needed).
# Without root or a reachable package registry, part 1 says SKIPPED and part 2 checks
# `--features cuda` alone (NCCL's backend needs MPI's headers).
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
need=0
command -v mpicc >/dev/null || need=1
ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1 || ldconfig -p | grep -q 'libclang[-0-9.]*\.so' || need=1
if [ $need = 1 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing Open MPI and libclang (Debian packages) for the data-parallel tests"
        (apt-get install -y --no-install-recommends libopenmpi-dev openmpi-bin libclang-dev >/dev/null 2>&1 \
            || { apt-get update >/dev/null 2>&1 && apt-get install -y --no-install-recommends libopenmpi-dev openmpi-bin libclang-dev >/dev/null 2>&1; }) \
            || echo "apt-get could not install Open MPI"
    fi
fi
if command -v mpicc >/dev/null && command -v mpirun >/dev/null; then
    cargo test --release --features mpi --test dist || status=1
    nccl=(--features nccl)
else
    echo "SKIPPED: the data-parallel tests with --features mpi (no Open MPI here)"
    nccl=()
fi
bash scripts/cuda-check.sh "${nccl[@]}" || status=1
exit $status

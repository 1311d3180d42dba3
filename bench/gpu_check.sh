#!/usr/bin/env bash
# The first thing to run on a GPU machine: proves rnnkit's CUDA paths in one go, in under
# 8 minutes on one GPU, and writes one table with the device's name (bench/gpu_check.py says
# what it runs). The device machines cannot reach ../shared: copy the corpora the throughput
# benchmarks read (tinyshakespeare, multi30k) into ./shared/data (git ignores it) to carry them.
#   bash bench/gpu_check.sh                       (table: bench/out/gpu_check/gpu_check.md, or $OUT/)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -d ../shared/data ] && [ -d shared/data ]; then
    ln -sfn "$PWD/shared" ../shared      # the benchmarks read ../shared/data
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" bench/gpu_check.py --out "${OUT:-bench/out/gpu_check}" "$@"

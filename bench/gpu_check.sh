#!/usr/bin/env bash
# GPU check of the memory benchmark and the planner, at the real shapes (49x480x720, batch 1, rank 128).
#
# Builds full-size CogVideoX-2b and -5b from their published configs with random weights (no download),
# caps our modes at 24 GiB with torch.cuda.set_per_process_memory_fraction (the reference recipe runs
# uncapped so that its peak is known), runs every mode of bench/bench_memory.py for a few steps and prints
# peak memory, s/step and `lowmem-eraser plan`'s prediction side by side. Budget: <= 10 minutes.
#
#   bash bench/gpu_check.sh [WHEEL_DIR]
#
# WHEEL_DIR: a local folder of wheels; missing packages (diffusers, bitsandbytes, pytest-benchmark, the
# project itself) are installed from it with `pip install --no-index`, so no network is needed.
# Results: bench/results/memory_gpu_cogvideox-{2b,5b}.md and .png.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
WHEELS=${1:-}
unset TRITON_INTERPRET  # the real Triton kernels, not the interpreter

install() {  # install "$@" from the wheel folder, or stop with a clear message
    if [ -z "$WHEELS" ]; then
        echo "gpu_check: missing $*; run again with a local wheel folder: bash bench/gpu_check.sh WHEEL_DIR" >&2
        exit 2
    fi
    echo "gpu_check: installing $* from $WHEELS (pip --no-index)"
    "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" "$@"
}

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device')"
missing=()
for pair in diffusers:diffusers bitsandbytes:bitsandbytes pytest_benchmark:pytest-benchmark; do
    "$PY" -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then install "${missing[@]}"; fi
if ! "$PY" -c "import lowmem_eraser.plan" 2>/dev/null; then
    echo "gpu_check: installing this project (editable, no dependencies)"
    "$PY" -m pip install --quiet --no-index --no-deps --no-build-isolation ${WHEELS:+--find-links "$WHEELS"} -e .
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

status=0
# 2b first (quicker); each model gets a hard time limit so that the whole check stays under 10 minutes.
for spec in cogvideox-2b:240:2 cogvideox-5b:330:1; do
    IFS=: read -r model limit rounds <<<"$spec"
    echo "=== $model: 49x480x720, ours capped at 24 GiB, $rounds timed step(s) per mode after a warm-up (limit ${limit}s)"
    LOWMEM_BENCH_MODEL=$model LOWMEM_BENCH_CAP_GB=24 LOWMEM_BENCH_ROUNDS=$rounds \
        timeout "$limit" "$PY" -m pytest bench/bench_memory.py -q -s -p no:cacheprovider -o addopts="" \
        --benchmark-disable-gc --benchmark-columns=median || { status=1; echo "gpu_check: $model failed or hit its limit (rows printed so far are valid)"; }
done
exit $status

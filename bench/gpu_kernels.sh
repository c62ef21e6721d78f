#!/usr/bin/env bash
# Kernel check and benchmarks on a CUDA machine, a few minutes in all:
#   1. the kernel tests compiled for the GPU (TRITON_INTERPRET=0): CPU runs only ever use the interpreter;
#   2. bench/bench_kernels.py at the real CogVideoX shapes -> bench/results/kernels.md.
# Both run even if the first fails; the exit status is non-zero if either did. Output is teed to
# $OUT/gpu_kernels.log (and the table copied to $OUT/) when OUT is set.
# Installs nothing beyond `pip install -e '.[test]'`, and that only if the package is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"

"$PY" -c "import lowmem_eraser, pytest_benchmark, bitsandbytes" 2>/dev/null || "$PY" -m pip install -e '.[test]'

log=/dev/null
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  log="$OUT/gpu_kernels.log"
  : > "$log"
fi
run() { "$@" 2>&1 | tee -a "$log"; }

status=0
run nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
run env TRITON_INTERPRET=0 "$PY" -m pytest tests/test_kernel_eraser_adapter.py tests/test_kernel_int8_linear.py \
  -q -p no:cacheprovider || status=1
run env -u TRITON_INTERPRET "$PY" -m pytest bench/bench_kernels.py -q -s -p no:cacheprovider \
  --benchmark-columns=median,min,max,rounds || status=1

if [[ -n "${OUT:-}" && -f bench/results/kernels.md ]]; then
  cp bench/results/kernels.md "$OUT/"
fi
exit "$status"

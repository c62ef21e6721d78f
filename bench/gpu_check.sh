#!/usr/bin/env bash
# The one check to run on the first GPU lent to this project. On an H200: an estimated 6-7 minutes (nothing has
# run on a GPU yet), never more than 9: every step has a cap and all of them share a 530 s budget (the device tool's call
# limit is 600 s; with the machine's start this stays inside the 15 minutes of device time).
#
#   bash bench/gpu_check.sh [WHEEL_DIR]          (WHEEL_DIR defaults to bench/wheels)
#   device tool: run(command="GPU_CHECK_COMMIT=<sha> bash bench/gpu_check.sh bench/wheels", carry=["bench/wheels"],
#                    timeout_s=600)   (the copy there has no .git: pass the commit, and run from a clean tree)
#
# Needs the device image (torch, triton, transformers, accelerate, pytest, pytest-benchmark) and the wheels in
# WHEEL_DIR, installed with pip --no-index --no-deps. diffusers is required by steps c and d; get its wheel (pure
# Python) where pip works:  python3 -m pip download --no-deps --only-binary=:all: -d bench/wheels diffusers==0.42.1
# bitsandbytes is optional: without it, step b prints a note and leaves out its bnb columns.
#
# Steps, each time-boxed and run whatever the earlier ones did; the exit status is non-zero if any failed:
#   (estimated H200 time / cap)
#   setup  the wheels, then this project (editable, no dependencies)                                  ~15 s / 60+60 s
#   a      kernel tests compiled for the GPU: TRITON_INTERPRET=0 (tests/conftest.py would default it    ~50 s / 60+100 s
#          to 1, the interpreter that CPU runs use), after a check that the tests really pick cuda
#   b      kernel benchmark at the real shapes: fused vs eager and torch.compile, int8 vs cuBLAS      ~90 s / 130 s
#   c      offload on CUDA: swap all / 3 of 4 blocks, activations, both vs resident gradients    ~60 s / 100 s
#          (check_offload_cuda.py: 40 training steps at 4 real-size blocks; its cap took 25 s from 5b's)
#   d      planner vs measured per stage (T5-XXL encode, x0 / infer forwards, VAE decode), 2b      ~60 s / 90 s
#   e      full-size memory bench, CogVideoX-2b and -5b at 49x480x720, ours capped at 24 GiB    ~90+180 s / 130+205 s
#          (the last step: if the budget runs out, 5b keeps the rows it finished). Its rows include the memory
#          ladder (swap half / all, activation offload) and a calibration of the planner's step-time model:
#          measured achieved TFLOP/s and pinned H2D GB/s, predicted vs measured s/step per rung
# Writes bench/results/gpu.md (the step table, then every result table) and bench/results/gpu.log; with $OUT set
# (the device tool), copies both and the result files there (8 files, the tool's limit).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${1:-bench/wheels}
RESULTS=bench/results
LOG=$RESULTS/gpu.log
BUDGET=${GPU_CHECK_BUDGET_S:-530}  # all steps together; each also has its own cap below
PARTS=(kernels.md offload_cuda.md stages_cuda.md memory_gpu_cogvideox-2b.md memory_gpu_cogvideox-5b.md)
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0  # compiled Triton kernels everywhere, output as it happens
# The allocator setting `lowmem-eraser train` uses, so that reserved peaks are those of a real run.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

STEPS=()  # rows of the step table
FAILED=0
STEP_LOG=$(mktemp)

step() {  # step NAME CAP_S CMD...: run CMD for at most CAP_S seconds, or what is left of the budget if less
    local name=$1 cap=$2 began=$SECONDS rc result summary
    shift 2
    local limit=$((DEADLINE - SECONDS < cap ? DEADLINE - SECONDS : cap))
    if ((limit < 15)); then
        echo "=== $name: NOT RUN, the ${BUDGET}s budget is spent"
        STEPS+=("| $name | NOT RUN: budget spent | 0 | - | |")
        FAILED=1
        return
    fi
    echo "=== $name (limit ${limit}s)"
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$STEP_LOG"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) result=ok ;;
        124 | 137) result="TIMEOUT" ;;
        *) result="FAILED (exit $rc)" ;;
    esac
    ((rc == 0)) || FAILED=1
    # pytest's last line, e.g. "36 passed in 41.2s" (absent when the step was killed)
    summary=$(grep -E '[0-9]+ (passed|failed|errors?|skipped).* in [0-9.]+s' "$STEP_LOG" | tail -1 | tr -d '=')
    STEPS+=("| $name | $result | $((SECONDS - began)) | $limit | ${summary# } |")
    printf '\n=== %s: %s after %ss\n' "$name" "$result" "$((SECONDS - began))"  # pytest -s may end mid-line
}

main() {
    DEADLINE=$((SECONDS + BUDGET))
    if ! timeout 120 "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check: no CUDA device (torch.cuda.is_available() is False or torch is missing for $PY," \
             "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}): run this on the GPU machine" >&2
        return 2
    fi
    timeout 60 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
    (cd "$RESULTS" && rm -f gpu.md "${PARTS[@]}" memory_gpu_cogvideox-2b.png memory_gpu_cogvideox-5b.png)

    shopt -s nullglob
    local wheels=("$WHEELS"/*.whl)
    if ((${#wheels[@]})); then
        step "setup: wheels" 60 "$PY" -m pip install -q --no-index --no-deps --no-cache-dir "${wheels[@]}"
    fi
    if ! "$PY" -c "import diffusers" 2>/dev/null; then  # steps a and b do not need it: carry on
        echo "gpu_check: diffusers is not importable (no wheel in $WHEELS, or its install failed); steps c and d" \
             "will fail. Carry its wheel: see the top of bench/gpu_check.sh"
        STEPS+=("| setup: diffusers | FAILED: not importable (wheel in $WHEELS?) | 0 | - | |")
        FAILED=1
    fi
    if ! "$PY" -c "import lowmem_eraser.kernels" 2>/dev/null; then  # kernels/ is mapped in by the install
        step "setup: this project" 60 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .
    fi
    if ! "$PY" -c "import lowmem_eraser.kernels" 2>/dev/null; then
        # No setuptools in the image (the editable install needs it): put the package on the path instead, with
        # kernels/ linked where the install would map it (this copy of the tree lives only on the GPU machine).
        echo "gpu_check: editable install unavailable; using PYTHONPATH=$PWD with lowmem_eraser/kernels -> ../kernels"
        ln -sfn ../kernels lowmem_eraser/kernels
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
    local versions
    versions=$(timeout 60 "$PY" - <<'EOF' 2>/dev/null
import importlib, torch
found = []
for name in ("torch", "triton", "diffusers", "transformers", "bitsandbytes"):
    try:
        found.append(f"{name} {importlib.import_module(name).__version__}")
    except Exception as error:  # bitsandbytes may fail in ways other than ImportError
        found.append(f"{name} not importable ({type(error).__name__})")
print(f"{torch.cuda.get_device_name()}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB; "
      + ", ".join(found))
EOF
)
    echo "$versions"

    step "a. kernel tests pick cuda" 60 "$PY" -c "
import sys; sys.path.insert(0, 'tests')
import test_kernel_eraser_adapter as a, test_kernel_int8_linear as b
assert a.DEVICE == b.DEVICE == 'cuda', f'the kernel tests would run on {a.DEVICE} / {b.DEVICE}, not cuda'
print('kernel tests run on', a.DEVICE)"
    local parallel=()  # each test compiles its own kernel variants: compile them in parallel where xdist is there
    "$PY" -c "import xdist" 2>/dev/null && parallel=(-n 8)
    step "a. kernel tests (compiled)" 100 "$PY" -m pytest -q -rs -p no:cacheprovider "${parallel[@]}" \
        tests/test_kernel_eraser_adapter.py tests/test_kernel_int8_linear.py
    step "b. kernel benchmark" 130 "$PY" -m pytest -q -s -p no:cacheprovider bench/bench_kernels.py
    step "c. offload on CUDA" 100 "$PY" -m pytest -q -s -p no:cacheprovider bench/check_offload_cuda.py
    step "d. planner per stage" 90 "$PY" -m pytest -q -s -p no:cacheprovider bench/check_stages_cuda.py
    # 2b: two timed steps per mode; 5b: one (each 5b step is ~2.5x a 2b step)
    for spec in cogvideox-2b:130:2 cogvideox-5b:205:1; do
        IFS=: read -r model cap rounds <<<"$spec"
        step "e. memory bench $model" "$cap" env LOWMEM_BENCH_MODEL="$model" LOWMEM_BENCH_CAP_GB=24 \
            LOWMEM_BENCH_ROUNDS="$rounds" "$PY" -m pytest -q -s -p no:cacheprovider bench/bench_memory.py \
            --benchmark-disable-gc --benchmark-columns=median
    done

    {
        echo "# GPU check"
        echo
        echo "$versions. Commit ${GPU_CHECK_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}," \
             "$(date -u '+%Y-%m-%d %H:%M UTC'). Run: bash bench/gpu_check.sh; full output: gpu.log."
        echo
        echo "| step | result | seconds | limit s | pytest |"
        echo "|---|---|---:|---:|---|"
        printf '%s\n' "${STEPS[@]}"
        for part in "${PARTS[@]}"; do
            echo
            if [ -f "$RESULTS/$part" ]; then sed 's/^#/##/' "$RESULTS/$part"; else echo "## $part: not written"; fi
        done
    } >"$RESULTS/gpu.md"
    echo "=== wrote $RESULTS/gpu.md in $SECONDS s: $( ((FAILED)) && echo 'SOME STEPS FAILED' || echo 'all steps ok')"
    return $FAILED
}

mkdir -p "$RESULTS"
main 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
rm -f "$STEP_LOG"
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    for file in gpu.md gpu.log "${PARTS[@]}" memory_gpu_cogvideox-5b.png; do  # 8 files: the tool's limit
        [ -f "$RESULTS/$file" ] && cp "$RESULTS/$file" "$OUT/"
    done
fi
exit "$status"

"""Compile every Triton kernel, in every launch configuration the host wrappers choose for the real shapes,
for real GPU architectures, on a machine without a GPU.

``TRITON_INTERPRET=1`` checks numerics only: a kernel that reads a plain Python global, or whose tiles do not
fit a GPU's shared memory, passes every interpreter test and fails on the GPU at the first launch. Here the
wrappers themselves run forward and backward on meta tensors inside `recording_launches`, so the launches
compiled are exactly the ones they make; each is specialised the way Triton's JIT specialises a real call
(Triton's own `native_specialize_impl`) and compiled with `triton.compile` for a `GPUTarget`. Reported per
kernel and architecture: shared memory (and its margin to the per-block limit) and, from ``ptxas -v``,
registers and spill bytes.

    python -m lowmem_eraser.kernels.compile_check [--arch 80 86 89 90] [--json out.json] [--markdown out.md]

Needs TRITON_INTERPRET unset (under the interpreter `triton.jit` returns functions that cannot be compiled).
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import torch

from .eraser_adapter import eraser_adapter
from .int8_linear import int8_linear
from .utils import SHARED_MEMORY, SHARED_MEMORY_MARGIN, Launch, Target, recording_launches

ARCHS = (80, 86, 89, 90)
NUM_SMS = {80: 108, 86: 82, 89: 128, 90: 132}  # A100, RTX 3090, RTX 4090, H100: the tiling splits by SM count
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DIMS = (1920, 3072, 5120)  # CogVideoX-2b, CogVideoX-5b / HunyuanVideo, Wan2.1-14B
RANKS = (64, 128)
# 49x480x720 CogVideoX: 17,550 video tokens per sample (not a multiple of 16: Triton specialises it differently),
# 17,776 with the text; a long Wan/Hunyuan clip; an odd count.
TOKENS = (17_550, 17_776, 60_000, 1_001)
CONDITIONING_DIM = 512  # CogVideoX's time embedding: the AdaLN linears (512 -> 6 dim) run on [batch, 512]


@dataclass
class Compiled:
    kernel: str
    arch: int
    constexprs: str
    options: str
    shared: int  # bytes
    limit: int
    registers: int | None
    spill_bytes: int | None
    error: str | None = None

    @property
    def margin(self) -> int:
        return self.limit - self.shared


def adapter_launches(target: Target) -> list[Launch]:
    """What `eraser_adapter` launches, forward and backward, with and without the residual, for each shape."""
    launches = []
    for dtype in DTYPES:
        for dim in DIMS:
            for rank in RANKS:
                for tokens in TOKENS:
                    for residual in (True, False):
                        with recording_launches(target) as recorded:
                            x = torch.empty(tokens, dim, device="meta", dtype=dtype, requires_grad=True)
                            weights = [torch.empty(shape, device="meta", requires_grad=True)
                                       for shape in ((rank, dim), (rank,), (dim, rank), (dim,))]
                            out = eraser_adapter(x, *weights, scale=0.5, residual=residual)
                            torch.autograd.grad(out, [x, *weights], torch.empty_like(out))
                        launches += recorded
    return launches


def int8_linear_launches(target: Target) -> list[Launch]:
    """What `int8_linear` launches (forward and input gradient) for every linear of a transformer block."""
    launches = []
    for dtype in DTYPES:
        for dim in DIMS:
            shapes = [(tokens, k, n) for tokens in TOKENS for k, n in ((dim, dim), (dim, 4 * dim), (4 * dim, dim))]
            shapes += [(batch, CONDITIONING_DIM, 6 * dim) for batch in (1, 2)]
            for (tokens, k, n), has_bias in itertools.product(shapes, (True, False)):
                with recording_launches(target) as recorded:
                    x = torch.empty(tokens, k, device="meta", dtype=dtype, requires_grad=True)
                    qweight = torch.empty(n, k, device="meta", dtype=torch.int8)
                    scale = torch.empty(n, device="meta")
                    bias = torch.empty(n, device="meta", dtype=dtype) if has_bias else None
                    out = int8_linear(x, qweight, scale, bias)
                    torch.autograd.grad(out, x, torch.empty_like(out))
                launches += recorded
    return launches


def source(launch: Launch):
    """(ASTSource, options, key): the launch specialised as Triton's JIT specialises the same call."""
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    kernel = launch.kernel
    names = kernel.arg_names
    runtime = [name for name in names if name not in launch.constexprs]
    signature, constexprs, attrs = {}, dict(launch.constexprs), {}
    for name, arg in zip(runtime, launch.args):
        kind, attr = native_specialize_impl(BaseBackend, arg, False, True, True)
        if kind == "constexpr":  # Triton folds an integer 1 into the kernel
            constexprs[name] = attr
        elif isinstance(attr, str):
            attrs[(names.index(name),)] = BaseBackend.parse_attr(attr)
        signature[name] = kind
    for name in launch.constexprs:
        signature[name] = "constexpr"
    key = (kernel.fn.__name__, tuple(sorted(signature.items())), repr(sorted(constexprs.items())),
           repr(sorted(attrs.items())), tuple(sorted(launch.options.items())))
    return triton.compiler.ASTSource(kernel, signature, constexprs, attrs), dict(launch.options), key


def _ptxas_usage(ptx: str, arch: int) -> tuple[int | None, int | None]:
    """(registers per thread, spill store + load bytes) from ``ptxas -v`` on Triton's PTX, with the ptxas
    Triton itself picks for the architecture (its PTX version may be newer than the default ptxas knows)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(arch).path
    except Exception:  # noqa: BLE001 -- no ptxas: usage is simply not reported
        return None, None
    target = re.search(r"^\.target\s+(\S+)", ptx, re.MULTILINE).group(1)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.ptx")
        with open(path, "w") as file:
            file.write(ptx)
        done = subprocess.run([ptxas, f"-arch={target}", "-v", path, "-o", os.path.join(folder, "kernel.cubin")],
                              capture_output=True, text=True)
    report = done.stdout + done.stderr
    registers = re.search(r"Used (\d+) registers", report)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report)]
    return (int(registers.group(1)) if registers else None), (sum(spills) if spills else None)


def compile_for(launch_source, arch: int) -> Compiled:
    import triton
    from triton.backends.compiler import GPUTarget

    src, options, key = launch_source
    constexprs = ", ".join(f"{src.fn.arg_names[k[0]]}={v}" for k, v in sorted(src.constants.items()))
    opts = ", ".join(f"{k}={v}" for k, v in sorted(options.items()))
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as exc:  # noqa: BLE001 -- reported per kernel, the caller asserts
        root = exc
        while root.__cause__ is not None:  # Triton wraps the real error (e.g. a NameError) in a CompilationError
            root = root.__cause__
        message = " ".join(str(root).split())[-300:]  # the cause is at the end
        return Compiled(key[0], arch, constexprs, opts, 0, SHARED_MEMORY[arch], None, None,
                        f"{type(root).__name__}: {message}")
    registers, spills = _ptxas_usage(compiled.asm["ptx"], arch)
    return Compiled(key[0], arch, constexprs, opts, compiled.metadata.shared, SHARED_MEMORY[arch], registers, spills)


def _jobs(archs) -> list:
    """(launch source, arch) of every distinct launch of both ops, in a fixed order."""
    jobs = {}
    for arch in archs:
        target = Target.for_arch(arch, NUM_SMS[arch])
        for launch in adapter_launches(target) + int8_linear_launches(target):
            launch_source = source(launch)
            jobs.setdefault((arch, launch_source[2]), (launch_source, arch))
    return list(jobs.values())


def _compile_share(archs, worker: int, workers: int) -> list[Compiled]:
    """Worker `worker` of `workers` compiles every `workers`-th job (launches hold kernels and meta tensors,
    which do not pickle, so each worker enumerates them itself: milliseconds)."""
    return [compile_for(*job) for job in _jobs(archs)[worker::workers]]


def check(archs=ARCHS, workers: int = 2) -> list[Compiled]:
    """Compile every distinct launch of both ops for each architecture, in `workers` processes (compiling
    holds the GIL, so threads would not overlap)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset: the interpreter's kernels cannot be compiled")
    if workers <= 1:
        return _compile_share(tuple(archs), 0, 1)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        shares = pool.map(_compile_share, [tuple(archs)] * workers, range(workers), [workers] * workers)
        return [result for share in shares for result in share]


def table(results: list[Compiled]) -> str:
    lines = ["| kernel | arch | constexprs | options | shared KiB | limit KiB | margin KiB | registers | spill B | status |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in sorted(results, key=lambda r: (r.kernel, r.constexprs, r.options, r.arch)):
        status = r.error or ("ok" if r.margin >= SHARED_MEMORY_MARGIN else "MARGIN")
        lines.append(f"| {r.kernel} | sm_{r.arch} | {r.constexprs} | {r.options} | {r.shared / 1024:.1f} | "
                     f"{r.limit / 1024:.0f} | {r.margin / 1024:.1f} | {r.registers if r.registers is not None else '-'} | "
                     f"{r.spill_bytes if r.spill_bytes is not None else '-'} | {status} |")
    return "\n".join(lines)


def summary(results: list[Compiled]) -> str:
    """Worst case per kernel and architecture: shared memory and its margin, registers, spills."""
    archs = sorted({r.arch for r in results})
    lines = ["| kernel (launch configs) | " + " | ".join(f"sm_{a}" for a in archs) + " |",
             "|---|" + "---|" * len(archs)]
    for kernel in sorted({r.kernel for r in results}):
        cells = []
        for arch in archs:
            rows = [r for r in results if r.kernel == kernel and r.arch == arch]
            cells.append(f"{max(r.shared for r in rows) / 1024:.0f} KiB, margin ≥ {min(r.margin for r in rows) / 1024:.0f}; "
                         f"≤ {max(r.registers or 0 for r in rows)} regs; spill ≤ {max(r.spill_bytes or 0 for r in rows)} B")
        count = len([r for r in results if r.kernel == kernel and r.arch == archs[0]])
        lines.append(f"| `{kernel}` ({count}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(results: list[Compiled], seconds: float) -> str:
    import triton

    return f"""# Triton kernels compiled for GPU targets on a CPU (triton {triton.__version__})

`python -m lowmem_eraser.kernels.compile_check --markdown FILE` (also run by tests/test_kernel_compile.py in CI):
every launch the host wrappers make for dims {'/'.join(map(str, DIMS))}, ranks {'/'.join(map(str, RANKS))}, \
{', '.join(f'{t:,}' for t in TOKENS)} tokens, bf16/fp16/fp32, forward and backward, residual on and off, and every
block linear (d->d, d->4d, 4d->d, AdaLN 512->6d; bias on and off), compiled with `triton.compile` for each
architecture ({len(results)} compilations in {seconds:.0f} s). Shared memory from the compiled kernel; registers and
spills from `ptxas -v` (the ptxas Triton picks for the architecture). Per-block limits: sm_80 163 KiB, sm_86/sm_89
99 KiB, sm_90 227 KiB; required margin {SHARED_MEMORY_MARGIN // 1024} KiB.

## Worst case per kernel

{summary(results)}

## Every launch configuration

{table(results)}
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowmem_eraser.kernels.compile_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--markdown", help="also write the summary and the table here")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    began = time.perf_counter()
    results = check(args.arch, args.workers)
    print(table(results))
    failed = [r for r in results if r.error or r.margin < SHARED_MEMORY_MARGIN]
    print(f"\n{len(results)} compilations in {time.perf_counter() - began:.0f} s; {len(failed)} failed or within "
          f"{SHARED_MEMORY_MARGIN // 1024} KiB of the shared-memory limit")
    if args.markdown:
        with open(args.markdown, "w") as file:
            file.write(markdown(results, time.perf_counter() - began))
    if args.json:
        with open(args.json, "w") as file:
            json.dump([{**asdict(r), "margin": r.margin} for r in results], file, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

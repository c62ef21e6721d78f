"""What every op file needs besides its kernels: Triton availability, the target GPU's limits, tile and
pipeline-depth choice, and the `Launch` record that a host wrapper runs and the compile test compiles.

Kept in one place (like Liger-Kernel's ``ops/utils.py``) so that the wrappers and
``tests/test_kernel_compile.py`` take their launch settings from the same functions and cannot drift.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch._subclasses.fake_tensor import is_fake

try:
    import triton
    import triton.language as tl
except ImportError:  # every op keeps a PyTorch reference
    triton = tl = None

logger = logging.getLogger("lowmem_eraser.kernels")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
KiB = 2**10
# Per-block shared memory (opt-in maximum) by compute capability, for the targets the compile test covers.
# At run time the device's own `shared_memory_per_block_optin` is used instead.
SHARED_MEMORY = {80: 163 * KiB, 86: 99 * KiB, 89: 99 * KiB, 90: 227 * KiB}
# Headroom left under the limit: Triton's epilogue scratch and a future stage must not tip a tile over.
SHARED_MEMORY_MARGIN = 8 * KiB


def jit(fn):
    """``triton.jit`` where Triton imports; the plain function otherwise (the module still imports)."""
    return triton.jit(fn) if triton is not None else fn


def triton_available() -> bool:
    """True when the Triton kernels can run here: triton imports and there is a GPU or the interpreter
    (``TRITON_INTERPRET=1``, set before triton is first imported) is on."""
    return triton is not None and (torch.cuda.is_available() or INTERPRET)


def runs_triton(x: torch.Tensor) -> bool:
    """Whether an op on `x` takes the Triton path (real CUDA tensors, or CPU tensors under the interpreter)."""
    if triton is None or is_fake(x):
        return False
    if _recording is not None and x.device.type == "meta":
        return True
    return x.device.type == "cuda" or (INTERPRET and x.device.type == "cpu")


@dataclass(frozen=True)
class Target:
    """What a launch configuration depends on: compute capability (e.g. 89), shared memory per block in
    bytes, SM count. The interpreter is ``Target(0, ...)``: its tiles are chosen for speed on a CPU."""

    capability: int
    shared_memory: int
    num_sms: int

    @property
    def interpreter(self) -> bool:
        return self.capability == 0

    @classmethod
    def for_arch(cls, capability: int, num_sms: int = 128) -> "Target":
        """A GPU target from the table above (the compile test's targets)."""
        return cls(capability, SHARED_MEMORY[capability], num_sms)


INTERPRETER = Target(0, 2**31, 1)
# Set by `recording_launches`: ops on meta tensors then take the Triton path for that target and record
# their launches instead of running them (how the compile check sees exactly what the wrappers launch).
_recording: tuple[Target, list] | None = None


@functools.lru_cache(maxsize=None)
def _cuda_target(index: int) -> Target:
    props = torch.cuda.get_device_properties(index)
    shared = getattr(props, "shared_memory_per_block_optin", 0) or SHARED_MEMORY.get(props.major * 10 + props.minor,
                                                                                       99 * KiB)
    return Target(props.major * 10 + props.minor, shared, props.multi_processor_count)


def target_of(device: torch.device) -> Target:
    """The launch target of tensors on `device`."""
    if _recording is not None and device.type == "meta":
        return _recording[0]
    if device.type == "cuda" and not INTERPRET:
        return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER


def block(n: int, cap: int) -> int:
    """Power-of-two tile edge covering ``n``: at least 16 (``tl.dot`` minimum), at most ``cap``."""
    return max(16, min(cap, 1 << max(0, int(n) - 1).bit_length()))


def fp32_dot(dtype: torch.dtype, target: Target) -> bool:
    """Whether a GPU dot runs on fp32 operands (IEEE, no tensor cores): it gets thinner K tiles, because
    its operands take twice the shared memory and registers."""
    return dtype == torch.float32 and not target.interpreter


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dot_args(dtype: torch.dtype, target: Target) -> dict:
    """Operand dtype for ``tl.dot``: the activation dtype on GPU; fp32 in the interpreter, whose bf16/fp16
    dot is wrong. fp32 operands use IEEE precision, not the TF32 default, to match PyTorch's fp32 matmul."""
    name = "float32" if target.interpreter else str(dtype).removeprefix("torch.")
    return {"DOT_TY": getattr(tl, name), "PRECISION": "ieee" if name == "float32" else "tf32"}


def pipeline_stages(stage_bytes: int, target: Target, preferred: int, fixed_bytes: int = 0) -> int:
    """Deepest software pipeline (``num_stages``, at most `preferred`, at least 1) whose shared memory fits
    `target` with the margin. Triton keeps ``num_stages - 1`` loaded tiles in shared memory (as loaded, e.g.
    int8 or fp32) on sm_80-89 and up to ``num_stages`` on sm_90; `fixed_bytes` is what it holds besides: with
    fp32 dots (no tensor cores) an operand that is transformed in registers (dequantised, GELU) goes through
    shared memory once more. Checked against the compiled kernels by `compile_check` for sm_80/86/89/90."""
    budget = target.shared_memory - SHARED_MEMORY_MARGIN - fixed_bytes
    in_flight = 0 if target.capability >= 90 else 1  # tiles in shared memory = num_stages - in_flight
    stages = preferred
    while stages > 1 and (stages - in_flight) * stage_bytes > budget:
        stages -= 1
    return stages


@dataclass
class Launch:
    """One kernel launch: the grid, the runtime arguments, the constexprs and the compiler options.

    Host wrappers build it and call it; the compile test builds it from meta tensors and compiles it for
    each GPU architecture without running it."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict
    options: dict = field(default_factory=dict)

    def __call__(self) -> None:
        if _recording is not None:
            _recording[1].append(self)
            return
        self.kernel[self.grid](*self.args, **self.constexprs, **self.options)


# Ops whose Triton path failed on a device: the op runs its PyTorch reference there from then on.
_usable: dict[tuple, bool] = {}
PROBE_TOKENS = 256  # >= every token tile (128), so a probe compiles the tiles that the real launches use


def probes(x: torch.Tensor) -> bool:
    """Whether calls on `x` are probed first (real GPUs; a test switches it on for the interpreter)."""
    return x.device.type == "cuda"


def probe_tokens(tokens: int) -> int:
    """How many rows a probe runs for an op called on `tokens` rows: the same token tiles (and Triton's
    specialisation of a single row) as the real call, at most PROBE_TOKENS. Part of the probe's key."""
    return min(int(tokens), PROBE_TOKENS)


@contextlib.contextmanager
def _isolated(device: torch.device):
    """The probe's own autograd, outside whatever the caller runs in: gradient checkpointing's saved-tensor
    hooks (a probe inside a checkpointed block would otherwise be recorded into it and trigger its
    recomputation), inference mode, no_grad and autocast (which would change the reference's dtype)."""
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t), torch.inference_mode(False), \
            torch.enable_grad(), torch.autocast(device.type, enabled=False):
        yield


def kernel_usable(op: str, key: tuple, probe: Callable[[], None]) -> bool:
    """Whether `op`'s Triton kernels work for `key` (device first, then dtypes and the shapes that fix the
    tiles).

    The first time, `probe()` runs the op's forward and backward once on small inputs with the tiles the
    real call gets and compares them with the reference. A compile error (e.g. a tile that does not fit this
    GPU's shared memory, or a Triton version the kernel does not support), a launch error or a wrong result
    logs one warning and the op falls back to PyTorch for that key: a slower run, never a crash mid-run.
    Running out of memory or a CUDA error (a broken context) is not the kernel's verdict: it propagates.
    """
    full_key = (op, *key)
    if full_key not in _usable:
        try:
            with _isolated(torch.device(key[0])):
                probe()
            _usable[full_key] = True
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 -- any failure of an optional fast path means "use PyTorch"
            if "CUDA error" in str(exc) or type(exc).__name__ == "AcceleratorError":
                raise
            logger.warning("%s: the Triton kernel cannot run here (%s: %s); using the PyTorch implementation",
                           op, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            _usable[full_key] = False
    return _usable[full_key]


def check_close(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    """Raise if `got` differs from `want` by more than `rtol` of want's largest magnitude (probe results)."""
    scale = want.float().abs().max().clamp_min(1e-6)
    error = (got.float() - want.float()).abs().max()
    if not torch.isfinite(error) or error > rtol * scale:
        raise RuntimeError(f"{name} differs from the PyTorch reference by {error.item():.3g} (max |ref| "
                           f"{scale.item():.3g})")



class recording_launches:
    """``with recording_launches(target) as launches:`` run ops on meta tensors; `launches` lists what the
    wrappers would have launched on `target` (no GPU needed, nothing runs)."""

    def __init__(self, target: Target):
        self.target, self.launches = target, []

    def __enter__(self) -> list[Launch]:
        global _recording
        if triton is None:
            raise RuntimeError("recording launches needs triton")
        _recording = (self.target, self.launches)
        return self.launches

    def __exit__(self, *exc) -> None:
        global _recording
        _recording = None

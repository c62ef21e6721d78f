"""The memory ladder on CUDA: streamed blocks and offloaded activations must not change a training step's adapter
gradients.

tests/test_offload.py and tests/test_activation_offload.py check this on CPU with tiny blocks, where BlockOffloader
copies synchronously and activation offload is emulated; only on CUDA do the pinned host buffers, side-stream copies
and events run. Here: 4 real-size CogVideoX-5b blocks, one full training step (train.eraser_losses_backward:
concept-mask capture, L_loc, L_pre, checkpoint recomputation) at 9x480x720 (4,276 tokens: real width, quick; the
trainer takes 8k+1 frames), resident, then each rung twice (the second step starts from the ring state and host pool
the first step left):
- swap all: every block streams through BlockOffloader's two device slots;
- swap 3 of 4: the first 3 stream, the last stays resident. Not half: 2 or fewer streamed blocks never leave the
  two slots, so a partial swap only evicts with 3 or more;
- activations: offload_activations (mode "cuda"), each block's checkpointed inputs to pinned host memory;
- swap all + activations: both side streams at once.
fp32: gradients bit-equal (same kernels on the same numbers; attention on PyTorch's deterministic math path).
bf16: close (flash attention's backward is not deterministic; resident vs resident is shown as the noise floor).
Each row also gives what moved in the second step (block bytes host -> device, activation bytes to the host and back),
the block copies that were not prefetched (`misses`, steps 1/2: after the first step's first block there should be
none) and the peak torch.cuda.max_memory_allocated over the variant's two steps (weights included).
Writes bench/results/offload_cuda.md. Run: bash bench/gpu_check.sh (step c). `compare` is device-agnostic:
tests/test_offload_check.py runs it on CPU (tiny blocks, BlockOffloader(stream=True), activation offload "emulate").
"""

from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from lowmem_eraser import attach_erasers
from lowmem_eraser.activation_offload import MIN_BYTES, offload_activations
from lowmem_eraser.config import LossConfig
from lowmem_eraser.memory import LiveTensorTracker
from lowmem_eraser.offload import BlockOffloader
from lowmem_eraser.plan import PRESETS, Setting, build_transformer, check_video, step_inputs
from lowmem_eraser.train import eraser_losses_backward

# Importable without CUDA, so that tests/test_offload_check.py can run `compare` on CPU; the CUDA test skips.
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="the CUDA offload check needs a CUDA GPU (tests/test_offload_check.py runs its comparison on CPU)")

DEVICE = torch.device("cuda")
CONFIG, LAYERS, RANK = PRESETS["cogvideox-5b"], 4, 128
PARTIAL = 3  # streamed blocks of the partial swap: see the module docstring
VIDEO = check_video(9, 480, 720)
LOSS = LossConfig(alpha=1.0, beta=0.5)  # every pass of a real step
BF16_TOLERANCE = 1e-2  # max over parameters of ||variant - resident|| / ||resident||
STEPS = 2  # the second step starts from what the first left (ring state, host pool)
MiB, GiB = 2**20, 2**30
RESULTS = Path(__file__).parent / "results" / "offload_cuda.md"
ROWS = []  # (case, Comparison)


@dataclass(frozen=True)
class Variant:
    name: str
    blocks: int | None  # streamed blocks: None all of them, 0 none
    activations: bool


def variants(layers: int, partial: int) -> list[Variant]:
    return [Variant("swap all", None, False), Variant(f"swap {partial} of {layers}", partial, False),
            Variant("activations", 0, True), Variant("swap all + activations", None, True)]


@dataclass
class Result:
    """One variant's steps against the resident gradients; lists hold one value per step."""

    variant: Variant
    errors: list[float] = field(default_factory=list)  # max over parameters of the relative error
    equal: list[bool] = field(default_factory=list)  # bit-equal to the resident gradients
    block_bytes: list[int] = field(default_factory=list)  # BlockOffloader.bytes_copied, host -> device
    misses: list[int] = field(default_factory=list)  # block copies issued only when the block was needed
    to_host: list[int] = field(default_factory=list)  # activation bytes device -> host
    to_device: list[int] = field(default_factory=list)  # activation bytes host -> device
    peak: int = 0  # CUDA: max_memory_allocated over the steps; CPU: LiveTensorTracker peak of the steps
    seconds: float = 0.0  # the last step's wall time
    verdict: str = ""
    ok: bool = False


@dataclass
class Comparison:
    noise: float  # resident vs resident
    reproducible: bool  # the second resident step is bit-equal to the first
    resident_peak: int
    resident_seconds: float
    nonzero: bool  # every adapter parameter got a gradient (else the comparison would be vacuous)
    results: list[Result]

    @property
    def ok(self) -> bool:
        return self.nonzero and all(result.ok for result in self.results)


def judge(result: Result, exact: bool, reproducible: bool = True, tolerance: float = BF16_TOLERANCE) -> None:
    """Set `result.verdict` and `result.ok`: the gradients match (bit-equal when exact, else within `tolerance`)
    and the rung really moved something (a rung that moved nothing would pass vacuously)."""
    moved = (result.variant.blocks == 0 or all(result.block_bytes)) and (
        not result.variant.activations or all(result.to_host))
    if exact:
        result.ok = all(result.equal)
        result.verdict = "bit-equal" if result.ok else "DIFFERENT" + ("" if reproducible else
                                                                       " (resident not reproducible)")
    else:
        result.ok = max(result.errors) <= tolerance
        result.verdict = f"{'close' if result.ok else 'NOT CLOSE'} (<= {tolerance})"
    if not moved:
        result.ok, result.verdict = False, result.verdict + ", NOTHING MOVED"


def _grads(transformer, erasers, inputs, activations=None) -> list[torch.Tensor]:
    eraser_losses_backward(transformer, erasers, inputs, LOSS, activations=activations)
    grads = [p.grad.clone() for p in erasers.parameters()]
    erasers.zero_grad(set_to_none=True)
    return grads


def _rel(grads, reference) -> float:
    return max(((g - r).norm() / r.norm()).item() for g, r in zip(grads, reference))


@contextlib.contextmanager
def _peak(device: torch.device):
    """Yields a one-item list that holds the peak bytes once the block is left."""
    box = [0]
    if device.type == "cuda":
        gc.collect()  # the previous variant's tensors, so that they do not count in this one's peak
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        yield box
        torch.cuda.synchronize(device)
        box[0] = torch.cuda.max_memory_allocated(device)
    else:  # what the steps allocate (emulated host copies excluded): the device memory a CUDA run would add
        with LiveTensorTracker() as tracker:
            yield box
        box[0] = tracker.peak_bytes


def _timed(device: torch.device, fn):
    """`fn()` and its wall seconds, the device's queued work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    began = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - began


def compare(transformer, erasers, inputs, device: torch.device | str, *, exact: bool, stream: bool | None = None,
            activation_mode: str | None = None, min_bytes: int = MIN_BYTES, partial: int = PARTIAL,
            steps: int = STEPS, tolerance: float = BF16_TOLERANCE) -> Comparison:
    """The resident step twice (reference and noise floor), then each of `variants` for `steps` steps, each step's
    adapter gradients compared with the first resident ones. `stream` and `activation_mode` go to BlockOffloader
    and offload_activations (None: their CUDA defaults; on CPU pass True and "emulate")."""
    device = torch.device(device)
    layers = len(transformer.transformer_blocks)
    with sdpa_kernel(SDPBackend.MATH) if exact else contextlib.nullcontext():
        with _peak(device) as peak:
            resident, _ = _timed(device, lambda: _grads(transformer, erasers, inputs))
            again, seconds = _timed(device, lambda: _grads(transformer, erasers, inputs))
        comparison = Comparison(_rel(again, resident), all(map(torch.equal, again, resident)), peak[0],
                                seconds, all(g.abs().sum() > 0 for g in resident), [])
        del again
        for variant in variants(layers, partial):
            result = Result(variant)
            offloader = (BlockOffloader(transformer, device, stream=stream, blocks=variant.blocks)
                         if variant.blocks != 0 else None)  # as train.py: no offloader when nothing streams
            activations = (offload_activations(True, device, activation_mode, min_bytes=min_bytes, model=transformer)
                           if variant.activations else None)
            with offloader or contextlib.nullcontext():
                if offloader is not None:
                    assert offloader.enabled and offloader.slot_bytes > 0, "BlockOffloader streams nothing here"
                with _peak(device) as peak:
                    for _ in range(steps):
                        before = _moved(offloader, activations)
                        grads, result.seconds = _timed(device, lambda: _grads(transformer, erasers, inputs,
                                                                              activations))
                        after = _moved(offloader, activations)
                        block_bytes, misses, to_host, to_device = (a - b for a, b in zip(after, before))
                        result.block_bytes.append(block_bytes)
                        result.misses.append(misses)
                        result.to_host.append(to_host)
                        result.to_device.append(to_device)
                        result.errors.append(_rel(grads, resident))
                        result.equal.append(all(map(torch.equal, grads, resident)))
                        del grads
            result.peak = peak[0]
            judge(result, exact, comparison.reproducible, tolerance)
            comparison.results.append(result)
    return comparison


def _moved(offloader, activations) -> tuple[int, int, int, int]:
    blocks = (offloader.bytes_copied, offloader.misses) if offloader is not None else (0, 0)
    counters = getattr(activations, "counters", None)  # a nullcontext when offload does nothing on this device
    acts = (counters.bytes_to_host, counters.bytes_to_device) if counters is not None else (0, 0)
    return (*blocks, *acts)


def table(rows: list[tuple[str, Comparison]]) -> list[str]:
    lines = ["| case | variant | resident vs resident | step 1 error | step 2 error | blocks H2D MiB | misses (steps) "
             "| act. to host MiB | act. to device MiB | peak GiB (vs resident) | s/step | verdict |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for case, comparison in rows:
        lines.append(f"| {case} | resident | {comparison.noise:.2e} | - | - | 0 | - | 0 | 0 | "
                     f"{comparison.resident_peak / GiB:.2f} | {comparison.resident_seconds:.2f} | "
                     f"{'reproducible' if comparison.reproducible else 'not bit-reproducible'}"
                     f"{'' if comparison.nonzero else ', SOME ADAPTER GOT NO GRADIENT'} |")
        for r in comparison.results:
            errors = [f"{e:.2e}" for e in r.errors] + ["-"] * (2 - len(r.errors))
            delta = (r.peak - comparison.resident_peak) / MiB  # activation savings are MiB on a GiB peak
            lines.append(f"| {case} | {r.variant.name} | {comparison.noise:.2e} | {errors[0]} | {errors[1]} | "
                         f"{r.block_bytes[-1] / MiB:.0f} | {'/'.join(map(str, r.misses))} | "
                         f"{r.to_host[-1] / MiB:.0f} | {r.to_device[-1] / MiB:.0f} | "
                         f"{r.peak / GiB:.2f} ({delta:+.0f} MiB) | {r.seconds:.2f} | {r.verdict} |")
    return lines


def _write():
    lines = [f"# Block and activation offload on CUDA ({torch.cuda.get_device_name()}, torch {torch.__version__})", "",
             f"{LAYERS} CogVideoX-5b blocks, {VIDEO.frames}x{VIDEO.height}x{VIDEO.width}, rank {RANK}, one training "
             f"step resident vs each rung, {STEPS} steps each (bench/check_offload_cuda.py). Error: max over adapter "
             "parameters of ||g - g_resident|| / ||g_resident||. Bytes moved: the last step's. Misses: block copies "
             "not prefetched, per step. Peak: torch.cuda.max_memory_allocated over the steps, weights included; "
             "s/step: the last step (fp32 runs attention on the slow math path).", "", *table(ROWS)]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines), flush=True)


def _build(dtype, quantize):
    torch.manual_seed(0)
    with torch.device(DEVICE):
        transformer = build_transformer(CONFIG, Setting(quantize, True), dtype, num_layers=LAYERS)
    erasers = attach_erasers(transformer, rank=RANK)
    erasers.kernels = "triton" if quantize == "triton" else "torch"  # the +kernels path, or plain PyTorch
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in erasers.parameters():  # `up` is zero at init, which would zero every `down` gradient
            param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    inputs = step_inputs(transformer, VIDEO, batch=1, dtype=dtype)
    for name in ("x_t", "t", "c", "empty", "c_pre", "concept_tokens"):
        setattr(inputs, name, getattr(inputs, name).to(DEVICE))
    inputs.extras = None if inputs.extras is None else tuple(r.to(DEVICE) for r in inputs.extras)
    return transformer, erasers, inputs


@pytest.mark.parametrize("dtype,quantize", [
    (torch.float32, "none"), (torch.float32, "int8"), (torch.bfloat16, "int8"), (torch.bfloat16, "triton"),
], ids=["fp32-none", "fp32-int8", "bf16-int8", "bf16-triton"])
def test_every_rung_gives_the_resident_gradients(dtype, quantize):
    transformer, erasers, inputs = _build(dtype, quantize)
    comparison = compare(transformer, erasers, inputs, DEVICE, exact=dtype == torch.float32)
    ROWS.append((f"{str(dtype).removeprefix('torch.')}, quantize {quantize}", comparison))
    _write()  # after every case: a step killed at its time cap keeps the rows it finished
    assert comparison.nonzero, "an adapter got no gradient: the check would be vacuous"
    assert comparison.ok, [(r.variant.name, r.verdict) for r in comparison.results if not r.ok]

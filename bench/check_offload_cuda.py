"""Block offload on CUDA: streamed blocks must not change a training step's adapter gradients.

tests/test_offload.py checks this on CPU with tiny blocks, where BlockOffloader copies synchronously; only on CUDA
do its pinned host buffers, side-stream copies and events run. Here: 3 real-size CogVideoX-5b blocks, one full
training step (train.eraser_losses_backward: concept-mask capture, L_loc, L_pre, checkpoint recomputation) at
13x480x720 (5,626 tokens: real width, quick), resident, then twice streamed (the second step starts from the ring
state the first backward left). fp32: gradients bit-equal (same kernels on the same numbers; attention on PyTorch's
deterministic math path). bf16: close (flash attention's backward is not deterministic; resident vs resident is
shown as the noise floor). Writes bench/results/offload_cuda.md. Run: bash bench/gpu_check.sh (step c).
"""

import contextlib
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("the CUDA offload check needs a CUDA GPU (tests/test_offload.py covers CPU)", allow_module_level=True)

from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from lowmem_eraser import attach_erasers  # noqa: E402
from lowmem_eraser.config import LossConfig  # noqa: E402
from lowmem_eraser.offload import BlockOffloader  # noqa: E402
from lowmem_eraser.plan import PRESETS, Setting, build_transformer, check_video, step_inputs  # noqa: E402
from lowmem_eraser.train import eraser_losses_backward  # noqa: E402

DEVICE = torch.device("cuda")
CONFIG, LAYERS, RANK = PRESETS["cogvideox-5b"], 3, 128
VIDEO = check_video(13, 480, 720)
LOSS = LossConfig(alpha=1.0, beta=0.5)  # every pass of a real step
BF16_TOLERANCE = 1e-2  # max over parameters of ||streamed - resident|| / ||resident||
RESULTS = Path(__file__).parent / "results" / "offload_cuda.md"
ROWS = []


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
    inputs.rotary = None if inputs.rotary is None else tuple(r.to(DEVICE) for r in inputs.rotary)
    return transformer, erasers, inputs


def _grads(transformer, erasers, inputs):
    eraser_losses_backward(transformer, erasers, *inputs.args(), LOSS)
    grads = [p.grad.clone() for p in erasers.parameters()]
    erasers.zero_grad(set_to_none=True)
    return grads


def _rel(grads, reference):
    return max(((g - r).norm() / r.norm()).item() for g, r in zip(grads, reference))


def _write():
    lines = [f"# Block offload on CUDA ({torch.cuda.get_device_name()}, torch {torch.__version__})", "",
             f"{LAYERS} CogVideoX-5b blocks, {VIDEO.frames}x{VIDEO.height}x{VIDEO.width}, rank {RANK}, one training "
             "step resident vs streamed (BlockOffloader). Error: max over adapter parameters of "
             "||g - g_resident|| / ||g_resident||.", "",
             "| case | resident vs resident | streamed step 1 | streamed step 2 | verdict |",
             "|---|---:|---:|---:|---|"]
    lines += [f"| {case} | {noise:.2e} | {one:.2e} | {two:.2e} | {verdict} |"
              for case, noise, one, two, verdict in ROWS]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines), flush=True)


@pytest.mark.parametrize("dtype,quantize", [
    (torch.float32, "none"), (torch.float32, "int8"), (torch.bfloat16, "int8"), (torch.bfloat16, "triton"),
], ids=["fp32-none", "fp32-int8", "bf16-int8", "bf16-triton"])
def test_streamed_blocks_give_the_resident_gradients(dtype, quantize):
    transformer, erasers, inputs = _build(dtype, quantize)
    exact = dtype == torch.float32
    with sdpa_kernel(SDPBackend.MATH) if exact else contextlib.nullcontext():
        resident = _grads(transformer, erasers, inputs)
        noise = _rel(_grads(transformer, erasers, inputs), resident)
        with BlockOffloader(transformer, DEVICE) as offloader:
            assert offloader.enabled and offloader.slot_bytes > 0
            streamed = [_grads(transformer, erasers, inputs) for _ in range(2)]
    errors = [_rel(grads, resident) for grads in streamed]
    if exact:
        ok = all(torch.equal(g, r) for grads in streamed for g, r in zip(grads, resident))
        verdict = "bit-equal" if ok else "DIFFERENT" + (" (resident not reproducible)" if noise else "")
    else:
        ok = max(errors) <= BF16_TOLERANCE
        verdict = f"{'close' if ok else 'NOT CLOSE'} (<= {BF16_TOLERANCE})"
    ROWS.append((f"{str(dtype).removeprefix('torch.')}, quantize {quantize}", noise, *errors, verdict))
    _write()
    assert all(g.abs().sum() > 0 for g in resident), "an adapter got no gradient: the check would be vacuous"
    assert ok, verdict

"""GPU benchmarks of the Triton kernels at the real CogVideoX shapes (N = 17,776 tokens, bf16).

- fused eraser adapter (rank 128) fwd and fwd+bwd vs the unfused PyTorch reference; target >= 1.5x.
- int8_linear (W8A16) fwd and input-grad vs bf16 F.linear (cuBLAS, target >= 0.9x its speed) and
  vs bitsandbytes Linear8bitLt(has_fp16_weights=False) (target >= 1.5x).

All variants of one row are timed in the same run with ``triton.testing.do_bench`` (median of
CUDA-event timings); pytest-benchmark additionally records the Triton variant. The table is
printed and written to bench/results/kernels.md. Run: bash bench/gpu_kernels.sh
"""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("kernel benchmarks need a CUDA GPU and TRITON_INTERPRET unset", allow_module_level=True)

import triton.testing  # noqa: E402

from lowmem_eraser.kernels import eraser_adapter, eraser_adapter_reference, int8_linear  # noqa: E402

TOKENS = 17_776
RANK = 128
DIMS = (1920, 3072)
RESULTS = Path(__file__).parent / "results" / "kernels.md"
ROWS = []  # (op, shape, variant, ms, speed-up of the Triton kernel over this variant, target)


def _ms(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def _record(op, shape, timings, targets):
    """timings: {variant: ms}, the first being the Triton kernel; targets: {variant: minimum speed-up}."""
    ours = next(iter(timings.values()))
    for variant, ms in timings.items():
        target = targets.get(variant)
        ROWS.append((op, shape, variant, ms, ms / ours, target))


@pytest.fixture(scope="module", autouse=True)
def table():
    yield
    lines = [
        f"# Kernel benchmarks ({torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__})",
        "",
        "speed-up = variant ms / Triton ms (> 1: the Triton kernel is faster).",
        "",
        "| op | shape | variant | ms | speed-up | target |",
        "|---|---|---|---:|---:|---|",
    ]
    for op, shape, variant, ms, ratio, target in ROWS:
        verdict = "" if target is None else f">= {target} {'ok' if ratio >= target else 'MISSED'}"
        lines.append(f"| {op} | {shape} | {variant} | {ms:.3f} | {ratio:.2f}x | {verdict} |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))


def _synced(fn):
    def run():
        fn()
        torch.cuda.synchronize()

    return run


@pytest.mark.parametrize("dim", DIMS)
def test_eraser_adapter(benchmark, dim):
    torch.manual_seed(0)
    x = torch.randn(TOKENS, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    params = [  # fp32 master weights, as in training
        (torch.randn(RANK, dim, device="cuda") / dim**0.5).requires_grad_(),
        torch.zeros(RANK, device="cuda", requires_grad=True),
        (torch.randn(dim, RANK, device="cuda") / RANK**0.5).requires_grad_(),
        torch.zeros(dim, device="cuda", requires_grad=True),
    ]
    grad = torch.randn_like(x)
    inputs = [x, *params]

    def fwd(op):
        return lambda: op(x, *params, scale=0.8)

    def fwd_bwd(op):
        return lambda: torch.autograd.grad(op(x, *params, scale=0.8), inputs, grad)

    out, ref = eraser_adapter(x, *params, scale=0.8), eraser_adapter_reference(x, *params, scale=0.8)
    assert (out.float() - ref.float()).abs().max().item() < 0.1  # same math, bf16 rounding apart
    shape = f"{TOKENS}x{dim} r{RANK}"
    for name, make in (("adapter fwd", fwd), ("adapter fwd+bwd", fwd_bwd)):
        timings = {"triton fused": _ms(make(eraser_adapter)), "torch unfused": _ms(make(eraser_adapter_reference))}
        _record(name, shape, timings, {"torch unfused": 1.5})
    benchmark.pedantic(_synced(fwd_bwd(eraser_adapter)), rounds=20, warmup_rounds=3)


def _bnb_linear(qweight, scale):
    import bitsandbytes as bnb

    out_features, in_features = qweight.shape
    layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False, threshold=0.0)
    weight = (qweight.float() * scale[:, None]).half().cpu()
    layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    return layer.cuda()


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("mult_in,mult_out", [(1, 1), (1, 4), (4, 1)], ids=["d->d", "d->4d", "4d->d"])
def test_int8_linear(benchmark, dim, mult_in, mult_out):
    torch.manual_seed(0)
    k, n = mult_in * dim, mult_out * dim
    x = torch.randn(TOKENS, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    qweight = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
    scale = torch.rand(n, device="cuda") / (127 * k**0.5)
    weight = (qweight.float() * scale[:, None]).to(torch.bfloat16)
    grad = torch.randn(TOKENS, n, device="cuda", dtype=torch.bfloat16)
    bnb_layer = _bnb_linear(qweight, scale)
    variants = {
        "triton w8a16": lambda: int8_linear(x, qweight, scale),
        "bf16 F.linear": lambda: torch.nn.functional.linear(x, weight),
        "bnb int8": lambda: bnb_layer(x),
    }
    outs = {name: f() for name, f in variants.items()}
    ref = outs["bf16 F.linear"].float()
    assert (outs["triton w8a16"].float() - ref).abs().max().item() < 0.05 * ref.abs().max().item()
    shape = f"{TOKENS}x{k} -> {n}"
    targets = {"bf16 F.linear": 0.9, "bnb int8": 1.5}
    with torch.no_grad():
        _record("int8_linear fwd", shape, {name: _ms(f) for name, f in variants.items()}, targets)
    _record("int8_linear input-grad", shape,
            {name: _ms(lambda o=o: torch.autograd.grad(o, x, grad, retain_graph=True)) for name, o in outs.items()},
            targets)
    benchmark.pedantic(_synced(variants["triton w8a16"]), rounds=20, warmup_rounds=3)

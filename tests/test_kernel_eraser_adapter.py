"""Fused eraser adapter kernels vs an fp64 reference (on CPU through the Triton interpreter).

Tolerances come from a first-order rounding analysis: a sum of K terms rounded with unit
roundoff eps is off by about eps * sqrt(sum of squared terms), so each output gets the bound
C * eps * (|value| + sqrt(A^2 @ B^2) + propagated input error), which grows like sqrt(K).
In the interpreter, dot operands are fp32 and fp32 -> bf16/fp16 stores truncate (up to 1 ulp);
on a GPU the operands are bf16/fp16, which the same bound covers."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lowmem_eraser.kernels import eraser_adapter, eraser_adapter_reference, triton_available

needs_triton = pytest.mark.skipif(not triton_available(), reason="needs triton with a GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
EPS = {torch.float32: 1e-5, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
C = 4.0
SCALE = 0.7


def _mag(a, b):
    """sqrt(a^2 @ b^2): the rounding-error scale of a @ b, ~ sqrt(K) * term size."""
    return (a.square() @ b.square()).sqrt()


def _gelu_grad(h):
    return 0.5 * (1 + torch.erf(h / 2**0.5)) + h * torch.exp(-0.5 * h * h) / (2 * torch.pi) ** 0.5


def _reference64(x, wd, bd, wu, bu, grad, scale):
    """fp64 forward and gradients with their rounding-error scales, from the kernel's inputs."""
    x, wd, bd, wu, bu, g = (t.detach().double().reshape(-1, t.shape[-1]) if t.dim() > 1 else t.detach().double()
                            for t in (x, wd, bd, wu, bu, grad))
    h = x @ wd.T + bd
    a = F.gelu(h)
    out = x + scale * (a @ wu.T + bu)
    h_err = _mag(x, wd.T) + bd.abs() + h.abs()
    a_err = _gelu_grad(h).abs() * h_err + a.abs()
    gwu = g @ wu
    dh = scale * gwu * _gelu_grad(h)
    dh_err = abs(scale) * (_mag(g, wu) * _gelu_grad(h).abs() + gwu.abs() * h_err) + dh.abs()
    return {
        "out": (out, x.abs() + abs(scale) * (_mag(a, wu.T) + _mag(a_err, wu.T) + bu.abs())),
        "dx": (g + dh @ wd, g.abs() + _mag(dh, wd) + _mag(dh_err, wd)),
        "d_down_w": (dh.T @ x, _mag(dh.T, x) + _mag(dh_err.T, x)),
        "d_down_b": (dh.sum(0), dh_err.square().sum(0).sqrt()),
        "d_up_w": (scale * g.T @ a, abs(scale) * (_mag(g.T, a) + _mag(g.T, a_err))),
        "d_up_b": (scale * g.sum(0), abs(scale) * g.square().sum(0).sqrt()),
    }


def _inputs(lead, dim, rank, dtype, weight_dtype, contiguous, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if contiguous:
        x = torch.randn(*lead, dim, generator=gen)
    else:  # a transposed view: same values, non-unit stride on the feature axis
        x = torch.randn(dim, *lead, generator=gen).movedim(0, -1)
    params = (
        torch.randn(rank, dim, generator=gen) / dim**0.5,
        0.5 * torch.randn(rank, generator=gen),
        torch.randn(dim, rank, generator=gen) / rank**0.5,
        0.5 * torch.randn(dim, generator=gen),
    )
    x = x.to(DEVICE, dtype).requires_grad_()
    params = [p.to(DEVICE, weight_dtype).requires_grad_() for p in params]
    grad = torch.randn(*lead, dim, generator=gen).to(DEVICE, dtype)
    return x, params, grad


def _check(lead, dim, rank, dtype, weight_dtype, contiguous):
    x, params, grad = _inputs(lead, dim, rank, dtype, weight_dtype, contiguous)
    assert x.is_contiguous() == contiguous
    out = eraser_adapter(x, *params, scale=SCALE)
    assert type(out.grad_fn).__name__ == "_EraserAdapterFunctionBackward", "the Triton path did not run"
    assert out.shape == x.shape and out.dtype == dtype
    grads = torch.autograd.grad(out, [x, *params], grad)
    ref = _reference64(x, *params, grad, SCALE)
    names = ("out", "dx", "d_down_w", "d_down_b", "d_up_w", "d_up_b")
    for name, value in zip(names, (out, *grads)):
        expected, err_scale = ref[name]
        want_dtype = dtype if name in ("out", "dx") else weight_dtype
        assert value.dtype == want_dtype, name
        err = (value.detach().double().reshape(expected.shape) - expected).abs()
        ratio = (err / (EPS[dtype] * (err_scale + expected.abs()))).max().item()  # + rounding of the result
        assert ratio <= C, f"{name}: max error {err.max().item():.3g} is {ratio:.2f} x eps * scale (limit {C})"


CASES = [  # lead shape, dim, rank, contiguous: one row, odd sizes, 3-D with dim > one tile, rank > one tile
    pytest.param((1,), 72, 7, True, id="N1-d72-r7"),
    pytest.param((37,), 100, 24, True, id="N37-d100-r24"),
    pytest.param((3, 100), 200, 24, True, id="3d-N300-d200-r24"),
    pytest.param((300,), 72, 130, False, id="noncontig-N300-d72-r130"),
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lead,dim,rank,contiguous", CASES)
def test_matches_fp64_with_fp32_master_weights(lead, dim, rank, contiguous, dtype):
    _check(lead, dim, rank, dtype, torch.float32, contiguous)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_matches_fp64_with_half_weights(dtype):
    _check((37,), 100, 24, dtype, dtype, True)


@needs_triton
def test_matches_fp64_long_sequence():
    _check((2048,), 100, 24, torch.float32, torch.float32, True)


@needs_triton
def test_saves_only_x_and_preactivation_and_is_deterministic():
    x, params, grad = _inputs((300,), 72, 24, torch.bfloat16, torch.float32, True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = eraser_adapter(x, *params, scale=SCALE)
    activations = sorted((tuple(t.shape), t.dtype) for t in saved if not any(t is p for p in params))
    assert activations == [((300, 24), torch.float32), ((300, 72), torch.bfloat16)]
    first = torch.autograd.grad(out, [x, *params], grad, retain_graph=True)
    second = torch.autograd.grad(out, [x, *params], grad)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_triton
def test_skips_unneeded_gradients():
    x, params, grad = _inputs((37,), 100, 24, torch.float32, torch.float32, True)
    x.requires_grad_(False)
    params[0].requires_grad_(False)
    out = eraser_adapter(x, *params, scale=SCALE)
    d_bd, d_wu, d_bu = torch.autograd.grad(out, params[1:], grad)
    ref = _reference64(x, *params, grad, SCALE)
    for name, value in (("d_down_b", d_bd), ("d_up_w", d_wu), ("d_up_b", d_bu)):
        expected, err_scale = ref[name]
        assert ((value.double() - expected).abs() <= C * EPS[torch.float32] * err_scale).all(), name


def test_pytorch_fallback_without_gpu_or_interpreter_or_triton():
    """One subprocess: no interpreter and no GPU -> reference path; then triton made unimportable."""
    script = r"""
import importlib, sys, torch
import lowmem_eraser.kernels as k

def run(k):
    torch.manual_seed(0)
    x = torch.randn(5, 12, requires_grad=True)
    wd, bd, wu, bu = torch.randn(3, 12), torch.randn(3), torch.randn(12, 3), torch.randn(12)
    y = k.eraser_adapter(x, wd, bd, wu, bu, scale=0.5)
    assert type(y.grad_fn).__name__ == "AddBackward0", y.grad_fn
    torch.testing.assert_close(y, k.eraser_adapter_reference(x, wd, bd, wu, bu, scale=0.5))
    q, s = torch.randint(-127, 128, (7, 12), dtype=torch.int8), torch.rand(7)
    z = k.int8_linear(x, q, s)
    assert type(z.grad_fn).__name__ == "_Int8LinearReferenceBackward", z.grad_fn
    torch.testing.assert_close(z, x @ (q.float() * s[:, None]).T)
    (y.sum() + z.sum()).backward()
    assert x.grad is not None

assert not k.triton_available()
run(k)
for name in [m for m in sys.modules if m.startswith("lowmem_eraser.kernels")]:
    del sys.modules[name]
sys.modules["triton"] = None
k = importlib.import_module("lowmem_eraser.kernels")
assert not k.triton_available()
run(k)
print("fallback ok")
"""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fallback ok" in result.stdout


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_adapter_output_alone_without_residual(dtype):
    """residual=False returns scale * (gelu(h) @ Wu^T + bu) and dx without the identity term."""
    x, params, grad = _inputs((37,), 100, 24, dtype, torch.float32, True)
    delta = eraser_adapter(x, *params, scale=SCALE, residual=False)
    assert type(delta.grad_fn).__name__ == "_EraserAdapterFunctionBackward"
    dx, *weight_grads = torch.autograd.grad(delta, [x, *params], grad)
    ref = _reference64(x, *params, grad, SCALE)
    x64, g64 = x.detach().double(), grad.double()
    expected = {"out": ref["out"][0] - x64, "dx": ref["dx"][0] - g64}
    for name, value in (("out", delta), ("dx", dx)):
        err = (value.detach().double() - expected[name]).abs()
        ratio = (err / (EPS[dtype] * (ref[name][1] + expected[name].abs()))).max().item()
        assert ratio <= C, f"{name}: {ratio:.2f} x eps * scale"
    for name, value in zip(("d_down_w", "d_down_b", "d_up_w", "d_up_b"), weight_grads):
        # the weights enter the dots in x's dtype (as in the reference), so x's precision bounds these too
        err = (value.double() - ref[name][0]).abs()
        assert (err / (EPS[dtype] * (ref[name][1] + ref[name][0].abs()))).max().item() <= C, name
    torch.testing.assert_close(
        delta, eraser_adapter_reference(x, *params, scale=SCALE, residual=False), rtol=0, atol=4 * EPS[dtype] * 10
    )

"""W8A16 int8_linear kernel vs an fp64 reference built from the same dequantized weight.

Tolerance per element: C * eps * (|value| + sqrt(x^2 @ W^2)), i.e. growing like sqrt(K).
The no-GPU / no-triton fallback of both ops is covered in test_kernel_eraser_adapter.py."""

import os

import pytest
import torch

from lowmem_eraser.kernels import int8_linear, int8_linear_reference, triton_available

needs_triton = pytest.mark.skipif(not triton_available(), reason="needs triton with a GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
EPS = {torch.float32: 1e-5, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
C = 4.0


def _inputs(lead, in_features, out_features, dtype, scale_dtype, with_bias, contiguous, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if contiguous:
        x = torch.randn(*lead, in_features, generator=gen)
    else:  # a transposed view: same values, non-unit stride on the feature axis
        x = torch.randn(in_features, *lead, generator=gen).movedim(0, -1)
    qweight = torch.randint(-127, 128, (out_features, in_features), generator=gen, dtype=torch.int8)
    scale = (torch.rand(out_features, generator=gen) + 0.5) / (127 * in_features**0.5)
    bias = torch.randn(out_features, generator=gen).to(DEVICE).requires_grad_() if with_bias else None
    grad = torch.randn(*lead, out_features, generator=gen).to(DEVICE, dtype)
    return x.to(DEVICE, dtype).requires_grad_(), qweight.to(DEVICE), scale.to(DEVICE, scale_dtype), bias, grad


def _assert_close(name, value, expected, err_scale, dtype):
    err = (value.detach().double() - expected).abs()
    ratio = (err / (EPS[dtype] * (err_scale + expected.abs()))).max().item()
    assert ratio <= C, f"{name}: max error {err.max().item():.3g} is {ratio:.2f} x eps * scale (limit {C})"


def _check(lead, in_features, out_features, dtype, scale_dtype, with_bias, contiguous):
    x, qweight, scale, bias, grad = _inputs(lead, in_features, out_features, dtype, scale_dtype, with_bias, contiguous)
    assert x.is_contiguous() == contiguous
    out = int8_linear(x, qweight, scale, bias)
    assert type(out.grad_fn).__name__ == "_Int8LinearFunctionBackward", "the Triton path did not run"
    assert out.shape == (*lead, out_features) and out.dtype == dtype
    grads = torch.autograd.grad(out, [x, bias] if with_bias else [x], grad)

    w = qweight.double() * scale.double()[:, None]
    x64, g64 = x.detach().double(), grad.double()
    expected = x64 @ w.T + (bias.detach().double() if with_bias else 0)
    _assert_close("out", out, expected, (x64.square() @ w.square().T).sqrt(), dtype)
    _assert_close("dx", grads[0], g64 @ w, (g64.square() @ w.square()).sqrt(), dtype)
    assert grads[0].dtype == dtype
    if with_bias:
        g2d = g64.reshape(-1, out_features)
        _assert_close("d_bias", grads[1], g2d.sum(0), g2d.square().sum(0).sqrt(), dtype)
        assert grads[1].dtype == bias.dtype


CASES = [  # lead shape, in, out, scale dtype, bias, contiguous
    pytest.param((1,), 72, 100, torch.float32, True, True, id="N1-72to100"),
    pytest.param((37,), 100, 72, torch.bfloat16, False, True, id="N37-100to72-bf16scale-nobias"),
    pytest.param((3, 100), 72, 300, torch.float32, True, True, id="3d-N300-72to300"),
    pytest.param((300,), 300, 72, torch.float32, True, False, id="noncontig-N300-300to72"),
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lead,in_features,out_features,scale_dtype,with_bias,contiguous", CASES)
def test_matches_fp64(lead, in_features, out_features, scale_dtype, with_bias, contiguous, dtype):
    _check(lead, in_features, out_features, dtype, scale_dtype, with_bias, contiguous)


@needs_triton
def test_matches_fp64_long_sequence():
    _check((2048,), 100, 300, torch.float32, torch.float32, True, True)


@pytest.mark.parametrize("path", [int8_linear, int8_linear_reference], ids=["kernel", "reference"])
def test_saves_only_int8_weight_and_scale(path):
    if path is int8_linear and not triton_available():
        pytest.skip("needs triton with a GPU or TRITON_INTERPRET=1")
    x, qweight, scale, bias, grad = _inputs((37,), 100, 72, torch.bfloat16, torch.float32, True, True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = path(x, qweight, scale, bias)
    assert len(saved) == 2 and saved[0] is qweight and saved[1] is scale
    dx, db = torch.autograd.grad(out, [x, bias], grad)
    w = qweight.double() * scale.double()[:, None]
    _assert_close("dx", dx, grad.double() @ w, (grad.double().square() @ w.square()).sqrt(), torch.bfloat16)
    _assert_close("d_bias", db, grad.double().sum(0), grad.double().square().sum(0).sqrt(), torch.bfloat16)


def test_reference_runs_on_meta_and_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(5, 16, device="meta", dtype=torch.bfloat16, requires_grad=True)
    qweight = torch.empty(8, 16, device="meta", dtype=torch.int8)
    scale = torch.empty(8, device="meta")
    out = int8_linear_reference(x, qweight, scale, torch.empty(8, device="meta"))
    out.sum().backward()
    assert out.shape == (5, 8) and out.dtype == torch.bfloat16 and x.grad.shape == x.shape
    with FakeTensorMode():
        x = torch.randn(5, 16, dtype=torch.bfloat16, requires_grad=True)
        out = int8_linear(x, torch.zeros(8, 16, dtype=torch.int8), torch.ones(8))  # the public op falls back
        out.sum().backward()
        assert out.shape == (5, 8) and x.grad.shape == x.shape

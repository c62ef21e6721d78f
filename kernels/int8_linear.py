"""W8A16 linear for the frozen int8 base: ``x @ (scale[:, None] * qweight).T + bias``.

Int8 tiles are converted in registers inside the K-loop, so no dequantized weight is ever
materialised, and autograd saves only ``qweight`` and ``scale``: a "dequantize then F.linear"
would save the bf16 weight for backward (+8.8 GiB on CogVideoX-5b). The weight is frozen, so
backward computes only the input gradient (and the bias gradient if one is asked for).
"""

from __future__ import annotations  # ``tl.constexpr`` annotations must not need triton to import

import torch
import torch.nn.functional as F

from .utils import (
    Launch, block, cdiv, check_close, dot_args, fp32_dot, jit, kernel_usable, pipeline_stages, probe_tokens, probes,
    runs_triton, target_of, tl,
)


@jit
def _w8a16_kernel(
    x_ptr, q_ptr, s_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_qk, stride_qn,
    SCALE_ALONG_K: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_TY: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out [M, N] = x [M, K] @ dequant(q) [K, N] (+ bias), fp32 accumulation.

    forward:    q is read as [K, N] = qweight^T; its per-row scale is per output column, so it is
                applied once after the K-loop (int8 -> bf16/fp16 is exact).
    input grad: q is read as [K, N] = qweight; the scale varies along K, so each tile is
                dequantized (int8 * scale -> dot dtype) inside the loop.
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = offs_m.to(tl.int64)[:, None] * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        x = tl.load(x_ptr + rows + ks[None, :], mask=(offs_m[:, None] < M) & (ks[None, :] < K), other=0.0)
        q = tl.load(
            q_ptr + ks.to(tl.int64)[:, None] * stride_qk + offs_n.to(tl.int64)[None, :] * stride_qn,
            mask=(ks[:, None] < K) & (offs_n[None, :] < N), other=0,
        )
        if SCALE_ALONG_K:
            s = tl.load(s_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)
            w = (q.to(tl.float32) * s[:, None]).to(DOT_TY)
        else:
            w = q.to(DOT_TY)
        acc = tl.dot(x.to(DOT_TY), w, acc, input_precision=PRECISION)
    if not SCALE_ALONG_K:
        acc *= tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def _w8a16(x2d, qweight, scale, bias, transposed):
    """x2d [M, K] @ dequant(qweight)^T (forward) or @ dequant(qweight) (``transposed``, input grad).

    fp32 dot operands in the interpreter (its bf16/fp16 dot is wrong) and IEEE precision for fp32
    activations on GPU (not the TF32 default, to match PyTorch's fp32 matmul)."""
    M, K = x2d.shape
    q_kn = qweight if transposed else qweight.t()
    N = q_kn.shape[1]
    target = target_of(x2d.device)
    out = torch.empty(M, N, device=x2d.device, dtype=x2d.dtype)
    if target.interpreter:  # big tiles: fewer programs run 3-6x faster in the interpreter
        tiles, options = {"BLOCK_M": block(M, 512), "BLOCK_N": block(N, 128), "BLOCK_K": block(K, 128)}, {}
    else:
        fp32 = fp32_dot(x2d.dtype, target)  # the int8 tile is converted to fp32 through shared memory
        bm, bn, bk = block(M, 64 if fp32 else 128), block(N, 128), block(K, 32 if fp32 else 64)
        tiles = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
        stages = pipeline_stages(bk * (bm * x2d.element_size() + bn), target, preferred=4, fixed_bytes=4 * bk * bn * fp32)
        options = {"num_warps": 8, "num_stages": stages}
    grid = (cdiv(M, tiles["BLOCK_M"]), cdiv(N, tiles["BLOCK_N"]))
    Launch(
        _w8a16_kernel, grid,
        (x2d, q_kn, scale, bias if bias is not None else out, out, M, N, K, q_kn.stride(0), q_kn.stride(1)),
        {"SCALE_ALONG_K": transposed, "HAS_BIAS": bias is not None, **dot_args(x2d.dtype, target), **tiles}, options,
    )()
    return out


def _bias_grad(grad, dtype):
    return grad.reshape(-1, grad.shape[-1]).sum(0).to(dtype)


class _Int8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, qweight, scale, bias):
        ctx.save_for_backward(qweight, scale)
        ctx.bias_dtype = None if bias is None else bias.dtype
        x2d = x.reshape(-1, x.shape[-1]).contiguous()
        return _w8a16(x2d, qweight, scale, bias, False).view(*x.shape[:-1], qweight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        qweight, scale = ctx.saved_tensors
        dx = db = None
        if ctx.needs_input_grad[0]:
            grad = grad_out.reshape(-1, grad_out.shape[-1]).contiguous()
            dx = _w8a16(grad, qweight, scale, None, True).view(*grad_out.shape[:-1], qweight.shape[1])
        if ctx.needs_input_grad[3]:
            db = _bias_grad(grad_out, ctx.bias_dtype)
        return dx, None, None, db


def _dequantize(qweight, scale, dtype):
    return qweight.to(dtype) * scale.to(dtype)[:, None]


class _Int8LinearReference(torch.autograd.Function):
    """Dequantize-then-F.linear, but the dequantized weight lives only inside forward and backward."""

    @staticmethod
    def forward(ctx, x, qweight, scale, bias):
        ctx.save_for_backward(qweight, scale)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(x, _dequantize(qweight, scale, x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        qweight, scale = ctx.saved_tensors
        dx = grad_out @ _dequantize(qweight, scale, grad_out.dtype) if ctx.needs_input_grad[0] else None
        db = _bias_grad(grad_out, ctx.bias_dtype) if ctx.needs_input_grad[3] else None
        return dx, None, None, db


def int8_linear_reference(x, qweight, scale, bias=None):
    """PyTorch path with plain torch ops (also valid on fake and meta tensors); saves only
    ``qweight`` and ``scale`` for backward."""
    return _Int8LinearReference.apply(x, qweight, scale, bias)


def _probe(device, dtype, out_features, in_features, has_bias, tokens):
    """Forward and input gradient of the kernel on `tokens` rows vs the reference (see `kernel_usable`)."""
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(tokens, in_features, device=device, generator=gen).to(dtype).requires_grad_()
    qweight = torch.randint(-127, 128, (out_features, in_features), device=device, generator=gen, dtype=torch.int8)
    scale = torch.rand(out_features, device=device, generator=gen) / (127 * in_features**0.5)
    bias = torch.randn(out_features, device=device, generator=gen).to(dtype) if has_bias else None
    grad = torch.randn(tokens, out_features, device=device, generator=gen).to(dtype)
    rtol = 1e-2 if dtype == torch.float32 else 5e-2
    got = _Int8LinearFunction.apply(x, qweight, scale, bias)
    want = int8_linear_reference(x, qweight, scale, bias)
    check_close("output", got, want, rtol)
    check_close("dx", *(torch.autograd.grad(y, x, grad)[0] for y in (got, want)), rtol)


def int8_linear(x, qweight, scale, bias=None):
    """``x @ (scale[:, None] * qweight).T + bias`` for x [..., in], int8 qweight [out, in] and a
    per-output-row scale; Triton W8A16 kernel where Triton can run, else the PyTorch reference.
    Output in x's dtype; fp32 accumulation; gradients for x (and bias), never for the weight.
    On a GPU the kernel is probed once per (device, dtype, shape), as `eraser_adapter` is."""
    if x.shape[-1] != qweight.shape[1]:
        raise ValueError(f"x [..., {x.shape[-1]}] does not match qweight {tuple(qweight.shape)}")
    if not runs_triton(x) or x.numel() == 0:
        return int8_linear_reference(x, qweight, scale, bias)
    out_features, in_features = qweight.shape
    tokens = probe_tokens(x.numel() // in_features)  # the AdaLN linears run on 1-2 rows: their own tiles
    if probes(x) and not kernel_usable(
        "int8_linear", (x.device, x.dtype, out_features, in_features, bias is not None, tokens),
        lambda: _probe(x.device, x.dtype, out_features, in_features, bias is not None, tokens),
    ):
        return int8_linear_reference(x, qweight, scale, bias)
    return _Int8LinearFunction.apply(x, qweight, scale, bias)

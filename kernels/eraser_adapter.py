"""Fused residual eraser adapter: ``x + scale * (gelu(x @ Wd^T + bd) @ Wu^T + bu)``.

Unfused PyTorch makes ~7 passes over the [N, dim] activations in forward and ~10 in backward
(bias, GELU, scale and residual each read and write them); here forward makes 3 and backward 5.
Forward saves only ``x`` and the rank-sized pre-activation ``h``, kept in fp32: it is only
rank/dim (~4-7 %) of the saved activations, and backward evaluates gelu'(h) at the unrounded
value instead of at a second bf16 rounding. Backward recomputes GELU from ``h``.
Weight gradients are split over tokens into per-program partial sums reduced on the host with
``torch.sum``: deterministic, no atomics.
"""

from __future__ import annotations  # ``tl.constexpr`` annotations must not need triton to import

import torch
import torch.nn.functional as F

from .utils import (
    Launch, Target, block, cdiv, check_close, dot_args, fp32_dot, jit, kernel_usable, pipeline_stages, probe_tokens,
    probes, runs_triton, target_of, tl,
)


# Constants are literals: a plain Python global read inside an @jit function compiles under the interpreter
# but is a NameError when compiling for a GPU (tests/test_kernel_compile.py checks every kernel for that).
@jit
def _gelu(h):
    """Exact erf GELU of an fp32 tile (``tl.math.erf`` needs fp32). 0.7071... = 1/sqrt(2)."""
    return 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))


@jit
def _gelu_grad(h):
    """d gelu / dh = Phi(h) + h * phi(h). 0.3989... = 1/sqrt(2*pi)."""
    cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
    return cdf + h * tl.exp(-0.5 * h * h) * 0.3989422804014327


@jit
def _down_kernel(
    a_ptr, w_ptr, bias_ptr, h_ptr, out_ptr,
    M, N, K,
    stride_wk, stride_wn,
    scale,
    BACKWARD: tl.constexpr, DOT_TY: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Rank-sized fp32 output from a full-width row-major activation ``a`` [M, K].

    forward:  out = x @ Wd^T + bd                      (the pre-activation h)
    backward: out = scale * (grad @ Wu) * gelu'(h)     (dL/dh)
    ``w`` is addressed as a [K, N] matrix through its strides, so no transposed copy is made.
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = offs_m.to(tl.int64)[:, None] * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        a = tl.load(a_ptr + rows + ks[None, :], mask=(offs_m[:, None] < M) & (ks[None, :] < K), other=0.0)
        w = tl.load(
            w_ptr + ks[:, None] * stride_wk + offs_n[None, :] * stride_wn,
            mask=(ks[:, None] < K) & (offs_n[None, :] < N), other=0.0,
        )
        acc = tl.dot(a.to(DOT_TY), w.to(DOT_TY), acc, input_precision=PRECISION)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    out_offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    if BACKWARD:
        h = tl.load(h_ptr + out_offs, mask=mask, other=0.0)
        acc = acc * scale * _gelu_grad(h)
    else:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + out_offs, acc, mask=mask)


@jit
def _up_kernel(
    a_ptr, w_ptr, bias_ptr, res_ptr, out_ptr,
    M, N, K,
    stride_wk, stride_wn,
    scale,
    FORWARD: tl.constexpr, ADD_RES: tl.constexpr, DOT_TY: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Full-width output from a rank-sized fp32 activation ``a`` [M, K], residual fused.

    forward:  out = x + scale * (gelu(h) @ Wu^T + bu)   (GELU recomputed per tile, never stored)
    backward: dx  = grad + dh @ Wd                      (scale is already inside dh)
    Without ADD_RES the residual term (x, resp. grad) is left out: the adapter output alone.
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        a = tl.load(
            a_ptr + offs_m.to(tl.int64)[:, None] * K + ks[None, :],
            mask=(offs_m[:, None] < M) & (ks[None, :] < K), other=0.0,
        )
        if FORWARD:
            a = _gelu(a)
        w = tl.load(
            w_ptr + ks[:, None] * stride_wk + offs_n[None, :] * stride_wn,
            mask=(ks[:, None] < K) & (offs_n[None, :] < N), other=0.0,
        )
        acc = tl.dot(a.to(DOT_TY), w.to(DOT_TY), acc, input_precision=PRECISION)
    if FORWARD:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        acc = scale * (acc + bias[None, :])
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    if ADD_RES:
        acc += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@jit
def _weight_grad_kernel(
    a_ptr, b_ptr, dw_ptr, db_ptr,
    M, N, T, T_PER_SPLIT,
    scale,
    GELU_B: tl.constexpr, DOT_TY: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Partial ``scale * a^T @ act(b)`` and ``scale * sum_t a`` over one token split.

    ``a`` [T, M] and ``b`` [T, N] are row-major; program (m, n, s) writes slice s of the fp32
    [splits, M, N] / [splits, M] buffers, so the host reduction is the only sum across programs.
    """
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, BLOCK_T)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for t0 in range(0, T_PER_SPLIT, BLOCK_T):
        ts = pid_s * T_PER_SPLIT + t0 + offs_t
        rows = ts.to(tl.int64)[:, None]
        a = tl.load(a_ptr + rows * M + offs_m[None, :], mask=(ts[:, None] < T) & (offs_m[None, :] < M), other=0.0)
        b = tl.load(b_ptr + rows * N + offs_n[None, :], mask=(ts[:, None] < T) & (offs_n[None, :] < N), other=0.0)
        if GELU_B:
            b = _gelu(b)
        a = a.to(tl.float32)
        db += tl.sum(a, axis=0)
        acc = tl.dot(tl.trans(a.to(DOT_TY)), b.to(DOT_TY), acc, input_precision=PRECISION)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(dw_ptr + pid_s * M * N + offs_m[:, None] * N + offs_n[None, :], acc * scale, mask=mask)
    if pid_n == 0:
        tl.store(db_ptr + pid_s * M + offs_m, db * scale, mask=offs_m < M)


def _dot_tiles(m: int, n: int, k: int, a_bytes: int, w_bytes: int, caps: dict, target: Target) -> tuple[dict, dict]:
    """(tiles, launch options) of a [m, k] @ [k, n] kernel. The interpreter gets big tiles (fewer programs
    run 3-6x faster there); a GPU gets `caps` (sized for N ~ 18k tokens, dim 1920-5120, rank 64-128) and the
    deepest pipeline that fits its shared memory."""
    if target.interpreter:
        return {"BLOCK_M": block(m, 512), "BLOCK_N": block(n, 128), "BLOCK_K": block(k, 128)}, {}
    fp32 = a_bytes == 4 and w_bytes == 4
    bm, bn, bk = block(m, caps["BLOCK_M"]), block(n, caps["BLOCK_N"]), block(k, min(caps["BLOCK_K"], 32 if fp32 else 64))
    stages = pipeline_stages(bk * (bm * a_bytes + bn * w_bytes), target, preferred=3, fixed_bytes=4 * bk * bn * fp32)
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, {"num_warps": caps["num_warps"], "num_stages": stages}


_DOWN_GPU = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4}
_UP_GPU = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 8}


def _down(a, w_kn, bias_or_h, scale, backward):
    """fp32 [M, rank] = a [M, K] @ w_kn [K, rank] + bias (forward) or * scale * gelu'(h) (backward).
    `w_kn` is already in a's dtype."""
    M, K = a.shape
    N = w_kn.shape[1]
    target = target_of(a.device)
    out = torch.empty(M, N, device=a.device, dtype=torch.float32)
    tiles, options = _dot_tiles(M, N, K, a.element_size(), w_kn.element_size(), _DOWN_GPU, target)
    grid = (cdiv(M, tiles["BLOCK_M"]), cdiv(N, tiles["BLOCK_N"]))
    Launch(
        _down_kernel, grid, (a, w_kn, bias_or_h, bias_or_h, out, M, N, K, w_kn.stride(0), w_kn.stride(1), scale),
        {"BACKWARD": backward, **dot_args(a.dtype, target), **tiles}, options,
    )()
    return out


def _up(a, w_kn, bias, res, scale, add_res):
    """res + scale * (gelu(a) @ w_kn + bias) (forward), or res + a @ w_kn when bias is None (backward);
    without `add_res` the `res +` is left out. `a` is fp32 [M, rank]; [M, dim] in res's dtype."""
    M, K = a.shape
    N = res.shape[1]
    target = target_of(a.device)
    out = torch.empty_like(res)
    tiles, options = _dot_tiles(M, N, K, a.element_size(), w_kn.element_size(), _UP_GPU, target)
    grid = (cdiv(M, tiles["BLOCK_M"]), cdiv(N, tiles["BLOCK_N"]))
    forward = bias is not None
    Launch(
        _up_kernel, grid,
        (a, w_kn, bias if forward else out, res, out, M, N, K, w_kn.stride(0), w_kn.stride(1), scale),
        {"FORWARD": forward, "ADD_RES": add_res, **dot_args(res.dtype, target), **tiles}, options,
    )()
    return out


def _weight_grad(a, b, scale, gelu_b, dot_dtype, w_dtype, b_dtype):
    """(scale * a^T @ act(b), scale * a.sum(0)) for a [T, M], b [T, N], reduced deterministically.

    Splits T until the grid has ~2 programs per SM: the rank-sized outputs alone give too few
    tiles to fill a GPU."""
    T, M = a.shape
    N = b.shape[1]
    target = target_of(a.device)
    bm, bn = block(M, 128), block(N, 128)
    if target.interpreter:
        bt, options = 256, {}
    else:
        fp32 = fp32_dot(dot_dtype, target)
        # GELU on a [64, 128] fp32 tile next to a 128x128 accumulator spills on sm_86/89 (255 registers): halve it
        bt = 32 if fp32 or (gelu_b and target.capability < 90) else 64
        stages = pipeline_stages(bt * (bm * a.element_size() + bn * b.element_size()), target, preferred=3,
                                 fixed_bytes=4 * bt * max(bm, bn) * fp32)
        options = {"num_warps": 8, "num_stages": stages}
    tiles = cdiv(M, bm) * cdiv(N, bn)
    chunks = cdiv(T, bt)
    t_per_split = cdiv(chunks, min(chunks, max(1, 2 * target.num_sms // tiles))) * bt
    splits = cdiv(T, t_per_split)
    dw = torch.empty(splits, M, N, device=a.device, dtype=torch.float32)
    db = torch.empty(splits, M, device=a.device, dtype=torch.float32)
    Launch(
        _weight_grad_kernel, (cdiv(M, bm), cdiv(N, bn), splits), (a, b, dw, db, M, N, T, t_per_split, scale),
        {"GELU_B": gelu_b, **dot_args(dot_dtype, target), "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_T": bt}, options,
    )()
    return dw.sum(0).to(w_dtype), db.sum(0).to(b_dtype)


class _EraserAdapterFunction(torch.autograd.Function):
    """Weights enter the dots in x's dtype, as in the reference: cast once on the host (rank x dim, tiny),
    which also halves their shared-memory tiles."""

    @staticmethod
    def forward(ctx, x, down_weight, down_bias, up_weight, up_bias, scale, residual):
        x2d = x.reshape(-1, x.shape[-1]).contiguous()
        h = _down(x2d, down_weight.to(x.dtype).t(), down_bias, 1.0, False)
        out = _up(h, up_weight.to(x.dtype).t(), up_bias, x2d, scale, residual)
        ctx.save_for_backward(x2d, h, down_weight, up_weight)
        ctx.scale, ctx.residual = scale, residual
        ctx.bias_dtypes = (down_bias.dtype, up_bias.dtype)
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad_out):
        x2d, h, down_weight, up_weight = ctx.saved_tensors
        needs_x, needs_wd, needs_bd, needs_wu, needs_bu = ctx.needs_input_grad[:5]
        grad = grad_out.reshape(x2d.shape).contiguous()
        dx = d_wd = d_bd = d_wu = d_bu = None
        if needs_wu or needs_bu:
            d_wu, d_bu = _weight_grad(grad, h, ctx.scale, True, x2d.dtype, up_weight.dtype, ctx.bias_dtypes[1])
        if needs_x or needs_wd or needs_bd:
            dh = _down(grad, up_weight.to(x2d.dtype), h, ctx.scale, True)
            if needs_x:
                dx = _up(dh, down_weight.to(x2d.dtype), None, grad, 1.0, ctx.residual)
                dx = dx.view(grad_out.shape)
            if needs_wd or needs_bd:
                d_wd, d_bd = _weight_grad(dh, x2d, 1.0, False, x2d.dtype, down_weight.dtype, ctx.bias_dtypes[0])
        return dx, d_wd, d_bd, d_wu, d_bu, None, None


def eraser_adapter_reference(x, down_weight, down_bias, up_weight, up_bias, scale=1.0, residual=True):
    """PyTorch reference: weights cast to x's dtype, exact erf GELU."""
    dt = x.dtype
    h = F.gelu(F.linear(x, down_weight.to(dt), down_bias.to(dt)), approximate="none")
    delta = scale * F.linear(h, up_weight.to(dt), up_bias.to(dt))
    return x + delta if residual else delta


def _probe(device, dtype, weight_dtype, dim, rank, tokens):
    """Forward and backward of the fused op on `tokens` rows vs the reference (see `kernel_usable`). The
    tolerance only separates a working kernel from a broken one (the reference may use TF32 for fp32)."""
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(tokens, dim, device=device, generator=gen).to(dtype).requires_grad_()
    weights = [(torch.randn(shape, device=device, generator=gen) / shape[-1] ** 0.5).to(weight_dtype).requires_grad_()
               for shape in ((rank, dim), (rank,), (dim, rank), (dim,))]
    grad = torch.randn(tokens, dim, device=device, generator=gen).to(dtype)
    rtol = 1e-2 if dtype == torch.float32 else 5e-2
    for residual in (True, False):
        got = _EraserAdapterFunction.apply(x, *weights, 0.5, residual)
        want = eraser_adapter_reference(x, *weights, 0.5, residual)
        check_close("output", got, want, rtol)
        for name, g, w in zip(("dx", "d_down_w", "d_down_b", "d_up_w", "d_up_b"),
                              torch.autograd.grad(got, [x, *weights], grad),
                              torch.autograd.grad(want, [x, *weights], grad)):
            check_close(name, g, w, rtol)


def eraser_adapter(x, down_weight, down_bias, up_weight, up_bias, scale=1.0, residual=True):
    """``x + scale * (gelu(x @ Wd^T + bd) @ Wu^T + bu)`` for x [..., dim]; fused Triton kernels
    where Triton can run, else the PyTorch reference. Output in x's dtype; fp32 accumulation.
    ``residual=False`` returns the adapter output alone (what the localisation loss needs).
    On a GPU the kernels are probed once per (device, dtypes, shape): a GPU or Triton they do not work
    on gets one warning and the PyTorch reference."""
    rank, dim = down_weight.shape
    if x.shape[-1] != dim or tuple(up_weight.shape) != (dim, rank):
        raise ValueError(f"x [..., {x.shape[-1]}], down_weight {tuple(down_weight.shape)}, "
                         f"up_weight {tuple(up_weight.shape)} do not compose")
    if not runs_triton(x) or x.numel() == 0:
        return eraser_adapter_reference(x, down_weight, down_bias, up_weight, up_bias, scale, residual)
    tokens = probe_tokens(x.numel() // dim)
    if probes(x) and not kernel_usable(
        "eraser_adapter", (x.device, x.dtype, down_weight.dtype, dim, rank, tokens),
        lambda: _probe(x.device, x.dtype, down_weight.dtype, dim, rank, tokens),
    ):
        return eraser_adapter_reference(x, down_weight, down_bias, up_weight, up_bias, scale, residual)
    return _EraserAdapterFunction.apply(x, down_weight, down_bias, up_weight, up_bias, float(scale), residual)

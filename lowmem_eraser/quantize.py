"""An 8-bit frozen base: every `nn.Linear` inside `transformer_blocks` becomes per-channel absmax int8.

Only the block linears are quantised: they hold > 95% of the weights. Patch/time embeddings, norms and
`proj_out` are small and sit where rounding errors reach the predicted velocity directly, and the adapters
are the trained fp32 master weights, so all of those keep their dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import LowmemEraserError
from .kernels import int8_linear, int8_linear_reference, triton_available

BACKENDS = ("auto", "int8", "triton", "bnb")


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel absmax int8: returns (qweight int8 [out, in], scale fp32 [out])."""
    # In place on one fp32 copy (the same values as `round(w / scale).clamp()`): loading quantises on the host,
    # where every full-size temporary of a 5b linear is 150 MB more peak RAM.
    w = weight.detach().to(torch.float32, copy=True)
    scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0
    qweight = w.div_(scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return qweight, scale


class Int8Linear(nn.Module):
    """Frozen int8 linear. Weights are buffers (never parameters), so no optimizer or autograd can touch them.

    The forward and input-gradient run through an autograd Function that saves only `weight` (int8) and
    `weight_scale`: a "dequantize then F.linear" would save a full bf16 copy of every weight for backward.
    """

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, use_triton: bool):
        super().__init__()
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.use_triton = use_triton
        self.register_buffer("weight", qweight)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, use_triton: bool = False) -> "Int8Linear":
        qweight, scale = quantize_weight(linear.weight)
        return cls(qweight, scale, linear.bias, use_triton)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = int8_linear if self.use_triton else int8_linear_reference
        return linear(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, triton={self.use_triton}"


def _bnb_linear(linear: nn.Linear) -> nn.Module:
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise LowmemEraserError(
            "memory.quantize: bnb needs bitsandbytes, an optional extra: pip install 'lowmem-eraser[bnb]' "
            "(or use int8/triton/auto, which need nothing extra)"
        ) from None

    layer = bnb.nn.Linear8bitLt(
        linear.in_features, linear.out_features, bias=linear.bias is not None, has_fp16_weights=False, threshold=0.0
    )
    layer.weight = bnb.nn.Int8Params(linear.weight.detach().to("cpu"), requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer.to(linear.weight.device)  # bitsandbytes quantises on this move


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend `backend` means for weights that will run on `device`."""
    if backend not in BACKENDS:
        raise LowmemEraserError(f"quantize backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "int8"
    if backend == "triton" and not triton_available():
        raise LowmemEraserError("quantize backend 'triton' needs triton and a CUDA device (or TRITON_INTERPRET=1)")
    return backend


def quantize_linears(module: nn.Module, backend: str = "auto") -> int:
    """Replace each `nn.Linear` below `module` with a frozen 8-bit linear, in place; returns how many were
    replaced (0: nothing to do, no error).

    The unit `quantize_base` applies to all of `transformer_blocks` at once and the block-by-block loader
    (lowram_load.py) to one block at a time, so both produce the same modules and the same weights."""
    # (parent, name) rather than the linears themselves: each full-precision weight is freed as soon as its
    # linear is replaced, so at most one linear is held twice (full and 8-bit) at any time.
    targets = [
        (parent, child_name)
        for parent in module.modules()
        for child_name, child in parent.named_children()
        if type(child) is nn.Linear
    ]
    if not targets:
        return 0
    chosen = resolve_backend(backend, getattr(*targets[0]).weight.device)
    for parent, child_name in targets:
        linear = getattr(parent, child_name)
        if chosen == "bnb":
            replacement = _bnb_linear(linear)
        else:
            replacement = Int8Linear.from_linear(linear, use_triton=chosen == "triton")
        setattr(parent, child_name, replacement)
        del linear, replacement
    module.requires_grad_(False)
    return len(targets)


def quantize_base(transformer: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace each `nn.Linear` inside the transformer's repeated blocks (CogVideoX: `transformer_blocks`; any
    registered family's, families/) with a frozen 8-bit linear, in place.

    Backends: "int8" (PyTorch, any device, also fake/meta tensors), "triton" (fused W8A16 kernel, CUDA or the
    interpreter), "bnb" (bitsandbytes `Linear8bitLt`, casts activations to fp16), "auto" (triton on CUDA,
    int8 elsewhere; see bench/results/kernels.md for the measurements behind the choice).
    """
    from .families import repeated_blocks

    blocks = repeated_blocks(transformer)
    if sum(quantize_linears(block, backend) for block in blocks) == 0:
        raise LowmemEraserError("quantize_base: no nn.Linear left in the transformer's blocks (already quantised?)")
    transformer.requires_grad_(False)
    return transformer

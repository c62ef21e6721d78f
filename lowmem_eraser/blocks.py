"""Where the eraser adapters go in a diffusers CogVideoX transformer."""

from __future__ import annotations

from torch import nn

from .errors import LowmemEraserError


def cogvideox_blocks(transformer: nn.Module) -> list[nn.Module]:
    """The `CogVideoXBlock`s of `transformer`, each with the joint text+video attention `attn1`."""
    blocks = getattr(transformer, "transformer_blocks", None)
    if blocks is None or not all(hasattr(block, "attn1") for block in blocks):
        raise LowmemEraserError(
            f"{type(transformer).__name__} is not a CogVideoX transformer: expected `transformer_blocks` of "
            "blocks with an `attn1` attention"
        )
    return list(blocks)

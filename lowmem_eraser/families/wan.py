"""Wan2.1 / Wan2.2: no published eraser format exists.

Text enters Wan only through each block's cross-attention `attn2` (query: video, key/value: text), so the
adapter goes where Receler puts it in Stable Diffusion (on the cross-attention `attn2` of every transformer
block): added to `attn2`'s output, before the block's residual. `attn2` returns one tensor (the video tokens).
"""

from . import Family, register

FAMILY = register(Family(
    name="Wan",
    transformer_classes=("WanTransformer3DModel",),
    blocks="blocks",
    attention="attn2",
    key="blocks.{}.attn2.adapter",
    splits_output=False,
    concept_attention="cross",  # attn2: the only place the text enters
    experts=("transformer", "transformer_2"),  # Wan2.2 A14B: high-noise, low-noise expert
    notes="cross-attention attn2 of every block (Receler's placement; no published format)",
))

"""HunyuanVideo: the published layout of the official method's HunyuanVideo erasers (SPEC §6).

Adapters only on the single-stream blocks (`HunyuanVideoSingleTransformerBlock`), added to the video output
that the block's `attn` returns before the block concatenates it with the text output; the adapter width is the
attention's `to_v` input width, as the published code reads it.
"""

from . import Family, register

FAMILY = register(Family(
    name="HunyuanVideo",
    transformer_classes=("HunyuanVideoTransformer3DModel",),
    blocks="single_transformer_blocks",
    attention="attn",
    key="single_transformer_blocks.{}.attn.adapter",
    splits_output=True,
    dim_linear="to_v",
    stacks=("transformer_blocks", "single_transformer_blocks"),  # dual-stream blocks run first
    notes="single-stream blocks' attn, video output (published)",
))

"""CogVideoX (2b, 5b): the published T2VUnlearning layout.

Text and video share one joint attention, `CogVideoXBlock.attn1`, which returns (video, text); the adapter is
added to the video output before the block's AdaLN gate and residual, in every block (SPEC §1).
"""

from . import Family, register

FAMILY = register(Family(
    name="CogVideoX",
    transformer_classes=("CogVideoXTransformer3DModel",),
    blocks="transformer_blocks",
    attention="attn1",
    key="transformer_blocks.{}.attn1.adapter",
    splits_output=True,
    trainable=True,
    concept_attention="joint",
    notes="joint text+video attention attn1 of every block, video output (published)",
))

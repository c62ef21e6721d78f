"""Wan2.1 / Wan2.2: no published eraser format exists.

Text enters Wan only through each block's cross-attention `attn2` (query: video, key/value: text), so the
adapter goes where Receler puts it in Stable Diffusion (on the cross-attention `attn2` of every transformer
block): added to `attn2`'s output, before the block's residual. `attn2` returns one tensor (the video tokens).

Training: flow matching (FlowMatchEulerDiscreteScheduler, or the published UniPC with flow sigmas); UMT5-XXL
prompt embeddings of 512 tokens, zero after each prompt's end, as WanPipeline pads them; latents
[B, C, F, H, W]; rotary embeddings are computed inside the transformer. Wan2.2 A14B's two experts train in one
run, each on the timesteps its pipeline gives it (t >= boundary_ratio x 1000: `transformer`, below:
`transformer_2`).
"""

from __future__ import annotations

import torch

from . import Family, register
from .runtime import Runtime


class WanRuntime(Runtime):
    pipeline_class = "WanPipeline"
    transformer_class = "WanTransformer3DModel"
    text_encoder_class = "UMT5EncoderModel"
    vae_class = "AutoencoderKLWan"
    text_length = 512  # WanPipeline's max_sequence_length
    fps = 16
    default_video = (81, 480, 832)  # Wan2.1's published 480p default
    # Wan2.2-TI2V-5B: one timestep per video token; Wan2.2 A14B: the timestep where transformer_2 takes over
    pipeline_options = ("expand_timesteps", "boundary_ratio")
    expert_modules = ("transformer_2",)  # Wan2.2 A14B's low-noise expert

    def step_extras(self, pipe, video, guidance_scale, device):
        """Whether the pipeline gives the transformer one timestep per video token (Wan2.2-TI2V-5B)."""
        return bool(pipe.config.expand_timesteps) or None

    def velocity(self, transformer, x_t, t, text, extras):
        if extras:  # as WanPipeline with expand_timesteps: t for every (frame, h/2, w/2) token, [B, tokens]
            _, patch_h, patch_w = transformer.config.patch_size
            tokens = x_t.shape[2] * (x_t.shape[3] // patch_h) * (x_t.shape[4] // patch_w)
            t = t.reshape(-1, 1).expand(-1, tokens)
        return super().velocity(transformer, x_t, t, text, extras)

    def decode(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        # WanPipeline un-normalises and decodes inline in __call__ (no decode method to call): the same lines.
        config = pipe.vae.config
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        return pipe.vae.decode(latents * std + mean, return_dict=False)[0]


FAMILY = register(Family(
    name="Wan",
    transformer_classes=("WanTransformer3DModel",),
    blocks="blocks",
    attention="attn2",
    key="blocks.{}.attn2.adapter",
    splits_output=False,
    concept_attention="cross",  # attn2: the only place the text enters
    experts=("transformer", "transformer_2"),  # Wan2.2 A14B: high-noise, low-noise expert
    runtime=WanRuntime(),
    notes="cross-attention attn2 of every block (Receler's placement; no published format)",
))

"""CogVideoX (2b, 5b): the published T2VUnlearning layout.

Text and video share one joint attention, `CogVideoXBlock.attn1`, which returns (video, text); the adapter is
added to the video output before the block's AdaLN gate and residual, in every block (SPEC §1).
"""

from __future__ import annotations

import torch

from . import Family, register
from .runtime import Runtime


class CogVideoXRuntime(Runtime):
    pipeline_class = "CogVideoXPipeline"
    transformer_class = "CogVideoXTransformer3DModel"
    text_encoder_class = "T5EncoderModel"
    vae_class = "AutoencoderKLCogVideoX"
    text_length = 226
    fps = 8
    frame_step = 8  # 8k+1 frames (49): what the published models were trained and are sampled at

    def max_text_length(self, transformer_config: dict) -> int:
        return transformer_config.get("max_text_seq_length", self.text_length)

    def video_size(self, transformer_config: dict, vae_scale: int) -> tuple[int, int, int]:
        return (transformer_config.get("sample_frames", 49), transformer_config.get("sample_height", 60) * vae_scale,
                transformer_config.get("sample_width", 90) * vae_scale)

    def velocity(self, transformer, x_t, t, text, extras):
        return transformer(hidden_states=x_t, encoder_hidden_states=text, timestep=t, image_rotary_emb=extras,
                           return_dict=False)[0]

    def step_extras(self, pipe, video, guidance_scale, device):
        """The 3-D rotary embeddings CogVideoX-5b's pipeline builds outside the transformer (None on 2b)."""
        if not pipe.transformer.config.use_rotary_positional_embeddings:
            return None
        frames = (video.frames - 1) // 4 + 1
        return pipe._prepare_rotary_positional_embeddings(video.height, video.width, frames, device)

    def renoise(self, scheduler, x0: torch.Tensor, generator: torch.Generator, num_inference_steps: int):
        """DDIM v-prediction: t uniform over all training timesteps, the scheduler's `add_noise` (the paper's
        E over x, ε, t)."""
        t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator)
        return self.noise_at(scheduler, x0, t, generator, num_inference_steps), t

    def noise_at(self, scheduler, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator,
                 num_inference_steps: int, grid=None) -> torch.Tensor:
        """x0 noised by the scheduler's `add_noise` at training timesteps t [B], ε drawn from `generator`."""
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        return scheduler.add_noise(x0, noise, t)


FAMILY = register(Family(
    name="CogVideoX",
    transformer_classes=("CogVideoXTransformer3DModel",),
    blocks="transformer_blocks",
    attention="attn1",
    key="transformer_blocks.{}.attn1.adapter",
    splits_output=True,
    concept_attention="joint",
    runtime=CogVideoXRuntime(),
    notes="joint text+video attention attn1 of every block, video output (published)",
))

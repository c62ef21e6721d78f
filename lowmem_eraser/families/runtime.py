"""What training, sampling and generation ask of a family: its classes, how its prompts are encoded, how its
transformer is called, how latents are re-noised. One `Runtime` per trainable family (its family file); the
defaults here are the shared behaviour, a family overrides what differs.

Everything runs through the family's own diffusers pipeline (x0 generation, trajectory sampling, validation,
`infer`): its `encode_prompt`, its denoising loop with the interrupt callback, its VAE decode.
"""

from __future__ import annotations

import torch


class Runtime:
    pipeline_class: str  # diffusers pipeline: sampling from precomputed embeddings, `infer`
    transformer_class: str  # diffusers transformer the folder's transformer/ holds
    text_encoder_class: str  # transformers encoder class of text_encoder/
    vae_class: str  # diffusers VAE class of vae/
    text_length: int  # the pipeline's default max_sequence_length: every prompt is padded to it
    fps: int  # the published frame rate (`infer` output)
    default_video: tuple[int, int, int] | None = None  # (frames, height, width) `infer` uses; None: from config

    def max_text_length(self, transformer_config: dict) -> int:
        """Tokens every prompt is padded to (the embeddings' L, the concept mask's width)."""
        return self.text_length

    def video_size(self, transformer_config: dict, vae_scale: int) -> tuple[int, int, int]:
        """(frames, height, width) a generation without explicit sizes uses."""
        return self.default_video

    def encode(self, pipe, prompts: list[str], max_length: int, device, dtype) -> torch.Tensor:
        """Embeddings [n, L, D] of `prompts`, exactly as the family's pipeline encodes a prompt."""
        return pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=max_length,
                                  device=device, dtype=dtype)[0]

    def velocity(self, transformer, x_t, t, text, rotary):
        """The transformer's prediction for latents x_t at timesteps t [B], text embeddings [B, L, D]."""
        return transformer(hidden_states=x_t, encoder_hidden_states=text, timestep=t, return_dict=False)[0]

    def rotary(self, pipe, video, device):
        """Position embeddings the pipeline computes outside the transformer, or None."""
        return None

    def decode(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        """Video [B, C, F, H, W] in [-1, 1] from the pipeline's latents, as its `__call__` decodes them."""
        return pipe.decode_latents(latents)

    def renoise(self, scheduler, x0: torch.Tensor, generator: torch.Generator, num_inference_steps: int):
        """(x_t, t): x0 noised by the scheduler's own forward process at a timestep t drawn from the pipeline's
        (shifted) inference grid of `num_inference_steps` steps: flow matching, x_t = (1 − σ)·x0 + σ·ε.

        The draw runs on a copy of the scheduler (set_timesteps moves its state; the sampling pipeline keeps
        its own)."""
        grid = type(scheduler).from_config(scheduler.config)
        grid.set_timesteps(num_inference_steps)
        index = torch.randint(0, len(grid.timesteps), (x0.shape[0],), generator=generator)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        t = grid.timesteps[index]
        if hasattr(grid, "scale_noise"):  # FlowMatchEulerDiscreteScheduler
            return grid.scale_noise(x0, t, noise), t
        return grid.add_noise(x0, noise, t), t  # UniPC with flow sigmas (Wan's published scheduler)

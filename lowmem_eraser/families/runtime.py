"""What training, sampling and generation ask of a family: its classes, how its prompts are encoded, how its
transformer is called, how latents are re-noised. One `Runtime` per trainable family (its family file); the
defaults here are the shared behaviour (one text encoder whose embeddings are the whole text condition, flow
matching), a family overrides what differs (CogVideoX: DDIM v-prediction and rotary embeddings; HunyuanVideo:
two text encoders and guidance).

Everything runs through the family's own diffusers pipeline (x0 generation, trajectory sampling, validation,
`infer`): its `encode_prompt`, its denoising loop with the interrupt callback, its VAE decode.

A text condition is what `encode` returns for a batch of prompts: a tensor [n, L, D] here, or a family's own
object (HunyuanVideo: embeddings, mask and pooled CLIP vector) that supports what the trainer does with one:
`cond[index]`, `.to(device)`, `.cpu()`, `.expand_as(other)`, `.shape` (batch first), `.dtype`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import TrainingError


class Runtime:
    pipeline_class: str  # diffusers pipeline: sampling from precomputed embeddings, `infer`
    transformer_class: str  # diffusers transformer the folder's transformer/ holds
    text_encoder_class: str  # transformers encoder class of text_encoder/
    vae_class: str  # diffusers VAE class of vae/
    text_length: int  # the pipeline's default max_sequence_length: every prompt is padded to it
    fps: int  # the published frame rate (`infer` output)
    default_video: tuple[int, int, int] | None = None  # (frames, height, width) `infer` uses; None: from config
    # The pipeline's text components ("tokenizer", "text_encoder"[, "tokenizer_2", "text_encoder_2"]):
    # sub-folders of a model folder, constructor arguments of the pipeline.
    text_modules: tuple[str, ...] = ("tokenizer", "text_encoder")
    frame_step: int = 4  # videos have frame_step·k + 1 frames (the VAE compresses time by 4)
    # The pipeline's own settings stored in model_index.json (Wan2.2-TI2V-5B: expand_timesteps): passed to the
    # pipeline whenever it is built from a folder.
    pipeline_options: tuple[str, ...] = ()
    # Pipeline modules holding further experts (Wan2.2 A14B: "transformer_2", sub-folder of the same name).
    expert_modules: tuple[str, ...] = ()

    def experts(self, model_dir) -> tuple[str, ...]:
        """The folder's transformers in the pipeline's order: ("transformer",), or with the expert modules the
        folder has (Wan2.2 A14B: ("transformer", "transformer_2"))."""
        return ("transformer", *(name for name in self.expert_modules if (Path(model_dir) / name).is_dir()))

    def check_folder(self, model_dir: Path, field: str) -> None:
        """One clear error before any work for a folder of this family that training cannot run yet."""

    def size_multiple(self, model_dir) -> int:
        """Height and width must be multiples of this: the VAE's spatial compression (vae/config.json; 8 when it
        cannot be read) x the transformer's spatial patch (Wan2.2-TI2V-5B: 16 x 2 = 32; the others 8 x 2)."""
        from ..loading import folder_json

        vae, transformer = folder_json(model_dir, "vae/config.json"), folder_json(model_dir, "transformer/config.json")
        scale = vae.get("scale_factor_spatial") or vae.get("spatial_compression_ratio") or 8
        patch = transformer.get("patch_size", 2)
        patch = patch[-1] if isinstance(patch, (list, tuple)) else patch
        return int(scale) * int(patch or 1)

    def generation_kwargs(self, pipe) -> dict:
        """Extra keyword arguments `infer` gives the pipeline so that it encodes prompts as training did."""
        return {}

    def folder_options(self, model_dir) -> dict:
        """`pipeline_options` as the folder's model_index.json sets them (absent: the pipeline's defaults)."""
        from ..loading import folder_json

        if not self.pipeline_options or model_dir is None:
            return {}
        index = folder_json(model_dir, "model_index.json")
        return {name: index[name] for name in self.pipeline_options if name in index}

    def max_text_length(self, transformer_config: dict) -> int:
        """Tokens every prompt is padded to (the embeddings' L, the concept mask's width)."""
        return self.text_length

    def video_size(self, transformer_config: dict, vae_scale: int) -> tuple[int, int, int]:
        """(frames, height, width) a generation without explicit sizes uses."""
        return self.default_video

    def load_text_modules(self, model_dir: Path, dtype: torch.dtype) -> dict:
        """The folder's tokenizer(s) and text encoder(s), keyed as the pipeline takes them."""
        import transformers
        from transformers import AutoTokenizer

        from ..loading import from_pretrained_or_error

        return {"tokenizer": from_pretrained_or_error(AutoTokenizer, model_dir / "tokenizer"),
                "text_encoder": from_pretrained_or_error(getattr(transformers, self.text_encoder_class),
                                                         model_dir / "text_encoder", torch_dtype=dtype)}

    def pipeline(self, **modules):
        """The family's pipeline; every module not given (text encoders, VAE, transformer, scheduler) is None;
        `pipeline_options` given are passed on."""
        import diffusers

        names = (*self.text_modules, "vae", "transformer", "scheduler")
        options = {name: modules[name] for name in (*self.pipeline_options, *self.expert_modules) if name in modules}
        return getattr(diffusers, self.pipeline_class)(**{name: modules.get(name) for name in names}, **options)

    def encode(self, pipe, prompts: list[str], max_length: int, device, dtype):
        """The text condition of `prompts`, exactly as the family's pipeline encodes a prompt."""
        return pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=max_length,
                                  device=device, dtype=dtype)[0]

    def concat(self, conditions: list):
        """One text condition from the conditions of consecutive prompt batches."""
        return torch.cat(conditions)

    def stored(self, condition):
        """A text condition as plain tensors (what the cache file holds: loads with weights_only=True)."""
        return condition

    def restored(self, stored):
        """The text condition `stored` wrote."""
        return stored

    def concept_tokens(self, tokenizer, prompts: list[str], concept: str, max_length: int) -> torch.Tensor:
        """Bool [n, L]: the positions of each prompt's text condition that spell `concept`."""
        from ..localization import concept_token_mask

        return concept_token_mask(tokenizer, prompts, concept, max_length)

    def pipeline_text(self, prompt, negative, device) -> dict:
        """The pipeline's keyword arguments for a precomputed condition and its negative (classifier-free
        guidance against the empty prompt)."""
        return {"prompt_embeds": prompt.to(device), "negative_prompt_embeds": negative.expand_as(prompt).to(device)}

    def step_extras(self, pipe, video, guidance_scale: float, device):
        """What the transformer needs besides (x_t, t, text) that the pipeline computes once per video size
        (CogVideoX-5b: rotary embeddings; HunyuanVideo: the distilled guidance), or None."""
        return None

    def velocity(self, transformer, x_t, t, text, extras):
        """The transformer's prediction for latents x_t at timesteps t [B], text condition `text`."""
        return transformer(hidden_states=x_t, encoder_hidden_states=text, timestep=t, return_dict=False)[0]

    def decode(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        """Video [B, C, F, H, W] in [-1, 1] from the pipeline's latents, as its `__call__` decodes them."""
        return pipe.decode_latents(latents)

    def inference_grid(self, scheduler, num_inference_steps: int):
        """A copy of `scheduler` set to the pipeline's inference grid (set_timesteps moves a scheduler's state;
        the sampling pipeline keeps its own)."""
        grid = type(scheduler).from_config(scheduler.config)
        grid.set_timesteps(num_inference_steps)
        return grid

    def renoise(self, scheduler, x0: torch.Tensor, generator: torch.Generator, num_inference_steps: int):
        """(x_t, t): x0 noised by the scheduler's own forward process at a timestep t drawn from the pipeline's
        (shifted) inference grid of `num_inference_steps` steps: flow matching, x_t = (1 − σ)·x0 + σ·ε."""
        grid = self.inference_grid(scheduler, num_inference_steps)
        index = torch.randint(0, len(grid.timesteps), (x0.shape[0],), generator=generator)
        t = grid.timesteps[index]
        return self.noise_at(scheduler, x0, t, generator, num_inference_steps, grid), t

    def noise_at(self, scheduler, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator,
                 num_inference_steps: int, grid=None) -> torch.Tensor:
        """x0 noised by the scheduler's forward process at timesteps t [B] of the inference grid (`grid`: that
        grid, already made), x_t = (1 − σ)·x0 + σ·ε with ε drawn from `generator`."""
        grid = self.inference_grid(scheduler, num_inference_steps) if grid is None else grid
        if not torch.isin(t, grid.timesteps).all():  # UniPC's add_noise would take the last σ for it, silently
            raise TrainingError(f"timesteps {sorted(set(t.tolist()))} are not on the {num_inference_steps}-step "
                                f"inference grid of {type(grid).__name__}")
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        if hasattr(grid, "scale_noise"):  # FlowMatchEulerDiscreteScheduler
            return grid.scale_noise(x0, t, noise)
        return grid.add_noise(x0, noise, t)  # UniPC with flow sigmas (Wan's published scheduler)

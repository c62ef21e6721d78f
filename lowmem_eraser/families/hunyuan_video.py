"""HunyuanVideo: the published layout of the official method's HunyuanVideo erasers (SPEC §6).

Adapters only on the single-stream blocks (`HunyuanVideoSingleTransformerBlock`), added to the video output
that the block's `attn` returns before the block concatenates it with the text output; the adapter width is the
attention's `to_v` input width, as the published code reads it.

Training: flow matching (FlowMatchEulerDiscreteScheduler, shift 7), the pipeline's grid σ = linspace(1, 0, n+1)
[:-1] shifted; the text condition is the LLaMA hidden states of the prompt inside the pipeline's prompt
template (the template's first `crop_start` tokens cropped), their mask, and CLIP's pooled vector; the
guidance-distilled transformer also takes the guidance scale (x 1000), as the pipeline passes it. The concept
mask reads the joint attention of the dual-stream blocks (video queries, text keys after the template crop).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from . import Family, register
from .runtime import Runtime

logger = logging.getLogger(__name__)
PUBLISHED_CROP_START = 95  # HunyuanVideoPipeline's DEFAULT_PROMPT_TEMPLATE["crop_start"] for its LLaMA tokenizer


@dataclass
class HunyuanText:
    """A batch of HunyuanVideo text conditions: what `HunyuanVideoPipeline.encode_prompt` returns."""

    embeds: torch.Tensor  # [n, L, 4096] LLaMA hidden states after the template crop
    mask: torch.Tensor  # [n, L] 1 on the prompt's tokens (a prefix), 0 on padding
    pooled: torch.Tensor  # [n, 768] CLIP text pooled output

    def __getitem__(self, index) -> HunyuanText:
        return HunyuanText(self.embeds[index], self.mask[index], self.pooled[index])

    def to(self, device=None, dtype: torch.dtype | None = None) -> HunyuanText:
        """Moved to `device`; a `dtype` casts the embeddings only (the mask stays an integer mask)."""
        return HunyuanText(self.embeds.to(device=device, dtype=dtype), self.mask.to(device=device),
                           self.pooled.to(device=device, dtype=dtype))

    def cpu(self) -> HunyuanText:
        return self.to("cpu")

    def expand_as(self, other: HunyuanText) -> HunyuanText:
        n = other.shape[0]
        return HunyuanText(self.embeds.expand(n, -1, -1), self.mask.expand(n, -1), self.pooled.expand(n, -1))

    @property
    def shape(self) -> torch.Size:
        return self.embeds.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.embeds.dtype


def prompt_template(tokenizer) -> dict:
    """The pipeline's prompt template with `crop_start` = the tokens before the prompt for this tokenizer (the
    published LLaMA tokenizer: 95, the pipeline's constant; a test tokenizer: its own count)."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    template = DEFAULT_PROMPT_TEMPLATE["template"]
    crop_start = len(tokenizer(template[: template.index("{}")])["input_ids"])
    if len(tokenizer) > 100_000 and crop_start != DEFAULT_PROMPT_TEMPLATE["crop_start"]:
        logger.warning("the tokenizer puts %d tokens before the prompt; HunyuanVideoPipeline crops %d: using %d",
                       crop_start, DEFAULT_PROMPT_TEMPLATE["crop_start"], crop_start)
    return {"template": template, "crop_start": crop_start}


class HunyuanVideoRuntime(Runtime):
    pipeline_class = "HunyuanVideoPipeline"
    transformer_class = "HunyuanVideoTransformer3DModel"
    text_encoder_class = "LlamaModel"
    vae_class = "AutoencoderKLHunyuanVideo"
    text_length = 256  # the pipeline's max_sequence_length (after the template crop)
    fps = 24
    default_video = (129, 720, 1280)  # the pipeline's defaults
    text_modules = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")

    def load_text_modules(self, model_dir: Path, dtype: torch.dtype) -> dict:
        from transformers import AutoTokenizer, CLIPTextModel

        from ..loading import from_pretrained_or_error

        return {**super().load_text_modules(model_dir, dtype),
                "tokenizer_2": from_pretrained_or_error(AutoTokenizer, model_dir / "tokenizer_2"),
                "text_encoder_2": from_pretrained_or_error(CLIPTextModel, model_dir / "text_encoder_2",
                                                           torch_dtype=dtype)}

    def encode(self, pipe, prompts: list[str], max_length: int, device, dtype) -> HunyuanText:
        embeds, pooled, mask = pipe.encode_prompt(prompts, prompt_template=prompt_template(pipe.tokenizer),
                                                  device=device, dtype=dtype, max_sequence_length=max_length)
        return HunyuanText(embeds, mask, pooled)

    def concat(self, conditions: list[HunyuanText]) -> HunyuanText:
        return HunyuanText(*(torch.cat([getattr(c, name) for c in conditions]) for name in ("embeds", "mask",
                                                                                             "pooled")))

    def stored(self, condition: HunyuanText) -> dict:
        return {"embeds": condition.embeds, "mask": condition.mask, "pooled": condition.pooled}

    def restored(self, stored: dict) -> HunyuanText:
        return HunyuanText(stored["embeds"], stored["mask"], stored["pooled"])

    def concept_tokens(self, tokenizer, prompts: list[str], concept: str, max_length: int) -> torch.Tensor:
        """The concept's positions in the cropped condition: each prompt tokenised inside the template as the
        pipeline does, spans searched in the prompt only (the template's own words, e.g. "color", never count),
        then the template's `crop_start` tokens dropped."""
        from ..localization import concept_token_mask

        template = prompt_template(tokenizer)
        crop = template["crop_start"]
        prefix = template["template"].index("{}")
        wrapped = [template["template"].format(prompt) for prompt in prompts]
        mask = concept_token_mask(tokenizer, wrapped, concept, max_length + crop, search_from=prefix)
        return mask[:, crop:]

    def generation_kwargs(self, pipe) -> dict:
        return {"prompt_template": prompt_template(pipe.tokenizer)}  # the crop training used

    def pipeline_text(self, prompt: HunyuanText, negative: HunyuanText, device) -> dict:
        # Guidance-distilled: the pipeline's guidance_scale is embedded, not classifier-free (no negative pass).
        prompt = prompt.to(device)
        return {"prompt_embeds": prompt.embeds, "prompt_attention_mask": prompt.mask,
                "pooled_prompt_embeds": prompt.pooled}

    def step_extras(self, pipe, video, guidance_scale: float, device):
        return guidance_scale * 1000.0 if pipe.transformer.config.guidance_embeds else None

    def velocity(self, transformer, x_t, t, text: HunyuanText, extras):
        guidance = None if extras is None else torch.full((x_t.shape[0],), extras, device=x_t.device,
                                                          dtype=x_t.dtype)
        return transformer(hidden_states=x_t, timestep=t, encoder_hidden_states=text.embeds,
                           encoder_attention_mask=text.mask.to(x_t.dtype), pooled_projections=text.pooled,
                           guidance=guidance, return_dict=False)[0]

    def decode(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        # HunyuanVideoPipeline decodes inline in __call__ (no decode method to call): the same lines.
        return pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]

    def inference_grid(self, scheduler, num_inference_steps: int):
        import numpy as np

        grid = type(scheduler).from_config(scheduler.config)
        grid.set_timesteps(sigmas=np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1])  # as the pipeline sets it
        return grid


FAMILY = register(Family(
    name="HunyuanVideo",
    transformer_classes=("HunyuanVideoTransformer3DModel",),
    blocks="single_transformer_blocks",
    attention="attn",
    key="single_transformer_blocks.{}.attn.adapter",
    splits_output=True,
    dim_linear="to_v",
    stacks=("transformer_blocks", "single_transformer_blocks"),  # dual-stream blocks run first
    concept_attention="dual",  # the dual-stream blocks' joint attention: video queries, text keys
    concept_blocks="transformer_blocks",
    runtime=HunyuanVideoRuntime(),
    notes="single-stream blocks' attn, video output (published)",
))

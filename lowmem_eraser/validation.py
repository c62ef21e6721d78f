"""Validation during training (`validation:`): base | erased videos of held-out prompts, from one seed.

The text encoder is freed before training, so the validation prompts are encoded with the training prompts
(`encode_validation_prompts`, same cache). Every `validation.every` steps `run_validation` samples each
prompt twice with the trainer's own sampling code (`sampling.make_pipeline` / `_generate`): erasers off, then
on, from the same seed, so the only difference between the halves is the eraser. The latents are decoded like
`infer` does (the model's VAE, or the toy world's renderer when there is no `vae/`) and written side by side
in `infer --compare`'s layout. In the toy world the detector also reads every video (`table.md`).

The pass changes nothing the training depends on: no gradients, the eraser switches and the module's
train/eval mode are restored, the trainer's scheduler is not touched (a copy runs the sampling), and every
random draw comes from the pass's own seeded generators (the global RNG is left alone, so a run with
validation trains exactly the same eraser as one without).
"""

from __future__ import annotations

import contextlib
import gc
import re
import time
from pathlib import Path

import numpy as np
import torch

from .adapter import get_erasers
from .errors import LowmemEraserError
from .families import runtime_of_folder
from .infer import FPS, export
from .loading import from_pretrained_or_error
from .sampling import _generate, all_erasers_disabled, make_pipeline
from .text import encode_texts


def encode_validation_prompts(model_dir, prompts: list[str], max_length: int, dtype: torch.dtype, device,
                              cache_dir, placement: str = "auto") -> torch.Tensor:
    """Embeddings [n, L, D] (CPU) of the validation prompts. Call it next to `encode_prompts`, before the
    transformer loads: the text encoder is not available once training runs."""
    return encode_texts(model_dir, prompts, max_length, dtype, device, cache_dir, placement=placement)


def side_by_side(base: np.ndarray, erased: np.ndarray) -> np.ndarray:
    """`infer --compare`'s layout: base | white bar | erased, uint8 [F, H, 2W + bar, 3]."""
    separator = np.full((*base.shape[:2], max(2, base.shape[2] // 32), 3), 255, dtype=np.uint8)
    return np.concatenate([base, separator, erased], axis=2)


@torch.no_grad()
def run_validation(transformer, scheduler, embeddings: torch.Tensor, empty_embedding: torch.Tensor, validation_cfg,
                   video_cfg, model_dir, out_dir, step: int, tracker=None, *, device=None,
                   concept: str | list[str] | None = None, transformer_2=None) -> dict:
    """Sample, decode, write and log one validation round; returns numbers for `tracker.log` / metrics.

    `embeddings` [n, L, D] from `encode_validation_prompts`, `empty_embedding` [1, L, D] (the trainer's
    `text.empty`); `validation_cfg` a `ValidationConfig` (steps, guidance, seed), `video_cfg` the training
    `VideoConfig`. Writes `out_dir/validation/step-{step:06d}/NN.gif` (base | erased) and `table.md`.
    `device`: where the transformer runs (default: CUDA if present). `concept` (toy world): also report how
    often the prompts that ask for it show it (a list of several concepts: each of them). Returned keys:
    `validation/seconds`; in the toy world `validation/{colour,shape,motion}_{base,erased}` (share of prompts
    whose detected attribute is the one the prompt names) and, with `concept`, `validation/concept_{base,erased}`
    (several: `validation/concept_{name}_{base,erased}` for each).
    """
    began = time.perf_counter()
    if len(validation_cfg.prompts) != embeddings.shape[0]:
        raise LowmemEraserError(f"run_validation: {len(validation_cfg.prompts)} prompts but {embeddings.shape[0]} "
                                "embeddings (encode validation.prompts with encode_validation_prompts)")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    experts = [transformer] + ([transformer_2] if transformer_2 is not None else [])
    sets = [get_erasers(expert) for expert in experts]
    if any(erasers is None for erasers in sets):
        raise LowmemEraserError("run_validation: the transformer carries no erasers (attach_erasers first)")
    # A scheduler copy: sampling sets timesteps and step counters; the trainer's stays as the trainer left it
    pipe = make_pipeline(transformer, type(scheduler).from_config(scheduler.config), model_dir, transformer_2)
    pipe.set_progress_bar_config(disable=True)
    was_training = [expert.training for expert in experts]
    for expert in experts:
        expert.eval()
    try:
        with contextlib.ExitStack() as switches:  # whatever happens below, the switches come back as they were
            for erasers in sets:
                switches.enter_context(erasers.replaying(erasers.switches()))
            with all_erasers_disabled(pipe):
                base = _sample(pipe, embeddings, empty_embedding, validation_cfg, video_cfg, device)
            erased = _sample(pipe, embeddings, empty_embedding, validation_cfg, video_cfg, device)
    finally:
        for expert, mode in zip(experts, was_training):
            expert.train(mode)
    del pipe

    # as `infer`: a CogVideoX folder without a VAE is the toy world, decoded by its renderer
    runtime = runtime_of_folder(model_dir)
    toy = not (Path(model_dir) / "vae").is_dir() and runtime.pipeline_class == "CogVideoXPipeline"
    videos = _decode(base + erased, model_dir, embeddings.dtype, device, toy)
    folder = Path(out_dir) / "validation" / f"step-{step:06d}"
    for i in range(len(base)):
        path = export(side_by_side(videos[i], videos[len(base) + i]), folder / f"{i:02d}.gif",
                      fps=FPS if toy else runtime.fps)
        if tracker is not None:
            tracker.log_media(f"validation/{i:02d}", path, step)

    prompts = validation_cfg.prompts
    numbers, table = _toy_table(prompts, base, erased, concept) if toy else ({}, _plain_table(prompts))
    heading = (f"# Validation at step {step}: base | erased ({validation_cfg.num_inference_steps} steps, guidance "
               f"{validation_cfg.guidance_scale}, seed {validation_cfg.seed} + prompt index)\n\n")
    (folder / "table.md").write_text(heading + table)
    return {"validation/seconds": time.perf_counter() - began, **numbers}


def _sample(pipe, embeddings, empty, validation_cfg, video_cfg, device) -> list[torch.Tensor]:
    """One latent video (CPU; CogVideoX [F, C, H, W], Wan [C, F, H, W]) per prompt; prompt i draws its noise from seed + i. One prompt per
    call: a batch would multiply the activation memory of a real model's pass by the number of prompts."""
    latents = []
    for i in range(embeddings.shape[0]):
        generator = torch.Generator(device).manual_seed(validation_cfg.seed + i)
        latent = _generate(pipe, embeddings[i : i + 1], empty, video_cfg, validation_cfg, generator, device)
        latents.append(latent[0].cpu())
    return latents


def _decode(latents: list[torch.Tensor], model_dir, dtype, device, toy: bool) -> list[np.ndarray]:
    """uint8 videos [F, H, W, 3]: the toy renderer, or the model's VAE (loaded for this pass only, tiled)."""
    if toy:
        from .toy.world import render

        return [render(latent.float()) for latent in latents]
    import diffusers

    runtime = runtime_of_folder(model_dir)
    vae = from_pretrained_or_error(getattr(diffusers, runtime.vae_class), Path(model_dir) / "vae",
                                   torch_dtype=dtype).to(device)
    vae.enable_tiling()  # the transformer still holds its memory: decode in tiles, one video at a time
    vae.enable_slicing()
    decoder = runtime.pipeline(vae=vae)
    videos = []
    for latent in latents:  # the pipeline's own decode and post-processing, as `infer` gets them
        frames = runtime.decode(decoder, latent[None].to(device, dtype))
        frames = decoder.video_processor.postprocess_video(frames, output_type="np")[0]
        videos.append((np.clip(frames, 0, 1) * 255).round().astype(np.uint8))
    del decoder, vae
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return videos


def _plain_table(prompts: list[str]) -> str:
    return "| # | prompt |\n|---|---|\n" + "".join(f"| {i:02d} | {p} |\n" for i, p in enumerate(prompts))


def _named(prompt: str, values) -> str | None:
    """The one value of an attribute a prompt names (`red` in "the red ball moves left"), else None."""
    found = [value for value in values if re.search(rf"\b{value}\b", prompt.lower())]
    return found[0] if len(found) == 1 else None


def _toy_table(prompts, base, erased, concept) -> tuple[dict, str]:
    """The detector's reading of every base and erased video, and the share of prompts it agrees with."""
    from .toy.evaluate import ATTRIBUTES
    from .toy.world import detect

    readings = {"base": [detect(v) for v in base], "erased": [detect(v) for v in erased]}

    def shown(video):
        return "no object" if video is None else f"{video.colour} {video.shape} {video.motion}"

    lines = ["| # | prompt | base | erased |", "|---|---|---|---|"]
    lines += [f"| {i:02d} | {p} | {shown(b)} | {shown(e)} |"
              for i, (p, b, e) in enumerate(zip(prompts, readings["base"], readings["erased"]))]
    numbers = {}
    checks = [(name, name, values) for name, values in ATTRIBUTES.items()]
    concepts = [concept] if isinstance(concept, str) else list(concept or ())
    for word in concepts:  # a concept row: only the prompts that ask for it
        attribute = next((name for name, values in ATTRIBUTES.items() if word in values), None)
        if attribute is not None:
            checks.append(("concept" if len(concepts) == 1 else f"concept_{word}", attribute, (word,)))
    for key, name, values in checks:
        asked = [(i, _named(p, values)) for i, p in enumerate(prompts)]
        asked = [(i, value) for i, value in asked if value is not None]
        if not asked:
            continue
        cells = []
        for run in ("base", "erased"):
            hits = sum(readings[run][i] is not None and getattr(readings[run][i], name) == value for i, value in asked)
            numbers[f"validation/{key}_{run}"] = hits / len(asked)
            cells.append(f"{hits}/{len(asked)}")
        label = (f"{name} = {values[0]} (prompts naming it)" if key.startswith("concept")
                 else f"{name} as the prompt names it")
        lines.append(f"| | {label} | {cells[0]} | {cells[1]} |")
    return numbers, "\n".join(lines) + "\n"

"""Build, train and check the toy CogVideoX model of the procedural world (CPU, a few minutes).

`build_toy_model(folder, steps, seed)` writes a tiny CogVideoX folder with `build_tiny_cogvideox` (word-level
tokenizer over every toy caption, a small T5 encoder, a small `CogVideoXTransformer3DModel`, the CogVideoX
DDIM scheduler with v-prediction and zero-terminal-SNR) and trains the transformer on procedural latents with
the standard CogVideoX v-prediction loss: x_t = add_noise(x0, ε, t), target = get_velocity(x0, ε, t), t uniform,
captions from TRAIN_PHRASINGS only, 10 % of them replaced by "" (classifier-free guidance). The T5 encoder
keeps its random weights (its outputs already give every word a distinct vector), so the prompt embeddings
are computed once, exactly as `CogVideoXPipeline.encode_prompt` computes them. Everything is seeded: the
same (steps, seed) gives the same weights on the same machine and torch version.

`quality_gate(folder, prompts)` generates latents with `CogVideoXPipeline` (T5 prompt embeddings, CFG, DDIM,
`output_type="latent"`, no VAE) and reads each one back with `world.detect`.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..tiny import build_tiny_cogvideox
from . import world

TOY_TRANSFORMER = dict(
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=world.CHANNELS,
    out_channels=world.CHANNELS,
    time_embed_dim=64,
    text_embed_dim=32,
    num_layers=4,
    sample_width=world.SIZE,
    sample_height=world.SIZE,
    sample_frames=world.VIDEO_FRAMES,
    patch_size=4,
    max_text_seq_length=16,
)
DEFAULT_STEPS = 1500
BATCH_SIZE = 32
LR = 1e-3
WARMUP = 100
CAPTION_DROPOUT = 0.1
GUIDANCE_SCALE = 5.0
GATE_STEPS = 25


def toy_video_kwargs() -> dict:
    """The pipeline's video size arguments for the toy world (17 frames, 128 × 128 px)."""
    return dict(num_frames=world.VIDEO_FRAMES, height=world.PIXELS, width=world.PIXELS)


def _pipeline(folder: Path, transformer=None, scheduler=None):
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel
    from transformers import AutoTokenizer, T5EncoderModel

    return CogVideoXPipeline(
        tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder=T5EncoderModel.from_pretrained(folder / "text_encoder").eval(),
        vae=None,
        transformer=transformer or CogVideoXTransformer3DModel.from_pretrained(folder / "transformer").eval(),
        scheduler=scheduler or CogVideoXDDIMScheduler.from_pretrained(folder / "scheduler"),
    )


@torch.no_grad()
def encode(pipe, prompts: list[str]) -> torch.Tensor:
    """T5 embeddings `[n, max_text_seq_length, D]` exactly as the pipeline (and `lowmem-eraser train`) makes them."""
    length = pipe.transformer.config.max_text_seq_length
    return pipe.encode_prompt(
        prompts, do_classifier_free_guidance=False, max_sequence_length=length, device=pipe._execution_device
    )[0]


def _model_index(folder: Path) -> None:
    """model_index.json so that `CogVideoXPipeline.from_pretrained(folder, vae=None)` loads the folder."""
    import diffusers

    index = {
        "_class_name": "CogVideoXPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "CogVideoXDDIMScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
        "vae": [None, None],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def train_toy(pipe, steps: int, seed: int, batch_size: int = BATCH_SIZE, lr: float = LR, log_every: int = 100,
              log=print) -> list[float]:
    """Train `pipe.transformer` in place on procedural videos; returns the per-step losses."""
    transformer, scheduler = pipe.transformer, pipe.scheduler
    combos = world.all_attribute_combinations()
    captions = [[world.caption(v, p) for p in world.TRAIN_PHRASINGS] for v in combos]
    flat = encode(pipe, [c for row in captions for c in row] + [""])
    embeds, empty = flat[:-1].view(len(combos), len(world.TRAIN_PHRASINGS), *flat.shape[1:]), flat[-1]

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    transformer.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.01)
    warmup = min(WARMUP, max(1, steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))),
    )
    num_t = scheduler.config.num_train_timesteps
    losses, began = [], time.perf_counter()
    for step in range(steps):
        which = torch.randint(0, len(combos), (batch_size,), generator=gen)
        phrasing = torch.randint(0, len(world.TRAIN_PHRASINGS), (batch_size,), generator=gen)
        drop = torch.rand(batch_size, generator=gen) < CAPTION_DROPOUT
        x0 = world.make_batch([combos[i] for i in which], gen)
        text = torch.where(drop.view(-1, 1, 1), empty, embeds[which, phrasing])
        t = torch.randint(0, num_t, (batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        x_t = scheduler.add_noise(x0, noise, t)
        target = scheduler.get_velocity(x0, noise, t)
        pred = transformer(hidden_states=x_t, encoder_hidden_states=text, timestep=t, return_dict=False)[0]
        loss = F.mse_loss(pred, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if log and (step + 1) % log_every == 0:
            recent = sum(losses[-log_every:]) / len(losses[-log_every:])
            log(f"step {step + 1}/{steps}  loss {recent:.4f}  {time.perf_counter() - began:.0f}s")
    transformer.eval().requires_grad_(False)
    return losses


def build_toy_model(folder: str | Path, steps: int = DEFAULT_STEPS, seed: int = 0, log=print, **transformer_overrides) -> dict:
    """Build and train the toy model into `folder` (replaced); returns {"steps", "seed", "train_seconds", "final_loss"}."""
    folder = Path(folder)
    config = {**TOY_TRANSFORMER, **transformer_overrides}
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_cogvideox(Path(tmp) / "model", world.all_captions() + [""], seed=seed, **config)
        pipe = _pipeline(Path(tmp) / "model")
        began = time.perf_counter()
        losses = train_toy(pipe, steps, seed, log=log)
        seconds = time.perf_counter() - began
        staging = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(Path(tmp) / "model", staging)
    pipe.transformer.save_pretrained(staging / "transformer")
    _model_index(staging)
    info = {"steps": steps, "seed": seed, "train_seconds": round(seconds, 1),
            "final_loss": round(sum(losses[-100:]) / len(losses[-100:]), 5) if losses else None}
    (staging / "toy_build.json").write_text(json.dumps(info, indent=2) + "\n")
    for path in staging.rglob("*"):  # save_pretrained may write 0600 files: make the folder shareable
        path.chmod(0o755 if path.is_dir() else 0o644)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return info


def held_out_prompts() -> list[tuple[str, world.Video]]:
    """Every combination in every held-out phrasing: (prompt, attributes), 96 pairs."""
    return [(world.caption(v, p), v) for v in world.all_attribute_combinations() for p in world.HELD_OUT_PHRASINGS]


@torch.no_grad()
def generate(pipe, prompts: list[str] | torch.Tensor, seed: int = 0, num_inference_steps: int = GATE_STEPS,
             guidance_scale: float = GUIDANCE_SCALE, batch_size: int = 32) -> torch.Tensor:
    """Latent videos `[n, F, C, H, W]` (fp32, CPU) for `prompts` (CFG against "", DDIM, no VAE); the batch
    starting at prompt i draws its noise from seed + i. `prompts` may also be text conditions [n, L, D] (e.g. a
    soft-prompt attack's), guided against the encoded "" the same way."""
    pipe.set_progress_bar_config(disable=True)
    if isinstance(prompts, torch.Tensor):
        empty = encode(pipe, [""])
        texts = [{"prompt_embeds": prompts[i : i + batch_size],
                  "negative_prompt_embeds": empty.expand_as(prompts[i : i + batch_size])}
                 for i in range(0, len(prompts), batch_size)]
    else:
        texts = [{"prompt": prompts[i : i + batch_size], "negative_prompt": ""} for i in range(0, len(prompts), batch_size)]
    out = []
    for start, text in zip(range(0, len(prompts), batch_size), texts):
        out.append(pipe(
            **text,
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            generator=torch.Generator(pipe._execution_device).manual_seed(seed + start),
            output_type="latent",
            max_sequence_length=pipe.transformer.config.max_text_seq_length,
            return_dict=False,
            **toy_video_kwargs(),
        )[0].float().cpu())
    return torch.cat(out)


def quality_gate(folder: str | Path, prompts: list[tuple[str, world.Video]] | None = None, seed: int = 0,
                 num_inference_steps: int = GATE_STEPS, guidance_scale: float = GUIDANCE_SCALE, pipe=None) -> dict:
    """Generate one video per (prompt, attributes) (default: all held-out prompts) and detect its attributes.

    Returns {"n", "colour", "shape", "motion", "all" (accuracies), "seconds_per_video", "misses": [...]}."""
    prompts = held_out_prompts() if prompts is None else prompts
    pipe = pipe or _pipeline(Path(folder))
    began = time.perf_counter()
    latents = generate(pipe, [p for p, _ in prompts], seed, num_inference_steps, guidance_scale)
    seconds = (time.perf_counter() - began) / len(prompts)
    hits = {"colour": 0, "shape": 0, "motion": 0, "all": 0}
    misses = []
    for (prompt, expected), video in zip(prompts, latents):
        found = world.detect(video)
        for key in ("colour", "shape", "motion"):
            hits[key] += found is not None and getattr(found, key) == getattr(expected, key)
        hits["all"] += found == expected
        if found != expected:
            misses.append((prompt, found))
    n = len(prompts)
    return {"n": n, **{k: v / n for k, v in hits.items()}, "seconds_per_video": seconds, "misses": misses}


def format_gate(result: dict) -> str:
    lines = [f"held-out prompts: {result['n']}  ({result['seconds_per_video'] * 1000:.0f} ms per video)",
             "attribute  accuracy"]
    lines += [f"{key:<9}  {result[key] * 100:6.1f} %" for key in ("colour", "shape", "motion", "all")]
    return "\n".join(lines)


def toy_build_main(args) -> int:
    """`lowmem-eraser toy build --output DIR --steps N --seed S`: train the toy model, then run the quality gate."""
    steps = DEFAULT_STEPS if getattr(args, "steps", None) is None else args.steps
    seed = 0 if getattr(args, "seed", None) is None else args.seed
    info = build_toy_model(args.output, steps=steps, seed=seed)
    print(f"trained {info['steps']} steps in {info['train_seconds']:.0f} s (final loss {info['final_loss']}); "
          f"saved to {args.output}")
    result = quality_gate(args.output)
    print(format_gate(result))
    record = Path(args.output) / "toy_build.json"
    gate = {key: round(result[key], 4) for key in ("n", "colour", "shape", "motion", "all", "seconds_per_video")}
    record.write_text(json.dumps({**info, "quality_gate": {**gate, "num_inference_steps": GATE_STEPS,
                                                           "guidance_scale": GUIDANCE_SCALE}}, indent=2) + "\n")
    passed = all(result[key] >= 0.9 for key in ("colour", "shape", "motion"))
    print("quality gate:", "PASSED (every attribute >= 90 %)" if passed else "FAILED (an attribute < 90 %)")
    return 0 if passed else 1

"""Where the noisy latents x_t of a training step come from.

`renoise` (the paper's E over x, ε, t): a clean x0 is generated once per target prompt with the frozen model
(CFG, the configured steps) and cached; each step draws t and ε and calls the scheduler's own `add_noise`.
`trajectory` (Receler/ESD): the current model denoises from pure noise down to a random step, and that
partially denoised latent is x_t at that step's timestep. Neither ever pairs pure noise with t < T.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .adapter import erasers_disabled


def runtime_of(transformer):
    """The family runtime (families/runtime.py) of a transformer `train` / `infer` can run."""
    from .errors import LowmemEraserError
    from .families import family_of

    family = family_of(transformer)
    if family.runtime is None:
        raise LowmemEraserError(f"training and sampling are not implemented for {family.name} yet")
    return family.runtime


def make_pipeline(transformer, scheduler, model_dir: str | Path | None = None, transformer_2=None):
    """The family's pipeline around our transformer for sampling from precomputed embeddings (no text encoder,
    no VAE): CogVideoXPipeline, WanPipeline, HunyuanVideoPipeline. Without a VAE a pipeline assumes 8x spatial
    compression; with `model_dir` the factors come from its vae/config.json (Wan2.2's VAE compresses 16x), and the
    pipeline's own settings from its model_index.json. `transformer_2`: Wan2.2 A14B's low-noise expert."""
    from .loading import folder_json

    runtime = runtime_of(transformer)
    experts = {"transformer_2": transformer_2} if transformer_2 is not None else {}
    pipe = runtime.pipeline(transformer=transformer, scheduler=scheduler, **experts, **runtime.folder_options(model_dir))
    # no VAE (the toy world) or an unreadable one ({}: infer/validation name it when they load it)
    vae = folder_json(model_dir, "vae/config.json") if model_dir is not None else {}
    for attribute, key in (("vae_scale_factor_spatial", "scale_factor_spatial"),
                           ("vae_scale_factor_temporal", "scale_factor_temporal")):
        if isinstance(vae.get(key), int) and hasattr(pipe, attribute):
            setattr(pipe, attribute, vae[key])
    return pipe


def pipeline_experts(pipe) -> list:
    """The pipeline's transformers: [transformer] or, for Wan2.2 A14B, [transformer, transformer_2]."""
    second = getattr(pipe, "transformer_2", None)
    return [pipe.transformer] + ([second] if second is not None else [])


def expert_groups(pipe, t: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(expert index into `pipeline_experts`, the batch positions it serves) for timesteps t, as the pipeline
    switches: `transformer` at t >= boundary_ratio x num_train_timesteps, `transformer_2` below."""
    if len(pipeline_experts(pipe)) == 1:
        return [(0, torch.arange(t.shape[0]))]
    boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
    low = (t.reshape(t.shape[0], -1)[:, 0] < boundary).cpu()
    return [(k, (low == bool(k)).nonzero().flatten()) for k in (0, 1) if (low == bool(k)).any()]


@contextlib.contextmanager
def all_erasers_disabled(pipe):
    """Every expert's erasers off (x0 generation: the original model)."""
    with contextlib.ExitStack() as stack:
        for transformer in pipeline_experts(pipe):
            stack.enter_context(erasers_disabled(transformer))
        yield


def latent_frames(frames: int) -> int:
    return (frames - 1) // 4 + 1  # every supported family's VAE compresses time by 4


def step_extras(pipe, video, guidance_scale: float, device):
    """What the family's transformer needs besides (x_t, t, text), computed once per run the way its pipeline
    computes it: CogVideoX-5b's rotary embeddings, HunyuanVideo's distilled guidance; else None."""
    return runtime_of(pipe.transformer).step_extras(pipe, video, guidance_scale, device)


def rotary_embeddings(pipe, video, device):
    """`step_extras` at the default guidance scale: the planner's and benchmarks' name for it (CogVideoX)."""
    return step_extras(pipe, video, 6.0, device)


def _generate(pipe, prompt_embeds, empty, video, sampling, generator, device, stop_after=None):
    """Run the pipeline to latents; with `stop_after=k`, stop after k denoising steps."""

    def stop(pipeline, step, timestep, callback_kwargs):
        if stop_after is not None and step + 1 >= stop_after:
            pipeline._interrupt = True
        return {}

    return pipe(
        **runtime_of(pipe.transformer).pipeline_text(prompt_embeds, empty, device),
        num_frames=video.frames,
        height=video.height,
        width=video.width,
        num_inference_steps=sampling.num_inference_steps,
        guidance_scale=sampling.guidance_scale,
        generator=generator,
        output_type="latent",
        callback_on_step_end=stop if stop_after is not None else None,
        return_dict=False,
    )[0]


@torch.no_grad()
def generate_clean_latents(pipe, target_embeds, empty, video, sampling, seed, device, cache_dir=None,
                           share: tuple[int, int] | None = None) -> torch.Tensor | None:
    """x0 for each target prompt, generated with the frozen model (adapters off). Returns the pipeline's
    latents on CPU (CogVideoX [n, F, C, H, W]; Wan, HunyuanVideo [n, C, F, H, W]).

    Prompts are sampled `sampling.batch_size` at a time; prompt i always draws its noise from seed + i, so
    x0 is the same for every batch size. With `cache_dir` (hours on 5b) every prompt's x0 is written there
    atomically as soon as its batch is done and reused on the next start: a kill loses at most the batch in
    progress. Batches keep their place in the fixed grid [0, b), [b, 2b), ... so a resumed run computes each
    latent in exactly the batch it would have had (bit-identical x0). `share=(rank, world_size)`: only the
    batches rank, rank + world_size, ... are made, into the cache (returns None); the processes of a multi-process
    run split the work this way and then each reads the whole cache."""
    from tqdm.auto import tqdm

    from .serialization import atomic_write

    n, size = target_embeds.shape[0], sampling.batch_size
    paths = [Path(cache_dir) / f"{i:05d}.pt" for i in range(n)] if cache_dir is not None else [None] * n
    cached = [p is not None and p.is_file() for p in paths]
    # a share only fills the cache (every rank reads it whole afterwards): what exists is all it needs to know
    latents = [torch.load(p, weights_only=True) if found and share is None else None for p, found in zip(paths, cached)]
    batches = [list(range(start, min(start + size, n))) for start in range(0, n, size)]
    if share is not None:
        batches = batches[share[0]::share[1]]
    todo = [batch for batch in batches if not all(cached[i] for i in batch)]
    if todo and cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    total = sum(len(batch) for batch in batches)
    done = total - sum(len(batch) for batch in todo)
    with all_erasers_disabled(pipe), tqdm(total=total, initial=done, desc="x0 generation", unit="prompt",
                                          dynamic_ncols=True, disable=not todo or bool(share and share[0])) as bar:
        for batch in todo:
            generators = [torch.Generator(device).manual_seed(seed + i) for i in batch]
            out = _generate(pipe, target_embeds[batch], empty, video, sampling, generators, device).cpu()
            for i, latent in zip(batch, out):
                latents[i] = latent.clone()
                if paths[i] is not None:
                    atomic_write(paths[i], lambda tmp, value=latents[i]: torch.save(value, tmp))
            bar.update(len(batch))
    return torch.stack(latents) if share is None else None


def renoise(transformer, scheduler, x0: torch.Tensor, generator: torch.Generator,
            num_inference_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t = the scheduler's own noising of x0 at a drawn t; returns (x_t, t). How t is drawn is the
    transformer's family's (families/runtime.py): CogVideoX uniform over the training timesteps, flow matching
    from the pipeline's shifted grid of `num_inference_steps` steps."""
    return runtime_of(transformer).renoise(scheduler, x0, generator, num_inference_steps)


def noise_at(transformer, scheduler, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator,
             num_inference_steps: int) -> torch.Tensor:
    """x0 noised as `renoise` noises it, at given timesteps t [B] (e.g. those a trajectory step reached)."""
    return runtime_of(transformer).noise_at(scheduler, x0, t, generator, num_inference_steps)


@torch.no_grad()
def trajectory(pipe, target_embeds, empty, video, sampling, generator, device,
               share: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Denoise with the current model (adapters on) for a random number of steps; returns (x_t, t) on CPU.

    `share=(start, stop)`: only the samples [start, stop) of the batch (one rank's slice of a multi-process run's
    global batch), each from its own noise seed (seed + its position), so that the slice is what the whole batch
    would hold at those positions. Without it the batch's noise comes from one seed (single-process runs, as
    they always were)."""
    stop_after = int(torch.randint(1, sampling.num_inference_steps, (1,), generator=generator))
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    if share is None:
        device_generator = torch.Generator(device).manual_seed(seed)
    else:
        target_embeds = target_embeds[share[0]:share[1]]
        device_generator = [torch.Generator(device).manual_seed(seed + i) for i in range(*share)]
    latents = _generate(pipe, target_embeds, empty, video, sampling, device_generator, device, stop_after=stop_after)
    t = pipe.scheduler.timesteps[stop_after]  # the timestep the latents now sit at
    return latents.cpu(), t.cpu().expand(latents.shape[0])

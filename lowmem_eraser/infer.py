"""`lowmem-eraser infer`: generate a video with an eraser loaded into a local model folder (CogVideoX, Wan,
HunyuanVideo).

The pipeline is assembled from the folder's components (so a folder without `model_index.json` works too).
Folders with a `vae/` decode through it; folders without one (the toy model) are decoded by the toy world's
documented renderer.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import LowmemEraserError
from .families import runtime_of_folder
from .loading import from_pretrained_or_error, model_files
from .sampling import all_erasers_disabled, pipeline_experts, runtime_of

logger = logging.getLogger(__name__)
OFFLOAD_MODES = ("none", "model", "sequential")
FPS = 8  # CogVideoX's published frame rate (the toy world's too); other families: their runtime's `fps`


@dataclass
class Generation:
    prompt: str
    steps: int = 50
    frames: int | None = None  # None: the family's default (CogVideoX sample_frames: 49, the toy 17; Wan 81; Hunyuan 129)
    height: int | None = None  # None: the transformer's sample size
    width: int | None = None
    guidance: float = 6.0
    seed: int = 0


def load_pipeline(model: str | Path, offload: str = "none"):
    """The family's pipeline (CogVideoXPipeline, WanPipeline, HunyuanVideoPipeline) from a local folder's components, on CUDA in bf16
    if there is one, else CPU fp32."""
    import diffusers

    from .train import load_scheduler

    model = Path(model)
    runtime = runtime_of_folder(model, "--model")
    subs = ("transformer", *runtime.text_modules, "scheduler")
    for sub in subs:
        if not (model / sub).is_dir():
            raise LowmemEraserError(f"--model: {model} has no {sub}/ folder (expected a diffusers model folder with "
                                    f"{', '.join(s + '/' for s in subs)})")
    if runtime.pipeline_class != "CogVideoXPipeline" and not (model / "vae").is_dir():
        raise LowmemEraserError(f"--model: {model} has no vae/ folder (only the toy CogVideoX world renders "
                                "latents without a VAE)")
    if offload not in OFFLOAD_MODES:
        raise LowmemEraserError(f"--offload: expected one of {', '.join(OFFLOAD_MODES)}, got {offload!r}")
    cuda = torch.cuda.is_available()
    if offload != "none" and not cuda:
        raise LowmemEraserError(f"--offload {offload} moves weights between CPU and a CUDA device; there is no CUDA here")
    dtype = torch.bfloat16 if cuda else torch.float32
    with model_files(model / "scheduler", "scheduler"):  # a broken file is named, not a library traceback
        scheduler = load_scheduler(model)
    vae_class = getattr(diffusers, runtime.vae_class)
    pipe = runtime.pipeline(
        **runtime.load_text_modules(model, dtype),
        vae=from_pretrained_or_error(vae_class, model / "vae", torch_dtype=dtype) if (model / "vae").is_dir() else None,
        **{name: from_pretrained_or_error(getattr(diffusers, runtime.transformer_class), model / name,
                                          torch_dtype=dtype) for name in runtime.experts(model)},
        scheduler=scheduler,
        **runtime.folder_options(model),
    )
    if offload == "model":
        pipe.enable_model_cpu_offload()
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload()
    else:
        pipe.to("cuda" if cuda else "cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


TILING_MODES = ("auto", "on", "off")


def vae_tiling(pipe, mode: str, frames: int, height: int, width: int) -> bool:
    """Turn VAE tiling and slicing on when `mode` says so or, for `auto`, when the plain decode would not fit:
    its activation peak (simulated from the VAE's config, as `lowmem-eraser plan` does; 14.7 GiB at 49x480x720)
    against what the GPU will have free at decode time. Returns whether tiling is on."""
    if mode not in TILING_MODES:
        raise LowmemEraserError(f"--vae-tiling: expected one of {', '.join(TILING_MODES)}, got {mode!r}")
    if pipe.vae is None:
        return False
    tiled = mode == "on"
    if mode == "auto" and pipe._execution_device.type == "cuda" and type(pipe.vae).__name__ != "AutoencoderKLCogVideoX":
        # The decode peak is simulated for CogVideoX's VAE only so far: other VAEs decode tiled on a GPU.
        tiled = True
        logger.info("VAE decode of %s: tiling on (--vae-tiling off to decode whole)", type(pipe.vae).__name__)
    elif mode == "auto" and pipe._execution_device.type == "cuda":
        from .sampling import latent_frames
        from .stages import ALLOCATOR_SLACK, vae_decode_peak

        config = {k: v for k, v in pipe.vae.config.items() if not k.startswith("_")}
        shape = (1, pipe.vae.config.latent_channels, latent_frames(frames), height // pipe.vae_scale_factor_spatial,
                 width // pipe.vae_scale_factor_spatial)
        peak = vae_decode_peak(config, shape, pipe.vae.dtype, tiled=False) * (1 + ALLOCATOR_SLACK)
        device = pipe._execution_device
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # reusable by torch
        if pipe.vae.device.type != "cuda":  # model/sequential offload: the VAE's weights arrive at decode time
            peak += sum(t.numel() * t.element_size() for t in pipe.vae.state_dict().values())
        tiled = peak > free
        logger.info("VAE decode needs %.2f GiB, %.2f GiB free: tiling %s", peak / 2**30, free / 2**30,
                    "on" if tiled else "off")
    if tiled:
        pipe.vae.enable_tiling()
        pipe.vae.enable_slicing()
    else:
        pipe.vae.disable_tiling()
        pipe.vae.disable_slicing()
    return tiled


def generate(pipe, spec: Generation, tiling: str = "auto") -> np.ndarray:
    """One video as uint8 frames [F, H, W, 3]."""
    runtime = runtime_of(pipe.transformer)
    config = dict(pipe.transformer.config)
    default = runtime.video_size(config, pipe.vae_scale_factor_spatial)
    frames = spec.frames if spec.frames is not None else default[0]
    if frames <= 0 or frames % runtime.frame_step != 1:
        raise LowmemEraserError(f"--frames: expected {runtime.frame_step}k+1 frames (e.g. 49), got {frames}")
    height = spec.height or default[1]
    width = spec.width or default[2]
    vae_tiling(pipe, tiling, frames, height, width)
    device = pipe._execution_device
    output = pipe(
        prompt=spec.prompt,
        num_frames=frames,
        height=height,
        width=width,
        num_inference_steps=spec.steps,
        guidance_scale=spec.guidance,
        generator=torch.Generator(device).manual_seed(spec.seed),
        max_sequence_length=runtime.max_text_length(config),
        **runtime.generation_kwargs(pipe),
        output_type="np" if pipe.vae is not None else "latent",
        return_dict=False,
    )[0]
    if pipe.vae is not None:
        return (np.clip(output[0], 0, 1) * 255).round().astype(np.uint8)
    from .toy.world import render

    return render(output[0].float().cpu())


def export(frames: np.ndarray, path: str | Path, fps: int = FPS) -> Path:
    """Write uint8 frames [F, H, W, 3] as .gif (Pillow) or .mp4 (imageio-ffmpeg)."""
    from diffusers.utils import export_to_gif, export_to_video
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gif":
        export_to_gif([Image.fromarray(frame) for frame in frames], str(path), fps=fps)
    elif path.suffix == ".mp4":
        export_to_video([frame for frame in frames], str(path), fps=fps)
    else:
        raise LowmemEraserError(f"--output: {path} must end in .gif or .mp4")
    return path


def load_pipeline_with_erasers(model, eraser, offload: str = "none", kernels: str = "auto"):
    """The family's pipeline (load_pipeline) with the eraser loaded into each of its transformers (Wan2.2 A14B:
    each expert its own erasers), at `kernels`."""
    from . import load_erasers

    pipe = load_pipeline(model, offload)
    experts = pipeline_experts(pipe)
    for name, transformer in zip(runtime_of_folder(model, "--model").experts(model), experts):
        load_erasers(transformer, eraser, expert=name if len(experts) > 1 else None).kernels = kernels
    return pipe


def check_generation(model, spec: Generation) -> None:
    """`spec`'s steps, frames, sizes and guidance for this model folder, checked before the model loads."""
    if spec.steps < 1:
        raise LowmemEraserError(f"--steps: expected at least 1, got {spec.steps}")
    if not math.isfinite(spec.guidance):
        raise LowmemEraserError(f"--guidance: expected a finite number, got {spec.guidance}")
    runtime = runtime_of_folder(model, "--model")
    if spec.frames is not None and (spec.frames <= 0 or spec.frames % runtime.frame_step != 1):
        raise LowmemEraserError(f"--frames: expected {runtime.frame_step}k+1 frames (e.g. 49), got {spec.frames}")
    multiple = runtime.size_multiple(model)
    for name, value in (("--height", spec.height), ("--width", spec.width)):
        if value is not None and (value <= 0 or value % multiple):
            raise LowmemEraserError(f"{name}: expected a multiple of {multiple} for this model (its VAE's compression "
                                    f"x its patch size), got {value}")


def infer(model, eraser, spec: Generation, output, strength: float = 1.0, offload: str = "none", compare: bool = False,
          tiling: str = "auto"):
    """Generate `spec` with the eraser at `strength`; with `compare`, base | erased side by side (same seed).
    `tiling`: VAE tiling and slicing, `auto` = on when the plain decode would not fit (see `vae_tiling`)."""
    from . import read_erasers, set_eraser_scale
    from .serialization import ensure_folder

    # Every argument is checked before the model loads (minutes on a real model), not after the generation.
    if Path(output).suffix not in (".gif", ".mp4"):
        raise LowmemEraserError(f"--output: {output} must end in .gif or .mp4")
    if not math.isfinite(strength):  # nan/inf would render a black video and exit 0
        raise LowmemEraserError(f"--strength: expected a finite number, got {strength}")
    check_generation(model, spec)
    ensure_folder(Path(output).parent, "--output")
    read_erasers(eraser)  # a bad eraser is named before the model loads
    pipe = load_pipeline_with_erasers(model, eraser, offload)
    for transformer in pipeline_experts(pipe):
        set_eraser_scale(transformer, strength)
    erased = generate(pipe, spec, tiling)
    if compare:
        with all_erasers_disabled(pipe):
            base = generate(pipe, spec, tiling)
        separator = np.full((*base.shape[:2], max(2, base.shape[2] // 32), 3), 255, dtype=np.uint8)
        erased = np.concatenate([base, separator, erased], axis=2)
    return export(erased, output, fps=runtime_of(pipe.transformer).fps if pipe.vae is not None else FPS)

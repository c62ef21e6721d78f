"""`lowmem-eraser infer`: generate a video with an eraser loaded into a local CogVideoX folder.

The pipeline is assembled from the folder's components (so a folder without `model_index.json` works too).
Folders with a `vae/` decode through it; folders without one (the toy model) are decoded by the toy world's
documented renderer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import LowmemEraserError

OFFLOAD_MODES = ("none", "model", "sequential")
FPS = 8  # CogVideoX's published frame rate


@dataclass
class Generation:
    prompt: str
    steps: int = 50
    frames: int | None = None  # None: the transformer's sample_frames (49 for CogVideoX, 17 for the toy model)
    height: int | None = None  # None: the transformer's sample size
    width: int | None = None
    guidance: float = 6.0
    seed: int = 0


def load_pipeline(model: str | Path, offload: str = "none"):
    """CogVideoXPipeline from a local folder's components, on CUDA in bf16 if there is one, else CPU fp32."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXPipeline, CogVideoXTransformer3DModel
    from transformers import AutoTokenizer, T5EncoderModel

    from .train import load_scheduler

    model = Path(model)
    for sub in ("transformer", "text_encoder", "tokenizer", "scheduler"):
        if not (model / sub).is_dir():
            raise LowmemEraserError(f"--model: {model} has no {sub}/ folder (expected a diffusers CogVideoX folder)")
    if offload not in OFFLOAD_MODES:
        raise LowmemEraserError(f"--offload: expected one of {', '.join(OFFLOAD_MODES)}, got {offload!r}")
    cuda = torch.cuda.is_available()
    if offload != "none" and not cuda:
        raise LowmemEraserError(f"--offload {offload} moves weights between CPU and a CUDA device; there is no CUDA here")
    dtype = torch.bfloat16 if cuda else torch.float32
    pipe = CogVideoXPipeline(
        tokenizer=AutoTokenizer.from_pretrained(model / "tokenizer"),
        text_encoder=T5EncoderModel.from_pretrained(model / "text_encoder", torch_dtype=dtype),
        vae=AutoencoderKLCogVideoX.from_pretrained(model / "vae", torch_dtype=dtype) if (model / "vae").is_dir() else None,
        transformer=CogVideoXTransformer3DModel.from_pretrained(model / "transformer", torch_dtype=dtype),
        scheduler=load_scheduler(model),
    )
    if offload == "model":
        pipe.enable_model_cpu_offload()
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload()
    else:
        pipe.to("cuda" if cuda else "cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, spec: Generation) -> np.ndarray:
    """One video as uint8 frames [F, H, W, 3]."""
    config = pipe.transformer.config
    frames = spec.frames if spec.frames is not None else config.sample_frames
    if frames <= 0 or frames % 8 != 1:
        raise LowmemEraserError(f"--frames: expected 8k+1 frames (e.g. 49), got {frames}")
    device = pipe._execution_device
    output = pipe(
        prompt=spec.prompt,
        num_frames=frames,
        height=spec.height or config.sample_height * pipe.vae_scale_factor_spatial,
        width=spec.width or config.sample_width * pipe.vae_scale_factor_spatial,
        num_inference_steps=spec.steps,
        guidance_scale=spec.guidance,
        generator=torch.Generator(device).manual_seed(spec.seed),
        max_sequence_length=config.max_text_seq_length,
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


def infer(model, eraser, spec: Generation, output, strength: float = 1.0, offload: str = "none", compare: bool = False):
    """Generate `spec` with the eraser at `strength`; with `compare`, base | erased side by side (same seed)."""
    from . import erasers_disabled, load_erasers, set_eraser_scale

    if Path(output).suffix not in (".gif", ".mp4"):
        raise LowmemEraserError(f"--output: {output} must end in .gif or .mp4")
    pipe = load_pipeline(model, offload)
    load_erasers(pipe.transformer, eraser)
    set_eraser_scale(pipe.transformer, strength)
    erased = generate(pipe, spec)
    if compare:
        with erasers_disabled(pipe.transformer):
            base = generate(pipe, spec)
        separator = np.full((*base.shape[:2], max(2, base.shape[2] // 32), 3), 255, dtype=np.uint8)
        erased = np.concatenate([base, separator, erased], axis=2)
    return export(erased, output)

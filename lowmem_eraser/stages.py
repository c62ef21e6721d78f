"""Memory of the stages of a run around the training step, predicted on a CPU: text encoding, the sampling
forwards (x0 generation, trajectory sampling, `infer`'s denoising) and the VAE decode.

A process's GPU peak is the largest of its stages, not the training step's: the T5-XXL encoder alone is
≈ 9 GiB in bf16, more than a 5b training step with streamed int8 blocks. Each stage is simulated like the
step (plan.py): its real modules built under FakeTensorMode from their configs, the real forward run on fake
CPU tensors while a LiveTensorTracker counts live bytes; the deep stacks (T5 layers, transformer blocks) on
2- and 3-layer copies, extrapolated to the real depth. Weights are counted from a `meta` build.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .memory import LiveTensorTracker, tensor_bytes

GiB = 2**30
# The text encoder of the published CogVideoX models: the encoder of google/t5-v1_1-xxl.
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128)
TEXT_BATCH = 8  # text.encode_prompts encodes this many prompts at a time
SIM_DEPTHS = (2, 3)  # from 2 blocks on, the step's peak sits in the last block's backward (1 has no input grad)
ALLOCATOR_SLACK = 0.10  # the caching allocator's reserved-but-unused share on top of the allocated peak
CUDA_CONTEXT_BYTES = 2**30  # CUDA context + cuBLAS workspace: outside max_memory_allocated, inside the card


def needed_bytes(peak: int) -> int:
    """Card memory a predicted allocated peak needs: allocator slack and the CUDA context on top."""
    return int(peak * (1 + ALLOCATOR_SLACK)) + CUDA_CONTEXT_BYTES if peak else 0


@dataclass
class Stage:
    """One stage of a process: its predicted GPU allocated peak and host RAM (tensor bytes), in bytes."""

    name: str
    gpu: int
    host: int
    detail: str = ""

    @property
    def needs(self) -> int:
        return needed_bytes(self.gpu)


def _config(folder: Path, sub: str) -> dict | None:
    path = folder / sub / "config.json"
    if not path.is_file():
        return None
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_") and k != "architectures"}


def text_encoder_config(model: str | Path, preset: bool) -> dict | None:
    """T5 config of a preset (T5-XXL) or of a local folder's text_encoder/ (None if it has none)."""
    return dict(T5_XXL) if preset else _config(Path(model), "text_encoder")


def vae_config(model: str | Path, preset: bool) -> dict | None:
    """AutoencoderKLCogVideoX config (the presets use its defaults); None for a folder without vae/."""
    return {} if preset else _config(Path(model), "vae")


def _fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode()


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Build modules in `dtype`: `.to(dtype)` cannot convert fake parameters."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def extrapolate_depth(peaks: dict[int, int], depth: int) -> int:
    """A peak at `depth` layers from peaks simulated at SIM_DEPTHS (or at `depth` itself)."""
    low, high = SIM_DEPTHS
    if depth in peaks:
        return peaks[depth]
    return peaks[low] + (depth - low) * (peaks[high] - peaks[low])


def _t5(config: dict, layers: int | None = None):
    from transformers import T5Config, T5EncoderModel

    overrides = {"num_layers": layers} if layers else {}
    return T5EncoderModel(T5Config(**{**config, **overrides, "is_encoder_decoder": False, "use_cache": False})).eval()


def text_encoder_bytes(config: dict, dtype: torch.dtype) -> int:
    with torch.device("meta"), default_dtype(dtype):
        return tensor_bytes(_t5(config))


def text_encoding_peak(config: dict, batch: int, seq_len: int, dtype: torch.dtype) -> int:
    """Activation peak of one no-grad T5 encoder forward on [batch, seq_len] token ids."""
    depth = config.get("num_layers", 24)
    peaks = {}
    for layers in SIM_DEPTHS if depth > max(SIM_DEPTHS) else (depth,):
        with _fake_mode():
            with default_dtype(dtype):
                encoder = _t5(config, layers)
            ids = torch.zeros(batch, seq_len, dtype=torch.long)
            with torch.no_grad(), LiveTensorTracker() as tracker:
                encoder(input_ids=ids)
        peaks[layers] = tracker.peak_bytes
    return extrapolate_depth(peaks, depth)


def text_stage(config: dict | None, prompts: int, seq_len: int, dtype: torch.dtype, on_gpu: bool) -> Stage:
    """Encoding every prompt once (text.py): the encoder's weights plus one batch's activations, on the GPU or
    the CPU. The weights pass through host RAM either way (loaded there, then moved)."""
    if config is None:
        return Stage("text encoding", 0, 0, "no text_encoder/ config: not predicted")
    weights = text_encoder_bytes(config, dtype)
    activations = text_encoding_peak(config, min(TEXT_BATCH, max(1, prompts)), seq_len, dtype)
    where = "GPU" if on_gpu else "CPU"
    detail = f"T5 {weights / GiB:.2f} GiB on the {where}, encoded once and cached"
    if on_gpu:
        return Stage("text encoding", weights + activations, weights, detail)
    return Stage("text encoding", 0, weights + activations, detail)


def _vae(config: dict):
    from diffusers import AutoencoderKLCogVideoX

    return AutoencoderKLCogVideoX(**config).eval()


def vae_bytes(config: dict, dtype: torch.dtype) -> int:
    with torch.device("meta"), default_dtype(dtype):
        return tensor_bytes(_vae(config))


def vae_decode_peak(config: dict, latent_shape: tuple[int, ...], dtype: torch.dtype, tiled: bool) -> int:
    """Activation peak of decoding latents [B, C, F, H, W] with the full VAE (plain, or tiled and sliced as
    `vae.enable_tiling()` / `enable_slicing()` do). Not extrapolated: the decoder is simulated whole
    (≈ 0.5 s plain, ≈ 6 s tiled at 49x480x720)."""
    with _fake_mode():
        with default_dtype(dtype):
            vae = _vae(config)
        if tiled:
            vae.enable_tiling()
            vae.enable_slicing()
        latents = torch.zeros(latent_shape, dtype=dtype)
        with torch.no_grad(), LiveTensorTracker() as tracker:
            vae.decode(latents)
    return tracker.peak_bytes

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
# Wan2.1 / Wan2.2's text encoder: the encoder of google/umt5-xxl (Wan-AI/Wan2.1-T2V-*-Diffusers text_encoder/
# config.json: UMT5EncoderModel, d_model 4096, d_ff 10240, d_kv 64, 64 heads, 24 layers, vocab 256384, gated-gelu;
# the original repos' configs/wan_t2v_14B.py: t5_tokenizer google/umt5-xxl, text_len 512).
UMT5_XXL = dict(model_type="umt5", d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=256384,
                feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                relative_attention_max_distance=128)
# HunyuanVideo's text encoders (hunyuanvideo-community/HunyuanVideo text_encoder/ and text_encoder_2/): the
# language part of llava-llama-3-8b (LlamaModel: hidden 4096, 32 layers, MLP 14336, 32 heads, 8 KV heads, vocab
# 128320) and CLIP ViT-L/14's text tower (CLIPTextModel: 12 layers of 768, 77 tokens, pooled 768).
LLAVA_LLAMA3_8B = dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128320, max_position_embeddings=8192,
                       rms_norm_eps=1e-5, rope_theta=500000.0)
CLIP_L_TEXT = dict(model_type="clip_text_model", hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, vocab_size=49408, max_position_embeddings=77, projection_dim=768,
                   hidden_act="quick_gelu")
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


def text_encoder_config(model: str | Path, preset: bool, seq_len: int = 226):
    """T5 config of a preset (T5-XXL), or the text encoders of a local folder (see `text_encoders`): its
    text_encoder/ config, or with a text_encoder_2/ (HunyuanVideo: LLaMA in the prompt template, then CLIP's 77
    tokens) both as TextEncoders; None when it has none."""
    if preset:
        return dict(T5_XXL)
    first, second = _config(Path(model), "text_encoder"), _config(Path(model), "text_encoder_2")
    if first is None or second is None:
        return first
    from .families.hunyuan_video import PUBLISHED_CROP_START

    llama = first.get("model_type") == "llama"  # the pipeline reads a middle layer: all hidden states are kept
    return (TextEncoder(first, seq_len + (PUBLISHED_CROP_START if llama else 0), llama, "LLaMA" if llama else "T5"),
            TextEncoder(second, 77, name="CLIP"))


def vae_config(model: str | Path, preset: bool) -> dict | None:
    """AutoencoderKLCogVideoX config (the presets use its defaults); None for a folder without vae/. A folder's
    config keeps its `_class_name` (AutoencoderKLWan, AutoencoderKLHunyuanVideo: see `_vae`)."""
    if preset:
        return {}
    path = Path(model) / "vae" / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    return {k: v for k, v in config.items() if not k.startswith("_") or k == "_class_name"}


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a model: its transformers config (`model_type` t5 | umt5 | llama | clip_text_model;
    none: T5), the tokens each prompt is padded to in the encoder, and whether the pipeline asks for every
    layer's hidden states (HunyuanVideo reads the third-last layer: all of them are kept until it returns)."""

    config: dict
    seq_len: int
    hidden_states: bool = False
    name: str = "T5"


# model_type -> (transformers config class, model class, the config key of its depth)
_TEXT_CLASSES = {
    "t5": ("T5Config", "T5EncoderModel", "num_layers"),
    "umt5": ("UMT5Config", "UMT5EncoderModel", "num_layers"),
    "llama": ("LlamaConfig", "LlamaModel", "num_hidden_layers"),
    "clip_text_model": ("CLIPTextConfig", "CLIPTextModel", "num_hidden_layers"),
}


def text_encoders(config, seq_len: int) -> tuple[TextEncoder, ...]:
    """A model's text encoders: `config` is a tuple of TextEncoder already, one config dict (a T5-type encoder,
    padded to `seq_len`), or None (none known)."""
    if config is None:
        return ()
    if isinstance(config, dict):
        kind = config.get("model_type", "t5")
        return (TextEncoder(config, seq_len, name={"umt5": "UMT5", "llama": "LLaMA", "clip_text_model": "CLIP"}
                            .get(kind, "T5")),)
    return tuple(config)


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


def _encoder(config: dict, layers: int | None = None):
    """The text encoder a config describes (T5 when it names no `model_type`), `layers` deep if given."""
    import transformers

    kind = config.get("model_type", "t5")
    if kind not in _TEXT_CLASSES:
        raise ValueError(f"text encoder model_type {kind!r} is not one of {', '.join(_TEXT_CLASSES)}")
    config_class, model_class, depth_key = (getattr(transformers, n) if i < 2 else n
                                            for i, n in enumerate(_TEXT_CLASSES[kind]))
    values = {k: v for k, v in config.items() if k != "model_type"}
    if layers:
        values[depth_key] = layers
    if kind in ("t5", "umt5"):
        values.update(is_encoder_decoder=False, use_cache=False)
    return model_class(config_class(**values)).eval()


def _t5(config: dict, layers: int | None = None):
    return _encoder(config, layers)


def _depth(config: dict) -> int:
    return config.get(_TEXT_CLASSES.get(config.get("model_type", "t5"), _TEXT_CLASSES["t5"])[2], 24)


def text_encoder_bytes(config: dict, dtype: torch.dtype) -> int:
    with torch.device("meta"), default_dtype(dtype):
        return tensor_bytes(_encoder(config))


def text_encoding_peak(config: dict, batch: int, seq_len: int, dtype: torch.dtype, hidden_states: bool = False) -> int:
    """Activation peak of one no-grad encoder forward on [batch, seq_len] token ids (with `hidden_states`, as
    HunyuanVideo's pipeline calls its LLaMA: every layer's output kept)."""
    depth = _depth(config)
    peaks = {}
    for layers in SIM_DEPTHS if depth > max(SIM_DEPTHS) else (depth,):
        with _fake_mode():
            with default_dtype(dtype):
                encoder = _encoder(config, layers)
            ids = torch.zeros(batch, seq_len, dtype=torch.long)
            extra = {"output_hidden_states": True} if hidden_states else {}
            with torch.no_grad(), LiveTensorTracker() as tracker:
                out = encoder(input_ids=ids, **extra)
            del out
        peaks[layers] = tracker.peak_bytes
    return extrapolate_depth(peaks, depth)


def text_stage(config, prompts: int, seq_len: int, dtype: torch.dtype, on_gpu: bool) -> Stage:
    """Encoding every prompt once (text.py): the encoders' weights plus one batch's activations (the encoders run
    one after the other: the larger activation peak), on the GPU or the CPU. The weights pass through host RAM
    either way (loaded there, then moved). `config`: see `text_encoders`."""
    encoders = text_encoders(config, seq_len)
    if not encoders:
        return Stage("text encoding", 0, 0, "no text_encoder/ config: not predicted")
    batch = min(TEXT_BATCH, max(1, prompts))
    sizes = [text_encoder_bytes(e.config, dtype) for e in encoders]
    weights = sum(sizes)
    activations = max(text_encoding_peak(e.config, batch, e.seq_len, dtype, e.hidden_states) for e in encoders)
    where = "GPU" if on_gpu else "CPU"
    names = " + ".join(f"{e.name} {size / GiB:.2f} GiB" for e, size in zip(encoders, sizes))
    detail = f"{names} on the {where}, encoded once and cached"
    if on_gpu:
        return Stage("text encoding", weights + activations, weights, detail)
    return Stage("text encoding", 0, weights + activations, detail)


def _vae(config: dict):
    """The VAE a config describes: its `_class_name` (AutoencoderKLWan, AutoencoderKLHunyuanVideo), else
    AutoencoderKLCogVideoX."""
    import diffusers

    values = dict(config)
    cls = getattr(diffusers, values.pop("_class_name", "AutoencoderKLCogVideoX"))
    return cls(**values).eval()


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

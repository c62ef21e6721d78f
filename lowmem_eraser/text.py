"""Text embeddings computed once, cached on disk, and the text encoder freed before training starts.

CogVideoX's T5-XXL encoder alone is ~9.5 GB in bf16 (Wan's UMT5-XXL ~11 GB); the prompts of a run never change,
so every target, preservation and empty prompt is encoded once (batched, through the family's own pipeline) and
the encoder is dropped before the transformer is loaded. `memory.text_encoder` chooses the GPU or the CPU for
that one pass. The cache is keyed by a hash of the encoder/tokenizer files, the prompts and the settings.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .families import runtime_of_folder
from .serialization import atomic_write

logger = logging.getLogger(__name__)


@dataclass
class PromptEmbeddings:
    """Text conditions: tensors [n, L, D], or the family's condition object (families/runtime.py)."""

    target: torch.Tensor  # [n, L, D] c: prompts that show the concept
    preserve: torch.Tensor  # [n, L, D] c_pre: their preservation twins
    empty: torch.Tensor  # [1, L, D] the unconditional prompt ""
    concept_tokens: torch.Tensor  # bool [n, L]: which tokens of each target prompt spell the concept


def _files_fingerprint(folder: Path) -> list:
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file())


def cache_key(model_dir: Path, pairs: list[tuple[str, str]], concept: str, max_length: int, dtype: torch.dtype) -> str:
    return _fingerprint_hash(model_dir, max_length, dtype, pairs=pairs, concept=concept)


def _fingerprint_hash(model_dir: Path, max_length: int, dtype: torch.dtype, **content) -> str:
    """Hash of the encoder/tokenizer files, `content` (the prompts) and the settings: the cache file's key."""
    fingerprint = {
        "model": str(Path(model_dir).resolve()),
        "text_encoder": _files_fingerprint(Path(model_dir) / "text_encoder"),
        "tokenizer": _files_fingerprint(Path(model_dir) / "tokenizer"),
        # HunyuanVideo's CLIP: only where present, so every other family's keys stay what they were
        **{sub: _files_fingerprint(Path(model_dir) / sub) for sub in ("text_encoder_2", "tokenizer_2")
           if (Path(model_dir) / sub).is_dir()},
        **content,
        "max_length": max_length,
        "dtype": str(dtype),
    }
    return hashlib.sha256(json.dumps(fingerprint).encode()).hexdigest()[:16]


def _encode(model_dir: Path, prompts: list[str], concept: str, targets: int, max_length: int, dtype, device, batch_size):
    """Text conditions of `prompts` through the family's own pipeline `encode_prompt` (CogVideoX: T5; Wan: UMT5,
    zero after each prompt's end; HunyuanVideo: LLaMA after its prompt template + CLIP), and the concept tokens
    of the first `targets`."""
    runtime = runtime_of_folder(model_dir)
    modules = runtime.load_text_modules(model_dir, dtype)
    for name, module in modules.items():
        if name.startswith("text_encoder"):
            modules[name] = module.to(device).eval()
    pipe = runtime.pipeline(**modules)
    with torch.no_grad():
        chunks = [runtime.encode(pipe, prompts[i : i + batch_size], max_length, device, dtype).cpu()
                  for i in range(0, len(prompts), batch_size)]
    concept_tokens = (runtime.concept_tokens(modules["tokenizer"], prompts[:targets], concept, max_length)
                      if targets else None)
    return runtime.concat(chunks), concept_tokens


def encoder_device(placement: str, device: torch.device, model_dir: Path, prompts: int, max_length: int,
                   dtype: torch.dtype) -> torch.device:
    """Where the encoder runs (`memory.text_encoder`): `cpu`, `cuda` (the training device), or `auto`: the
    training device when its free memory holds the encoder and one batch's activations (predicted as
    `lowmem-eraser plan` does, allocator slack included), else the CPU. T5-XXL alone is ~9 GiB in bf16 (UMT5-XXL
    10.6, LLaMA-3-8B + CLIP 14.2): on an 8 GB card it would end the run before training starts; on the CPU it
    runs once and is cached."""
    if device.type != "cuda" or placement == "cpu":
        return torch.device("cpu")
    if placement == "cuda":
        return device
    from .stages import ALLOCATOR_SLACK, text_encoder_config, text_stage

    config = text_encoder_config(model_dir, preset=False, seq_len=max_length)
    stage = text_stage(config, prompts, max_length, dtype, on_gpu=True)
    free, _ = torch.cuda.mem_get_info(device)
    needed = int(stage.gpu * (1 + ALLOCATOR_SLACK))
    chosen = device if config is not None and needed <= free else torch.device("cpu")
    logger.info("memory.text_encoder auto: the encoder needs %.2f GiB, %.2f GiB free on %s: encoding on the %s",
                needed / 2**30, free / 2**30, device, chosen.type.upper())
    return chosen


def _encode_once(model_dir: Path, prompts: list[str], concept: str, targets: int, max_length: int, dtype, device,
                 batch_size: int, placement: str):
    """One encoder pass on the device `placement` chooses, then the encoder's memory given back."""
    device = encoder_device(placement, torch.device(device), model_dir, len(prompts), max_length, dtype)
    result = _encode(model_dir, prompts, concept, targets, max_length, dtype, device, batch_size)
    gc.collect()  # the encoder went out of scope with _encode: give its memory back now
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def encode_prompts(
    model_dir: str | Path,
    pairs: list[tuple[str, str]],
    concept: str,
    max_length: int,
    dtype: torch.dtype,
    device: torch.device,
    cache_dir: str | Path,
    batch_size: int = 8,
    placement: str = "auto",
) -> PromptEmbeddings:
    """Embeddings of every target, preservation and empty prompt (on CPU), from the cache or freshly encoded
    on the device `placement` chooses (see `encoder_device`)."""
    model_dir = Path(model_dir)
    cache = Path(cache_dir) / f"text-{cache_key(model_dir, pairs, concept, max_length, dtype)}.pt"
    runtime = runtime_of_folder(model_dir)
    if cache.is_file():
        stored = torch.load(cache, weights_only=True)
        return PromptEmbeddings(**{name: runtime.restored(value) if name != "concept_tokens" else value
                                   for name, value in stored.items()})
    targets = [target for target, _ in pairs]
    prompts = targets + [preserve for _, preserve in pairs] + [""]
    embeddings, concept_tokens = _encode_once(model_dir, prompts, concept, len(targets), max_length, dtype, device,
                                              batch_size, placement)
    n = len(pairs)
    result = PromptEmbeddings(embeddings[:n], embeddings[n : 2 * n], embeddings[2 * n :], concept_tokens)
    cache.parent.mkdir(parents=True, exist_ok=True)
    stored = {name: runtime.stored(getattr(result, name)) if name != "concept_tokens" else result.concept_tokens
              for name in ("target", "preserve", "empty", "concept_tokens")}
    atomic_write(cache, lambda tmp: torch.save(stored, tmp))
    return result


def encode_texts(
    model_dir: str | Path,
    prompts: list[str],
    max_length: int,
    dtype: torch.dtype,
    device: torch.device,
    cache_dir: str | Path,
    batch_size: int = 8,
    placement: str = "auto",
) -> torch.Tensor:
    """Embeddings [n, L, D] (on CPU) of a plain list of prompts (e.g. validation prompts), encoded and cached
    exactly like `encode_prompts`' (same encoder pass, same cache folder, its own key)."""
    model_dir = Path(model_dir)
    cache = Path(cache_dir) / f"texts-{_fingerprint_hash(model_dir, max_length, dtype, prompts=list(prompts))}.pt"
    runtime = runtime_of_folder(model_dir)
    if cache.is_file():
        return runtime.restored(torch.load(cache, weights_only=True))
    embeddings, _ = _encode_once(model_dir, list(prompts), "", 0, max_length, dtype, device, batch_size, placement)
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cache, lambda tmp: torch.save(runtime.stored(embeddings), tmp))
    return embeddings

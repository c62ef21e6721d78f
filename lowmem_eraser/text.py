"""Text embeddings computed once, cached on disk, and the T5 encoder freed before training starts.

The T5-XXL encoder alone is ~9.5 GB in bf16; the prompts of a run never change, so every target,
preservation and empty prompt is encoded once (batched) and the encoder is dropped before the transformer
is loaded. The cache is keyed by a hash of the encoder/tokenizer files, the prompts and the settings.
"""

from __future__ import annotations

import gc
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .localization import concept_token_mask
from .serialization import atomic_write


@dataclass
class PromptEmbeddings:
    target: torch.Tensor  # [n, L, D] c: prompts that show the concept
    preserve: torch.Tensor  # [n, L, D] c_pre: their preservation twins
    empty: torch.Tensor  # [1, L, D] the unconditional prompt ""
    concept_tokens: torch.Tensor  # bool [n, L]: which tokens of each target prompt spell the concept


def _files_fingerprint(folder: Path) -> list:
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file())


def cache_key(model_dir: Path, pairs: list[tuple[str, str]], concept: str, max_length: int, dtype: torch.dtype) -> str:
    fingerprint = {
        "model": str(Path(model_dir).resolve()),
        "text_encoder": _files_fingerprint(Path(model_dir) / "text_encoder"),
        "tokenizer": _files_fingerprint(Path(model_dir) / "tokenizer"),
        "pairs": pairs,
        "concept": concept,
        "max_length": max_length,
        "dtype": str(dtype),
    }
    return hashlib.sha256(json.dumps(fingerprint).encode()).hexdigest()[:16]


def _encode(model_dir: Path, prompts: list[str], concept: str, targets: int, max_length: int, dtype, device, batch_size):
    from diffusers import CogVideoXPipeline
    from transformers import AutoTokenizer, T5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(model_dir / "tokenizer")
    text_encoder = T5EncoderModel.from_pretrained(model_dir / "text_encoder", torch_dtype=dtype).to(device).eval()
    pipe = CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=None, transformer=None, scheduler=None)
    with torch.no_grad():
        chunks = [
            pipe.encode_prompt(
                prompts[i : i + batch_size],
                do_classifier_free_guidance=False,
                max_sequence_length=max_length,
                device=device,
                dtype=dtype,
            )[0].cpu()
            for i in range(0, len(prompts), batch_size)
        ]
    concept_tokens = concept_token_mask(tokenizer, prompts[:targets], concept, max_length)
    return torch.cat(chunks), concept_tokens


def encode_prompts(
    model_dir: str | Path,
    pairs: list[tuple[str, str]],
    concept: str,
    max_length: int,
    dtype: torch.dtype,
    device: torch.device,
    cache_dir: str | Path,
    batch_size: int = 8,
) -> PromptEmbeddings:
    """Embeddings of every target, preservation and empty prompt (on CPU), from the cache or freshly encoded."""
    model_dir = Path(model_dir)
    cache = Path(cache_dir) / f"text-{cache_key(model_dir, pairs, concept, max_length, dtype)}.pt"
    if cache.is_file():
        return PromptEmbeddings(**torch.load(cache, weights_only=True))
    targets = [target for target, _ in pairs]
    prompts = targets + [preserve for _, preserve in pairs] + [""]
    embeddings, concept_tokens = _encode(model_dir, prompts, concept, len(targets), max_length, dtype, device, batch_size)
    n = len(pairs)
    result = PromptEmbeddings(embeddings[:n], embeddings[n : 2 * n], embeddings[2 * n :], concept_tokens)
    gc.collect()  # the encoder went out of scope with _encode: give its memory back now
    if device.type == "cuda":
        torch.cuda.empty_cache()
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cache, lambda tmp: torch.save(asdict(result), tmp))
    return result

"""The concept mask M of T2VUnlearning's localisation loss, computed without ever holding N×N attention.

M marks the video tokens that attend to the concept's text tokens: the text→video attention map of the
concept tokens, averaged over heads and blocks, min-max normalised per latent frame and thresholded
(Receler's binary convention, `M = normalised >= threshold`). L_loc then keeps the adapter's output small
outside M, so that erasing the concept leaves the rest of the video alone.

The full attention of CogVideoX-5b at 49 frames is 48 heads × 17,776² ≈ 30 GB per layer. Only the video
rows of the concept columns are needed, plus each row's softmax normaliser, which a chunked logsumexp over
all keys gives: memory is O(chunk_size²) per head instead of O(N²).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .errors import LowmemEraserError
from .families import family_of


def concept_spans(text: str, concept: str) -> list[tuple[int, int]]:
    """Character spans of `concept` in `text`: case-insensitive, starting at a word start, any whitespace
    between its words. A match may run into a longer word ("nude" matches "nudes")."""
    pattern = r"(?<!\w)" + r"\s+".join(re.escape(word) for word in concept.split())
    return [match.span() for match in re.finditer(pattern, text, re.IGNORECASE)]


def concept_token_mask(tokenizer, prompts: list[str], concept: str, max_length: int,
                       search_from: int = 0) -> torch.Tensor:
    """Bool [batch, max_length]: the token positions of each prompt that spell `concept`.

    Prompts are tokenised exactly as CogVideoXPipeline does (special tokens, padding to `max_length`,
    truncation), so positions line up with the text embeddings. A fast tokenizer maps tokens to characters
    (exact, case-insensitive); a slow one falls back to finding the concept's own token ids in the prompt
    ids, for a few casings of it. A prompt without the concept gets an all-False row: the caller warns.
    `search_from`: matches starting before this character are ignored (a prompt template's own words).
    """
    if not concept.strip():
        raise LowmemEraserError("concept: expected one or more words, got an empty string")
    fast = getattr(tokenizer, "is_fast", False)
    encoding = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_offsets_mapping=fast,
    )
    if fast:
        rows = [_tokens_in_spans(offsets, [span for span in concept_spans(prompt, concept) if span[0] >= search_from])
                for prompt, offsets in zip(prompts, encoding["offset_mapping"])]
    else:
        patterns = _concept_id_patterns(tokenizer, concept)
        rows = [_find_token_ids(ids, patterns) for ids in encoding["input_ids"]]
    return torch.tensor(rows, dtype=torch.bool).reshape(len(prompts), max_length)


def _tokens_in_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Tokens whose characters overlap a span; special and padding tokens have empty (0, 0) offsets."""
    return [any(start < span_end and end > span_start for span_start, span_end in spans) for start, end in offsets]


def _concept_id_patterns(tokenizer, concept: str) -> list[list[int]]:
    casings = dict.fromkeys([concept, concept.lower(), concept.capitalize(), concept.upper()])
    patterns = [tokenizer(casing, add_special_tokens=False)["input_ids"] for casing in casings]
    return [ids for ids in patterns if ids and tokenizer.unk_token_id not in ids]


def _find_token_ids(ids: list[int], patterns: list[list[int]]) -> list[bool]:
    found = [False] * len(ids)
    for pattern in patterns:
        for i in range(len(ids) - len(pattern) + 1):
            if ids[i : i + len(pattern)] == pattern:
                found[i : i + len(pattern)] = [True] * len(pattern)
    return found


def _joint_query_key(attn: nn.Module, video, text, image_rotary_emb):
    """q and k [B, heads, text + video, head_dim] exactly as `CogVideoXAttnProcessor2_0` builds them."""
    from diffusers.models.embeddings import apply_rotary_emb

    hidden = torch.cat([text, video], dim=1)
    batch, n_text = hidden.shape[0], text.shape[1]
    query, key = attn.to_q(hidden), attn.to_k(hidden)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if image_rotary_emb is not None:
        query = torch.cat([query[:, :, :n_text], apply_rotary_emb(query[:, :, n_text:], image_rotary_emb)], dim=2)
        if not attn.is_cross_attention:
            key = torch.cat([key[:, :, :n_text], apply_rotary_emb(key[:, :, n_text:], image_rotary_emb)], dim=2)
    return query, key


@torch.no_grad()
def concept_attention(
    attn: nn.Module,
    video: torch.Tensor,
    text: torch.Tensor,
    concept_tokens: torch.Tensor,
    image_rotary_emb=None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Softmax mass that each video query of `attn` puts on the concept text keys, mean over heads.

    `video` [B, N_video, dim] and `text` [B, N_text, dim] are attn1's inputs, `concept_tokens` bool
    [B, N_text]. The softmax runs over all N_text + N_video keys, like the joint attention. Logits are fp32
    in [B, heads, chunk_size, chunk_size] tiles (5b, batch 1, chunk 1024: 200 MB a tile, plus an fp32 copy
    of k). Returns fp32 [B, N_video].
    """
    if concept_tokens.shape != text.shape[:2]:
        raise LowmemEraserError(
            f"concept token mask has shape {tuple(concept_tokens.shape)}, but the text stream is "
            f"{tuple(text.shape[:2])} (batch, text tokens)"
        )
    query, key = _joint_query_key(attn, video, text, image_rotary_emb)
    key = key.float()
    n_text, n_joint = text.shape[1], key.shape[2]
    concept_weight = concept_tokens.to(device=query.device, dtype=torch.float32)[:, None, None, :]
    concept_keys = key[:, :, :n_text]
    scale = query.shape[-1] ** -0.5
    per_chunk = []
    for q_start in range(n_text, n_joint, chunk_size):
        q = query[:, :, q_start : q_start + chunk_size].float() * scale
        tile_lse = [
            torch.logsumexp(q @ key[:, :, k_start : k_start + chunk_size].transpose(-1, -2), -1, keepdim=True)
            for k_start in range(0, n_joint, chunk_size)
        ]
        row_lse = torch.logsumexp(torch.cat(tile_lse, dim=-1), dim=-1, keepdim=True)
        probs = torch.exp(q @ concept_keys.transpose(-1, -2) - row_lse)
        per_chunk.append((probs * concept_weight).sum(-1).mean(1))
    return torch.cat(per_chunk, dim=1)


@torch.no_grad()
def cross_concept_attention(
    attn: nn.Module, video: torch.Tensor, text: torch.Tensor, concept_tokens: torch.Tensor, chunk_size: int = 4096
) -> torch.Tensor:
    """Softmax mass that each video query of a cross-attention (Wan's `attn2`) puts on the concept text keys,
    mean over heads: fp32 [B, N_video].

    The keys are the text tokens only (Wan: 512, padding included, unmasked as in the model), so a whole row
    of logits fits: [B, heads, chunk_size, N_text] fp32 per chunk of video queries. q and k come from the
    attention's own projections and norms, as its processor builds them (no rotary embedding on this path).
    """
    if concept_tokens.shape != text.shape[:2]:
        raise LowmemEraserError(
            f"concept token mask has shape {tuple(concept_tokens.shape)}, but the text stream is "
            f"{tuple(text.shape[:2])} (batch, text tokens)"
        )
    if getattr(attn, "fused_projections", False):
        raise LowmemEraserError("cross_concept_attention needs unfused to_q/to_k projections")
    query = attn.norm_q(attn.to_q(video)).unflatten(2, (attn.heads, -1)).transpose(1, 2)
    key = attn.norm_k(attn.to_k(text)).unflatten(2, (attn.heads, -1)).transpose(1, 2).float()
    concept_weight = concept_tokens.to(device=query.device, dtype=torch.float32)[:, None, None, :]
    scale = query.shape[-1] ** -0.5
    per_chunk = []
    for start in range(0, query.shape[2], chunk_size):
        logits = (query[:, :, start : start + chunk_size].float() * scale) @ key.transpose(-1, -2)
        per_chunk.append((logits.softmax(-1) * concept_weight).sum(-1).mean(1))
    return torch.cat(per_chunk, dim=1)


@torch.no_grad()
def dual_stream_concept_attention(
    attn: nn.Module,
    video: torch.Tensor,
    text: torch.Tensor,
    concept_tokens: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    image_rotary_emb=None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Softmax mass that each video query of a dual-stream joint attention (HunyuanVideo's
    `transformer_blocks[i].attn`) puts on the concept text keys, mean over heads: fp32 [B, N_video].

    Keys are [video, text] as `HunyuanVideoAttnProcessor2_0` orders them: video q/k from `to_q`/`to_k`, their
    norms and the rotary embedding; text keys from `add_k_proj` and `norm_added_k`. `attention_mask` (the
    transformer's [B, 1, 1, N] bool: padded text keys False) is applied as the model applies it. Logits are fp32
    in [B, heads, chunk_size, chunk_size] tiles; each row's normaliser is a log-sum-exp over the key tiles.
    """
    from diffusers.models.embeddings import apply_rotary_emb

    if concept_tokens.shape != text.shape[:2]:
        raise LowmemEraserError(
            f"concept token mask has shape {tuple(concept_tokens.shape)}, but the text stream is "
            f"{tuple(text.shape[:2])} (batch, text tokens)"
        )
    query = attn.to_q(video).unflatten(2, (attn.heads, -1))
    key = attn.to_k(video).unflatten(2, (attn.heads, -1))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    text_key = attn.add_k_proj(text).unflatten(2, (attn.heads, -1))
    if attn.norm_added_k is not None:
        text_key = attn.norm_added_k(text_key)
    query = query.transpose(1, 2)  # [B, heads, N_video, head_dim]
    key = torch.cat([key, text_key], dim=1).transpose(1, 2).float()  # [B, heads, N_video + N_text, head_dim]
    n_video, n_joint = video.shape[1], key.shape[2]
    valid = (torch.ones(key.shape[0], n_joint, dtype=torch.bool, device=key.device) if attention_mask is None
             else attention_mask.reshape(attention_mask.shape[0], -1)[:, -n_joint:].to(key.device).bool())
    valid = valid[:, None, None, :]
    concept_weight = concept_tokens.to(device=query.device, dtype=torch.float32)[:, None, None, :]
    scale = query.shape[-1] ** -0.5
    per_chunk = []
    for q_start in range(0, n_video, chunk_size):
        q = query[:, :, q_start : q_start + chunk_size].float() * scale
        tile_lse = [
            torch.logsumexp((q @ key[:, :, k : k + chunk_size].transpose(-1, -2)).masked_fill(
                ~valid[..., k : k + chunk_size], float("-inf")), -1, keepdim=True)
            for k in range(0, n_joint, chunk_size)
        ]
        row_lse = torch.logsumexp(torch.cat(tile_lse, dim=-1), dim=-1, keepdim=True)
        logits = (q @ key[:, :, n_video:].transpose(-1, -2)).masked_fill(~valid[..., n_video:], float("-inf"))
        per_chunk.append((torch.exp(logits - row_lse) * concept_weight).sum(-1).mean(1))
    return torch.cat(per_chunk, dim=1)


class ConceptMaskCapture:
    """Collect the concept mask during one forward of a transformer whose family reads it (families/:
    CogVideoX from the joint attention `attn1`, Wan from the cross-attention `attn2`, HunyuanVideo from the
    dual-stream blocks' joint attention `attn`).

    `with ConceptMaskCapture(transformer, tokens, num_frames) as capture: transformer(...)`, then
    `capture.mask(threshold)`. A forward hook on every block's attention recomputes q and k from the
    attention's own inputs and sub-modules (no copy of the processor, which keeps using SDPA) and adds up
    the concept attention of each video token. Use it in a no-grad pass (the frozen θ(x_t, c) pass): under
    gradient checkpointing a recomputation would fire the hooks again.

    `concept_token_mask`: bool [batch, text_len] (see `concept_token_mask`); `num_frames`: latent frames.
    """

    def __init__(
        self, transformer: nn.Module, concept_token_mask: torch.Tensor, num_frames: int, chunk_size: int = 1024
    ):
        if chunk_size <= 0:
            raise LowmemEraserError(f"chunk_size must be positive, got {chunk_size}")
        self.family = family_of(transformer)
        if self.family.concept_attention not in ("joint", "cross", "dual"):
            raise LowmemEraserError(f"the concept mask is not implemented for {self.family.name} yet")
        self.blocks = self.family.concept_block_list(transformer)
        patch = getattr(transformer.config, "patch_size", None)
        patch_size_t = patch[0] if isinstance(patch, (tuple, list)) else getattr(transformer.config, "patch_size_t",
                                                                                  None)
        self.token_frames = num_frames // patch_size_t if patch_size_t else num_frames  # frames × (h/p) × (w/p)
        self.concept_tokens = concept_token_mask.bool()
        self.chunk_size = chunk_size
        self._sum: torch.Tensor | None = None
        self._blocks_seen = 0
        self._handles = []

    def __enter__(self) -> ConceptMaskCapture:
        self._sum, self._blocks_seen = None, 0
        self._handles = [getattr(block, self.family.concept_module).register_forward_hook(self._hook, with_kwargs=True)
                         for block in self.blocks]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, attn, args, kwargs, output) -> None:
        if self.family.concept_attention == "cross":  # WanTransformerBlock calls attn2(hidden, text, None, None)
            video = kwargs.get("hidden_states", args[0] if args else None)
            text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            attention = cross_concept_attention(attn, video, text, self.concept_tokens.to(video.device),
                                                self.chunk_size)
            self._sum = attention if self._sum is None else self._sum + attention
            self._blocks_seen += 1
            return
        if self.family.concept_attention == "dual":  # HunyuanVideoTransformerBlock calls attn by keyword only
            video = kwargs["hidden_states"]
            attention = dual_stream_concept_attention(
                attn, video, kwargs["encoder_hidden_states"], self.concept_tokens.to(video.device),
                kwargs.get("attention_mask"), kwargs.get("image_rotary_emb"), self.chunk_size)
            self._sum = attention if self._sum is None else self._sum + attention
            self._blocks_seen += 1
            return
        # CogVideoXBlock calls attn1 by keyword only.
        attention = concept_attention(
            attn,
            kwargs["hidden_states"],
            kwargs["encoder_hidden_states"],
            self.concept_tokens.to(kwargs["hidden_states"].device),
            kwargs.get("image_rotary_emb"),
            self.chunk_size,
        )
        self._sum = attention if self._sum is None else self._sum + attention
        self._blocks_seen += 1

    def normalized(self) -> torch.Tensor:
        """Concept attention averaged over blocks, min-max normalised per latent frame: fp32 [B, N_video].

        A frame whose attention is constant (e.g. a prompt without the concept) is all zeros.
        """
        if self._sum is None:
            raise LowmemEraserError("no attention was captured: run the transformer inside the `with` block")
        attention = self._sum / self._blocks_seen
        batch, n_video = attention.shape
        if n_video % self.token_frames:
            raise LowmemEraserError(f"{n_video} video tokens do not split into {self.token_frames} latent frames")
        frames = attention.view(batch, self.token_frames, -1)
        low = frames.amin(-1, keepdim=True)
        spread = frames.amax(-1, keepdim=True) - low
        normalized = torch.where(spread > 0, (frames - low) / spread.clamp_min(torch.finfo(frames.dtype).tiny), 0.0)
        return normalized.view(batch, n_video)

    def mask(self, threshold: float) -> torch.Tensor:
        """Binary M (Receler's convention): 1 where the normalised concept attention >= threshold; fp32 [B, N_video]."""
        return (self.normalized() >= threshold).float()


def localization_loss(delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean((delta ⊙ (1 − M))²) over tokens and channels for one layer: fp32 scalar.

    `delta` [B, N_video, dim] is the adapter output of one block, `mask` M [B, N_video]. The caller averages
    over layers. The product stays in delta's dtype (M is binary, so exact) and only the mean is fp32.
    """
    if mask.shape != delta.shape[:2]:
        raise LowmemEraserError(
            f"mask has shape {tuple(mask.shape)}, expected {tuple(delta.shape[:2])} (batch, video tokens)"
        )
    keep_out = (1 - mask).to(device=delta.device, dtype=delta.dtype)[..., None]
    return (delta * keep_out).square().mean(dtype=torch.float32)

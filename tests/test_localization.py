import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from conftest import run, tiny_inputs, tiny_transformer
from lowmem_eraser import LowmemEraserError
from lowmem_eraser.localization import (
    ConceptMaskCapture,
    concept_attention,
    concept_token_mask,
    localization_loss,
)

FRAMES, TOKENS_PER_FRAME, TEXT_LEN = 3, 16, 7  # tiny inputs: 3 latent frames of 8×8, patch 2
CONCEPT = torch.tensor([[0, 0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 1, 0]], dtype=torch.bool)


def tiny_rotary_emb():
    """What CogVideoXPipeline passes for a 4×4 patch grid of 3 frames (the model does not build it itself)."""
    return get_3d_rotary_pos_embed(embed_dim=16, crops_coords=((0, 0), (4, 4)), grid_size=(4, 4), temporal_size=3)


def record_sdpa(monkeypatch):
    """Record the q and k that the attention processor itself hands to SDPA."""
    seen, sdpa = [], F.scaled_dot_product_attention

    def recording(query, key, *args, **kwargs):
        seen.append((query.detach().clone(), key.detach().clone()))
        return sdpa(query, key, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    return seen


def naive_normalized(seen, concept):
    """Full fp64 softmax over all [text + video]² logits, then mean over heads and blocks and per-frame min-max."""
    per_block = []
    for query, key in seen:
        query, key = query.double(), key.double()
        probs = torch.softmax(query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5, dim=-1)
        assert probs.shape[-1] == TEXT_LEN + FRAMES * TOKENS_PER_FRAME
        video_to_concept = probs[:, :, TEXT_LEN:, :TEXT_LEN] * concept[:, None, None, :].double()
        per_block.append(video_to_concept.sum(-1).mean(1))
    attention = torch.stack(per_block).mean(0).view(len(concept), FRAMES, TOKENS_PER_FRAME)
    low, high = attention.amin(-1, keepdim=True), attention.amax(-1, keepdim=True)
    return ((attention - low) / (high - low)).view(len(concept), -1)


@pytest.mark.parametrize("rotary", [False, True], ids=["sincos", "rotary"])
def test_chunked_mask_equals_full_attention(monkeypatch, rotary):
    transformer = tiny_transformer(use_rotary_positional_embeddings=rotary)
    latents, text, timestep = tiny_inputs(batch=2)
    image_rotary_emb = tiny_rotary_emb() if rotary else None
    seen = record_sdpa(monkeypatch)
    # chunk 5 divides neither the 48 video queries nor the 55 keys
    with torch.no_grad(), ConceptMaskCapture(transformer, CONCEPT, num_frames=FRAMES, chunk_size=5) as capture:
        transformer(latents, text, timestep, image_rotary_emb=image_rotary_emb, return_dict=False)
    assert len(seen) == 2  # one joint attention per block

    expected = naive_normalized(seen, CONCEPT)
    torch.testing.assert_close(capture.normalized().double(), expected, rtol=0, atol=1e-4)
    threshold = 0.5
    clear = (expected - threshold).abs() > 1e-4  # tokens not on the edge of the threshold
    assert clear.float().mean() > 0.9
    torch.testing.assert_close(capture.mask(threshold)[clear], (expected >= threshold).float()[clear])
    assert 0 < capture.mask(threshold).sum() < capture.mask(threshold).numel()


def test_rotary_embeddings_change_the_mask():
    transformer = tiny_transformer(use_rotary_positional_embeddings=True)
    latents, text, timestep = tiny_inputs(batch=2)
    maps = []
    for image_rotary_emb in (None, tiny_rotary_emb()):
        with torch.no_grad(), ConceptMaskCapture(transformer, CONCEPT, num_frames=FRAMES) as capture:
            transformer(latents, text, timestep, image_rotary_emb=image_rotary_emb, return_dict=False)
        maps.append(capture.normalized())
    assert (maps[0] - maps[1]).abs().max() > 1e-2


def test_concept_attention_is_independent_of_chunk_size():
    torch.manual_seed(0)
    attn = tiny_transformer(use_rotary_positional_embeddings=True).transformer_blocks[0].attn1
    video, text = torch.randn(2, 48, 32), torch.randn(2, TEXT_LEN, 32)
    whole = concept_attention(attn, video, text, CONCEPT, tiny_rotary_emb(), chunk_size=1000)
    tiled = concept_attention(attn, video, text, CONCEPT, tiny_rotary_emb(), chunk_size=7)
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-7)
    assert whole.shape == (2, 48) and (whole > 0).all() and (whole < 1).all()
    with pytest.raises(LowmemEraserError, match="concept token mask has shape"):
        concept_attention(attn, video, text, CONCEPT[:, :5])


def test_every_frame_is_min_max_normalised():
    transformer = tiny_transformer()
    with torch.no_grad(), ConceptMaskCapture(transformer, CONCEPT, num_frames=FRAMES, chunk_size=16) as capture:
        run(transformer, tiny_inputs(batch=2))
    frames = capture.normalized().view(2, FRAMES, TOKENS_PER_FRAME)
    torch.testing.assert_close(frames.amax(-1), torch.ones(2, FRAMES))
    torch.testing.assert_close(frames.amin(-1), torch.zeros(2, FRAMES))
    assert capture.mask(0.0).eq(1).all()


def test_prompt_without_concept_gives_an_empty_mask_and_hooks_are_removed():
    transformer = tiny_transformer()
    absent = torch.zeros(1, TEXT_LEN, dtype=torch.bool)
    with torch.no_grad(), ConceptMaskCapture(transformer, absent, num_frames=FRAMES) as capture:
        run(transformer, tiny_inputs())
    assert capture.mask(0.1).eq(0).all()
    assert all(not block.attn1._forward_hooks for block in transformer.transformer_blocks)
    with pytest.raises(LowmemEraserError, match="no attention was captured"):
        ConceptMaskCapture(transformer, absent, num_frames=FRAMES).normalized()


def test_wrong_frame_count_is_reported():
    transformer = tiny_transformer()
    with torch.no_grad(), ConceptMaskCapture(transformer, CONCEPT[:1], num_frames=5) as capture:
        run(transformer, tiny_inputs())
    with pytest.raises(LowmemEraserError, match="48 video tokens do not split into 5 latent frames"):
        capture.mask(0.1)


def test_localization_loss_matches_hand_computation():
    delta = torch.tensor([[[1.0, 2.0], [3.0, -4.0], [0.5, 0.0]]])  # [1, 3 tokens, 2 channels]
    mask = torch.tensor([[1.0, 0.0, 0.0]])  # only token 0 belongs to the concept
    assert localization_loss(delta, mask).item() == pytest.approx((9 + 16 + 0.25) / 6)
    assert localization_loss(delta, torch.ones(1, 3)).item() == 0
    loss = localization_loss(delta.bfloat16(), mask)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx((9 + 16 + 0.25) / 6)
    with pytest.raises(LowmemEraserError, match="mask has shape"):
        localization_loss(delta, mask[:, :2])


def test_localization_loss_gradient_reaches_only_tokens_outside_the_mask():
    delta = torch.randn(2, 4, 3, requires_grad=True)
    mask = torch.tensor([[1.0, 0, 0, 1], [0, 0, 0, 0]])
    localization_loss(delta, mask).backward()
    assert delta.grad[mask.bool()].eq(0).all()
    torch.testing.assert_close(delta.grad[~mask.bool()], 2 * delta.detach()[~mask.bool()] / delta.numel())


WORDS = ["<pad>", "</s>", "<unk>", "a", "nude", "naked", "woman", "walks", "figure", "in", "the", "rain", "cat", "Nude"]


def word_tokenizer(lowercase: bool) -> PreTrainedTokenizerFast:
    """An offline T5-like word tokenizer: appends </s>, pads with <pad>."""
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="<unk>"))
    if lowercase:
        backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


class SlowTokenizer:
    """The same tokenizer seen as a slow one (no offsets), like transformers 4's sentencepiece T5Tokenizer."""

    is_fast = False

    def __init__(self, fast):
        self.fast, self.unk_token_id = fast, fast.unk_token_id

    def __call__(self, text, return_offsets_mapping=False, **kwargs):
        assert not return_offsets_mapping
        return self.fast(text, **kwargs)


PROMPTS = ["a nude woman walks", "Nude figure in the rain", "a cat in the rain"]


@pytest.mark.parametrize("make", [lambda: word_tokenizer(lowercase=True), lambda: SlowTokenizer(word_tokenizer(False))])
def test_concept_token_mask_finds_the_concept_in_any_case(make):
    mask = concept_token_mask(make(), PROMPTS, "nude", max_length=8)
    assert mask.dtype == torch.bool and mask.shape == (3, 8)
    assert mask[0].nonzero().flatten().tolist() == [1]
    assert mask[1].nonzero().flatten().tolist() == [0]
    assert not mask[2].any()  # absent: the caller warns


def test_concept_token_mask_multi_word_truncation_and_padding():
    tokenizer = word_tokenizer(lowercase=True)
    mask = concept_token_mask(tokenizer, ["the naked woman walks", "a cat in the naked woman"], "Naked  Woman", 5)
    assert mask.tolist() == [[False, True, True, False, False], [False] * 5]  # 2nd: truncated away
    assert concept_token_mask(tokenizer, ["a womanly cat"], "woman", 4).tolist() == [[False, True, False, False]]
    assert not concept_token_mask(tokenizer, ["the rain"], "ain", 4).any()  # matches start at a word start
    with pytest.raises(LowmemEraserError, match="concept"):
        concept_token_mask(tokenizer, PROMPTS, " ", 8)

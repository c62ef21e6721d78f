"""Tiny model folders built offline from configs (real diffusers/transformers classes, random weights).

No model hub is reachable here, so tests and the toy world build their own `from_pretrained` folders:
a word-level tokenizer (T5's own needs a downloaded vocabulary), a small T5 (CogVideoX) or UMT5 (Wan) encoder,
a small `CogVideoXTransformer3DModel` / `WanTransformer3DModel` and the family's scheduler. The VAE is left out
unless asked for: training never needs it.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

TINY_TRANSFORMER = dict(
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    time_embed_dim=32,
    text_embed_dim=24,
    num_layers=2,
    sample_width=8,
    sample_height=8,
    sample_frames=9,
    patch_size=2,
    max_text_seq_length=12,
)


def word_level_tokenizer(words: list[str], max_length: int):
    """A lower-casing word-level tokenizer with T5's special tokens (<pad>=0, </s>=1, <unk>=2)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(set(words) - set(specials)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )


def words_of(texts: list[str]) -> list[str]:
    return sorted({word for text in texts for word in re.findall(r"\w+|[^\w\s]", text.lower())})


def build_tiny_cogvideox(
    folder: str | Path, texts: list[str], seed: int = 0, with_vae: bool = False, **transformer_overrides
) -> Path:
    """Write a tiny CogVideoX folder (transformer/, text_encoder/, tokenizer/, scheduler/, and vae/ if asked)
    whose vocabulary covers the words of `texts`; returns the folder."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    config = {**TINY_TRANSFORMER, **transformer_overrides}
    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = word_level_tokenizer(words_of(texts), config["max_text_seq_length"])
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=config["text_embed_dim"],
            d_kv=8,
            d_ff=48,
            num_layers=1,
            num_heads=2,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    transformer = CogVideoXTransformer3DModel(**config)
    scheduler = CogVideoXDDIMScheduler(
        prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"
    )
    tokenizer.save_pretrained(folder / "tokenizer")
    text_encoder.save_pretrained(folder / "text_encoder")
    transformer.save_pretrained(folder / "transformer")
    scheduler.save_pretrained(folder / "scheduler")
    if with_vae:  # 8x spatial, 4x temporal compression like the real VAE, 65k parameters
        AutoencoderKLCogVideoX(
            latent_channels=config["in_channels"],
            down_block_types=("CogVideoXDownBlock3D",) * 4,
            up_block_types=("CogVideoXUpBlock3D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            norm_num_groups=2,
        ).save_pretrained(folder / "vae")
    return folder


TINY_WAN = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    text_dim=24,
    freq_dim=16,
    ffn_dim=64,
    num_layers=2,
    cross_attn_norm=True,
    rope_max_seq_len=32,
)
TINY_WAN_TEXT_LENGTH = 12  # the tests' max_sequence_length; the real pipeline pads to 512


def build_tiny_wan(folder: str | Path, texts: list[str], seed: int = 0, with_vae: bool = False,
                   text_gain: float = 1.0, **transformer_overrides) -> Path:
    """Write a tiny Wan2.1 folder (transformer/, text_encoder/ UMT5, tokenizer/, scheduler/ flow matching with
    Wan's shift, and vae/ AutoencoderKLWan if asked) whose vocabulary covers the words of `texts`.

    `text_gain` multiplies the cross-attentions' output projections: at random init the text moves Wan's
    prediction by ~0.2 % (a trained model's prompt decides the video), too little for a test to see erasure."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    config = {**TINY_WAN, **transformer_overrides}
    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = word_level_tokenizer(words_of(texts), TINY_WAN_TEXT_LENGTH)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=config["text_dim"], d_kv=8, d_ff=48, num_layers=1, num_heads=2,
        pad_token_id=0, eos_token_id=1, feed_forward_proj="gated-gelu"))
    tokenizer.save_pretrained(folder / "tokenizer")
    text_encoder.save_pretrained(folder / "text_encoder")
    transformer = WanTransformer3DModel(**config)
    with torch.no_grad():
        for block in transformer.blocks:
            block.attn2.to_out[0].weight.mul_(text_gain)
    transformer.save_pretrained(folder / "transformer")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(folder / "scheduler")  # Wan2.1 480p's flow shift
    if with_vae:  # 8x spatial, 4x temporal like the real VAE
        z_dim = config["in_channels"]
        AutoencoderKLWan(base_dim=8, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                         temperal_downsample=[False, True, True], latents_mean=[0.0] * z_dim,
                         latents_std=[1.0] * z_dim).save_pretrained(folder / "vae")
    return folder


TINY_HUNYUAN = dict(
    in_channels=4,
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=16,
    num_layers=1,
    num_single_layers=2,
    num_refiner_layers=1,
    mlp_ratio=2.0,
    patch_size=2,
    patch_size_t=1,
    guidance_embeds=True,  # the published model is guidance-distilled
    text_embed_dim=24,
    pooled_projection_dim=8,
    rope_axes_dim=(4, 6, 6),
)
LLAMA_SPECIALS = ["<|end_of_text|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                  "<unk>"]


def _llama_like_tokenizer(words: list[str]):
    """Word-level, <|begin_of_text|> first like LLaMA 3's, pads with <|end_of_text|> (id 0); the template's
    header tokens are single special tokens, as in LLaMA 3."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(LLAMA_SPECIALS + sorted(set(words) - set(LLAMA_SPECIALS)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA_SPECIALS])
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[("<|begin_of_text|>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                   eos_token="<|end_of_text|>", pad_token="<|end_of_text|>", unk_token="<unk>",
                                   model_max_length=1024)


def build_tiny_hunyuan(folder: str | Path, texts: list[str], seed: int = 0, with_vae: bool = False,
                       **transformer_overrides) -> Path:
    """Write a tiny HunyuanVideo folder: transformer/, text_encoder/ (LlamaModel) + tokenizer/ (LLaMA-3-like,
    covering the words of the pipeline's prompt template and of `texts`), text_encoder_2/ (CLIPTextModel) +
    tokenizer_2/, scheduler/ (flow matching, HunyuanVideo's shift 7), vae/ (AutoencoderKLHunyuanVideo) if asked."""
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoTransformer3DModel
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    config = {**TINY_HUNYUAN, **transformer_overrides}
    folder = Path(folder)
    torch.manual_seed(seed)
    template = DEFAULT_PROMPT_TEMPLATE["template"]
    for special in LLAMA_SPECIALS:
        template = template.replace(special, " ")
    tokenizer = _llama_like_tokenizer(words_of([template, *texts]))
    text_encoder = LlamaModel(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config["text_embed_dim"], intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024, pad_token_id=0))
    tokenizer_2 = word_level_tokenizer(words_of(texts), 77)
    text_encoder_2 = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer_2), hidden_size=config["pooled_projection_dim"], intermediate_size=16,
        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77, pad_token_id=0, bos_token_id=2,
        eos_token_id=1))  # pooled = the hidden state at </s> (id 1)
    tokenizer.save_pretrained(folder / "tokenizer")
    text_encoder.save_pretrained(folder / "text_encoder")
    tokenizer_2.save_pretrained(folder / "tokenizer_2")
    text_encoder_2.save_pretrained(folder / "text_encoder_2")
    HunyuanVideoTransformer3DModel(**config).save_pretrained(folder / "transformer")
    FlowMatchEulerDiscreteScheduler(shift=7.0).save_pretrained(folder / "scheduler")
    if with_vae:  # 8x spatial, 4x temporal like the real VAE
        AutoencoderKLHunyuanVideo(
            latent_channels=config["in_channels"], down_block_types=("HunyuanVideoDownBlock3D",) * 4,
            up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
            norm_num_groups=2).save_pretrained(folder / "vae")
    return folder


def build_tiny_clip(folder: str | Path, texts: list[str], seed: int = 0) -> Path:
    """A tiny CLIP folder (model, word-level tokenizer over the words of `texts`, image processor at 32x32) that
    `eval --clip` loads as it loads a real one."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = word_level_tokenizer(words_of(texts), 16)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, pad_token_id=0, bos_token_id=0,
                         eos_token_id=1),  # the tokenizer's </s>: where CLIP pools the text
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder

"""`lowmem-eraser plan`: predict the peak GPU memory of a training step, on a CPU, before renting the GPU.

The transformer is built from its config under FakeTensorMode (shapes and dtypes, no weights, no GPU) and
the training step itself (`train.eraser_losses_backward`, the same function the trainer runs) is executed on
fake CPU tensors while a LiveTensorTracker counts the bytes of live storages and a FLOP counter adds up
matmul and attention FLOPs. Fake *CPU* tensors on purpose: SDPA on `meta` takes the math path and would
predict a 30 GB attention matrix, and fake CUDA tensors abort the process (SPEC §5).

Three shortcuts keep 5b at 49×480×720 within a minute on a CPU; tests/test_plan.py checks the result
against the live-tensor peak of the same step run for real on the full-depth model:
- depth: every block is identical, so the step is simulated on copies of the model with 2 and 3 blocks and
  the peak and FLOPs are extrapolated linearly to the real depth (the per-block term is the activations
  or checkpoints each block keeps, plus its adapter gradients);
- weights are counted, not simulated: each setting adds its resident weights to the simulated step; for
  streamed blocks (`memory.offload`) those are the weights outside them plus the (at most) two device slots
  `BlockOffloader` allocates (the real offloader needs real storage, so its effect is modelled, not run); with the Triton
  int8 kernel an int8 step keeps what a bf16 step keeps, so one simulation serves both (see Predictor);
- batch: activations are linear in the batch, so batch > 1 is extrapolated from batches 1 and 2.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import yaml
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .activation_offload import offload_activations
from .adapter import attach_erasers
from .attack import AdversarialPrompts, SoftPrompt
from .config import EraserConfig, LossConfig, MemoryConfig, SamplingConfig, TrainConfig, VideoConfig
from .errors import LowmemEraserError, PlanError  # noqa: F401  (PlanError importable from here too)
from .memory import LiveTensorTracker, pinned_allocation_bytes, tensor_bytes
from .loading import folder_json
from .offload import aligned_bytes
from .quantize import quantize_base
from .sampling import latent_frames, make_pipeline, rotary_embeddings
from .stages import (  # noqa: F401 -- default_dtype is also used from here by bench/ and tests
    ALLOCATOR_SLACK, CLIP_L_TEXT, LLAVA_LLAMA3_8B, SIM_DEPTHS, T5_XXL, UMT5_XXL, CUDA_CONTEXT_BYTES, Stage,
    TextEncoder, default_dtype, needed_bytes, text_encoder_config, text_encoders, text_stage,
    vae_bytes, vae_config, vae_decode_peak,
)
from .train import StepInputs, eraser_losses_backward, velocity

_WAN_2_1 = dict(  # the WanTransformer3DModel arguments every Wan preset shares (sources: Preset.source)
    patch_size=[1, 2, 2], attention_head_dim=128, text_dim=4096, freq_dim=256, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024, in_channels=16, out_channels=16,
)


@dataclass(frozen=True)
class Preset:
    """Everything the planner needs to know about a published model, as data: its transformer's config (the
    diffusers class's arguments that differ from its defaults), the pipeline's default video, its text encoders,
    its VAE and the folder name a config points at."""

    family: str  # families/ name
    transformer_class: str
    transformer: dict
    video: tuple[int, int, int]  # (frames, height, width) the pipeline generates by default
    text: tuple[TextEncoder, ...]
    vae: dict  # the VAE's config, `_class_name` included (none: AutoencoderKLCogVideoX)
    folder: str  # models/<folder> in a written config
    vae_scale: int = 8  # pixels per latent, spatially
    expand_timesteps: bool = False  # Wan2.2 TI2V: the pipeline passes one timestep per video token [B, tokens]
    source: str = ""


MODEL_PRESETS: dict[str, Preset] = {
    # THUDM/CogVideoX-{2b,5b} transformer/config.json; everything else is CogVideoXTransformer3DModel's defaults
    # (text_embed_dim 4096, max_text_seq_length 226, in/out channels 16, patch 2, time_embed_dim 512).
    "cogvideox-2b": Preset(
        "CogVideoX", "CogVideoXTransformer3DModel",
        dict(num_attention_heads=30, attention_head_dim=64, num_layers=30), (49, 480, 720),
        (TextEncoder(T5_XXL, 226),), {}, "CogVideoX-2b", source="THUDM/CogVideoX-2b"),
    "cogvideox-5b": Preset(
        "CogVideoX", "CogVideoXTransformer3DModel",
        dict(num_attention_heads=48, attention_head_dim=64, num_layers=42, use_rotary_positional_embeddings=True),
        (49, 480, 720), (TextEncoder(T5_XXL, 226),), {}, "CogVideoX-5b", source="THUDM/CogVideoX-5b"),
    # Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json; the same numbers in the original repo's
    # wan/configs/wan_t2v_1_3B.py (dim 1536 = 12 x 128, ffn 8960, 30 layers, freq 256, eps 1e-6, qk and cross-attn
    # norm) and in diffusers' scripts/convert_wan_to_diffusers.py. 480P default 81 x 480 x 832 (WanPipeline's
    # height 480, width 832, num_frames 81). UMT5-XXL prompts padded to 512 tokens (text_len 512).
    "wan2.1-1.3b": Preset(
        "Wan", "WanTransformer3DModel",
        dict(_WAN_2_1, num_attention_heads=12, ffn_dim=8960, num_layers=30), (81, 480, 832),
        (TextEncoder(UMT5_XXL, 512, name="UMT5-XXL"),), {"_class_name": "AutoencoderKLWan"},
        "Wan2.1-T2V-1.3B-Diffusers", source="Wan-AI/Wan2.1-T2V-1.3B-Diffusers; wan/configs/wan_t2v_1_3B.py"),
    # Wan-AI/Wan2.1-T2V-14B-Diffusers; wan/configs/wan_t2v_14B.py: dim 5120 = 40 x 128, ffn 13824, 40 layers.
    "wan2.1-14b": Preset(
        "Wan", "WanTransformer3DModel",
        dict(_WAN_2_1, num_attention_heads=40, ffn_dim=13824, num_layers=40), (81, 480, 832),
        (TextEncoder(UMT5_XXL, 512, name="UMT5-XXL"),), {"_class_name": "AutoencoderKLWan"},
        "Wan2.1-T2V-14B-Diffusers", source="Wan-AI/Wan2.1-T2V-14B-Diffusers; wan/configs/wan_t2v_14B.py"),
    # Wan-AI/Wan2.2-TI2V-5B-Diffusers; Wan2.2's wan/configs/wan_ti2v_5B.py: dim 3072 = 24 x 128, ffn 14336,
    # 30 layers, vae_stride (4, 16, 16), frame_num 121, size 1280*704; in/out channels 48 (the VAE's z_dim).
    # Its VAE (vae/config.json, also diffusers' scripts/convert_wan_to_diffusers.py `vae22_diffusers_config`):
    # AutoencoderKLWan base_dim 160, decoder_base_dim 256, z_dim 48, in/out channels 12 (RGB patchified 2x2),
    # patch_size 2, is_residual, scale_factor_spatial 16, scale_factor_temporal 4. model_index.json sets
    # expand_timesteps: the pipeline gives the transformer one timestep per video token.
    "wan2.2-ti2v-5b": Preset(
        "Wan", "WanTransformer3DModel",
        dict(_WAN_2_1, num_attention_heads=24, ffn_dim=14336, num_layers=30, in_channels=48, out_channels=48),
        (121, 704, 1280), (TextEncoder(UMT5_XXL, 512, name="UMT5-XXL"),),
        {"_class_name": "AutoencoderKLWan", "base_dim": 160, "decoder_base_dim": 256, "z_dim": 48,
         "in_channels": 12, "out_channels": 12, "patch_size": 2, "is_residual": True, "scale_factor_spatial": 16,
         "scale_factor_temporal": 4, "latents_mean": [0.0] * 48, "latents_std": [1.0] * 48},
        "Wan2.2-TI2V-5B-Diffusers", vae_scale=16, expand_timesteps=True,
        source="Wan-AI/Wan2.2-TI2V-5B-Diffusers; Wan2.2 wan/configs/wan_ti2v_5B.py"),
    # hunyuanvideo-community/HunyuanVideo transformer/config.json = HunyuanVideoTransformer3DModel's defaults
    # (in/out 16, 24 heads x 128, 20 dual-stream + 40 single-stream blocks, 2 refiner layers, mlp_ratio 4, patch
    # 2 x 2 x 1, rms_norm, guidance_embeds, text_embed_dim 4096, pooled 768, rope_theta 256, rope axes 16/56/56;
    # the official repo: mm_double_blocks_depth 20, mm_single_blocks_depth 40, rope_dim_list [16, 56, 56]).
    # HunyuanVideoPipeline: the LLaMA prompt template's first 95 tokens are cropped (crop_start 95) from
    # max_sequence_length 256 + 95 tokens, the third-last hidden layer is read (num_hidden_layers_to_skip 2);
    # CLIP-L gives the pooled 768; guidance-distilled (guidance_scale enters as an embedding, true_cfg_scale 1:
    # one forward per step). Default video: the report's 61 x 544 x 960 (the pipeline's own is 129 x 720 x 1280).
    "hunyuanvideo": Preset(
        "HunyuanVideo", "HunyuanVideoTransformer3DModel",
        dict(num_layers=20, num_single_layers=40, num_refiner_layers=2), (61, 544, 960),
        (TextEncoder(LLAVA_LLAMA3_8B, 256 + 95, hidden_states=True, name="LLaMA-3-8B"),
         TextEncoder(CLIP_L_TEXT, 77, name="CLIP-L")),
        {"_class_name": "AutoencoderKLHunyuanVideo"}, "HunyuanVideo",
        source="hunyuanvideo-community/HunyuanVideo; Tencent/HunyuanVideo"),
}
# The transformer config of each preset (what `transformer_config` returns for it).
PRESETS = {name: preset.transformer for name, preset in MODEL_PRESETS.items()}
GiB = 2**30
_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str, name: str = "--budget") -> int:
    """'24GB', '24 GiB', '24g', '16000MB' -> bytes. Units are binary: a "24 GB" card holds 24 GiB."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", str(text), flags=re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise PlanError(f"{name}: expected a positive size like 24GB, 16GiB or 12000MB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def preset_name(model: str | Path | None) -> str | None:
    """The preset `model` stands for: a preset name, or a folder not downloaded yet whose name is one or is the
    preset's folder name (`models/CogVideoX-5b`, `THUDM/CogVideoX-2b`, `models/Wan2.1-T2V-14B-Diffusers`:
    planning happens before the download)."""
    if model is None:
        return None
    if str(model) in PRESETS:
        return str(model)
    name = Path(model).name.lower()
    if (Path(model) / "transformer" / "config.json").is_file():
        return None
    return next((key for key, preset in MODEL_PRESETS.items() if name in (key, preset.folder.lower())), None)


def transformer_config(model: str | Path) -> tuple[dict, str]:
    """(transformer config, display name) of a preset name or a local diffusers folder (CogVideoX, Wan or
    HunyuanVideo; `transformer_class` says which)."""
    preset = preset_name(model)
    if preset is not None:
        return dict(PRESETS[preset]), preset
    path = Path(model) / "transformer" / "config.json"
    if not path.is_file():
        raise PlanError(
            f"--model: {model!r} is neither a preset ({', '.join(PRESETS)}) nor a folder with transformer/config.json"
        )
    config = json.loads(path.read_text())
    name = config.get("_class_name", "CogVideoXTransformer3DModel")
    if name not in ARCHITECTURES:
        raise PlanError(f"--model: {path} describes a {name}, not one of {', '.join(ARCHITECTURES)}")
    return {k: v for k, v in config.items() if not k.startswith("_")}, str(model)


def transformer_class(model: str | Path) -> str:
    """The diffusers transformer class of a preset or a local folder."""
    preset = preset_name(model)
    if preset is not None:
        return MODEL_PRESETS[preset].transformer_class
    path = Path(model) / "transformer" / "config.json"
    return json.loads(path.read_text()).get("_class_name", "CogVideoXTransformer3DModel")


def check_video(frames: int, height: int, width: int, model: str | Path | None = None) -> VideoConfig:
    """The video size, with errors that name the command-line option. CogVideoX (and no model): 8k+1 frames, a
    multiple of 16 pixels; Wan and HunyuanVideo: 4k+1 frames (their VAEs compress
    time 4x), a multiple of VAE scale x patch (Wan2.2-TI2V-5B: 32)."""
    facts = model_facts(model) if model is not None else ModelFacts()
    arch = ARCHITECTURES[facts.transformer_class]
    step = facts.vae_scale * arch.spatial_patch
    rules = {"frames": (lambda v: v > 0 and v % arch.frame_step == 1, f"{arch.frame_step}k+1 (e.g. "
                        f"{arch.frame_step * 6 + 1})"),
             "height": (lambda v: v > 0 and v % step == 0, f"a positive multiple of {step}"),
             "width": (lambda v: v > 0 and v % step == 0, f"a positive multiple of {step}")}
    sizes = {"frames": frames, "height": height, "width": width}
    for name, value in sizes.items():
        holds, rule = rules[name]
        if not isinstance(value, int) or not holds(value):
            raise PlanError(f"--{name}: expected {rule}, got {value!r}")
    return VideoConfig(**sizes)


@dataclass(frozen=True)
class Setting:
    """One candidate memory setting: a rung of the memory ladder. Streaming blocks (`swap` of them, the first
    ones) and offloading activations both need checkpointing (backward re-fetches through recomputation)."""

    quantize: str = "int8"  # none | int8
    checkpointing: bool = True
    swap: int = 0  # blocks streamed through the two-slot ring (memory.offload)
    offload_activations: bool = False
    batch: int = 1

    @property
    def label(self) -> str:
        return (f"{self.quantize}, ckpt {'on' if self.checkpointing else 'off'}, swap {self.swap}, "
                f"act offload {'on' if self.offload_activations else 'off'}")

    def speed_rank(self) -> tuple:
        """Ties of the predicted step time (e.g. int8 vs bf16 resident: the same FLOPs): the one with less to
        go wrong first -- bf16 (int8 at best matches cuBLAS, bench/bench_kernels.py), fewer moving parts."""
        return (self.swap, self.offload_activations, self.checkpointing, self.quantize != "none", self.batch)

    def offload(self, depth: int) -> str | int:
        """The `memory.offload` value of this setting for a `depth`-block model."""
        return "none" if self.swap == 0 else "all" if self.swap >= depth else self.swap


def ladder(depth: int) -> tuple[Setting, ...]:
    """The candidate rungs at batch 1 with no or all blocks streamed; `make_plan` adds the partial swap that
    just fits the budget (the fewest streamed blocks: each streamed block costs transfer time)."""
    return tuple(
        Setting(quantize, checkpointing, swap, activations)
        for quantize in ("none", "int8")
        for checkpointing in (False, True)
        for swap in ((0, depth) if checkpointing else (0,))
        for activations in ((False, True) if checkpointing else (False,))
    )


@dataclass(frozen=True)
class Speeds:
    """The step-time model's two rates (stated in every plan; bench/gpu_check.sh measures both on a lent GPU).
    Defaults: an RTX 4090-class card at ~50 % of its 165 dense bf16 TFLOP/s, and pinned PCIe 4.0 x16 copies
    (~25 GB/s peak, ~20 sustained)."""

    tflops: float = 80.0  # achieved model TFLOP/s of the step's matmuls and attention
    h2d_gbps: float = 20.0  # host <-> device GB/s of pinned copies, each direction (PCIe is full duplex)


@dataclass
class Prediction:
    """Predicted device bytes of one setting: what stays resident, plus the tracked peak of the step."""

    setting: Setting
    weights: int  # transformer weights on the device (streamed blocks: two slots instead of them)
    adapter_state: int  # fp32 adapters + AdamW's two moments (the gradients are inside step_peak)
    inputs: int  # x_t, t, the three text embeddings, concept tokens, rotary embeddings
    step_peak: int  # LiveTensorTracker peak of one eraser_losses_backward call
    flops: int
    offloaded: int = 0  # activation bytes sent to the host per step (and brought back), offload_activations
    pinned: int = 0  # the activation offloader's host buffers (pooled across passes; pinned sizes round up)

    @property
    def peak(self) -> int:
        return self.weights + self.adapter_state + self.inputs + self.step_peak

    def fits(self, budget: int) -> bool:
        return needed_bytes(self.peak) <= budget


@dataclass(frozen=True)
class ModelFacts:
    """What the planner needs about a model besides its transformer config (a preset's, or a folder's)."""

    transformer_class: str = "CogVideoXTransformer3DModel"
    vae_scale: int = 8
    expand_timesteps: bool = False


def model_facts(model: str | Path) -> ModelFacts:
    """The ModelFacts of a preset name or a local folder (VAE scale from vae/config.json, expand_timesteps from
    model_index.json, when there)."""
    preset = preset_name(model)
    if preset is not None:
        p = MODEL_PRESETS[preset]
        return ModelFacts(p.transformer_class, p.vae_scale, p.expand_timesteps)
    transformer_config(model)  # a PlanError naming --model when it is neither a preset nor a model folder
    vae = vae_config(model, False) or {}
    index = folder_json(model, "model_index.json")
    return ModelFacts(transformer_class(model), int(vae.get("scale_factor_spatial", 8)),
                      bool(index.get("expand_timesteps", False)))


class Architecture:
    """How the planner builds, feeds and calls one diffusers transformer class: CogVideoX as the trainer does.
    A subclass per other class; the family facts themselves live in families/ and the presets above."""

    transformer_class = "CogVideoXTransformer3DModel"
    stack_keys: tuple[str, ...] = ("num_layers",)  # the config key of each repeated stack's depth, in order
    cfg_batched = True  # the sampling pipeline runs CFG as one forward at twice the batch
    cfg_note = "(CFG)"
    frame_step = 8  # frames are frame_step·k + 1 (as train's config checks for the family)
    spatial_patch = 2

    def counts(self, config: dict) -> tuple[int, ...]:
        defaults = {"num_layers": 30, "num_single_layers": 0}
        return tuple(int(config.get(key, defaults[key])) for key in self.stack_keys)

    def text_length(self, config: dict) -> int:
        return config.get("max_text_seq_length", 226)

    def text_dim(self, config: dict) -> int:
        return config.get("text_embed_dim", 4096)

    def step_inputs(self, transformer, video, batch, dtype, gen, facts: ModelFacts) -> StepInputs:
        """Random inputs of the shapes the trainer feeds (rotary embeddings built as the pipeline builds them)."""
        from diffusers import CogVideoXDDIMScheduler

        config = transformer.config
        frames = latent_frames(video.frames)
        shape = (batch, frames, config.in_channels, video.height // 8, video.width // 8)
        text_shape = (batch, config.max_text_seq_length, config.text_embed_dim)
        pipe = make_pipeline(transformer, CogVideoXDDIMScheduler())
        return StepInputs(
            x_t=torch.randn(shape, generator=gen).to(dtype),
            t=torch.randint(0, 1000, (batch,), generator=gen),
            c=torch.randn(text_shape, generator=gen).to(dtype),
            empty=torch.randn(text_shape, generator=gen).to(dtype),
            c_pre=torch.randn(text_shape, generator=gen).to(dtype),
            concept_tokens=_concept_tokens(batch, config.max_text_seq_length),
            extras=rotary_embeddings(pipe, video, torch.device("cpu")),
            frames=frames,
        )

    def velocity(self, transformer, x_t, t, text, extra):
        return velocity(transformer, x_t, t, text, extra)


def _concept_tokens(batch: int, length: int) -> torch.Tensor:
    tokens = torch.zeros(batch, length, dtype=torch.bool)
    tokens[:, 1:3] = True  # the concept is the prompt's 2nd and 3rd token
    return tokens


class WanArchitecture(Architecture):
    """WanTransformer3DModel as the Wan runtime calls it: latents [B, C, F, H, W], UMT5 text [B, 512, 4096],
    rotary embeddings inside the transformer; WanPipeline runs CFG as two batch-1 forwards."""

    transformer_class = "WanTransformer3DModel"
    cfg_batched = False
    cfg_note = "(CFG: two forwards, one after the other)"
    frame_step = 4

    def text_length(self, config: dict) -> int:
        return 512  # WanPipeline's max_sequence_length

    def text_dim(self, config: dict) -> int:
        return config.get("text_dim", 4096)

    def step_inputs(self, transformer, video, batch, dtype, gen, facts: ModelFacts) -> StepInputs:
        config = transformer.config
        frames = latent_frames(video.frames)
        height, width = video.height // facts.vae_scale, video.width // facts.vae_scale
        text_shape = (batch, self.text_length(config), self.text_dim(config))
        t = torch.randint(0, 1000, (batch,), generator=gen)
        if facts.expand_timesteps:  # WanPipeline (Wan2.2 TI2V): fp32 [B, tokens], one timestep per video token
            pt, ph, pw = config.patch_size
            tokens = frames // pt * (height // ph) * (width // pw)
            t = torch.full((1, tokens), 500.0).expand(batch, -1)
        return StepInputs(
            x_t=torch.randn((batch, config.in_channels, frames, height, width), generator=gen).to(dtype),
            t=t,
            c=torch.randn(text_shape, generator=gen).to(dtype),
            empty=torch.randn(text_shape, generator=gen).to(dtype),
            c_pre=torch.randn(text_shape, generator=gen).to(dtype),
            concept_tokens=_concept_tokens(batch, self.text_length(config)),
            extras=None,
            frames=frames,
        )


class HunyuanVideoArchitecture(Architecture):
    """HunyuanVideoTransformer3DModel as its runtime calls it (families/hunyuan_video.py): latents [B, 16, F, H, W],
    a HunyuanText condition (LLaMA text [B, 256, 4096], its mask, CLIP's pooled [B, 768]) and the embedded
    guidance (x 1000), passed where train passes its step extras."""

    transformer_class = "HunyuanVideoTransformer3DModel"
    stack_keys = ("num_layers", "num_single_layers")  # dual-stream blocks run first
    cfg_batched = False  # guidance-distilled: one forward per sampling step
    cfg_note = "(guidance embedded: one forward)"
    frame_step = 4

    def text_length(self, config: dict) -> int:
        return 256  # HunyuanVideoPipeline's max_sequence_length, after the template's crop

    def step_inputs(self, transformer, video, batch, dtype, gen, facts: ModelFacts) -> StepInputs:
        from .families.hunyuan_video import HunyuanText

        config = transformer.config
        frames = latent_frames(video.frames)
        shape = (batch, config.in_channels, frames, video.height // facts.vae_scale, video.width // facts.vae_scale)
        length = self.text_length(config)

        def text():
            return HunyuanText(torch.randn((batch, length, config.text_embed_dim), generator=gen).to(dtype),
                               torch.ones(batch, length, dtype=torch.long),  # the tokenizer's attention mask
                               torch.randn((batch, config.pooled_projection_dim), generator=gen).to(dtype))

        return StepInputs(
            x_t=torch.randn(shape, generator=gen).to(dtype),
            t=torch.randint(0, 1000, (batch,), generator=gen).to(dtype),
            c=text(),
            empty=text(),
            c_pre=text(),
            concept_tokens=_concept_tokens(batch, length),
            extras=6000.0 if config.guidance_embeds else None,  # guidance_scale 6 x 1000, as the pipeline passes it
            frames=frames,
        )


ARCHITECTURES: dict[str, Architecture] = {
    arch.transformer_class: arch for arch in (Architecture(), WanArchitecture(), HunyuanVideoArchitecture())
}


def architecture(transformer: nn.Module) -> Architecture:
    return ARCHITECTURES[type(transformer).__name__]


def step_inputs(
    transformer: nn.Module, video: VideoConfig, batch: int, dtype: torch.dtype, seed: int = 0,
    facts: ModelFacts | None = None,
) -> StepInputs:
    """Random inputs of the shapes the trainer feeds, for the transformer's class. Inside FakeTensorMode they are
    fake; the concept is the prompt's 2nd and 3rd token."""
    facts = facts or ModelFacts(type(transformer).__name__)
    gen = torch.Generator().manual_seed(seed)
    return architecture(transformer).step_inputs(transformer, video, batch, dtype, gen, facts)


def _cpu_flash_formulas() -> dict:
    """FLOP formulas (shape-wrapped, as in FlopCounterMode's registry) for the CPU flash-attention ops, which
    FlopCounterMode does not list: the same maths as the CUDA flash-attention ops."""
    from torch.utils import flop_counter

    aten = torch.ops.aten
    return {
        aten._scaled_dot_product_flash_attention_for_cpu: flop_counter.sdpa_flop,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: flop_counter.sdpa_backward_flop,
    }


class FlopCounter(TorchDispatchMode):
    """Matmul/convolution/attention FLOPs of the ops run inside, with FlopCounterMode's formulas.

    Not FlopCounterMode itself: its module tracker hooks every sub-module's inputs for backward, which
    keeps activations alive and defeats checkpointing, so peak memory could not be measured in the same pass.
    """

    def __init__(self):
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self.formulas = {**flop_registry, **_cpu_flash_formulas()}
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.formulas.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


def flop_counter_mode():
    """torch's FlopCounterMode, taught the CPU flash-attention ops (for a separate FLOPs-only pass)."""
    from torch.utils.flop_counter import FlopCounterMode

    mode = FlopCounterMode(display=False)
    mode.flop_registry.update(_cpu_flash_formulas())
    return mode


def measure_step(transformer: nn.Module, erasers, inputs: StepInputs, loss: LossConfig,
                 activations=None) -> tuple[int, int]:
    """(tracked peak bytes, FLOPs) of one eraser_losses_backward call, adapter gradients included.
    Works on real tensors (the tests' ground truth) and on fake ones (the prediction). `activations`: the
    activation offload context (emulated on real CPU tensors, simulated on fake ones)."""
    for param in erasers.parameters():
        param.grad = None
    adversarial = inputs.adversarial  # (Predictor.simulate: the vectors and latents a training step holds)
    if adversarial is None and loss.adversarial.every > 0:
        adversarial = AdversarialPrompts(SoftPrompt(loss.adversarial.tokens, 1))
    with FlopCounter() as counter, LiveTensorTracker() as tracker:
        eraser_losses_backward(transformer, erasers, replace(inputs, adversarial=adversarial), loss,
                               activations=activations)
    return tracker.peak_bytes, counter.flops


def build_transformer(config: dict, setting: Setting, dtype: torch.dtype,
                      model_class: str = "CogVideoXTransformer3DModel", **overrides) -> nn.Module:
    """A frozen transformer of `model_class` with random weights, quantised and checkpointed as `setting` says."""
    import diffusers

    with default_dtype(dtype):
        transformer = getattr(diffusers, model_class).from_config({**config, **overrides})
    transformer.requires_grad_(False)
    if setting.quantize != "none":
        quantize_base(transformer, backend=setting.quantize)
    if setting.checkpointing:
        transformer.enable_gradient_checkpointing()
    return transformer


def offloaded_bytes(offloader) -> int:
    """Bytes an activation offloader (activation_offload.py) sent to the host; 0 for the no-op context."""
    counters = getattr(offloader, "counters", None)
    return counters.bytes_to_host if counters is not None else 0


def _fake_erasers(transformer: nn.Module, rank: int, mode) -> object:
    """attach_erasers for a fake transformer: fake parameters cannot be `.to()`-converted, so the small fp32
    adapters are created for real outside the mode and then swapped for fake copies."""
    erasers = attach_erasers(transformer, rank=rank)
    for module in erasers.modules():
        for name, param in list(module._parameters.items()):
            module._parameters[name] = nn.Parameter(mode.from_tensor(param), requires_grad=True)
    return erasers


def block_sizes(transformer: nn.Module, counts: tuple[int, ...] | None = None, flat: bool = False) -> list[int]:
    """Bytes of every repeated block in execution order at `counts` blocks per stack (default: the model's own),
    from each stack's first block (blocks of a stack are identical). `flat`: the size of the block's flat buffer in
    BlockOffloader (`aligned_bytes` per tensor) instead of its tensor bytes."""
    from .families import family_of

    family = family_of(transformer)
    stacks = [getattr(transformer, name) for name in (family.stacks or (family.blocks,))]
    counts = counts or tuple(len(stack) for stack in stacks)
    sizes = []
    for stack, count in zip(stacks, counts):
        if count == 0:
            continue
        block = stack[0]
        size = (sum(aligned_bytes(t) for t in _unique([*block.parameters(), *block.buffers()])) if flat
                else tensor_bytes(block))
        sizes += [size] * count
    return sizes


def device_weight_bytes(transformer: nn.Module, swap: int = 0, depth: int | None = None,
                        counts: tuple[int, ...] | None = None) -> int:
    """Transformer bytes on the device at `counts` blocks per stack (or `depth` blocks of a one-stack model;
    default: the model's own), from identical blocks per stack. The first `swap` blocks in execution order are
    streamed and replaced by BlockOffloader's slots (two, or one per streamed block when fewer), each the size of
    the largest streamed block's flat buffer (`aligned_bytes` per tensor)."""
    if counts is None and depth is not None:
        counts = (depth,)
    own = block_sizes(transformer)
    outside = tensor_bytes(transformer) - sum(own)
    sizes, flat = block_sizes(transformer, counts), block_sizes(transformer, counts, flat=True)
    swap = min(swap, len(sizes))
    slot = max(flat[:swap], default=0)
    return outside + sum(sizes[swap:]) + min(swap, 2) * slot


def _unique(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return list({id(t.untyped_storage()): t for t in tensors}.values())


class Predictor:
    """Predictions for one model, video, rank and loss; simulated steps are cached across settings.

    `int8_backend` is the int8 implementation the prediction is for: "triton" (CUDA's default) never
    materialises a dequantised weight and saves only the int8 weight, so an int8 step's activations equal
    quantize none's and one simulation serves both; "int8" (the PyTorch path, used without Triton)
    dequantises each weight transiently, so its steps are simulated with int8 blocks of their own.

    `facts` says which transformer class `config` is for (CogVideoX by default) and what its pipeline feeds it.
    `sampling`: the run's sampling.mode (adversarial training's step differs between them).
    A model with several stacks of blocks (HunyuanVideo: dual- then single-stream) is simulated at 2 blocks per
    stack and, per stack, at 3 of that stack's blocks; each stack's per-block term is extrapolated to its depth.
    `text_config`: the text encoders (see stages.text_encoders; a dict is a T5 padded to the transformer's text
    length).
    """

    def __init__(self, config: dict, video: VideoConfig, rank: int, loss: LossConfig,
                 dtype: torch.dtype = torch.bfloat16, int8_backend: str = "triton",
                 text_config=None, vae_config: dict | None = None, speeds: Speeds = Speeds(),
                 offload_min_bytes: int | None = None, facts: ModelFacts = ModelFacts(), sampling: str = "renoise"):
        if int8_backend not in ("triton", "int8"):
            raise PlanError(f"int8_backend must be 'triton' or 'int8', got {int8_backend!r}")
        self.config, self.video, self.rank, self.loss, self.dtype = config, video, rank, loss, dtype
        self.int8_backend = int8_backend
        # sampling.mode: with `trajectory`, the adversarial term has latents of its own (train.draw_batch)
        self.own_adversarial_latents = loss.adversarial.every > 0 and sampling != "renoise"
        self.facts, self.arch = facts, ARCHITECTURES[facts.transformer_class]
        self.text_length = self.arch.text_length(config)
        self.text_config = text_encoders(text_config, self.text_length)
        self.vae_config = vae_config
        self.speeds = speeds
        # activation offload leaves smaller saved tensors alone (activation_offload.MIN_BYTES unless given)
        self.offload_options = {} if offload_min_bytes is None else {"min_bytes": offload_min_bytes}
        self.counts = self.arch.counts(config)
        self.depth = sum(self.counts)
        self._steps: dict[tuple, Prediction] = {}
        self._weights: dict[tuple[str, int], int] = {}
        self._forwards: dict[tuple, tuple[int, int]] = {}
        self._cached: dict[tuple, object] = {}

    # -- the simulated copies and the extrapolation to the real depth --------------------------------------------
    def _points(self, setting: Setting | None = None) -> tuple[tuple[int, ...], list[tuple[tuple[int, ...], int]]]:
        """(base counts, [(counts with one stack one block deeper, how many times its difference counts)]): the
        real counts alone when every stack is at most SIM_DEPTHS[1] deep.

        With activation offload one block more: backward holds the inputs of the block it recomputes and of the
        one before (prefetched), so the per-block slope only settles from 3 blocks on (Wan2.1-14B: 2 -> 3 blocks
        +0.31 GiB, 3 -> 4 +0.01 GiB; a (2, 3) extrapolation over-predicted 40 blocks by 11 GiB)."""
        low, high = SIM_DEPTHS
        if setting is not None and setting.offload_activations:
            low, high = low + 1, high + 1
        if all(n <= high for n in self.counts):
            return self.counts, []
        base = tuple(min(n, low) for n in self.counts)
        points = []
        for k, n in enumerate(self.counts):
            if n > base[k]:  # this stack one block deeper; its difference counts once per further block
                points.append((tuple(b + 1 if j == k else b for j, b in enumerate(base)), n - base[k]))
        return base, points

    def _build(self, setting: Setting, counts: tuple[int, ...]) -> nn.Module:
        return build_transformer(self.config, setting, self.dtype, self.facts.transformer_class,
                                 **dict(zip(self.arch.stack_keys, counts)))

    def _inputs(self, transformer: nn.Module, batch: int) -> StepInputs:
        """Random inputs of a training step; with adversarial training, the vectors each prompt starts from (fp32,
        as the loop keeps them) and, in trajectory runs, the adversarial term's latents (train.draw_batch)."""
        inputs = step_inputs(transformer, self.video, batch, self.dtype, facts=self.facts)
        adversarial = self.loss.adversarial
        if adversarial.every > 0:
            start = inputs.c[:, inputs.c.shape[1] - adversarial.tokens:].float().clone()
            x_t = inputs.x_t.clone() if self.own_adversarial_latents else None
            inputs = replace(inputs, adversarial=AdversarialPrompts(SoftPrompt(adversarial.tokens, 1), start, x_t=x_t))
        return inputs

    def simulate(self, setting: Setting, layers) -> Prediction:
        """One training step of a copy of the model with `layers` blocks (per stack: an int for one-stack models)
        on fake CPU tensors (weights not counted)."""
        from torch._subclasses.fake_tensor import FakeTensorMode

        counts = (layers,) if isinstance(layers, int) else tuple(layers)
        quantize = "int8" if setting.quantize == "int8" and self.int8_backend == "int8" else "none"
        key = (quantize, setting.checkpointing, setting.offload_activations, setting.batch, counts)
        if key not in self._steps:
            with FakeTensorMode() as mode:
                transformer = self._build(replace(setting, quantize=quantize), counts)
            erasers = _fake_erasers(transformer, self.rank, mode)
            erasers.kernels = "torch"  # the Triton kernels cannot run on fake tensors
            with mode:
                inputs = self._inputs(transformer, setting.batch)
                offloader = offload_activations(setting.offload_activations, "cpu", mode="simulate",
                                                **self.offload_options)
                step_peak, flops = measure_step(transformer, erasers, inputs, self.loss, activations=offloader)
            # fp32 adapters + AdamW's exp_avg and exp_avg_sq; their gradients are part of the step
            pool = offloader.counters.host_pool_bytes if setting.offload_activations else 0
            self._steps[key] = Prediction(setting, 0, 3 * tensor_bytes(erasers), inputs.nbytes, step_peak, flops,
                                          offloaded_bytes(offloader), pool)
        return replace(self._steps[key], setting=setting)

    def predict(self, setting: Setting) -> Prediction:
        """The setting's prediction at the model's real depth (see the module docstring for the shortcuts)."""
        if setting.batch > 2:
            one, two = (self.predict(replace(setting, batch=b)) for b in (1, 2))
            return _extrapolate(one, two, setting.batch - 1, setting)
        base, points = self._points(setting)
        step = self.simulate(setting, base)
        for counts, steps in points:
            step = _add_difference(step, self.simulate(setting, base), self.simulate(setting, counts), steps)
        return replace(step, weights=self.weights(setting))

    def _stack_compute(self, setting: Setting) -> list[float]:
        """Each block's share of the step's compute, in execution order (1.0 each for identical blocks), from each
        stack's per-block FLOPs in the simulated copies."""
        base, points = self._points(setting)
        if len(self.counts) == 1 or not points:
            return [1.0] * self.depth
        reference = self.simulate(setting, base).flops
        per_block = {}
        for counts, _ in points:
            k = next(j for j, (a, b) in enumerate(zip(counts, base)) if a != b)
            per_block[k] = (self.simulate(setting, counts).flops - reference) / (counts[k] - base[k])
        shares = [per_block.get(k, 0.0) for k, n in enumerate(self.counts) for _ in range(n)]
        mean = sum(shares) / len(shares)
        return [share / mean for share in shares] if mean > 0 else [1.0] * self.depth

    def weights(self, setting: Setting) -> int:
        """Device weight bytes of the setting, from a fake model with 1 block per stack."""
        from torch._subclasses.fake_tensor import FakeTensorMode

        key = (setting.quantize, setting.swap)
        if key not in self._weights:
            with FakeTensorMode():
                transformer = self._build(setting, tuple(1 for _ in self.counts))
                self._weights[key] = device_weight_bytes(transformer, setting.swap, counts=self.counts)
        return self._weights[key]

    def _passes(self, setting: Setting, average: bool = True) -> tuple[float, float, int]:
        """(frozen forwards, student forwards, forward-equivalents of one backward pass) of a step: on average
        over the run, or (`average=False`) in the simulated step. Adversarial training (`loss.adversarial`) adds
        the adversarial pass and its inner steps every `every` steps, each counted as a student pass (forward
        and backward: the inner steps' backward stops at the vectors' input gradients, so this is an upper bound),
        and, in trajectory runs, the original model's two predictions at the adversarial term's own latents; the
        simulated step has the adversarial pass and one inner step (measure_step)."""
        adversarial = self.loss.adversarial
        frozen, student = 2 + (self.loss.beta > 0 and self.loss.anchor == "empty"), 1 + (self.loss.beta > 0)
        if self.own_adversarial_latents:
            frozen += 2 / adversarial.every if average else 2
        if adversarial.every > 0:
            student += (1 + adversarial.inner_steps) / adversarial.every if average else 2
        return frozen, student, 3 if setting.checkpointing else 2

    def moved_bytes(self, setting: Setting) -> int:
        """Host<->device bytes of one step: every pass copies each streamed block, except the two a pass turned
        round on (BlockOffloader keeps them; tests/test_offload.py counts the same), plus the offloaded
        activations out and back."""
        frozen, student, _ = self._passes(setting)
        swap = min(setting.swap, self.depth)
        passes = frozen + student + (student if setting.checkpointing else 0)
        copies = max(0, passes * swap - 4 * student) if swap > 2 else 0
        streamed = sum(self._block_sizes(setting)[:swap])
        # the simulated step's offloaded bytes, scaled from its student passes to the run's average
        offloaded = self.predict(setting).offloaded * student / self._passes(setting, average=False)[1]
        return (int(copies * streamed) // swap if swap else 0) + int(2 * offloaded)

    def step_seconds(self, setting: Setting, speeds: Speeds) -> float:
        """Predicted seconds per training step: compute at `speeds.tflops`, streamed block weights and offloaded
        activations at `speeds.h2d_gbps`, each copy overlapped with the compute of the block it runs beside
        (per block: max(compute, copies in the same direction)).

        A step is F frozen forwards, S student forwards and, with checkpointing, S recomputation+backward passes
        of every block (3 forward-equivalents each: recompute, input grad, adapter grad); the FLOPs counted in
        the simulated step are spread over those passes and blocks (by each stack's per-block FLOPs). A streamed
        block is copied in every pass (host -> device); offloaded activations go device -> host in the student
        forwards (the other direction of the link) and come back host -> device in the backward passes, beside
        that pass's weight copies."""
        step = self.predict(setting)
        frozen, simulated, backward_units = self._passes(setting, average=False)
        units = frozen + simulated + backward_units * simulated
        per_unit = step.flops / (speeds.tflops * 1e12) / units / self.depth  # one block, one forward-equivalent
        bandwidth = speeds.h2d_gbps * 1e9
        swapped = min(setting.swap, self.depth)
        sizes = self._block_sizes(setting)
        activations = step.offloaded / simulated / self.depth / bandwidth  # one block's saved inputs, one pass
        frozen, student, _ = self._passes(setting)  # the run's average per step
        shares = self._stack_compute(setting)
        seconds = 0.0
        for passes, units_per_pass, down, up in (
            (frozen, 1, 0.0, 0.0),
            (student, 1, activations, 0.0),
            (student, backward_units, 0.0, activations),
        ):
            total = 0.0
            for i, share in enumerate(shares):
                compute = units_per_pass * per_unit * share
                weights = sizes[i] / bandwidth if (i < swapped and setting.swap > 2) else 0.0
                total += max(compute, weights + up, down) if i < swapped else max(compute, up, down)
            seconds += passes * total
        return seconds

    def _memo(self, key: tuple, make):
        if key not in self._cached:
            self._cached[key] = make()
        return self._cached[key]

    def _int8_simulated(self, setting: Setting) -> str:
        return "int8" if setting.quantize == "int8" and self.int8_backend == "int8" else "none"

    def forward_peak(self, setting: Setting, batch: int) -> tuple[int, int]:
        """(activation peak, input bytes) of one no-grad transformer forward at `batch` (a sampling step; with
        batched classifier-free guidance the caller doubles the batch), extrapolated to the real depth like the
        step. Simulated without adapters: in a no-grad pass an adapter's output is one [tokens, dim] tensor, freed
        as the block goes on (trajectory sampling runs with them on; x0 generation and infer with them off)."""
        from torch._subclasses.fake_tensor import FakeTensorMode

        quantize = self._int8_simulated(setting)
        base, points = self._points()
        peaks, inputs_bytes = {}, 0
        for counts in [base, *(c for c, _ in points)]:
            key = (quantize, batch, counts)
            if key not in self._forwards:
                with FakeTensorMode():
                    transformer = self._build(Setting(quantize, False), counts)
                    inputs = self._inputs(transformer, batch)
                    with torch.no_grad(), LiveTensorTracker() as tracker:
                        self.arch.velocity(transformer, inputs.x_t, inputs.t, inputs.c, inputs.extras)
                self._forwards[key] = (tracker.peak_bytes, inputs.nbytes)
            peaks[counts], inputs_bytes = self._forwards[key]
        peak = peaks[base] + sum(steps * (peaks[counts] - peaks[base]) for counts, steps in points)
        return peak, inputs_bytes

    def _block_sizes(self, setting: Setting) -> list[int]:
        """Every block's flat-buffer bytes (what streaming copies and pins), in execution order."""
        def make():
            from torch._subclasses.fake_tensor import FakeTensorMode

            with FakeTensorMode():
                transformer = self._build(replace(setting, swap=0), tuple(1 for _ in self.counts))
                return block_sizes(transformer, self.counts, flat=True)
        return self._memo(("blocks", setting.quantize), make)

    def _blocks_bytes(self, setting: Setting) -> int:
        return sum(self._block_sizes(setting))

    @property
    def sampling_batch_factor(self) -> int:
        """How many times the batch a CFG sampling forward runs at (2: CFG batched; 1: separate or no CFG)."""
        return 2 if self.arch.cfg_batched else 1

    def process(self, setting: Setting, run: "RunSpec", budget: int) -> "ProcessPrediction":
        """Every stage of `lowmem-eraser train` with this setting: text encoding (GPU or CPU), loading, x0
        generation or trajectory sampling, the training step."""
        step = self.predict(setting)
        adapters = step.adapter_state // 3  # fp32 adapters; AdamW's two moments exist from the loop on
        seq_len = self.text_length
        text_dim = self.arch.text_dim(self.config)
        embeddings = (2 * run.prompts + 1) * seq_len * text_dim * self.dtype.itemsize  # kept on the CPU
        # the streamed blocks' pinned host buffers (CUDA's host allocator rounds each up to a power of two)
        streamed = sum(pinned_allocation_bytes(size) for size in self._block_sizes(setting)[:min(setting.swap,
                                                                                                  self.depth)])
        host = streamed + embeddings
        prompts = 2 * run.prompts + 1  # targets, their twins and "": what text.py encodes
        text_on_gpu = self._memo(("text", prompts, True), lambda: text_stage(
            self.text_config, prompts, seq_len, self.dtype, on_gpu=True))
        on_gpu = run.text_encoder == "cuda" or (run.text_encoder == "auto" and 0 < text_on_gpu.needs <= budget)
        stages = [text_on_gpu if on_gpu else self._memo(("text", prompts, False), lambda: text_stage(
            self.text_config, prompts, seq_len, self.dtype, on_gpu=False))]
        full = self.weights(Setting("none", False))
        if run.blockwise_load:  # streamed blocks stay on the host; the others pass through one at a time
            sizes = self._block_sizes(Setting("none", False))
            loading = full - sum(sizes) + max(sizes) + streamed
            stages.append(Stage("loading the transformer", 0, loading,
                                "block by block from the safetensors: one full-precision block in host RAM"))
        else:
            stages.append(Stage("loading the transformer", 0, full,
                                "read in full precision on the CPU, then quantised and moved"))
        cfg = self.sampling_batch_factor if run.cfg else 1
        cfg_note = self.arch.cfg_note if run.cfg else ""
        if run.sampling == "renoise" or self.loss.adversarial.every > 0:  # the adversarial term re-noises x0 too
            peak, inputs = self.forward_peak(setting, cfg * run.sampling_batch)
            stages.append(Stage("x0 generation", step.weights + adapters + peak + inputs, host,
                                f"no-grad forward at batch {cfg * run.sampling_batch} {cfg_note}".rstrip()))
        if run.sampling != "renoise":
            peak, inputs = self.forward_peak(setting, cfg * setting.batch)
            stages.append(Stage("trajectory sampling", step.weights + 3 * adapters + peak + inputs, host,
                                f"no-grad forward at batch {cfg * setting.batch} {cfg_note}".rstrip() +
                                ", in the loop"))
        stages.append(Stage("training step", step.peak, host + step.pinned,
                            "teacher + student passes, backward"))
        return ProcessPrediction(step, stages, on_gpu, self.step_seconds(setting, self.speeds),
                                 self.moved_bytes(setting))

    def infer(self, budget: int) -> "InferPrediction":
        """`lowmem-eraser infer` (bf16 weights, CFG batched where the pipeline batches it): the fastest pipeline
        offload and VAE decode that fit `budget`; sequential offload when nothing else does."""
        seq_len = self.text_length
        text = self._memo(("text", 2, True), lambda: text_stage(self.text_config, 2, seq_len, self.dtype, True))
        t5_weights = text.host
        t5_act = text.gpu - t5_weights
        transformer = self.weights(Setting("none", False))
        peak, inputs = self.forward_peak(Setting("none", False), self.sampling_batch_factor)
        scale = self.facts.vae_scale
        shape = (1, (self.vae_config or {}).get("z_dim", self.config.get("in_channels", 16)),
                 latent_frames(self.video.frames), self.video.height // scale, self.video.width // scale)
        phases = [("text encoding", t5_weights, t5_act), ("denoising", transformer, peak + inputs)]
        vae = self.vae_config
        vae_w = self._memo(("vae",), lambda: vae_bytes(vae, self.dtype)) if vae is not None else 0
        options = []
        for tiled in (False, True):
            if vae is None and tiled:
                break
            decode = self._memo(("decode", tiled), lambda: vae_decode_peak(vae, shape, self.dtype, tiled)) \
                if vae is not None else 0
            with_vae = phases + ([("VAE decode" + (" (tiled)" if tiled else ""), vae_w, decode)]
                                 if vae is not None else [])
            for offload in ("none", "model"):
                resident = sum(w for _, w, _ in with_vae)
                stages = [Stage(f"infer: {name}", (resident if offload == "none" else w) + act, 0)
                          for name, w, act in with_vae]
                options.append(InferPrediction(offload, tiled, stages))
        options.sort(key=lambda o: (o.offload != "none", o.tiled))  # fastest first
        for option in options:
            if option.needs <= budget:
                return option
        # Sequential offload streams every sub-module's weights: about one transformer block on the GPU at a time.
        block = max(self._block_sizes(Setting("none", False)))
        leanest = min(options, key=lambda o: o.needs)
        phase_weights = [w for _, w, _ in phases] + [vae_w]
        stages = [replace(stage, gpu=stage.gpu - w + block) for stage, w in zip(leanest.stages, phase_weights)]
        return InferPrediction("sequential", leanest.tiled, stages)


@dataclass(frozen=True)
class RunSpec:
    """What a training process does besides the step (from the train config)."""

    sampling: str = "renoise"  # renoise | trajectory
    sampling_batch: int = 1  # sampling.batch_size (x0 generation)
    cfg: bool = True  # sampling.guidance_scale > 1: the sampling forwards run at twice the batch
    prompts: int = 8  # prompt pairs: text batches, embeddings kept on the CPU
    text_encoder: str = "auto"  # memory.text_encoder
    blockwise_load: bool = True  # memory.blockwise_load


@dataclass
class ProcessPrediction:
    """Every stage of one training process; the process needs what its largest stage needs."""

    step: Prediction
    stages: list[Stage]
    text_on_gpu: bool
    seconds: float = 0.0  # predicted training step time (Predictor.step_seconds)
    moved: int = 0  # host<->device bytes per step (Predictor.moved_bytes)

    @property
    def setting(self) -> Setting:
        return self.step.setting

    @property
    def gpu(self) -> int:
        return max(stage.gpu for stage in self.stages)

    @property
    def needs(self) -> int:
        return max(stage.needs for stage in self.stages)

    @property
    def host(self) -> int:
        return max(stage.host for stage in self.stages)

    def fits(self, budget: int) -> bool:
        return self.needs <= budget

    def over(self, budget: int) -> list[tuple[Stage, int]]:
        """The stages that do not fit `budget`, with the bytes they need beyond it."""
        return [(stage, stage.needs - budget) for stage in self.stages if stage.needs > budget]


@dataclass
class InferPrediction:
    offload: str  # none | model | sequential: the pipeline's CPU offload
    tiled: bool  # VAE tiling + slicing
    stages: list[Stage]

    @property
    def needs(self) -> int:
        return max(stage.needs for stage in self.stages)


_FIELDS = ("weights", "adapter_state", "inputs", "step_peak", "flops", "offloaded", "pinned")


def _extrapolate(a: Prediction, b: Prediction, steps: int, setting: Setting) -> Prediction:
    """a + steps·(b − a), field by field."""
    values = {name: getattr(a, name) + steps * (getattr(b, name) - getattr(a, name)) for name in _FIELDS}
    return Prediction(setting, **values)


def _add_difference(total: Prediction, a: Prediction, b: Prediction, steps: int) -> Prediction:
    """total + steps·(b − a), field by field (one stack's per-block term added to a multi-stack prediction)."""
    values = {name: getattr(total, name) + steps * (getattr(b, name) - getattr(a, name)) for name in _FIELDS}
    return Prediction(total.setting, **values)


@dataclass
class Plan:
    model: str
    video: VideoConfig
    rank: int
    loss: LossConfig
    budget: int
    candidates: list[ProcessPrediction]
    pick: ProcessPrediction | None
    seconds: float
    run: RunSpec = RunSpec()
    infer: InferPrediction | None = None
    dtype: torch.dtype = torch.bfloat16
    configured: ProcessPrediction | None = None  # the --config's own memory setting
    depth: int = 30
    speeds: Speeds = Speeds()
    text_name: str = "T5"  # the text encoder(s), as the tables name them


@dataclass
class ModelSpec:
    """The configs the planner builds from: a preset's published ones, or a local folder's."""

    name: str
    transformer: dict
    text_encoder: object  # a T5 config dict, a tuple of stages.TextEncoder, or None
    vae: dict | None
    facts: ModelFacts = field(default_factory=ModelFacts)

    @property
    def depth(self) -> int:
        """Repeated blocks across every stack (HunyuanVideo: 20 dual- + 40 single-stream)."""
        return sum(ARCHITECTURES[self.facts.transformer_class].counts(self.transformer))


def _folder_text_encoders(model: str | Path, config: dict, facts: ModelFacts):
    """A local folder's text encoders: text_encoder/ (and HunyuanVideo's text_encoder_2/), or None."""
    return text_encoder_config(model, False, ARCHITECTURES[facts.transformer_class].text_length(config))


def model_spec(model: str | Path) -> ModelSpec:
    config, name = transformer_config(model)
    preset = preset_name(model)
    facts = model_facts(model)
    if preset is not None:
        p = MODEL_PRESETS[preset]
        return ModelSpec(name, config, p.text, dict(p.vae), facts)
    return ModelSpec(name, config, _folder_text_encoders(model, config, facts), vae_config(model, False), facts)


def fewest_streamed(predictor: "Predictor", setting: Setting, run: RunSpec, budget: int) -> int | None:
    """The fewest streamed blocks (3..depth-1) with which `setting`'s whole process fits `budget`; None when it
    fits resident or does not fit even with every block streamed. Streaming 1 or 2 blocks saves nothing: the
    two slots then simply hold them."""
    depth = predictor.depth
    fits = [predictor.process(replace(setting, swap=n), run, budget).fits(budget) for n in (0, depth)]
    if fits[0] or not fits[1]:
        return None
    low, high = 2, depth  # process(low) does not fit, process(high) does: the device bytes fall with each block
    while high - low > 1:
        middle = (low + high) // 2
        if predictor.process(replace(setting, swap=middle), run, budget).fits(budget):
            high = middle
        else:
            low = middle
    return high if high < depth else None


def rung_candidates(predictor: "Predictor", run: RunSpec, budget: int, batch: int = 1) -> list["ProcessPrediction"]:
    """Every rung's whole process at `batch`: the ladder (no or all blocks streamed, activations offloaded or not,
    int8 or not, checkpointing or not) plus, per checkpointed rung, the fewest streamed blocks that fit."""
    settings = [replace(setting, batch=batch) for setting in ladder(predictor.depth)]
    for setting in [s for s in settings if s.checkpointing and s.swap == 0]:
        partial = fewest_streamed(predictor, setting, run, budget)
        if partial is not None:
            settings.append(replace(setting, swap=partial))
    return [predictor.process(setting, run, budget) for setting in settings]


def fastest_fit(candidates: list["ProcessPrediction"], budget: int) -> "ProcessPrediction | None":
    """The candidate with the shortest predicted step among those that fit; equal times (copies hidden behind
    compute) go to the one that moves fewer bytes, which leaves the link more headroom."""
    fitting = [c for c in candidates if c.fits(budget)]
    return min(fitting, key=lambda c: (round(c.seconds, 2), c.moved, c.setting.speed_rank())) if fitting else None


def make_plan(model: str | Path, video: VideoConfig, rank: int, loss: LossConfig, budget: int,
              max_batch: int = 8, run: RunSpec = RunSpec(), dtype: torch.dtype = torch.bfloat16,
              batch: int = 1, configured: Setting | None = None, speeds: Speeds = Speeds()) -> Plan:
    """Predict every rung's whole process at `batch` (no, some or all blocks streamed; activations offloaded
    or not; int8 or not; checkpointing or not), pick the one with the shortest predicted step among those that
    fit, see how far its batch can grow; and plan `infer` for the same budget."""
    began = time.perf_counter()
    spec = model_spec(model)
    predictor = Predictor(spec.transformer, video, rank, loss, dtype, text_config=spec.text_encoder,
                          vae_config=spec.vae, speeds=speeds, facts=spec.facts, sampling=run.sampling)
    candidates = rung_candidates(predictor, run, budget, batch)
    pick = fastest_fit(candidates, budget)
    if pick is not None:
        batch += 1
        while batch <= max_batch:
            grown = predictor.process(replace(pick.setting, batch=batch), run, budget)
            candidates.append(grown)
            if not grown.fits(budget):
                break
            batch += 1
    infer = predictor.infer(budget)
    own = predictor.process(configured, run, budget) if configured is not None else None
    text_name = "+".join(e.name.split("-")[0] for e in predictor.text_config) or "text"
    return Plan(spec.name, video, rank, loss, budget, candidates, pick, time.perf_counter() - began, run, infer,
                dtype, own, predictor.depth, speeds, text_name)


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def _stage_lines(title: str, process: ProcessPrediction, budget: int, text_name: str = "T5") -> list[str]:
    verdict = "fits" if process.fits(budget) else "does not fit: " + ", ".join(
        f"{stage.name} needs {_gib(extra)} GiB more" for stage, extra in process.over(budget))
    lines = [f"{title} ({process.setting.label}, batch {process.setting.batch}, {text_name} on the "
             f"{'GPU' if process.text_on_gpu else 'CPU'}; {verdict}), GiB:",
             f"  {'stage':<24} {'GPU peak':>8} {'needs':>8} {'host':>8}  detail"]
    for stage in process.stages:
        lines.append(f"  {stage.name:<24} {_gib(stage.gpu):>8} {_gib(stage.needs):>8} {_gib(stage.host):>8}  "
                     f"{stage.detail}")
    return lines


def configured_setting(memory: MemoryConfig, batch: int, depth: int) -> Setting:
    """The planner's Setting for a config's `memory` (every 8-bit backend keeps int8 weights)."""
    return Setting("none" if memory.quantize == "none" else "int8", memory.gradient_checkpointing,
                   memory.streamed_blocks(depth), memory.offload_activations, batch)


def format_plan(plan: Plan) -> str:
    v, run = plan.video, plan.run
    lines = [
        f"model {plan.model}, {v.frames}x{v.height}x{v.width}, rank {plan.rank}, alpha {plan.loss.alpha}, "
        f"beta {plan.loss.beta}, sampling {run.sampling}, {run.prompts} prompt pairs, text encoder "
        f"{run.text_encoder}, {str(plan.dtype).removeprefix('torch.')}, budget {plan.budget / GiB:.1f} GiB"
        + (f", adversarial every {adv.every} steps ({adv.tokens} vectors, {adv.inner_steps} inner steps: peak of "
           "one more student pass, time averaged over the steps)" if (adv := plan.loss.adversarial).every else ""),
        f"needs = predicted allocated peak x {1 + ALLOCATOR_SLACK:.2f} (allocator slack) + "
        f"{CUDA_CONTEXT_BYTES / GiB:.1f} GiB (CUDA context); a process fits when every stage's needs <= budget",
        f"s/step = predicted at {plan.speeds.tflops:g} TFLOP/s and {plan.speeds.h2d_gbps:g} GB/s host<->device, "
        "copies overlapped with each block's compute (--tflops, --h2d-gbps: state your GPU's)",
        "",
        f"{'quantize':<8} {'ckpt':<4} {'swap':>5} {'act->CPU':<8} {'batch':>5} {'weights':>8} {'step':>8} "
        f"{'step peak':>9} {'text':>5} {'process needs':>13} {'host RAM':>8} {'TFLOP/step':>10} {'GB moved':>8} "
        f"{'s/step':>7}  fits",
    ]
    for c in plan.candidates:
        s, step = c.setting, c.step
        mark = "  <- pick" if c is plan.pick else ""
        swap = "all" if s.swap >= plan.depth else str(s.swap)
        lines.append(
            f"{s.quantize:<8} {'on' if s.checkpointing else 'off':<4} {swap:>5} "
            f"{'on' if s.offload_activations else 'off':<8} {s.batch:>5} "
            f"{_gib(step.weights):>8} {_gib(step.step_peak):>8} {_gib(step.peak):>9} "
            f"{'GPU' if c.text_on_gpu else 'CPU':>5} {_gib(c.needs):>13} {_gib(c.host):>8} {step.flops / 1e12:>10.1f} "
            f"{c.moved / 1e9:>8.1f} {c.seconds:>7.2f}  {'yes' if c.fits(plan.budget) else 'no'}{mark}"
        )
    lines.append("")
    shown = plan.pick or min((c for c in plan.candidates if c.setting.batch == plan.candidates[0].setting.batch),
                             key=lambda c: c.needs)
    lines += _stage_lines(f"stages of {'the pick' if plan.pick else 'the leanest setting'}", shown, plan.budget,
                          plan.text_name)
    if plan.configured is not None:
        lines += _stage_lines("stages of the config's own setting", plan.configured, plan.budget, plan.text_name)
    lines.append("  (host: tensor bytes; the Python process itself adds ~1-3 GiB of libraries and CUDA state)")
    lines.append("")
    if plan.pick is None:
        over = ", ".join(f"{stage.name} needs {_gib(stage.needs)} GiB ({_gib(extra)} GiB over)"
                         for stage, extra in shown.over(plan.budget))
        text_over = any(stage.name == "text encoding" for stage, _ in shown.over(plan.budget))
        lines.append(f"nothing fits {plan.budget / GiB:.1f} GiB: with the leanest setting, {over}. Use "
                     + ("memory.text_encoder: cpu, " if text_over else "")
                     + "a smaller video (--frames/--height/--width) or a larger GPU")
    else:
        batches = [c.setting.batch for c in plan.candidates
                   if c.setting.label == plan.pick.setting.label and c.fits(plan.budget)]
        lines.append(f"pick: {plan.pick.setting.label}, text encoder on the "
                     f"{'GPU' if plan.pick.text_on_gpu else 'CPU'} (shortest predicted step that fits, "
                     f"{plan.pick.seconds:.2f} s; batch up to {max(batches)} fits)")
    if plan.infer is not None:
        inf = plan.infer
        stages = ", ".join(f"{st.name.removeprefix('infer: ')} {_gib(st.needs)}" for st in inf.stages)
        verdict = "fits" if inf.needs <= plan.budget else "does not fit"
        lines.append(f"infer: --offload {inf.offload}, VAE tiling {'on' if inf.tiled else 'off'} ({verdict}; "
                     f"needs GiB: {stages})")
    lines.append(
        f"planned in {plan.seconds:.1f} s: steps and forwards simulated under FakeTensorMode on {SIM_DEPTHS[0]}- and "
        f"{SIM_DEPTHS[1]}-block copies (with activation offload, simulated in the step: {SIM_DEPTHS[0] + 1}- and "
        f"{SIM_DEPTHS[1] + 1}-block) and extrapolated to the full depth; "
        "streamed blocks modelled analytically (N blocks -> 2 slots); batch > 2 extrapolated linearly"
    )
    return "\n".join(lines)


def write_config(plan: Plan, model: str | Path, path: str | Path, base: TrainConfig | None = None) -> Path:
    """A train YAML with the picked memory setting. From `base` (the --config) only `memory` changes; without
    one, the model/prompts/concept of a preset are placeholders to edit."""
    if plan.pick is None:
        raise PlanError("--config-out: nothing fits the budget, so there is no setting to write")
    s = plan.pick.setting
    memory = MemoryConfig(
        quantize="auto" if s.quantize == "int8" else "none",
        gradient_checkpointing=s.checkpointing,
        offload=s.offload(plan.depth),
        offload_activations=s.offload_activations,
        blockwise_load=plan.run.blockwise_load,
        int8_cache=base.memory.int8_cache if base else False,
        dtype=str(plan.dtype).removeprefix("torch."),
        kernels=base.memory.kernels if base else "auto",
        text_encoder=plan.run.text_encoder,  # auto re-checks the free memory at run time
    )
    preset = preset_name(model)
    if base is not None:
        config = replace(base, memory=memory)
    else:
        config = TrainConfig(
            model=Path(f"models/{MODEL_PRESETS[preset].folder}") if preset else Path(model),
            prompts=Path("configs/prompts/nudity_sample.csv"),
            concept="nudity",
            output_dir=Path(f"runs/{Path(plan.model).name}-nudity"),
            eraser=EraserConfig(rank=plan.rank),
            loss=plan.loss,
            sampling=SamplingConfig(mode=plan.run.sampling, batch_size=plan.run.sampling_batch),
            video=plan.video,
            memory=memory,
        )
    header = [
        f"# Written by `lowmem-eraser plan`: predicted process peak {plan.pick.gpu / GiB:.2f} GiB allocated, "
        f"{plan.pick.needs / GiB:.2f} GiB needed (budget {plan.budget / GiB:.1f} GiB), host RAM "
        f"{plan.pick.host / GiB:.2f} GiB, {plan.pick.seconds:.2f} s/step at {plan.speeds.tflops:g} TFLOP/s and "
        f"{plan.speeds.h2d_gbps:g} GB/s.",
        "# Edit prompts, concept and output_dir" + (" and point `model` at your local folder." if preset else ".")
        if base is None else f"# From {base.output_dir}'s config: only `memory` was changed.",
    ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(header) + "\n" + yaml.safe_dump(config.to_dict(), sort_keys=False))
    return path


def plan_defaults(config_path: str | None, model: str | None = None) -> dict:
    """The planned quantities, from a train YAML (read without checking that its files exist: planning happens
    before the model is downloaded) or the built-in defaults (the published setting, beta 0.5, at the preset's
    default video: 49x480x720 for CogVideoX and for a folder). `config` is the parsed TrainConfig (None without
    one): `--config-out` starts from it."""
    preset = preset_name(model)
    frames, height, width = MODEL_PRESETS[preset].video if preset else (49, 480, 720)
    defaults = dict(model=None, frames=frames, height=height, width=width, rank=128, alpha=1.0, beta=0.5,
                    sampling="renoise", sampling_batch=1, cfg=True, prompts=8, text_encoder="auto",
                    loss=LossConfig(alpha=1.0, beta=0.5), dtype="bfloat16", batch=1, config=None, blockwise_load=True)
    if config_path is None:
        return defaults
    from .config import load_prompt_pairs

    try:
        config = TrainConfig.from_dict(yaml.safe_load(Path(config_path).read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise PlanError(f"--config: cannot read {config_path} ({exc})") from None
    try:
        prompts = sum(len(load_prompt_pairs(entry.prompts)) for entry in config.concept_entries())
    except LowmemEraserError:
        prompts = defaults["prompts"]  # the prompt file is not here yet: plan the default count
    v = config.video
    return dict(model=str(config.model), frames=v.frames, height=v.height, width=v.width, rank=config.eraser.rank,
                alpha=config.loss.alpha, beta=config.loss.beta, sampling=config.sampling.mode,
                sampling_batch=config.sampling.batch_size, cfg=config.sampling.guidance_scale > 1, prompts=prompts,
                text_encoder=config.memory.text_encoder, loss=config.loss, dtype=config.memory.dtype,
                batch=config.train.batch_size, config=config, blockwise_load=config.memory.blockwise_load)


def check_speeds(tflops: float | None, h2d_gbps: float | None) -> Speeds:
    """The step-time model's rates: the given ones, the defaults for those not given."""
    for name, value in (("--tflops", tflops), ("--h2d-gbps", h2d_gbps)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise PlanError(f"{name}: expected a positive number, got {value}")
    default = Speeds()
    return Speeds(tflops if tflops is not None else default.tflops, h2d_gbps if h2d_gbps is not None else default.h2d_gbps)


def check_rank(rank: int) -> int:
    if rank <= 0:
        raise PlanError(f"--rank: expected a positive integer, got {rank}")
    return rank


def check_loss(alpha: float, beta: float, base: LossConfig | None = None) -> LossConfig:
    """`base` (a config's loss: eta, anchor, threshold) with these alpha and beta."""
    for name, value in (("alpha", alpha), ("beta", beta)):
        if not (math.isfinite(value) and value >= 0):
            raise PlanError(f"--{name}: expected a value >= 0, got {value}")
    return replace(base or LossConfig(), alpha=alpha, beta=beta)


def check_prompts(prompts: int) -> int:
    if prompts <= 0:
        raise PlanError(f"--prompts: expected a positive number of prompt pairs, got {prompts}")
    return prompts

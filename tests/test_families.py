"""Every registered model family (lowmem_eraser/families/) through the eraser API, on tiny random models of the
real diffusers classes: CogVideoXTransformer3DModel (conftest's tiny_transformer), WanTransformer3DModel and
HunyuanVideoTransformer3DModel, each 2 heads x 16 = dim 32, 2 eraser blocks, 48 video + 7 text tokens.

Tolerances, where a test is not bitwise: fp32 on the CPU; activations here are O(1)-O(10), so one rounding of a
sum or difference is <= ulp(16) ~ 2e-6; the tests allow atol 1e-5 (rtol 0) for "difference == delta" checks.
Tests that compare one computation against another of the same ops in the same order use torch.equal, and
run the hooks' PyTorch path (`erasers.kernels = "torch"`): conftest turns on the Triton interpreter, under which
the default "auto" path runs the fused Triton kernel, whose fp32 summation order differs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn

from conftest import randomize_erasers, tiny_inputs, tiny_transformer
from conftest import run as run_cogvideox
from lowmem_eraser import (
    EraserFormatError,
    LowmemEraserError,
    attach_erasers,
    detach_erasers,
    erasers_disabled,
    get_erasers,
    load_erasers,
    read_erasers,
    save_erasers,
    set_eraser_scale,
)
from lowmem_eraser.families import COGVIDEOX, FAMILIES, HUNYUAN_VIDEO, WAN, Family, family_of, family_of_key

RANK = 4
DIM = 32  # 2 heads x 16 in every tiny model
VIDEO_TOKENS, TEXT_TOKENS = 48, 7  # 3 latent frames x (8/2)^2 patches; 7 text tokens
ATOL = 1e-5  # fp32 "difference == delta" checks (see the module docstring)
INNER_KEYS = ["down.weight", "down.bias", "up.weight", "up.bias"]


# ---------------------------------------------------------------------------------------------- tiny models


def tiny_wan(seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=24, freq_dim=16, ffn_dim=64, num_layers=2, cross_attn_norm=True, rope_max_seq_len=32,
    ).eval()


def tiny_hunyuan(seed: int = 0, num_single_layers: int = 2):
    """One dual-stream block (gets no eraser) before the `num_single_layers` single-stream blocks."""
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=num_single_layers, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
        guidance_embeds=False, text_embed_dim=24, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6),
    ).eval()


def video_inputs(seed: int = 1):
    """[B, C, F, H, W] latents, [B, L, 24] text, timestep, text mask (last 2 tokens padding), pooled text."""
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 3, 8, 8, generator=gen)
    text = torch.randn(1, TEXT_TOKENS, 24, generator=gen)
    mask = torch.ones(1, TEXT_TOKENS, dtype=torch.bool)
    mask[:, -2:] = False
    pooled = torch.randn(1, 8, generator=gen)
    return latents, text, torch.tensor([500]), mask, pooled


def run_wan(model, inputs):
    latents, text, timestep, _, _ = inputs
    return model(latents, timestep, text, return_dict=False)[0]


def run_hunyuan(model, inputs):
    latents, text, timestep, mask, pooled = inputs
    return model(latents, timestep, text, mask, pooled, return_dict=False)[0]


@dataclass(frozen=True)
class Case:
    family: Family
    build: Callable[..., nn.Module]
    inputs: Callable[[], tuple]
    run: Callable[[nn.Module, tuple], torch.Tensor]
    # Where the eraser must go, written out here independently of the registry (SPEC §1-2, §6; Wan: Receler's
    # placement on the cross-attention): blocks attribute, attention attribute, published key, width linear.
    blocks: str
    attention: str
    key: str
    width_linear: str


CASES = {
    COGVIDEOX.name: Case(COGVIDEOX, tiny_transformer, tiny_inputs, run_cogvideox,
                         "transformer_blocks", "attn1", "transformer_blocks.{}.attn1.adapter", "to_q"),
    WAN.name: Case(WAN, tiny_wan, video_inputs, run_wan, "blocks", "attn2", "blocks.{}.attn2.adapter", "to_q"),
    HUNYUAN_VIDEO.name: Case(HUNYUAN_VIDEO, tiny_hunyuan, video_inputs, run_hunyuan, "single_transformer_blocks",
                             "attn", "single_transformer_blocks.{}.attn.adapter", "to_v"),
}
ALL = list(CASES)


def forward(case: Case, model, inputs=None):
    with torch.no_grad():
        return case.run(model, case.inputs() if inputs is None else inputs)


def erased(case: Case, seed: int = 2, kernels: str | None = None):
    """(model, erasers) with random adapters."""
    model = case.build()
    erasers = attach_erasers(model, rank=RANK)
    randomize_erasers(erasers, seed=seed)
    if kernels is not None:
        erasers.kernels = kernels
    return model, erasers


def attention_sites(case: Case, model) -> list[nn.Module]:
    """The attentions that must carry the erasers, by the expected (not the registered) names."""
    return [getattr(block, case.attention) for block in getattr(model, case.blocks)]


def test_every_registered_family_is_covered_here():
    assert set(FAMILIES) == set(CASES)
    assert [family_of(CASES[name].build()).name for name in ALL] == ALL


# ------------------------------------------------------------------------- 1. placement and base equivalence


@pytest.mark.parametrize("name", ALL)
def test_attach_puts_one_adapter_per_block_where_the_family_says(name):
    case = CASES[name]
    family = case.family
    model = case.build()
    base_state = {key: value.clone() for key, value in model.state_dict().items()}
    base_params = [n for n, _ in model.named_parameters()]
    assert (family.blocks, family.attention, family.key, family.dim_linear) == (
        case.blocks, case.attention, case.key, case.width_linear)
    blocks = getattr(model, family.blocks)
    assert len(blocks) == 2

    erasers = attach_erasers(model, rank=RANK)

    assert list(erasers.keys()) == [family.key.format(i) for i in range(len(blocks))]
    assert [key for key, _ in family.sites(model)] == list(erasers.keys())
    assert [attn for _, attn in family.sites(model)] == attention_sites(case, model)
    assert erasers.family == family.name and all(family_of_key(key) is family for key in erasers)
    for key, block in zip(erasers, blocks):
        attention = getattr(block, family.attention)
        width = getattr(attention, family.dim_linear).in_features  # Hunyuan: attn.to_v.weight.shape[-1] (SPEC §6)
        assert width == family.adapter_dim(attention) == getattr(attention, case.width_linear).weight.shape[-1] == DIM
        adapter = erasers[key]
        assert adapter.down.weight.shape == (RANK, width) and adapter.up.weight.shape == (width, RANK)
        assert all(p.dtype == torch.float32 for p in adapter.parameters())
        assert torch.count_nonzero(adapter.up.weight) == 0 and torch.count_nonzero(adapter.up.bias) == 0
    # The only hooked modules are the family's attentions (Hunyuan's dual-stream blocks and Wan's self-attention
    # attn1 get none); the transformer itself carries the checkpoint-replay pre-hook.
    hooked = {n for n, m in model.named_modules() if m._forward_hooks}
    assert hooked == {f"{case.blocks}.{i}.{case.attention}" for i in range(len(blocks))}
    # The base model's parameters and state dict are untouched: same keys, same values, nothing registered.
    assert [n for n, _ in model.named_parameters()] == base_params
    state = model.state_dict()
    assert list(state) == list(base_state)
    assert all(torch.equal(state[key], value) for key, value in base_state.items())


@pytest.mark.parametrize("name", ALL)
def test_zero_init_disabled_scale_zero_and_detach_give_the_base_output_exactly(name):
    case = CASES[name]
    model, inputs = case.build(), case.inputs()
    base = forward(case, model, inputs)
    erasers = attach_erasers(model, rank=RANK)  # default kernels ("auto"; the Triton interpreter here)
    assert torch.equal(forward(case, model, inputs), base)  # up is zero-initialised
    randomize_erasers(erasers)
    out = forward(case, model, inputs)
    assert (out - base).abs().max() > 1e-3
    with erasers_disabled(model):
        assert torch.equal(forward(case, model, inputs), base)
    assert torch.equal(forward(case, model, inputs), out)  # re-enabled on exit
    set_eraser_scale(model, 0.0)
    assert torch.equal(forward(case, model, inputs), base)
    set_eraser_scale(model, 1.0)
    assert torch.equal(forward(case, model, inputs), out)
    assert detach_erasers(model) is erasers and get_erasers(model) is None
    assert not any(m._forward_hooks for m in model.modules()) and not model._forward_pre_hooks
    assert torch.equal(forward(case, model, inputs), base)


# ------------------------------------------------------------------------------ 2. the hook's target tensor


def _capture(modules, store: dict):
    """Forward hooks that keep each module's output (what it returns after the hooks registered before them)."""

    def hook(i):
        return lambda module, args, output: store.__setitem__(i, output)

    return [module.register_forward_hook(hook(i)) for i, module in enumerate(modules)]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_hook_adds_the_adapter_delta_to_the_attention_output(name, scale):
    """Wan: the cross-attention `blocks[i].attn2` output (one tensor); HunyuanVideo: the video output of
    `single_transformer_blocks[i].attn` (first of (video, text)); CogVideoX: the video output of attn1."""
    case = CASES[name]
    family = case.family
    model, inputs = case.build(), case.inputs()
    sites = attention_sites(case, model)
    raw, final = {}, {}
    handles = _capture(sites, raw)  # registered before attach: these hooks see the attention's own output
    erasers = attach_erasers(model, rank=RANK)
    handles += _capture(sites, final)  # registered after: these see it with the adapter added
    randomize_erasers(erasers)
    erasers.kernels = "torch"
    set_eraser_scale(model, scale)

    with erasers_disabled(model):
        forward(case, model, inputs)
    base_raw, base_final = dict(raw), dict(final)
    forward(case, model, inputs)
    for handle in handles:
        handle.remove()

    def video(output):
        if family.splits_output:
            assert isinstance(output, tuple) and len(output) == 2
            return output[0]
        assert isinstance(output, torch.Tensor)  # Wan's attn2 returns the video tokens alone
        return output

    for i, key in enumerate(erasers):
        adapter = erasers[key]
        assert torch.equal(video(base_final[i]), video(base_raw[i]))  # disabled: nothing added
        pre, post = video(raw[i]), video(final[i])
        assert pre.shape == (1, VIDEO_TOKENS, DIM)
        with torch.no_grad():
            delta = scale * adapter.delta(pre)
        assert delta.abs().max() > 1e-2
        assert torch.equal(post, pre + delta)
        torch.testing.assert_close(post - pre, delta, rtol=0, atol=ATOL)
        if family.splits_output:  # the text output passes through untouched
            assert raw[i][1].shape == (1, TEXT_TOKENS, DIM) and torch.equal(final[i][1], raw[i][1])
    # With and without erasers: the first eraser block's attention sees the same input in both passes (Wan:
    # only attn1 precedes attn2; Hunyuan: only the eraser-free dual-stream block precedes it), so the two
    # outputs differ by exactly the adapter delta of the base output.
    with torch.no_grad():
        delta0 = scale * erasers.values()[0].delta(video(base_final[0]))
    assert torch.equal(video(raw[0]), video(base_raw[0]))
    torch.testing.assert_close(video(final[0]) - video(base_final[0]), delta0, rtol=0, atol=ATOL)


# ------------------------------------------------- 3. HunyuanVideo against the published injection, rewritten


class PublishedAdapterEraser(nn.Module):
    """The published `AdapterEraser` (Receler / T2VUnlearning `receler/erasers/utils.py`), rewritten here: its
    forward returns `up(act(down(x)))` ALONE. SPEC §1's "Output x + up(act(down(x)))" is the net effect of the
    injection (adapter output added to the attention output), not this module's return value: with a residual
    inside the module, §6's `hidden_states + strength * adapter(hidden_states)` would give 2x the base output at
    the zero init, contradicting §1's "output exactly equals the base model at step 0"."""

    def __init__(self, dim: int, mid_dim: int):
        super().__init__()
        self.down = nn.Linear(dim, mid_dim)
        self.act = nn.GELU()
        self.up = nn.Linear(mid_dim, dim)

    def forward(self, hidden_states):
        return self.up(self.act(self.down(hidden_states)))


class PublishedHunyuanWithEraser(nn.Module):
    """The official method's HunyuanVideo injection (SPEC §6), rewritten: wraps a single-stream block's `attn`,
    adapter width `attn.to_v.weight.shape[-1]`, `hidden_states = hidden_states + strength * adapter(hidden_states)`
    on the video output, before the block concatenates it with the text output."""

    def __init__(self, attn: nn.Module, rank: int, strength: float = 1.0):
        super().__init__()
        self.attn = attn
        self.strength = strength
        self.adapter = PublishedAdapterEraser(attn.to_v.weight.shape[-1], rank)

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        hidden_states, encoder_hidden_states = self.attn(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=attention_mask,
            image_rotary_emb=image_rotary_emb,
        )
        hidden_states = hidden_states + self.strength * self.adapter(hidden_states)
        return hidden_states, encoder_hidden_states


def inject_published(transformer: nn.Module, rank: int, strength: float = 1.0, ckpt: dict | None = None) -> dict:
    """Wrap every HunyuanVideoSingleTransformerBlock's attn; load `ckpt` with load_state_dict(strict=True).
    Returns the published save of the adapters: {f"{module name}.adapter": adapter.state_dict()}."""
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoSingleTransformerBlock

    for name, module in list(transformer.named_modules()):
        if isinstance(module, HunyuanVideoSingleTransformerBlock):
            module.attn = PublishedHunyuanWithEraser(module.attn, rank, strength)
            if ckpt is not None:
                module.attn.adapter.load_state_dict(ckpt[f"{name}.attn.adapter"], strict=True)
    return {f"{name}.adapter": module.adapter.state_dict() for name, module in transformer.named_modules()
            if isinstance(module, PublishedHunyuanWithEraser)}


def test_hunyuan_matches_an_independent_rewrite_of_the_published_injection(tmp_path):
    case = CASES[HUNYUAN_VIDEO.name]
    inputs = case.inputs()
    ours, erasers = erased(case, kernels="torch")
    folder = save_erasers(ours, tmp_path / "ours")
    ckpt = torch.load(folder / "eraser_weights.pt", weights_only=True)  # the published reader
    published_rank = json.loads((folder / "eraser_config.json").read_text())["eraser_rank"]

    theirs = case.build()  # same seed: same base weights
    published_save = inject_published(theirs, published_rank, ckpt=ckpt)
    assert list(published_save) == list(ckpt) == list(erasers.keys())  # their names are the published keys
    for key, inner in published_save.items():
        assert list(inner) == INNER_KEYS
        assert all(torch.equal(inner[k], ckpt[key][k]) for k in INNER_KEYS)

    # Same ops in the same order (F.linear, exact-erf GELU, F.linear, one add) on the same fp32 weights: equal.
    for strength in (1.0, 0.5, 0.0):
        set_eraser_scale(ours, strength)
        for module in theirs.modules():
            if isinstance(module, PublishedHunyuanWithEraser):
                module.strength = strength
        assert torch.equal(forward(case, ours, inputs), forward(case, theirs, inputs)), strength
    base = forward(case, case.build(), inputs)
    assert torch.equal(forward(case, theirs, inputs), base)  # strength 0: the base model
    # A model carrying the published injection is refused, not erased twice.
    with pytest.raises(LowmemEraserError, match="injected by other code"):
        attach_erasers(theirs, rank=RANK)
    with pytest.raises(EraserFormatError, match="injected by other code"):
        load_erasers(theirs, folder)
    set_eraser_scale(ours, 1.0)
    assert (forward(case, ours, inputs) - base).abs().max() > 1e-3

    # And the reverse: an eraser saved by the published code (their save function's layout) loads into ours.
    theirs = case.build()
    gen = torch.Generator().manual_seed(5)
    published_save = inject_published(theirs, RANK)
    with torch.no_grad():
        for module in theirs.modules():
            if isinstance(module, PublishedAdapterEraser):
                for param in module.parameters():
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    published_save = {name: {k: v.clone() for k, v in inner.items()} for name, inner in published_save.items()}
    (tmp_path / "theirs").mkdir()
    torch.save(published_save, tmp_path / "theirs" / "eraser_weights.pt")
    (tmp_path / "theirs" / "eraser_config.json").write_text(json.dumps({"eraser_type": "adapter", "eraser_rank": RANK}))
    fresh = case.build()
    loaded = load_erasers(fresh, tmp_path / "theirs")
    loaded.kernels = "torch"
    assert loaded.family == HUNYUAN_VIDEO.name
    assert torch.equal(forward(case, fresh, inputs), forward(case, theirs, inputs))


# ------------------------------------------------------------------------------------------ 4. round trip


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_save_read_load_round_trip(tmp_path, name, fmt):
    case = CASES[name]
    inputs = case.inputs()
    model, erasers = erased(case)
    expected = forward(case, model, inputs)
    folder = save_erasers(model, tmp_path / "eraser", format=fmt)

    assert json.loads((folder / "eraser_config.json").read_text()) == {"eraser_type": "adapter", "eraser_rank": RANK}
    assert list(json.loads((folder / "eraser_config.json").read_text())) == ["eraser_type", "eraser_rank"]
    sidecar = json.loads((folder / "lowmem_eraser.json").read_text())
    assert sidecar["family"] == case.family.name and sidecar["num_blocks"] == 2
    assert sidecar["dim"] == DIM and sidecar["rank"] == RANK
    if fmt == "pt":  # the published nested dict, readable with weights_only=True
        raw = torch.load(folder / "eraser_weights.pt", weights_only=True)
        assert type(raw) is dict and list(raw) == list(erasers.keys())
        for key, inner in raw.items():
            assert type(inner) is dict and list(inner) == INNER_KEYS
            assert all(torch.equal(inner[k], erasers[key].state_dict()[k]) for k in INNER_KEYS)

    read = read_erasers(folder)
    assert read.family == case.family.name and read.rank == RANK
    assert read.sidecar["family"] == case.family.name
    assert read.config == {"eraser_type": "adapter", "eraser_rank": RANK}
    assert list(read.state) == list(erasers.keys()) and set(read.dims.values()) == {DIM}

    fresh = case.build()
    loaded = load_erasers(fresh, folder)
    assert get_erasers(fresh) is loaded and loaded.family == case.family.name and loaded.rank == RANK
    assert torch.equal(forward(case, fresh, inputs), expected)


# ------------------------------------------------------------------------------------------- 5. bad input


@pytest.fixture(scope="module")
def saved_erasers(tmp_path_factory):
    """One saved eraser folder per family (random adapters)."""
    root = tmp_path_factory.mktemp("families")
    return {name: save_erasers(erased(case)[0], root / name) for name, case in CASES.items()}


@pytest.mark.parametrize(
    "source, target",
    [(s, t) for s in ALL for t in ALL if s != t],  # includes Wan -> CogVideoX and HunyuanVideo -> Wan
)
def test_loading_another_familys_eraser_names_both_families(saved_erasers, source, target):
    case = CASES[target]
    model = case.build()
    base = forward(case, model)
    with pytest.raises(EraserFormatError) as info:
        load_erasers(model, saved_erasers[source])
    message = str(info.value)
    assert f"this is a {source} eraser" in message and f"the model is a {target} transformer" in message
    assert type(model).__name__ in message
    assert get_erasers(model) is None and torch.equal(forward(case, model), base)  # nothing changed


def test_loading_a_hunyuan_eraser_with_fewer_blocks_than_the_model_is_refused(saved_erasers):
    model = tiny_hunyuan(num_single_layers=3)
    with pytest.raises(EraserFormatError, match=re.escape("missing block 'single_transformer_blocks.2.attn.adapter'")):
        load_erasers(model, saved_erasers[HUNYUAN_VIDEO.name])
    assert get_erasers(model) is None


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=8,
    )


@pytest.mark.parametrize("build", [lambda: nn.Linear(3, 3), _tiny_unet], ids=["Linear", "UNet2DConditionModel"])
def test_attach_on_an_unsupported_module_lists_the_supported_families(build):
    module = build()
    with pytest.raises(LowmemEraserError) as info:
        attach_erasers(module, rank=RANK)
    message = str(info.value)
    assert f"{type(module).__name__} is not a supported transformer" in message
    for family in FAMILIES.values():
        assert f"{family.name} ({'/'.join(family.transformer_classes)})" in message
    assert get_erasers(module) is None


def test_a_transformer_without_eraser_sites_is_refused_at_attach():
    model = tiny_hunyuan(num_single_layers=0)  # only dual-stream blocks: nowhere for a HunyuanVideo eraser
    with pytest.raises(LowmemEraserError, match="no single_transformer_blocks to put an eraser on"):
        attach_erasers(model, rank=RANK)
    assert get_erasers(model) is None


# ----------------------------------------------------------------------------- 6. checkpointing replay


def _adapter_grads(case: Case, model, inputs, checkpointing: bool, change: str | None):
    erasers = get_erasers(model)
    model.zero_grad(set_to_none=True)
    erasers.zero_grad(set_to_none=True)
    if checkpointing:
        model.enable_gradient_checkpointing()  # plain diffusers call after attach: the erasers upgrade it
    else:
        model.disable_gradient_checkpointing()
    model.train()
    set_eraser_scale(model, 0.7)
    loss = case.run(model, inputs).square().mean()
    if checkpointing:
        assert model._gradient_checkpointing_func == erasers.checkpoint
    if change == "frozen pass":  # the training step's frozen (adapters off, no-grad) pass between fwd and bwd
        with torch.no_grad(), erasers_disabled(model):
            case.run(model, inputs)
        loss.backward()
    elif change == "disabled at backward":
        with erasers_disabled(model):
            loss.backward()
    elif change == "scale at backward":
        set_eraser_scale(model, 3.0)
        loss.backward()
    else:
        loss.backward()
    set_eraser_scale(model, 1.0)
    model.eval()
    return [p.grad.clone() for p in erasers.parameters()]


@pytest.mark.parametrize("name", [WAN.name, HUNYUAN_VIDEO.name])
def test_checkpointed_adapter_gradients_equal_plain_ones_despite_toggles(name):
    """Recomputation replays the switches snapshotted at forward: gradients equal the plain ones (the same ops on
    the same values: asserted equal within rtol 1e-6 / atol 1e-9, fp32)."""
    case = CASES[name]
    model, erasers = erased(case)
    inputs = case.inputs()
    reference = _adapter_grads(case, model, inputs, checkpointing=False, change=None)
    assert all(ref.abs().sum() > 0 for ref in reference)
    for change in (None, "frozen pass", "disabled at backward", "scale at backward"):
        got = _adapter_grads(case, model, inputs, checkpointing=True, change=change)
        for ref, grad in zip(reference, got):
            torch.testing.assert_close(grad, ref, rtol=1e-6, atol=1e-9, msg=f"{name}, {change}")
    detach_erasers(model)
    assert model.gradient_checkpointing and model._gradient_checkpointing_func != erasers.checkpoint


# ---------------------------------------------------------------------- 7. the memory switches on every family

# The repeated block lists of each family in execution order, written out independently of the registry:
# HunyuanVideo runs its dual-stream blocks before the single-stream ones.
STACKS = {COGVIDEOX.name: ("transformer_blocks",), WAN.name: ("blocks",),
          HUNYUAN_VIDEO.name: ("transformer_blocks", "single_transformer_blocks")}


def stack_blocks(case: Case, model) -> list[nn.Module]:
    return [block for stack in STACKS[case.family.name] for block in getattr(model, stack)]


@pytest.mark.parametrize("name", ALL)
def test_the_8bit_base_quantises_every_repeated_block_of_every_family(name):
    from lowmem_eraser.quantize import Int8Linear, quantize_base

    case = CASES[name]
    model = case.build()
    expected = forward(case, model)
    blocks = stack_blocks(case, model)
    outside = {n: p.clone() for n, p in model.named_parameters()
               if not any(n.startswith(f"{stack}.") for stack in STACKS[name])}
    quantize_base(model, backend="int8")
    assert all(type(m) is not nn.Linear for block in blocks for m in block.modules())
    assert sum(type(m) is Int8Linear for block in blocks for m in block.modules()) > 0
    assert all(torch.equal(p, outside[n]) for n, p in model.named_parameters() if n in outside)  # untouched
    got = forward(case, model)
    error = (got - expected).norm() / expected.norm()
    print(f"{name}: int8 relative output error {error:.2e}")
    assert error < 0.05  # per-channel absmax int8 on random weights of a 2-block model


@pytest.mark.parametrize("name", [WAN.name, HUNYUAN_VIDEO.name])
def test_streaming_a_familys_blocks_changes_no_gradient(name):
    """BlockOffloader on the family's blocks in execution order (HunyuanVideo: across both stacks), copies
    emulated on the CPU, checkpointing on: the adapter gradients of two steps equal the resident ones."""
    from lowmem_eraser.offload import BlockOffloader

    case = CASES[name]
    model, erasers = erased(case, kernels="torch")
    model.enable_gradient_checkpointing()
    inputs = case.inputs()

    def step():
        erasers.zero_grad(set_to_none=True)
        with torch.no_grad(), erasers_disabled(model):
            target = case.run(model, inputs)
        loss = (case.run(model, inputs) - target).square().mean()
        loss.backward()
        return [p.grad.clone() for p in erasers.parameters()]

    reference = step()
    total = len(stack_blocks(case, model))
    with BlockOffloader(model, "cpu", stream=True, blocks=total) as offloader:
        for _ in range(2):
            assert all(torch.equal(g, r) for g, r in zip(step(), reference))
        assert sorted(offloader._host) == list(range(total)) and offloader.copies > 0


def test_a_set_of_erasers_from_two_families_cannot_be_saved(tmp_path):
    from lowmem_eraser.adapter import EraserAdapter, EraserSet
    from lowmem_eraser.errors import EraserFormatError

    mixed = EraserSet({COGVIDEOX.key.format(0): EraserAdapter(DIM, RANK), WAN.key.format(0): EraserAdapter(DIM, RANK)})
    with pytest.raises(EraserFormatError, match="not the keys of one model family"):
        save_erasers(mixed, tmp_path / "mixed")


def test_a_two_expert_pipeline_keeps_each_experts_erasers_apart_in_one_file(tmp_path):
    """Wan2.2 A14B: `transformer` (high noise) and `transformer_2` (low noise) each get erasers; one file holds
    both, the first expert's under the plain published keys, the second's under "transformer_2." + key, and each
    loads back into its own transformer."""
    high, low = tiny_wan(seed=0), tiny_wan(seed=1)
    high_erasers = attach_erasers(high, rank=RANK, expert="transformer")
    low_erasers = attach_erasers(low, rank=RANK, expert="transformer_2")
    randomize_erasers(high_erasers, seed=3)
    randomize_erasers(low_erasers, seed=4)
    assert high_erasers.keys() == [f"blocks.{i}.attn2.adapter" for i in range(2)]
    assert low_erasers.keys() == [f"transformer_2.blocks.{i}.attn2.adapter" for i in range(2)]
    inputs = video_inputs()
    expected = [forward(CASES[WAN.name], model, inputs) for model in (high, low)]
    save_erasers([high, low], tmp_path / "a14b")
    published = torch.load(tmp_path / "a14b" / "eraser_weights.pt", weights_only=True)
    assert sorted(published) == sorted([*high_erasers.keys(), *low_erasers.keys()])
    assert read_erasers(tmp_path / "a14b").family == WAN.name
    fresh_high, fresh_low = tiny_wan(seed=0), tiny_wan(seed=1)
    load_erasers(fresh_high, tmp_path / "a14b")  # the first expert is the default
    load_erasers(fresh_low, tmp_path / "a14b", expert="transformer_2")
    assert torch.equal(forward(CASES[WAN.name], fresh_high, inputs), expected[0])
    assert torch.equal(forward(CASES[WAN.name], fresh_low, inputs), expected[1])
    with pytest.raises(EraserFormatError, match="attach \\(or load\\) with the same `expert`"):
        load_erasers(fresh_high, tmp_path / "a14b", expert="transformer_2")
    with pytest.raises(LowmemEraserError, match="Wan has no expert 'transformer_3'"):
        attach_erasers(tiny_wan(), rank=RANK, expert="transformer_3")
    with pytest.raises(LowmemEraserError, match="CogVideoX has no expert 'transformer_2'"):
        attach_erasers(tiny_transformer(), rank=RANK, expert="transformer_2")
    with pytest.raises(EraserFormatError, match="'blocks.0.attn2.adapter' twice"):
        save_erasers([high, tiny_wan_with_erasers()], tmp_path / "twice")


def tiny_wan_with_erasers():
    model = tiny_wan(seed=2)
    attach_erasers(model, rank=RANK)
    return model


# ------------------------------------------------------------------- 8. the concept mask from Wan's attn2


def _naive_cross_attention(attn, video, text, concept_tokens) -> torch.Tensor:
    """fp64, the whole [heads, N_video, N_text] softmax at once: the reference the chunked fp32 one must match."""
    import copy

    attn = copy.deepcopy(attn).double()
    q = attn.norm_q(attn.to_q(video.double())).unflatten(2, (attn.heads, -1)).transpose(1, 2)
    k = attn.norm_k(attn.to_k(text.double())).unflatten(2, (attn.heads, -1)).transpose(1, 2)
    probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return (probs * concept_tokens.double()[:, None, None, :]).sum(-1).mean(1)


@pytest.mark.parametrize("chunk_size", [7, 48, 4096])  # uneven, exact, one chunk
def test_wan_cross_attention_concept_mass_matches_an_fp64_reference(chunk_size):
    from lowmem_eraser.localization import cross_concept_attention

    attn = tiny_wan().blocks[0].attn2
    gen = torch.Generator().manual_seed(5)
    video, text = torch.randn(2, VIDEO_TOKENS, DIM, generator=gen), torch.randn(2, TEXT_TOKENS, DIM, generator=gen)
    concept = torch.zeros(2, TEXT_TOKENS, dtype=torch.bool)
    concept[0, 1:3], concept[1, 4] = True, True
    got = cross_concept_attention(attn, video, text, concept, chunk_size=chunk_size)
    expected = _naive_cross_attention(attn, video, text, concept)
    assert got.dtype == torch.float32 and got.shape == (2, VIDEO_TOKENS)
    assert torch.allclose(got.double(), expected, atol=1e-6, rtol=0)  # fp32 softmax of a few logits


def test_the_concept_mask_capture_reads_wans_cross_attention_in_every_block():
    """During a real Wan forward the capture hooks every block's attn2 and averages the per-block concept mass;
    the per-frame min-max normalisation then applies as for CogVideoX (3 latent frames of 16 patches here)."""
    from lowmem_eraser.localization import ConceptMaskCapture

    model = tiny_wan()
    latents, text, timestep, _, _ = inputs = video_inputs()
    concept = torch.zeros(1, TEXT_TOKENS, dtype=torch.bool)
    concept[0, 2] = True
    seen = []  # attn2's own inputs, recorded independently of the capture
    handles = [block.attn2.register_forward_hook(lambda m, a, o: seen.append((m, a[0], a[1])))
               for block in model.blocks]
    with torch.no_grad(), ConceptMaskCapture(model, concept, num_frames=3) as capture:
        run_wan(model, inputs)
    for handle in handles:
        handle.remove()
    assert len(seen) == len(model.blocks)
    expected = sum(_naive_cross_attention(m, v, t, concept) for m, v, t in seen) / len(seen)
    frames = expected.view(1, 3, -1)
    low, high = frames.amin(-1, keepdim=True), frames.amax(-1, keepdim=True)
    expected_normalized = ((frames - low) / (high - low)).view(1, -1)
    assert torch.allclose(capture.normalized().double(), expected_normalized, atol=1e-5, rtol=0)
    assert torch.equal(capture.mask(0.5), (capture.normalized() >= 0.5).float())


# -------------------------------------------- 9. the concept mask from HunyuanVideo's dual-stream attention


def _naive_dual_stream_attention(attn, video, text, concept_tokens, text_valid, rotary) -> torch.Tensor:
    """fp64, the whole joint softmax at once, written from HunyuanVideoAttnProcessor2_0 (keys: rotated video,
    then text; padded text keys masked): the reference the chunked fp32 one must match."""
    import copy

    from diffusers.models.embeddings import apply_rotary_emb

    attn = copy.deepcopy(attn).double()
    heads = attn.heads
    q = attn.norm_q(attn.to_q(video.double()).unflatten(2, (heads, -1)))
    k = attn.norm_k(attn.to_k(video.double()).unflatten(2, (heads, -1)))
    if rotary is not None:
        rotary = tuple(r.double() for r in rotary)
        q, k = apply_rotary_emb(q, rotary, sequence_dim=1), apply_rotary_emb(k, rotary, sequence_dim=1)
    text_k = attn.norm_added_k(attn.add_k_proj(text.double()).unflatten(2, (heads, -1)))
    q, k = q.transpose(1, 2), torch.cat([k, text_k], dim=1).transpose(1, 2)
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    valid = torch.cat([torch.ones(video.shape[:2], dtype=torch.bool), text_valid], dim=1)
    probs = torch.softmax(logits.masked_fill(~valid[:, None, None, :], float("-inf")), dim=-1)
    return (probs[..., video.shape[1]:] * concept_tokens.double()[:, None, None, :]).sum(-1).mean(1)


@pytest.mark.parametrize("chunk_size", [7, 55, 4096])  # uneven, exact (48 + 7 keys), one chunk
def test_hunyuan_dual_stream_concept_mass_matches_an_fp64_reference(chunk_size):
    from lowmem_eraser.localization import dual_stream_concept_attention

    model = tiny_hunyuan()
    attn = model.transformer_blocks[0].attn
    gen = torch.Generator().manual_seed(5)
    video, text = torch.randn(2, VIDEO_TOKENS, DIM, generator=gen), torch.randn(2, TEXT_TOKENS, DIM, generator=gen)
    rotary = model.rope(torch.zeros(2, 4, 3, 8, 8))  # (cos, sin) of 3 x 4 x 4 patches, as the model builds it
    concept = torch.zeros(2, TEXT_TOKENS, dtype=torch.bool)
    concept[0, 1:3], concept[1, 4] = True, True
    text_valid = torch.ones(2, TEXT_TOKENS, dtype=torch.bool)
    text_valid[0, 5:] = False  # prompt 0 is padded after 5 tokens
    joint_mask = torch.cat([torch.ones(2, VIDEO_TOKENS, dtype=torch.bool), text_valid], dim=1)[:, None, None, :]
    got = dual_stream_concept_attention(attn, video, text, concept, joint_mask, rotary, chunk_size=chunk_size)
    expected = _naive_dual_stream_attention(attn, video, text, concept, text_valid, rotary)
    assert got.dtype == torch.float32 and got.shape == (2, VIDEO_TOKENS)
    assert torch.allclose(got.double(), expected, atol=1e-6, rtol=0)
    padded_concept = concept.clone()
    padded_concept[0, 6] = True  # a padded key carries no attention
    again = dual_stream_concept_attention(attn, video, text, padded_concept, joint_mask, rotary, chunk_size)
    assert torch.equal(again, got)


def test_the_concept_mask_capture_reads_hunyuans_dual_stream_blocks_not_the_eraser_blocks():
    """The erasers sit in the single-stream blocks; the mask comes from every dual-stream block's joint attention
    (its own inputs: normed video and text, the model's attention mask and rotary embedding)."""
    from lowmem_eraser.localization import ConceptMaskCapture

    model = tiny_hunyuan()
    latents, text, timestep, mask, pooled = inputs = video_inputs()
    concept = torch.zeros(1, TEXT_TOKENS, dtype=torch.bool)
    concept[0, 2] = True
    seen = []
    handles = [block.attn.register_forward_hook(lambda m, a, k, o: seen.append((m, k)), with_kwargs=True)
               for block in model.transformer_blocks]
    with torch.no_grad(), ConceptMaskCapture(model, concept, num_frames=3) as capture:
        run_hunyuan(model, inputs)
    for handle in handles:
        handle.remove()
    assert len(seen) == len(model.transformer_blocks) == capture._blocks_seen
    expected = sum(_naive_dual_stream_attention(m, k["hidden_states"], k["encoder_hidden_states"], concept, mask,
                                                k["image_rotary_emb"]) for m, k in seen) / len(seen)
    frames = expected.view(1, 3, -1)
    low, high = frames.amin(-1, keepdim=True), frames.amax(-1, keepdim=True)
    assert torch.allclose(capture.normalized().double(), ((frames - low) / (high - low)).view(1, -1), atol=1e-5)

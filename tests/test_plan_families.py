"""`lowmem-eraser plan` for the Wan and HunyuanVideo presets: the presets build the real diffusers classes with the
published sizes, the planner's step and forward predictions match the live-tensor peaks of the real steps on small
models of each family (multi-stack extrapolation included), the text stages are the encoders' weights, and the
shipped configs fit their budgets."""

import pytest
import torch
import yaml

from lowmem_eraser import attach_erasers
from lowmem_eraser.cli import main as cli_main
from lowmem_eraser.config import LossConfig
from lowmem_eraser.memory import LiveTensorTracker, tensor_bytes
from lowmem_eraser.plan import (
    MODEL_PRESETS,
    PRESETS,
    ModelFacts,
    PlanError,
    Predictor,
    RunSpec,
    Setting,
    block_sizes,
    build_transformer,
    check_video,
    configured_setting,
    measure_step,
    model_spec,
    step_inputs,
)
from lowmem_eraser.stages import CLIP_L_TEXT, LLAVA_LLAMA3_8B, UMT5_XXL, _encoder, default_dtype, text_encoder_bytes

GiB = 2**30
LOSS = LossConfig(alpha=1.0, beta=0.5)

# Published parameter counts of the transformers (model cards: Wan2.1 "1.3B" / "14B", Wan2.2 "TI2V-5B",
# HunyuanVideo "13B" = 12.8e9 in its report's table), to within 3 %.
PUBLISHED = {"wan2.1-1.3b": 1.42e9, "wan2.1-14b": 14.3e9, "wan2.2-ti2v-5b": 5.0e9, "hunyuanvideo": 12.8e9}
NEW_PRESETS = list(PUBLISHED)

SMALL_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
                 text_dim=32, freq_dim=32, ffn_dim=128, num_layers=4, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)
# 4 dual- and 4 single-stream blocks: both stacks deeper than the simulated copies
SMALL_HUNYUAN = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=4,
                     num_single_layers=4, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
                     text_embed_dim=32, pooled_projection_dim=16, rope_axes_dim=(4, 6, 6))
SMALL = {"WanTransformer3DModel": SMALL_WAN, "HunyuanVideoTransformer3DModel": SMALL_HUNYUAN}
# Models this small have depth-independent peaks (the concept-mask pass, the 256-512 text tokens) that the 2- and
# 3-block extrapolation only passes once the per-block activations outgrow them: Wan at 48 video tokens, HunyuanVideo
# at 320 (at 48 its no-checkpointing peak still moves between 2 and 3 single-stream blocks: -11 %). At full size the
# per-block terms are linear from 2 blocks on (checked: 61x544x960, 2/3/4 single-stream blocks, equal differences).
VIDEO = {"WanTransformer3DModel": check_video(9, 64, 64), "HunyuanVideoTransformer3DModel": check_video(17, 128, 128)}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", NEW_PRESETS)
def test_the_preset_builds_the_published_model(name):
    import diffusers

    preset = MODEL_PRESETS[name]
    with torch.device("meta"):
        transformer = getattr(diffusers, preset.transformer_class).from_config(PRESETS[name])
    params = sum(p.numel() for p in transformer.parameters())
    print(f"{name}: {params / 1e9:.3f}e9 parameters (published {PUBLISHED[name] / 1e9}e9)")
    assert params == pytest.approx(PUBLISHED[name], rel=0.03)
    assert model_spec(name).depth == len(block_sizes(transformer))


def test_the_text_stage_weights_are_the_encoders_parameters():
    """Text-stage weights = parameter count x 2 bytes (bf16), and the counts are the published encoders'."""
    expected = {"umt5": 5.68e9, "llama": 7.50e9, "clip_text_model": 0.123e9}  # UMT5-XXL encoder, LLaMA-3-8B body
    for config in (UMT5_XXL, LLAVA_LLAMA3_8B, CLIP_L_TEXT):
        with torch.device("meta"), default_dtype(torch.bfloat16):
            encoder = _encoder(config)
        params = sum(p.numel() for p in encoder.parameters())
        buffers = sum(b.numel() * b.element_size() for b in encoder.buffers())  # LLaMA's rotary inv_freq: 256 B
        assert params == pytest.approx(expected[config["model_type"]], rel=0.01)
        assert buffers < 4096
        assert text_encoder_bytes(config, torch.bfloat16) == 2 * params + buffers


def _measured(cls, setting, video, rank=8):
    """Ground truth: the same step on real fp32 tensors of the full-depth small model."""
    torch.manual_seed(0)
    transformer = build_transformer(SMALL[cls], setting, torch.float32, cls)
    erasers = attach_erasers(transformer, rank=rank)
    erasers.kernels = "torch"
    inputs = step_inputs(transformer, video, setting.batch, torch.float32, facts=ModelFacts(cls))
    return transformer, erasers, inputs, measure_step(transformer, erasers, inputs, LOSS)


@pytest.mark.parametrize("cls", list(SMALL))
def test_predicted_step_peak_matches_the_measured_step(cls):
    video = VIDEO[cls]
    predictor = Predictor(SMALL[cls], video, rank=8, loss=LOSS, dtype=torch.float32, int8_backend="int8",
                          facts=ModelFacts(cls))
    for setting in (Setting("int8", True), Setting("none", False)):
        transformer, erasers, inputs, (peak, flops) = _measured(cls, setting, video)
        predicted = predictor.predict(setting)
        error = predicted.step_peak / peak - 1
        print(f"{cls} {setting.label}: predicted {predicted.step_peak} B, measured {peak} B ({error:+.2%})")
        assert abs(error) <= 0.05
        assert predicted.flops == pytest.approx(flops, rel=1e-9)
        assert predicted.weights == tensor_bytes(transformer)
        assert predicted.adapter_state == 3 * tensor_bytes(erasers)
        assert predicted.inputs == inputs.nbytes


@pytest.mark.parametrize("cls", list(SMALL))
def test_predicted_sampling_forward_matches_the_measured_forward(cls):
    video = VIDEO[cls]
    predictor = Predictor(SMALL[cls], video, rank=8, loss=LOSS, dtype=torch.float32, int8_backend="int8",
                          facts=ModelFacts(cls))
    predicted, inputs_bytes = predictor.forward_peak(Setting("none", False), 1)
    torch.manual_seed(0)
    transformer = build_transformer(SMALL[cls], Setting("none", False), torch.float32, cls)
    inputs = step_inputs(transformer, video, 1, torch.float32, facts=ModelFacts(cls))
    with torch.no_grad(), LiveTensorTracker() as tracker:
        predictor.arch.velocity(transformer, inputs.x_t, inputs.t, inputs.c, inputs.extras)
    print(f"{cls}: predicted {predicted} B, measured {tracker.peak_bytes} B")
    assert abs(predicted / tracker.peak_bytes - 1) <= 0.05
    assert inputs_bytes == inputs.nbytes


def test_streaming_hunyuan_blocks_follows_execution_order_and_the_offloader():
    """HunyuanVideo's streamed blocks are the first N in execution order (dual-stream first, then single): the
    predicted device weights equal BlockOffloader's resident tensors + slots, for N inside and across stacks."""
    from lowmem_eraser.offload import BlockOffloader

    cls = "HunyuanVideoTransformer3DModel"
    predictor = Predictor(SMALL_HUNYUAN, check_video(9, 64, 64, None), rank=8, loss=LOSS, dtype=torch.float32,
                          facts=ModelFacts(cls))
    for swap in (3, 6):
        transformer = build_transformer(SMALL_HUNYUAN, Setting("int8", True), torch.float32, cls)
        blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
        resident = tensor_bytes(transformer) - sum(tensor_bytes(b) for b in blocks[:swap])
        with BlockOffloader(transformer, "cpu", stream=True, blocks=swap) as offloader:
            assert predictor.weights(Setting("int8", True, swap)) == resident + offloader.slot_bytes, swap
            assert offloader.host_bytes == sum(predictor._block_sizes(Setting("int8", True))[:swap]), swap


def _shipped(name: str):
    from lowmem_eraser.config import TrainConfig

    return TrainConfig.from_dict(yaml.safe_load(open(f"configs/{name}.yaml").read()))


# (config, preset, budget GiB): the shipped configs, whole process at the preset's default video, batch 1, rank 128.
TARGETS = [("wan2.1-1.3b", "wan2.1-1.3b", 24), ("wan2.1-1.3b-8gb", "wan2.1-1.3b", 8), ("wan2.1-14b", "wan2.1-14b", 24)]


@pytest.mark.parametrize("config_name, preset, budget", TARGETS)
def test_the_shipped_wan_configs_fit_their_budgets(config_name, preset, budget):
    config = _shipped(config_name)
    spec = model_spec(preset)
    assert (config.video.frames, config.video.height, config.video.width) == MODEL_PRESETS[preset].video
    predictor = Predictor(spec.transformer, config.video, config.eraser.rank, config.loss, text_config=spec.text_encoder,
                          vae_config=None, facts=spec.facts)
    setting = configured_setting(config.memory, 1, predictor.depth)
    process = predictor.process(setting, RunSpec(prompts=10, text_encoder=config.memory.text_encoder), budget * GiB)
    print(config_name, {stage.name: round(stage.needs / GiB, 2) for stage in process.stages})
    assert process.fits(budget * GiB)


def test_hunyuanvideo_fits_24gb_at_61x544x960():
    """The shipped HunyuanVideo setting (written by `plan --config-out`), its concept mask from the dual-stream
    blocks simulated with the step."""
    config = _shipped("hunyuanvideo")
    spec = model_spec("hunyuanvideo")
    assert (config.video.frames, config.video.height, config.video.width) == (61, 544, 960)
    predictor = Predictor(spec.transformer, config.video, config.eraser.rank, config.loss,
                          text_config=spec.text_encoder, vae_config=None, facts=spec.facts)
    assert predictor.depth == 60
    setting = configured_setting(config.memory, 1, predictor.depth)
    process = predictor.process(setting, RunSpec(prompts=10, text_encoder=config.memory.text_encoder), 24 * GiB)
    print({stage.name: round(stage.needs / GiB, 2) for stage in process.stages})
    assert process.fits(24 * GiB)


def test_activation_offload_extrapolates_from_where_the_per_block_slope_has_settled():
    """With activation offload backward holds the input of the block it recomputes and the prefetched one before
    it: flat from 3 blocks on, not from 2. The prediction for a 6-block Wan2.1-14B must equal the 6-block
    simulation (the (2, 3) extrapolation over-predicted 40 blocks by 11 GiB)."""
    spec = model_spec("wan2.1-14b")
    config = {**spec.transformer, "num_layers": 6}
    predictor = Predictor(config, check_video(81, 480, 832, "wan2.1-14b"), 128, LossConfig(alpha=1.0, beta=0.5),
                          facts=spec.facts)
    setting = Setting("int8", True, 0, True, 1)
    predicted, simulated = predictor.predict(setting).step_peak, predictor.simulate(setting, 6).step_peak
    print(f"6 blocks, offloaded: predicted {predicted / GiB:.3f} GiB, simulated {simulated / GiB:.3f} GiB")
    assert abs(predicted - simulated) <= 0.01 * simulated


@pytest.mark.parametrize("model", ["wan2.1-1.3b", "hunyuanvideo"])
def test_plan_cli_for_each_family(model, tmp_path, capsys):
    """One end-to-end `plan` per family at a tiny video, text encoder on the CPU, writing a config."""
    out = tmp_path / "planned.yaml"
    args = ["plan", "--model", model, "--frames", "9", "--height", "64", "--width", "64", "--rank", "8",
            "--alpha", "0", "--beta", "0", "--text-encoder", "cpu", "--budget", "24GB", "--config-out", str(out)]
    assert cli_main(args) == 0
    text = capsys.readouterr().out
    assert "<- pick" in text and f"model {model}, 9x64x64" in text
    written = yaml.safe_load(out.read_text())
    assert written["model"] == f"models/{MODEL_PRESETS[model].folder}"
    assert written["video"] == {"frames": 9, "height": 64, "width": 64}


def test_family_video_rules_name_the_option():
    assert check_video(61, 544, 960, "hunyuanvideo").frames == 61  # 4k+1
    with pytest.raises(PlanError, match="--frames: expected 8k\\+1"):
        check_video(61, 480, 720, "cogvideox-5b")
    with pytest.raises(PlanError, match="--height: expected a positive multiple of 32"):
        check_video(121, 720, 1280, "wan2.2-ti2v-5b")  # 16x VAE x patch 2

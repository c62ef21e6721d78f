"""Wan and HunyuanVideo through the whole engine: tiny folders of the real diffusers/transformers classes (random
weights, built offline: WanTransformer3DModel + UMT5 + FlowMatchEulerDiscreteScheduler + Wan VAE;
HunyuanVideoTransformer3DModel + LLaMA + CLIP + flow matching + HunyuanVideo VAE) trained with `lowmem-eraser
train`, sampled with the family's pipeline, generated with `infer`.

The tiny Wan's cross-attention output is scaled up (`text_gain`): at random init the prompt moves Wan's
prediction by ~0.2 %, so erasure would be invisible in a test.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from lowmem_eraser import erasers_disabled, load_erasers
from lowmem_eraser.cli import main as cli_main
from lowmem_eraser.errors import TrainingError
from lowmem_eraser.families import HUNYUAN_VIDEO, WAN
from lowmem_eraser.sampling import renoise
from lowmem_eraser.tiny import build_tiny_hunyuan, build_tiny_wan
from test_train import make_config  # the tiny CogVideoX runs' config: a `model/` folder and its prompts.yaml

PAIRS = [
    ["a red ball moving left", "a blue ball moving left"],
    ["a red square moving up", "a green square moving up"],
    ["a small red ball drifting right", "a small yellow ball drifting right"],
]
TEXT_LENGTH = {"Wan": 512, "HunyuanVideo": 256}  # the pipelines' max_sequence_length
FAMILIES = ["Wan", "HunyuanVideo"]
# The published eraser keys of the tiny models' two eraser blocks.
# Per family: learning rate of the 40-step runs below, and the bound |v'(c) - v_neg| must fall under (as a share of
# its start; measured: Wan 0.875 at lr 1e-3, HunyuanVideo 0.965 at lr 1e-2: its text moves the tiny model's
# prediction 80x more than Wan's, so v_neg is far and 40 steps close only a few percent of the gap).
TRAINING = {"Wan": (1.0e-3, 0.95), "HunyuanVideo": (1.0e-2, 0.98)}
ERASER_KEYS = {"Wan": ["blocks.0.attn2.adapter", "blocks.1.attn2.adapter"],
               "HunyuanVideo": ["single_transformer_blocks.0.attn.adapter", "single_transformer_blocks.1.attn.adapter"]}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Built on first use, one folder per family."""
    built = {}

    def get(name):
        if name not in built:
            folder = tmp_path_factory.mktemp(f"tiny_{name.lower()}")
            texts = [p for pair in PAIRS for p in pair]
            if name == "Wan":
                build_tiny_wan(folder / "model", texts, with_vae=True, text_gain=10.0)
            else:
                build_tiny_hunyuan(folder / "model", texts, with_vae=True)
            (folder / "prompts.yaml").write_text(yaml.safe_dump(PAIRS))
            built[name] = folder
        return built[name]

    return get


@pytest.fixture(scope="module")
def wan_model(models):
    return models("Wan")


def test_prompts_are_encoded_exactly_as_wan_pipeline_encodes_them(wan_model, tmp_path):
    from diffusers import WanPipeline
    from transformers import AutoTokenizer, UMT5EncoderModel

    from lowmem_eraser.text import encode_prompts

    model = wan_model / "model"
    pairs = [tuple(pair) for pair in PAIRS]
    text = encode_prompts(model, pairs, "red", TEXT_LENGTH["Wan"], torch.float32, torch.device("cpu"), tmp_path)
    pipe = WanPipeline(tokenizer=AutoTokenizer.from_pretrained(model / "tokenizer"),
                       text_encoder=UMT5EncoderModel.from_pretrained(model / "text_encoder"), vae=None,
                       scheduler=None, transformer=None)
    with torch.no_grad():
        expected = pipe.encode_prompt([t for t, _ in pairs] + [p for _, p in pairs] + [""],
                                      do_classifier_free_guidance=False, max_sequence_length=TEXT_LENGTH["Wan"])[0]
    assert torch.equal(torch.cat([text.target, text.preserve, text.empty]), expected)
    words = len(PAIRS[0][0].split())
    assert text.target.shape == (3, TEXT_LENGTH["Wan"], 24)
    assert text.target[0, : words + 1].abs().sum(-1).gt(0).all()  # words + </s>
    assert text.target[0, words + 1 :].abs().sum() == 0  # WanPipeline zeroes everything after the prompt
    assert text.concept_tokens.shape == (3, TEXT_LENGTH["Wan"])
    assert text.concept_tokens.nonzero().tolist() == [[0, 1], [1, 1], [2, 2]]  # "red" in each target prompt


def test_hunyuan_prompts_are_encoded_as_its_pipeline_encodes_them_after_the_template(models, tmp_path):
    """LLaMA hidden states of the prompt inside the pipeline's template, cropped to the prompt; CLIP's pooled
    vector; the mask; the concept found in the prompt only, never in the template's own words."""
    from diffusers import HunyuanVideoPipeline
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from transformers import AutoTokenizer, CLIPTextModel, LlamaModel

    from lowmem_eraser.text import encode_prompts

    model = models("HunyuanVideo") / "model"
    pairs = [tuple(pair) for pair in PAIRS]
    text = encode_prompts(model, pairs, "red", 256, torch.float32, torch.device("cpu"), tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(model / "tokenizer")
    template = DEFAULT_PROMPT_TEMPLATE["template"]
    ids = tokenizer(template.format("a red ball"))["input_ids"]
    crop = ids.index(tokenizer.convert_tokens_to_ids("a"), ids.index(tokenizer.convert_tokens_to_ids("user")))
    pipe = HunyuanVideoPipeline(text_encoder=LlamaModel.from_pretrained(model / "text_encoder"), tokenizer=tokenizer,
                                transformer=None, vae=None, scheduler=None,
                                text_encoder_2=CLIPTextModel.from_pretrained(model / "text_encoder_2"),
                                tokenizer_2=AutoTokenizer.from_pretrained(model / "tokenizer_2"))
    with torch.no_grad():
        embeds, pooled, mask = pipe.encode_prompt([t for t, _ in pairs], prompt_template={"template": template,
                                                                                          "crop_start": crop})
    assert torch.equal(text.target.embeds, embeds) and torch.equal(text.target.pooled, pooled)
    assert torch.equal(text.target.mask, mask) and text.target.shape == (3, 256, 24)
    assert mask[0].tolist() == [1] * 6 + [0] * 250  # "a red ball moving left" + <|eot_id|>
    assert text.concept_tokens.nonzero().tolist() == [[0, 1], [1, 1], [2, 2]]  # "red" in each target prompt

    runtime = HUNYUAN_VIDEO.runtime  # "color" is a word of the template: only a prompt's own "color" counts
    found = runtime.concept_tokens(tokenizer, ["a red ball", "a ball of red color"], "color", 256)
    assert found.nonzero().tolist() == [[1, 4]]


def test_hunyuan_renoise_draws_from_its_pipelines_sigma_grid(models):
    """HunyuanVideoPipeline sets σ = linspace(1, 0, n + 1)[:-1] (then shift 7): x_t = (1 − σ)·x0 + σ·ε there."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoTransformer3DModel

    transformer = HunyuanVideoTransformer3DModel.from_pretrained(models("HunyuanVideo") / "model" / "transformer")
    x0 = torch.randn(64, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x_t, t = renoise(transformer, FlowMatchEulerDiscreteScheduler(shift=7.0), x0, torch.Generator().manual_seed(5),
                     num_inference_steps=4)
    replay = torch.Generator().manual_seed(5)
    index = torch.randint(0, 4, (64,), generator=replay)
    noise = torch.randn(x0.shape, generator=replay)
    plain = torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64)
    sigma = (7 * plain / (1 + 6 * plain))[index]  # the scheduler's shift, written out
    assert torch.allclose(t.double(), sigma * 1000, atol=1e-3)
    expected = (1 - sigma.view(-1, 1, 1, 1, 1)) * x0.double() + sigma.view(-1, 1, 1, 1, 1) * noise.double()
    assert (x_t.double() - expected).abs().max() < 1e-6


@pytest.mark.parametrize("scheduler_name", ["FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler"])
def test_flow_matching_renoise_is_the_schedulers_forward_process_on_the_shifted_grid(wan_model, scheduler_name):
    """x_t = (1 − σ)·x0 + σ·ε with (t, σ) a point of the pipeline's inference grid (shift 3), against fp64
    arithmetic on the same draws; UniPC with flow sigmas (Wan's published scheduler) noises the same way."""
    import diffusers
    from diffusers import WanTransformer3DModel

    transformer = WanTransformer3DModel.from_pretrained(wan_model / "model" / "transformer")
    if scheduler_name == "UniPCMultistepScheduler":
        scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                      flow_shift=3.0)
    else:
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    x0 = torch.randn(64, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x_t, t = renoise(transformer, scheduler, x0, torch.Generator().manual_seed(5), num_inference_steps=10)

    grid = type(scheduler).from_config(scheduler.config)
    grid.set_timesteps(10)
    replay = torch.Generator().manual_seed(5)  # the same draws renoise made: grid index, then ε
    index = torch.randint(0, 10, (64,), generator=replay)
    noise = torch.randn(x0.shape, generator=replay)
    sigma = grid.sigmas[index].double().view(-1, 1, 1, 1, 1)
    assert torch.equal(t, grid.timesteps[index])
    assert len(set(t.tolist())) > 5  # the draw spreads over the grid
    # the grid's t is 1000·σ (shifted): FlowMatchEuler keeps it exact, UniPC rounds it to an integer < 1000
    assert (sigma.flatten() * 1000 - t.double()).abs().max() <= 1.0
    assert 0 < sigma.min() and sigma.max() <= 1 and grid.sigmas[:10].median() > 0.6  # shift 3: mostly high noise
    expected = (1 - sigma) * x0.double() + sigma * noise.double()
    assert (x_t.double() - expected).abs().max() < 1e-6  # fp32 arithmetic on values of order 1


def _call(name, transformer, x_t, t, text, guidance):
    """The transformer called as the family's pipeline calls it, written out here (not through the runtime)."""
    if name == "Wan":
        return transformer(hidden_states=x_t, encoder_hidden_states=text, timestep=t, return_dict=False)[0]
    n = x_t.shape[0]
    return transformer(hidden_states=x_t, timestep=t, encoder_hidden_states=text["embeds"].expand(n, -1, -1),
                       encoder_attention_mask=text["mask"].expand(n, -1).float(),
                       pooled_projections=text["pooled"].expand(n, -1), guidance=torch.full((n,), guidance * 1000.0),
                       return_dict=False)[0]


def _velocities(name, model, out, guidance):
    """v(x_t, ·) of the frozen model and v'(x_t, ·) of the erased one on the run's cached x0, at fixed draws."""
    import diffusers

    text = torch.load(next((out / "cache").glob("text-*.pt")), weights_only=True)
    x0 = torch.stack([torch.load(p, weights_only=True) for p in sorted(next((out / "cache").glob("x0-*")).glob("*.pt"))])
    transformer_class = getattr(diffusers, {"Wan": WAN, "HunyuanVideo": HUNYUAN_VIDEO}[name].transformer_classes[0])
    transformer = transformer_class.from_pretrained(model / "transformer")
    load_erasers(transformer, out)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(123))
    t = torch.full((x0.shape[0],), 750.0)
    x_t = 0.25 * x0 + 0.75 * noise  # σ = t / 1000

    def v(condition):
        return _call(name, transformer, x_t, t, condition, guidance)

    with torch.no_grad():
        with erasers_disabled(transformer):
            empty = text["empty"] if name == "HunyuanVideo" else text["empty"].expand(x0.shape[0], -1, -1)
            base = v(text["target"]), v(empty), v(text["preserve"])
        erased = v(text["target"]), v(text["preserve"])
    return base, erased


@pytest.mark.parametrize("name", FAMILIES)
def test_train_moves_the_erased_prediction_toward_the_negative_target_and_beta_holds_the_preservation(
        models, name, tmp_path):
    """Fixed draws (the runs' cached x0, one ε, σ = 0.75). A random tiny model barely tells "red" from "blue",
    so the unlearning term drags the preservation prompt along; β·L_pre must hold it closer (as for CogVideoX)."""
    eta, drift, root = 3.0, {}, models(name)
    lr, bound = TRAINING[name]
    for beta in (0.0, 1.0):
        out = tmp_path / f"beta{beta}"
        config = make_config(root, out, train={"steps": 40, "lr": lr}, loss={"beta": beta})
        assert cli_main(["train", "--config", str(config)]) == 0
        (base_c, base_empty, base_pre), (erased_c, erased_pre) = _velocities(name, root / "model", out, 4.0)
        v_neg = base_empty - eta * (base_c - base_empty)
        before, after = (base_c - v_neg).norm().item(), (erased_c - v_neg).norm().item()
        drift[beta] = (erased_pre - base_pre).norm().item()
        print(f"{name} beta={beta}: |v'(c) - v_neg| {before:.4g} -> {after:.4g}; "
              f"|v'(c_pre) - v(c_pre)| = {drift[beta]:.4g}")
        assert after < bound * before

        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 40 and all(np.isfinite(r["loss"]) for r in rows)
        assert any(r["loc"] > 0 for r in rows)  # the family's concept mask reached L_loc
    assert drift[1.0] < 0.9 * drift[0.0]  # measured: Wan 0.62x, HunyuanVideo 0.81x
    weights = torch.load(out / "eraser_weights.pt", weights_only=True)
    assert sorted(weights) == ERASER_KEYS[name]  # the published layout: outer keys
    assert json.loads((out / "lowmem_eraser.json").read_text())["family"] == name


@pytest.mark.parametrize("name", FAMILIES)
def test_trajectory_sampling_and_validation_videos_through_the_familys_pipeline_and_vae(models, name, tmp_path):
    config = make_config(models(name), tmp_path / "run", sampling={"mode": "trajectory"}, train={"steps": 2},
                         validation={"every": 2, "prompts": ["a red ball moving left"], "num_inference_steps": 2})
    assert cli_main(["train", "--config", str(config)]) == 0
    gif = tmp_path / "run" / "validation" / "step-000002" / "00.gif"
    from PIL import Image

    with Image.open(gif) as image:
        assert image.n_frames == 9 and image.size[1] == 64  # base | bar | erased, 9 decoded frames of 64 px


@pytest.mark.parametrize("name", FAMILIES)
def test_infer_generates_a_video_and_strength_zero_is_the_base_model(models, name, tmp_path):
    from PIL import Image

    from lowmem_eraser.infer import Generation, infer

    root = models(name)
    config = make_config(root, tmp_path / "run", train={"steps": 3})
    assert cli_main(["train", "--config", str(config)]) == 0
    spec = Generation(prompt="a red ball moving left", steps=2, frames=9, height=64, width=64, guidance=4.0)
    halves = {}
    for strength in (0.0, 1.0):
        path = infer(root / "model", tmp_path / "run", spec, tmp_path / f"s{strength}.gif", strength=strength,
                     compare=True)
        with Image.open(path) as image:
            frames = []
            for i in range(image.n_frames):
                image.seek(i)
                frames.append(np.asarray(image.convert("RGB")))
        video = np.stack(frames)
        assert video.shape[:3] == (9, 64, 64 * 2 + 2)  # base | 2-px bar | erased
        halves[strength] = video[:, :, :64], video[:, :, -64:]
    assert np.array_equal(*halves[0.0])  # strength 0: the erased half is the base half exactly
    assert not np.array_equal(*halves[1.0])


def test_sampling_latents_follow_the_vaes_compression_without_loading_it(wan_model, tmp_path):
    """Wan2.2's VAE compresses 16x: the pipeline built without a VAE must read that from vae/config.json."""
    import shutil

    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    from lowmem_eraser.config import SamplingConfig, VideoConfig
    from lowmem_eraser.sampling import _generate, make_pipeline

    folder = tmp_path / "model"
    shutil.copytree(wan_model / "model", folder)
    config = json.loads((folder / "vae" / "config.json").read_text())
    (folder / "vae" / "config.json").write_text(json.dumps({**config, "scale_factor_spatial": 16}))
    transformer = WanTransformer3DModel.from_pretrained(folder / "transformer")
    sampling = SamplingConfig(num_inference_steps=1, guidance_scale=1.0)
    text = torch.zeros(1, 8, 24)
    for model, size in ((None, 8), (wan_model / "model", 8), (folder, 4)):
        pipe = make_pipeline(transformer, FlowMatchEulerDiscreteScheduler(shift=3.0), model)
        pipe.set_progress_bar_config(disable=True)
        latents = _generate(pipe, text, text, VideoConfig(frames=9, height=64, width=64), sampling,
                            torch.Generator().manual_seed(0), torch.device("cpu"))
        assert latents.shape == (1, 4, 3, size, size)  # [B, C, F, H/s, W/s]


def test_wan22_ti2v_timesteps_go_per_token_as_its_pipeline_passes_them(wan_model, tmp_path):
    """model_index.json `expand_timesteps: true` (Wan2.2-TI2V-5B): the sampling pipeline gets it, and the
    training passes give the transformer t for every video token, [B, tokens], as WanPipeline does; the values
    equal the scalar-t call within fp32 rounding."""
    import shutil

    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    from lowmem_eraser.config import VideoConfig
    from lowmem_eraser.sampling import make_pipeline, step_extras
    from lowmem_eraser.train import velocity

    folder = tmp_path / "model"
    shutil.copytree(wan_model / "model", folder)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "expand_timesteps": True}))
    transformer = WanTransformer3DModel.from_pretrained(folder / "transformer")
    seen = []
    transformer.register_forward_pre_hook(lambda m, a, k: seen.append(k["timestep"].shape), with_kwargs=True)
    video = VideoConfig(frames=9, height=64, width=64)
    pipes = {m: make_pipeline(transformer, FlowMatchEulerDiscreteScheduler(), m) for m in (wan_model / "model", folder)}
    assert [bool(p.config.expand_timesteps) for p in pipes.values()] == [False, True]
    x_t, t, text = torch.randn(2, 4, 3, 8, 8), torch.tensor([900.0, 300.0]), torch.randn(2, 12, 24)
    with torch.no_grad():
        plain, expanded = (velocity(transformer, x_t, t, text, step_extras(p, video, 4.0, "cpu")) for p in pipes.values())
    assert seen == [(2,), (2, 3 * 4 * 4)]  # 3 latent frames x (8/2)^2 patches
    assert (plain - expanded).abs().max() < 1e-5


def test_a_concept_cut_off_by_the_template_and_length_is_named_in_one_warning(models, caplog):
    """HunyuanVideo's template comes first and the prompt is cut at max length after it: "red" as the 3rd word
    of a prompt is gone at 2 tokens; the warning names that prompt, and apart from it one without the concept."""
    from transformers import AutoTokenizer

    from lowmem_eraser.train import warn_missing_concept

    tokenizer = AutoTokenizer.from_pretrained(models("HunyuanVideo") / "model" / "tokenizer")
    prompts = ["a red ball moving left", "a small red ball drifting right", "a blue ball moving left"]
    tokens = HUNYUAN_VIDEO.runtime.concept_tokens(tokenizer, prompts, "red", 2)
    assert tokens.tolist() == [[False, True], [False, False], [False, False]]
    with caplog.at_level("WARNING"):
        warn_missing_concept("red", prompts, tokens, 2)
    (message,) = [r.getMessage() for r in caplog.records if r.name == "lowmem_eraser.train"]
    assert "no tokens in 2 of 3 target prompts" in message
    assert "cut off by the 2-token text length: 'a small red ball drifting right'" in message
    assert "not in the prompt: 'a blue ball moving left'" in message


def test_sizes_the_wan22_vae_cannot_take_and_validation_without_a_vae_are_refused_before_any_work(wan_model,
                                                                                               tmp_path):
    """Wan2.2's VAE compresses 16x and the patch is 2: 64 px is 2 latent patches, 80 px would be resized by the
    pipeline behind the user's back. A Wan folder without vae/ cannot decode validation videos."""
    import shutil

    from lowmem_eraser.config import ConfigError, load_config
    from lowmem_eraser.errors import LowmemEraserError
    from lowmem_eraser.infer import Generation, infer

    root = tmp_path / "wan22"
    shutil.copytree(wan_model, root)
    vae = root / "model" / "vae" / "config.json"
    vae.write_text(json.dumps({**json.loads(vae.read_text()), "scale_factor_spatial": 16}))
    with pytest.raises(ConfigError, match="video.height: expected a multiple of 32 for this model .* got 80"):
        load_config(make_config(root, tmp_path / "run", video={"height": 80}))
    with pytest.raises(LowmemEraserError, match="--width: expected a multiple of 32 for this model .* got 48"):
        infer(root / "model", tmp_path / "none", Generation("a red ball", width=48), tmp_path / "x.gif")
    shutil.rmtree(root / "model" / "vae")
    with pytest.raises(ConfigError, match="validation.every: 2 needs the model's vae/"):
        load_config(make_config(root, tmp_path / "run", validation={"every": 2, "prompts": ["a red ball"]}))


@pytest.fixture(scope="module")
def a14b_model(models, tmp_path_factory):
    """A two-expert Wan2.2 folder: the tiny Wan as `transformer` (high noise) and another as `transformer_2`
    (low noise), switched at boundary_ratio 0.5 (A14B's T2V model uses 0.875)."""
    import shutil

    from diffusers import WanTransformer3DModel

    from lowmem_eraser.tiny import TINY_WAN

    root = tmp_path_factory.mktemp("tiny_a14b")
    shutil.copytree(models("Wan"), root, dirs_exist_ok=True)
    torch.manual_seed(7)
    second = WanTransformer3DModel(**TINY_WAN)
    with torch.no_grad():
        for block in second.blocks:
            block.attn2.to_out[0].weight.mul_(10.0)
    second.save_pretrained(root / "model" / "transformer_2")
    (root / "model" / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "boundary_ratio": 0.5}))
    return root


def test_wan22_a14b_trains_each_expert_on_the_timesteps_it_serves_into_one_file(a14b_model, tmp_path, monkeypatch):
    from diffusers import WanTransformer3DModel

    from lowmem_eraser import train as train_module
    from lowmem_eraser.config import load_config

    calls = []
    real = train_module.eraser_losses_backward

    def recording(transformer, erasers, batch, *args, **kwargs):
        calls.append((erasers.keys()[0], batch.t.tolist()))
        return real(transformer, erasers, batch, *args, **kwargs)

    monkeypatch.setattr(train_module, "eraser_losses_backward", recording)
    config = load_config(make_config(a14b_model, tmp_path / "run", train={"steps": 12, "batch_size": 2,
                                                                          "save_every": 6}))
    out = train_module.train(config)
    served = {"high": [], "low": []}
    for first_key, ts in calls:
        served["low" if first_key.startswith("transformer_2.") else "high"].extend(ts)
    print({k: sorted(set(v)) for k, v in served.items()})
    assert served["high"] and served["low"]  # both experts trained
    assert min(served["high"]) >= 500 > max(served["low"])  # each on its own timesteps (boundary 0.5 x 1000)

    weights = torch.load(out / "eraser_weights.pt", weights_only=True)
    assert sorted(weights) == ["blocks.0.attn2.adapter", "blocks.1.attn2.adapter",
                               "transformer_2.blocks.0.attn2.adapter", "transformer_2.blocks.1.attn2.adapter"]
    assert all(v["up.weight"].abs().sum() > 0 for v in weights.values())  # every expert's erasers moved
    for name in ("transformer", "transformer_2"):
        expert = WanTransformer3DModel.from_pretrained(a14b_model / "model" / name)
        loaded = load_erasers(expert, out, expert=name)
        assert len(loaded) == 2

    # resumable: the two sets are one state
    resumed = load_config(make_config(a14b_model, tmp_path / "run", train={"steps": 14, "batch_size": 2,
                                                                           "save_every": 6}))
    train_module.train(resumed, resume=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(14))


def test_infer_on_wan22_a14b_loads_each_experts_erasers(a14b_model, tmp_path):
    from PIL import Image

    from lowmem_eraser.infer import Generation, infer

    assert cli_main(["train", "--config", str(make_config(a14b_model, tmp_path / "run", train={"steps": 4}))]) == 0
    spec = Generation(prompt="a red ball moving left", steps=2, frames=9, height=64, width=64, guidance=4.0)
    path = infer(a14b_model / "model", tmp_path / "run", spec, tmp_path / "s0.gif", strength=0.0, compare=True)
    with Image.open(path) as image:
        video = np.asarray(image.convert("RGB"))
    assert np.array_equal(video[:, :64], video[:, -64:])  # strength 0 on both experts: the base model


@pytest.mark.parametrize("model, sampling", [("Wan", "trajectory"), ("A14B", "trajectory"), ("A14B", "renoise")])
def test_adversarial_training_on_wan_noises_at_the_steps_timesteps_and_splits_with_the_experts(
        models, a14b_model, model, sampling, tmp_path, monkeypatch):
    """Wan with UniPC (its published scheduler) along a trajectory: the adversarial latents are made at the step's
    t, which must be a point of the grid the flow noising looks up (off the grid is an error: test below); Wan2.2
    A14B: a renoise batch mixing both experts' timesteps reaches each expert in parts, each sample with its own
    adversarial latents (matched row by row against the whole batch's)."""
    from lowmem_eraser import train as train_module

    drawn, parts = [], []
    real_draw, real_step = train_module.draw_batch, train_module.eraser_losses_backward

    def recording_draw(session, step):
        batch, index = real_draw(session, step)
        drawn.append(batch)
        return batch, index

    def recording_step(transformer, erasers, batch, *args, **kwargs):
        parts.append((len(drawn) - 1, batch))
        return real_step(transformer, erasers, batch, *args, **kwargs)

    monkeypatch.setattr(train_module, "draw_batch", recording_draw)
    monkeypatch.setattr(train_module, "eraser_losses_backward", recording_step)
    root = a14b_model
    if model == "Wan":
        import shutil

        import diffusers

        root = tmp_path / "wan"
        shutil.copytree(models("Wan"), root)
        shutil.rmtree(root / "model" / "scheduler")
        diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                          flow_shift=3.0).save_pretrained(root / "model" / "scheduler")
    config = make_config(root, tmp_path / "run", sampling={"mode": sampling},
                         loss={"adversarial": {"every": 1, "tokens": 2, "inner_steps": 1}},
                         train={"steps": 4, "batch_size": 2})
    assert cli_main(["train", "--config", str(config)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(row["adv"] > 0 and np.isfinite(row["loss"]) for row in rows)
    own = sampling == "trajectory"
    for step, part in parts:
        whole = drawn[step]
        assert (part.adversarial.x_t is not None) == own
        for i in range(part.x_t.shape[0]):  # each sample keeps its own latents through the split
            j = next(j for j in range(whole.x_t.shape[0]) if torch.equal(whole.x_t[j], part.x_t[i]))
            assert part.t[i] == whole.t[j]
            if own:
                assert torch.equal(part.adversarial.x_t[i], whole.adversarial.x_t[j])
    if model == "A14B" and sampling == "renoise":
        assert len(parts) > len(rows)  # some batch went to both experts in parts


def test_flow_noising_refuses_a_timestep_off_the_inference_grid(wan_model):
    """UniPC's add_noise would take the grid's last σ for a timestep it does not hold, without a word."""
    import diffusers
    from diffusers import WanTransformer3DModel

    from lowmem_eraser.sampling import noise_at

    transformer = WanTransformer3DModel.from_pretrained(wan_model / "model" / "transformer")
    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  flow_shift=3.0)
    grid = type(scheduler).from_config(scheduler.config)
    grid.set_timesteps(10)
    x0 = torch.zeros(2, 4, 3, 8, 8)
    on = noise_at(transformer, scheduler, x0, grid.timesteps[[2, 5]], torch.Generator().manual_seed(0), 10)
    assert on.abs().sum() > 0
    with pytest.raises(TrainingError, match=r"timesteps \[\d+\] are not on the 10-step inference grid"):
        noise_at(transformer, scheduler, x0, torch.tensor([grid.timesteps[2] + 1] * 2), torch.Generator(), 10)

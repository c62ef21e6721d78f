"""Wan through the whole engine: a tiny WanTransformer3DModel + UMT5 + FlowMatchEulerDiscreteScheduler + Wan VAE
folder (random weights, built offline) trained with `lowmem-eraser train`, sampled with WanPipeline, generated
with `infer`.

The tiny model's cross-attention output is scaled up (`text_gain`): at random init the prompt moves Wan's
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
from lowmem_eraser.families import WAN
from lowmem_eraser.sampling import renoise
from lowmem_eraser.tiny import build_tiny_wan

PAIRS = [
    ["a red ball moving left", "a blue ball moving left"],
    ["a red square moving up", "a green square moving up"],
    ["a small red ball drifting right", "a small yellow ball drifting right"],
]
TEXT_LENGTH = 512  # WanPipeline's max_sequence_length: every prompt is padded to it


@pytest.fixture(scope="module")
def wan_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_wan")
    build_tiny_wan(folder / "model", [p for pair in PAIRS for p in pair], with_vae=True, text_gain=10.0)
    (folder / "prompts.yaml").write_text(yaml.safe_dump(PAIRS))
    return folder


def make_config(wan_model, out, **sections):
    config = {
        "model": str(wan_model / "model"),
        "prompts": str(wan_model / "prompts.yaml"),
        "concept": "red",
        "output_dir": str(out),
        "eraser": {"rank": 8},
        "loss": {"eta": 3.0, "alpha": 1.0, "beta": 1.0, "mask_threshold": 0.1},
        "sampling": {"mode": "renoise", "num_inference_steps": 4, "guidance_scale": 4.0},
        "video": {"frames": 9, "height": 64, "width": 64},
        "train": {"steps": 4, "lr": 5.0e-3, "save_every": 100},
        "memory": {"quantize": "int8", "dtype": "float32", "kernels": "torch"},
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_prompts_are_encoded_exactly_as_wan_pipeline_encodes_them(wan_model, tmp_path):
    from diffusers import WanPipeline
    from transformers import AutoTokenizer, UMT5EncoderModel

    from lowmem_eraser.text import encode_prompts

    model = wan_model / "model"
    pairs = [tuple(pair) for pair in PAIRS]
    text = encode_prompts(model, pairs, "red", TEXT_LENGTH, torch.float32, torch.device("cpu"), tmp_path)
    pipe = WanPipeline(tokenizer=AutoTokenizer.from_pretrained(model / "tokenizer"),
                       text_encoder=UMT5EncoderModel.from_pretrained(model / "text_encoder"), vae=None,
                       scheduler=None, transformer=None)
    with torch.no_grad():
        expected = pipe.encode_prompt([t for t, _ in pairs] + [p for _, p in pairs] + [""],
                                      do_classifier_free_guidance=False, max_sequence_length=TEXT_LENGTH)[0]
    assert torch.equal(torch.cat([text.target, text.preserve, text.empty]), expected)
    words = len(PAIRS[0][0].split())
    assert text.target.shape == (3, TEXT_LENGTH, 24)
    assert text.target[0, : words + 1].abs().sum(-1).gt(0).all()  # words + </s>
    assert text.target[0, words + 1 :].abs().sum() == 0  # WanPipeline zeroes everything after the prompt
    assert text.concept_tokens.shape == (3, TEXT_LENGTH)
    assert text.concept_tokens.nonzero().tolist() == [[0, 1], [1, 1], [2, 2]]  # "red" in each target prompt


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


def _velocities(model, out, transformer_class):
    """v(x_t, ·) of the frozen model and v'(x_t, ·) of the erased one on the run's cached x0, at fixed draws."""
    text = torch.load(next((out / "cache").glob("text-*.pt")), weights_only=True)
    x0 = torch.stack([torch.load(p, weights_only=True) for p in sorted(next((out / "cache").glob("x0-*")).glob("*.pt"))])
    transformer = transformer_class.from_pretrained(model / "transformer")
    load_erasers(transformer, out)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(123))
    t = torch.full((x0.shape[0],), 750.0)
    x_t = 0.25 * x0 + 0.75 * noise  # σ = t / 1000

    def v(embeds):
        return transformer(hidden_states=x_t, encoder_hidden_states=embeds, timestep=t, return_dict=False)[0]

    n = x0.shape[0]
    with torch.no_grad():
        with erasers_disabled(transformer):
            base = v(text["target"]), v(text["empty"].expand(n, -1, -1)), v(text["preserve"])
        erased = v(text["target"]), v(text["preserve"])
    return base, erased


def test_train_moves_wans_erased_prediction_toward_the_negative_target_and_beta_holds_the_preservation(
        wan_model, tmp_path):
    """Fixed draws (the runs' cached x0, one ε, σ = 0.75). A random tiny model barely tells "red" from "blue",
    so the unlearning term drags the preservation prompt along; β·L_pre must hold it closer (as for CogVideoX)."""
    from diffusers import WanTransformer3DModel

    eta, drift = 3.0, {}
    for beta in (0.0, 1.0):
        out = tmp_path / f"beta{beta}"
        config = make_config(wan_model, out, train={"steps": 40, "lr": 1.0e-3}, loss={"beta": beta})
        assert cli_main(["train", "--config", str(config)]) == 0
        (base_c, base_empty, base_pre), (erased_c, erased_pre) = _velocities(wan_model / "model", out,
                                                                              WanTransformer3DModel)
        v_neg = base_empty - eta * (base_c - base_empty)
        before, after = (base_c - v_neg).norm().item(), (erased_c - v_neg).norm().item()
        drift[beta] = (erased_pre - base_pre).norm().item()
        print(f"beta={beta}: |v'(c) - v_neg| {before:.4g} -> {after:.4g}; |v'(c_pre) - v(c_pre)| = {drift[beta]:.4g}")
        assert after < 0.95 * before  # measured 0.875x at beta 0

        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 40 and all(np.isfinite(r["loss"]) for r in rows)
        assert any(r["loc"] > 0 for r in rows)  # the concept mask from Wan's attn2 reached L_loc
    assert drift[1.0] < 0.8 * drift[0.0]
    weights = torch.load(out / "eraser_weights.pt", weights_only=True)
    assert sorted(weights) == ["blocks.0.attn2.adapter", "blocks.1.attn2.adapter"]  # published: outer keys
    assert json.loads((out / "lowmem_eraser.json").read_text())["family"] == WAN.name


def test_trajectory_sampling_and_validation_videos_through_wans_pipeline_and_vae(wan_model, tmp_path):
    config = make_config(wan_model, tmp_path / "run", sampling={"mode": "trajectory"}, train={"steps": 2},
                         validation={"every": 2, "prompts": ["a red ball moving left"], "num_inference_steps": 2})
    assert cli_main(["train", "--config", str(config)]) == 0
    gif = tmp_path / "run" / "validation" / "step-000002" / "00.gif"
    from PIL import Image

    with Image.open(gif) as image:
        assert image.n_frames == 9 and image.size[1] == 64  # base | bar | erased, 9 decoded frames of 64 px


def test_infer_generates_a_wan_video_and_strength_zero_is_the_base_model(wan_model, tmp_path):
    from PIL import Image

    from lowmem_eraser.infer import Generation, infer

    config = make_config(wan_model, tmp_path / "run", train={"steps": 3})
    assert cli_main(["train", "--config", str(config)]) == 0
    spec = Generation(prompt="a red ball moving left", steps=2, frames=9, height=64, width=64, guidance=4.0)
    halves = {}
    for strength in (0.0, 1.0):
        path = infer(wan_model / "model", tmp_path / "run", spec, tmp_path / f"s{strength}.gif", strength=strength,
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

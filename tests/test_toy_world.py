"""The toy concept world: procedural latents, renderer, detector, captions, and the shipped tiny model."""

from pathlib import Path

import numpy as np
import pytest
import torch

from lowmem_eraser.toy import world

TOY_MODEL = Path(__file__).resolve().parents[1] / "models" / "toy"


def test_detector_reads_back_every_procedural_video():
    combos = world.all_attribute_combinations()
    assert len(combos) == 32 and len(set(combos)) == 32
    hits = total = 0
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        for attrs in combos:
            latents = world.make_latents(attrs, gen)
            assert latents.shape == (world.LATENT_FRAMES, world.CHANNELS, world.SIZE, world.SIZE)
            hits += world.detect(latents) == attrs
            total += 1
    assert hits / total >= 0.99, f"{hits}/{total}"


def test_make_latents_is_seeded_and_roughly_unit_scale():
    attrs = world.Video("red", "ball", "left")
    a, b = world.make_latents(attrs, seed=3), world.make_latents(attrs, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, world.make_latents(attrs, seed=4))
    assert 0.2 < float(a.std()) < 1.5


def test_detect_rejects_empty_and_static_videos():
    assert world.detect(torch.zeros(world.LATENT_FRAMES, world.CHANNELS, world.SIZE, world.SIZE)) is None
    still = world.make_latents(world.Video("blue", "square", "up"), seed=0, noise=0)
    still[:] = still[2]  # every frame = the middle frame
    assert world.detect(still) == world.Video("blue", "square", world.STILL)


@pytest.mark.parametrize("colour", world.COLOURS)
def test_render_shape_dtype_and_colours(colour):
    latents = world.make_latents(world.Video(colour, "square", "right"), seed=1, noise=0)
    frames = world.render(latents)
    assert frames.shape == (world.VIDEO_FRAMES, world.PIXELS, world.PIXELS, 3) and frames.dtype == np.uint8
    assert frames[0, :4, :4].max() == 0  # black background in the corner
    # the brightest pixel of the first frame has the palette colour of the object
    flat = frames[0].reshape(-1, 3).astype(int)
    brightest = flat[flat.sum(axis=1).argmax()]
    np.testing.assert_allclose(brightest, world.PALETTE[world.COLOURS.index(colour)], atol=2)
    # the object moves right: its bright columns shift to the right from first to last video frame
    mass_cols = lambda f: (f.sum(axis=(0, 2)) * np.arange(f.shape[1])).sum() / f.sum()  # noqa: E731
    assert mass_cols(frames[-1]) > mass_cols(frames[0]) + 24


def test_captions_and_phrasings():
    assert set(world.TRAIN_PHRASINGS).isdisjoint(world.HELD_OUT_PHRASINGS)
    assert len(world.TRAIN_PHRASINGS) >= 4 and len(world.HELD_OUT_PHRASINGS) >= 2
    attrs = world.Video("yellow", "ball", "down")
    for phrasing in world.TRAIN_PHRASINGS + world.HELD_OUT_PHRASINGS:
        words = world.caption(attrs, phrasing).replace(",", " ").split()
        assert {"yellow", "ball", "down"} <= set(words)
    assert world.caption(attrs, 0) == "a yellow ball moving down"


@pytest.fixture(scope="module")
def toy_pipe():
    from lowmem_eraser.toy.build import _pipeline

    assert TOY_MODEL.is_dir(), "models/toy is missing: run `lowmem-eraser toy build --output models/toy`"
    return _pipeline(TOY_MODEL)


def test_shipped_model_loads_with_from_pretrained(toy_pipe):
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel
    from transformers import AutoTokenizer, T5EncoderModel

    from lowmem_eraser.toy.build import encode

    transformer = CogVideoXTransformer3DModel.from_pretrained(TOY_MODEL / "transformer")
    assert transformer.config.in_channels == transformer.config.out_channels == world.CHANNELS
    assert transformer.config.sample_height == world.SIZE and transformer.config.sample_frames == world.VIDEO_FRAMES
    T5EncoderModel.from_pretrained(TOY_MODEL / "text_encoder")
    scheduler = CogVideoXDDIMScheduler.from_pretrained(TOY_MODEL / "scheduler")
    assert scheduler.config.prediction_type == "v_prediction"
    tokenizer = AutoTokenizer.from_pretrained(TOY_MODEL / "tokenizer")
    for text in world.all_captions():
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id not in ids and len(ids) <= transformer.config.max_text_seq_length
    pipe = CogVideoXPipeline.from_pretrained(TOY_MODEL, vae=None)
    assert torch.equal(encode(pipe, ["a red ball moving left"]), encode(toy_pipe, ["a red ball moving left"]))
    total = sum(f.stat().st_size for f in TOY_MODEL.rglob("*") if f.is_file())
    assert total < 20 * 2**20


def test_shipped_model_quick_quality(toy_pipe):
    from lowmem_eraser.toy.build import quality_gate

    # 8 held-out prompts: every colour twice, every shape 4 times, every motion twice, phrasings in turn
    attrs = [world.Video(world.COLOURS[k % 4], world.SHAPES[(k // 2) % 2], world.MOTIONS[(k + k // 4) % 4]) for k in range(8)]
    picked = [(world.caption(a, world.HELD_OUT_PHRASINGS[k % len(world.HELD_OUT_PHRASINGS)]), a) for k, a in enumerate(attrs)]
    result = quality_gate(TOY_MODEL, picked, num_inference_steps=10, pipe=toy_pipe)
    for key in ("colour", "shape", "motion"):
        assert result[key] >= 0.75, (key, result)

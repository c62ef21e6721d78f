"""Validation during training (lowmem_eraser/validation.py) on the shipped toy model and a tiny VAE model."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import randomize_erasers
from lowmem_eraser import LowmemEraserError, attach_erasers, get_erasers
from lowmem_eraser.config import ValidationConfig, VideoConfig
from lowmem_eraser.tiny import build_tiny_cogvideox
from lowmem_eraser.train import load_scheduler
from lowmem_eraser.validation import encode_validation_prompts, run_validation

TOY = Path(__file__).parents[1] / "models" / "toy"
PROMPTS = ["the red ball moves left", "the blue ball moves right"]
TOY_VIDEO = VideoConfig(frames=17, height=128, width=128)


class RecordingTracker:
    def __init__(self):
        self.media = []

    def log_media(self, tag, path, step):
        self.media.append((tag, Path(path), step))


def _toy_transformer(random_erasers: bool):
    from diffusers import CogVideoXTransformer3DModel

    transformer = CogVideoXTransformer3DModel.from_pretrained(TOY / "transformer")
    erasers = attach_erasers(transformer, rank=4)
    erasers.kernels = "torch"  # conftest turns on the Triton interpreter; the kernels have their own tests
    if random_erasers:
        randomize_erasers(erasers, std=0.5)
    return transformer


@pytest.fixture(scope="module")
def toy_text(tmp_path_factory):
    """(validation embeddings [2, L, D], empty embedding [1, L, D]) from the toy model's own encoder, cached."""
    from lowmem_eraser.text import encode_texts

    cache = tmp_path_factory.mktemp("cache")
    embeddings = encode_validation_prompts(TOY, PROMPTS, 16, torch.float32, "cpu", cache)
    return embeddings, encode_texts(TOY, [""], 16, torch.float32, "cpu", cache)


def _validate(transformer, toy_text, out, step=5, tracker=None, steps=2):
    config = ValidationConfig(every=5, prompts=PROMPTS, num_inference_steps=steps, guidance_scale=5.0, seed=3)
    embeddings, empty = toy_text
    return run_validation(transformer, load_scheduler(TOY), embeddings, empty, config, TOY_VIDEO, TOY, out, step,
                          tracker, device="cpu", concept="red")


def _halves(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The base and erased halves of every frame of a side-by-side GIF (128 px each, a 4 px bar between)."""
    with Image.open(path) as gif:
        assert gif.n_frames == 17 and gif.size == (128 + 4 + 128, 128)
        frames = []
        for i in range(gif.n_frames):
            gif.seek(i)
            frames.append(np.asarray(gif.convert("RGB")))
    video = np.stack(frames)
    return video[:, :, :128], video[:, :, 132:]


def test_validation_writes_base_erased_gifs_and_the_detector_table(toy_text, tmp_path):
    transformer = _toy_transformer(random_erasers=True)
    erasers = get_erasers(transformer)
    erasers.scale = 0.75  # any switch the trainer set must survive the pass
    transformer.train()  # and so must the module mode (sampling itself runs in eval mode)
    rng = torch.get_rng_state()
    tracker = RecordingTracker()
    result = _validate(transformer, toy_text, tmp_path, tracker=tracker)

    folder = tmp_path / "validation" / "step-000005"
    assert sorted(p.name for p in folder.iterdir()) == ["00.gif", "01.gif", "table.md"]
    for name in ("00.gif", "01.gif"):
        base, erased = _halves(folder / name)
        assert not np.array_equal(base, erased)  # a non-zero eraser changes the video drawn from the same seed
    assert [(tag, path.name, step) for tag, path, step in tracker.media] == [
        ("validation/00", "00.gif", 5), ("validation/01", "01.gif", 5)]

    table = (folder / "table.md").read_text()
    assert "| 00 | the red ball moves left |" in table and "| 01 | the blue ball moves right |" in table
    assert "| | colour = red (prompts naming it) |" in table
    assert set(result) == {"validation/seconds"} | {f"validation/{key}_{run}" for run in ("base", "erased")
                                                   for key in ("colour", "shape", "motion", "concept")}
    assert all(0 <= value <= 1 for key, value in result.items() if key != "validation/seconds")

    # the model is left as the trainer had it, and the training's random stream is untouched
    assert erasers.enabled and erasers.scale == 0.75 and transformer.training
    assert torch.equal(torch.get_rng_state(), rng)
    assert not any(p.requires_grad and p.grad is not None for p in erasers.parameters())


def test_zero_erasers_give_identical_halves_and_the_same_readings(toy_text, tmp_path):
    result = _validate(_toy_transformer(random_erasers=False), toy_text, tmp_path, step=0)
    base, erased = _halves(tmp_path / "validation" / "step-000000" / "00.gif")
    assert np.array_equal(base, erased)
    for key in ("colour", "shape", "motion", "concept"):
        assert result[f"validation/{key}_base"] == result[f"validation/{key}_erased"]


def test_validation_restores_the_switches_when_sampling_fails(toy_text, tmp_path):
    transformer = _toy_transformer(random_erasers=False)
    erasers = get_erasers(transformer)
    with pytest.raises(LowmemEraserError, match="2 prompts but 1 embeddings"):
        run_validation(transformer, load_scheduler(TOY), toy_text[0][:1], toy_text[1],
                       ValidationConfig(every=1, prompts=PROMPTS), TOY_VIDEO, TOY, tmp_path, 1, None, device="cpu")

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    transformer.forward, original = broken, transformer.forward
    with pytest.raises(RuntimeError, match="boom"):
        _validate(transformer, toy_text, tmp_path)
    transformer.forward = original
    assert erasers.enabled and erasers.switches()["localization_mask"] is None


def test_a_model_with_a_vae_is_decoded_through_it(tmp_path):
    """The real-model path: a tiny folder with a VAE (64 x 64 px, 9 frames), no detector table."""
    from diffusers import CogVideoXTransformer3DModel

    prompts = ["a red ball moving left"]
    model = build_tiny_cogvideox(tmp_path / "model", prompts, with_vae=True, max_text_seq_length=8)
    transformer = CogVideoXTransformer3DModel.from_pretrained(model / "transformer")
    erasers = attach_erasers(transformer, rank=4)
    erasers.kernels = "torch"
    randomize_erasers(erasers, std=0.5)
    embeddings = encode_validation_prompts(model, prompts + [""], 8, torch.float32, "cpu", tmp_path / "cache")
    config = ValidationConfig(every=1, prompts=prompts, num_inference_steps=2)
    result = run_validation(transformer, load_scheduler(model), embeddings[:1], embeddings[1:], config,
                            VideoConfig(frames=9, height=64, width=64), model, tmp_path / "out", 7, None, device="cpu")
    folder = tmp_path / "out" / "validation" / "step-000007"
    with Image.open(folder / "00.gif") as gif:
        assert gif.n_frames == 9 and gif.size == (64 + 2 + 64, 64)
        frame = np.asarray(gif.convert("RGB"))
    assert not np.array_equal(frame[:, :64], frame[:, 66:])
    assert "| 00 | a red ball moving left |" in (folder / "table.md").read_text()
    assert set(result) == {"validation/seconds"}


def test_validation_prompts_are_cached_with_the_training_prompts(tmp_path):
    from lowmem_eraser import text

    first = encode_validation_prompts(TOY, PROMPTS, 16, torch.float32, "cpu", tmp_path)
    assert first.shape == (2, 16, 32) and len(list(tmp_path.glob("texts-*.pt"))) == 1
    original, text._encode = text._encode, None  # a second call must not touch the encoder
    try:
        assert torch.equal(encode_validation_prompts(TOY, PROMPTS, 16, torch.float32, "cpu", tmp_path), first)
    finally:
        text._encode = original
    # the same prompts in a training pair encode to the same vectors: one code path
    pairs = text.encode_prompts(TOY, [(PROMPTS[0], PROMPTS[1])], "red", 16, torch.float32, "cpu", tmp_path)
    assert torch.equal(pairs.target[0], first[0]) and torch.equal(pairs.preserve[0], first[1])


def test_the_validation_section_and_report_to_are_checked_like_every_field(tmp_path):
    import yaml

    from lowmem_eraser import ConfigError
    from lowmem_eraser.config import TrainConfig, load_config

    toy = load_config(Path(__file__).parents[1] / "configs" / "toy.yaml",
                      [f"model={TOY}", f"prompts={TOY.parents[1] / 'configs' / 'prompts' / 'toy_red.yaml'}"])
    assert toy.validation.every > 0 and any("red" in p for p in toy.validation.prompts) and toy.report_to == "none"
    assert TrainConfig.from_dict(yaml.safe_load(yaml.safe_dump(toy.to_dict()))) == toy  # lists survive the round trip

    base = {"model": "m", "prompts": "p.csv", "concept": "red", "output_dir": "out"}
    default = TrainConfig.from_dict(base)
    assert default.validation == ValidationConfig() and default.validation.every == 0 and default.report_to == "none"
    assert TrainConfig.from_dict({**base, "validation": {"prompts": ("a", "b")}}).validation.prompts == ["a", "b"]
    for section, message in [
        ({"validation": {"prompts": "a red ball"}}, "validation.prompts: expected a list, got 'a red ball'"),
        ({"validation": {"prompts": ["red", 3]}}, r"validation.prompts\[1\]: expected a non-empty string, got 3"),
        ({"validation": {"prompts": ["  "]}}, r"validation.prompts\[0\]: expected a non-empty string"),
        ({"validation": {"every": -1}}, "validation.every: expected a value >= 0"),
        ({"validation": {"num_inference_steps": 0}}, "validation.num_inference_steps: expected a value > 0"),
        ({"validation": {"steps": 3}}, "validation.steps: unknown key"),
        ({"report_to": "mlflow"}, "report_to: expected one of none, tensorboard, wandb"),
    ]:
        with pytest.raises(ConfigError, match=message):
            TrainConfig.from_dict({**base, **section})

    overridden = load_config(Path(__file__).parents[1] / "configs" / "toy.yaml", [
        f"model={TOY}", f"prompts={TOY.parents[1] / 'configs' / 'prompts' / 'toy_red.yaml'}",
        "validation.prompts=[the red ball moves up, a blue square]", "report_to=tensorboard"])
    assert overridden.validation.prompts == ["the red ball moves up", "a blue square"]
    with pytest.raises(ConfigError, match="validation.prompts: validation.every is 50 but no prompts"):
        load_config(Path(__file__).parents[1] / "configs" / "toy.yaml", [
            f"model={TOY}", f"prompts={TOY.parents[1] / 'configs' / 'prompts' / 'toy_red.yaml'}",
            "validation.prompts=[]", "validation.every=50"])

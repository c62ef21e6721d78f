"""`lowmem-eraser eval --model`: the real-model harness (evaluation.py, detectors.py) end to end on a tiny CogVideoX
with a tiny VAE and the real NudeNet (noise frames: no detections, but everything runs), its counting with a
detector of fixed answers, resume, and bad input refused before any generation."""

import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lowmem_eraser import attach_erasers, evaluation
from lowmem_eraser.cli import main as cli_main
from lowmem_eraser.detectors import (DEFAULT_THRESHOLD, UNSAFE_CLASSES, Detection, class_scores, sampled_frames,
                                     shows_concept)
from lowmem_eraser.errors import ConfigError, EraserFormatError, LowmemEraserError, MissingDependencyError
from lowmem_eraser.evaluation import EvalSettings, evaluate_model, summarize
from lowmem_eraser.serialization import save_erasers
from lowmem_eraser.tiny import build_tiny_clip, build_tiny_cogvideox, build_tiny_wan

PROMPTS = ["a person on a beach", "a nude person", "a red ball"]
SETTINGS = dict(steps=2, frames=9, height=64, width=64, guidance=4.0, frames_per_video=3)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny CogVideoX with a VAE, an eraser of it (random, non-zero) and a prompt CSV with an extra column."""
    root = tmp_path_factory.mktemp("eval_world")
    model = build_tiny_cogvideox(root / "model", PROMPTS, with_vae=True, max_text_seq_length=8)
    from diffusers import CogVideoXTransformer3DModel

    transformer = CogVideoXTransformer3DModel.from_pretrained(model / "transformer")
    erasers = attach_erasers(transformer, rank=4)
    torch.manual_seed(0)
    for p in erasers.parameters():
        torch.nn.init.normal_(p, std=0.05)
    save_erasers(erasers, root / "eraser")
    with (root / "prompts.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "category"])
        writer.writerows([[p, f"c{i}"] for i, p in enumerate(PROMPTS)])
    return {"root": root, "model": model, "eraser": root / "eraser", "csv": root / "prompts.csv"}


def test_the_harness_runs_end_to_end_with_the_real_nudenet(world, tmp_path, one_thread):
    out = tmp_path / "eval"
    began = time.perf_counter()
    result = evaluate_model(world["model"], world["eraser"], world["csv"], out, "nudenet",
                            EvalSettings(**SETTINGS, seeds=[0, 1]))
    seconds = time.perf_counter() - began
    print(f"12 videos (3 prompts x 2 seeds x base/erased, 9x64x64, 2 steps) in {seconds:.1f} s: "
          f"{seconds / 12:.2f} s per video, model load and NudeNet included")
    assert result["detector"] == "nudenet" and result["generated"] == 12 and result["reused"] == 0
    assert result["videos_per_run"] == 6 and result["rate_base"] == 0 and result["rate_erased"] == 0
    assert result["classes"] == list(UNSAFE_CLASSES)
    assert result["mean_pixel_change"] > 0  # the eraser changed the videos
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["prompt"], r["category"], r["seed"]) for r in rows] == [
        (p, f"c{i}", str(s)) for i, p in enumerate(PROMPTS) for s in (0, 1)]
    assert all(r["base_shows_concept"] == "0" and r["erased_shows_concept"] == "0" for r in rows)
    assert json.loads((out / "eval.json").read_text())["rate_erased"] == 0
    assert "videos showing the concept" in (out / "eval.md").read_text()
    frames = sorted(out.glob("videos-*/frames/*.npz"))
    assert len(frames) == 12 and np.load(frames[0])["frames"].shape == (3, 64, 64, 3)


class FixedDetector:
    """Answers from a table keyed by the frame's first pixel (the tests paint it)."""

    name = "fixed"
    classes = ("A_EXPOSED", "B_EXPOSED")

    def __init__(self, answers):
        self.answers = answers

    def __call__(self, frame):
        return self.answers.get(int(frame[0, 0, 0]), [])


def _video(marks):
    frames = np.zeros((len(marks), 4, 4, 3), np.uint8)
    frames[:, 0, 0, 0] = marks
    return frames


def test_counting_uses_the_threshold_per_class_and_any_frame_of_a_video():
    detector = FixedDetector({
        1: [Detection("A_EXPOSED", DEFAULT_THRESHOLD)],  # exactly the threshold: counts
        2: [Detection("A_EXPOSED", 0.59), Detection("FACE_FEMALE", 0.99)],  # below it; a class that never counts
        3: [Detection("B_EXPOSED", 0.9), Detection("A_EXPOSED", 0.7)],  # two classes in one frame: one video
    })
    videos = {}
    layout = {(0, 0): ([0, 1, 0], [0, 0, 0]),  # prompt 0: base shows A in one frame, erased nothing
              (1, 0): ([2, 2, 2], [2, 0, 0]),  # prompt 1: below threshold everywhere
              (2, 0): ([3, 0, 0], [0, 0, 3])}  # prompt 2: both runs show A and B (in different frames)
    for (i, seed), (base, erased) in layout.items():
        for run, marks in (("base", base), ("erased", erased)):
            frames = _video(marks)
            videos[(i, seed, run)] = frames, [detector(f) for f in frames]
    rows = [{"prompt": f"p{i}", "target": t} for i, t in enumerate(["1", "0", "true"])]
    result = summarize(rows, videos, EvalSettings(seeds=[0], frames_per_video=3), detector)
    # the pixel change of the rows marked target 0 (prompt 1 only: marks 2,2,2 -> 2,0,0 in one pixel of 3 frames)
    assert result["mean_pixel_change_non_target"] == pytest.approx(4 / (3 * 4 * 4 * 3) / 255)
    assert result["rate_base"] == pytest.approx(2 / 3) and result["rate_erased"] == pytest.approx(1 / 3)
    assert result["class_counts_base"] == {"A_EXPOSED": 2, "B_EXPOSED": 1}
    assert result["class_counts_erased"] == {"A_EXPOSED": 1, "B_EXPOSED": 1}
    assert class_scores([detector(f) for f in _video([2, 3])], detector.classes) == {"A_EXPOSED": 0.7,
                                                                                    "B_EXPOSED": 0.9}
    assert not shows_concept({"A_EXPOSED": 0.59}, 0.6) and shows_concept({"A_EXPOSED": 0.6}, 0.6)
    assert sampled_frames(49, 8) == [0, 7, 14, 21, 27, 34, 41, 48] and sampled_frames(9, 20) == list(range(9))
    assert sampled_frames(9, 1) == [4]


def test_videos_kept_on_disk_are_held_as_paths_and_read_back_alike(tmp_path):
    """With a folder, read_videos hands back each video's frames file (not thousands of frame arrays held in RAM
    until the summary); frames_of reads the same frames, and the summary is the one of the arrays in memory."""
    from lowmem_eraser.evaluation import frames_of, read_videos

    class PaintedWorld:  # prompt i, run r: one frame per mark, painted i + (2 if erased)
        batch = 1

        def generate(self, pipe, prompts, seed, settings, erased):
            return [_video([int(p) + 2 * erased] * 3) for p in prompts]

        def read(self, detector, video):
            return [detector(frame) for frame in video]

    detector = FixedDetector({1: [Detection("A_EXPOSED", 0.9)]})
    settings = EvalSettings(seeds=[0], frames_per_video=3)
    on_disk, made = read_videos(lambda: None, ["0", "1"], settings, detector, PaintedWorld(), tmp_path / "v")
    in_memory, _ = read_videos(lambda: None, ["0", "1"], settings, detector, PaintedWorld())
    assert made == 4 and all(isinstance(video, Path) for video, _ in on_disk.values())
    for job, (video, detections) in in_memory.items():
        assert isinstance(video, np.ndarray) and np.array_equal(frames_of(on_disk[job][0]), video)
        assert on_disk[job][1] == detections
    rows = [{"prompt": "0"}, {"prompt": "1"}]
    assert summarize(rows, on_disk, settings, detector) == summarize(rows, in_memory, settings, detector)


def test_an_interrupted_evaluation_resumes_without_generating_anything_twice(world, tmp_path, monkeypatch,
                                                                             one_thread):
    generated = []
    real = evaluation._sampled_video

    def counting(pipe, prompt, seed, settings, erased, tiling):
        if len(generated) == 3:
            raise KeyboardInterrupt  # Ctrl-C during the 4th video
        generated.append((prompt, seed, erased))
        return real(pipe, prompt, seed, settings, erased, tiling)

    monkeypatch.setattr(evaluation, "_sampled_video", counting)
    detector = FixedDetector({})
    out = tmp_path / "eval"
    with pytest.raises(KeyboardInterrupt):
        evaluate_model(world["model"], world["eraser"], world["csv"], out, settings=EvalSettings(**SETTINGS),
                       detector_instance=detector)
    assert len(list(out.glob("videos-*/detections-fixed/*.json"))) == 3  # the 3 finished videos are on disk
    monkeypatch.setattr(evaluation, "_sampled_video", lambda *a: generated.append((a[1], a[2], a[4])) or real(*a))
    result = evaluate_model(world["model"], world["eraser"], world["csv"], out, settings=EvalSettings(**SETTINGS),
                            detector_instance=detector)
    assert result["reused"] == 3 and result["generated"] == 3 and len(generated) == 6
    assert len(set(generated)) == 6  # every (prompt, seed, run) exactly once
    again = evaluate_model(world["model"], world["eraser"], world["csv"], out, settings=EvalSettings(**SETTINGS),
                           detector_instance=detector)
    assert again["generated"] == 0 and again["reused"] == 6
    # other generation settings, or another eraser, are other videos: nothing reused
    other = evaluate_model(world["model"], world["eraser"], world["csv"], out,
                           settings=EvalSettings(**{**SETTINGS, "steps": 1}), detector_instance=detector)
    assert other["generated"] == 6
    state = torch.load(world["eraser"] / "eraser_weights.pt", weights_only=True)
    (tmp_path / "eraser2").mkdir()
    for name in ("eraser_config.json",):
        (tmp_path / "eraser2" / name).write_bytes((world["eraser"] / name).read_bytes())
    first = next(iter(state))
    state[first] = {k: v + 1 for k, v in state[first].items()}
    torch.save(state, tmp_path / "eraser2" / "eraser_weights.pt")
    changed = evaluate_model(world["model"], tmp_path / "eraser2", world["csv"], out, settings=EvalSettings(**SETTINGS),
                             detector_instance=detector)
    assert changed["generated"] == 6
    # another detector reads the videos already generated: nothing is generated again
    class Other(FixedDetector):
        name = "other"

    generated.clear()
    reread = evaluate_model(world["model"], world["eraser"], world["csv"], out, settings=EvalSettings(**SETTINGS),
                            detector_instance=Other({}))
    assert reread["generated"] == 0 and not generated


@pytest.fixture
def no_generation(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("bad input must be refused before the model loads")

    monkeypatch.setattr("lowmem_eraser.infer.load_pipeline", refuse)


def _eval(world, out, **changes):
    args = {"model": world["model"], "eraser": world["eraser"], "prompts": world["csv"], "output": out,
            "settings": EvalSettings(**SETTINGS), **changes}
    return evaluate_model(**args)


def test_bad_prompt_files_are_refused_before_any_generation(world, tmp_path, no_generation):
    (tmp_path / "no_prompt.csv").write_text("text,category\na,b\n")
    (tmp_path / "empty.csv").write_text("prompt,category\n")
    with pytest.raises(ConfigError, match=r"--prompts: .*no_prompt.csv has no `prompt` column \(columns: text, "):
        _eval(world, tmp_path / "o", prompts=tmp_path / "no_prompt.csv")
    with pytest.raises(ConfigError, match=r"--prompts: .*empty.csv has no prompts"):
        _eval(world, tmp_path / "o", prompts=tmp_path / "empty.csv")
    with pytest.raises(ConfigError, match=r"--prompts: .*missing.csv not found"):
        _eval(world, tmp_path / "o", prompts=tmp_path / "missing.csv")


def test_an_eraser_of_another_family_is_named_before_any_generation(world, tmp_path, no_generation):
    from diffusers import WanTransformer3DModel

    wan = build_tiny_wan(tmp_path / "wan", PROMPTS)
    erasers = attach_erasers(WanTransformer3DModel.from_pretrained(wan / "transformer"), rank=4)
    save_erasers(erasers, tmp_path / "wan_eraser")
    with pytest.raises(EraserFormatError, match=r"wan_eraser is a Wan eraser, but --model .* is a CogVideoX model"):
        _eval(world, tmp_path / "o", eraser=tmp_path / "wan_eraser")


def test_a_missing_detector_package_and_an_unwritable_output_are_refused_first(world, tmp_path, monkeypatch,
                                                                              no_generation):
    monkeypatch.setitem(sys.modules, "nudenet", None)  # as if not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'lowmem-eraser\[eval\]'"):
        _eval(world, tmp_path / "o", detector="nudenet")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(LowmemEraserError, match=r"--output: cannot write to folder .*a_file/out"):
        _eval(world, blocker / "out", detector="nudenet")
    with pytest.raises(ConfigError, match="--detector: expected one of nudenet"):
        _eval(world, tmp_path / "o", detector="nudity-9000")


def test_the_cli_runs_the_harness_and_names_what_is_missing(world, tmp_path, capsys, one_thread):
    out = tmp_path / "cli"
    code = cli_main(["eval", "--model", str(world["model"]), "--eraser", str(world["eraser"]), "--prompts",
                     str(world["csv"]), "--steps", "2", "--frames", "9", "--height", "64", "--width", "64",
                     "--frames-per-video", "2", "--output", str(out)])
    assert code in (0, None) and (out / "results.csv").is_file()
    assert "videos showing the concept" in capsys.readouterr().out
    assert cli_main(["eval", "--model", str(world["model"]), "--eraser", str(world["eraser"])]) == 2
    assert "--prompts: --model needs a CSV" in capsys.readouterr().err


def test_clip_scores_each_video_against_its_prompt(world, tmp_path, one_thread):
    """--clip: a tiny CLIP folder loaded as a real one; the harness's score of a video = 100 x cosine of its
    frames' and its prompt's embeddings, floored at 0, the frames' mean (recomputed here in fp64)."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    clip = build_tiny_clip(tmp_path / "clip", PROMPTS)
    out = tmp_path / "eval"
    result = evaluate_model(world["model"], world["eraser"], world["csv"], out, settings=EvalSettings(**SETTINGS),
                            detector_instance=FixedDetector({}), clip=clip)
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert 0 <= result["clip_base"] <= 100 and 0 <= result["clip_erased"] <= 100
    model = CLIPModel.from_pretrained(clip).double().eval()
    tokenizer, images = AutoTokenizer.from_pretrained(clip), AutoImageProcessor.from_pretrained(clip)
    frames = np.load(sorted(out.glob("videos-*/frames/00001-*-seed0-erased.npz"))[0])["frames"]
    text = tokenizer([PROMPTS[1]], return_tensors="pt")
    with torch.no_grad():
        t = model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
        i = model.get_image_features(pixel_values=images(images=list(frames), return_tensors="pt")["pixel_values"]
                                     .double())
    t, i = (f if torch.is_tensor(f) else f.pooler_output for f in (t, i))
    expected = (100 * torch.nn.functional.cosine_similarity(i, t, dim=-1)).clamp_min(0).mean().item()
    assert float(rows[1]["erased_clip"]) == pytest.approx(expected, abs=2e-3)  # fp32 model vs fp64, 3 decimals
    assert "CLIP score" in (out / "eval.md").read_text()
    with pytest.raises(ConfigError, match="--clip: .*nowhere is not a folder"):
        evaluate_model(world["model"], world["eraser"], world["csv"], out, settings=EvalSettings(**SETTINGS),
                       detector_instance=FixedDetector({}), clip=tmp_path / "nowhere")


def test_the_toy_world_is_read_through_the_same_harness(monkeypatch):
    """eval --config (the toy world) and eval --model share evaluation.read_videos: the toy detector's labels give
    back the video the world drew, and the toy evaluation's generation goes through read_videos (one batched call
    per run, as the toy table was always made: `eval` on runs/toy reproduced its eval.json key for key)."""
    from lowmem_eraser.toy import evaluate as toy_evaluate
    from lowmem_eraser.toy.world import Video, make_latents

    detector = toy_evaluate.ToyDetector()
    video = Video("red", "square", "up")
    labels = detector(make_latents(video))
    assert {d.label for d in labels} == {"colour:red", "shape:square", "motion:up"}
    assert toy_evaluate.reading(labels) == video and toy_evaluate.reading([]) is None
    assert set(d.label for d in labels) <= set(detector.classes)

    calls = []

    def spy(pipe_factory, prompts, settings, found, world, folder=None):
        calls.append((len(prompts), settings.seeds, found.name, world.batch, folder))
        videos = {(i, seed, run): (make_latents(Video("blue", "ball", "left")), [[]]) for i in range(len(prompts))
                  for seed in settings.seeds for run in ("base", "erased")}
        return videos, len(videos)

    monkeypatch.setattr(evaluation, "read_videos", spy)
    prompts, truth, base, erased, detected = toy_evaluate._generate_and_detect("m", "e", 3, 5.0, 7, "torch")
    assert calls == [(96, [7], "toy", 0, None)]  # all 96 held-out prompts, one batched call per run, nothing kept
    assert base.shape[0] == 96 and detected["erased"] == [None] * 96


def test_offload_auto_is_the_planners_infer_stage(world):
    """--offload auto asks plan.Predictor.infer for the fastest offload that fits the free GPU memory: everything
    resident with room to spare, the pipeline's model offload or sequential offload as the budget shrinks."""
    from lowmem_eraser.evaluation import planned_offload

    settings = EvalSettings(**SETTINGS)
    assert planned_offload(world["model"], settings, 2**40) == "none"
    assert planned_offload(world["model"], settings, 1) == "sequential"  # nothing fits: the leanest there is


def test_nudenet_sees_an_array_as_it_sees_the_same_image_from_a_file(tmp_path):
    """NudeNet's own path (cv2.imread: BGR) and ours (an RGB frame through detectors.nudenet_input) give the network
    the same input blob."""
    from nudenet.nudenet import _read_image
    from PIL import Image

    from lowmem_eraser.detectors import nudenet_input

    frame = (np.random.default_rng(0).random((48, 80, 3)) * 255).astype(np.uint8)
    frame[..., 0] = 250  # strongly red: a swap of R and B would show
    Image.fromarray(frame).save(tmp_path / "frame.png")
    from_file = _read_image(str(tmp_path / "frame.png"))[0]
    assert np.array_equal(_read_image(nudenet_input(frame))[0], from_file)
    assert not np.array_equal(_read_image(np.ascontiguousarray(frame))[0], from_file)  # RGB as is: swapped


def test_a_damaged_cached_video_is_redone(world, tmp_path, one_thread):
    out = tmp_path / "eval"
    detector = FixedDetector({})
    evaluate_model(world["model"], world["eraser"], world["csv"], out, settings=EvalSettings(**SETTINGS),
                   detector_instance=detector)
    frames = sorted(out.glob("videos-*/frames/*.npz"))
    frames[0].write_bytes(frames[0].read_bytes()[:40])  # truncated
    frames[1].write_bytes(b"")  # empty
    again = evaluate_model(world["model"], world["eraser"], world["csv"], out, settings=EvalSettings(**SETTINGS),
                           detector_instance=detector)
    assert again["generated"] == 2 and again["reused"] == 4


def test_eval_options_of_the_other_mode_are_named_not_ignored(world, tmp_path, capsys, no_generation):
    toy_config = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"
    assert cli_main(["eval", "--config", str(toy_config), "--eraser", str(world["eraser"]), "--seeds", "5"]) == 2
    assert "--seeds: only with --model" in capsys.readouterr().err
    assert cli_main(["eval", "--config", str(toy_config), "--eraser", str(world["eraser"]), "--guidance", "3"]) == 2
    assert "--guidance: only with --model" in capsys.readouterr().err
    assert cli_main(["eval", "--model", str(world["model"]), "--eraser", str(world["eraser"]), "--prompts",
                     str(world["csv"]), "--concepts", "red"]) == 2
    assert "--concepts: the toy world's option" in capsys.readouterr().err
    # generation settings the model cannot take are named before it loads
    assert cli_main(["eval", "--model", str(world["model"]), "--eraser", str(world["eraser"]), "--prompts",
                     str(world["csv"]), "--frames", "10", "--output", str(tmp_path / "o")]) == 2
    assert "--frames: expected 8k+1 frames (e.g. 49), got 10" in capsys.readouterr().err

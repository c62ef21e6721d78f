"""`lowmem-eraser eval --model DIR --eraser RUN --prompts CSV`: erasure measured on a real model with a detector.

For each prompt (CSV column `prompt`; other columns are kept in the results) and seed, the base and the erased
video are generated from the same noise with the family's pipeline (infer.load_pipeline / infer.generate: offload
picked by the planner's infer stage or given, VAE tiling when the decode would not fit), K frames are sampled
evenly and read by the detector (detectors.py). Per video: the highest score of each concept class and whether
the video shows the concept (a class >= the threshold in a sampled frame). Written to `--output`: `results.csv`
(one row per prompt and seed, base and erased side by side), `eval.json` and `eval.md` (the rate of videos showing
the concept, base -> erased, per class counts, the mean pixel change erased vs base, and on the rows whose optional
`target` column is 0; with `--clip DIR` each video's CLIP score to its prompt; wall time). Reports hold numbers
only, never frames. The toy world's `eval --config` goes through the same `read_videos` (toy/evaluate.py).

Resumable: each video's sampled frames and detections (`videos-<key>/frames/`, `detections-<detector>/`) are written
atomically as soon as they exist and reused on the next start; Ctrl-C loses at most the video in progress.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .detectors import DEFAULT_THRESHOLD, Detection, class_scores, make_detector, sampled_frames, shows_concept
from .errors import ConfigError, EraserFormatError, ModelFileError
from .serialization import atomic_write, ensure_folder

logger = logging.getLogger(__name__)


@dataclass
class EvalSettings:
    """What a video depends on (its cache key) besides its prompt and seed, and how it is read."""

    steps: int = 50
    frames: int | None = None  # None: the family's default
    height: int | None = None
    width: int | None = None
    guidance: float = 6.0
    frames_per_video: int = 8
    threshold: float = DEFAULT_THRESHOLD
    seeds: list[int] = field(default_factory=lambda: [0])

    def video_key(self, model: str | Path, eraser_digest: str) -> str:
        """The videos' folder key: the model (its path and its files' names, sizes and config contents), the
        eraser's bytes, the generation settings, where they run (CUDA bf16 or CPU fp32: infer.load_pipeline) and
        the library versions — a rerun that changes any of them into the same --output reuses nothing."""
        import diffusers
        import torch

        model = Path(model).resolve()
        files = sorted((str(p.relative_to(model)), p.stat().st_size, p.read_text() if p.suffix == ".json" else "")
                       for p in model.rglob("*") if p.is_file())
        generation = [str(model), files, eraser_digest, self.steps, self.frames, self.height, self.width,
                      self.guidance, self.frames_per_video, torch.cuda.is_available(), torch.__version__,
                      diffusers.__version__]
        return hashlib.sha256(json.dumps(generation).encode()).hexdigest()[:12]


def eraser_digest(eraser: str | Path) -> str:
    """sha256 of the eraser's weights file (what its erased videos depend on)."""
    from .serialization import read_erasers

    digest = hashlib.sha256()
    with open(read_erasers(eraser).weights_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_prompt_csv(path: str | Path) -> list[dict[str, str]]:
    """The CSV's rows (every column kept); errors name the file: unreadable, no `prompt` column, no rows."""
    from .config import read_text

    path = Path(path)
    text = read_text(path, "--prompts", "utf-8-sig")  # missing, unreadable, not UTF-8: named with the line
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or "prompt" not in reader.fieldnames:
        raise ConfigError(f"--prompts: {path} has no `prompt` column (columns: {', '.join(reader.fieldnames or [])})")
    # a row longer than the header puts its extra cells under None: not a column
    rows = [{k: v for k, v in row.items() if k is not None} for row in reader if (row.get("prompt") or "").strip()]
    if not rows:
        raise ConfigError(f"--prompts: {path} has no prompts (no row with a non-empty `prompt`)")
    return rows


def check_family(model: str | Path, eraser: str | Path) -> None:
    """The eraser must be of the model's family (named both, before the model loads)."""
    from .families import family_of_folder
    from .serialization import read_erasers

    erasers = read_erasers(eraser)
    family = family_of_folder(model)
    if family is not None and erasers.family != family.name:
        raise EraserFormatError(f"--eraser: {eraser} is a {erasers.family} eraser, but --model {model} is a "
                                f"{family.name} model")


class ClipScore:
    """CLIP score of frames to their prompt (100 x cosine of the image and text embeddings, floored at 0, the
    frames' mean), with a CLIP model from a local folder (`--clip DIR`: CLIPModel weights, its tokenizer and image
    processor; loaded with transformers, never downloaded)."""

    def __init__(self, folder: str | Path):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        folder = Path(folder)
        if not folder.is_dir():
            raise ConfigError(f"--clip: {folder} is not a folder (a local CLIP model: config.json, weights, "
                              "tokenizer and preprocessor files)")
        try:
            self.model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            self.images = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelFileError(f"--clip: cannot load a CLIP model from {folder}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None

    def __call__(self, frames: np.ndarray, prompt: str) -> float:
        import torch
        import torch.nn.functional as F

        text = self.tokenizer([prompt], padding=True, truncation=True, return_tensors="pt")
        pixels = self.images(images=list(frames), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            text_features = self.model.get_text_features(input_ids=text["input_ids"],
                                                         attention_mask=text["attention_mask"])
            image_features = self.model.get_image_features(pixel_values=pixels)
        # transformers 5 returns outputs whose pooler_output holds the projected features; 4.x the tensor itself
        text_features, image_features = (f if torch.is_tensor(f) else f.pooler_output
                                         for f in (text_features, image_features))
        cosine = F.cosine_similarity(image_features, text_features.expand_as(image_features), dim=-1)
        return float((100 * cosine).clamp_min(0).mean())


def _video_paths(folder: Path, detector: str, prompt: str, row: int, seed: int, run: str) -> tuple[Path, Path]:
    """A video's sampled frames and its detections (per detector) in the videos' folder; named by row and prompt
    text, so that an edited CSV reuses only the rows that are the same."""
    name = f"{row:05d}-{hashlib.sha256(prompt.encode()).hexdigest()[:8]}-seed{seed}-{run}"
    return folder / "frames" / f"{name}.npz", folder / f"detections-{detector}" / f"{name}.json"


def _sampled_video(pipe, prompt: str, seed: int, settings: EvalSettings, erased: bool, tiling: str) -> np.ndarray:
    """The K sampled frames [K, H, W, 3] of one generated video (erasers on or off, same noise)."""
    from .infer import Generation, generate
    from .sampling import all_erasers_disabled

    spec = Generation(prompt=prompt, steps=settings.steps, frames=settings.frames, height=settings.height,
                      width=settings.width, guidance=settings.guidance, seed=seed)
    if erased:
        video = generate(pipe, spec, tiling)
    else:
        with all_erasers_disabled(pipe):
            video = generate(pipe, spec, tiling)
    return video[sampled_frames(len(video), settings.frames_per_video)]


def frames_of(video) -> np.ndarray:
    """A video's sampled frames: read_videos keeps the path of those it wrote to disk, not the arrays (an
    evaluation of thousands of videos would otherwise hold every frame in RAM until the end)."""
    return np.load(video)["frames"] if isinstance(video, Path) else video


def _load_video(frames_path: Path, detections_path: Path):
    """(frames or None, detections or None) from disk; a damaged file counts as missing (redone, not trusted)."""
    frames = detections = None
    try:
        if frames_path.is_file():
            frames = np.load(frames_path)["frames"]
        if frames is not None and detections_path.is_file():
            detections = [[Detection(**d) for d in frame] for frame in json.loads(detections_path.read_text())]
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
        logger.warning("redoing %s: %s", frames_path.name, exc)
        frames = detections = None
    return frames, detections


def _save_video(frames_path: Path, detections_path: Path, frames: np.ndarray | None, detections) -> None:
    """Frames (unless None: already on disk), then the detections: their presence says the video is complete."""
    frames_path.parent.mkdir(parents=True, exist_ok=True)
    detections_path.parent.mkdir(parents=True, exist_ok=True)
    if frames is not None:
        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez_compressed(f, frames=frames)

        atomic_write(frames_path, write)
    atomic_write(detections_path, lambda tmp: tmp.write_text(json.dumps([[asdict(d) for d in frame]
                                                                         for frame in detections])))


RUNS = ("base", "erased")


class FramesWorld:
    """A model with a VAE: one video per pipeline call (infer.generate: offload, VAE tiling), K frames sampled
    evenly, the detector on each frame."""

    batch = 1

    def __init__(self, tiling: str = "auto"):
        self.tiling = tiling

    def generate(self, pipe, prompts: list[str], seed: int, settings: EvalSettings, erased: bool) -> list:
        if self.tiling == "auto":  # decided once per run (free GPU memory varies): every video decoded alike
            from .infer import vae_tiling
            from .sampling import runtime_of

            frames, height, width = runtime_of(pipe.transformer).video_size(dict(pipe.transformer.config),
                                                                            pipe.vae_scale_factor_spatial)
            self.tiling = "on" if vae_tiling(pipe, "auto", settings.frames or frames, settings.height or height,
                                             settings.width or width) else "off"
        return [_sampled_video(pipe, prompt, seed, settings, erased, self.tiling) for prompt in prompts]

    def read(self, detector, video) -> list[list[Detection]]:
        return [detector(frame) for frame in video]


def planned_offload(model: str | Path, settings: EvalSettings, budget: int) -> str:
    """`--offload auto`: the planner's infer stage (plan.Predictor.infer, simulated from the folder's configs as
    `lowmem-eraser plan` does): the fastest pipeline offload (none, model, sequential) whose every phase, text
    encoding, denoising and VAE decode, fits `budget` bytes."""
    import torch

    from .config import LossConfig, VideoConfig
    from .families import runtime_of_folder
    from .plan import Predictor, model_spec

    spec = model_spec(model)
    default = runtime_of_folder(model, "--model").video_size(spec.transformer, spec.facts.vae_scale)
    video = VideoConfig(frames=settings.frames or default[0], height=settings.height or default[1],
                        width=settings.width or default[2])
    predictor = Predictor(spec.transformer, video, 1, LossConfig(), torch.bfloat16, text_config=spec.text_encoder,
                          vae_config=spec.vae, facts=spec.facts)
    return predictor.infer(budget).offload


def read_videos(pipe_factory, prompts: list[str], settings: EvalSettings, detector, world,
                folder: Path | None = None) -> tuple[dict, int]:
    """Every (prompt, seed) generated base and erased and read by `detector`: {(row, seed, run): (video,
    detections per frame)} and how many were generated; with a `folder`, the video is its frames' file
    (`frames_of` reads it). The one path of `lowmem-eraser eval` (real models and the
    toy world): `world` generates `world.batch` prompts per call (all of them: one call) and reads a video;
    `folder`: where each video and its detections are kept as soon as they exist and found again on the next run
    (None: nothing kept). `pipe_factory()` loads the pipeline, only if something is left to generate."""
    from tqdm.auto import tqdm

    jobs = [(i, seed, run) for seed in settings.seeds for run in RUNS for i in range(len(prompts))]
    videos: dict[tuple[int, int, str], tuple] = {}

    def paths(job):
        return _video_paths(folder, detector.name, prompts[job[0]], *job)

    if folder is not None:
        for job in jobs:
            frames, detections = _load_video(*paths(job))
            if frames is not None and detections is None:  # generated before, read by another detector: read now
                detections = world.read(detector, frames)
                _save_video(*paths(job), None, detections)
            if detections is not None:
                videos[job] = paths(job)[0], detections
    todo = [job for job in jobs if job not in videos]
    if not todo:
        return videos, 0
    pipe = pipe_factory()
    with tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="eval videos", unit="video", dynamic_ncols=True,
              disable=world.batch != 1) as bar:
        for seed in settings.seeds:
            for run in RUNS:
                missing = [i for i, s, r in todo if s == seed and r == run]
                size = world.batch or len(missing)
                for start in range(0, len(missing), size):
                    chunk = missing[start:start + size]
                    made = world.generate(pipe, [prompts[i] for i in chunk], seed, settings, run == "erased")
                    for i, video in zip(chunk, made):
                        detections = world.read(detector, video)
                        if folder is not None:
                            _save_video(*paths((i, seed, run)), video, detections)
                            video = paths((i, seed, run))[0]
                        videos[(i, seed, run)] = video, detections
                        bar.update(1)
    return videos, len(todo)


def evaluate_model(model: str | Path, eraser: str | Path, prompts: str | Path, output: str | Path,
                   detector: str = "nudenet", settings: EvalSettings | None = None, offload: str = "auto",
                   tiling: str = "auto", detector_instance=None, clip: str | Path | None = None) -> dict:
    """Base vs erased on every prompt and seed (see the module doc); returns the summary also written to
    `eval.json`. `detector_instance`: a detector object to use instead of `detector`'s (tests). `clip`: a local
    CLIP folder: every video's CLIP score to its prompt, base and erased (from the sampled frames). `offload`:
    none | model | sequential, or auto: on CUDA what the planner's infer stage picks for the free GPU memory."""
    import torch

    from .families import runtime_of_folder

    settings = settings or EvalSettings()
    # every input is checked before the model loads and anything is generated
    if settings.steps < 1:
        raise ConfigError(f"--steps: expected at least 1, got {settings.steps}")
    if settings.frames_per_video < 1:
        raise ConfigError(f"--frames-per-video: expected at least 1, got {settings.frames_per_video}")
    if not 0 < settings.threshold <= 1:
        raise ConfigError(f"--threshold: expected a score in (0, 1], got {settings.threshold}")
    if not settings.seeds:
        raise ConfigError("--seeds: expected at least one seed")
    rows = read_prompt_csv(prompts)
    runtime_of_folder(model, "--model")
    from .infer import Generation, check_generation

    check_generation(model, Generation(prompt="", steps=settings.steps, frames=settings.frames,
                                       height=settings.height, width=settings.width, guidance=settings.guidance))
    if not (Path(model) / "vae").is_dir():
        raise ConfigError(f"--model: {model} has no vae/ folder: --model evaluates videos decoded to frames (the toy "
                          "world: eval --config)")
    check_family(model, eraser)
    output = ensure_folder(output, "--output")
    found = detector_instance if detector_instance is not None else make_detector(detector)
    if settings.threshold < getattr(found, "min_score", 0):
        logger.warning("--threshold %g is below the lowest score %s reports (%g): it counts as %g", settings.threshold,
                       found.name, found.min_score, found.min_score)
    scorer = ClipScore(clip) if clip is not None else None

    if offload not in ("auto", "none", "model", "sequential"):
        raise ConfigError(f"--offload: expected auto, none, model or sequential, got {offload!r}")
    if offload == "auto":
        offload = "none"
        if torch.cuda.is_available():
            free, _ = torch.cuda.mem_get_info()
            offload = planned_offload(model, settings, free)
            logger.info("--offload auto: %s (the planner's infer stage for %.1f GiB free)", offload, free / 2**30)

    began = time.perf_counter()
    folder = output / f"videos-{settings.video_key(model, eraser_digest(eraser))}"
    prompts_text = [row["prompt"] for row in rows]
    from .infer import load_pipeline_with_erasers

    videos, generated = read_videos(lambda: load_pipeline_with_erasers(model, eraser, offload), prompts_text, settings,
                                    found, FramesWorld(tiling), folder)
    jobs = list(videos)
    clip_scores = None
    if scorer is not None:  # from the frames on disk: cheap next to generation, so not cached
        clip_scores = {job: scorer(frames_of(videos[job][0]), rows[job[0]]["prompt"]) for job in jobs}
    result = summarize(rows, videos, settings, found, clip_scores)
    result.update(model=str(model), eraser=str(eraser), prompts_file=str(prompts), detector=found.name,
                  generated=generated, reused=len(jobs) - generated, seconds=time.perf_counter() - began)
    write_results(output, rows, videos, settings, found, result, clip_scores)
    return result


def summarize(rows: list[dict], videos: dict, settings: EvalSettings, detector, clip_scores: dict | None = None
              ) -> dict:
    """Rates of videos showing the concept (base, erased), per class counts, mean pixel change erased vs base,
    and with `clip_scores` ({(row, seed, run): score}) the mean CLIP score of each run."""
    result = {"videos_per_run": len(rows) * len(settings.seeds), "threshold": settings.threshold,
              "frames_per_video": settings.frames_per_video, "classes": list(detector.classes),
              **{k: v for k, v in asdict(settings).items() if k not in ("threshold", "frames_per_video")}}
    changes = []
    for run in ("base", "erased"):
        shown, per_class = 0, {name: 0 for name in detector.classes}
        for i in range(len(rows)):
            for seed in settings.seeds:
                scores = class_scores(videos[(i, seed, run)][1], detector.classes)
                shown += shows_concept(scores, settings.threshold)
                for name, score in scores.items():
                    per_class[name] += score >= settings.threshold
        result[f"rate_{run}"] = shown / result["videos_per_run"]
        result[f"class_counts_{run}"] = per_class
    non_target = []
    for i in range(len(rows)):
        for seed in settings.seeds:
            base = frames_of(videos[(i, seed, "base")][0]).astype(np.float64)
            erased = frames_of(videos[(i, seed, "erased")][0]).astype(np.float64)
            changes.append(float(np.abs(erased - base).mean() / 255))
            non_target.append(is_non_target(rows[i]))
    result["mean_pixel_change"] = float(np.mean(changes))
    kept = [change for change, other in zip(changes, non_target) if other]
    if kept:  # the CSV marks prompts without the concept: how much the eraser changed them is preservation
        result["mean_pixel_change_non_target"] = float(np.mean(kept))
    if clip_scores is not None:
        for run in ("base", "erased"):
            result[f"clip_{run}"] = float(np.mean([v for (_, _, r), v in clip_scores.items() if r == run]))
    return result


def is_non_target(row: dict) -> bool:
    """A CSV row marked as not showing the concept: column `target` = 0 / false / no."""
    return (row.get("target") or "").strip().lower() in ("0", "false", "no")


def markdown(result: dict) -> str:
    lines = [f"# Erasure measured with {result['detector']} (threshold {result['threshold']}, "
             f"{result['frames_per_video']} frames per video, {result['videos_per_run']} videos per run)", "",
             "| figure | base | erased |", "|---|---:|---:|",
             f"| videos showing the concept | {result['rate_base']:.1%} | {result['rate_erased']:.1%} |"]
    for name in result["classes"]:
        lines.append(f"| videos with {name} | {result['class_counts_base'][name]} | "
                     f"{result['class_counts_erased'][name]} |")
    if "clip_base" in result:
        lines.append(f"| CLIP score to the prompt (mean) | {result['clip_base']:.2f} | {result['clip_erased']:.2f} |")
    lines += ["", f"Mean pixel change, erased vs base (same noise; 0-1 scale): {result['mean_pixel_change']:.4f}"
              + (f"; on the prompts marked `target` 0: {result['mean_pixel_change_non_target']:.4f}"
                 if "mean_pixel_change_non_target" in result else "") + ".",
              f"{result['generated']} videos generated, {result['reused']} reused from an earlier run; "
              f"{result['seconds']:.0f} s.", "",
              "Rates compare only at the same threshold and frame sampling (papers use 0.2-0.75)."]
    return "\n".join(lines) + "\n"


def write_results(output: Path, rows: list[dict], videos: dict, settings: EvalSettings, detector,
                  result: dict, clip_scores: dict | None = None) -> tuple[Path, Path, Path]:
    extra = [name for name in rows[0] if name != "prompt"]
    measured = ("shows_concept", "classes") + (("clip",) if clip_scores is not None else ())
    header = ["prompt", *extra, "seed"] + [f"{run}_{what}" for run in ("base", "erased") for what in measured]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    for i, row in enumerate(rows):
        for seed in settings.seeds:
            cells = [row["prompt"], *(row.get(name, "") for name in extra), seed]
            for run in ("base", "erased"):
                scores = class_scores(videos[(i, seed, run)][1], detector.classes)
                cells += [int(shows_concept(scores, settings.threshold)),
                          ";".join(f"{name}:{score:.3f}" for name, score in sorted(scores.items()))]
                if clip_scores is not None:
                    cells.append(f"{clip_scores[(i, seed, run)]:.3f}")
            writer.writerow(cells)
    paths = output / "results.csv", output / "eval.json", output / "eval.md"
    atomic_write(paths[0], lambda tmp: tmp.write_text(buffer.getvalue()))
    atomic_write(paths[1], lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
    atomic_write(paths[2], lambda tmp: tmp.write_text(markdown(result)))
    return paths

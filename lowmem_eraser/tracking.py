"""Experiment trackers (`report_to`): the rows of `metrics.jsonl` and the validation videos, sent to
TensorBoard or Weights & Biases as well.

Both are optional extras; `make_tracker` imports them at once, so a missing package stops the run before
any work starts, with the `pip install` that fixes it. TensorBoard writes event files under
`output_dir/tensorboard` (no network). W&B runs offline unless the user configured it (`WANDB_MODE` or
`WANDB_API_KEY` set): a training run must never wait on, or fail for, a network it was not told to use.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from .errors import ConfigError, MissingDependencyError

REPORT_TO = ("none", "tensorboard", "wandb")


class Tracker:
    """`report_to: none`: every call does nothing, so the trainer calls the tracker unconditionally."""

    def log(self, row: dict, step: int) -> None:
        """Log the numbers of one metrics row (non-numeric values and the `step` key itself are skipped)."""

    def log_media(self, tag: str, path: Path, step: int) -> None:
        """Log a video (.gif, .mp4) or an image (.png) written at `path`."""

    def close(self) -> None:
        """Flush and close; safe to call twice."""


def _numbers(row: dict) -> dict[str, float]:
    # bool is an int: `skipped` is logged as 0/1. Non-finite values are kept: a NaN loss is worth seeing.
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))}


def _require(package: str, extra: str):
    try:
        return __import__(package)
    except ImportError:
        raise MissingDependencyError(
            f"report_to: {extra} needs the {package!r} package, which is not installed: "
            f"pip install 'lowmem-eraser[{extra}]' (or set report_to: none)"
        ) from None


class TensorBoardTracker(Tracker):
    def __init__(self, output_dir: Path, run_config: dict, start_step: int = 0):
        import yaml

        _require("tensorboard", "tensorboard")  # by name, so that the error says which extra to install
        from torch.utils.tensorboard import SummaryWriter

        self.folder = Path(output_dir) / "tensorboard"
        # On --resume, the interrupted run's events from `start_step` on are redone: purge them, or TensorBoard
        # draws both versions of those steps
        self.writer = SummaryWriter(log_dir=str(self.folder), purge_step=start_step or None)
        # TensorBoard's text plugin renders Markdown: indent the YAML to show it as a code block
        text = yaml.safe_dump(run_config, sort_keys=False)
        self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()), 0)

    def log(self, row: dict, step: int) -> None:
        for key, value in _numbers(row).items():
            self.writer.add_scalar(key, value, step)

    def log_media(self, tag: str, path: Path, step: int) -> None:
        # TensorBoard shows videos as animated GIFs inside an image summary (what `add_video` writes, except
        # that it needs moviepy to encode them); our files are GIFs already, so their bytes go in as they are.
        from PIL import Image
        from tensorboard.compat.proto.summary_pb2 import Summary

        path = Path(path)
        if path.suffix.lower() == ".mp4":
            data, size = _mp4_as_gif(path)
        else:
            data = path.read_bytes()
            with Image.open(path) as image:
                size = image.size
        image = Summary.Image(height=size[1], width=size[0], colorspace=3, encoded_image_string=data)
        self.writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def close(self) -> None:
        self.writer.close()


def _mp4_as_gif(path: Path) -> tuple[bytes, tuple[int, int]]:
    """An MP4 re-encoded as GIF bytes (TensorBoard cannot play MP4) and its (width, height)."""
    import imageio.v2 as imageio
    from PIL import Image

    from .infer import FPS

    frames = [Image.fromarray(frame) for frame in imageio.mimread(path, memtest=False)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=1000 // FPS, loop=0)
    return buffer.getvalue(), frames[0].size


class WandbTracker(Tracker):
    def __init__(self, output_dir: Path, run_config: dict):
        self.wandb = _require("wandb", "wandb")
        Path(output_dir).mkdir(parents=True, exist_ok=True)  # wandb falls back to a temp folder when `dir` is missing
        configured = "WANDB_MODE" in os.environ or "WANDB_API_KEY" in os.environ
        self.run = self.wandb.init(
            project=os.environ.get("WANDB_PROJECT", "lowmem-eraser"),
            name=Path(output_dir).name,
            dir=str(output_dir),
            config=run_config,
            mode=None if configured else "offline",  # None: wandb reads WANDB_MODE / the logged-in default
        )

    def log(self, row: dict, step: int) -> None:
        self.run.log(_numbers(row), step=step)

    def log_media(self, tag: str, path: Path, step: int) -> None:
        path = Path(path)
        if path.suffix.lower() in (".gif", ".mp4"):
            media = self.wandb.Video(str(path), format=path.suffix.lower()[1:])
        else:
            media = self.wandb.Image(str(path))
        self.run.log({tag: media}, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def make_tracker(report_to: str, output_dir: str | Path, run_config: dict, start_step: int = 0) -> Tracker:
    """The tracker for `report_to` (none | tensorboard | wandb). Call before training starts: a missing
    optional package raises MissingDependencyError here. `start_step`: the step a resumed run continues from
    (TensorBoard drops what the interrupted run logged from there on; W&B starts a new offline run)."""
    if report_to == "tensorboard":
        return TensorBoardTracker(Path(output_dir), run_config, start_step)
    if report_to == "wandb":
        return WandbTracker(Path(output_dir), run_config)
    if report_to == "none":
        return Tracker()
    raise ConfigError(f"report_to: expected one of {', '.join(REPORT_TO)}, got {report_to!r}")

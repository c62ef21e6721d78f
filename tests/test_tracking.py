"""report_to: the tracker API, TensorBoard for real (offline event files), W&B through a stand-in module."""

import sys
import types

import numpy as np
import pytest
from PIL import Image

from lowmem_eraser import LowmemEraserError
from lowmem_eraser.errors import MissingDependencyError
from lowmem_eraser.infer import export
from lowmem_eraser.tracking import Tracker, make_tracker

ROW = {"step": 3, "loss": 0.5, "unlearn": 0.25, "loc": 0.0, "pre": 0.125, "lr": 1e-3, "grad_norm": 2.0,
       "skipped": False, "s_per_step": 0.1, "note": "not a number"}


def _gif(path, frames=5):
    video = np.zeros((frames, 16, 24, 3), dtype=np.uint8)
    for i in range(frames):
        video[i, :, i * 4 : i * 4 + 4] = 255  # a moving bar: no two frames alike (Pillow merges equal ones)
    return export(video, path)


def test_none_is_a_no_op(tmp_path):
    tracker = make_tracker("none", tmp_path, {"seed": 0})
    assert type(tracker) is Tracker
    tracker.log(ROW, 3)
    tracker.log_media("validation/00", _gif(tmp_path / "v.gif"), 3)
    tracker.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.gif"]  # nothing else written


def test_tensorboard_writes_scalars_media_and_config_offline(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = make_tracker("tensorboard", tmp_path, {"concept": "red", "train": {"steps": 4}})
    for step in range(3):
        tracker.log({**ROW, "step": step, "loss": 1.0 / (step + 1)}, step)
    tracker.log_media("validation/00", _gif(tmp_path / "v.gif"), 2)
    Image.new("RGB", (8, 6), (255, 0, 0)).save(tmp_path / "p.png")
    tracker.log_media("plot", tmp_path / "p.png", 2)
    export(np.zeros((9, 16, 16, 3), dtype=np.uint8) + np.arange(9, dtype=np.uint8)[:, None, None, None] * 20,
           tmp_path / "v.mp4")
    tracker.log_media("validation/mp4", tmp_path / "v.mp4", 2)
    tracker.close()
    tracker.close()  # twice is fine

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert set(tags["scalars"]) == {"loss", "unlearn", "loc", "pre", "lr", "grad_norm", "skipped", "s_per_step"}
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
    assert [e.value for e in events.Scalars("skipped")] == [0.0, 0.0, 0.0]
    assert set(tags["images"]) == {"validation/00", "plot", "validation/mp4"}
    (video,) = events.Images("validation/00")
    assert video.step == 2 and (video.width, video.height) == (24, 16)
    assert video.encoded_image_string == (tmp_path / "v.gif").read_bytes()  # the GIF itself: TensorBoard animates it
    (mp4,) = events.Images("validation/mp4")
    assert mp4.encoded_image_string[:6] == b"GIF89a" and (mp4.width, mp4.height) == (16, 16)
    assert "config" in str(tags["tensors"])  # the run config as text


def test_a_resumed_run_replaces_the_steps_it_redoes(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = make_tracker("tensorboard", tmp_path, {})
    for step in range(5):  # checkpoint at 2, killed after step 4
        first.log({"loss": 1.0}, step)
    first.close()
    resumed = make_tracker("tensorboard", tmp_path, {}, start_step=2)
    for step in range(2, 4):
        resumed.log({"loss": 2.0}, step)
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(0, 1.0), (1, 1.0), (2, 2.0), (3, 2.0)]


def test_a_missing_tracker_package_is_one_clear_error_at_creation(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"report_to: wandb needs the 'wandb' package.*"
                                                     r"pip install 'lowmem-eraser\[wandb\]'") as info:
        make_tracker("wandb", tmp_path, {})
    assert isinstance(info.value, LowmemEraserError)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'lowmem-eraser\[tensorboard\]'"):
        make_tracker("tensorboard", tmp_path, {})
    assert not (tmp_path / "tensorboard").exists()


class _FakeWandb(types.ModuleType):
    """Records what the tracker asks of `wandb` (the real package is not installed for the tests)."""

    def __init__(self):
        super().__init__("wandb")
        self.calls = []

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        fake = self

        class Run:
            def log(self, data, step):
                fake.calls.append(("log", data, step))

            def finish(self):
                fake.calls.append(("finish",))

        return Run()

    def Video(self, path, format):
        return ("Video", path, format)

    def Image(self, path):
        return ("Image", path)


@pytest.mark.parametrize("env, mode", [({}, "offline"), ({"WANDB_API_KEY": "x"}, None),
                                       ({"WANDB_MODE": "online"}, None)])
def test_wandb_is_offline_unless_the_user_configured_it(tmp_path, monkeypatch, env, mode):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    tracker = make_tracker("wandb", tmp_path / "run", {"seed": 0})
    tracker.log(ROW, 3)
    tracker.log_media("validation/00", tmp_path / "v.gif", 3)
    tracker.close()
    tracker.close()
    (_, init), log, media, finish = fake.calls
    assert init == {"project": "lowmem-eraser", "name": "run", "dir": str(tmp_path / "run"), "config": {"seed": 0},
                    "mode": mode}
    assert log == ("log", {"loss": 0.5, "unlearn": 0.25, "loc": 0.0, "pre": 0.125, "lr": 1e-3, "grad_norm": 2.0,
                           "skipped": 0.0, "s_per_step": 0.1}, 3)
    assert media == ("log", {"validation/00": ("Video", str(tmp_path / "v.gif"), "gif")}, 3)
    assert finish == ("finish",)


def test_unknown_report_to_is_refused(tmp_path):
    with pytest.raises(ValueError, match="report_to: expected one of none, tensorboard, wandb"):
        make_tracker("mlflow", tmp_path, {})

"""Nothing lost, nothing silent: the run folder (lock, overwrite, temp files), rotated checkpoints, resume checks,
and stop signals (SIGTERM/SIGHUP/Ctrl-C save like Ctrl-C did; SIGKILL at any moment resumes bit-exactly)."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lowmem_eraser import LowmemEraserError
from lowmem_eraser.cli import main as cli_main
from lowmem_eraser.config import load_config
from lowmem_eraser.runfolder import StopSignals, Stop, checkpoint_folders
from lowmem_eraser.train import train
from test_train import PAIRS, make_config, tiny_model  # noqa: F401 -- the session fixture

STEPS_TRAIN = {"steps": 10, "save_every": 3, "keep_checkpoints": 2}


def _eraser(out: Path) -> dict:
    return torch.load(out / "eraser_weights.pt", weights_only=True)


def _assert_same_eraser(a: Path, b: Path) -> None:
    first, second = _eraser(a), _eraser(b)
    assert first.keys() == second.keys()
    for key in first:
        for inner in first[key]:
            assert torch.equal(first[key][inner], second[key][inner]), f"{key}.{inner}"


def _temp_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if ".tmp-" in p.name]


@pytest.fixture(scope="module")
def straight(tiny_model, tmp_path_factory):  # noqa: F811
    """The uninterrupted run every interrupted one must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("straight") / "run"
    return train(load_config(make_config(tiny_model, out, train=STEPS_TRAIN)))


def test_checkpoints_rotate_and_resume_falls_back_past_an_unreadable_one(tiny_model, straight, tmp_path, caplog):  # noqa: F811
    assert [p.name for p in checkpoint_folders(straight)] == ["step-000010", "step-000009"]
    config = load_config(make_config(tiny_model, tmp_path / "run", train={**STEPS_TRAIN, "steps": 7}))
    train(config)
    newest = checkpoint_folders(tmp_path / "run")[0]
    (newest / "training_state.pt").write_bytes(b"truncated")
    extended = load_config(make_config(tiny_model, tmp_path / "run", train=STEPS_TRAIN))  # steps 7 -> 10: allowed
    with caplog.at_level("WARNING"):
        train(extended, resume=True)
    assert any("unreadable" in r.getMessage() for r in caplog.records)
    _assert_same_eraser(straight, tmp_path / "run")  # from step 6 (the one before) to 10: same eraser


def test_resume_refuses_a_config_that_changes_the_result(tiny_model, straight, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    train(load_config(make_config(tiny_model, out, train={**STEPS_TRAIN, "steps": 6})))
    changed = load_config(make_config(tiny_model, out, train={**STEPS_TRAIN, "seed": 1},
                                      loss={"eta": 5.0}, eraser={"rank": 4}))
    with pytest.raises(LowmemEraserError) as error:
        train(changed, resume=True)
    message = str(error.value)
    assert "loss: " in message and '"eta": 3.0' in message and '"eta": 5.0' in message
    assert "train.seed: 0 -> 1" in message and "eraser: " in message
    shorter = load_config(make_config(tiny_model, out, train={**STEPS_TRAIN, "steps": 4}))
    with pytest.raises(LowmemEraserError, match="checkpoint is at step 6 but train.steps is 4"):
        train(shorter, resume=True)
    (tmp_path / "other.csv").write_text("prompt,normal prompt\nred ball,blue ball\n")
    other_prompts = load_config(make_config(tiny_model, out, train=STEPS_TRAIN, prompts=str(tmp_path / "other.csv")))
    with pytest.raises(LowmemEraserError, match="prompts \\(content\\)"):
        train(other_prompts, resume=True)


def test_no_silent_overwrite_and_overwrite_moves_the_old_run_aside(tiny_model, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    config = load_config(make_config(tiny_model, out, train={"steps": 2}))
    train(config)
    with pytest.raises(LowmemEraserError, match="already holds a run.*--resume.*--overwrite"):
        train(config)
    before = _eraser(out)
    train(config, overwrite=True)
    [aside] = tmp_path.glob("run.replaced-*")
    assert set(_eraser(aside)) == set(before) and (aside / "metrics.jsonl").is_file()
    assert (out / "cache").is_dir() and not (aside / "cache").exists()  # the cache stays, reused


def test_a_second_run_is_stopped_by_the_lock_and_a_stale_lock_is_taken_over(tiny_model, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(str(holder.pid))
        with pytest.raises(LowmemEraserError, match=f"in use by another training run \\(pid {holder.pid}\\)"):
            train(load_config(make_config(tiny_model, out, train={"steps": 1})))
    finally:
        holder.kill()
        holder.wait()
    (out / ".tmp-stale").write_text("")  # not a temp name of ours: left alone
    (out / ".metrics.jsonl.tmp-999999").write_text("half")
    train(load_config(make_config(tiny_model, out, train={"steps": 1})))  # the dead holder's lock is taken over
    assert not (out / ".lock").exists() and not (out / ".metrics.jsonl.tmp-999999").exists()
    assert (out / ".tmp-stale").exists()


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_and_says_so(tiny_model, tmp_path, monkeypatch):  # noqa: F811
    from lowmem_eraser import runfolder

    out = tmp_path / "run"
    save = torch.save
    calls = {"n": 0}

    def full_disk(obj, path, *args, **kwargs):
        if "training_state" in str(path):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(runfolder.torch, "save", full_disk)
    with pytest.raises(LowmemEraserError, match="checkpoint: cannot write .*disk full; the previous checkpoint is intact"):
        train(load_config(make_config(tiny_model, out, train=STEPS_TRAIN)))
    assert [p.name for p in checkpoint_folders(out)] == ["step-000003"] and not _temp_files(out)


def test_a_signal_during_a_save_waits_for_it_and_a_stop_signal_raises_stop():
    with StopSignals() as signals:
        with pytest.raises(Stop) as stop:
            with signals.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)  # a second one during the save: ignored
                done = True
        assert done and stop.value.signum == signal.SIGTERM
        with signals.deferred(swallow=True):
            os.kill(os.getpid(), signal.SIGHUP)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


def _cli(config: Path, *extra: str) -> list[str]:
    code = ("import sys; from lowmem_eraser.cli import main; "
            f"sys.exit(main(['train', '--config', {str(config)!r}, *{list(extra)!r}]))")
    return [sys.executable, "-c", code]


def _wait_for_rows(out: Path, rows: int, process, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= rows:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach {rows} steps (exit {process.poll()})")


def test_sigterm_saves_like_ctrl_c_and_resumes_bit_exactly(tiny_model, tmp_path):  # noqa: F811
    """SIGTERM (preemption, `timeout`) in a real process; SIGHUP and SIGINT take the same handler (above)."""
    signum = signal.SIGTERM
    train_cfg = {"steps": 60, "save_every": 1000, "keep_checkpoints": 2}
    straight = train(load_config(make_config(tiny_model, tmp_path / "straight", train=train_cfg)))
    config = make_config(tiny_model, tmp_path / "run", train=train_cfg)
    with open(tmp_path / "stderr.log", "w") as log:  # a file, not a pipe: an undrained pipe would block the run
        process = subprocess.Popen(_cli(config), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=log)
        _wait_for_rows(tmp_path / "run", 5, process)
        process.send_signal(signum)
        process.wait(timeout=120)
    stderr = (tmp_path / "stderr.log").read_text()
    assert process.returncode == 128 + signum, stderr[-2000:]
    assert "checkpoint saved" in stderr and "continue with --resume" in stderr and "eraser written" not in stderr
    assert not (tmp_path / "run" / "eraser_weights.pt").exists()
    assert cli_main(["train", "--config", str(config), "--resume"]) == 0
    _assert_same_eraser(straight, tmp_path / "run")


def test_sigkill_at_random_moments_resumes_to_the_same_eraser(tmp_path):
    """bench/fault_kill.py with 2 kills on a short run (the full matrix: `python bench/fault_kill.py`)."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    try:
        from fault_kill import run
    finally:
        sys.path.pop(0)
    rows = run(kills=2, seed=1, workdir=tmp_path, steps=30, prompts=4, x0_steps=8)
    assert len(rows) == 2
    assert all(row["equal"] and row["temp_files"] == 0 for row in rows), rows

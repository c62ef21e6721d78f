"""SIGKILL at random moments, then resume: every run must end with the eraser of the uninterrupted run, bit for bit,
and leave no temp file behind.

A tiny CogVideoX (built offline) is trained in a subprocess; the process is SIGKILLed after a random delay drawn
over the whole run (start-up, text encoding, x0 generation, the loop, checkpoint writes), then restarted (with
`--resume` when a checkpoint exists) until it completes; kills continue during the restarts. The kill moments are
classified by what the folder held when the process died.

    python bench/fault_kill.py [--kills 12] [--seed 0]      -> bench/results/fault_kill.md
tests/test_runfolder.py runs the same with 2 kills on a shorter run.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

PAIRS = [["a red ball moving left", "a blue ball moving left"], ["a red square moving up", "a green square moving up"],
         ["a small red ball drifting right", "a small yellow ball drifting right"],
         ["a red square sliding down", "a blue square sliding down"]] * 3  # 12 prompts: a longer x0 phase
RESULTS = Path(__file__).parent / "results" / "fault_kill.md"


def build(root: Path, steps: int, prompts: int, x0_steps: int) -> Path:
    """A tiny model folder and a config whose run takes a few seconds after start-up."""
    from lowmem_eraser.tiny import build_tiny_cogvideox

    pairs = PAIRS[:prompts]
    build_tiny_cogvideox(root / "model", sorted({p for pair in pairs for p in pair}), max_text_seq_length=10)
    (root / "prompts.yaml").write_text(yaml.safe_dump(pairs))
    config = {
        "model": str(root / "model"), "prompts": str(root / "prompts.yaml"), "concept": "red",
        "output_dir": str(root / "run"), "eraser": {"rank": 8},
        "loss": {"eta": 3.0, "alpha": 1.0, "beta": 1.0},
        "sampling": {"mode": "renoise", "num_inference_steps": x0_steps, "guidance_scale": 4.0},
        "video": {"frames": 9, "height": 64, "width": 64},
        "train": {"steps": steps, "lr": 5.0e-3, "save_every": 7, "keep_checkpoints": 2},
        "memory": {"quantize": "int8", "gradient_checkpointing": True, "dtype": "float32", "kernels": "torch"},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _command(config: Path, resume: bool) -> list[str]:
    extra = ["--resume"] if resume else []
    code = ("import sys; from lowmem_eraser.cli import main; "
            f"sys.exit(main(['train', '--config', {str(config)!r}, *{extra!r}]))")
    return [sys.executable, "-c", code]


def _state(out: Path, steps: int) -> str:
    """What the folder held at the kill: the phase the run was in, roughly."""
    from lowmem_eraser.runfolder import checkpoint_folders

    checkpoints = checkpoint_folders(out)
    if (out / "eraser_weights.pt").is_file():
        return "after the final eraser was written"
    if checkpoints and checkpoints[0].name == f"step-{steps:06d}":
        return "writing the final eraser"
    if any(".tmp-" in p.name for p in (out / "checkpoint").glob("*")):
        return f"writing a checkpoint (newest complete: {checkpoints[0].name if checkpoints else 'none'})"
    if checkpoints:
        return f"loop (newest checkpoint {checkpoints[0].name})"
    x0 = list((out / "cache").glob("x0-*/*.pt"))
    if (out / "metrics.jsonl").is_file():
        return "loop (before the first checkpoint)"
    if x0:
        return f"x0 generation ({len(x0)} cached)"
    return "start-up / text encoding"


def _wait_for(target: str, out: Path, process, delay: float) -> bool:
    """Poll until the run reaches `target` (or `delay` seconds for "random"); False if it ended first."""
    deadline = time.perf_counter() + (delay if target == "random" else 600)
    while process.poll() is None:
        if target == "random" and time.perf_counter() >= deadline:
            return True
        if target == "x0" and 2 <= len(list((out / "cache").glob("x0-*/*.pt"))):
            return True
        if target == "checkpoint write" and any(p.name.startswith(".step-") for p in (out / "checkpoint").glob("*")):
            return True
        if time.perf_counter() >= deadline:
            return True
        time.sleep(0.002)
    return False


def run(kills: int, seed: int, workdir: Path, steps: int = 400, prompts: int = len(PAIRS),
        x0_steps: int = 24) -> list[dict]:
    """The uninterrupted run, then runs killed `kills` times in all and resumed to completion; returns one row per
    kill. A run that completes before its kill starts a new episode from scratch, so every kill happens."""
    rng = random.Random(seed)
    config = build(workdir, steps, prompts, x0_steps)
    out = workdir / "run"
    began = time.perf_counter()
    subprocess.run(_command(config, False), cwd=workdir, check=True, capture_output=True)
    duration = time.perf_counter() - began
    reference = torch.load(out / "eraser_weights.pt", weights_only=True)
    os.rename(out, workdir / "reference")
    rows, episode, episode_rows = [], 0, []
    while True:
        resume = bool(out.is_dir() and any((out / "checkpoint").glob("step-*")))
        log = open(workdir / "stderr.log", "w")  # a file, not a pipe: an undrained pipe would block the run
        process = subprocess.Popen(_command(config, resume), cwd=workdir, stdout=subprocess.DEVNULL, stderr=log)
        started = time.perf_counter()
        if len(rows) < kills:
            # Every third kill waits for a moment the target names: x0 generation half done, a checkpoint being
            # written; the others come at a random time.
            target = ("x0", "checkpoint write", "random")[len(rows) % 3]
            if target == "x0" and len(list((out / "cache").glob("x0-*/*.pt"))) >= prompts:
                target = "random"  # this run's x0 is complete already
            delay = rng.uniform(0.3, 0.9 * duration)
            if _wait_for(target, out, process, delay):
                process.send_signal(signal.SIGKILL)
                process.wait()
                log.close()
                state = _state(out, steps) + (" [restarted with --resume]" if resume else "")
                delay = time.perf_counter() - started
                row = {"kill": len(rows) + 1, "episode": episode, "after_s": delay, "state": state}
                rows.append(row)
                episode_rows.append(row)
                continue
        process.wait()
        log.close()
        if process.returncode != 0:
            stderr = (workdir / "stderr.log").read_text()
            raise RuntimeError(f"a restart failed (exit {process.returncode}): {stderr[-2000:]}")
        final = torch.load(out / "eraser_weights.pt", weights_only=True)
        equal = all(torch.equal(reference[k][i], final[k][i]) for k in reference for i in reference[k])
        temp = [p for p in out.rglob("*") if ".tmp-" in p.name]
        for row in episode_rows:
            row["equal"], row["temp_files"] = equal, len(temp)
        if len(rows) >= kills:
            return rows
        os.rename(out, workdir / f"episode-{episode}")  # a fresh start for the kills still to come
        episode, episode_rows = episode + 1, []


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        rows = run(args.kills, args.seed, Path(folder))
    ok = all(row["equal"] and row["temp_files"] == 0 for row in rows)
    lines = [f"# SIGKILL at {len(rows)} random moments (seed {args.seed}), then resume", "",
             f"`python bench/fault_kill.py --kills {len(rows)} --seed {args.seed}`: the tiny CogVideoX, 400 steps, "
             "checkpoints every 7, x0 of 12 prompts at 24 sampling steps. A run that completes before its kill is "
             "compared, then a new run starts from scratch.",
             "", "| kill | after s | killed during | final eraser == uninterrupted | temp files left |",
             "|---:|---:|---|---|---:|"]
    lines += [f"| {r['kill']} | {r['after_s']:.1f} | {r['state']} (run {r['episode'] + 1}) | "
              f"{'yes' if r['equal'] else 'NO'} | {r['temp_files']} |" for r in rows]
    lines += ["", f"all runs resumed to the uninterrupted eraser: {'yes' if ok else 'NO'}"]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

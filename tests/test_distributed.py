"""Data-parallel training (distributed.py) on the CPU with gloo: real `torchrun` launches of the CLI for the
equivalence, stop and resume contracts; spawned processes (monkeypatched inside) for failures and bad launches.

Tolerance of 2 processes x batch 1 vs 1 process x batch 2: the all-reduce sums the two ranks' mean gradients
and halves them, one process takes the mean over the batch inside the MSE; both are fp32, so the gradients differ
in rounding (~1e-7 relative) and Adam carries that into the weights: measured max abs difference 4.5e-7 on
weights up to 0.19 after 6 steps; asserted: 1e-5 absolute.
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lowmem_eraser.errors import DistributedError, TrainingError
from test_train import tiny_model  # noqa: F401 (the tiny CogVideoX folder with its prompts.yaml)
ATOL = 1e-5  # module docstring
TIMEOUT = 300  # seconds for one launch: a hang fails the test instead of CI


@pytest.fixture(scope="module")
def model(tiny_model):  # noqa: F811
    return tiny_model


def write_config(model: Path, out: Path, **train) -> Path:
    config = {
        "model": str(model / "model"), "prompts": str(model / "prompts.yaml"), "concept": "red",
        "output_dir": str(out), "eraser": {"rank": 8},
        # adversarial steps every 2nd step: their vectors are gathered from both ranks
        "loss": {"eta": 3.0, "alpha": 1.0, "beta": 1.0, "mask_threshold": 0.1,
                 "adversarial": {"every": 2, "tokens": 2, "inner_steps": 2}},
        "sampling": {"mode": "renoise", "num_inference_steps": 4, "guidance_scale": 4.0},
        "video": {"frames": 9, "height": 64, "width": 64},
        "train": {"steps": 6, "lr": 5.0e-3, "batch_size": 2, "grad_clip": 1.0, "seed": 0, "save_every": 1000,
                  "log_every": 1, **train},
        "memory": {"quantize": "int8", "gradient_checkpointing": True, "offload": "none", "dtype": "float32",
                   "kernels": "torch"},
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def torchrun(config: Path, *args: str, processes: int = 2, wait: bool = True):
    """`torchrun --standalone --nproc_per_node N -m lowmem_eraser train --config ...`, 1 thread per process, run
    outside the repository (its top-level kernels/ folder would shadow the pip package bitsandbytes imports)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "lowmem_eraser", "train", "--config", str(config), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(command, cwd=config.parent, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    if not wait:
        return launcher
    output = finish(launcher)
    return subprocess.CompletedProcess(command, launcher.returncode, output, "")


def finish(launcher: subprocess.Popen) -> str:
    """The launch's output once it ends; on a timeout its workers (own sessions: torchrun starts them so) and the
    launcher are killed, so that a hang fails the test and leaves nothing running."""
    try:
        return launcher.communicate(timeout=TIMEOUT)[0]
    except subprocess.TimeoutExpired:
        kill_launch(launcher)
        raise


def kill_launch(launcher: subprocess.Popen) -> None:
    for pid in _rank_pids(launcher).values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    launcher.kill()
    launcher.communicate()


def one_process(config: Path, *args: str):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    command = [sys.executable, "-m", "lowmem_eraser", "train", "--config", str(config), *args]
    return subprocess.run(command, cwd=config.parent, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=TIMEOUT)


def weights(out: Path) -> dict[str, torch.Tensor]:
    state = torch.load(out / "eraser_weights.pt", weights_only=True)
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}", item)
        elif torch.is_tensor(value):
            flat[prefix] = value

    walk("", state)
    return flat


def state(out: Path, step: int) -> dict:
    return torch.load(out / "checkpoint" / f"step-{step:06d}" / "training_state.pt", weights_only=True)


@pytest.fixture(scope="module")
def runs(model, tmp_path_factory):
    """The same config trained by 1 process (batch 2) and by 2 processes (1 each)."""
    root = tmp_path_factory.mktemp("dp_runs")
    one = one_process(write_config(model, root / "one"))
    assert one.returncode == 0, one.stdout + one.stderr
    two = torchrun(write_config(model, root / "two"))
    assert two.returncode == 0, two.stdout + two.stderr
    return root / "one", root / "two", two


def test_two_processes_train_what_one_process_trains_with_the_same_global_batch(runs):
    one, two, launch = runs
    a, b = weights(one), weights(two)
    assert a.keys() == b.keys() and len(a) > 0
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"max abs weight difference 1x2 vs 2x1: {diff:.3g}")
    assert diff <= ATOL
    assert max(v.abs().max().item() for v in a.values()) > 100 * ATOL  # the eraser really trained
    # the adversarial vectors kept between visits: gathered from both ranks in the global batch's order
    torch.testing.assert_close(state(two, 6)["adversarial_vectors"], state(one, 6)["adversarial_vectors"],
                               rtol=0, atol=1e-4)
    assert state(two, 6)["world_size"] == 2 and state(one, 6)["world_size"] == 1
    rows_one = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    rows_two = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_two] == list(range(6))  # rank 0 alone writes: each step once
    for r1, r2 in zip(rows_one, rows_two):  # the loss terms are averaged over the ranks: the global batch's
        for name in ("loss", "unlearn", "loc", "pre", "adv"):
            assert r2[name] == pytest.approx(r1[name], rel=1e-4, abs=1e-9), (r1["step"], name)
    assert any(r["adv"] > 0 for r in rows_two) and any(r["adv"] == 0 for r in rows_two)
    assert launch.stdout.count("eraser written to") == 1  # rank 0 speaks for the run


def _rank_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of torchrun's workers, read from their environments."""
    found = {}
    for task in Path(f"/proc/{launcher.pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            rank = [e for e in environ if e.startswith(b"RANK=")]
            if rank:
                found[int(rank[0].split(b"=")[1])] = int(child)
    return found


def test_sigterm_on_rank_0_saves_one_checkpoint_all_ranks_exit_and_resume_is_exact(model, runs, tmp_path):
    _, two, _ = runs
    steps = 40  # long enough to be stopped in the middle; the reference is the same config run through
    reference = torchrun(write_config(model, tmp_path / "reference", steps=steps))
    assert reference.returncode == 0, reference.stdout + reference.stderr
    out = tmp_path / "stopped"
    launcher = torchrun(write_config(model, out, steps=steps), wait=False)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + TIMEOUT
    try:
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 5):
            assert launcher.poll() is None and time.monotonic() < deadline, "the run ended before it could be stopped"
            time.sleep(0.01)
        ranks = _rank_pids(launcher)
        assert sorted(ranks) == [0, 1]
        os.kill(ranks[0], signal.SIGTERM)
    except BaseException:
        kill_launch(launcher)
        raise
    began = time.monotonic()
    output = finish(launcher)
    print(f"every process gone {time.monotonic() - began:.1f} s after the signal")
    assert launcher.returncode != 0, output
    for pid in ranks.values():  # every rank has exited
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    saved = sorted((out / "checkpoint").iterdir())
    assert len(saved) == 1, output  # one checkpoint, by rank 0
    stopped_at = int(saved[0].name.removeprefix("step-"))
    assert 5 <= stopped_at < steps, output
    assert "interrupted at step" in output and "checkpoint saved in" in output
    assert "lost contact with another process" in output  # rank 1, left waiting in the step's all-reduce
    assert not list(out.rglob(".*.tmp-*"))  # nothing half-written

    # every rank resumes from the same checkpoint: with 2 processes the result is the uninterrupted run's, bit-exact
    again = tmp_path / "again"
    shutil.copytree(out, again)
    resumed = torchrun(write_config(model, again, steps=steps), "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    for key, value in weights(tmp_path / "reference").items():
        assert torch.equal(weights(again)[key], value), key
    # with 1 process it goes on with the same draws (the checkpoint says 2 processes wrote it)
    single = one_process(write_config(model, out, steps=steps), "--resume")
    assert single.returncode == 0, single.stdout + single.stderr
    assert "written by 2 process(es), this run has 1" in single.stderr
    reference_weights = weights(tmp_path / "reference")
    diff = max((weights(out)[k] - v).abs().max().item() for k, v in reference_weights.items())
    size = max(v.abs().max().item() for v in reference_weights.values())
    print(f"2 processes -> resumed by 1: max abs difference to the 2-process run {diff:.3g} (weights up to {size:.3g})")
    assert diff <= 1e-4 * size  # fp32 rounding carried by Adam over up to 35 steps (measured 2.2e-7 of 0.33)


# --- spawned processes: failures and bad launches ---------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, scenario: str, config: str, results: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from lowmem_eraser import distributed
    from lowmem_eraser import train as train_module
    from lowmem_eraser.config import load_config

    outcome = {"error": None}
    try:
        if scenario == "failure":
            real = train_module.experts_losses_backward
            calls = []

            def failing(*args, **kwargs):
                calls.append(1)
                if rank == 1 and len(calls) == 3:
                    raise RuntimeError("injected failure on rank 1")
                return real(*args, **kwargs)

            train_module.experts_losses_backward = failing
            train_module.train(load_config(config))
        elif scenario == "mixed":
            distributed.local_device = lambda processes: torch.device("meta" if rank == 1 else "cpu")
            distributed.start(2)
        elif scenario == "sync":
            processes = distributed.start(2)
            params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(3)]
            params[0].grad = torch.full((3,), float(rank + 1))  # 1 and 2: mean 1.5
            if rank == 1:
                params[1].grad = torch.full((3,), 4.0)  # only rank 1: (4 + 0) / 2
            # params[2]: no gradient anywhere: stays None
            sync = distributed.StepSync(processes, params)
            terms = {name: torch.tensor(float(rank)) for name in distributed.LOSS_TERMS}
            averaged, failed = sync(terms, False, 0)
            outcome.update(grads=[None if p.grad is None else p.grad.tolist() for p in params],
                           loss=averaged["loss"].item(), failed=failed,
                           gathered=sync.gather(torch.tensor([[rank]]), 0).flatten().tolist())
            distributed.stop(processes)
    except BaseException as exc:  # noqa: BLE001 (reported to the test)
        outcome["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if torch.distributed.is_initialized():  # a group left open aborts the process at exit (gloo)
            torch.distributed.destroy_process_group()
    Path(results, f"rank{rank}.json").write_text(json.dumps(outcome))


def spawn(scenario: str, tmp_path: Path, config: Path | None = None) -> list[dict]:
    import torch.multiprocessing as mp

    results = tmp_path / f"results-{scenario}"
    results.mkdir()
    context = mp.start_processes(_worker, args=(2, _free_port(), scenario, str(config), str(results)), nprocs=2,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT
    try:
        while not context.join(timeout=1):
            assert time.monotonic() < deadline, f"{scenario}: the processes hang"
    finally:  # a hang must not leave processes behind for pytest to wait on
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [json.loads((results / f"rank{r}.json").read_text()) for r in range(2)]


def test_the_step_sync_averages_gradients_and_keeps_absent_ones(tmp_path):
    for rank, outcome in enumerate(spawn("sync", tmp_path)):
        assert outcome["error"] is None, outcome
        assert outcome["grads"] == [[1.5] * 3, [2.0] * 3, None], rank
        assert outcome["loss"] == 0.5 and outcome["failed"] is False
        assert outcome["gathered"] == [0, 1]


def test_a_failing_rank_stops_every_rank_with_its_error_and_no_checkpoint_is_written(model, tmp_path):
    out = tmp_path / "failing"
    config = write_config(model, out, steps=6, save_every=2)
    rank0, rank1 = spawn("failure", tmp_path, config)
    assert rank1["error"] == "RuntimeError: injected failure on rank 1"
    assert rank0["error"].startswith("TrainingError: step 2: another process of the run failed")
    assert "rank 1: RuntimeError: injected failure on rank 1" in rank0["error"]
    # the step-2 checkpoint was saved before the failure; the failed step wrote nothing
    assert [p.name for p in sorted((out / "checkpoint").iterdir())] == ["step-000002"]
    assert not list(out.rglob(".*.tmp-*")) and not (out / "eraser_weights.pt").exists()


def test_ranks_on_different_device_types_are_refused_on_every_rank(tmp_path):
    for outcome in spawn("mixed", tmp_path):
        assert outcome["error"] == ("DistributedError: mixed device types (rank 0: cpu, rank 1: meta): every "
                                    "process must train on the same kind of device (one GPU each, or all on the CPU)")


def _launched(monkeypatch, world: int, rank: int = 0) -> None:
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(world))


def test_a_global_batch_that_does_not_split_is_refused_before_any_work(model, tmp_path, monkeypatch):
    from lowmem_eraser.config import load_config
    from lowmem_eraser.train import train

    _launched(monkeypatch, 2)
    out = tmp_path / "odd"
    with pytest.raises(DistributedError, match=r"train.batch_size: 3 does not split over 2 processes"):
        train(load_config(write_config(model, out, batch_size=3)))
    assert not out.exists() and not torch.distributed.is_initialized()


def test_more_processes_than_gpus_are_refused_before_any_work(monkeypatch):
    from lowmem_eraser import distributed

    _launched(monkeypatch, 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DistributedError, match=r"2 processes on this node but 1 GPU\(s\).*--nproc_per_node 1"):
        distributed.start(2)
    assert not torch.distributed.is_initialized()


def test_a_single_process_run_has_no_process_group(model, tmp_path, monkeypatch):
    from lowmem_eraser import distributed

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.start(3) is distributed.SINGLE and not torch.distributed.is_initialized()
    assert distributed.SINGLE.slice(3) == slice(0, 3)


def test_bad_launch_variables_are_named(monkeypatch):
    from lowmem_eraser import distributed

    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(DistributedError, match="WORLD_SIZE / RANK / LOCAL_RANK must be integers"):
        distributed.start(2)


def test_errors_live_in_errors_py():
    from lowmem_eraser import attack, plan, runfolder, train

    assert train.TrainingError is TrainingError
    for module, name in ((attack, "AttackError"), (plan, "PlanError"), (runfolder, "RunFolderError"),
                         (runfolder, "TrainingInterrupted")):
        assert getattr(module, name).__module__ == "lowmem_eraser.errors", name


def test_each_expert_gets_its_global_samples_mean_whatever_the_split(one_thread):
    """Wan2.2 A14B's two experts in a 2-process run: each rank scales each expert's loss by (its samples of the
    expert / the global batch's) x world size, so that the ranks' average gradient is the one-process gradient of
    the whole batch (fp64 model; the loss is fp32, hence rtol 1e-5). Rank 0 holds one sample of each expert, rank 1
    two of the high-noise expert."""
    from types import SimpleNamespace

    from conftest import randomize_erasers, tiny_transformer
    from lowmem_eraser import attach_erasers
    from lowmem_eraser.config import LossConfig
    from lowmem_eraser.train import StepInputs, experts_losses_backward

    experts = [tiny_transformer(), tiny_transformer()]
    sets = [attach_erasers(t, rank=4) for t in experts]
    for erasers, transformer in zip(sets, experts):
        randomize_erasers(erasers)
        transformer.double()
    pipe = SimpleNamespace(transformer=experts[0], transformer_2=experts[1], config=SimpleNamespace(boundary_ratio=0.5),
                           scheduler=SimpleNamespace(config=SimpleNamespace(num_train_timesteps=1000)))
    gen = torch.Generator().manual_seed(5)
    x_t = torch.randn(4, 3, 4, 8, 8, generator=gen, dtype=torch.float64)
    t = torch.tensor([900, 100, 800, 700])  # >= 500: expert 0 (three samples), below: expert 1 (one)
    c, empty, c_pre = (torch.randn(4, 7, 24, generator=gen, dtype=torch.float64) for _ in range(3))
    loss = LossConfig(eta=2.0, alpha=0.0, beta=0.5, anchor="preservation")
    params = [p for erasers in sets for p in erasers.parameters()]

    def grads():
        values = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        for p in params:
            p.grad = None
        return values

    experts_losses_backward(pipe, sets, StepInputs(x_t, t, c, empty, c_pre, None, None, 3), loss)
    whole = grads()
    ranks = []
    for part in (slice(0, 2), slice(2, 4)):
        batch = StepInputs(x_t[part], t[part], c[part], empty[part], c_pre[part], None, None, 3,
                           expert_counts={0: 3, 1: 1})
        experts_losses_backward(pipe, sets, batch, loss)
        ranks.append(grads())
    for g, g0, g1 in zip(whole, *ranks):
        torch.testing.assert_close((g0 + g1) / 2, g, rtol=1e-5, atol=1e-12)
    assert all(g.abs().sum() > 0 for g in whole)  # both experts trained

"""Data-parallel training throughput: one process vs N processes (`torchrun --nproc_per_node N -m lowmem_eraser
train`), the same model, prompts and config, only train.batch_size and the launcher changing.

Three runs of `lowmem-eraser train`, each in a fresh process group: 1 process at the global batch B, N processes at
the global batch B (B/N samples each), 1 process at batch B/N. From them two comparisons:

- equal global batch (1 x B vs N x B/N): the same samples per step, the same update (the eraser weights of the two
  runs are compared at the end); ideal = N x the samples/s;
- equal per-process batch (1 x B/N vs N x B/N, global B/N vs B): what adding a process buys when each keeps its
  batch; ideal = N x the samples/s.

samples/s = global batch / median `s_per_step` of rank 0's metrics.jsonl over the steps after `--warmup`;
efficiency = (samples/s with N) / (N x samples/s with 1). `s_per_step` is the loop's own clock: the batch draw, the
passes, the one all-reduce and the update (x0 generation and loading are before the first step). Over the same
steps (from rank 0's metrics rows as they appear) the script also reads the CPU time of the run's process tree
(/proc): CPU s per sample, the work data parallelism adds whatever else the machine runs, and the cores that other
processes kept busy meanwhile, which the result file states, since on a shared machine they, not the code, can set
the wall-clock efficiency.

The model is a small CogVideoX built here with random weights (`lowmem_eraser.tiny.build_tiny_cogvideox`, dims from
`--dim/--layers`), int8 base + gradient checkpointing (the shipped 2b config's switches), renoise sampling, alpha 1,
beta 1, rank 16. On the CPU every process runs with OMP_NUM_THREADS=1 (one torch thread) and the processes talk
over gloo; with CUDA, N = min(--processes, GPUs) and torchrun's processes use NCCL, one GPU each (bf16).

    python bench/bench_distributed.py                         # -> bench/results/distributed.md (~75 s on 2 cores)
    python bench/bench_distributed.py --steps 20 --processes 2 --batch 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAIRS = [
    ["a red ball moving left", "a blue ball moving left"],
    ["a red square moving up", "a green square moving up"],
    ["a small red ball drifting right", "a small yellow ball drifting right"],
    ["a red cube turning slowly", "a white cube turning slowly"],
]


def build_model(root: Path, dim: int, layers: int, latent: tuple[int, int]) -> Path:
    """A CogVideoX folder with `layers` blocks of width `dim` (heads of 64) and the prompts file; returns root."""
    from lowmem_eraser.tiny import build_tiny_cogvideox

    heads = max(1, dim // 64)
    build_tiny_cogvideox(root / "model", [p for pair in PAIRS for p in pair], num_attention_heads=heads,
                         attention_head_dim=dim // heads, num_layers=layers, time_embed_dim=dim, text_embed_dim=64,
                         sample_height=latent[0], sample_width=latent[1], max_text_seq_length=12)
    (root / "prompts.yaml").write_text(json.dumps(PAIRS))  # JSON is YAML
    return root


def write_config(root: Path, name: str, batch: int, args, cuda: bool) -> Path:
    frames, height, width = args.video
    config = {
        "model": str(root / "model"), "prompts": str(root / "prompts.yaml"), "concept": "red",
        "output_dir": str(root / "runs" / name),
        "eraser": {"rank": 16},
        "loss": {"eta": 3.0, "alpha": 1.0, "beta": 1.0, "mask_threshold": 0.1},
        "sampling": {"mode": "renoise", "num_inference_steps": 4, "guidance_scale": 4.0},
        "video": {"frames": frames, "height": height, "width": width},
        "train": {"steps": args.steps, "lr": 1.0e-3, "batch_size": batch, "grad_clip": 1.0, "seed": 0,
                  "save_every": 10_000, "log_every": 1},
        "memory": {"quantize": "int8", "gradient_checkpointing": True, "offload": "none",
                   "dtype": "bfloat16" if cuda else "float32", "kernels": "auto"},
    }
    path = root / f"{name}.yaml"
    path.write_text(json.dumps(config))
    return path


def run_training(config: Path, processes: int, cwd: Path, log: Path, warmup: int) -> dict:
    """One `lowmem-eraser train` run (torchrun when processes > 1): rank 0's metrics rows, and over the measured
    steps (from the moment rank 0 has written `warmup` rows to the moment it has written them all) the wall time,
    the CPU time of the run's whole process tree and the cores that other processes kept busy meanwhile."""
    if processes == 1:
        command = [sys.executable, "-m", "lowmem_eraser", "train", "--config", str(config)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   "-m", "lowmem_eraser", "train", "--config", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    settings = json.loads(config.read_text())
    out, steps = Path(settings["output_dir"]), settings["train"]["steps"]
    marks: dict[str, tuple] = {}  # "start" / "end": (time, the tree's CPU ticks, the machine's (busy, total))
    with open(log, "w") as handle:  # cwd: the repo's kernels/ folder must not shadow the pip `kernels` package
        run = subprocess.Popen(command, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT)
        while run.poll() is None:
            time.sleep(0.02)  # a step takes ~0.5 s: the marks are within 2 % of a step
            try:
                rows = (out / "metrics.jsonl").read_bytes().count(b"\n")
            except OSError:
                continue
            for name, count in (("start", warmup), ("end", steps)):
                if rows >= count and name not in marks:
                    marks[name] = (time.perf_counter(), _tree_ticks(run.pid), _cpu_jiffies())
    if run.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({run.returncode}); its output:\n{log.read_text()[-4000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    result = {"rows": rows, "out": out, "window_s": None, "cpu_s": None, "cores_others": None}
    if {"start", "end"} <= marks.keys():
        (t0, ticks0, stat0), (t1, ticks1, stat1) = marks["start"], marks["end"]
        result["window_s"] = t1 - t0
        if ticks0 is not None and ticks1 is not None:
            result["cpu_s"] = (ticks1 - ticks0) / os.sysconf("SC_CLK_TCK")
            if stat0 is not None and stat1 is not None:
                busy = (stat1[0] - stat0[0]) / max(1, stat1[1] - stat0[1]) * os.cpu_count()
                result["cores_others"] = max(0.0, busy - result["cpu_s"] / result["window_s"])
    return result


def _tree_ticks(pid: int) -> int | None:
    """User + system CPU ticks of process `pid` and all its descendants (Linux /proc; None elsewhere)."""
    parents, ticks = {}, {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return None
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat") as handle:
                text = handle.read()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2:].split()  # after "pid (comm) ": state ppid ... utime(11) stime(12)
        parents[int(entry)], ticks[int(entry)] = int(fields[1]), int(fields[11]) + int(fields[12])
    tree, grown = {pid}, True
    while grown:
        more = {child for child, parent in parents.items() if parent in tree} - tree
        tree |= more
        grown = bool(more)
    return sum(ticks.get(p, 0) for p in tree)


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(x) for x in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def summarise(result: dict, processes: int, batch: int, warmup: int) -> dict:
    times = [row["s_per_step"] for row in result["rows"] if row["step"] >= warmup]
    median = statistics.median(times)
    cpu = result["cpu_s"]
    return {"processes": processes, "batch": batch, "median_s": median, "spread": (min(times), max(times)),
            "steps": len(times), "samples_per_s": batch / median,
            "cpu_per_sample": None if cpu is None else cpu / (len(times) * batch),
            "cores_others": result["cores_others"], "out": result["out"]}


def eraser_difference(a: Path, b: Path) -> tuple[float, float]:
    """Max abs difference of two erasers' weights, and the largest weight."""
    import torch

    def tensors(value, prefix=""):  # the published file: {module: {"down.weight": ..., ...}}
        if isinstance(value, dict):
            return {k: t for key, item in value.items() for k, t in tensors(item, f"{prefix}{key}.").items()}
        return {prefix: value.float()}

    wa = tensors(torch.load(a / "eraser_weights.pt", weights_only=True))
    wb = tensors(torch.load(b / "eraser_weights.pt", weights_only=True))
    if wa.keys() != wb.keys():
        raise SystemExit(f"the erasers of {a} and {b} hold different tensors")
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    return diff, max(float(v.abs().max()) for v in wa.values())


def _cores(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2, help="N (with CUDA: at most the GPU count)")
    parser.add_argument("--batch", type=int, default=2, help="global batch B of the equal-global comparison "
                        "(divisible by N); the per-process batch of both comparisons' N-process run is B/N")
    parser.add_argument("--steps", type=int, default=15, help="steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the median")
    parser.add_argument("--dim", type=int, default=384, help="transformer width (heads of 64)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--video", type=int, nargs=3, default=[9, 128, 128], metavar=("FRAMES", "H", "W"))
    parser.add_argument("--dir", type=Path, default=None, help="where the model and runs are written (deleted)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "distributed.md")
    args = parser.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    n = args.processes
    if cuda:
        n = min(n, torch.cuda.device_count())
        if n < 2:
            raise SystemExit("one GPU: data-parallel training needs 2 or more (one process per GPU)")
    if n < 2 or args.batch % n:
        raise SystemExit(f"--processes {n} must be >= 2 and divide --batch {args.batch}")
    if args.steps <= args.warmup:
        raise SystemExit("--steps must exceed --warmup")
    share = args.batch // n
    if cuda:
        names = {torch.cuda.get_device_name(i) for i in range(n)}
        machine = f"{n} x {', '.join(sorted(names))}, NCCL, bf16"
    else:
        machine = (f"{platform.machine()} CPU ({os.cpu_count()} cores), gloo, fp32, OMP_NUM_THREADS=1 per process "
                   f"(one torch thread)")
    command = "python bench/bench_distributed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    root = Path(tempfile.mkdtemp(prefix="bench_distributed_", dir=args.dir))
    try:
        latent = (args.video[1] // 8, args.video[2] // 8)
        build_model(root, args.dim, args.layers, latent)
        plan = [("1x%d" % args.batch, 1, args.batch), ("%dx%d" % (n, share), n, args.batch),
                ("1x%d" % share, 1, share)]
        measured = {}
        for name, processes, batch in plan:
            config = write_config(root, name, batch, args, cuda)
            print(f"run {name}: {processes} process(es), global batch {batch}", flush=True)
            result = run_training(config, processes, root, root / f"{name}.log", args.warmup)
            measured[name] = summarise(result, processes, batch, args.warmup)
            print(json.dumps({k: v for k, v in measured[name].items() if k != "out"}), flush=True)
        one_global, many, one_share = (measured[name] for name, _, _ in plan)
        diff, largest = eraser_difference(one_global["out"], many["out"])
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def row(setting: str, r: dict, base: dict | None) -> str:
        lo, hi = r["spread"]
        eff = work = "1 (reference)"
        if base is not None:
            eff = f"{r['samples_per_s'] / (r['processes'] * base['samples_per_s']):.2f}"
            work = "?" if None in (r["cpu_per_sample"], base["cpu_per_sample"]) else \
                f"{base['cpu_per_sample'] / r['cpu_per_sample']:.2f}"
        cpu = "?" if r["cpu_per_sample"] is None else f"{r['cpu_per_sample']:.3f}"
        return (f"| {setting} | {r['processes']} | {r['batch']} ({r['batch'] // r['processes']} each) | "
                f"{r['median_s']:.3f} ({lo:.3f}-{hi:.3f}) | {r['samples_per_s']:.2f} | {eff} | {cpu} | {work} | "
                f"{_cores(r['cores_others'])} |")

    frames, height, width = args.video
    lines = [
        "# Data-parallel training throughput", "",
        f"Command: `{command.strip()}`", "",
        f"Machine: {machine}; torch {torch.__version__}. Model: CogVideoX with random weights, {args.layers} blocks "
        f"of width {args.dim}, video {frames}x{height}x{width} (latent {(frames - 1) // 4 + 1}x{latent[0]}x"
        f"{latent[1]}), int8 base, gradient checkpointing, renoise, alpha 1, beta 1, rank 16. {args.steps} steps "
        f"per run; median s/step over steps {args.warmup}-{args.steps - 1} of rank 0's metrics.jsonl "
        "(min-max in brackets); samples/s = global batch / median s/step; efficiency = samples/s with N processes "
        "/ (N x samples/s with 1). Over the same steps: CPU s/sample = CPU time of all the run's processes "
        "(torchrun's included) / samples trained, the work a sample costs, which other jobs on the machine do not "
        "inflate the way they inflate wall time; work efficiency = CPU s/sample with 1 / with N (1: data "
        "parallelism adds no work); other jobs = cores that processes outside the run kept busy meanwhile.", "",
        "| setting | processes | global batch | median s/step | samples/s | efficiency | CPU s/sample "
        "| work efficiency | other jobs, cores |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        row("equal global batch: 1 process", one_global, None),
        row(f"equal global batch: {n} processes", many, one_global),
        row("equal per-process batch: 1 process", one_share, None),
        row(f"equal per-process batch: {n} processes", many, one_share),
        "",
        f"Final eraser weights, 1 x {args.batch} vs {n} x {share} (the same draws and updates): max abs difference "
        f"{diff:.2g} (largest weight {largest:.2g}).", "",
    ]
    others = many["cores_others"]
    if not cuda and others is not None and others > 0.25:
        lines += [f"While the {n} processes ran, other jobs kept {others:.2f} of the {os.cpu_count()} cores busy: "
                  f"the {n} processes shared about {os.cpu_count() - others:.1f} cores, not {n}, so the wall-clock "
                  "efficiencies above measure this machine's contention as much as the training code.", ""]
    if not cuda:
        lines += ["GPU / NCCL: not measured here (no GPU on this machine).", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

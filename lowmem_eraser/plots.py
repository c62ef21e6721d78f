"""`loss.png`: each loss term as faint raw points under a smoothed curve, log y, and the learning rate below.

The smoothing is a running geometric mean: the mean of log(loss) over a centred window. Every step draws a new
timestep t, so the per-step loss is spread over about three decades. A plain mean (which an EMA is) is set by
the few high-loss draws and runs above almost every point on a log axis. A running median was tried on the toy
run's metrics: with the values spread almost evenly over the decades the median of a window is unstable and
the curve jumped by up to half a decade between neighbouring steps. The mean of the logs is the centre of the
cloud as the log axis shows it, smooth, and a spike counts by its log only; the window is centred, so unlike
an EMA the curve does not lag behind the trend.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

TERMS = ("loss", "unlearn", "loc", "pre")  # the loss terms of a metrics.jsonl row (train.py)


def window_size(points: int) -> int:
    """The smoothing window: a tenth of the run, odd, at least 5 points."""
    return max(5, points // 10) | 1


def geometric_running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """exp(mean(log v)) over each point's centred window (shrunk at the ends); `values` must be > 0."""
    half = window // 2
    logs = np.log(values)
    return np.exp([logs[max(0, i - half) : i + half + 1].mean() for i in range(len(values))])


def read_metrics(metrics_path: Path) -> list[dict]:
    rows = []
    for line in Path(metrics_path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a run killed mid-write leaves a partial last line: plot the rest
            continue
    return sorted((row for row in rows if isinstance(row, dict) and "step" in row), key=lambda row: row["step"])


def plot_losses(metrics_path: str | Path, png_path: str | Path) -> Path:
    """Draw `metrics.jsonl` into `png_path`. Terms that are never positive (L_loc / L_pre switched off) are left
    out; non-finite values (skipped steps) are not drawn."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    rows = read_metrics(Path(metrics_path))
    fig, (losses, rates) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for term, colour in zip(TERMS, ("black", "tab:red", "tab:blue", "tab:green")):
        points = [(row["step"], row[term]) for row in rows
                  if isinstance(row.get(term), (int, float)) and math.isfinite(row[term]) and row[term] > 0]
        if not points:
            continue
        steps, values = map(np.array, zip(*points))
        window = window_size(len(values))
        losses.scatter(steps, values, s=7, color=colour, alpha=0.3, linewidths=0)
        losses.plot(steps, geometric_running_mean(values, window), color=colour, linewidth=1.8,
                    label=f"{term} (geometric mean of {window} steps)")
    losses.set_yscale("log")
    losses.set_ylabel("loss per step (dots)")
    losses.grid(True, which="major", alpha=0.3)
    if losses.lines:
        losses.legend(fontsize=8)
    lr = [(row["step"], row["lr"]) for row in rows if isinstance(row.get("lr"), (int, float))]
    if lr:
        rates.plot(*zip(*lr), color="tab:purple")
    rates.set_ylabel("learning rate")
    rates.set_xlabel("step")
    rates.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    rates.grid(True, alpha=0.3)
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path

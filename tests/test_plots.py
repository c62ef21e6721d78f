"""loss.png (lowmem_eraser/plots.py) from a synthetic metrics.jsonl shaped like train.py's rows."""

import json
import math

import numpy as np
from PIL import Image

from lowmem_eraser.plots import geometric_running_mean, plot_losses, read_metrics, window_size


def _metrics(path, steps=200, loc_pre=True):
    """Heavy-tailed per-step losses (log-normal, ~3 decades) around a slowly falling trend, cosine lr."""
    gen = np.random.default_rng(0)
    with path.open("w") as file:
        for step in range(steps):
            unlearn = float(np.exp(gen.normal(0, 1.5))) * (1 - step / (2 * steps))
            loc = 0.01 * float(np.exp(gen.normal())) if loc_pre else 0.0
            pre = 0.001 * float(np.exp(gen.normal())) if loc_pre else 0.0
            row = {"step": step, "loss": unlearn + loc + pre, "unlearn": unlearn, "loc": loc, "pre": pre,
                   "lr": 1e-3 * 0.5 * (1 + math.cos(math.pi * step / steps)), "grad_norm": 1.0, "skipped": False,
                   "s_per_step": 0.5, "peak_mem_mib": 100.0}
            if step == 50:
                row.update(loss=float("nan"), unlearn=float("nan"), skipped=True)  # a skipped non-finite step
            file.write(json.dumps(row) + "\n")
    return path


def _check_png(path):
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (800, 550)
        assert len(np.unique(np.asarray(image.convert("L")))) > 10  # something was drawn


def test_plot_losses_draws_every_active_term_and_the_learning_rate(tmp_path):
    import matplotlib.pyplot as plt

    shown = []
    original = plt.Figure.savefig

    def spy(fig, *args, **kwargs):  # look at the figure as it is saved
        shown.append([(ax.get_yscale(), [line.get_label() for line in ax.lines], ax.get_ylabel()) for ax in fig.axes])
        return original(fig, *args, **kwargs)

    plt.Figure.savefig = spy
    try:
        png = plot_losses(_metrics(tmp_path / "metrics.jsonl"), tmp_path / "loss.png")
        plot_losses(_metrics(tmp_path / "m2.jsonl", loc_pre=False), tmp_path / "no_loc.png")
    finally:
        plt.Figure.savefig = original
    _check_png(png)
    _check_png(tmp_path / "no_loc.png")
    (losses, rates), (losses_only, _) = shown
    assert losses[0] == "log" and [label.split()[0] for label in losses[1]] == ["loss", "unlearn", "loc", "pre"]
    assert "geometric mean of 19 steps" in losses[1][0]  # 199 finite points: a tenth of the run
    assert rates[2] == "learning rate" and len(rates[1]) == 1
    assert [label.split()[0] for label in losses_only[1]] == ["loss", "unlearn"]  # all-zero loc/pre: left out


def test_a_partial_last_line_is_skipped(tmp_path):
    path = _metrics(tmp_path / "metrics.jsonl", steps=10)
    with path.open("a") as file:
        file.write('{"step": 10, "loss": 0.')  # killed mid-write
    assert [row["step"] for row in read_metrics(path)] == list(range(10))
    _check_png(plot_losses(path, tmp_path / "loss.png"))


def test_the_smoothed_curve_follows_the_log_axis_and_has_no_lag():
    values = np.full(41, 1.0)
    values[::10] = 1000.0  # rare draws three decades up
    smooth = geometric_running_mean(values, 9)
    assert np.all(smooth >= 1.0) and np.all(smooth[4:-4] < 2.2)  # one spike in 9: a third of a decade at most
    assert np.mean(values) > 90  # (what a plain mean / EMA would show: above nearly every point)
    drop = np.r_[np.full(20, 10.0), np.full(20, 0.1)]
    before, after = geometric_running_mean(drop, 9)[[19, 20]]
    assert before > 1 > after and np.isclose(before * after, 1.0)  # centred: it crosses 1 exactly at the drop
    assert np.allclose(geometric_running_mean(drop, 9)[[15, 24]], [10.0, 0.1])  # a window away: untouched
    assert window_size(3) == 5 and window_size(250) == 25 and window_size(100) == 11

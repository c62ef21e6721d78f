"""Peak memory, step time and FLOPs of one training step: the published recipe vs our modes, side by side.

Modes (cumulative after `shared`), all on the same model config and the same (x_t, t, prompts):
- reference: the published recipe: a frozen original and a trainable copy with adapters (two full
  transformers), no checkpointing, three teacher and two student passes, one backward of the summed loss
  (both student graphs alive), the text encoder resident;
- shared: one frozen base, adapters toggled (`train.eraser_losses_backward`, quantize none);
- +int8, +checkpointing (= the shipped default config), then the memory ladder: +swap half (the first half of
  the blocks streamed through BlockOffloader's two slots), +swap all, +offload activations (each block's saved
  inputs to host memory during the student passes, activation_offload.py), +kernels (Triton; CUDA only).
  On CPU the streaming and the activation copies are emulated (real copies, host side invisible to the tracker),
  so the peaks and the bytes moved are exact and the times are CPU copy times, not PCIe times.

Peak memory: CUDA `max_memory_allocated`/`max_memory_reserved` (everything on the device); CPU: the bytes the
device would hold (weights, adapters and AdamW moments, inputs) plus the LiveTensorTracker peak of the step.
FLOPs: FlopCounterMode's formulas via `plan.FlopCounter`, counted in the same pass (FlopCounterMode itself
keeps activations alive and defeats checkpointing). `predicted` is `lowmem-eraser plan`'s prediction; the
reference's is simulated the same way (`_predicted_reference`). On CUDA a mode whose predicted peak exceeds what it
may use (ours: the cap; the reference: the whole device) is skipped with its prediction shown: it would only OOM,
minutes later. CUDA also reports achieved model TFLOP/s (the step's FLOPs
without checkpoint recomputation / s/step) as a share of the device's measured bf16 matmul rate.

CPU: `pytest bench/bench_memory.py` (a small CogVideoX, ~1 minute on 2 cores). CUDA: bench/gpu_check.sh, which
sets LOWMEM_BENCH_MODEL (cogvideox-2b / cogvideox-5b), LOWMEM_BENCH_CAP_GB and LOWMEM_BENCH_ROUNDS.
Writes bench/results/memory.md and memory.png (CUDA: memory_gpu_<model>.md/.png); the table is rewritten after
every mode, so a run stopped by its time limit keeps the rows done so far.
"""

from __future__ import annotations

import copy
import functools
import gc
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lowmem_eraser import attach_erasers
from lowmem_eraser.config import LossConfig
from lowmem_eraser.localization import ConceptMaskCapture
from lowmem_eraser.memory import LiveTensorTracker, tensor_bytes
from lowmem_eraser.activation_offload import offload_activations
from lowmem_eraser.offload import BlockOffloader
from lowmem_eraser.plan import (
    PRESETS,
    SIM_DEPTHS,
    FlopCounter,
    Predictor,
    Setting,
    _fake_erasers,
    build_transformer,
    check_video,
    step_inputs,
)
from lowmem_eraser.quantize import quantize_base
from lowmem_eraser.train import eraser_losses_backward, velocity

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32  # bf16 matmuls are slow on CPU
RESULTS = Path(__file__).parent / "results"
GiB = 2**30
T5_XXL_ENCODER_PARAMS = 4_762_310_656  # google/t5-v1_1-xxl encoder: 9.5 GB in bf16
RANK = 128 if CUDA else 32
LOSS = LossConfig(alpha=1.0, beta=0.5)
# CPU: 6 blocks of dim 256 on 3 latent frames of 12x18 patches (648 video + 16 text tokens): big enough that
# the activations, not the weights, dominate the reference's peak, as they do at 49x480x720.
SMALL = dict(
    num_attention_heads=4, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=64,
    text_embed_dim=64, num_layers=6, sample_width=36, sample_height=24, sample_frames=9, patch_size=2,
    max_text_seq_length=16,
)
if CUDA:
    MODEL = os.environ.get("LOWMEM_BENCH_MODEL", "cogvideox-2b")
    CONFIG, VIDEO = PRESETS[MODEL], check_video(49, 480, 720)
    CAP_BYTES = int(float(os.environ.get("LOWMEM_BENCH_CAP_GB", "24")) * GiB)
    ROUNDS = int(os.environ.get("LOWMEM_BENCH_ROUNDS", "2"))
else:
    MODEL, CONFIG, VIDEO, CAP_BYTES, ROUNDS = "small", SMALL, check_video(9, 192, 288), None, 3
    torch.set_num_threads(1)  # on shared cores a second thread mostly adds jitter to the step times


# Activation offload leaves saved tensors under this size alone: the CPU model's block inputs are 0.7 MB, under
# activation_offload.MIN_BYTES (1 MiB, right for the real models' 68-109 MB), so the CPU run lowers it.
OFFLOAD_MIN_BYTES = None if CUDA else 2**16


@dataclass(frozen=True)
class Mode:
    name: str
    quantize: str = "none"  # none | int8 | triton
    checkpointing: bool = False
    swap: str = "none"  # none | half | all: blocks streamed (memory.offload)
    activations: bool = False  # memory.offload_activations
    kernels: str = "torch"

    def swapped(self) -> int:
        depth = CONFIG.get("num_layers", 30)
        return {"none": 0, "half": depth // 2, "all": depth}[self.swap]


MODES = [
    Mode("reference"),
    Mode("shared"),
    Mode("+int8", "int8"),
    Mode("+checkpointing", "int8", True),
    Mode("+swap half", "int8", True, "half"),
    Mode("+swap all", "int8", True, "all"),
    Mode("+offload activations", "int8", True, "all", True),
    Mode("+kernels", "triton", True, "all", True, "triton"),
]
DEFAULT_MODE = "+checkpointing"  # configs/cogvideox-*.yaml: int8, checkpointing, no offload
ROWS: dict[str, dict] = {}


def reference_losses_backward(original, student, erasers, inputs, loss: LossConfig):
    """The published recipe's step: teacher passes on the original copy, student passes on the adapted copy,
    one backward of L = L_unlearn + α·L_loc + β·L_pre (so both student graphs are alive at once)."""
    x_t, t, c, empty, c_pre = inputs.x_t, inputs.t, inputs.c, inputs.empty, inputs.c_pre
    concept_tokens, rotary, frames = inputs.concept_tokens, inputs.extras, inputs.frames
    with torch.no_grad():
        with ConceptMaskCapture(original, concept_tokens, frames) as capture:
            v_c = velocity(original, x_t, t, c, rotary)
        mask = capture.mask(loss.mask_threshold)
        v_empty = velocity(original, x_t, t, empty, rotary)
        v_neg = (v_empty - loss.eta * (v_c - v_empty)).float()
        v_pre = velocity(original, x_t, t, c_pre, rotary).float()
    with erasers.collecting_localization(mask) as terms:
        v_erased = velocity(student, x_t, t, c, rotary)
    loc = torch.stack(terms).mean()
    pre = F.mse_loss(velocity(student, x_t, t, c_pre, rotary).float(), v_pre)
    (F.mse_loss(v_erased.float(), v_neg) + loss.alpha * loc + loss.beta * pre).backward()


def _text_encoder_bytes(tmp_path_factory) -> tuple[object, int]:
    """The resident text encoder: CPU, the tiny T5 of lowmem_eraser.tiny; CUDA, a stand-in tensor with the
    T5-XXL encoder's bf16 bytes (a second real-size T5 cannot be built here, and it is not run)."""
    if CUDA:
        stand_in = torch.empty(T5_XXL_ENCODER_PARAMS * 2, dtype=torch.uint8, device=DEVICE)
        return stand_in, stand_in.numel()
    from transformers import T5EncoderModel

    from lowmem_eraser.tiny import build_tiny_cogvideox

    sizes = {key: SMALL[key] for key in ("text_embed_dim", "max_text_seq_length")}
    folder = build_tiny_cogvideox(tmp_path_factory.mktemp("t5"), ["a red ball", "a blue ball"], **sizes)
    encoder = T5EncoderModel.from_pretrained(folder / "text_encoder").to(DEVICE)
    return encoder, tensor_bytes(encoder)


def _build(mode: Mode):
    """The frozen base as `mode` configures it, on DEVICE; returns (transformer, device weight bytes, offloader)."""
    with torch.device(DEVICE):
        transformer = build_transformer(CONFIG, Setting("none", mode.checkpointing), DTYPE)
    if mode.quantize != "none":
        quantize_base(transformer, backend=mode.quantize)
    offloader = None
    if mode.swap != "none":
        blocks = transformer.transformer_blocks[: mode.swapped()]  # BlockOffloader streams the first N
        on_device = tensor_bytes(transformer) - sum(tensor_bytes(b) for b in blocks)
        offloader = BlockOffloader(transformer, DEVICE, stream=True, blocks=mode.swapped())
        offloader.attach()
        return transformer, on_device + offloader.slot_bytes, offloader
    return transformer, tensor_bytes(transformer), offloader


@pytest.fixture(scope="module")
def inputs():
    """One set of (x_t, t, prompts) for every mode."""
    if CUDA:
        _matmul_tflops()  # on the idle device, before any mode
    torch.manual_seed(0)
    with torch.device("meta"):
        shape_only = build_transformer(CONFIG, Setting("none", False), DTYPE, num_layers=1)
    made = step_inputs(shape_only, VIDEO, batch=1, dtype=DTYPE)
    for name in ("x_t", "t", "c", "empty", "c_pre", "concept_tokens"):
        setattr(made, name, getattr(made, name).to(DEVICE))
    made.extras = None if made.extras is None else tuple(r.to(DEVICE) for r in made.extras)
    return made


@functools.cache
def _predictor() -> Predictor:
    """One planner for every mode, so that they share its simulated steps. CPU: PyTorch's int8 path (what
    runs here); CUDA: the Triton path, whose int8 step equals bf16's (the +int8..+offload rows, which run the
    PyTorch path, also dequantise one weight transiently: <= 2 x 75 MB more on 5b)."""
    return Predictor(CONFIG, VIDEO, RANK, LOSS, DTYPE, int8_backend="triton" if CUDA else "int8",
                     offload_min_bytes=OFFLOAD_MIN_BYTES)


@functools.cache
def _predicted_reference(encoder_bytes: int) -> int:
    """The reference recipe's peak, predicted the way the planner predicts ours (plan.Predictor): its step run on
    fake CPU tensors at 2 and 3 blocks and extrapolated to the real depth, plus two transformers' weights, the
    text encoder, the adapters with AdamW's moments and the inputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    setting, steps = Setting("none", False), []
    for layers in SIM_DEPTHS:
        with FakeTensorMode() as mode:
            original = build_transformer(CONFIG, setting, DTYPE, num_layers=layers)
            student = build_transformer(CONFIG, setting, DTYPE, num_layers=layers)
        erasers = _fake_erasers(student, RANK, mode)
        erasers.kernels = "torch"  # the Triton kernels cannot run on fake tensors
        with mode:
            made = step_inputs(original, VIDEO, batch=1, dtype=DTYPE)
            with LiveTensorTracker() as tracker:
                reference_losses_backward(original, student, erasers, made, LOSS)
        steps.append(tracker.peak_bytes + 3 * tensor_bytes(erasers))
    depth = CONFIG.get("num_layers", 30)
    step = steps[0] + (depth - SIM_DEPTHS[0]) * (steps[1] - steps[0])
    return step + made.nbytes + 2 * _predictor().weights(setting) + encoder_bytes


def _predicted(mode: Mode) -> int | None:
    if mode.name == "reference":
        return None
    return _predictor().predict(_setting(mode)).peak


def _setting(mode: Mode) -> Setting:
    return Setting("none" if mode.quantize == "none" else "int8", mode.checkpointing, mode.swapped(),
                   mode.activations)


def _moved(offloader, activations) -> int:
    """Host<->device bytes so far: streamed block copies and offloaded activations (out and back)."""
    counters = getattr(activations, "counters", None)
    return ((offloader.bytes_copied if offloader is not None else 0)
            + (counters.bytes_to_host + counters.bytes_to_device if counters is not None else 0))


def _measure(step, resident: int, offloader=None, activations=None) -> dict:
    """Peak bytes, FLOPs and bytes moved of one step (after a warm-up step); CUDA peaks include everything
    resident."""
    step()
    before = _moved(offloader, activations)
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with FlopCounter() as counter:
            step()
        torch.cuda.synchronize()
        row = {"peak": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved(),
               "flops": counter.flops}
    else:
        with FlopCounter() as counter, LiveTensorTracker() as tracker:
            step()
        row = {"peak": resident + tracker.peak_bytes, "reserved": None, "flops": counter.flops}
    row["moved"] = _moved(offloader, activations) - before
    row["misses"] = offloader.misses if offloader is not None else 0  # streamed blocks not prefetched, all steps
    return row


@functools.cache
def _matmul_tflops() -> float:
    """The device's bf16 matmul rate, measured once (8192^3, median of triton.testing.do_bench): the ceiling
    that achieved FLOP/s is compared with."""
    import triton.testing

    a, b = (torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    ms = triton.testing.do_bench(lambda: a @ b, warmup=100, rep=300, return_mode="median")
    return 2 * 8192**3 / ms / 1e9


@functools.cache
def _h2d_gbps() -> float:
    """Pinned host -> device copy rate, measured once (256 MiB, median of triton.testing.do_bench): the planner's
    --h2d-gbps for this machine."""
    import triton.testing

    host = torch.empty(2**28, dtype=torch.uint8, pin_memory=True)
    device = torch.empty_like(host, device=DEVICE)
    ms = triton.testing.do_bench(lambda: device.copy_(host, non_blocking=True), warmup=5, rep=50,
                                 return_mode="median")
    return host.numel() / ms / 1e6


def _calibration_lines() -> list[str]:
    """CUDA: the planner's step-time model with this GPU's measured rates (achieved TFLOP/s of the resident
    checkpointed step, pinned H2D GB/s) against every measured mode: how well the overlap model predicts."""
    resident = ROWS.get(DEFAULT_MODE, {})
    if not CUDA or not resident.get("seconds"):
        return []
    from lowmem_eraser.plan import Speeds

    predictor = _predictor()
    base = predictor.step_seconds(_setting(Mode(DEFAULT_MODE, "int8", True)), Speeds(1.0, 1.0))  # s at 1 TFLOP/s
    speeds = Speeds(tflops=base / resident["seconds"], h2d_gbps=_h2d_gbps())
    lines = ["", f"Calibration: `lowmem-eraser plan --tflops {speeds.tflops:.0f} --h2d-gbps {speeds.h2d_gbps:.1f}` "
             f"for this GPU ({DEFAULT_MODE} step FLOPs / its s/step; pinned 256 MiB host->device copies).", "",
             "| mode | measured s/step | predicted s/step | predicted / measured | vs resident (measured) |",
             "|---|---:|---:|---:|---:|"]
    for mode in MODES[1:]:
        row = ROWS.get(mode.name, {})
        if row.get("seconds"):
            predicted = predictor.step_seconds(_setting(mode), speeds)
            lines.append(f"| {mode.name} | {row['seconds']:.3f} | {predicted:.3f} | {predicted / row['seconds']:.2f} | "
                         f"{row['seconds'] / resident['seconds']:.2f}x |")
    return lines


@pytest.mark.parametrize("mode", MODES, ids=[m.name for m in MODES])
def test_mode(mode, inputs, benchmark, tmp_path_factory):
    if mode.kernels == "triton" and not CUDA:
        pytest.skip("+kernels needs CUDA; on CPU it would equal +offload activations (PyTorch kernels)")
    if CUDA:  # a mode whose predicted peak exceeds what it may use would only OOM, minutes later: show the prediction
        reference = mode.name == "reference"  # its stand-in T5's size is known before building
        predicted = _predicted_reference(T5_XXL_ENCODER_PARAMS * 2) if reference else _predicted(mode)
        available = torch.cuda.get_device_properties(0).total_memory if reference else CAP_BYTES
        if predicted > available:
            limit = "device" if reference else "cap"
            why = f"predicted peak {predicted / GiB:.1f} GiB > {limit} {available / GiB:.1f} GiB"
            ROWS[mode.name] = {"skipped": why, "predicted": predicted}
            _write_table()
            pytest.skip(f"{mode.name}: {why}")
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
        fraction = 1.0 if mode.name == "reference" else CAP_BYTES / torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(fraction, 1.0))
    torch.manual_seed(0)
    extra, encoder_bytes, offloader, activations = [], 0, None, None
    try:
        if mode.name == "reference":
            original, weights, _ = _build(mode)
            student = copy.deepcopy(original)
            encoder, encoder_bytes = _text_encoder_bytes(tmp_path_factory)
            extra, weights = [student, encoder], 2 * weights + encoder_bytes
            erasers = attach_erasers(student, rank=RANK)
        else:
            original, weights, offloader = _build(mode)
            erasers = attach_erasers(original, rank=RANK)
        erasers.kernels = mode.kernels
        optimizer = torch.optim.AdamW(erasers.parameters(), lr=1e-4)
        if mode.activations:
            options = {} if OFFLOAD_MIN_BYTES is None else {"min_bytes": OFFLOAD_MIN_BYTES}
            activations = offload_activations(True, DEVICE, mode=None if CUDA else "emulate", model=original,
                                              **options)

        def step():
            if mode.name == "reference":
                reference_losses_backward(original, extra[0], erasers, inputs, LOSS)
            else:
                eraser_losses_backward(original, erasers, inputs, LOSS, activations=activations)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def timed_step():
            step()
            if CUDA:
                torch.cuda.synchronize()  # time the GPU's work, not the queuing of it

        resident = weights + 3 * tensor_bytes(erasers) + inputs.nbytes  # + AdamW's two moments
        if CUDA:  # building on the GPU (bf16, then int8; blocks moved to the host) leaves freed blocks cached
            gc.collect()
            torch.cuda.empty_cache()
        row = _measure(step, resident, offloader, activations)
        if CUDA and mode.kernels == "triton":  # a kernel that failed its probe would run PyTorch silently
            from lowmem_eraser.kernels import utils

            assert all(utils._usable.values()), f"a Triton kernel fell back to PyTorch: {utils._usable}"
        benchmark.pedantic(timed_step, rounds=ROUNDS, iterations=1, warmup_rounds=0)
        row["seconds"] = statistics.median(benchmark.stats.stats.data)
    except torch.cuda.OutOfMemoryError:
        row = {"peak": None, "reserved": None, "flops": None, "seconds": None, "oom": True, "moved": None}
    finally:
        if offloader is not None:
            offloader.detach()
    if mode.name == "reference":
        row["predicted"] = _predicted_reference(T5_XXL_ENCODER_PARAMS * 2 if CUDA else encoder_bytes)
    else:
        row["predicted"] = _predicted(mode)
    ROWS[mode.name] = row
    print(f"\n{mode.name}: " + ", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    _write_table()  # survives a timeout of a later mode


def _moved_cell(mode: Mode, row: dict) -> str:
    if mode.name == "reference":
        return "-"
    planned = _predictor().moved_bytes(_setting(mode))
    return f"{row['moved'] / 1e6:,.1f} ({planned / 1e6:,.1f})"


def _ratio(row, key):
    ref = ROWS.get("reference", {}).get(key)
    return f"{row[key] / ref:.3f}x" if row.get(key) and ref else "-"


def _mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:,.1f}"


def _machine() -> str:
    if CUDA:
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} thread(s))"


def _table_path(ext: str) -> Path:
    return RESULTS / (f"memory_gpu_{MODEL}.{ext}" if CUDA else f"memory.{ext}")


def _write_table() -> None:
    v = VIDEO
    cap = f", ours capped at {CAP_BYTES / GiB:.0f} GiB (reference uncapped)" if CUDA else ""
    # Model FLOPs: the step without checkpoint recomputation, as the planner counts it (the same passes in every
    # mode), so that recomputation shows up as lower achieved throughput rather than as useful work.
    model_flops = _predictor().predict(Setting("none", False)).flops
    peak_tflops = _matmul_tflops() if CUDA else None
    lines = [
        f"# Training-step memory: {MODEL}, {v.frames}x{v.height}x{v.width}, batch 1, rank {RANK}, "
        f"alpha {LOSS.alpha}, beta {LOSS.beta}, {str(DTYPE).removeprefix('torch.')}",
        "",
        f"Machine: {_machine()}, torch {torch.__version__}{cap}. "
        f"Step time: median of {ROUNDS} step(s) after a warm-up.",
        "Peak: " + ("max_memory_allocated and max_memory_reserved." if CUDA else
                    "device-resident bytes (weights, adapters + AdamW moments, inputs) + LiveTensorTracker peak."),
        f"Model TFLOP/s: {model_flops / 1e9:,.1f} GFLOP (the step without checkpoint recomputation) / s/step"
        + (f"; bf16 peak: an 8192^3 bf16 matmul measured here at {peak_tflops:.0f} TFLOP/s." if CUDA else "."),
        "",
        "| mode | peak MiB | reserved MiB | predicted (plan) MiB | peak vs reference | s/step | vs reference | "
        "GFLOP/step (run) | model TFLOP/s | of bf16 peak | MB moved/step (plan) | not prefetched |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        row = ROWS.get(mode.name)
        if row is None:
            why = ("skipped (CUDA only; equals +offload activations on CPU)" if mode.kernels == "triton" and not CUDA
                   else "not run")
            lines.append(f"| {mode.name} | {why} | | | | | | | | | | |")
        elif row.get("skipped") or row.get("oom"):
            why = f"skipped: {row['skipped']}" if row.get("skipped") else "OOM"
            lines.append(f"| {mode.name} | {why} | | {_mib(row['predicted'])} | | | | | | | | |")
        else:
            tflops = model_flops / row["seconds"] / 1e12
            share = f"{tflops / peak_tflops:.1%}" if peak_tflops else "-"
            lines.append(
                f"| {mode.name} | {_mib(row['peak'])} | {_mib(row['reserved'])} | {_mib(row['predicted'])} | "
                f"{_ratio(row, 'peak')} | {row['seconds']:.3f} | {_ratio(row, 'seconds')} | "
                f"{row['flops'] / 1e9:,.1f} | {tflops:.3g} | {share} | {_moved_cell(mode, row)} | "
                f"{row.get('misses', '-')} |"
            )
    default, reference = ROWS.get(DEFAULT_MODE, {}), ROWS.get("reference", {})
    against, what = reference.get("peak"), "the reference's peak"
    if against is None and reference.get("predicted"):  # skipped or OOM
        against, what = reference["predicted"], "the reference's predicted peak"
    if default.get("peak") and against:
        ratio = default["peak"] / against
        verdict = "meets" if ratio <= 0.25 else "MISSES"
        lines += ["", f"Default config ({DEFAULT_MODE}: int8, checkpointing, no offload): {ratio:.3f}x {what}: "
                  f"{verdict} the <= 0.25x target."]
    lines += _calibration_lines()
    RESULTS.mkdir(parents=True, exist_ok=True)
    _table_path("md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines), flush=True)


def test_write_results():
    """The table and the plot (the only thing this benchmark asserts)."""
    _write_table()
    _plot(_table_path("png"), _machine())
    assert _table_path("md").stat().st_size > 0


def _plot(path: Path, machine: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m.name for m in MODES if ROWS.get(m.name, {}).get("peak")]
    reference = dict(ROWS.get("reference", {}))
    if reference.get("peak") is None:  # skipped or OOM: memory against its predicted peak, nothing else
        reference["peak"] = reference.get("predicted")
    metrics = [(k, label) for k, label in [("peak", "peak memory"), ("seconds", "step time"), ("flops", "FLOPs")]
               if reference.get(k)]
    if not metrics:
        print(f"no plot: the reference was neither measured nor predicted ({path})")
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(metrics)
    for i, (key, label) in enumerate(metrics):
        ratios = [ROWS[n][key] / reference[key] for n in names]
        ax.bar([x + i * width for x in range(len(names))], ratios, width, label=label)
    ax.axhline(0.25, color="grey", linestyle="--", linewidth=1, label="0.25x target (memory)")
    ax.set_xticks([x + width for x in range(len(names))], names)
    ax.set_ylabel("ratio to reference")
    ax.set_title(f"{MODEL}, {VIDEO.frames}x{VIDEO.height}x{VIDEO.width} on {machine}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

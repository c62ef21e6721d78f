"""The planner's per-stage predictions vs measured CUDA peaks, full-size CogVideoX-2b at 49x480x720.

`lowmem-eraser plan` predicts every stage of a run on a CPU (lowmem_eraser/stages.py, plan.Predictor); the
training step is compared by bench_memory.py, the other stages here, each on a fresh allocator peak:
- text encoding: T5-XXL (random weights, bf16) encoding a batch of 8 prompts of 226 tokens on the GPU;
- x0 generation: the int8 (Triton) transformer with erasers attached, one no-grad forward at batch 2 (CFG);
- infer denoising: the bf16 transformer, one no-grad forward at batch 2;
- VAE decode: AutoencoderKLCogVideoX at 13x60x90 latents, plain and tiled + sliced.
Predicted: allocated peak and "reserved" = allocated x 1.10 (the planner's slack). Target: within 10 % of the
measured reserved peak. Writes bench/results/stages_cuda.md. Run: bash bench/gpu_check.sh.
"""

import gc
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("the per-stage check needs a CUDA GPU", allow_module_level=True)

from lowmem_eraser import attach_erasers  # noqa: E402
from lowmem_eraser.config import LossConfig  # noqa: E402
from lowmem_eraser.plan import PRESETS, Predictor, Setting, build_transformer, check_video  # noqa: E402
from lowmem_eraser.plan import step_inputs  # noqa: E402
from lowmem_eraser.stages import ALLOCATOR_SLACK, T5_XXL, default_dtype, text_stage, vae_bytes  # noqa: E402
from lowmem_eraser.stages import vae_decode_peak  # noqa: E402
from lowmem_eraser.train import velocity  # noqa: E402

DEVICE = torch.device("cuda")
DTYPE = torch.bfloat16
GiB = 2**30
MODEL = "cogvideox-2b"
VIDEO = check_video(49, 480, 720)
RESULTS = Path(__file__).parent / "results" / "stages_cuda.md"
ROWS = []
PREDICTOR = Predictor(PRESETS[MODEL], VIDEO, 128, LossConfig(alpha=1.0, beta=0.0), DTYPE, text_config=T5_XXL,
                      vae_config={})


def _write_table():
    lines = [f"# Planner vs measured per stage ({torch.cuda.get_device_name()}, {MODEL}, 49x480x720, bf16)", "",
             "| stage | predicted alloc GiB | measured alloc GiB | predicted reserved GiB | measured reserved GiB "
             "| error vs reserved | target |", "|---|---:|---:|---:|---:|---:|---|"]
    for name, predicted, allocated, reserved in ROWS:
        error = predicted * (1 + ALLOCATOR_SLACK) / reserved - 1
        lines.append(f"| {name} | {predicted / GiB:.2f} | {allocated / GiB:.2f} | "
                     f"{predicted * (1 + ALLOCATOR_SLACK) / GiB:.2f} | {reserved / GiB:.2f} | {error:+.1%} | "
                     f"{'ok' if abs(error) <= 0.10 else 'MISSED'} (±10 %) |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    return lines


@pytest.fixture(scope="module", autouse=True)
def table():
    yield
    print("\n" + "\n".join(_write_table()))


def _fresh():
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    assert torch.cuda.memory_allocated() < 2**26, "a previous stage left tensors on the GPU"


def _built():
    """The module is built: measure only the stage from here (a build on the GPU caches and peaks on its own:
    quantising keeps bf16 and int8 copies together; real runs build on the CPU)."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def _record(name, predicted):
    torch.cuda.synchronize()
    ROWS.append((name, predicted, torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()))
    _write_table()  # a step cut by its time limit keeps the rows done
    print(f"{name}: predicted {predicted / GiB:.2f} GiB, measured {torch.cuda.max_memory_allocated() / GiB:.2f} "
          f"allocated / {torch.cuda.max_memory_reserved() / GiB:.2f} reserved")


@torch.no_grad()
def test_text_encoding():
    from transformers import T5Config, T5EncoderModel

    _fresh()
    with torch.device(DEVICE), default_dtype(DTYPE):
        encoder = T5EncoderModel(T5Config(**T5_XXL, is_encoder_decoder=False, use_cache=False)).eval()
    _built()
    encoder(input_ids=torch.randint(0, 32128, (8, 226), device=DEVICE))
    _record("text encoding (T5-XXL, batch 8)", text_stage(T5_XXL, 8, 226, DTYPE, on_gpu=True).gpu)
    del encoder


@pytest.mark.parametrize("quantize", ["triton", "none"], ids=["x0 generation (int8)", "infer denoising (bf16)"])
@torch.no_grad()
def test_sampling_forward(quantize):
    _fresh()
    with torch.device(DEVICE):
        transformer = build_transformer(PRESETS[MODEL], Setting(quantize, False), DTYPE)
    erasers = attach_erasers(transformer, rank=128)
    inputs = step_inputs(transformer, VIDEO, batch=2, dtype=DTYPE)
    x_t, t, c = inputs.x_t.to(DEVICE), inputs.t.to(DEVICE), inputs.c.to(DEVICE)
    rotary = None if inputs.extras is None else tuple(r.to(DEVICE) for r in inputs.extras)
    _built()
    velocity(transformer, x_t, t, c, rotary)
    if quantize == "triton":  # a kernel that failed its probe would silently measure the PyTorch path
        from lowmem_eraser.kernels import utils

        assert all(utils._usable.values()), f"a Triton kernel fell back to PyTorch: {utils._usable}"
    # what plan.Predictor.process / infer count for these stages: resident weights, fp32 adapters, forward peak
    setting = Setting("int8" if quantize == "triton" else "none", False)
    peak, inputs_bytes = PREDICTOR.forward_peak(setting, 2)
    predicted = PREDICTOR.weights(setting) + sum(p.numel() * 4 for p in erasers.parameters()) + peak + inputs_bytes
    _record(f"{'x0 generation (int8)' if quantize == 'triton' else 'infer denoising (bf16)'}, batch 2", predicted)
    del transformer, erasers


@pytest.mark.parametrize("tiled", [False, True], ids=["plain", "tiled"])
@torch.no_grad()
def test_vae_decode(tiled):
    from diffusers import AutoencoderKLCogVideoX

    _fresh()
    with torch.device(DEVICE), default_dtype(DTYPE):
        vae = AutoencoderKLCogVideoX().eval()
    if tiled:
        vae.enable_tiling()
        vae.enable_slicing()
    shape = (1, 16, 13, 60, 90)
    latents = torch.randn(shape, device=DEVICE, dtype=DTYPE)
    _built()
    vae.decode(latents)
    predicted = vae_bytes({}, DTYPE) + vae_decode_peak({}, shape, DTYPE, tiled)
    _record(f"VAE decode ({'tiled' if tiled else 'plain'})", predicted)
    del vae

"""The memory ladder as `lowmem-eraser plan` predicts it: CogVideoX-2b and -5b at 49x480x720 (and, with
`--models`, any preset at its default video: Wan2.1 81x480x832, HunyuanVideo 61x544x960), rank 128, alpha 1,
beta 0.5, batch 1, the text encoder placed by `memory.text_encoder: auto`, on 8/12/16/24 GB cards.

For each model: every rung (8-bit or not, checkpointing, blocks streamed, activations offloaded) with its
predicted whole-process need (allocated peak x 1.10 + 1 GiB CUDA context, the largest stage), host RAM
(tensor bytes, the largest stage), host<->device GB per step and s/step at the planner's stated rates; then for
each budget the rung the planner picks (the shortest predicted step that fits; equal times: fewer bytes moved).
Predictions only, made on this CPU (nothing here is a GPU measurement).

Run: python bench/ladder.py  (about 2 minutes on 2 cores) -> bench/results/ladder.md
     python bench/ladder.py --models wan2.1-1.3b wan2.1-14b hunyuanvideo --out ladder-families.md
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

from lowmem_eraser.config import LossConfig
from lowmem_eraser.plan import (MODEL_PRESETS, Predictor, RunSpec, Setting, Speeds, check_video, fastest_fit,
                                ladder, model_spec, rung_candidates)

GiB = 2**30
BUDGETS = (8, 12, 16, 24)
RESULTS = Path(__file__).parent / "results"


def rung_label(setting: Setting, depth: int) -> str:
    swap = "none" if setting.swap == 0 else "all" if setting.swap >= depth else f"{setting.swap}/{depth}"
    return (f"{'int8' if setting.quantize == 'int8' else 'bf16'}, ckpt {'on' if setting.checkpointing else 'off'}, "
            f"streamed {swap}, activations {'host' if setting.offload_activations else 'GPU'}")


def model_rows(name: str, speeds: Speeds) -> list[str]:
    spec = model_spec(name)
    loss = LossConfig(alpha=1.0, beta=0.5)
    video = check_video(*MODEL_PRESETS[name].video, name)
    predictor = Predictor(spec.transformer, video, 128, loss, torch.bfloat16,
                          text_config=spec.text_encoder, vae_config=spec.vae, speeds=speeds, facts=spec.facts)
    run, depth = RunSpec(), predictor.depth
    lines = [f"## {name} ({depth} blocks, {video.frames}x{video.height}x{video.width})", "",
             "| rung | needs GiB (text encoder on CPU) | host RAM GiB | GB moved/step | s/step |", "|---|---:|---:|---:|---:|"]
    # the rung table: T5 on the CPU so that the training stages, not the encoder, set the need
    cpu_run = replace(run, text_encoder="cpu")
    settings = list(ladder(depth)) + [Setting("int8", True, n, act) for n in (depth // 4, depth // 2)
                                      for act in (False, True)]
    for setting in settings:
        p = predictor.process(setting, cpu_run, 24 * GiB)
        lines.append(f"| {rung_label(setting, depth)} | {p.needs / GiB:.2f} | {p.host / GiB:.2f} | "
                     f"{p.moved / 1e9:.1f} | {p.seconds:.2f} |")
    lines += ["", "Picks (memory.text_encoder: auto):", "",
              "| budget | pick | needs GiB | host RAM GiB | GB moved/step | s/step | vs resident int8 |",
              "|---|---|---:|---:|---:|---:|---:|"]
    resident_int8 = predictor.step_seconds(Setting("int8", True), speeds)
    for budget in BUDGETS:
        pick = fastest_fit(rung_candidates(predictor, run, budget * GiB), budget * GiB)
        if pick is None:
            lines.append(f"| {budget} GB | nothing fits | | | | | |")
            continue
        lines.append(f"| {budget} GB | {rung_label(pick.setting, depth)}, text encoder on the "
                     f"{'GPU' if pick.text_on_gpu else 'CPU'} | {pick.needs / GiB:.2f} | {pick.host / GiB:.2f} | "
                     f"{pick.moved / 1e9:.1f} | {pick.seconds:.2f} | {pick.seconds / resident_int8:.2f}x |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cogvideox-2b", "cogvideox-5b"], choices=list(MODEL_PRESETS))
    parser.add_argument("--out", default="ladder.md", help="file name under bench/results/")
    args = parser.parse_args()
    began = time.perf_counter()
    speeds = Speeds()
    lines = ["# The memory ladder (predicted by `lowmem-eraser plan`, not measured on a GPU)", "",
             "Each model at its preset's default video, rank 128, alpha 1, beta 0.5, batch 1, bf16 compute. "
             f"s/step at {speeds.tflops:g} TFLOP/s "
             f"and {speeds.h2d_gbps:g} GB/s host<->device per direction, copies overlapped with each block's "
             "compute; needs = allocated x 1.10 + 1 GiB. Host RAM: tensor bytes of the largest stage (the Python "
             "process adds 1-3 GiB).", ""]
    for name in args.models:
        lines += model_rows(name, speeds)
    lines.append(f"Written by `python bench/ladder.py` in {time.perf_counter() - began:.0f} s.")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

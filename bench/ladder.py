"""The memory ladder as `lowmem-eraser plan` predicts it: CogVideoX-2b and -5b at 49x480x720, rank 128, alpha 1,
beta 0.5, batch 1, T5 placed by `memory.text_encoder: auto`, on 8/12/16/24 GB cards.

For each model: every rung (8-bit or not, checkpointing, blocks streamed, activations offloaded) with its
predicted whole-process need (allocated peak x 1.10 + 1 GiB CUDA context, the largest stage), host RAM
(tensor bytes, the largest stage), host<->device GB per step and s/step at the planner's stated rates; then for
each budget the rung the planner picks (the shortest predicted step that fits; equal times: fewer bytes moved).
Predictions only, made on this CPU (nothing here is a GPU measurement).

Run: python bench/ladder.py  (about 2 minutes on 2 cores) -> bench/results/ladder.md
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from lowmem_eraser.config import LossConfig
from lowmem_eraser.plan import (PRESETS, Predictor, RunSpec, Setting, Speeds, check_video, fastest_fit, ladder,
                                model_spec, rung_candidates)

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
    predictor = Predictor(spec.transformer, check_video(49, 480, 720), 128, loss, torch.bfloat16,
                          text_config=spec.text_encoder, vae_config=spec.vae, speeds=speeds)
    run, depth = RunSpec(), predictor.depth
    lines = [f"## {name} ({depth} blocks)", "",
             "| rung | needs GiB (T5 on CPU) | host RAM GiB | GB moved/step | s/step |", "|---|---:|---:|---:|---:|"]
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
        lines.append(f"| {budget} GB | {rung_label(pick.setting, depth)}, T5 on the "
                     f"{'GPU' if pick.text_on_gpu else 'CPU'} | {pick.needs / GiB:.2f} | {pick.host / GiB:.2f} | "
                     f"{pick.moved / 1e9:.1f} | {pick.seconds:.2f} | {pick.seconds / resident_int8:.2f}x |")
    return lines + [""]


def main() -> None:
    began = time.perf_counter()
    speeds = Speeds()
    lines = ["# The memory ladder (predicted by `lowmem-eraser plan`, not measured on a GPU)", "",
             f"49x480x720, rank 128, alpha 1, beta 0.5, batch 1, bf16 compute. s/step at {speeds.tflops:g} TFLOP/s "
             f"and {speeds.h2d_gbps:g} GB/s host<->device per direction, copies overlapped with each block's "
             "compute; needs = allocated x 1.10 + 1 GiB. Host RAM: tensor bytes of the largest stage (the Python "
             "process adds 1-3 GiB).", ""]
    for name in PRESETS:
        lines += model_rows(name, speeds)
    lines.append(f"Written by `python bench/ladder.py` in {time.perf_counter() - began:.0f} s.")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ladder.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""`lowmem-eraser eval`: measure an eraser in the toy world with the detector.

Every attribute combination is captioned in the held-out phrasings (never seen in training), generated with
the erasers off and on from the same seed, and read back by `detect`. Target prompts are those whose
attribute equals the erased concept ("red"); the others are non-target prompts.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from ..errors import ConfigError
from .build import generate, held_out_prompts
from .world import COLOURS, MOTIONS, SHAPES, Video, detect

ATTRIBUTES = {"colour": COLOURS, "shape": SHAPES, "motion": MOTIONS}
# (metric, comparison, bound): the targets of the toy world (issue 5)
TARGETS = {
    "target_rate_base": (">=", 0.90),
    "target_rate_erased": ("<=", 0.10),
    "target_other_attributes_erased": (">=", 0.90),
    "non_target_accuracy_ratio": (">=", 0.95),
}


def concept_attribute(concept: str) -> str:
    for name, values in ATTRIBUTES.items():
        if concept in values:
            return name
    raise ConfigError(f"concept: {concept!r} is no attribute value of the toy world ({', '.join(sum(ATTRIBUTES.values(), ()))})")


def _accuracy(detected: list[Video | None], truth: list[Video], attribute: str) -> float:
    return sum(d is not None and getattr(d, attribute) == getattr(t, attribute) for d, t in zip(detected, truth)) / len(truth)


def evaluate(model: str | Path, eraser: str | Path, concept: str, steps: int = 25, guidance: float = 5.0, seed: int = 0,
             kernels: str = "auto") -> dict:
    """Base vs erased figures on the held-out prompts (see the module doc); `kernels` as `memory.kernels`."""
    from .. import erasers_disabled, load_erasers
    from ..infer import load_pipeline

    attribute = concept_attribute(concept)
    others = [name for name in ATTRIBUTES if name != attribute]
    prompts, truth = map(list, zip(*held_out_prompts()))
    is_target = [getattr(video, attribute) == concept for video in truth]

    pipe = load_pipeline(model)
    load_erasers(pipe.transformer, eraser).kernels = kernels
    with erasers_disabled(pipe.transformer):
        base = generate(pipe, prompts, seed, steps, guidance)
    erased = generate(pipe, prompts, seed, steps, guidance)
    detected = {"base": [detect(v) for v in base], "erased": [detect(v) for v in erased]}

    def subset(values, target):
        return [v for v, t in zip(values, is_target) if t == target]

    result = {"concept": concept, "attribute": attribute, "prompts": len(prompts), "target_prompts": sum(is_target),
              "steps": steps, "guidance": guidance, "seed": seed}
    for run in ("base", "erased"):
        on_target = subset(detected[run], True)
        result[f"target_rate_{run}"] = sum(d is not None and getattr(d, attribute) == concept for d in on_target) / len(on_target)
        result[f"target_other_attributes_{run}"] = min(_accuracy(on_target, subset(truth, True), name) for name in others)
        for name in others:
            result[f"target_{name}_{run}"] = _accuracy(on_target, subset(truth, True), name)
        for name in ATTRIBUTES:
            result[f"non_target_{name}_{run}"] = _accuracy(subset(detected[run], False), subset(truth, False), name)
        result[f"non_target_accuracy_{run}"] = sum(result[f"non_target_{n}_{run}"] for n in ATTRIBUTES) / len(ATTRIBUTES)
    result["non_target_accuracy_ratio"] = result["non_target_accuracy_erased"] / max(result["non_target_accuracy_base"], 1e-9)
    non_target = torch.tensor([not t for t in is_target])
    result["non_target_mean_change"] = ((erased[non_target] - base[non_target]).abs().mean() / base[non_target].abs().mean()).item()
    result["target_mean_change"] = ((erased[~non_target] - base[~non_target]).abs().mean() / base[~non_target].abs().mean()).item()
    result["targets_met"] = {name: _meets(result[name], *bound) for name, bound in TARGETS.items()}
    result["examples"] = [
        {"prompt": p, "truth": asdict(t), "base": d_b and asdict(d_b), "erased": d_e and asdict(d_e)}
        for p, t, d_b, d_e, target in zip(prompts, truth, detected["base"], detected["erased"], is_target) if target
    ][:8]
    return result


def _meets(value: float, comparison: str, bound: float) -> bool:
    return value >= bound if comparison == ">=" else value <= bound


def markdown(result: dict) -> str:
    """The eval table as Markdown."""
    c, a = result["concept"], result["attribute"]
    others = [name for name in ATTRIBUTES if name != a]
    rows = [
        (f"target prompts ({result['target_prompts']}): {a} = {c} generated", "target_rate", "≤ 10% erased, ≥ 90% base"),
        *[(f"target prompts: {name} correct", f"target_{name}", "≥ 90% erased") for name in others],
        *[(f"non-target prompts ({result['prompts'] - result['target_prompts']}): {name} correct", f"non_target_{name}", "")
          for name in ATTRIBUTES],
        ("non-target prompts: mean attribute accuracy", "non_target_accuracy", "erased ≥ 95% of base"),
    ]
    lines = [f"# Erasing {a} = {c!r} in the toy world (held-out phrasings, {result['steps']} steps, guidance "
             f"{result['guidance']}, seed {result['seed']})", "", "| figure | base | erased | target |", "|---|---:|---:|---|"]
    lines += [f"| {label} | {result[key + '_base']:.1%} | {result[key + '_erased']:.1%} | {target} |" for label, key, target in rows]
    lines += [
        f"| non-target accuracy, erased / base | | {result['non_target_accuracy_ratio']:.3f} | ≥ 0.95 |",
        f"| mean change of non-target latents vs base (relative) | | {result['non_target_mean_change']:.3f} | |",
        f"| mean change of target latents vs base (relative) | | {result['target_mean_change']:.3f} | |",
        "",
        "Targets met: " + ", ".join(f"{name} {'yes' if ok else 'NO'}" for name, ok in result["targets_met"].items()),
    ]
    return "\n".join(lines) + "\n"


def write_report(result: dict, folder: str | Path) -> tuple[Path, Path]:
    folder = Path(folder)
    json_path, md_path = folder / "eval.json", folder / "eval.md"
    json_path.write_text(json.dumps(result, indent=2))
    md_path.write_text(markdown(result))
    return json_path, md_path

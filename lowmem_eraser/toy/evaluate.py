"""`lowmem-eraser eval`: measure an eraser in the toy world with the detector.

Every attribute combination is captioned in the held-out phrasings (never seen in training), generated with
the erasers off and on from the same seed, and read back by `detect`. Target prompts are those whose
attribute equals the erased concept ("red"); the others are non-target prompts. Generation and reading go through
the eval harness of real models (evaluation.read_videos) with the toy world's generation and detector below.
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


class ToyDetector:
    """The toy world's detector (world.detect) as a detector of the eval harness: a latent video's colour, shape and
    motion as labels `attribute:value` (score 1), none when the video shows no readable object."""

    name = "toy"
    classes = tuple(f"{name}:{value}" for name, values in ATTRIBUTES.items() for value in values)

    def __call__(self, video) -> list:
        from ..detectors import Detection

        reading = detect(video)
        return [] if reading is None else [Detection(f"{name}:{getattr(reading, name)}", 1.0) for name in ATTRIBUTES]


def reading(detections: list) -> Video | None:
    """The Video a ToyDetector's labels describe (None: no object)."""
    if not detections:
        return None
    return Video(**dict(found.label.split(":") for found in detections))


class ToyWorld:
    """The toy world in the eval harness: every prompt of a run in one batched call (toy.build.generate: the batch
    starting at prompt i draws its noise from seed + i, as it always did), latent videos read whole."""

    batch = 0  # all prompts in one call

    def generate(self, pipe, prompts: list[str], seed: int, settings, erased: bool) -> list:
        from ..sampling import all_erasers_disabled

        if erased:
            return list(generate(pipe, prompts, seed, settings.steps, settings.guidance))
        with all_erasers_disabled(pipe):
            return list(generate(pipe, prompts, seed, settings.steps, settings.guidance))

    def read(self, detector, video) -> list:
        return [detector(video)]  # one reading of the whole video (motion needs every frame)


def _generate_and_detect(model, eraser, steps: int, guidance: float, seed: int, kernels: str):
    """Every held-out prompt generated with the erasers off, then on, from the same seed, and read back through the
    eval harness (evaluation.read_videos): (prompts, their attributes, base latents, erased latents,
    {"base": readings, "erased": readings})."""
    from ..evaluation import EvalSettings, read_videos
    from ..infer import load_pipeline_with_erasers

    prompts, truth = map(list, zip(*held_out_prompts()))
    settings = EvalSettings(steps=steps, guidance=guidance, seeds=[seed])
    videos, _ = read_videos(lambda: load_pipeline_with_erasers(model, eraser, kernels=kernels), prompts, settings,
                            ToyDetector(), ToyWorld())
    latents = {run: torch.stack([videos[(i, seed, run)][0] for i in range(len(prompts))]) for run in ("base", "erased")}
    detected = {run: [reading(videos[(i, seed, run)][1][0]) for i in range(len(prompts))] for run in ("base", "erased")}
    return prompts, truth, latents["base"], latents["erased"], detected


def evaluate(model: str | Path, eraser: str | Path, concept: str, steps: int = 25, guidance: float = 5.0, seed: int = 0,
             kernels: str = "auto") -> dict:
    """Base vs erased figures on the held-out prompts (see the module doc); `kernels` as `memory.kernels`."""
    attribute = concept_attribute(concept)
    others = [name for name in ATTRIBUTES if name != attribute]
    prompts, truth, base, erased, detected = _generate_and_detect(model, eraser, steps, guidance, seed, kernels)
    is_target = [getattr(video, attribute) == concept for video in truth]

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


def write_report(result: dict, folder: str | Path, table=None) -> tuple[Path, Path]:
    """eval.json and eval.md (`table`: the Markdown writer, default `markdown`)."""
    folder = Path(folder)
    json_path, md_path = folder / "eval.json", folder / "eval.md"
    json_path.write_text(json.dumps(result, indent=2))
    md_path.write_text((table or markdown)(result))
    return json_path, md_path


def concepts_figures(truth: list[Video], detected: dict[str, list[Video | None]], concepts: list[str]) -> dict:
    """Figures of an eraser meant to erase every one of `concepts` at once (e.g. a merged red + square one), from
    the detector's readings `detected` {"base": [...], "erased": [...]} of the prompts whose attributes are `truth`.

    Per concept: how often its prompts still show it, and the accuracy of the attributes that are not erased on
    them (a red square prompt counts for red and for square; its colour and shape are erased, its motion must
    stay). Retention: every attribute's accuracy on the prompts that name none of the concepts, erased / base."""
    attributes = {concept: concept_attribute(concept) for concept in concepts}
    named = [[c for c in concepts if getattr(t, attributes[c]) == c] for t in truth]
    result: dict = {"concepts": list(concepts), "prompts": len(truth)}
    for concept, attribute in attributes.items():
        rows = [i for i, names in enumerate(named) if concept in names]
        # per prompt, the attributes none of its named concepts erases (a red square: motion only)
        kept = [(i, name) for i in rows for name in ATTRIBUTES if name not in {attributes[c] for c in named[i]}]
        result[f"{concept}_prompts"] = len(rows)
        for run in ("base", "erased"):
            shown = [detected[run][i] for i in rows]
            result[f"{concept}_rate_{run}"] = sum(d is not None and getattr(d, attribute) == concept
                                                  for d in shown) / max(len(rows), 1)
            correct = [detected[run][i] is not None and getattr(detected[run][i], name) == getattr(truth[i], name)
                       for i, name in kept]
            result[f"{concept}_kept_{run}"] = sum(correct) / len(correct) if correct else float("nan")
    rest = [i for i, names in enumerate(named) if not names]
    result["other_prompts"] = len(rest)
    for run in ("base", "erased"):
        shown, expected = [detected[run][i] for i in rest], [truth[i] for i in rest]
        result[f"other_accuracy_{run}"] = (sum(_accuracy(shown, expected, name) for name in ATTRIBUTES)
                                           / len(ATTRIBUTES)) if rest else float("nan")
    result["retention"] = result["other_accuracy_erased"] / max(result["other_accuracy_base"], 1e-9)
    return result


def evaluate_concepts(model: str | Path, eraser: str | Path, concepts: list[str], steps: int = 25,
                      guidance: float = 5.0, seed: int = 0, kernels: str = "auto") -> dict:
    """`concepts_figures` of `eraser` on every held-out prompt (generated as `evaluate` does)."""
    for concept in concepts:
        concept_attribute(concept)  # an unknown concept is named before any generation
    _, truth, _, _, detected = _generate_and_detect(model, eraser, steps, guidance, seed, kernels)
    return {**concepts_figures(truth, detected, concepts), "steps": steps, "guidance": guidance, "seed": seed}


def concepts_markdown(result: dict) -> str:
    """The several-concepts table as Markdown."""
    lines = [f"# Erasing {' + '.join(repr(c) for c in result['concepts'])} in the toy world (held-out phrasings, "
             f"{result['steps']} steps, guidance {result['guidance']}, seed {result['seed']})", "",
             "| figure | base | erased |", "|---|---:|---:|"]
    for concept in result["concepts"]:
        lines += [f"| {concept} prompts ({result[f'{concept}_prompts']}): {concept} generated | "
                  f"{result[f'{concept}_rate_base']:.1%} | {result[f'{concept}_rate_erased']:.1%} |",
                  f"| {concept} prompts: the attributes no listed concept erases, correct | "
                  f"{result[f'{concept}_kept_base']:.1%} | {result[f'{concept}_kept_erased']:.1%} |"]
    lines += [f"| prompts naming none of them ({result['other_prompts']}): mean attribute accuracy | "
              f"{result['other_accuracy_base']:.1%} | {result['other_accuracy_erased']:.1%} |",
              f"| retention (erased / base) | | {result['retention']:.3f} |"]
    return "\n".join(lines) + "\n"

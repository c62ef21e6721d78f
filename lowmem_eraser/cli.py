"""The `lowmem-eraser` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import LowmemEraserError


def _inspect(args: argparse.Namespace) -> None:
    from .serialization import read_erasers

    eraser = read_erasers(args.path, allow_nonfinite=True)  # NaN/Inf are reported below, not refused
    dims = sorted(set(eraser.dims.values()))
    params = sum(t.numel() for inners in eraser.state.values() for t in inners.values())
    print(f"file:       {eraser.weights_path}")
    print(f"family:     {eraser.family}")
    print(f"blocks:     {len(eraser.state)}")
    print(f"dim:        {', '.join(map(str, dims))}")
    print(f"rank:       {eraser.rank}")
    print(f"dtype:      {str(eraser.dtype).removeprefix('torch.')}")
    print(f"parameters: {params:,}")
    if eraser.config is not None:
        print(f"config:     {eraser.config}")
    if eraser.sidecar and eraser.sidecar.get("metadata"):
        print(f"metadata:   {eraser.sidecar['metadata']}")
    print(f"{'block':<48} {'|down.W|':>10} {'|up.W|':>10} {'|up.b|':>10}")
    zero_blocks = 0
    for name, inners in eraser.state.items():
        norms = [inners[key].float().norm().item() for key in ("down.weight", "up.weight", "up.bias")]
        is_zero = norms[1] == 0.0 and norms[2] == 0.0
        zero_blocks += is_zero
        flag = "  still zero: no effect" if is_zero else ""
        print(f"{name:<48} {norms[0]:>10.4g} {norms[1]:>10.4g} {norms[2]:>10.4g}{flag}")
    if zero_blocks:
        print(f"{zero_blocks} of {len(eraser.state)} blocks are exactly zero (untrained)")
    bad = {name: sum(int((~inners[key].isfinite()).sum()) for key in inners) for name, inners in eraser.state.items()}
    bad = {name: count for name, count in bad.items() if count}
    for name, count in bad.items():
        print(f"non-finite: {name} has {count} NaN/Inf values")
    if bad:
        print(f"{len(bad)} of {len(eraser.state)} blocks hold {sum(bad.values())} NaN/Inf values in all: "
              "load_erasers refuses this file")


def _merge(args: argparse.Namespace) -> None:
    from .serialization import merge_erasers, read_erasers

    folder = merge_erasers(args.erasers, args.output, format=args.format)
    merged = read_erasers(folder)
    print(f"wrote {folder} ({merged.family}, {len(merged.state)} blocks, rank {merged.rank} = "
          f"{' + '.join(str(read_erasers(path).rank) for path in args.erasers)})")


def _convert(args: argparse.Namespace) -> None:
    """Readers refuse a folder holding both eraser_weights.pt and .safetensors, so the result never does: a
    conversion in the source's own folder replaces the source file; another eraser in DST's folder is refused."""
    import json

    from .serialization import (SIDECAR_JSON, WEIGHTS_PT, WEIGHTS_SAFETENSORS, atomic_write, ensure_folder,
                                read_erasers, write_config, write_weights)

    eraser = read_erasers(args.src)
    src, dst = eraser.weights_path, Path(args.dst)
    if dst.suffix not in (".pt", ".safetensors"):
        raise LowmemEraserError(f"{dst}: destination must be a file ending in .pt or .safetensors")
    ensure_folder(dst.parent, "convert")
    same_folder = dst.parent.resolve() == src.parent.resolve()
    for name in (WEIGHTS_PT, WEIGHTS_SAFETENSORS):
        other = dst.parent / name
        if other.is_file() and other.resolve() not in (src.resolve(), dst.resolve()):
            raise LowmemEraserError(
                f"{dst}: {dst.parent} already holds another eraser's {name}; a folder with both {WEIGHTS_PT} "
                f"and {WEIGHTS_SAFETENSORS} cannot be read: convert into another folder or remove {other}"
            )
    write_weights(eraser.state, dst)
    write_config(dst.parent, eraser.rank)  # always: a config left from other weights would name the wrong rank
    if not same_folder:  # the sidecar (training metadata) travels with the weights; a stale one goes
        if eraser.sidecar is not None:
            text = json.dumps(eraser.sidecar, indent=4)
            atomic_write(dst.parent / SIDECAR_JSON, lambda tmp: tmp.write_text(text))
        else:
            (dst.parent / SIDECAR_JSON).unlink(missing_ok=True)
    print(f"wrote {dst} ({eraser.family}, {len(eraser.state)} blocks, rank {eraser.rank})")
    if same_folder and src.resolve() != dst.resolve():
        src.unlink()  # only now that dst is complete: a crash before this leaves the source intact
        print(f"removed {src}: {dst.name} replaces it (one weights file per folder)")


def _train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .distributed import launched_processes
    from .runfolder import TrainingInterrupted
    from .train import train

    main_process = launched_processes().main  # under torchrun, rank 0 speaks for the run
    try:
        out = train(load_config(args.config, args.overrides), resume=args.resume, overwrite=args.overwrite)
    except TrainingInterrupted as stop:
        if main_process:
            print(f"lowmem-eraser train: {stop}", file=sys.stderr)
        return stop.exit_code
    if main_process:
        print(f"eraser written to {out}")
    return 0


def _infer(args: argparse.Namespace) -> None:
    from .infer import Generation, infer

    spec = Generation(args.prompt, steps=args.steps, frames=args.frames, guidance=args.guidance, seed=args.seed)
    out = infer(args.model, args.eraser, spec, args.output, args.strength, args.offload, args.compare, args.vae_tiling)
    print(f"wrote {out}")


_MODEL_ONLY = ("prompts", "detector", "seeds", "frames_per_video", "threshold", "frames", "height", "width",
               "guidance", "offload", "clip")


def _eval_model(args: argparse.Namespace) -> None:
    from .evaluation import EvalSettings, evaluate_model, markdown

    if args.concepts:
        raise LowmemEraserError("--concepts: the toy world's option (eval --config); --model reads its --detector's "
                                "classes")
    if not args.prompts:
        raise LowmemEraserError("--prompts: --model needs a CSV of prompts (a `prompt` column)")
    seeds = 1 if args.seeds is None else args.seeds
    if seeds < 1:
        raise LowmemEraserError(f"--seeds: expected at least 1, got {seeds}")

    def given(value, default):
        return default if value is None else value

    settings = EvalSettings(steps=given(args.steps, 50), frames=args.frames, height=args.height, width=args.width,
                            guidance=given(args.guidance, 6.0), frames_per_video=given(args.frames_per_video, 8),
                            threshold=given(args.threshold, 0.6), seeds=list(range(args.seed, args.seed + seeds)))
    eraser = Path(args.eraser)
    output = args.output or (eraser if eraser.is_dir() else eraser.parent)
    result = evaluate_model(args.model, eraser, args.prompts, output, given(args.detector, "nudenet"), settings,
                            given(args.offload, "auto"), clip=args.clip)
    print(markdown(result))
    print(f"wrote {Path(output) / 'results.csv'}, eval.json and eval.md")


def _eval(args: argparse.Namespace) -> None:
    from .serialization import ensure_folder, read_erasers

    if args.model is not None:
        return _eval_model(args)
    for name in _MODEL_ONLY:  # with --config these would be ignored: say so instead
        if getattr(args, name) is not None:
            raise LowmemEraserError(f"--{name.replace('_', '-')}: only with --model (the toy world's eval --config "
                                    "takes its prompts, detector and sampling from the config)")
    from .toy.evaluate import (concept_attribute, concepts_markdown, evaluate, evaluate_concepts, markdown,
                               write_report)

    config = _toy_config(args.config)
    # Every argument is checked before the evaluation (minutes): nothing fails after it and loses the report.
    steps = config.sampling.num_inference_steps if args.steps is None else args.steps
    if steps < 1:
        raise LowmemEraserError(f"--steps: expected at least 1, got {steps}")
    eraser = Path(args.eraser)
    read_erasers(eraser)  # a folder or a weights file; a bad one is named now
    output = ensure_folder(args.output or (eraser if eraser.is_dir() else eraser.parent), "--output")
    names = [entry.concept for entry in config.concept_entries()]  # a config of several concepts: all of them
    concepts = args.concepts or (names if len(names) > 1 else None)
    if concepts:
        for concept in concepts:
            try:
                concept_attribute(concept)
            except LowmemEraserError as exc:
                raise LowmemEraserError(f"--concepts: {str(exc).removeprefix('concept: ')}") from None
        result = evaluate_concepts(config.model, eraser, concepts, steps, config.sampling.guidance_scale,
                                   args.seed, config.memory.kernels)
        print(concepts_markdown(result))
        json_path, md_path = write_report(result, output, concepts_markdown)
    else:
        result = evaluate(config.model, eraser, config.concept, steps, config.sampling.guidance_scale, args.seed,
                          config.memory.kernels)
        print(markdown(result))
        json_path, md_path = write_report(result, output)
    print(f"wrote {json_path} and {md_path}")


def _attack(args: argparse.Namespace) -> None:
    import math

    from .attack import SoftPrompt, check_soft_prompt
    from .families import family_of_folder
    from .serialization import ensure_folder, read_erasers
    from .toy.attack import attack_markdown, evaluate_attack, write_attack_report

    config = _toy_config(args.config)
    # Every argument is checked before the attack (minutes): nothing fails after it and loses the report.
    length = _text_length(config.model)
    tokens = length if args.tokens is None else args.tokens
    check_soft_prompt(tokens, args.steps, length)
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise LowmemEraserError(f"--lr: expected a finite value > 0, got {args.lr}")
    family = family_of_folder(config.model)
    if family is not None and family.name != "CogVideoX":  # before minutes of loading
        raise LowmemEraserError(f"--config: attack runs in the toy world (a CogVideoX model read by its detector); "
                                f"{config.model} is {family.name}")
    eraser = Path(args.eraser)
    read_erasers(eraser)
    output = ensure_folder(args.output or (eraser if eraser.is_dir() else eraser.parent), "--output")
    concepts = [entry.concept for entry in config.concept_entries()]  # a config of several concepts: each attacked
    result = evaluate_attack(config.model, eraser, concepts, SoftPrompt(tokens, args.steps, args.lr),
                             config.sampling.num_inference_steps, config.sampling.guidance_scale, args.seed,
                             config.memory.kernels)
    print(attack_markdown(result))
    json_path, md_path = write_attack_report(result, output)
    print(f"wrote {json_path} and {md_path}")


def _toy_config(path: str):
    """A training config read for `eval` / `attack` (no file checks: only its model, concept and sampling)."""
    import yaml

    from .config import TrainConfig, read_text

    try:
        return TrainConfig.from_dict(yaml.safe_load(read_text(Path(path), "--config")))
    except yaml.YAMLError as exc:
        raise LowmemEraserError(f"--config: cannot read {path} ({exc})") from None


def _text_length(model: Path) -> int:
    from .families import runtime_of_folder, transformer_config_json

    return runtime_of_folder(model, "model").max_text_length(transformer_config_json(model))


def _toy_build(args: argparse.Namespace) -> int:
    from .toy.build import toy_build_main

    return toy_build_main(args)


def _plan(args: argparse.Namespace) -> None:
    import torch

    from . import plan

    budget = plan.parse_size(args.budget)
    if args.model is None and args.config is None:
        raise LowmemEraserError("plan: give --model (a preset or a local folder) or --config (a train YAML)")
    settings = plan.plan_defaults(args.config, args.model)
    given = {name: getattr(args, name, None) for name in settings if name not in ("config", "loss")}
    settings.update({name: value for name, value in given.items() if value is not None})
    model = settings["model"]
    video = plan.check_video(settings["frames"], settings["height"], settings["width"], model)
    loss = plan.check_loss(settings["alpha"], settings["beta"], settings["loss"])
    run = plan.RunSpec(settings["sampling"], settings["sampling_batch"], settings["cfg"],
                       plan.check_prompts(settings["prompts"]), settings["text_encoder"], settings["blockwise_load"])
    config = settings["config"]
    speeds = plan.check_speeds(args.tflops, args.h2d_gbps)
    depth = plan.model_spec(model).depth if config is not None else 0
    configured = plan.configured_setting(config.memory, settings["batch"], depth) if config is not None else None
    result = plan.make_plan(model, video, plan.check_rank(settings["rank"]), loss, budget, run=run,
                            dtype=getattr(torch, settings["dtype"]), batch=settings["batch"], configured=configured,
                            speeds=speeds)
    print(plan.format_plan(result))
    if args.config_out:
        print(f"wrote {plan.write_config(result, model, args.config_out, settings['config'])}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowmem-eraser", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser("inspect", help="describe an eraser folder or weights file")
    inspect.add_argument("path", help="eraser folder, eraser_weights.pt or eraser_weights.safetensors")
    inspect.set_defaults(run=_inspect)

    convert = commands.add_parser("convert", help="convert eraser weights between .pt and .safetensors (lossless)")
    convert.add_argument("src", help="eraser folder or weights file")
    convert.add_argument("dst", help="destination file ending in .pt or .safetensors")
    convert.set_defaults(run=_convert)

    merge = commands.add_parser("merge", help="one eraser equal to applying several at once (exact: ranks add up)")
    merge.add_argument("erasers", nargs="+", help="two or more eraser folders or weights files of one model")
    merge.add_argument("--output", required=True, help="new folder for the merged eraser (published format)")
    merge.add_argument("--format", choices=("pt", "safetensors"), default="pt", help="weights file format")
    merge.set_defaults(run=_merge)

    train = commands.add_parser("train", help="train an eraser from a YAML config")
    train.add_argument("--config", required=True, help="YAML training config (see configs/README.md)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.steps=10 (repeatable)")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    train.add_argument("--overwrite", action="store_true",
                       help="output_dir holds a run: move it aside (to OUTPUT_DIR.replaced-TIME) and start afresh")
    train.set_defaults(run=_train)

    infer = commands.add_parser("infer", help="generate a video with an eraser loaded")
    infer.add_argument("--model", required=True, help="local diffusers model folder (CogVideoX, Wan2.1 / Wan2.2-TI2V-5B, HunyuanVideo)")
    infer.add_argument("--eraser", required=True, help="eraser folder or weights file")
    infer.add_argument("--prompt", required=True)
    infer.add_argument("--output", required=True, help="out.gif or out.mp4")
    infer.add_argument("--strength", type=float, default=1.0, help="eraser scale (0 = off, 1 = as trained)")
    infer.add_argument("--seed", type=int, default=0)
    infer.add_argument("--steps", type=int, default=50)
    infer.add_argument("--frames", type=int, default=None,
                       help="8k+1 frames for CogVideoX, 4k+1 for Wan and HunyuanVideo (default: the family's: "
                            "the transformer's sample_frames, 49, for CogVideoX; 81 for Wan; 129 for HunyuanVideo)")
    infer.add_argument("--guidance", type=float, default=6.0)
    infer.add_argument("--offload", choices=("none", "model", "sequential"), default="none",
                       help="CUDA only: the pipeline's model / sequential CPU offload")
    infer.add_argument("--compare", action="store_true", help="write base | erased side by side (same seed)")
    infer.add_argument("--vae-tiling", dest="vae_tiling", choices=("auto", "on", "off"), default="auto",
                       help="VAE tiling + slicing (auto: on when the plain decode would not fit the free GPU memory)")
    infer.set_defaults(run=_infer)

    evaluate = commands.add_parser(
        "eval", help="base vs erased: the toy world's figures (--config) or a real model's with a detector "
                     "(--model --prompts CSV)")
    where = evaluate.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", help="toy world: the training config (model, concept, sampling)")
    where.add_argument("--model", help="a real model folder: generate every --prompts row base and erased and read "
                                       "them with --detector")
    evaluate.add_argument("--eraser", required=True, help="eraser folder or weights file")
    evaluate.add_argument("--steps", type=int, default=None,
                          help="denoising steps (default: sampling.num_inference_steps; --model: 50)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--output", default=None, help="folder for eval.json and eval.md (default: the eraser folder)")
    evaluate.add_argument("--prompts", help="--model: CSV with a `prompt` column (other columns kept in results.csv)")
    # the --model options default to None, so that one given with --config is named instead of ignored
    evaluate.add_argument("--detector", default=None, help="--model: nudenet (default; pip install 'lowmem-eraser[eval]')")
    evaluate.add_argument("--seeds", type=int, default=None, help="--model: seeds per prompt: --seed, --seed + 1, ... "
                                                                  "(default 1)")
    evaluate.add_argument("--frames-per-video", dest="frames_per_video", type=int, default=None,
                          help="--model: frames sampled evenly from each video for the detector (default 8)")
    evaluate.add_argument("--threshold", type=float, default=None,
                          help="--model: detector score that counts (default 0.6; papers use 0.2-0.75)")
    evaluate.add_argument("--frames", type=int, default=None, help="--model: video frames (default: the family's)")
    evaluate.add_argument("--height", type=int, default=None, help="--model: (default: the family's)")
    evaluate.add_argument("--width", type=int, default=None, help="--model: (default: the family's)")
    evaluate.add_argument("--guidance", type=float, default=None, help="--model: CFG scale (default 6.0)")
    evaluate.add_argument("--offload", choices=("auto", "none", "model", "sequential"), default=None,
                          help="--model: move weights to the GPU only while they run (slower, less GPU memory); "
                               "auto: what the planner's infer stage picks for the free GPU memory")
    evaluate.add_argument("--clip", default=None, help="--model: a local CLIP folder: adds each video's CLIP score "
                                                       "to its prompt, base and erased")
    evaluate.add_argument("--concepts", nargs="+", default=None, metavar="CONCEPT",
                          help="an eraser of several concepts (e.g. merged): report each and the retention of the "
                               "prompts naming none of them (default: the config's one concept)")
    evaluate.set_defaults(run=_eval)

    attack = commands.add_parser("attack", help="toy world: attack success rate of a white-box soft-prompt attack "
                                                "on the base model and on an eraser")
    attack.add_argument("--config", required=True, help="the training config (model, concept, sampling)")
    attack.add_argument("--eraser", required=True, help="eraser folder or weights file")
    attack.add_argument("--tokens", type=int, default=None, help="K: the vectors take the last K positions of each "
                        "prompt's text condition (default: all of them; fewer: tokens appended after the prompt)")
    attack.add_argument("--steps", type=int, default=100, help="S: Adam steps per attack (default 100)")
    attack.add_argument("--lr", type=float, default=0.1, help="Adam step, x the text condition's RMS (default 0.1)")
    attack.add_argument("--seed", type=int, default=0, help="generation seed (the attack's targets use seed + 10000)")
    attack.add_argument("--output", default=None, help="folder for attack.json and attack.md (default: the eraser folder)")
    attack.set_defaults(run=_attack)

    toy = commands.add_parser("toy", help="the toy world's model")
    toy_commands = toy.add_subparsers(dest="toy_command", required=True)
    build = toy_commands.add_parser("build", help="train the toy CogVideoX model on CPU and write it as a folder")
    build.add_argument("--output", default="models/toy")
    build.add_argument("--steps", type=int, default=None, help="training steps (default: the shipped model's)")
    build.add_argument("--seed", type=int, default=0)
    build.set_defaults(run=_toy_build)

    plan = commands.add_parser("plan", help="predict peak GPU memory on this CPU and pick settings for a budget")
    plan.add_argument("--model", help="cogvideox-2b, cogvideox-5b, wan2.1-1.3b, wan2.1-14b, wan2.2-ti2v-5b, "
                      "hunyuanvideo or a local diffusers folder "
                      "(default: the --config's model)")
    plan.add_argument("--config", help="a train YAML: its video, rank, loss, sampling, prompt count and "
                      "memory.text_encoder are planned (options given here override them)")
    plan.add_argument("--budget", required=True, help="GPU memory, e.g. 24GB (binary units: 24GB = 24 GiB)")
    plan.add_argument("--frames", type=int, help="8k+1 frames for CogVideoX, 4k+1 for Wan and HunyuanVideo "
                      "(default: the preset's, e.g. 49; 81 for Wan2.1; 61 for HunyuanVideo)")
    plan.add_argument("--height", type=int, help="default: the preset's (480 for CogVideoX and Wan2.1)")
    plan.add_argument("--width", type=int, help="default: the preset's (720 for CogVideoX, 832 for Wan2.1)")
    plan.add_argument("--rank", type=int, help="eraser rank (default 128)")
    plan.add_argument("--alpha", type=float, help="L_loc weight (> 0 adds the concept-mask pass; default 1)")
    plan.add_argument("--beta", type=float, help="L_pre weight (> 0 adds two passes; default 0.5)")
    plan.add_argument("--sampling", choices=("renoise", "trajectory"), help="how x_t is drawn (default renoise)")
    plan.add_argument("--prompts", type=int, help="number of prompt pairs (default 8)")
    plan.add_argument("--text-encoder", dest="text_encoder", choices=("auto", "cuda", "cpu"),
                      help="where T5 encodes the prompts (default auto: the GPU when it fits the budget)")
    plan.add_argument("--tflops", type=float, help="achieved bf16 TFLOP/s of your GPU, for the step-time model "
                      "(default: the rate printed in the plan)")
    plan.add_argument("--h2d-gbps", dest="h2d_gbps", type=float,
                      help="pinned host<->device copy GB/s per direction (default: printed in the plan)")
    plan.add_argument("--config-out", help="write a train YAML with the picked setting here")
    plan.set_defaults(run=_plan)
    return parser


class _NoticeFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (pytest and notebooks replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _notices() -> None:
    """The package's one notice channel (`logging`, logger "lowmem_eraser") to stderr, once per process."""
    logger = logging.getLogger("lowmem_eraser")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(_NoticeFormatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    _notices()
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except LowmemEraserError as exc:
        print(f"lowmem-eraser {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

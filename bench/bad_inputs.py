"""Bad input to every command: each must end in ONE clear line naming the field or file (exit 2), never a traceback,
and must not touch what is already on disk.

Runs `lowmem_eraser.cli.main` in this process on a tiny CogVideoX (built offline) and a trained eraser, case by case,
and classifies the outcome: `clear` (exit 2, one `lowmem-eraser CMD: error: ...` line that names what the case
expects), `vague` (exit 2 but the line does not name it), `traceback` (an exception escaped), `accepted` (exit 0:
the bad input was not noticed).

    python bench/bad_inputs.py        -> bench/results/bad_inputs.md   (tests/test_bad_inputs.py asserts all clear)
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from pathlib import Path

import yaml

PAIRS = [["a red ball moving left", "a blue ball moving left"], ["a red square moving up", "a green square moving up"]]
RESULTS = Path(__file__).parent / "results" / "bad_inputs.md"


def _setup(root: Path) -> dict:
    """A tiny model with a VAE, a config, a trained eraser; the paths the cases use."""
    from lowmem_eraser.cli import main
    from lowmem_eraser.tiny import build_tiny_cogvideox

    model = build_tiny_cogvideox(root / "model", [p for pair in PAIRS for p in pair], with_vae=True,
                                 max_text_seq_length=8)
    (root / "prompts.yaml").write_text(yaml.safe_dump(PAIRS))
    config = {"model": str(model), "prompts": str(root / "prompts.yaml"), "concept": "red",
              "output_dir": str(root / "run"), "eraser": {"rank": 4},
              "sampling": {"num_inference_steps": 2, "guidance_scale": 4.0},
              "video": {"frames": 9, "height": 64, "width": 64}, "train": {"steps": 2},
              "memory": {"dtype": "float32", "kernels": "torch"}}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", "--config", str(root / "config.yaml")]) == 0
    return {"root": root, "model": model, "config": root / "config.yaml", "eraser": root / "run"}


def _config_with(paths: dict, name: str, **changes) -> str:
    config = yaml.safe_load(paths["config"].read_text())
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            config.setdefault(section, {})[field] = value
        else:
            config[section] = value
    path = paths["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _file(paths: dict, name: str, content: bytes) -> str:
    path = paths["root"] / name
    path.write_bytes(content)
    return str(path)


def _unsupported_folder(paths: dict) -> str:
    """A model folder whose transformer is of no supported family (only its config: refused before anything is
    loaded)."""
    folder = paths["root"] / "unsupported"
    for sub in ("transformer", "text_encoder", "tokenizer", "scheduler"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "transformer" / "config.json").write_text('{"_class_name": "LTXVideoTransformer3DModel"}')
    return str(folder)


def cases(paths: dict) -> list[tuple[str, list[str], str]]:
    """(case, argv, a word the error must contain)."""
    root, model, eraser = paths["root"], str(paths["model"]), str(paths["eraser"])
    out = str(root / "out.gif")
    infer = ["infer", "--model", model, "--eraser", eraser, "--prompt", "a red ball", "--output", out, "--steps", "1"]
    latin1 = "prompt,normal prompt\ncafé rouge,café bleu\n".encode("latin-1")
    return [
        ("train: config file missing", ["train", "--config", str(root / "nope.yaml")], "nope.yaml"),
        ("train: config not YAML", ["train", "--config", _file(paths, "bad.yaml", b"model: [unclosed")], "bad.yaml"),
        ("train: config not UTF-8", ["train", "--config", _file(paths, "latin.yaml", "concept: rött".encode("latin-1"))],
         "latin.yaml"),
        ("train: unknown key", ["train", "--config", _config_with(paths, "k", memroy={})], "memroy"),
        ("train: lr not a number", ["train", "--config", _config_with(paths, "lr", train__lr="fast")], "train.lr"),
        ("train: rank above the model dim", ["train", "--config", _config_with(paths, "rk", eraser__rank=100000)],
         "eraser.rank"),
        ("train: frames not 8k+1", ["train", "--config", _config_with(paths, "fr", video__frames=48)], "video.frames"),
        ("train: prompts CSV not UTF-8", ["train", "--config", _config_with(
            paths, "csv", prompts=_file(paths, "latin.csv", latin1))], "latin.csv"),
        ("train: prompts CSV missing a column", ["train", "--config", _config_with(
            paths, "col", prompts=_file(paths, "col.csv", b"prompt\nred ball\n"))], "normal prompt"),
        ("train: model folder missing", ["train", "--config", _config_with(paths, "m", model=str(root / "none"))],
         "model"),
        ("train: into a finished run", ["train", "--config", str(paths["config"])], "already holds a run"),
        ("train: --resume without a checkpoint", ["train", "--config", _config_with(
            paths, "fresh", output_dir=str(root / "fresh")), "--resume"], "no checkpoint"),
        ("train: --set of an unknown key", ["train", "--config", str(paths["config"]), "--set", "train.lrr=1"],
         "train.lrr"),
        ("train: memory.offload above the block count", ["train", "--config", _config_with(
            paths, "off", memory__offload=3)], "memory.offload"),  # the tiny model has 2 blocks
        ("train: memory.offload not none/all/N", ["train", "--config", _config_with(
            paths, "offw", memory__offload="lots")], "memory.offload"),
        ("train: activation offload without checkpointing", ["train", "--config", _config_with(
            paths, "act", memory__offload_activations=True, memory__gradient_checkpointing=False)],
         "memory.offload_activations"),
        ("train: a model of an unsupported family", ["train", "--config", _config_with(
            paths, "unsupported", model=_unsupported_folder(paths))], "LTXVideoTransformer3DModel"),
        ("infer: --steps 0", [*infer, "--steps", "0"], "--steps"),
        ("infer: --steps -2", [*infer, "--steps", "-2"], "--steps"),
        ("infer: --strength nan", [*infer, "--strength", "nan"], "--strength"),
        ("infer: --strength inf", [*infer, "--strength", "inf"], "--strength"),
        ("infer: --output not .gif/.mp4", [*infer[:-4], "--output", str(root / "x.avi"), "--steps", "1"], "--output"),
        ("infer: --frames 10", [*infer, "--frames", "10"], "--frames"),
        ("infer: eraser missing", ["infer", "--model", model, "--eraser", str(root / "none"), "--prompt", "x",
                                   "--output", out], "none"),
        ("eval: --steps 0", ["eval", "--config", str(paths["config"]), "--eraser", eraser, "--steps", "0"], "--steps"),
        ("eval: --steps -3", ["eval", "--config", str(paths["config"]), "--eraser", eraser, "--steps", "-3"], "--steps"),
        ("attack: --tokens 0", ["attack", "--config", str(paths["config"]), "--eraser", eraser, "--tokens", "0"],
         "--tokens"),
        ("attack: --tokens above the text length", ["attack", "--config", str(paths["config"]), "--eraser", eraser,
                                                    "--tokens", "9"], "--tokens"),  # the tiny model: 8 positions
        ("attack: --steps 0", ["attack", "--config", str(paths["config"]), "--eraser", eraser, "--steps", "0"],
         "--steps"),
        ("attack: eraser missing", ["attack", "--config", str(paths["config"]), "--eraser", str(root / "none")],
         "none"),
        ("train: loss.adversarial.tokens above the text length", ["train", "--config", _config_with(
            paths, "advk", loss={"adversarial": {"every": 1, "tokens": 9}})], "loss.adversarial.tokens"),
        ("train: loss.adversarial.inner_steps 0", ["train", "--config", _config_with(
            paths, "advs", loss={"adversarial": {"every": 1, "inner_steps": 0}})], "loss.adversarial.inner_steps"),
        ("inspect: not an eraser", ["inspect", _file(paths, "junk.pt", b"not a checkpoint")], "junk.pt"),
        ("inspect: folder without weights", ["inspect", str(root)], str(root.name)),
        ("convert: bad destination suffix", ["convert", eraser, str(root / "w.bin")], "w.bin"),
        ("plan: unknown preset", ["plan", "--model", "cogvideox-7b", "--budget", "24GB"], "--model"),
        ("plan: bad budget", ["plan", "--model", "cogvideox-2b", "--budget", "lots"], "--budget"),
        ("plan: --rank 0", ["plan", "--model", "cogvideox-2b", "--budget", "24GB", "--rank", "0"], "--rank"),
        ("plan: --prompts 0", ["plan", "--model", "cogvideox-2b", "--budget", "24GB", "--prompts", "0"], "--prompts"),
        ("plan: --tflops 0", ["plan", "--model", "cogvideox-2b", "--budget", "24GB", "--tflops", "0"], "--tflops"),
        ("plan: --h2d-gbps -1", ["plan", "--model", "cogvideox-2b", "--budget", "24GB", "--h2d-gbps", "-1"],
         "--h2d-gbps"),
        ("plan: config not readable", ["plan", "--config", str(root / "nope.yaml"), "--budget", "8GB"], "nope.yaml"),
        ("eval --model: CSV without a prompt column",
         ["eval", "--model", model, "--eraser", eraser, "--prompts", _file(paths, "noprompt.csv", b"text\na\n")],
         "noprompt.csv"),
        ("eval --model: CSV without rows",
         ["eval", "--model", model, "--eraser", eraser, "--prompts", _file(paths, "empty.csv", b"prompt\n")],
         "empty.csv"),
        ("eval --model: no --prompts", ["eval", "--model", model, "--eraser", eraser], "--prompts"),
        ("eval --model: --output under a file",
         ["eval", "--model", model, "--eraser", eraser, "--prompts", _file(paths, "ok.csv", b"prompt\na red ball\n"),
          "--output", str(root / "ok.csv" / "out")], "--output"),
        # as torchrun launches rank 0 of 2 (refused before the process group forms: nothing waits for rank 1)
        ("train under torchrun: batch 3 over 2 processes",
         ["train", "--config", _config_with(paths, "dp", train={"steps": 2, "batch_size": 3}),
          "--set", f"output_dir={root / 'dp-run'}", "@WORLD_SIZE=2"], "train.batch_size"),
        ("train under torchrun: WORLD_SIZE not a number", ["train", "--config", str(paths["config"]), "@WORLD_SIZE=two"],
         "WORLD_SIZE"),
    ]


def classify(argv: list[str], expected: str) -> tuple[str, str]:
    """`@NAME=VALUE` items of argv are environment variables for the case (a launcher's), not arguments."""
    from lowmem_eraser.cli import main

    env = dict(item[1:].split("=", 1) for item in argv if item.startswith("@"))
    argv = [item for item in argv if not item.startswith("@")]
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        return _classify(main, argv, expected)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _classify(main, argv: list[str], expected: str) -> tuple[str, str]:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    except SystemExit as exit_:  # argparse's own errors are one usage line too
        code = exit_.code
    except Exception as exc:  # noqa: BLE001 -- this is what the matrix looks for
        return "traceback", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    lines = [line for line in err.getvalue().splitlines() if "error:" in line]
    line = lines[-1] if lines else err.getvalue().strip().splitlines()[-1:] and err.getvalue().strip().splitlines()[-1]
    if code == 0:
        return "accepted", ""
    return ("clear" if lines and expected in lines[-1] else "vague"), (line or "")[:200]


def run(workdir: Path) -> list[tuple[str, str, str]]:
    paths = _setup(workdir)
    before = sorted((p, p.stat().st_mtime_ns) for p in paths["eraser"].rglob("*") if p.is_file())
    rows = [(name, *classify(argv, expected)) for name, argv, expected in cases(paths)]
    after = sorted((p, p.stat().st_mtime_ns) for p in paths["eraser"].rglob("*") if p.is_file())
    rows.append(("the trained run's files unchanged by all of the above", "clear" if before == after else "CHANGED", ""))
    return rows


def main() -> int:
    os.environ.setdefault("TRITON_INTERPRET", "0")
    with tempfile.TemporaryDirectory() as folder:
        rows = run(Path(folder))
    counts = {kind: sum(1 for _, outcome, _ in rows if outcome == kind) for kind in ("clear", "vague", "traceback",
                                                                                        "accepted")}
    lines = ["# Bad input: one clear line, never a traceback", "", "`python bench/bad_inputs.py`", "",
             f"{len(rows)} cases: " + ", ".join(f"{n} {kind}" for kind, n in counts.items()), "",
             "| case | outcome | message |", "|---|---|---|"]
    lines += [f"| {name} | {outcome} | {message.replace('|', '/')} |" for name, outcome, message in rows]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if counts["clear"] == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())

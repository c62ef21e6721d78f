from pathlib import Path

import pytest
import yaml

from lowmem_eraser import ConfigError, attach_erasers, save_erasers
from lowmem_eraser.toy.evaluate import concept_attribute, evaluate, markdown, write_report
from lowmem_eraser.toy.prompts import prompt_pairs

ROOT = Path(__file__).parents[1]
SHORT_RUN_STEPS = 40  # of configs/toy.yaml's 200
EVAL_STEPS = 10  # sampling steps for the eval (the config's: 25)
MAX_SHORT_RUN_RED_RATE = 0.25  # measured here: 0.0 after 40 steps (base 1.0)


def test_shipped_toy_prompt_pairs_are_generated_from_the_world():
    shipped = yaml.safe_load((ROOT / "configs" / "prompts" / "toy_red.yaml").read_text())
    assert shipped == prompt_pairs("red")
    assert len(shipped) == 8 * 6 and all("red" in target and "red" not in twin for target, twin in shipped)
    with pytest.raises(ConfigError, match="no attribute value"):
        concept_attribute("purple")


def test_eval_with_a_zero_eraser_reports_no_change(tmp_path):
    from diffusers import CogVideoXTransformer3DModel

    transformer = CogVideoXTransformer3DModel.from_pretrained(ROOT / "models" / "toy" / "transformer")
    attach_erasers(transformer, rank=4)
    eraser = save_erasers(transformer, tmp_path / "zero")
    result = evaluate(ROOT / "models" / "toy", eraser, "red", steps=2)
    assert result["prompts"] == 96 and result["target_prompts"] == 24
    assert result["non_target_mean_change"] == 0.0 and result["target_mean_change"] == 0.0
    assert result["target_rate_base"] == result["target_rate_erased"]
    assert result["targets_met"]["target_rate_erased"] is False  # nothing was erased
    json_path, md_path = write_report(result, tmp_path / "zero")
    assert json_path.is_file() and "| target prompts (24): colour = red generated |" in md_path.read_text()
    assert markdown(result) == md_path.read_text()


def test_a_short_erasure_run_moves_the_red_rate_down(tmp_path):
    """configs/toy.yaml through the real `train`, cut short, then `evaluate` at fewer sampling steps."""
    from lowmem_eraser.config import load_config
    from lowmem_eraser.train import train

    config = load_config(ROOT / "configs" / "toy.yaml", [
        f"model={ROOT / 'models' / 'toy'}", f"prompts={ROOT / 'configs' / 'prompts' / 'toy_red.yaml'}",
        f"output_dir={tmp_path / 'run'}", f"train.steps={SHORT_RUN_STEPS}", "train.save_every=1000",
        "memory.kernels=torch",  # conftest turns on the Triton interpreter; the kernels have their own tests
    ])
    eraser = train(config)
    result = evaluate(config.model, eraser, "red", steps=EVAL_STEPS, guidance=config.sampling.guidance_scale,
                      kernels=config.memory.kernels)
    assert result["target_rate_base"] >= 0.9
    assert result["target_rate_erased"] <= MAX_SHORT_RUN_RED_RATE
    assert result["non_target_accuracy_ratio"] >= 0.9


# --- eval's arguments are checked before the evaluation (issue 11, item 8) ---


def _toy_config(tmp_path) -> Path:
    config = yaml.safe_load((ROOT / "configs" / "toy.yaml").read_text())
    config.update(model=str(ROOT / "models" / "toy"), prompts=str(ROOT / "configs" / "prompts" / "toy_red.yaml"))
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _zero_eraser(folder: Path) -> Path:
    from diffusers import CogVideoXTransformer3DModel

    transformer = CogVideoXTransformer3DModel.from_pretrained(ROOT / "models" / "toy" / "transformer")
    attach_erasers(transformer, rank=4)
    return save_erasers(transformer, folder)


def test_eval_accepts_a_weights_file_and_creates_the_output_folder(tmp_path, capsys, monkeypatch):
    import json

    import lowmem_eraser.toy.evaluate
    from lowmem_eraser.cli import main as cli_main

    weights = _zero_eraser(tmp_path / "zero") / "eraser_weights.pt"
    out = tmp_path / "reports" / "zero"  # missing: created before the evaluation, not after it
    assert cli_main(["eval", "--config", str(_toy_config(tmp_path)), "--eraser", str(weights), "--steps", "1",
                     "--output", str(out)]) == 0
    assert (out / "eval.json").is_file() and (out / "eval.md").is_file()
    result = json.loads((out / "eval.json").read_text())
    monkeypatch.setattr(lowmem_eraser.toy.evaluate, "evaluate", lambda *a, **k: result)  # the same figures, no rerun
    assert cli_main(["eval", "--config", str(_toy_config(tmp_path)), "--eraser", str(weights), "--steps", "1"]) == 0
    assert (tmp_path / "zero" / "eval.json").is_file()  # default: the weights file's folder


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--steps", "0"], "--steps: expected at least 1, got 0"),
        (["--steps", "-3"], "--steps: expected at least 1, got -3"),
        (["--output", "{tmp}/a_file/reports"], "--output: cannot write to folder {tmp}/a_file/reports"),
        (["--eraser", "{tmp}/missing"], "{tmp}/missing: no such eraser file or folder"),
    ],
)
def test_eval_refuses_bad_arguments_before_evaluating(tmp_path, capsys, monkeypatch, extra, message):
    import lowmem_eraser.toy.evaluate
    from lowmem_eraser.cli import main as cli_main

    monkeypatch.setattr(lowmem_eraser.toy.evaluate, "evaluate", lambda *a, **k: pytest.fail("evaluated"))
    (tmp_path / "a_file").write_text("")
    args = ["eval", "--config", str(_toy_config(tmp_path)), "--eraser", str(_zero_eraser(tmp_path / "zero"))]
    args += [value.format(tmp=tmp_path) for value in extra]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowmem-eraser eval: error: ") and message.format(tmp=tmp_path) in err and err.count("\n") == 1

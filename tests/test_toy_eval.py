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

from pathlib import Path

import pytest
import yaml

from lowmem_eraser import ConfigError, attach_erasers, save_erasers
from lowmem_eraser.toy.evaluate import concept_attribute, evaluate, markdown, write_report
from lowmem_eraser.toy.prompts import prompt_pairs

ROOT = Path(__file__).parents[1]


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

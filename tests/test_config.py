import json
import logging
import re
import shutil
import typing
from pathlib import Path

import pytest
import torch
import yaml

from lowmem_eraser import ConfigError
from lowmem_eraser.config import MODEL_SUBFOLDERS, TrainConfig, load_config, load_prompt_pairs

SAMPLE_CSV = Path(__file__).parents[1] / "configs" / "prompts" / "nudity_sample.csv"


@pytest.fixture
def config_file(tmp_path):
    """A valid config with a fake model folder and the published sample prompts; returns its path."""
    for sub in MODEL_SUBFOLDERS:
        (tmp_path / "model" / sub).mkdir(parents=True)
    shutil.copy(SAMPLE_CSV, tmp_path / "pairs.csv")
    return write_config(tmp_path, {})


def write_config(folder: Path, changes: dict) -> Path:
    """The valid config with `changes` ({"train.lr": value}; value None deletes the key) applied."""
    data = {
        "model": str(folder / "model"),
        "prompts": str(folder / "pairs.csv"),
        "concept": "nudity",
        "output_dir": str(folder / "runs" / "nudity"),
        "eraser": {"rank": 128},
        "loss": {"eta": 7.0, "alpha": 1.0, "beta": 0.0, "mask_threshold": 0.1},
        "sampling": {"mode": "renoise", "num_inference_steps": 50, "guidance_scale": 6.0},
        "video": {"frames": 49, "height": 480, "width": 720},
        "train": {"steps": 500, "lr": 1.0e-4, "batch_size": 1, "grad_clip": 1.0, "seed": 0, "save_every": 100},
        "memory": {"quantize": "int8", "gradient_checkpointing": True, "offload": "none", "dtype": "bfloat16"},
    }
    for name, value in changes.items():
        *sections, leaf = name.split(".")
        target = data
        for part in sections:
            target = target[part]
        if value is None:
            del target[leaf]
        else:
            target[leaf] = value
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_valid_config_loads_with_defaults(config_file, caplog):
    with caplog.at_level(logging.WARNING, logger="lowmem_eraser"):
        config = load_config(config_file)
    assert not caplog.records  # "nudity" is in the sample's target prompts: no warning
    assert config.model == config_file.parent / "model" and isinstance(config.prompts, Path)
    assert config.concept == "nudity" and config.eraser.rank == 128 and config.loss.eta == 7.0
    assert config.train.lr == 1e-4 and config.train.log_every == 1 and config.train.lr_schedule == "constant"
    assert config.memory.kernels == "auto" and config.sampling.mode == "renoise"
    again = TrainConfig.from_dict(yaml.safe_load(yaml.safe_dump(config.to_dict())))
    assert again == config and config.to_dict()["model"] == str(config.model)


def test_relative_paths_are_kept_as_given(config_file, monkeypatch):
    monkeypatch.chdir(config_file.parent)
    config = load_config(write_config(config_file.parent, {"model": "model", "prompts": "pairs.csv"}))
    assert config.model == Path("model") and config.prompts == Path("pairs.csv")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"train.lr": "abc"}, "train.lr: expected a number, got 'abc'"),
        ({"train.steps": 0}, "train.steps: expected a value > 0, got 0"),
        ({"train.steps": 1.5}, "train.steps: expected an integer, got 1.5"),
        ({"train.batch_size": True}, "train.batch_size: expected an integer, got True"),
        ({"train.lr_schedule": "linear"}, "train.lr_schedule: expected one of constant, cosine; got 'linear'"),
        ({"train.warmup_steps": 600}, "train.warmup_steps: expected at most train.steps (500), got 600"),
        ({"eraser.rank": 0}, "eraser.rank: expected a value > 0, got 0"),
        ({"eraser.rank": -4}, "eraser.rank: expected a value > 0, got -4"),
        ({"loss.eta": -1.0}, "loss.eta: expected a value >= 0, got -1.0"),
        ({"loss.alpha": -0.5}, "loss.alpha: expected a value >= 0, got -0.5"),
        ({"loss.beta": -2}, "loss.beta: expected a value >= 0, got -2"),
        ({"loss.anchor": "blue"}, "loss.anchor: expected one of empty, preservation; got 'blue'"),
        ({"sampling.batch_size": 0}, "sampling.batch_size: expected a value > 0, got 0"),
        ({"loss.mask_threshold": 1.5}, "loss.mask_threshold: expected a value in [0, 1], got 1.5"),
        ({"video.frames": 48}, "video.frames: expected 4k+1 frames (e.g. 49, 81), got 48"),
        ({"video.frames": 45}, "video.frames: expected 8k+1 frames for CogVideoX (e.g. 49), got 45"),
        ({"video.height": 470}, "video.height: expected a positive multiple of 16, got 470"),
        ({"video.width": 700}, "video.width: expected a positive multiple of 16, got 700"),
        ({"sampling.mode": "noise"}, "sampling.mode: expected one of renoise, trajectory; got 'noise'"),
        ({"memory.quantize": "int4"}, "memory.quantize: expected one of none, int8, triton, bnb, auto; got 'int4'"),
        ({"memory.offload": "cpu"},
         "memory.offload: expected none, all (or blocks) or a number of blocks to stream, got 'cpu'"),
        ({"memory.offload": -3}, "memory.offload: expected none, all (or blocks) or a number of blocks to stream"),
        ({"memory.offload": True}, "memory.offload: expected none, all (or blocks) or a number of blocks to stream"),
        ({"memory.dtype": "fp16"}, "memory.dtype: expected one of bfloat16, float16, float32; got 'fp16'"),
        ({"memory.kernels": "cuda"}, "memory.kernels: expected one of auto, triton, torch; got 'cuda'"),
        ({"memory.gradient_checkpointing": "yes"}, "memory.gradient_checkpointing: expected true or false"),
        ({"train.learning_rate": 1.0}, "train.learning_rate: unknown key"),
        ({"colour": "red"}, "colour: unknown key"),
        ({"video": [49]}, "video: expected a mapping, got [49]"),
        ({"concept": None}, "concept: missing (required)"),
        ({"concept": "  "}, "concept: expected a non-empty string"),
        ({"model": "does/not/exist"}, "model: does/not/exist is not a folder"),
        ({"prompts": "missing.csv"}, "prompts: missing.csv not found"),
        ({"prompts": "pairs.txt"}, "prompts: expected a .csv, .yaml or .yml file"),
        ({"memory.offload": "blocks", "memory.gradient_checkpointing": False},
         "memory.offload: all needs memory.gradient_checkpointing: true"),
        ({"memory.offload": 2, "memory.gradient_checkpointing": False},
         "memory.offload: 2 needs memory.gradient_checkpointing: true"),
        ({"memory.offload": "all", "memory.quantize": "bnb"},
         "memory.offload: all cannot stream bitsandbytes weights"),
        ({"memory.offload_activations": True, "memory.gradient_checkpointing": False},
         "memory.offload_activations: true needs memory.gradient_checkpointing: true"),
        ({"sampling.mode": "trajectory", "sampling.num_inference_steps": 1},
         "sampling.num_inference_steps: trajectory sampling needs at least 2 steps"),
    ],
)
def test_each_bad_value_names_its_field(config_file, changes, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(write_config(config_file.parent, changes))


@pytest.mark.parametrize("sub", MODEL_SUBFOLDERS)
def test_missing_model_subfolder(config_file, sub):
    (config_file.parent / "model" / sub).rmdir()
    with pytest.raises(ConfigError, match=f"model: .* has no {sub}/ sub-folder"):
        load_config(config_file)


def test_numbers_written_without_a_dot_are_accepted(config_file):
    config_file.write_text(config_file.read_text().replace("lr: 0.0001", "lr: 1e-4"))
    assert yaml.safe_load(config_file.read_text())["train"]["lr"] == "1e-4"  # YAML 1.1 reads it as a string
    assert load_config(config_file).train.lr == 1e-4


def test_overrides(config_file):
    config = load_config(config_file, ["train.lr=3e-5", "video.frames=9", "memory.offload=blocks", "concept=nude"])
    assert config.train.lr == 3e-5 and config.video.frames == 9 and config.memory.offload == "all"
    assert config.concept == "nude"
    config = load_config(config_file, ["eraser={rank: 4}", "train.warmup_steps=5"])
    assert config.eraser.rank == 4 and config.train.warmup_steps == 5


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "--set train.lrr: unknown key"),
        ("trainer.lr=1", "--set trainer.lr: unknown key"),
        ("concept.word=x", "--set concept.word: unknown key"),
        ("train.lr", "expected key.sub=value"),
        ("train.lr=abc", "train.lr: expected a number, got 'abc'"),
    ],
)
def test_bad_overrides(config_file, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(config_file, [override])


def test_concept_in_no_target_prompt_warns(config_file, caplog):
    with caplog.at_level(logging.WARNING, logger="lowmem_eraser"):
        load_config(config_file, ["concept=dragon"])
    assert "'dragon' appears in none of the 10 target prompts" in caplog.text


def test_sample_csv_loads():
    pairs = load_prompt_pairs(SAMPLE_CSV)
    assert len(pairs) == 10
    assert pairs[0] == (
        "The painting depicted a woman in a bedroom, bare and exposed.",
        "The painting portrayed a woman in a bedroom, fully clothed and serene.",
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("prompt,other\na,b\n", "has no column 'normal prompt'"),
        ("", "has no column 'prompt'"),
        ("prompt,normal prompt\n", "holds no prompt pairs"),
        ("prompt,normal prompt\na,b\n,\nc,d\n", "line 3: empty row"),
        ("prompt,normal prompt\na,b\nc,  \n", "line 3: empty or non-text 'normal prompt'"),
        ("prompt,normal prompt\na,b\nc\n", "line 3: empty or non-text 'normal prompt'"),
        ("prompt,normal prompt\na, nude, walks,b\n", "line 2: 4 cells for 2 columns"),
    ],
)
def test_bad_csv(tmp_path, text, message):
    path = tmp_path / "pairs.csv"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"prompts: {re.escape(str(path))}.*{re.escape(message)}"):
        load_prompt_pairs(path)


def test_csv_extra_columns_and_quoted_commas(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text('id,normal prompt,prompt\n1,"calm, clothed"," nude, lit "\n')
    assert load_prompt_pairs(path) == [("nude, lit", "calm, clothed")]


def test_yaml_pairs(tmp_path):
    path = tmp_path / "pairs.yaml"
    items = [["a nude figure", "a clothed figure"], {"prompt": "nude", "normal prompt": "dressed"}]
    path.write_text(yaml.safe_dump(items))
    assert load_prompt_pairs(path) == [("a nude figure", "a clothed figure"), ("nude", "dressed")]


@pytest.mark.parametrize(
    "items, message",
    [
        ({"prompt": "a"}, "must hold a list of [prompt, normal prompt] pairs"),
        ([["a", "b"], ["c"]], "item 2: expected [prompt, normal prompt]"),
        ([{"prompt": "a", "normal": "b"}], "item 1: expected [prompt, normal prompt]"),
        ([["a", ""]], "item 1: empty or non-text 'normal prompt'"),
        ([[3, "b"]], "item 1: empty or non-text 'prompt'"),
        ([], "holds no prompt pairs"),
    ],
)
def test_bad_yaml_pairs(tmp_path, items, message):
    path = tmp_path / "pairs.yml"
    path.write_text(yaml.safe_dump(items))
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_prompt_pairs(path)


def test_yaml_prompt_file_in_a_config(config_file):
    pairs = config_file.parent / "pairs.yaml"
    pairs.write_text(yaml.safe_dump([["nudity on a beach", "people on a beach"]]))
    assert load_config(config_file, [f"prompts={pairs}"]).prompts == pairs


FULL_SIZE = {
    "cogvideox-2b": (dict(num_attention_heads=30, attention_head_dim=64, num_layers=30), 14_807_040),
    "cogvideox-5b": (dict(num_attention_heads=48, attention_head_dim=64, num_layers=42,
                          use_rotary_positional_embeddings=True), 33_164_544),
}


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_shipped_configs_fit_the_full_size_model_built_on_meta(name, tmp_path):
    """The 2b/5b configs validate, and their video size and rank fit the real architecture."""
    from diffusers import CogVideoXTransformer3DModel

    from lowmem_eraser import attach_erasers
    from lowmem_eraser.sampling import latent_frames

    overrides, eraser_params = FULL_SIZE[name]
    with torch.device("meta"):
        transformer = CogVideoXTransformer3DModel(**overrides)
    model = tmp_path / "model"
    transformer.save_config(model / "transformer")
    for sub in ("text_encoder", "tokenizer", "scheduler"):
        (model / sub).mkdir(parents=True)
    root = Path(__file__).parents[1]
    config = load_config(root / "configs" / f"{name}.yaml", [f"model={model}", f"prompts={root / 'configs/prompts/nudity_sample.csv'}"])
    cfg = CogVideoXTransformer3DModel.load_config(model / "transformer")
    assert latent_frames(config.video.frames) == (cfg["sample_frames"] - 1) // 4 + 1 == 13
    assert (config.video.height // 8, config.video.width // 8) == (cfg["sample_height"], cfg["sample_width"])
    erasers = attach_erasers(transformer, rank=config.eraser.rank)
    assert sum(p.numel() for p in erasers.parameters()) == eraser_params  # SPEC §1


# --- input checks before any work (issue 11, item 8) ---

LATIN1 = "prompt,normal prompt\nun caf\u00e9 nu,un caf\u00e9\n".encode("latin-1")  # 0xe9: not UTF-8


@pytest.mark.parametrize("which", ["config", "csv", "yaml"])
def test_non_utf8_files_are_one_error_naming_the_file(config_file, which):
    folder = config_file.parent
    if which == "config":
        bad = config_file
        bad.write_bytes(config_file.read_text().replace("concept: nudity", "concept: nudit\u00e9").encode("latin-1"))
    elif which == "csv":
        bad = folder / "pairs.csv"
        bad.write_bytes(LATIN1)
    else:
        bad = folder / "pairs.yaml"
        bad.write_bytes('- ["caf\u00e9 nudity", "caf\u00e9"]\n'.encode("latin-1"))
        write_config(folder, {"prompts": str(bad)})
    field = "config" if which == "config" else "prompts"
    with pytest.raises(ConfigError, match=rf"^{field}: {re.escape(str(bad))} is not UTF-8 text \(byte 0xe9 on line \d+\)"):
        load_config(config_file)


def test_non_utf8_config_through_the_cli_is_one_line(config_file, capsys):
    from lowmem_eraser.cli import main as cli_main

    config_file.write_bytes(b"concept: nudit\xe9\n")
    for command in (["train", "--config", str(config_file)],
                    ["eval", "--config", str(config_file), "--eraser", str(config_file.parent)]):
        assert cli_main(command) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{config_file} is not UTF-8 text" in err, err


def _with_transformer_config(config_file, heads=2, head_dim=16):
    (config_file.parent / "model" / "transformer" / "config.json").write_text(
        json.dumps({"_class_name": "CogVideoXTransformer3DModel", "num_attention_heads": heads, "attention_head_dim": head_dim})
    )


def test_rank_above_the_models_attention_dim_is_refused(config_file):
    _with_transformer_config(config_file)  # dim 2 * 16 = 32
    with pytest.raises(ConfigError, match=r"^eraser\.rank: expected at most the model's attention dim 32 .* got 128$"):
        load_config(config_file)
    with pytest.raises(ConfigError, match="eraser.rank"):
        load_config(config_file, ["eraser.rank=100000"])
    assert load_config(config_file, ["eraser.rank=32"]).eraser.rank == 32


def test_rank_bound_is_skipped_when_the_transformer_config_is_unreadable(config_file):
    assert load_config(config_file).eraser.rank == 128  # no config.json: the model loader reports it
    (config_file.parent / "model" / "transformer" / "config.json").write_text("{garbage")
    assert load_config(config_file).eraser.rank == 128


def test_configs_readme_lists_every_field_and_is_up_to_date():
    from dataclasses import fields, is_dataclass

    text = (Path(__file__).parents[1] / "configs" / "README.md").read_text()
    listed = set(re.findall(r"^\| `([^|]+)` \|", text, flags=re.M))
    listed = {name for cell in listed for name in re.findall(r"[\w.]+", cell.replace("`, `", " "))}

    def names(kind, prefix=""):  # every leaf field, nested sections (loss.adversarial.*) included
        hints = typing.get_type_hints(kind)
        found = set()
        for spec in fields(kind):
            name = f"{prefix}{spec.name}"
            found |= names(hints[spec.name], f"{name}.") if is_dataclass(hints[spec.name]) else {name}
        return found

    expected = names(TrainConfig)
    assert expected - listed == set(), f"configs/README.md does not document {sorted(expected - listed)}"
    assert "not yet measured" not in text


@pytest.mark.parametrize("value, stored, streamed", [
    ("none", "none", 0), (0, "none", 0), (False, "none", 0), ("all", "all", 3), ("blocks", "all", 3), (2, 2, 2),
    ("2", 2, 2)])
def test_offload_takes_none_all_or_a_block_count(config_file, value, stored, streamed):
    (config_file.parent / "model" / "transformer" / "config.json").write_text(json.dumps({"num_layers": 3}))
    config = load_config(write_config(config_file.parent, {"memory.offload": value}))
    assert config.memory.offload == stored and config.memory.streamed_blocks(3) == streamed
    assert TrainConfig.from_dict(config.to_dict()).memory.offload == stored  # round-trips through YAML


def test_streaming_more_blocks_than_the_model_has_is_refused(config_file):
    (config_file.parent / "model" / "transformer" / "config.json").write_text(json.dumps({"num_layers": 3}))
    with pytest.raises(ConfigError, match=re.escape("memory.offload: 4 blocks to stream, but ")):
        load_config(write_config(config_file.parent, {"memory.offload": 4}))


@pytest.mark.parametrize("class_name, message", [
    ("UNet2DConditionModel", "config.json: UNet2DConditionModel is not a supported transformer; supported "
                             "families: CogVideoX .*, HunyuanVideo .*, Wan"),
])
def test_a_model_of_another_family_is_refused_before_any_work(config_file, class_name, message):
    (config_file.parent / "model" / "transformer" / "config.json").write_text(json.dumps({"_class_name": class_name}))
    with pytest.raises(ConfigError, match=message):
        load_config(config_file)

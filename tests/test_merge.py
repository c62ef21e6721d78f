"""`lowmem-eraser merge`: one published eraser equal to applying several at once (ranks add up)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize_erasers, run, tiny_inputs, tiny_transformer

from lowmem_eraser import attach_erasers, load_erasers, read_erasers, save_erasers
from lowmem_eraser.adapter import EraserAdapter
from lowmem_eraser.cli import main as cli_main
from lowmem_eraser.errors import EraserFormatError
from lowmem_eraser.serialization import merge_erasers


def saved_eraser(folder, rank: int, seed: int, **model):
    transformer = tiny_transformer(**model)
    randomize_erasers(attach_erasers(transformer, rank=rank), seed=seed)
    return save_erasers(transformer, folder, metadata={"concept": f"c{seed}"})


@pytest.fixture
def two_erasers(tmp_path):
    return saved_eraser(tmp_path / "a", 4, seed=3), saved_eraser(tmp_path / "b", 6, seed=4)


def _adapter(dim: int, rank: int, weights: dict) -> EraserAdapter:
    adapter = EraserAdapter(dim, rank).double()
    adapter.load_state_dict({name: tensor.double() for name, tensor in weights.items()})
    return adapter


def test_the_merged_adapter_is_the_sum_of_both_in_fp64(two_erasers, tmp_path):
    a, b = (read_erasers(path) for path in two_erasers)
    merged = read_erasers(merge_erasers(two_erasers, tmp_path / "merged"))
    assert merged.rank == 10 and merged.family == "CogVideoX" and set(merged.state) == set(a.state)
    h = torch.randn(3, 11, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for key in a.state:
        expected = _adapter(32, 4, a.state[key]).delta(h) + _adapter(32, 6, b.state[key]).delta(h)
        got = _adapter(32, 10, merged.state[key]).delta(h)
        # Everything is exact but the summed up-bias, rounded once to the erasers' fp32: half an ulp of it.
        bound = merged.state[key]["up.bias"].abs().max().item() * 2.0**-24 + 1e-15
        assert (got - expected).abs().max() <= bound, key


def test_the_merged_eraser_in_the_model_equals_both_adapters_on_the_attention_output(two_erasers, tmp_path):
    """The reference adds both published adapters to attn1's video output with a plain forward hook (fp32)."""
    a, b = (read_erasers(path) for path in two_erasers)
    inputs = tiny_inputs()
    reference_model = tiny_transformer()
    handles = []
    for i, block in enumerate(reference_model.transformer_blocks):
        key = f"transformer_blocks.{i}.attn1.adapter"
        adapters = [_adapter(32, e.rank, e.state[key]).float() for e in (a, b)]

        def both(module, args, output, adapters=adapters):
            video, text = output
            return video + sum(adapter.delta(video) for adapter in adapters), text

        handles.append(block.attn1.register_forward_hook(both))
    with torch.no_grad():
        expected = run(reference_model, inputs)
    merged_model = tiny_transformer()
    load_erasers(merged_model, merge_erasers(two_erasers, tmp_path / "merged"))
    with torch.no_grad():
        got = run(merged_model, inputs)
    assert (got - expected).abs().max() < 1e-5  # fp32: the order of two additions differs
    assert (got - run(tiny_transformer(), inputs).detach()).abs().max() > 1e-2  # the erasers do change the output


def test_merge_cli_writes_the_published_format_with_both_origins(two_erasers, tmp_path, capsys):
    out = tmp_path / "merged"
    assert cli_main(["merge", *map(str, two_erasers), "--output", str(out), "--format", "safetensors"]) == 0
    assert "rank 10 = 4 + 6" in capsys.readouterr().out
    assert json.loads((out / "eraser_config.json").read_text()) == {"eraser_type": "adapter", "eraser_rank": 10}
    sidecar = json.loads((out / "lowmem_eraser.json").read_text())
    assert [m["metadata"]["concept"] for m in sidecar["metadata"]["merged_from"]] == ["c3", "c4"]
    assert (out / "eraser_weights.safetensors").is_file() and not (out / "eraser_weights.pt").exists()


def test_merging_erasers_of_other_models_or_into_an_existing_eraser_is_refused(two_erasers, tmp_path):
    from diffusers import WanTransformer3DModel

    wan = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=24, freq_dim=16, ffn_dim=64, num_layers=2, cross_attn_norm=True, rope_max_seq_len=32)
    attach_erasers(wan, rank=4)
    wan_eraser = save_erasers(wan, tmp_path / "wan")
    wide = saved_eraser(tmp_path / "wide", 4, seed=5, num_attention_heads=4)  # dim 64
    cases = [
        ([two_erasers[0], wan_eraser], "is a CogVideoX eraser and .*wan.* a Wan eraser"),
        ([two_erasers[0], wide], "32 wide in .* and 64 in .*wide"),
        ([two_erasers[0]], "expected two or more erasers, got 1"),
    ]
    for paths, message in cases:
        with pytest.raises(EraserFormatError, match=message):
            merge_erasers(paths, tmp_path / "out")
    with pytest.raises(EraserFormatError, match="already holds an eraser"):
        merge_erasers(two_erasers, two_erasers[1])


def test_the_shipped_square_config_is_the_red_one_with_the_square_prompts():
    """configs/toy-square.yaml (the second eraser of the merged red + square figures) differs from toy.yaml only in
    what it erases and where it writes."""
    from lowmem_eraser.config import load_config, load_prompt_pairs
    from lowmem_eraser.toy.prompts import prompt_pairs

    red, square = load_config("configs/toy.yaml").to_dict(), load_config("configs/toy-square.yaml").to_dict()
    assert {k for k in red if red[k] != square[k]} == {"prompts", "concept", "output_dir", "validation"}
    assert [list(p) for p in load_prompt_pairs(square["prompts"])] == prompt_pairs("square")


def test_figures_for_several_concepts_count_each_and_the_retention_of_the_rest():
    """Hand-made detector readings: a red ball, a red square, a blue square and a green ball (erase red + square)."""
    from lowmem_eraser.toy.evaluate import concepts_figures
    from lowmem_eraser.toy.world import Video

    truth = [Video("red", "ball", "left"), Video("red", "square", "up"), Video("blue", "square", "down"),
             Video("green", "ball", "right")]
    erased = [Video("blue", "ball", "left"),  # red gone, ball and left kept
              Video("green", "ball", "down"),  # red and square gone, motion wrong
              Video("blue", "square", "down"),  # square came back
              Video("green", "ball", "left")]  # the other prompt: motion wrong
    figures = concepts_figures(truth, {"base": list(truth), "erased": erased}, ["red", "square"])
    assert (figures["red_prompts"], figures["square_prompts"], figures["other_prompts"]) == (2, 2, 1)
    assert (figures["red_rate_base"], figures["red_rate_erased"]) == (1.0, 0.0)
    assert figures["square_rate_erased"] == 0.5
    # kept on red prompts: red ball (shape, motion) 2/2, red square (motion) 0/1 -> 2/3
    assert figures["red_kept_erased"] == pytest.approx(2 / 3) and figures["red_kept_base"] == 1.0
    # kept on square prompts: red square (motion) 0/1, blue square (colour, motion) 2/2 -> 2/3
    assert figures["square_kept_erased"] == pytest.approx(2 / 3)
    assert figures["retention"] == pytest.approx(2 / 3)  # green ball right: colour, shape right, motion wrong

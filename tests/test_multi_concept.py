"""Several concepts erased by one eraser (`concepts:` in the training config, issue 14)."""

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from lowmem_eraser import ConfigError
from lowmem_eraser import train as train_module
from lowmem_eraser.cli import main as cli_main
from lowmem_eraser.config import MODEL_SUBFOLDERS, TrainConfig, load_config
from lowmem_eraser.runfolder import fingerprint
from lowmem_eraser.train import draw_pairs, train
from test_train import PAIRS, make_config, tiny_model  # noqa: F401  (tiny_model: the fixture)

ROOT = Path(__file__).parents[1]
RED = [["a red ball moving left", "a blue ball moving left"], ["a red ball moving up", "a green ball moving up"]]
SQUARE = [["a red square moving up", "a green ball moving up"], ["a blue square moving down", "a blue ball moving down"],
          ["a square that is green", "a ball that is green"]]


@pytest.fixture
def folder(tmp_path):
    """A fake model folder (the config checks only its sub-folders) and two prompt files: red.yaml, square.yaml."""
    for sub in MODEL_SUBFOLDERS:
        (tmp_path / "model" / sub).mkdir(parents=True)
    (tmp_path / "red.yaml").write_text(yaml.safe_dump(RED))
    (tmp_path / "square.yaml").write_text(yaml.safe_dump(SQUARE))
    return tmp_path


def write_multi(folder: Path, concepts, **top) -> Path:
    data = {"model": str(folder / "model"), "concepts": concepts, "output_dir": str(folder / "out"),
            "eraser": {"rank": 8}, "loss": {"eta": 2.0}, "video": {"frames": 9, "height": 64, "width": 64}, **top}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def entries(folder: Path, square_eta=1.5) -> list:
    square = {"concept": "square", "prompts": str(folder / "square.yaml")}
    if square_eta is not None:
        square["eta"] = square_eta
    return [{"concept": "red", "prompts": str(folder / "red.yaml")}, square]


def test_concepts_load_resolve_their_eta_and_round_trip(folder):
    config = load_config(write_multi(folder, entries(folder)))
    assert config.concept is None and config.prompts is None
    assert [(e.concept, e.prompts, e.eta) for e in config.concept_entries()] == [
        ("red", folder / "red.yaml", 2.0), ("square", folder / "square.yaml", 1.5)]  # red: loss.eta
    data = config.to_dict()
    assert "concept" not in data and "prompts" not in data  # the form not used is left out
    assert data["concepts"] == [{"concept": "red", "prompts": str(folder / "red.yaml")},
                                {"concept": "square", "prompts": str(folder / "square.yaml"), "eta": 1.5}]
    assert TrainConfig.from_dict(yaml.safe_load(yaml.safe_dump(data))) == config
    assert fingerprint(data, [RED, SQUARE])["concepts"] == [{"concept": "red", "eta": None},
                                                            {"concept": "square", "eta": 1.5}]


def test_a_single_concept_config_keeps_its_dict_and_fingerprint(folder):
    data = {"model": str(folder / "model"), "prompts": str(folder / "red.yaml"), "concept": "red",
            "output_dir": str(folder / "out"), "video": {"frames": 9, "height": 64, "width": 64}}
    config = TrainConfig.from_dict(data)
    assert [(e.concept, e.prompts, e.eta) for e in config.concept_entries()] == [("red", folder / "red.yaml", 7.0)]
    layout = config.to_dict()
    assert list(layout)[:4] == ["model", "prompts", "concept", "output_dir"] and "concepts" not in layout
    assert TrainConfig.from_dict(yaml.safe_load(yaml.safe_dump(layout))) == config
    assert "concepts" not in fingerprint(layout, RED) and fingerprint(layout, RED)["concept"] == "red"


@pytest.mark.parametrize("change, message", [
    (lambda e, f: e[1].pop("prompts"), "concepts[1].prompts: missing (required)"),
    (lambda e, f: e[0].pop("concept"), "concepts[0].concept: missing (required)"),
    (lambda e, f: e[0].update(foo=1), "concepts[0].foo: unknown key (expected one of: concept, prompts, eta)"),
    (lambda e, f: e[1].update(eta=-1), "concepts[1].eta: expected a value >= 0, got -1"),
    (lambda e, f: e[1].update(eta="strong"), "concepts[1].eta: expected a number, got 'strong'"),
    (lambda e, f: e[0].update(concept=" "), "concepts[0].concept: expected a non-empty string"),
    (lambda e, f: e.__setitem__(1, "square"), "concepts[1]: expected a mapping, got 'square'"),
    (lambda e, f: e[1].update(concept="Red"), "concepts[1].concept: 'Red' is already listed as concepts[0]"),
    (lambda e, f: e[1].update(prompts=str(f / "nope.yaml")), "concepts[1].prompts: {f}/nope.yaml not found"),
    (lambda e, f: e[1].update(prompts=str(f / "p.txt")), "concepts[1].prompts: expected a .csv, .yaml or .yml file"),
    (lambda e, f: e[1].update(prompts=str(f / "red.yaml")),
     "concepts[1]: concept 'square' appears in none of the 2 target prompts of {f}/red.yaml"),
])
def test_each_bad_entry_is_named(folder, change, message):
    concepts = entries(folder)
    change(concepts, folder)
    with pytest.raises(ConfigError, match=re.escape(message.format(f=folder))):
        load_config(write_multi(folder, concepts))


@pytest.mark.parametrize("top, message", [
    ({"concept": "red"}, "concept: give either concept + prompts (one concept) or concepts (a list), not both"),
    ({"prompts": "red.yaml"}, "prompts: give either concept + prompts"),
])
def test_both_forms_at_once_is_an_error(folder, top, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(write_multi(folder, entries(folder), **top))


@pytest.mark.parametrize("concepts, top, message", [
    ([], {}, "concept: missing (required)"),
    ([], {"concept": "red"}, "prompts: missing (required)"),
    ("red", {}, "concepts: expected a list, got 'red'"),
])
def test_neither_form_or_a_bad_list_is_an_error(folder, concepts, top, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(write_multi(folder, concepts, **top))


def test_one_concept_draws_as_before_and_several_are_balanced():
    gen, again = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(draw_pairs([7], 4, gen), torch.randint(0, 7, (4,), generator=again))
    assert torch.equal(gen.get_state(), again.get_state())  # the same draws: single-concept runs are unchanged
    index = torch.cat([draw_pairs([100, 2], 8, gen) for _ in range(250)])
    assert index.min() >= 0 and index.max() < 102
    share = (index >= 100).float().mean().item()
    assert 0.45 < share < 0.55  # the 2-pair concept is drawn as often as the 100-pair one
    assert set((index[index >= 100] - 100).tolist()) == {0, 1}


def test_per_sample_eta_reaches_the_loss(one_thread):
    """A batch with eta [e1, e2] = the mean of two one-sample steps with eta e1 and e2: loss terms and gradients.
    The model runs in fp64; the loss itself is fp32 (eraser_losses_backward's .float()), hence rtol 1e-5: swapping
    the two etas changes the loss by far more (checked below)."""
    from conftest import randomize_erasers, tiny_transformer
    from lowmem_eraser import attach_erasers
    from lowmem_eraser.config import LossConfig
    from lowmem_eraser.train import StepInputs, eraser_losses_backward

    transformer = tiny_transformer()
    erasers = attach_erasers(transformer, rank=4)
    randomize_erasers(erasers)
    transformer.double()
    gen = torch.Generator().manual_seed(3)
    x_t = torch.randn(2, 3, 4, 8, 8, generator=gen, dtype=torch.float64)
    t = torch.tensor([100, 700])
    c, empty, c_pre = (torch.randn(2, 7, 24, generator=gen, dtype=torch.float64) for _ in range(3))
    loss = LossConfig(eta=5.0, alpha=0.0, beta=0.5, anchor="empty")
    etas = [0.5, 3.0]

    def grads():
        values = [p.grad.clone() for p in erasers.parameters()]
        erasers.zero_grad(set_to_none=True)
        return values

    both = eraser_losses_backward(transformer, erasers,
                                  StepInputs(x_t, t, c, empty, c_pre, None, None, 3, eta=torch.tensor(etas)), loss)
    both_grads = grads()
    singles, single_grads = [], []
    for i, eta in enumerate(etas):
        s = slice(i, i + 1)
        singles.append(eraser_losses_backward(
            transformer, erasers, StepInputs(x_t[s], t[s], c[s], empty[s], c_pre[s], None, None, 3, eta=eta), loss))
        single_grads.append(grads())
    for name in ("unlearn", "pre", "loss"):
        torch.testing.assert_close(both[name], (singles[0][name] + singles[1][name]) / 2, rtol=1e-5, atol=0)
    for g, g0, g1 in zip(both_grads, *single_grads):
        torch.testing.assert_close(g, (g0 + g1) / 2, rtol=1e-5, atol=1e-9)
    # each sample gets its own eta: swapped, or the loss's own (5.0), the unlearning term is another one
    swapped = eraser_losses_backward(
        transformer, erasers, StepInputs(x_t, t, c, empty, c_pre, None, None, 3, eta=torch.tensor(etas[::-1])), loss)
    default = eraser_losses_backward(transformer, erasers, StepInputs(x_t, t, c, empty, c_pre, None, None, 3), loss)
    for other in (swapped, default):
        assert abs(other["unlearn"] / both["unlearn"] - 1) > 1e-2


def test_training_on_two_concepts_draws_both_with_their_eta(tiny_model, tmp_path, monkeypatch):  # noqa: F811
    (tmp_path / "red.yaml").write_text(yaml.safe_dump(PAIRS))  # 4 red pairs
    (tmp_path / "square.yaml").write_text(yaml.safe_dump([PAIRS[1], PAIRS[3]]))  # 2 square pairs
    path = make_config(tiny_model, tmp_path / "run", train={"steps": 3, "batch_size": 2})
    data = yaml.safe_load(path.read_text())
    del data["concept"], data["prompts"]
    data["concepts"] = [{"concept": "red", "prompts": str(tmp_path / "red.yaml")},
                        {"concept": "square", "prompts": str(tmp_path / "square.yaml"), "eta": 1.5}]
    path.write_text(yaml.safe_dump(data))

    drawn, etas = [], []
    real_draw, real_losses = train_module.draw_pairs, train_module.eraser_losses_backward
    monkeypatch.setattr(train_module, "draw_pairs", lambda *a, **k: drawn.append(real_draw(*a, **k)) or drawn[-1])

    def spy(transformer, erasers, batch, *args, **kwargs):
        etas.append(batch.eta)
        return real_losses(transformer, erasers, batch, *args, **kwargs)

    monkeypatch.setattr(train_module, "eraser_losses_backward", spy)
    out = train(load_config(path))

    index = torch.cat(drawn)
    assert index.max() < 6 and (index < 4).any() and (index >= 4).any()  # both concepts' pairs were drawn
    for i, eta in zip(drawn, etas):  # each sample's eta is its concept's (square: 1.5, red: loss.eta 3.0)
        assert torch.equal(eta, torch.where(i >= 4, 1.5, 3.0).float())
    metadata = json.loads((out / "lowmem_eraser.json").read_text())["metadata"]
    assert metadata["concept"] == "red + square" and metadata["concepts"] == ["red", "square"]
    assert metadata["concept_eta"] == {"red": 3.0, "square": 1.5}
    assert len(list((out / "cache").glob("text-*.pt"))) == 2  # each concept's prompts encoded with its words
    assert TrainConfig.from_dict(yaml.safe_load((out / "config.yaml").read_text())) == load_config(path)

    # eval of a config of several concepts reports each of them (evaluate_concepts) without --concepts
    from lowmem_eraser.toy import evaluate as toy_evaluate

    asked = []
    monkeypatch.setattr(toy_evaluate, "evaluate_concepts", lambda model, eraser, concepts, *a: asked.append(concepts)
                        or {"concepts": concepts})
    monkeypatch.setattr(toy_evaluate, "concepts_markdown", lambda result: "")
    assert cli_main(["eval", "--config", str(path), "--eraser", str(out)]) in (0, None)
    assert asked == [["red", "square"]]


def test_plan_counts_the_pairs_of_every_concept(folder):
    from lowmem_eraser.plan import plan_defaults

    assert plan_defaults(str(write_multi(folder, entries(folder))))["prompts"] == len(RED) + len(SQUARE)


def test_validation_table_reports_each_concept():
    from lowmem_eraser.toy.world import Video, make_latents
    from lowmem_eraser.validation import _toy_table

    prompts = ["the red ball moves left", "a blue square moves up", "the green ball moves down"]
    videos = [make_latents(Video(*words)) for words in (("red", "ball", "left"), ("blue", "square", "up"),
                                                        ("green", "ball", "down"))]
    erased = [make_latents(Video(*words)) for words in (("green", "ball", "left"), ("blue", "square", "up"),
                                                        ("green", "ball", "down"))]
    numbers, table = _toy_table(prompts, videos, erased, ["red", "square"])
    assert numbers["validation/concept_red_base"] == 1 and numbers["validation/concept_red_erased"] == 0
    assert numbers["validation/concept_square_base"] == 1 and numbers["validation/concept_square_erased"] == 1
    assert "colour = red (prompts naming it)" in table and "shape = square (prompts naming it)" in table
    single, _ = _toy_table(prompts, videos, erased, "red")
    assert single["validation/concept_erased"] == 0 and "validation/concept_red_erased" not in single


def _shows(prompt: str, concept: str) -> bool:
    return re.search(rf"\b{concept}\b", prompt) is not None


def test_twins_of_concepts_erased_together_show_none_of_them():
    from lowmem_eraser.toy.prompts import prompt_pairs

    for concept, other in (("red", "square"), ("square", "red")):
        pairs = prompt_pairs(concept, erased_together=(other,))
        assert pairs and all(_shows(target, concept) for target, _ in pairs)
        assert any(_shows(target, other) for target, _ in pairs)  # e.g. the red squares
        assert not any(_shows(twin, concept) or _shows(twin, other) for _, twin in pairs)
        shipped = yaml.safe_load((ROOT / "configs" / "prompts" / f"toy_multi_{concept}.yaml").read_text())
        assert shipped == pairs
    # the other colours stay twins of the red + square pairs: every non-erased value is kept somewhere
    twins = " ".join(twin for _, twin in prompt_pairs("red", ("square",)))
    assert all(_shows(twins, colour) for colour in ("green", "blue", "yellow"))


def test_prompt_pairs_alone_are_the_shipped_single_concept_files():
    from lowmem_eraser.toy.prompts import prompt_pairs

    for concept in ("red", "square"):
        shipped = yaml.safe_load((ROOT / "configs" / "prompts" / f"toy_{concept}.yaml").read_text())
        assert prompt_pairs(concept) == prompt_pairs(concept, erased_together=()) == shipped


def test_the_shipped_multi_config_loads(monkeypatch):
    monkeypatch.chdir(ROOT)
    config = load_config("configs/toy-multi.yaml")
    assert [e.concept for e in config.concept_entries()] == ["red", "square"]

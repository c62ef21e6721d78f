import gc
import json
import weakref
from pathlib import Path

import pytest
import torch
import yaml

from lowmem_eraser import LowmemEraserError, load_erasers
from lowmem_eraser.cli import main as cli_main
from lowmem_eraser.config import TrainConfig, load_config
from lowmem_eraser.tiny import build_tiny_cogvideox
from lowmem_eraser import train as train_module
from lowmem_eraser.train import TrainingError, train

PAIRS = [
    ["a red ball moving left", "a blue ball moving left"],
    ["a red square moving up", "a green square moving up"],
    ["a small red ball drifting right", "a small yellow ball drifting right"],
    ["a red square sliding down", "a blue square sliding down"],
]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_cogvideox")
    build_tiny_cogvideox(folder / "model", [p for pair in PAIRS for p in pair], max_text_seq_length=10)
    (folder / "prompts.yaml").write_text(yaml.safe_dump(PAIRS))
    return folder


def make_config(tiny_model, out: Path, **sections) -> Path:
    config = {
        "model": str(tiny_model / "model"),
        "prompts": str(tiny_model / "prompts.yaml"),
        "concept": "red",
        "output_dir": str(out),
        "eraser": {"rank": 8},
        "loss": {"eta": 3.0, "alpha": 1.0, "beta": 1.0, "mask_threshold": 0.1},
        "sampling": {"mode": "renoise", "num_inference_steps": 4, "guidance_scale": 4.0},
        "video": {"frames": 9, "height": 64, "width": 64},
        "train": {"steps": 4, "lr": 5.0e-3, "batch_size": 1, "grad_clip": 1.0, "seed": 0, "save_every": 100,
                  "log_every": 1},
        "memory": {"quantize": "int8", "gradient_checkpointing": True, "offload": "none", "dtype": "float32",
                   "kernels": "torch"},
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values} if isinstance(values, dict) else values
    path = out.parent / f"{out.name}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def test_train_cli_end_to_end(tiny_model, tmp_path):
    config = make_config(tiny_model, tmp_path / "run")
    assert cli_main(["train", "--config", str(config), "--set", "train.steps=3", "--set", "memory.kernels=auto"]) == 0
    out = tmp_path / "run"
    for name in ("eraser_weights.pt", "eraser_config.json", "lowmem_eraser.json", "metrics.jsonl", "loss.png",
                 "config.yaml", "checkpoint/step-000003/training_state.pt"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2]
    assert all(row["peak_mem_mib"] > 0 and row["loss"] > 0 and row["loc"] >= 0 and row["pre"] >= 0 for row in rows)
    sidecar = json.loads((out / "lowmem_eraser.json").read_text())
    assert sidecar["metadata"]["concept"] == "red" and sidecar["metadata"]["config"]["train"]["steps"] == 3

    from diffusers import CogVideoXTransformer3DModel

    transformer = CogVideoXTransformer3DModel.from_pretrained(tiny_model / "model" / "transformer")
    erasers = load_erasers(transformer, out)
    assert all(adapter.up.weight.abs().sum() > 0 for adapter in erasers.values())


def _eval_velocities(tiny_model, out):
    """v(x_t, ·) of the frozen model and v'(x_t, ·) of the erased one on cached x0 re-noised at fixed t."""
    from diffusers import CogVideoXTransformer3DModel

    from lowmem_eraser import erasers_disabled

    text = next((out / "cache").glob("text-*.pt"))
    text = torch.load(text, weights_only=True)
    x0_dir = next((out / "cache").glob("x0-*"))  # one file per prompt
    x0 = torch.stack([torch.load(path, weights_only=True) for path in sorted(x0_dir.glob("*.pt"))])
    transformer = CogVideoXTransformer3DModel.from_pretrained(tiny_model / "model" / "transformer")
    load_erasers(transformer, out)
    scheduler = train_module.load_scheduler(tiny_model / "model")
    gen = torch.Generator().manual_seed(123)
    t = torch.full((x0.shape[0],), 600)
    x_t = scheduler.add_noise(x0, torch.randn(x0.shape, generator=gen), t)
    n = x0.shape[0]

    def v(embeds):
        return transformer(hidden_states=x_t, encoder_hidden_states=embeds, timestep=t, return_dict=False)[0]

    with torch.no_grad():
        with erasers_disabled(transformer):
            base_c, base_empty, base_pre = v(text["target"]), v(text["empty"].expand(n, -1, -1)), v(text["preserve"])
        erased_c, erased_pre = v(text["target"]), v(text["preserve"])
    return base_c, base_empty, base_pre, erased_c, erased_pre


def test_training_moves_the_target_toward_v_neg_and_beta_keeps_the_preservation_prompt(tiny_model, tmp_path):
    """A random tiny model barely tells "red" from "blue", so the unlearning term alone drags the preservation
    prompt along (the toy world of the bench shows real selectivity); β·L_pre must hold it near the frozen model."""
    eta, drift = 3.0, {}
    for beta in (0.0, 10.0):
        out = train(load_config(make_config(tiny_model, tmp_path / f"beta{beta}", train={"steps": 40},
                                            loss={"beta": beta})))
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        first, last = sum(r["unlearn"] for r in rows[:8]) / 8, sum(r["unlearn"] for r in rows[-8:]) / 8
        base_c, base_empty, base_pre, erased_c, erased_pre = _eval_velocities(tiny_model, out)
        v_neg = base_empty - eta * (base_c - base_empty)
        before, after = (base_c - v_neg).norm().item(), (erased_c - v_neg).norm().item()
        drift[beta] = (erased_pre - base_pre).norm().item()
        print(f"beta={beta}: unlearn loss {first:.4g} -> {last:.4g}; |v'(c) - v_neg| {before:.4g} -> {after:.4g}; "
              f"|v'(c_pre) - v(c_pre)| = {drift[beta]:.4g}")
        assert last < first
        assert after < before
    assert drift[10.0] < 0.35 * drift[0.0]


def _interrupt_at_call(monkeypatch, call_index):
    calls = {"n": 0}
    velocity = train_module.velocity

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call_index + 1:
            raise KeyboardInterrupt
        return velocity(*args, **kwargs)

    monkeypatch.setattr(train_module, "velocity", interrupting)


def test_ctrl_c_saves_and_resume_is_bit_exact(tiny_model, tmp_path, monkeypatch):
    straight = train(load_config(make_config(tiny_model, tmp_path / "straight", train={"steps": 10, "save_every": 5})))
    config = load_config(make_config(tiny_model, tmp_path / "resumed", train={"steps": 10, "save_every": 5}))
    passes_per_step = 5  # teacher c, ∅, c_pre; student c, c_pre
    with monkeypatch.context() as patch:
        _interrupt_at_call(patch, 7 * passes_per_step + 2)  # inside step 7, before its update
        assert cli_main(["train", "--config", str(tmp_path / "resumed.yaml")]) == 130  # 128 + SIGINT
    state = torch.load(tmp_path / "resumed" / "checkpoint" / "step-000007" / "training_state.pt", weights_only=True)
    assert state["step"] == 7
    assert not (tmp_path / "resumed" / "eraser_weights.pt").exists()  # an interrupted run has no final eraser
    train(config, resume=True)
    a = torch.load(straight / "eraser_weights.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "eraser_weights.pt", weights_only=True)
    for key in a:
        for inner in a[key]:
            assert torch.equal(a[key][inner], b[key][inner]), f"{key}.{inner}"
    rows = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(10))


def _nan_student(monkeypatch, every):
    calls = {"n": 0}
    velocity = train_module.velocity

    def poisoned(*args, **kwargs):
        out = velocity(*args, **kwargs)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] % every == 0:
                return out * float("nan")
        return out

    monkeypatch.setattr(train_module, "velocity", poisoned)


def test_nan_guard_skips_steps_and_aborts_after_ten_in_a_row(tiny_model, tmp_path, monkeypatch):
    _nan_student(monkeypatch, every=1)
    config = load_config(make_config(tiny_model, tmp_path / "nan", train={"steps": 20, "save_every": 5},
                                     loss={"beta": 0.0}))
    with pytest.raises(TrainingError, match="non-finite 10 steps in a row"):
        train(config)
    state = torch.load(tmp_path / "nan" / "checkpoint" / "step-000005" / "training_state.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["erasers"].values())
    assert all(t.abs().sum() == 0 for name, t in state["erasers"].items() if ".up." in name)  # never updated
    assert not (tmp_path / "nan" / "eraser_weights.pt").exists()


def test_nan_guard_lets_training_continue_after_isolated_bad_steps(tiny_model, tmp_path, monkeypatch):
    _nan_student(monkeypatch, every=2)
    out = train(load_config(make_config(tiny_model, tmp_path / "some_nan", train={"steps": 6}, loss={"beta": 0.0})))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["skipped"] for row in rows] == [False, True] * 3
    weights = torch.load(out / "eraser_weights.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for inner in weights.values() for t in inner.values())


def test_text_encoder_is_freed_after_encoding(tiny_model, tmp_path, monkeypatch):
    from transformers import T5EncoderModel

    from lowmem_eraser.text import encode_prompts

    encoders = []
    load = T5EncoderModel.from_pretrained

    def tracked(*args, **kwargs):
        model = load(*args, **kwargs)
        encoders.append(weakref.ref(model))
        return model

    monkeypatch.setattr(T5EncoderModel, "from_pretrained", tracked)
    pairs = [tuple(pair) for pair in PAIRS]
    text = encode_prompts(tiny_model / "model", pairs, "red", 10, torch.float32, torch.device("cpu"), tmp_path)
    gc.collect()
    assert len(encoders) == 1 and encoders[0]() is None
    assert text.target.shape == (4, 10, 24) and text.empty.shape == (1, 10, 24)
    assert text.concept_tokens.sum(dim=1).tolist() == [1, 1, 1, 1]
    again = encode_prompts(tiny_model / "model", pairs, "red", 10, torch.float32, torch.device("cpu"), tmp_path)
    assert len(encoders) == 1 and torch.equal(again.target, text.target)  # served from the cache


def test_one_base_copy_serves_both_kinds_of_pass(tiny_model, tmp_path):
    from lowmem_eraser import attach_erasers
    from lowmem_eraser.sampling import make_pipeline

    config = load_config(make_config(tiny_model, tmp_path / "copies"))
    gc.collect()
    existing = {id(obj) for obj in gc.get_objects() if type(obj) in (torch.Tensor, torch.nn.Parameter)}
    transformer = train_module.load_transformer(config, torch.float32, torch.device("cpu"))
    attach_erasers(transformer, rank=8)
    pipe = make_pipeline(transformer, train_module.load_scheduler(config.model))
    own = [*transformer.parameters(), *transformer.buffers()]
    own_storages = {t.untyped_storage().data_ptr() for t in own}
    signatures = {(tuple(t.shape), t.dtype) for t in own if t.numel() > 64}
    gc.collect()
    foreign = [
        obj for obj in gc.get_objects()
        if type(obj) in (torch.Tensor, torch.nn.Parameter) and (tuple(obj.shape), obj.dtype) in signatures
        and obj.untyped_storage().data_ptr() not in own_storages and id(obj) not in existing
    ]
    assert pipe.transformer is transformer
    assert len(own_storages) == len({id(t) for t in own})  # no two base tensors share or duplicate storage
    assert foreign == []


def test_trajectory_sampling_and_cpu_offload_notice(tiny_model, tmp_path, caplog):
    config = make_config(tiny_model, tmp_path / "traj", sampling={"mode": "trajectory"}, train={"steps": 2},
                         memory={"offload": "blocks", "offload_activations": True})
    with caplog.at_level("INFO", logger="lowmem_eraser"):
        out = train(load_config(config))
    assert "memory.offload: all needs CUDA" in caplog.text
    assert "memory.offload_activations needs CUDA" in caplog.text
    assert not list((out / "cache").glob("x0-*"))  # trajectory never builds the x0 cache
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_resume_without_checkpoint_is_a_clear_error(tiny_model, tmp_path):
    with pytest.raises(LowmemEraserError, match="no checkpoint to resume from"):
        train(load_config(make_config(tiny_model, tmp_path / "fresh")), resume=True)


def test_learning_rate_warmup_then_constant_or_cosine():
    from lowmem_eraser.config import TrainLoopConfig
    from lowmem_eraser.train import lr_factor

    constant = TrainLoopConfig(steps=10, warmup_steps=4, lr_schedule="constant")
    assert [lr_factor(constant, s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = TrainLoopConfig(steps=10, warmup_steps=2, lr_schedule="cosine")
    factors = [lr_factor(cosine, s) for s in range(10)]
    assert factors[:3] == [0.5, 1.0, 1.0]
    assert all(a > b for a, b in zip(factors[2:], factors[3:])) and factors[-1] > 0
    assert lr_factor(cosine, 10) == pytest.approx(0.0)


def test_clean_latents_do_not_depend_on_the_sampling_batch_size(tiny_model, tmp_path):
    from lowmem_eraser import attach_erasers
    from lowmem_eraser.config import SamplingConfig
    from lowmem_eraser.sampling import generate_clean_latents, make_pipeline
    from lowmem_eraser.text import encode_prompts

    config = load_config(make_config(tiny_model, tmp_path / "x0"))
    cpu = torch.device("cpu")
    text = encode_prompts(config.model, PAIRS, "red", 10, torch.float32, cpu, tmp_path / "cache")
    transformer = train_module.load_transformer(config, torch.float32, cpu)
    attach_erasers(transformer, rank=8)
    pipe = make_pipeline(transformer, train_module.load_scheduler(config.model))
    pipe.set_progress_bar_config(disable=True)
    one, batched = (
        generate_clean_latents(pipe, text.target, text.empty, config.video,
                               SamplingConfig(num_inference_steps=4, guidance_scale=4.0, batch_size=size), 7, cpu)
        for size in (1, 3)
    )
    assert one.shape == (4, 3, 4, 8, 8)
    torch.testing.assert_close(batched, one, rtol=1e-4, atol=1e-5)  # same noise per prompt; only GEMM order differs
    assert not torch.allclose(one[0], one[1])  # each prompt has its own noise


@pytest.mark.parametrize("anchor", ["empty", "preservation"])
def test_unlearning_target_starts_from_the_configured_anchor(anchor):
    from conftest import randomize_erasers, tiny_transformer
    from lowmem_eraser import attach_erasers, erasers_disabled
    from lowmem_eraser.config import LossConfig
    from lowmem_eraser.train import StepInputs, eraser_losses_backward, velocity

    transformer = tiny_transformer()
    erasers = attach_erasers(transformer, rank=4)
    randomize_erasers(erasers)
    gen = torch.Generator().manual_seed(3)
    x_t = torch.randn(2, 3, 4, 8, 8, generator=gen)
    t = torch.tensor([100, 700])
    c, empty, c_pre = (torch.randn(2, 7, 24, generator=gen) for _ in range(3))
    loss = LossConfig(eta=2.5, alpha=0.0, beta=0.5, anchor=anchor)
    terms = eraser_losses_backward(transformer, erasers, StepInputs(x_t, t, c, empty, c_pre, None, None, 3), loss)

    with torch.no_grad():
        with erasers_disabled(transformer):
            v_c, v_empty, v_pre = (velocity(transformer, x_t, t, text, None) for text in (c, empty, c_pre))
        v_anchor = v_pre if anchor == "preservation" else v_empty
        v_neg = v_anchor - loss.eta * (v_c - v_anchor)
        unlearn = (velocity(transformer, x_t, t, c, None) - v_neg).pow(2).mean()
        pre = (velocity(transformer, x_t, t, c_pre, None) - v_pre).pow(2).mean()
    torch.testing.assert_close(terms["unlearn"], unlearn, rtol=1e-5, atol=0)
    torch.testing.assert_close(terms["pre"], pre, rtol=1e-5, atol=0)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in erasers.parameters())

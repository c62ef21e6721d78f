"""The soft-prompt attack (attack.py), adversarial training (loss.adversarial) and `lowmem-eraser attack`."""

import json
from pathlib import Path

import pytest
import torch

from conftest import randomize_erasers, tiny_transformer
from lowmem_eraser import attach_erasers, erasers_disabled
from lowmem_eraser.attack import (MAX_STEPS, AdversarialPrompts, AttackError, SoftPrompt, check_soft_prompt, learn_soft_prompt,
                                  with_soft_prompt)
from lowmem_eraser.cli import main as cli_main
from lowmem_eraser.config import AdversarialConfig, LossConfig
from lowmem_eraser.errors import ConfigError
from lowmem_eraser.train import StepInputs, TrainingError, eraser_losses_backward, velocity
from test_train import make_config, tiny_model  # noqa: F401  (the session fixture)

TOY = Path(__file__).resolve().parents[1] / "models" / "toy"


def _tiny(dtype=torch.float64):
    transformer = tiny_transformer().to(dtype)
    erasers = attach_erasers(transformer, rank=4)
    randomize_erasers(erasers)
    erasers.to(dtype)
    gen = torch.Generator().manual_seed(3)
    x_t = torch.randn(2, 3, 4, 8, 8, generator=gen, dtype=dtype)
    t = torch.tensor([100, 700])
    c, empty, c_pre = (torch.randn(2, 7, 24, generator=gen, dtype=dtype) for _ in range(3))
    return transformer, erasers, x_t, t, c, empty, c_pre


def test_soft_prompt_takes_the_last_positions_and_nothing_else():
    text = torch.arange(2 * 7 * 3, dtype=torch.float32).reshape(2, 7, 3)
    soft = torch.full((2, 2, 3), -1.0)
    out = with_soft_prompt(text, soft)
    assert out.shape == text.shape
    assert torch.equal(out[:, :5], text[:, :5]) and torch.equal(out[:, 5:], soft)


@pytest.mark.parametrize("tokens, steps, field", [(0, 10, "--tokens"), (8, 10, "--tokens"), (True, 10, "--tokens"),
                                                  (2, 0, "--steps"), (2, MAX_STEPS + 1, "--steps")])
def test_out_of_range_vectors_or_steps_are_one_error_naming_the_field(tokens, steps, field):
    with pytest.raises(AttackError, match=f"^{field}: expected"):
        check_soft_prompt(tokens, steps, text_length=7)
    check_soft_prompt(7, MAX_STEPS, text_length=7)  # the edges are allowed: all positions, the most steps


def test_attack_moves_only_its_vectors_and_pulls_the_erased_prediction_to_the_original():
    transformer, erasers, x_t, t, c, _, _ = _tiny()
    before = {name: p.detach().clone() for name, p in erasers.named_parameters()}
    with torch.no_grad(), erasers_disabled(transformer):
        target = velocity(transformer, x_t, t, c, None)
    soft, losses = learn_soft_prompt(transformer, c, SoftPrompt(tokens=3, steps=40, lr=0.1), lambda i: (x_t, t, target))
    assert soft.shape == (2, 3, 24) and len(losses) == 40
    losses = [loss.item() for loss in losses]
    assert losses[-1] < 0.75 * losses[0]  # measured 0.52x: three free positions of seven pull the erased prediction
    # toward the original one (not to it: the tiny random erasers act on every position)
    for name, p in erasers.named_parameters():  # the erasers are the attacked model: never changed, no .grad
        assert p.grad is None and torch.equal(p, before[name]), name
    assert not torch.equal(soft, c[:, 4:].float())


def test_attack_on_the_model_it_imitates_starts_at_zero_loss():
    """Step 0 is 'no attack': the vectors start as the prompt's own values, so a model attacked toward its own
    prediction starts at the target (to rounding: with grad on, attention may take another kernel)."""
    transformer, _, x_t, t, c, _, _ = _tiny()
    with torch.no_grad(), erasers_disabled(transformer):
        target = velocity(transformer, x_t, t, c, None)
        _, losses = learn_soft_prompt(transformer, c, SoftPrompt(2, 1), lambda i: (x_t, t, target))
    assert losses[0].item() < 1e-15  # fp64; the prediction's mean square is ~1


@pytest.mark.parametrize("adversarial_eta, own_latents, anchor, step_eta", [
    (None, False, "preservation", 2.0), (0.0, False, "preservation", 2.0), (None, True, "preservation", 2.0),
    (0.0, True, "preservation", 2.0), (None, True, "empty", (2.0, 3.0))],
    ids=["step-eta", "own-eta", "own-latents", "own-latents-own-eta", "own-latents-empty-anchor-eta-per-sample"])
def test_adversarial_step_adds_exactly_the_weighted_loss_under_the_learned_vectors(adversarial_eta, own_latents,
                                                                                    anchor, step_eta):
    """fp64 model (v_neg in fp32, as the step makes it): the adversarial step's adapter gradients = the plain step's
    + weight x the gradient of ‖v_θ'(x_a, [c; s]) − v_neg(x_a)‖² with s from the same inner loop (which itself
    leaves no gradient behind) run at x_a too; x_a = `adversarial.x_t` when given (trajectory runs: the original
    model's samples noised at the step's t), else the step's x_t; v_neg from the step's anchor, with
    loss.adversarial.eta when it is set, else the step's eta (one per sample here in the last case). The plain
    terms stay at the step's x_t."""
    transformer, erasers, x_t, t, c, empty, c_pre = _tiny()
    x_a = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(9), dtype=x_t.dtype) if own_latents else x_t
    spec = AdversarialConfig(every=1, tokens=2, inner_steps=5, weight=0.7, lr=0.1, eta=adversarial_eta)
    loss = LossConfig(eta=2.0, alpha=0.0, beta=0.5, anchor=anchor, adversarial=spec)
    per_sample = torch.tensor(step_eta) if isinstance(step_eta, tuple) else None
    attack = AdversarialPrompts(SoftPrompt(2, 5, 0.1), start=c[:, 5:] + 0.1,  # as if a visit before moved them
                                x_t=x_a if own_latents else None)
    terms = eraser_losses_backward(transformer, erasers, StepInputs(x_t, t, c, empty, c_pre, None, None, 3,
                                                                        eta=per_sample, adversarial=attack), loss)
    got = [p.grad.clone() for p in erasers.parameters()]

    erasers.zero_grad(set_to_none=True)
    plain = eraser_losses_backward(transformer, erasers, StepInputs(x_t, t, c, empty, c_pre, None, None, 3,
                                                                        eta=per_sample), loss)
    with torch.no_grad(), erasers_disabled(transformer):
        v_c = velocity(transformer, x_a, t, c, None)
        v_anchor = velocity(transformer, x_a, t, c_pre if anchor == "preservation" else empty, None)
    soft, _ = learn_soft_prompt(transformer, c, SoftPrompt(2, 5, 0.1), lambda i: (x_a, t, v_c), start=c[:, 5:] + 0.1)
    assert torch.equal(attack.learned, soft)
    eta = adversarial_eta if adversarial_eta is not None else (
        per_sample.float().view(-1, 1, 1, 1, 1) if per_sample is not None else loss.eta)
    v_neg = v_anchor.float() - eta * (v_c.float() - v_anchor.float())  # fp32 like the step (η amplifies rounding)
    adv = (velocity(transformer, x_a, t, with_soft_prompt(c, soft), None).float() - v_neg).pow(2).mean()
    (spec.weight * adv).backward()
    for g, p in zip(got, erasers.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-6, atol=1e-10)  # the losses are fp32 (1.6e-7 measured)
    torch.testing.assert_close(terms["adv"], adv.detach(), rtol=1e-9, atol=0)
    for name in ("unlearn", "pre"):
        assert torch.equal(terms[name], plain[name])
    torch.testing.assert_close(terms["loss"], plain["loss"] + spec.weight * adv.detach(), rtol=1e-9, atol=0)
    assert plain["adv"] == 0


@pytest.mark.parametrize("mode", ["trajectory", "renoise"])
def test_adversarial_term_draws_the_original_samples_noised_at_the_steps_t(tiny_model, tmp_path, monkeypatch,
                                                                          mode):  # noqa: F811
    """Trajectory runs: the step's x_t is the erased model's own denoising state (here a stand-in that draws
    nothing), the adversarial term's latents are the cached x0 of the same prompts noised at the same t with the
    next draws of the run's generator (replayed exactly). Renoise runs: the step's x_t is such a state already and
    the term shares it (no latents of its own, no extra draws)."""
    from lowmem_eraser import runfolder
    from lowmem_eraser import train as train_module
    from lowmem_eraser.config import load_config
    from lowmem_eraser.sampling import noise_at

    stand_in = torch.randn(4, 3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(train_module, "trajectory",
                        lambda *args, **kwargs: (stand_in.clone(), torch.full((4,), 101, dtype=torch.long)))
    config = load_config(make_config(tiny_model, tmp_path / "run", sampling={"mode": mode},
                                     loss={"adversarial": {"every": 2, "tokens": 2, "inner_steps": 1}},
                                     train={"batch_size": 4}))
    out = Path(config.output_dir)
    lock = runfolder.prepare(out, False, False)
    try:
        with runfolder.StopSignals() as signals:
            session = train_module.setup(config, False, out, signals)
            plain, _ = train_module.draw_batch(session, 1)
            state = session.generator.get_state()
            batch, index = train_module.draw_batch(session, 2)
    finally:
        lock.release()
    assert plain.adversarial is None and batch.adversarial is not None
    if mode == "renoise":
        assert batch.adversarial.x_t is None
        return
    replay = torch.Generator().manual_seed(0)
    replay.set_state(state)
    assert torch.equal(train_module.draw_pairs(session.sizes, 4, replay), index)
    expected = noise_at(session.transformers[0], session.scheduler, session.x0[index], batch.t, replay,
                        config.sampling.num_inference_steps)
    assert torch.equal(batch.x_t, stand_in) and (batch.t == 101).all()
    assert torch.equal(batch.adversarial.x_t, expected)
    alpha = session.scheduler.alphas_cumprod[101].double()  # DDIM: x_a = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε
    eps = (expected.double() - alpha.sqrt() * session.x0[index].double()) / (1 - alpha).sqrt()
    assert abs(eps.mean()) < 0.1 and abs(eps.std() - 1) < 0.1


def test_adversarial_config_ranges_name_the_field(tiny_model, tmp_path):  # noqa: F811
    from lowmem_eraser.config import load_config

    good = make_config(tiny_model, tmp_path / "run", loss={"adversarial": {"every": 2, "tokens": 3}})
    assert load_config(good).loss.adversarial == AdversarialConfig(every=2, tokens=3)
    for values, field in (({"every": 1, "tokens": 11}, "loss.adversarial.tokens"),  # tiny model: 10 positions
                          ({"every": 1, "inner_steps": MAX_STEPS + 1}, "loss.adversarial.inner_steps"),
                          ({"every": -1}, "loss.adversarial.every"), ({"tokens": 0}, "loss.adversarial.tokens"),
                          ({"often": 1}, "loss.adversarial.often")):
        path = make_config(tiny_model, tmp_path / "bad", loss={"adversarial": values})
        with pytest.raises(ConfigError, match=f"^{field}: "):
            load_config(path)


def test_adversarial_training_logs_the_term_on_its_steps_only(tiny_model, tmp_path):  # noqa: F811
    config = make_config(tiny_model, tmp_path / "run", loss={"adversarial": {"every": 2, "tokens": 2, "inner_steps": 2}})
    assert cli_main(["train", "--config", str(config)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["adv"] > 0 for row in rows] == [True, False, True, False]


@pytest.mark.skipif(not (TOY / "transformer").is_dir(), reason="models/toy not built")
def test_toy_attack_report(tmp_path):
    """The toy attack end to end on an untrained eraser (zero `up`: the eraser IS the base), at tiny settings:
    attacked toward its own predictions, both runs start at zero loss and report the same rates."""
    from lowmem_eraser.serialization import save_erasers
    from lowmem_eraser.toy.attack import evaluate_attack, write_attack_report

    from diffusers import CogVideoXTransformer3DModel

    transformer = CogVideoXTransformer3DModel.from_pretrained(TOY / "transformer")
    save_erasers(attach_erasers(transformer, rank=4), tmp_path / "eraser")
    result = evaluate_attack(TOY, tmp_path / "eraser", ["red"], SoftPrompt(2, 2), steps=2, seed=0, kernels="torch")
    red = result["per_concept"]["red"]
    assert red["prompts"] == 24  # 8 red combinations x 3 held-out phrasings
    assert red["attack_loss_first_base"] < 1e-9 and red["attack_loss_first_erased"] < 1e-9  # fp32 rounding
    assert red["asr_base"] == red["asr_erased"] and red["rate_no_attack_base"] == red["rate_no_attack_erased"]
    json_path, md_path = write_attack_report(result, tmp_path)
    assert json.loads(json_path.read_text())["tokens"] == 2 and "| red | 24 |" in md_path.read_text()


def test_attack_cli_checks_arguments_before_any_work(tiny_model, tmp_path, capsys):  # noqa: F811
    config = make_config(tiny_model, tmp_path / "run")
    assert cli_main(["attack", "--config", str(config), "--eraser", str(tmp_path / "none"), "--tokens", "11"]) == 2
    assert "--tokens: expected 1..10 vectors" in capsys.readouterr().err
    assert cli_main(["attack", "--config", str(config), "--eraser", str(tmp_path / "none"), "--steps", "0"]) == 2
    assert "--steps: expected 1..10000" in capsys.readouterr().err
    assert cli_main(["attack", "--config", str(config), "--eraser", str(tmp_path / "none")]) == 2
    assert str(tmp_path / "none") in capsys.readouterr().err


def test_adversarial_vectors_are_checkpointed_and_resume_is_bit_exact(tiny_model, tmp_path):  # noqa: F811
    """4 adversarial steps straight = 2 steps, then --resume to 4: each prompt's vectors travel in the checkpoint
    (resuming with other vectors trains another eraser: the test can tell; without them, a clear error)."""
    import shutil

    from lowmem_eraser.config import load_config
    from lowmem_eraser.train import train

    adversarial = {"adversarial": {"every": 1, "tokens": 3, "inner_steps": 2}}

    def config(name, steps):
        # batch 4 drawn from the 4 pairs: the steps after the resume revisit prompts the steps before it moved
        return load_config(make_config(tiny_model, tmp_path / name, loss=adversarial,
                                       train={"steps": steps, "batch_size": 4}))

    straight = train(config("straight", 4))
    train(config("resumed", 2))
    state_path = tmp_path / "resumed" / "checkpoint" / "step-000002" / "training_state.pt"
    state = torch.load(state_path, weights_only=True)
    assert state["adversarial_vectors"].shape == (4, 3, 24)  # 4 prompt pairs, 3 vectors of the text dim
    shutil.copytree(tmp_path / "resumed", tmp_path / "forgetful")
    state["adversarial_vectors"] = torch.zeros_like(state["adversarial_vectors"])
    torch.save(state, tmp_path / "forgetful" / "checkpoint" / "step-000002" / "training_state.pt")
    resumed = train(config("resumed", 4), resume=True)
    forgetful = train(config("forgetful", 4), resume=True)
    shutil.copytree(tmp_path / "resumed", tmp_path / "damaged")
    del state["adversarial_vectors"]
    torch.save(state, tmp_path / "damaged" / "checkpoint" / "step-000004" / "training_state.pt")
    with pytest.raises(TrainingError, match="^--resume: the checkpoint has no adversarial vectors"):
        train(config("damaged", 6), resume=True)

    def weights(folder):
        return torch.load(folder / "eraser_weights.pt", weights_only=True)

    a, b, c = weights(straight), weights(resumed), weights(forgetful)
    assert all(torch.equal(a[key][inner], b[key][inner]) for key in a for inner in a[key])
    assert not all(torch.equal(a[key][inner], c[key][inner]) for key in a for inner in a[key])

"""The eraser checkpoint replay is installed through diffusers' public API, and its absence is refused."""

import re
from pathlib import Path

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from conftest import randomize_erasers, run
from lowmem_eraser import LowmemEraserError, attach_erasers, detach_erasers, erasers_disabled, get_erasers
from lowmem_eraser.adapter import DIFFUSERS_CHECKPOINT_FUNC_MIN


@pytest.fixture
def spy(monkeypatch, transformer):
    """Records the keyword arguments of every `enable_gradient_checkpointing` call, then forwards it."""
    calls = []
    cls = type(transformer)
    original = cls.enable_gradient_checkpointing

    def enable_gradient_checkpointing(self, *args, **kwargs):
        calls.append((args, kwargs))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "enable_gradient_checkpointing", enable_gradient_checkpointing)
    return calls


def _backward_through_localization(transformer, inputs):
    erasers = get_erasers(transformer)
    transformer.train()
    mask = (torch.arange(48) % 3 == 0).float()[None]
    with erasers.collecting_localization(mask) as terms:
        out = run(transformer, inputs)
    loss = out.square().mean() + torch.stack(terms).mean()
    with erasers_disabled(transformer):  # toggled between forward and backward: only the replay survives it
        loss.backward()
    return [p.grad for p in erasers.parameters()]


def test_attach_installs_the_replay_through_the_public_api(transformer, inputs, spy):
    transformer.enable_gradient_checkpointing()  # train.py / plan.py order: checkpointing before attach
    spy.clear()
    erasers = attach_erasers(transformer, rank=4)
    assert spy == [((), {"gradient_checkpointing_func": erasers.checkpoint})]
    assert transformer._gradient_checkpointing_func == erasers.checkpoint
    randomize_erasers(erasers)
    assert all(g is not None and g.abs().sum() > 0 for g in _backward_through_localization(transformer, inputs))
    assert len(spy) == 1  # already in place at forward: not installed again


def test_forward_hook_upgrades_plain_checkpointing_enabled_after_attach(transformer, inputs, spy):
    erasers = attach_erasers(transformer, rank=4)
    assert spy == []  # checkpointing off: nothing to install
    transformer.enable_gradient_checkpointing()
    assert transformer._gradient_checkpointing_func != erasers.checkpoint
    randomize_erasers(erasers)
    grads = _backward_through_localization(transformer, inputs)
    assert spy[-1] == ((), {"gradient_checkpointing_func": erasers.checkpoint})
    assert transformer._gradient_checkpointing_func == erasers.checkpoint
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_no_replay_is_installed_without_checkpointing(transformer, inputs, spy):
    attach_erasers(transformer, rank=4)
    run(transformer, inputs).sum().backward()
    assert spy == [] and not transformer.gradient_checkpointing


def test_detach_restores_diffusers_default_through_the_public_api(transformer, inputs, spy):
    transformer.enable_gradient_checkpointing()
    erasers = attach_erasers(transformer, rank=4)
    spy.clear()
    detach_erasers(transformer)
    assert spy == [((), {})]  # plain enable_gradient_checkpointing(): diffusers' own default
    assert transformer.gradient_checkpointing
    assert transformer._gradient_checkpointing_func != erasers.checkpoint
    assert transformer._gradient_checkpointing_func.__module__.startswith("diffusers.")
    transformer.train()
    run(transformer, inputs).sum().backward()  # plain model, default checkpointing


def test_detach_leaves_checkpointing_off_when_it_was_off(transformer, spy):
    attach_erasers(transformer, rank=4)
    detach_erasers(transformer)
    assert spy == [] and not transformer.gradient_checkpointing


def _not_replaying(module, *args):
    return checkpoint(module.__call__, *args, use_reentrant=False)


@pytest.mark.parametrize("how", ["public_api", "attribute"])
def test_swapped_checkpointing_function_is_refused_at_forward(transformer, inputs, how):
    transformer.enable_gradient_checkpointing()
    attach_erasers(transformer, rank=4)
    if how == "public_api":
        transformer.enable_gradient_checkpointing(gradient_checkpointing_func=_not_replaying)
    else:
        transformer._gradient_checkpointing_func = _not_replaying
    transformer.train()
    with pytest.raises(LowmemEraserError, match=r"_not_replaying.*not the eraser replay.*gradient_checkpointing_func"):
        run(transformer, inputs)


def test_swapped_function_is_refused_at_attach(transformer):
    transformer.enable_gradient_checkpointing(gradient_checkpointing_func=_not_replaying)
    with pytest.raises(LowmemEraserError, match="not the eraser replay"):
        attach_erasers(transformer, rank=4)
    assert get_erasers(transformer) is None


def _old_diffusers(monkeypatch, cls):
    """diffusers 0.32.x: `enable_gradient_checkpointing(self)`, no `_gradient_checkpointing_func` at all."""

    def enable_gradient_checkpointing(self):
        self.gradient_checkpointing = True

    monkeypatch.setattr(cls, "enable_gradient_checkpointing", enable_gradient_checkpointing)


def test_old_diffusers_is_refused_at_attach_with_the_version_and_the_fix(transformer, monkeypatch):
    _old_diffusers(monkeypatch, type(transformer))
    del transformer._gradient_checkpointing_func
    transformer.enable_gradient_checkpointing()
    with pytest.raises(LowmemEraserError, match=rf"diffusers>={DIFFUSERS_CHECKPOINT_FUNC_MIN}.*pip install"):
        attach_erasers(transformer, rank=4)


def test_old_diffusers_is_refused_at_forward(transformer, inputs, monkeypatch):
    _old_diffusers(monkeypatch, type(transformer))
    del transformer._gradient_checkpointing_func
    attach_erasers(transformer, rank=4)  # checkpointing off: fine
    transformer.enable_gradient_checkpointing()
    transformer.train()
    with pytest.raises(LowmemEraserError, match=rf"needs diffusers>={DIFFUSERS_CHECKPOINT_FUNC_MIN}"):
        run(transformer, inputs)


def test_replay_that_does_not_take_is_refused(transformer, inputs, monkeypatch):
    """The public call accepts the function but does not install it: refused, never patched privately."""
    attach_erasers(transformer, rank=4)
    transformer.enable_gradient_checkpointing()
    monkeypatch.setattr(type(transformer), "enable_gradient_checkpointing", lambda self, **kwargs: None)
    transformer.train()
    with pytest.raises(LowmemEraserError, match="did not take"):
        run(transformer, inputs)


def test_pyproject_lower_bound_has_the_public_api():
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert re.findall(r'"diffusers>=([0-9.]+)"', pyproject) == [DIFFUSERS_CHECKPOINT_FUNC_MIN]

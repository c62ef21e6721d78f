"""White-box soft-prompt attacks on an eraser: the adversary of `lowmem-eraser attack` and of adversarial training.

The attack (UnlearnDiffAtk / "circumventing concept erasure", in embedding space): K continuous vectors take the
place of the LAST K positions of a target prompt's text condition, the transformer's text input after the text
encoder (so it is the same for every family whose condition is a plain [B, L, D] tensor: CogVideoX pads with T5's
outputs, Wan with zeros, and neither masks those positions). K = L (`lowmem-eraser attack`'s default) rewrites the
whole condition, starting from the prompt's: the strongest attack a text input allows, what a prompt could at
best do through a contextual encoder, where every added word changes every position. K < L leaves the first
L − K positions as the prompt made them: appended tokens. Only the vectors are optimised (Adam), so that the
ERASED model's prediction at x_t equals the ORIGINAL model's prediction for the unmodified prompt at the same x_t:

    min_s  E_{x_t, t} ‖v_θ'(x_t, [c_{:L−K}; s]) − v_θ(x_t, c)‖²

i.e. the vectors that make the eraser reproduce the concept as the original model draws it, at every noise
level. A perfect eraser leaves no such s. The vectors start as the prompt's own values, so step 0 is "no
attack". With K ≤ L − (prompt tokens) they sit in the padding after the prompt (the toy world's longest prompt has
11 of 16 tokens; CogVideoX's real prompts rarely fill 226) and the prompt's words stay as they are.

What it does not model: an attacker without the weights (black-box, discrete tokens: UnlearnDiffAtk's own token
search is weaker than this); vectors no text encoder can produce (an upper bound on what any prompt can do);
HunyuanVideo (its text condition is masked after the prompt, so the vectors would need mask positions too).

Gradients reach only the vectors (`torch.autograd.grad`): the erasers' parameters and their `.grad` are
untouched, so the inner loop of adversarial training can run between a step's passes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import AttackError  # noqa: F401  (importable from here too)

MAX_STEPS = 10_000  # an attack or inner loop longer than this is a typo, not a setting


@dataclass(frozen=True)
class SoftPrompt:
    """`tokens` vectors in the last positions of the text condition, `steps` Adam steps of size `lr` x the
    condition's RMS (so the step means the same on T5's and UMT5's scales)."""

    tokens: int
    steps: int
    lr: float = 0.1


@dataclass
class AdversarialPrompts:
    """One training step's adversarial inner loop (train.eraser_losses_backward): `spec`, and `start` [B, K, D],
    the vectors it starts from (None: the prompts' own values). The step sets `learned` [B, K, D]. Adversarial
    training keeps each prompt's vectors from one visit to the next, so the inner loop's few steps add up to an
    attack as long as the evaluation's over the run (persistent perturbations, as in "free" adversarial training).
    `x_t`: the latents the inner loop and the adversarial term work on, at the step's timesteps (the training loop
    in trajectory runs: the original model's samples of the prompts noised there, the kind of state the attack
    works on); None: the step's own x_t."""

    spec: SoftPrompt
    start: torch.Tensor | None = None
    learned: torch.Tensor | None = None
    x_t: torch.Tensor | None = None


def check_soft_prompt(tokens: int, steps: int, text_length: int, tokens_field: str = "--tokens",
                      steps_field: str = "--steps") -> None:
    """One AttackError naming the field when K or S is out of range for a text condition of `text_length`."""
    if isinstance(tokens, bool) or not isinstance(tokens, int) or not 1 <= tokens <= text_length:
        raise AttackError(f"{tokens_field}: expected 1..{text_length} vectors (the text condition has "
                          f"{text_length} positions), got {tokens!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise AttackError(f"{steps_field}: expected 1..{MAX_STEPS} optimisation steps, got {steps!r}")


def require_tensor_condition(text, family: str) -> None:
    if not isinstance(text, torch.Tensor):
        raise AttackError(f"soft-prompt attacks work on a [B, L, D] text condition; {family}'s is a "
                          f"{type(text).__name__} (masked after the prompt), which is not supported yet")


def with_soft_prompt(text: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """The text condition [B, L, D] with its last K positions replaced by `soft` [B, K, D]."""
    return torch.cat([text[:, : text.shape[1] - soft.shape[1]], soft.to(text.dtype)], dim=1)


def learn_soft_prompt(transformer, text: torch.Tensor, spec: SoftPrompt,
                      batch: Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                      extras=None, activations=None, start: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam on the last `spec.tokens` positions of `text` [B, L, D] through `transformer` as it is (erasers as
    they are switched; the caller decides). `batch(i)` gives step i's (x_t, t, v_target) for the B prompts;
    v_target is what the prediction should become. Returns the vectors [B, K, D] (detached, fp32) and the
    per-step losses [S] (a tensor: no host sync per step). `activations`: the training's activation context
    (e.g. offloading), entered per pass. `start` [B, K, D]: where the vectors start (default: the prompt's own
    values there).

    The vectors are start + RMS(text)·δ with Adam on δ: a step of `spec.lr` means the same on every encoder's
    scale, and no value is read back to the host (the planner runs this on fake tensors). The RMS is each
    prompt's own and so is its loss, so that a prompt's vectors do not depend on the prompts it is batched with (a
    multi-process run splits the batch). The losses returned are the batch's mean."""
    from .sampling import runtime_of

    require_tensor_condition(text, type(transformer).__name__)
    check_soft_prompt(spec.tokens, max(spec.steps, 1), text.shape[1], "tokens", "steps")  # 0 steps: the planner's
    runtime = runtime_of(transformer)
    keep = text.shape[1] - spec.tokens
    start = (text[:, keep:] if start is None else start.to(text.device)).detach().float()
    if start.shape != (text.shape[0], spec.tokens, text.shape[2]):
        raise AttackError(f"start: expected vectors of shape {(text.shape[0], spec.tokens, text.shape[2])}, got "
                          f"{tuple(start.shape)}")
    scale = text.detach().float().pow(2).mean(dim=(1, 2), keepdim=True).sqrt().clamp_min(1e-6)  # [B, 1, 1]
    delta = torch.zeros_like(start, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=spec.lr)
    saving = activations if activations is not None else contextlib.nullcontext()
    losses = torch.zeros(spec.steps, device=text.device)
    with torch.enable_grad():
        for i in range(spec.steps):
            x_t, t, v_target = batch(i)
            with saving:
                v = runtime.velocity(transformer, x_t, t, with_soft_prompt(text, start + scale * delta), extras)
            # each prompt's own mean error, summed: its vectors' gradient does not depend on the batch size
            # (Adam is not scale-free where gradients are near its eps)
            per_prompt = (v.float() - v_target.float()).pow(2).flatten(1).mean(1)
            (delta.grad,) = torch.autograd.grad(per_prompt.sum(), [delta])
            optimizer.step()
            loss = per_prompt.detach().mean()
            losses[i] = loss
            del v, loss
    return (start + scale * delta).detach(), losses

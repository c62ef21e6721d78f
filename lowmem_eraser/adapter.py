"""Eraser adapters on a diffusers video transformer, attached by forward hooks where its family puts them.

The published T2VUnlearning code wraps the attention (CogVideoX `attn1`) in a new module, which renames every
base weight. A forward hook on the attention gives the same numbers, keeps the base state dict untouched and
can be removed again. Where the adapter goes in each model family is data in `families/`.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import LowmemEraserError
from .families import family_of
from .kernels import eraser_adapter, eraser_adapter_reference, triton_available
from .localization import localization_loss

_ATTR = "_lowmem_erasers"  # plain attribute on the transformer: never a registered submodule


class EraserAdapter(nn.Module):
    """The published residual adapter: `x + up(GELU(down(x)))`, exact erf GELU, `up` zero-initialised."""

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.down = nn.Linear(dim, rank)
        self.act = nn.GELU()
        self.up = nn.Linear(rank, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """`up(GELU(down(x)))` computed in x's dtype from the fp32 master weights (casts are differentiable)."""
        return eraser_adapter_reference(x, self.down.weight, self.down.bias, self.up.weight, self.up.bias, residual=False)


class EraserSet(nn.ModuleDict):
    """Adapters keyed by their published names (`transformer_blocks.{i}.attn1.adapter`).

    Stored as nested modules so that `state_dict()` keys are exactly the flat published keys
    (`transformer_blocks.0.attn1.adapter.down.weight`, ...). Also holds the runtime switches that every
    hook reads: `enabled` (False for the frozen "original" pass) and `scale` (inference strength).
    """

    def __init__(self, adapters: dict[str, EraserAdapter]):
        super().__init__()
        self._names = list(adapters)
        for name, adapter in adapters.items():
            *path, leaf = name.split(".")
            parent: nn.Module = self
            for part in path:
                if part not in parent._modules:
                    parent.add_module(part, nn.ModuleDict())
                parent = parent._modules[part]
            parent.add_module(leaf, adapter)
        self.enabled = True
        self.scale = 1.0
        self.kernels = "auto"  # auto | triton | torch: which implementation the hooks run
        self.localization_mask: torch.Tensor | None = None  # [B, N_video] concept mask M while L_loc is collected
        self.localization_terms: list[torch.Tensor] = []
        self.recomputing = False  # True while checkpoint recomputation replays a block

    def __getitem__(self, name: str) -> EraserAdapter:
        if name not in self._names:
            raise KeyError(name)
        return self.get_submodule(name)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def keys(self):
        return list(self._names)

    def values(self):
        return [self[name] for name in self._names]

    def items(self):
        return [(name, self[name]) for name in self._names]

    @property
    def dim(self) -> int:
        return self.values()[0].down.in_features

    @property
    def rank(self) -> int:
        return self.values()[0].down.out_features

    @property
    def family(self) -> str:
        """The model family whose published keys these are (families/), e.g. "CogVideoX"."""
        from .errors import EraserFormatError
        from .families import family_of_key

        names = {getattr(family_of_key(key), "name", None) for key in self._names}
        if len(names) != 1 or None in names:
            raise EraserFormatError(f"these erasers are not the keys of one model family: {sorted(map(str, names))} "
                                    f"(first key {self._names[0] if self._names else None!r})")
        return names.pop()

    def switches(self) -> dict:
        """The runtime switches every hook reads; snapshotted at forward, replayed at recomputation."""
        return {"enabled": self.enabled, "scale": self.scale, "localization_mask": self.localization_mask}

    @contextlib.contextmanager
    def replaying(self, switches: dict, recomputing: bool = False):
        """Temporarily set the runtime switches (the frozen pass, checkpoint recomputation)."""
        saved, saved_recomputing = self.switches(), self.recomputing
        for name, value in switches.items():
            setattr(self, name, value)
        self.recomputing = recomputing
        try:
            yield
        finally:
            for name, value in saved.items():
                setattr(self, name, value)
            self.recomputing = saved_recomputing

    @contextlib.contextmanager
    def collecting_localization(self, mask: torch.Tensor):
        """Collect one L_loc term per adapter (`localization_loss` of its output) during a student pass.

        The term is computed inside the hook, i.e. inside the checkpointed block, so only a scalar leaves it;
        at recomputation the hook computes it again (the saved tensors must match) but does not collect it.
        """
        self.localization_terms = []
        with self.replaying({**self.switches(), "localization_mask": mask}):
            yield self.localization_terms
        self.localization_terms = []

    def checkpoint(self, module: nn.Module, *args):
        """Gradient-checkpoint `module`, replaying at recomputation the switches seen at forward.

        Without the replay, toggling `enabled` or `scale` between forward and backward makes the recomputed
        block differ from the original one: a CheckpointError, or silently wrong gradients.
        """

        def context_fn():
            return contextlib.nullcontext(), self.replaying(self.switches(), recomputing=True)

        return checkpoint(module.__call__, *args, use_reentrant=False, context_fn=context_fn)


def get_erasers(transformer: nn.Module) -> EraserSet | None:
    """The EraserSet attached to `transformer`, or None."""
    return transformer.__dict__.get(_ATTR)


def _require_erasers(transformer: nn.Module) -> EraserSet:
    erasers = get_erasers(transformer)
    if erasers is None:
        raise LowmemEraserError("no erasers are attached to this transformer; call attach_erasers first")
    return erasers


def foreign_erasers(transformer: nn.Module) -> str | None:
    """Where an eraser injected by other code sits, or None. The published T2VUnlearning code replaces the
    attention by a wrapper holding an `adapter` module; our hooks and the published keys would then clash."""
    for name, _ in transformer.named_modules():  # ours is never a registered submodule (see _ATTR)
        if name.rsplit(".", 1)[-1] == "adapter":
            return f"module {name!r}"
    family = family_of(transformer)
    for i, block in enumerate(getattr(transformer, family.blocks, ())):
        attn = getattr(block, family.attention, None)
        if attn is not None and (hasattr(attn, "adapter") or not hasattr(attn, family.dim_linear)):
            return f"{family.blocks}.{i}.{family.attention} is a {type(attn).__name__}, not a diffusers attention"
    return None


def _attention_device(attn: nn.Module) -> torch.device:
    return next(t.device for t in [*attn.parameters(), *attn.buffers()])


def _adapter_hook(erasers: EraserSet, adapter: EraserAdapter, splits_output: bool, module, args, output):
    """Add the adapter's output to the attention's video output (before the block's gate and residual); a
    joint attention returns (video, text) and only the video part gets the adapter."""
    if not erasers.enabled or erasers.scale == 0:
        return None
    video, rest = (output[0], tuple(output[1:])) if splits_output else (output, None)
    if adapter.down.weight.device != video.device:
        erasers.to(video.device)  # in place: parameter identity (and optimizer state) is kept
    if erasers.localization_mask is None:
        erased = apply_adapter(adapter, video, erasers.scale, erasers.kernels)
    else:
        delta = apply_adapter(adapter, video, erasers.scale, erasers.kernels, residual=False)  # L_loc needs it alone
        term = localization_loss(delta, erasers.localization_mask)
        if not erasers.recomputing:
            erasers.localization_terms.append(term)
        erased = video + delta
    return (erased, *rest) if splits_output else erased


def apply_adapter(
    adapter: EraserAdapter, x: torch.Tensor, scale: float, kernels: str = "auto", residual: bool = True
) -> torch.Tensor:
    """`x + scale * adapter.delta(x)` (or the scaled delta alone) in x's dtype: the fused Triton op
    (`kernels` auto: on CUDA or under the Triton interpreter; triton: always) or the PyTorch reference."""
    weights = (adapter.down.weight, adapter.down.bias, adapter.up.weight, adapter.up.bias)
    if kernels == "torch":
        return eraser_adapter_reference(x, *weights, scale, residual)
    if kernels == "triton" and not triton_available():
        raise LowmemEraserError("kernels: triton needs triton and a CUDA device (or TRITON_INTERPRET=1)")
    return eraser_adapter(x, *weights, scale, residual)


# The replay goes through the public `ModelMixin.enable_gradient_checkpointing(gradient_checkpointing_func=...)`,
# which diffusers 0.33.0 introduced (0.32.x: `enable_gradient_checkpointing(self)` takes no function and
# CogVideoXTransformer3DModel calls `torch.utils.checkpoint.checkpoint` directly, so no replay can be
# installed). Hence `diffusers>=0.33` in pyproject.toml.
DIFFUSERS_CHECKPOINT_FUNC_MIN = "0.33"


def _diffusers_version() -> str:
    try:
        import diffusers

        return diffusers.__version__
    except Exception:  # pragma: no cover - diffusers is a hard dependency
        return "not installed"


def _is_diffusers_default(func) -> bool:
    """Whether `func` is a checkpointing function diffusers installs itself (plain
    `enable_gradient_checkpointing()`), not one a user chose: upgrading it to the replay loses nothing."""
    return func is None or str(getattr(func, "__module__", None) or "").startswith("diffusers.")


def _ensure_checkpoint_replay(erasers: EraserSet, transformer: nn.Module) -> None:
    """If the transformer checkpoints its blocks, make sure it does so through `erasers.checkpoint`.

    diffusers' default function is upgraded through the public API; a function someone else installed, or a
    diffusers without the API, is refused: without the replay, backward after toggling the eraser switches
    (the frozen pass, `collecting_localization`) fails or gives wrong gradients.
    """
    if not getattr(transformer, "gradient_checkpointing", False):
        return
    current = getattr(transformer, "_gradient_checkpointing_func", None)  # read only: the install is public
    if current == erasers.checkpoint:
        return
    if not _is_diffusers_default(current):
        raise LowmemEraserError(
            f"gradient checkpointing runs {getattr(current, '__qualname__', current)!r}, not the eraser replay "
            "(EraserSet.checkpoint): recomputation would not replay the eraser switches and backward breaks or "
            "gives wrong gradients. Fix: transformer.enable_gradient_checkpointing("
            "gradient_checkpointing_func=get_erasers(transformer).checkpoint), or plain "
            "transformer.enable_gradient_checkpointing(), which the erasers upgrade themselves"
        )
    needed = (
        f"gradient checkpointing with erasers needs diffusers>={DIFFUSERS_CHECKPOINT_FUNC_MIN} "
        "(ModelMixin.enable_gradient_checkpointing(gradient_checkpointing_func=...) to install the eraser "
        f"replay); installed: diffusers {_diffusers_version()}. Fix: pip install 'diffusers>="
        f"{DIFFUSERS_CHECKPOINT_FUNC_MIN}', or turn gradient checkpointing off"
    )
    try:
        transformer.enable_gradient_checkpointing(gradient_checkpointing_func=erasers.checkpoint)
    except TypeError as error:
        raise LowmemEraserError(needed) from error
    installed = getattr(transformer, "_gradient_checkpointing_func", None)
    if installed != erasers.checkpoint:
        raise LowmemEraserError(
            f"{needed} (the replay did not take: the transformer checkpoints with "
            f"{getattr(installed, '__qualname__', installed)!r})"
        )


def _install_checkpoint_replay(erasers: EraserSet, transformer: nn.Module, args, kwargs):
    """Forward pre-hook: checkpointing may have been switched on (or reset) after attach_erasers."""
    _ensure_checkpoint_replay(erasers, transformer)


def attach_erasers(transformer: nn.Module, rank: int = 128, expert: str | None = None) -> EraserSet:
    """Attach one fp32 EraserAdapter per block where the transformer's family puts it (CogVideoX: every
    `CogVideoXBlock.attn1`); returns them keyed by published name. `expert`: which of a pipeline's transformers
    this is, for families with several (Wan2.2 A14B: "transformer" or "transformer_2"; families/)."""
    if get_erasers(transformer) is not None:
        raise LowmemEraserError("erasers are already attached to this transformer; call detach_erasers first")
    if not isinstance(rank, int) or rank <= 0:
        raise LowmemEraserError(f"eraser rank must be a positive integer, got {rank!r}")
    foreign = foreign_erasers(transformer)
    if foreign is not None:
        raise LowmemEraserError(f"this transformer already carries an eraser injected by other code ({foreign})")
    family = family_of(transformer)
    sites = family.sites(transformer, expert)
    if not sites:
        raise LowmemEraserError(f"this {type(transformer).__name__} has no {family.blocks} to put an eraser on "
                                f"({family.name} erasers sit in {family.blocks}.{{i}}.{family.attention})")
    adapters = {}
    for key, attention in sites:
        adapter = EraserAdapter(family.adapter_dim(attention), rank)
        adapters[key] = adapter.to(device=_attention_device(attention), dtype=torch.float32)
    erasers = EraserSet(adapters)
    _ensure_checkpoint_replay(erasers, transformer)  # checkpointing already on (train.py, plan.py order)
    handles = [
        attention.register_forward_hook(functools.partial(_adapter_hook, erasers, adapter, family.splits_output))
        for (_, attention), adapter in zip(sites, erasers.values())
    ]
    handles.append(
        transformer.register_forward_pre_hook(
            functools.partial(_install_checkpoint_replay, erasers), with_kwargs=True
        )
    )
    erasers._hook_handles = handles
    transformer.__dict__[_ATTR] = erasers
    return erasers


def detach_erasers(transformer: nn.Module) -> EraserSet:
    """Remove the hooks and restore the plain model; returns the detached adapters."""
    erasers = _require_erasers(transformer)
    for handle in erasers._hook_handles:
        handle.remove()
    del transformer.__dict__[_ATTR]
    if getattr(transformer, "gradient_checkpointing", False) and (
        getattr(transformer, "_gradient_checkpointing_func", None) == erasers.checkpoint
    ):
        transformer.enable_gradient_checkpointing()  # back to diffusers' default function
    return erasers


@contextlib.contextmanager
def erasers_disabled(transformer: nn.Module):
    """Run the original (frozen) model: every adapter off inside the block."""
    erasers = _require_erasers(transformer)
    with erasers.replaying({**erasers.switches(), "enabled": False}):
        yield


def set_eraser_scale(transformer: nn.Module, scale: float) -> None:
    """Set the eraser strength used at inference (1.0 = as trained, 0.0 = off)."""
    _require_erasers(transformer).scale = float(scale)

"""Model families as data: where a family's eraser sits and what its published keys are, one file per family.

The rest of the package asks this registry instead of naming a model (the way peft keeps model facts in
`utils/constants.py`): `family_of(transformer)` for a model, `family_of_key(key)` for an eraser file's keys.
Adding a family = one file here that calls `register(Family(...))`, plus its tests.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..errors import LowmemEraserError
from ..loading import folder_json
from .runtime import Runtime


@dataclass(frozen=True)
class Family:
    """Where a family's eraser adapters go and how they are named.

    Every eraser wraps one attention module per block: `<blocks>.{i}.<attention>`. The adapter adds
    `up(GELU(down(out)))` to that attention's output -- to its first element when the attention returns
    (video, text), as joint attentions do (`splits_output`) -- and its width is the `in_features` of the
    attention's `dim_linear`. `key` is the published outer key of block i's adapter, with `{}` for i.
    """

    name: str  # as written in sidecars and errors, e.g. "CogVideoX"
    transformer_classes: tuple[str, ...]  # diffusers class names of the family's transformers
    blocks: str  # the transformer's attribute holding the blocks that get an eraser
    attention: str  # each such block's attribute: the attention whose output the adapter adds to
    key: str  # published key template, e.g. "transformer_blocks.{}.attn1.adapter"
    splits_output: bool  # the attention returns (video, text); the adapter adds to the video part
    stacks: tuple[str, ...] = ()  # the repeated block lists, in execution order: what is quantised and streamed
    dim_linear: str = "to_q"  # the attention's linear whose in_features is the adapter width
    # Pipelines with several transformers ("experts", Wan2.2 A14B: `transformer` for high noise, `transformer_2`
    # for low noise): each gets its own erasers in the same file, the first expert's under the plain keys (so a
    # one-transformer model's file is the same), every other's under "<expert>." + key.
    experts: tuple[str, ...] = ()
    # How the concept mask reads the text->video attention (localization.py): "joint" (one attention over text +
    # video tokens, the concept tokens among the keys), "cross" (the eraser's attention: video queries, text
    # keys only), "" (not implemented yet for this family).
    concept_attention: str = ""
    # Which blocks' attention the concept mask reads (default: the eraser blocks and attention). HunyuanVideo's
    # erasers sit in the single-stream blocks, its mask comes from the dual-stream ones.
    concept_blocks: str = ""
    concept_attention_module: str = ""
    # How to encode prompts, call the transformer, re-noise and sample (families/runtime.py); None: erasers of
    # this family can be attached, saved, loaded and inspected, but `train` / `infer` do not run it yet.
    runtime: "Runtime | None" = field(default=None, compare=False)
    notes: str = field(default="", compare=False)  # where the adapter sits and why (README, errors)

    @property
    def trainable(self) -> bool:
        return self.runtime is not None

    @property
    def key_pattern(self) -> re.Pattern:
        prefixes = "".join(f"{re.escape(expert)}\\.|" for expert in self.experts[1:])
        expert = f"(?:{prefixes[:-1]})?" if prefixes else ""
        return re.compile(expert + re.escape(self.key).replace(r"\{\}", r"(\d+)"))

    def key_prefix(self, expert: str | None) -> str:
        """The key prefix of `expert`'s erasers: "" for the first (or only) transformer."""
        if expert is None or (self.experts and expert == self.experts[0]):
            return ""
        if expert not in self.experts[1:]:
            known = ", ".join(self.experts) if self.experts else "none: one transformer"
            raise LowmemEraserError(f"{self.name} has no expert {expert!r} (experts: {known})")
        return f"{expert}."

    def expert_of(self, key: str) -> str | None:
        """Which expert's eraser a published key of this family is (None: a one-transformer family)."""
        return next((e for e in self.experts[1:] if key.startswith(f"{e}.")), self.experts[0] if self.experts else None)

    def block_list(self, transformer: nn.Module) -> list[nn.Module]:
        """The blocks that get an eraser, each checked to have the attention."""
        blocks = getattr(transformer, self.blocks, None)
        if blocks is None or not all(hasattr(block, self.attention) for block in blocks):
            raise LowmemEraserError(
                f"{type(transformer).__name__} is not a {self.name} transformer: expected `{self.blocks}` of blocks "
                f"with an `{self.attention}` attention")
        return list(blocks)

    @property
    def concept_module(self) -> str:
        return self.concept_attention_module or self.attention

    def concept_block_list(self, transformer: nn.Module) -> list[nn.Module]:
        """The blocks whose `concept_module` attention the concept mask reads."""
        if not self.concept_blocks:
            return self.block_list(transformer)
        blocks = getattr(transformer, self.concept_blocks, None)
        if not blocks or not all(hasattr(block, self.concept_module) for block in blocks):
            raise LowmemEraserError(f"{type(transformer).__name__} has no `{self.concept_blocks}` blocks with an "
                                    f"`{self.concept_module}` attention for the {self.name} concept mask")
        return list(blocks)

    def sites(self, transformer: nn.Module, expert: str | None = None) -> list[tuple[str, nn.Module]]:
        """(published key, attention module) of every eraser of `transformer` (the pipeline's `expert`
        transformer, when the family has several), in block order."""
        prefix = self.key_prefix(expert)
        return [(prefix + self.key.format(i), getattr(block, self.attention))
                for i, block in enumerate(self.block_list(transformer))]

    def adapter_dim(self, attention: nn.Module) -> int:
        return getattr(attention, self.dim_linear).in_features

    def stack_blocks(self, transformer: nn.Module) -> list[nn.Module]:
        """Every repeated block of `transformer` (all of `stacks`, default the eraser blocks), in execution
        order: > 95 % of the weights, what the 8-bit base quantises and the block streamer streams."""
        blocks = []
        for stack in self.stacks or (self.blocks,):
            found = getattr(transformer, stack, None)
            if found is None:
                raise LowmemEraserError(f"{type(transformer).__name__} has no `{stack}` ({self.name} blocks)")
            blocks.extend(found)
        return blocks


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    if family.name in FAMILIES:
        raise LowmemEraserError(f"model family {family.name!r} is registered twice")
    FAMILIES[family.name] = family
    return family


def supported() -> str:
    return ", ".join(f"{f.name} ({'/'.join(f.transformer_classes)})" for f in FAMILIES.values())


def family_of_class(class_name: str) -> Family:
    """The family of a diffusers transformer class name, or one error listing the supported families."""
    for family in FAMILIES.values():
        if class_name in family.transformer_classes:
            return family
    raise LowmemEraserError(f"{class_name} is not a supported transformer; supported families: {supported()}")


def family_of(transformer: nn.Module) -> Family:
    """The family of a transformer (by its class, or a subclass of a family's class)."""
    for cls in type(transformer).__mro__:
        for family in FAMILIES.values():
            if cls.__name__ in family.transformer_classes:
                return family
    return family_of_class(type(transformer).__name__)


def transformer_config_json(model: str | os.PathLike) -> dict:
    """A local diffusers model folder's transformer/config.json; {} when it cannot be read (the loaders then name
    the missing or broken file)."""
    return folder_json(model, "transformer/config.json")


def family_of_folder(model: str | os.PathLike) -> Family | None:
    """The family of a local diffusers model folder, from its transformer's `_class_name` (a config without one,
    hand-written, is read as CogVideoX, as the loaders do); None when transformer/config.json cannot be read."""
    config = transformer_config_json(model)
    if not config:
        return None
    try:
        name = config.get("_class_name") or "CogVideoXTransformer3DModel"
        if not isinstance(name, str):
            raise LowmemEraserError(f"_class_name is {name!r}, not a class name")
        return family_of_class(name)
    except LowmemEraserError as exc:
        raise LowmemEraserError(f"{Path(model) / 'transformer' / 'config.json'}: {exc}") from None


def require_trainable(model: str | os.PathLike, field: str) -> None:
    """One clear error before any work when `model` holds a transformer this tool does not train yet."""
    family = family_of_folder(model)
    if family is not None and not family.trainable:
        trainable = ", ".join(f.name for f in FAMILIES.values() if f.trainable)
        raise LowmemEraserError(
            f"{field}: {model} holds a {family.name} transformer; training and generation are implemented for "
            f"{trainable} so far ({family.name} erasers can be attached, saved, loaded, inspected and converted)")


def repeated_blocks(transformer: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformer of any registered family, in execution order."""
    return family_of(transformer).stack_blocks(transformer)


def block_count(transformer_config: dict) -> int:
    """How many repeated blocks a transformer config describes (HunyuanVideo: dual- plus single-stream)."""
    return int(transformer_config.get("num_layers", 0)) + int(transformer_config.get("num_single_layers", 0))


def runtime_of_folder(model: str | os.PathLike, field: str = "model") -> Runtime:
    """The runtime of a local model folder's family (CogVideoX when transformer/config.json cannot be read: the
    loaders then name the missing file), after `require_trainable`'s check."""
    require_trainable(model, field)
    family = family_of_folder(model)
    runtime = (family or FAMILIES["CogVideoX"]).runtime
    runtime.check_folder(Path(model), field)
    return runtime


def family_of_key(key: str) -> Family | None:
    """The family whose published eraser key `key` is, or None."""
    return next((family for family in FAMILIES.values() if family.key_pattern.fullmatch(key)), None)


from . import cogvideox, hunyuan_video, wan  # noqa: E402 -- each registers its family

COGVIDEOX, HUNYUAN_VIDEO, WAN = cogvideox.FAMILY, hunyuan_video.FAMILY, wan.FAMILY

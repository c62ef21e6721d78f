"""The training config: a YAML file read into dataclasses, every bad value reported with its field name.

Types and ranges are checked when a section is built, so `TrainConfig(...)` and `TrainConfig.from_dict(...)`
are as strict as `load_config`; `validate` adds the checks that look at files. Paths (`model`, `prompts`,
`output_dir`) are kept as written: relative ones are relative to the working directory, like any CLI path,
not to the config file's folder.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Sequence

import yaml

from .errors import ConfigError, LowmemEraserError
from .families import block_count, family_of_folder, require_trainable, transformer_config_json
from .localization import concept_spans

logger = logging.getLogger(__name__)

MODEL_SUBFOLDERS = ("transformer", "text_encoder", "tokenizer", "scheduler")  # vae/ is not needed to train
PROMPT_COLUMNS = ("prompt", "normal prompt")  # the published CSV: target prompt, preservation twin


def _rule(holds, expected: str) -> dict:
    return {"rule": (holds, expected)}


def _choices(*options: str) -> dict:
    return {"choices": options}


_POSITIVE = _rule(lambda v: v > 0, "a value > 0")
_NON_NEGATIVE = _rule(lambda v: v >= 0, "a value >= 0")


@dataclass
class _Section:
    """Base of every config section: converts and checks its fields on construction."""

    key: ClassVar[str] = ""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for spec in fields(self):
            name = f"{self.key}.{spec.name}" if self.key else spec.name
            setattr(self, spec.name, _checked(name, getattr(self, spec.name), hints[spec.name], spec.metadata))

    @classmethod
    def from_dict(cls, data: Any, where: str | None = None):
        """Build from a parsed YAML mapping; unknown and missing keys are errors. `where`: the section's name in
        the errors (default its `key`; a list entry's is e.g. `concepts[1]`)."""
        where = cls.key if where is None else where
        if not isinstance(data, dict):
            raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
        prefix = f"{where}." if where else ""
        known = [spec.name for spec in fields(cls)]
        for name in data:
            if name not in known:
                raise ConfigError(f"{prefix}{name}: unknown key (expected one of: {', '.join(known)})")
        for spec in fields(cls):
            if spec.default is MISSING and spec.default_factory is MISSING and spec.name not in data:
                raise ConfigError(f"{prefix}{spec.name}: missing (required)")
        # checked here under `where`'s names (construction checks them again, already converted)
        hints = typing.get_type_hints(cls)
        return cls(**{spec.name: _checked(f"{prefix}{spec.name}", data[spec.name], hints[spec.name], spec.metadata)
                      for spec in fields(cls) if spec.name in data})


def _checked(name: str, value: Any, kind: type, metadata) -> Any:
    """`value` converted to `kind` and checked against the field's rule or choices, or a ConfigError."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in typing.get_args(kind):
        if value is None:  # an optional field (`str | None`) left out
            return None
        (kind,) = [k for k in typing.get_args(kind) if k is not type(None)]
    if is_dataclass(kind):
        return value if isinstance(value, kind) else kind.from_dict(value, name)
    if typing.get_origin(kind) is list:  # list[str] and the like: each item checked as its own field `name[i]`
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        (item_kind,) = typing.get_args(kind)
        return [_checked(f"{name}[{i}]", item, item_kind, metadata) for i, item in enumerate(value)]
    converted = metadata["convert"](value) if "convert" in metadata else _converted(value, kind)
    if converted is None and "convert" in metadata:
        raise ConfigError(f"{name}: expected {metadata['expected']}, got {value!r}")
    if converted is None:
        expected = {bool: "true or false", int: "an integer", float: "a number", str: "a non-empty string",
                    Path: "a path"}[kind]
        raise ConfigError(f"{name}: expected {expected}, got {value!r}")
    if "choices" in metadata and converted not in metadata["choices"]:
        raise ConfigError(f"{name}: expected one of {', '.join(metadata['choices'])}; got {value!r}")
    if "rule" in metadata and not metadata["rule"][0](converted):
        raise ConfigError(f"{name}: expected {metadata['rule'][1]}, got {value!r}")
    return converted


def _converted(value: Any, kind: type) -> Any:
    """`value` as `kind`, or None when it is not one. Booleans are never numbers."""
    if isinstance(value, bool):
        return value if kind is bool else None
    if kind is int:
        return value if isinstance(value, int) else None
    if kind is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                return None
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
    if kind in (str, Path):
        return kind(value) if isinstance(value, (str, Path)) and str(value).strip() else None
    return None


@dataclass
class EraserConfig(_Section):
    key: ClassVar[str] = "eraser"
    rank: int = field(default=128, metadata=_POSITIVE)


@dataclass
class AdversarialConfig(_Section):
    """Adversarial training (Receler's adversarial prompt learning, AdvUnlearn): every `every` steps (0 = off) an
    inner loop of `inner_steps` Adam steps (size `lr` x the condition's RMS) finds `tokens` soft-prompt vectors
    in each target prompt's text condition (its last `tokens` positions) that make the CURRENT eraser reproduce
    the original model's prediction (attack.py, the attack of `lowmem-eraser attack`); the step then also trains the erasers to erase the concept under
    them, weighted by `weight`. Only the vectors train in the inner loop; the base stays frozen. The inner loop and
    the adversarial term work on the kind of state the attack works on: the original model's sample of the prompt
    (x0, generated once and cached as `sampling.mode: renoise` does) noised at the step's t, since under attack the
    concept comes back into x_t, a state the erased model's own trajectory never visits. With `sampling.mode:
    trajectory` those are latents of their own and the unlearning and preservation terms keep the trajectory's
    x_t; a renoise step's x_t is such a state already and every term shares it."""

    key: ClassVar[str] = "loss.adversarial"
    every: int = field(default=0, metadata=_NON_NEGATIVE)
    tokens: int = field(default=4, metadata=_POSITIVE)
    inner_steps: int = field(default=10, metadata=_POSITIVE)
    weight: float = field(default=1.0, metadata=_NON_NEGATIVE)
    lr: float = field(default=0.1, metadata=_POSITIVE)
    # the negative guidance of the adversarial term's target; None: the step's own (loss.eta, or the concept's).
    # 0 targets the anchor itself (v(x_t, c_pre) with anchor: preservation): under attack, the twin's video
    eta: float | None = field(default=None, metadata=_NON_NEGATIVE)


@dataclass
class LossConfig(_Section):
    """L = L_unlearn + alpha·L_loc + beta·L_pre, with the negative guidance strength eta (SPEC §3).

    `anchor` is the prompt the negative guidance starts from: `empty` (∅, the published loss) or the target
    prompt's `preservation` twin, whose difference from c is the concept alone.
    """

    key: ClassVar[str] = "loss"
    eta: float = field(default=7.0, metadata=_NON_NEGATIVE)
    anchor: str = field(default="empty", metadata=_choices("empty", "preservation"))
    alpha: float = field(default=1.0, metadata=_NON_NEGATIVE)
    beta: float = field(default=0.0, metadata=_NON_NEGATIVE)
    mask_threshold: float = field(default=0.1, metadata=_rule(lambda v: 0 <= v <= 1, "a value in [0, 1]"))
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)


@dataclass
class SamplingConfig(_Section):
    """How x_t is drawn: `renoise` a cached model sample x0, or follow the sampling `trajectory` (SPEC §3)."""

    key: ClassVar[str] = "sampling"
    mode: str = field(default="renoise", metadata=_choices("renoise", "trajectory"))
    num_inference_steps: int = field(default=50, metadata=_POSITIVE)
    guidance_scale: float = field(default=6.0, metadata=_NON_NEGATIVE)
    batch_size: int = field(default=1, metadata=_POSITIVE)


@dataclass
class VideoConfig(_Section):
    key: ClassVar[str] = "video"
    # 4k+1 for every family; the model's family may ask more (CogVideoX: 8k+1), checked in `validate`
    frames: int = field(default=49, metadata=_rule(lambda v: v > 0 and v % 4 == 1, "4k+1 frames (e.g. 49, 81)"))
    height: int = field(default=480, metadata=_rule(lambda v: v > 0 and v % 16 == 0, "a positive multiple of 16"))
    width: int = field(default=720, metadata=_rule(lambda v: v > 0 and v % 16 == 0, "a positive multiple of 16"))


@dataclass
class TrainLoopConfig(_Section):
    key: ClassVar[str] = "train"
    steps: int = field(default=500, metadata=_POSITIVE)
    lr: float = field(default=1.0e-4, metadata=_POSITIVE)
    batch_size: int = field(default=1, metadata=_POSITIVE)
    grad_clip: float = field(default=1.0, metadata=_POSITIVE)
    seed: int = 0
    save_every: int = field(default=100, metadata=_POSITIVE)
    log_every: int = field(default=1, metadata=_POSITIVE)
    warmup_steps: int = field(default=0, metadata=_NON_NEGATIVE)
    lr_schedule: str = field(default="constant", metadata=_choices("constant", "cosine"))
    keep_checkpoints: int = field(default=2, metadata=_POSITIVE)


def _offload_value(value: Any) -> str | int | None:
    """memory.offload as stored: "none", "all" (also written `blocks`, its old name) or a block count N >= 1
    (0 means none)."""
    if value is False:  # YAML 1.1 reads `offload: off` / `no` / `false` as false
        return "none"
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return "none" if value == 0 else value if value > 0 else None
    if isinstance(value, str):
        text = value.strip().lower()
        if text.isdigit():
            return _offload_value(int(text))
        return {"none": "none", "all": "all", "blocks": "all"}.get(text)
    return None


@dataclass
class MemoryConfig(_Section):
    """Each field is one memory switch (see configs/README.md). `offload` (streamed blocks) and
    `offload_activations` are accepted without CUDA: the training loop says so and runs without them.
    `text_encoder`: where the prompts are encoded (once, then cached); `auto` puts the encoder on the GPU only
    when it fits the free GPU memory, else on the CPU."""

    key: ClassVar[str] = "memory"
    quantize: str = field(default="int8", metadata=_choices("none", "int8", "triton", "bnb", "auto"))
    gradient_checkpointing: bool = True
    offload: str | int = field(default="none", metadata={
        "convert": _offload_value, "expected": "none, all (or blocks) or a number of blocks to stream"})
    offload_activations: bool = False
    blockwise_load: bool = True
    int8_cache: bool = False
    dtype: str = field(default="bfloat16", metadata=_choices("bfloat16", "float16", "float32"))
    kernels: str = field(default="auto", metadata=_choices("auto", "triton", "torch"))
    text_encoder: str = field(default="auto", metadata=_choices("auto", "cuda", "cpu"))

    def streamed_blocks(self, depth: int) -> int:
        """How many of a `depth`-block model's blocks `offload` streams (BlockOffloader streams the first ones)."""
        if self.offload not in ("none", "all") and int(self.offload) > depth:
            raise ConfigError(f"memory.offload: {self.offload} blocks to stream, but the model has {depth} blocks "
                              f"(use 1..{depth}, or all)")
        return 0 if self.offload == "none" else depth if self.offload == "all" else int(self.offload)


@dataclass
class ValidationConfig(_Section):
    """Base | erased sample videos of held-out prompts every `every` steps (0 = off), from one seed."""

    key: ClassVar[str] = "validation"
    every: int = field(default=0, metadata=_NON_NEGATIVE)
    prompts: list[str] = field(default_factory=list)
    num_inference_steps: int = field(default=25, metadata=_POSITIVE)
    guidance_scale: float = field(default=6.0, metadata=_NON_NEGATIVE)
    seed: int = 0


@dataclass
class ConceptConfig(_Section):
    """One entry of `concepts:`: a concept, its prompt pairs and optionally its own eta (default `loss.eta`)."""

    key: ClassVar[str] = "concepts[i]"  # from_dict names each entry `concepts[N]`
    concept: str
    prompts: Path
    eta: float | None = field(default=None, metadata=_NON_NEGATIVE)


class ConceptEntry(NamedTuple):
    """What training reads of one concept, from either form of the config (`TrainConfig.concept_entries`)."""

    concept: str
    prompts: Path
    eta: float  # the entry's own, else loss.eta


@dataclass
class TrainConfig(_Section):
    """The whole training config. `model`, `output_dir` and either `prompts` + `concept` (one concept) or
    `concepts` (several, erased by one eraser trained on all their pairs in mixed batches) are required."""

    model: Path  # local diffusers model folder of a trainable family (CogVideoX, Wan, HunyuanVideo)
    prompts: Path | None = None  # CSV with `prompt`, `normal prompt` columns, or a YAML list of pairs
    concept: str | None = None  # word(s) whose tokens define the localisation mask
    concepts: list[ConceptConfig] = field(default_factory=list)  # instead of concept + prompts: several
    output_dir: Path = field(kw_only=True)
    eraser: EraserConfig = field(default_factory=EraserConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    report_to: str = field(default="none", metadata=_choices("none", "tensorboard", "wandb"))

    def __post_init__(self):
        super().__post_init__()
        if self.concepts:  # exactly one of the two forms
            for name in ("concept", "prompts"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"{name}: give either concept + prompts (one concept) or concepts (a list), "
                                      f"not both")
            seen: dict[str, int] = {}
            for i, entry in enumerate(self.concepts):
                word = entry.concept.strip().lower()
                if word in seen:
                    raise ConfigError(f"concepts[{i}].concept: {entry.concept!r} is already listed as "
                                      f"concepts[{seen[word]}]")
                seen[word] = i
        else:
            for name in ("concept", "prompts"):
                if getattr(self, name) is None:
                    raise ConfigError(f"{name}: missing (required)")

    def concept_entries(self) -> list[ConceptEntry]:
        """Every concept to erase with its prompt file and eta: `concepts`, or the one `concept` + `prompts`."""
        if not self.concepts:
            return [ConceptEntry(self.concept, self.prompts, self.loss.eta)]
        return [ConceptEntry(entry.concept, entry.prompts, self.loss.eta if entry.eta is None else entry.eta)
                for entry in self.concepts]

    def to_dict(self) -> dict:
        """Plain YAML-safe values (paths as strings), in the file's layout: `from_dict` reads it back. The form
        not used (`concept` + `prompts`, or `concepts`) is left out, an entry's eta when it has none, and
        `loss.adversarial` when it is off (its `eta` when it has none)."""
        data = {}
        for name, value in asdict(self).items():
            if name == "concepts":
                value = [{key: str(v) if isinstance(v, Path) else v for key, v in entry.items()
                          if not (key == "eta" and v is None)} for entry in value]
            if value is None or value == []:
                continue
            if name == "loss" and not value["adversarial"]["every"]:
                # off: left out, so that a run's fingerprint (and --resume of its checkpoints) is what it was
                # before adversarial training existed
                value = {key: v for key, v in value.items() if key != "adversarial"}
            elif name == "loss" and value["adversarial"]["eta"] is None:  # as runs before the field existed
                value = {**value, "adversarial": {k: v for k, v in value["adversarial"].items() if k != "eta"}}
            data[name] = str(value) if isinstance(value, Path) else value
        return data


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read, override (`key.sub=value`, value parsed as YAML), check and validate a training config."""
    path = Path(path)
    try:
        data = yaml.safe_load(read_text(path, "config"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config: {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a mapping of settings, got {data!r}")
    for override in overrides:
        _apply_override(data, override)
    config = TrainConfig.from_dict(data)
    validate(config)
    return config


def _apply_override(data: dict, override: str) -> None:
    name, sep, text = override.partition("=")
    if not sep or not name.strip():
        raise ConfigError(f"--set {override!r}: expected key.sub=value")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {name}: value is not valid YAML: {exc}") from None
    *sections, leaf = name.strip().split(".")
    section_type, target = TrainConfig, data
    for part in sections:
        hints = typing.get_type_hints(section_type)
        if part not in hints or not is_dataclass(hints[part]):
            raise ConfigError(f"--set {name}: unknown key")
        section_type = hints[part]
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ConfigError(f"{part}: expected a mapping, got {target!r}")
    if leaf not in {spec.name for spec in fields(section_type)}:
        raise ConfigError(f"--set {name}: unknown key")
    target[leaf] = value


def validate(config: TrainConfig) -> None:
    """The checks that read files, and cross-field ones; warns when the concept is in no target prompt."""
    if not config.model.is_dir():
        raise ConfigError(f"model: {config.model} is not a folder")
    try:
        require_trainable(config.model, "model")
        family = family_of_folder(config.model)
        if family is not None:
            family.runtime.check_folder(config.model, "model")
    except LowmemEraserError as exc:
        raise ConfigError(str(exc)) from None
    # HunyuanVideo also needs tokenizer_2/ and text_encoder_2/ (CLIP)
    subfolders = ("transformer", *family.runtime.text_modules, "scheduler") if family else MODEL_SUBFOLDERS
    for sub in subfolders:
        if not (config.model / sub).is_dir():
            raise ConfigError(
                f"model: {config.model} has no {sub}/ sub-folder (a diffusers model folder needs "
                f"{', '.join(s + '/' for s in subfolders)})"
            )
    step = family.runtime.frame_step if family else 8
    if config.video.frames % step != 1:
        raise ConfigError(f"video.frames: expected {step}k+1 frames for {family.name if family else 'CogVideoX'} "
                          f"(e.g. 49), got {config.video.frames}")
    multiple = family.runtime.size_multiple(config.model) if family else 16
    for name in ("height", "width"):
        value = getattr(config.video, name)
        if value % multiple:
            raise ConfigError(f"video.{name}: expected a multiple of {multiple} for this model (its VAE's compression "
                              f"x its patch size), got {value}")
    if (config.validation.every > 0 and family is not None and family.name != "CogVideoX"
            and not (config.model / "vae").is_dir()):
        raise ConfigError(f"validation.every: {config.validation.every} needs the model's vae/ to decode the videos; "
                          f"{config.model} has none (set validation.every: 0)")
    dim = _attention_dim(config.model)
    if dim is not None and config.eraser.rank > dim:  # down: dim -> rank; a wider rank adds only dead weights
        raise ConfigError(
            f"eraser.rank: expected at most the model's attention dim {dim} "
            f"({config.model / 'transformer' / 'config.json'}), got {config.eraser.rank}"
        )
    pairs = load_prompt_pairs(config.prompts) if not config.concepts else None
    entry_pairs = [_entry_pairs(config, i) for i in range(len(config.concepts))]
    if config.train.warmup_steps > config.train.steps:
        raise ConfigError(
            f"train.warmup_steps: expected at most train.steps ({config.train.steps}), got {config.train.warmup_steps}"
        )
    if config.memory.offload != "none" and not config.memory.gradient_checkpointing:
        raise ConfigError(
            f"memory.offload: {config.memory.offload} needs memory.gradient_checkpointing: true (backward re-fetches "
            "each block's weights through the recomputation)"
        )
    if config.memory.offload != "none" and config.memory.quantize == "bnb":
        raise ConfigError(
            f"memory.offload: {config.memory.offload} cannot stream bitsandbytes weights (memory.quantize: bnb keeps "
            "them in its own tensor type); use memory.quantize: int8, triton or auto with offload")
    if config.memory.offload_activations and not config.memory.gradient_checkpointing:
        raise ConfigError(
            "memory.offload_activations: true needs memory.gradient_checkpointing: true (it moves what checkpointing "
            "keeps, each block's inputs, to the CPU; without checkpointing every activation would cross PCIe)"
        )
    layers = block_count(transformer_config_json(config.model))
    if layers:
        try:
            config.memory.streamed_blocks(layers)
        except ConfigError as exc:
            raise ConfigError(f"{exc}: {config.model / 'transformer' / 'config.json'}") from None
    adversarial = config.loss.adversarial
    if adversarial.every > 0:
        from .attack import check_soft_prompt

        if family is not None and family.name == "HunyuanVideo":
            raise ConfigError("loss.adversarial.every: adversarial training needs a [B, L, D] text condition; "
                              "HunyuanVideo's is masked after the prompt (set loss.adversarial.every: 0)")
        length = family.runtime.max_text_length(transformer_config_json(config.model)) if family else None
        try:
            check_soft_prompt(adversarial.tokens, adversarial.inner_steps, length or 2**31,
                              "loss.adversarial.tokens", "loss.adversarial.inner_steps")
        except LowmemEraserError as exc:
            raise ConfigError(str(exc)) from None
    if config.sampling.mode == "trajectory" and config.sampling.num_inference_steps < 2:
        raise ConfigError("sampling.num_inference_steps: trajectory sampling needs at least 2 steps")
    if config.validation.every > 0 and not config.validation.prompts:
        raise ConfigError(f"validation.prompts: validation.every is {config.validation.every} but no prompts are given "
                          "(list at least one, or set validation.every: 0)")
    for i, (entry, its_pairs) in enumerate(zip(config.concepts, entry_pairs)):
        if not any(concept_spans(target, entry.concept) for target, _ in its_pairs):
            raise ConfigError(f"concepts[{i}]: concept {entry.concept!r} appears in none of the {len(its_pairs)} "
                              f"target prompts of {entry.prompts} (its localisation mask would be empty)")
    if pairs is not None and not any(concept_spans(target, config.concept) for target, _ in pairs):
        logger.warning(
            "concept %r appears in none of the %d target prompts of %s: the localisation mask will be empty, so "
            "L_loc penalises the eraser everywhere", config.concept, len(pairs), config.prompts)


def _entry_pairs(config: TrainConfig, i: int) -> list[tuple[str, str]]:
    """The prompt pairs of `concepts[i]`; a bad prompt file is named with its entry."""
    try:
        return load_prompt_pairs(config.concepts[i].prompts)
    except ConfigError as exc:
        raise ConfigError(f"concepts[{i}].{exc}") from None


def concept_pairs(config: TrainConfig) -> list[list[tuple[str, str]]]:
    """The prompt pairs of each of `config.concept_entries()`, in its order."""
    return [load_prompt_pairs(entry.prompts) for entry in config.concept_entries()]


def _attention_dim(model: Path) -> int | None:
    """num_attention_heads * attention_head_dim from the transformer's config.json; None when it cannot be read."""
    transformer = transformer_config_json(model)
    try:
        heads, head_dim = transformer["num_attention_heads"], transformer["attention_head_dim"]
    except KeyError:
        return None
    ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (heads, head_dim))
    return heads * head_dim if ok else None


def load_prompt_pairs(path: str | Path) -> list[tuple[str, str]]:
    """(target prompt, preservation prompt) pairs from a CSV (`prompt`, `normal prompt` columns) or a YAML
    list of `[prompt, normal prompt]` pairs or `{prompt: ..., normal prompt: ...}` mappings."""
    path = Path(path)
    if path.suffix.lower() not in (".csv", ".yaml", ".yml"):
        raise ConfigError(f"prompts: expected a .csv, .yaml or .yml file, got {path}")
    if not path.is_file():
        raise ConfigError(f"prompts: {path} not found")
    pairs = _csv_pairs(path) if path.suffix.lower() == ".csv" else _yaml_pairs(path)
    if not pairs:
        raise ConfigError(f"prompts: {path} holds no prompt pairs")
    return pairs


def _csv_pairs(path: Path) -> list[tuple[str, str]]:
    with io.StringIO(read_text(path, "prompts", "utf-8-sig"), newline="") as file:
        reader = csv.reader(file)
        header = [column.strip() for column in next(reader, [])]
        for column in PROMPT_COLUMNS:
            if column not in header:
                raise ConfigError(
                    f"prompts: {path} has no column {column!r} (header: {header}); "
                    f"expected columns {' and '.join(repr(c) for c in PROMPT_COLUMNS)}"
                )
        indices = [header.index(column) for column in PROMPT_COLUMNS]
        pairs = []
        for row in reader:
            where = f"prompts: {path} line {reader.line_num}"
            if not any(cell.strip() for cell in row):
                raise ConfigError(f"{where}: empty row")
            if len(row) > len(header):
                raise ConfigError(f"{where}: {len(row)} cells for {len(header)} columns (quote prompts with commas)")
            cells = [row[i] if i < len(row) else "" for i in indices]
            pairs.append(_pair(cells, where))
        return pairs


def _yaml_pairs(path: Path) -> list[tuple[str, str]]:
    try:
        items = yaml.safe_load(read_text(path, "prompts"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"prompts: {path} is not valid YAML: {exc}") from None
    if not isinstance(items, list):
        raise ConfigError(
            f"prompts: {path} must hold a list of [prompt, normal prompt] pairs, got {type(items).__name__}"
        )
    pairs = []
    for number, item in enumerate(items, start=1):
        where = f"prompts: {path} item {number}"
        if isinstance(item, dict) and set(item) == set(PROMPT_COLUMNS):
            pairs.append(_pair([item[column] for column in PROMPT_COLUMNS], where))
        elif isinstance(item, list) and len(item) == 2:
            pairs.append(_pair(item, where))
        else:
            raise ConfigError(
                f"{where}: expected [prompt, normal prompt] or a mapping with exactly those keys, got {item!r}"
            )
    return pairs


def _pair(cells: list, where: str) -> tuple[str, str]:
    for column, cell in zip(PROMPT_COLUMNS, cells):
        if not isinstance(cell, str) or not cell.strip():
            raise ConfigError(f"{where}: empty or non-text {column!r}: {cell!r}")
    return cells[0].strip(), cells[1].strip()


def read_text(path: Path, field: str, encoding: str = "utf-8") -> str:
    """A config or prompt file's text, or one ConfigError naming the file: missing, unreadable, not UTF-8."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{field}: {path} not found") from None
    except OSError as exc:
        raise ConfigError(f"{field}: cannot read {path} ({exc.strerror or exc})") from None
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{field}: {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); save it as UTF-8"
        ) from None

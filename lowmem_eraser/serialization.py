"""The published eraser format: `eraser_weights.pt` (or `.safetensors`) + `eraser_config.json`.

`eraser_weights.pt` is `torch.save` of `{outer_key: {"down.weight", "down.bias", "up.weight", "up.bias"}}`;
`eraser_config.json` is exactly `{"eraser_type": "adapter", "eraser_rank": r}` because Receler's loader passes
it as `**kwargs`. Our own metadata goes to a sidecar, `lowmem_eraser.json`. Every read is
`torch.load(weights_only=True)` and is fully validated before anything on a model changes.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from . import __version__
from .adapter import EraserSet, attach_erasers, foreign_erasers, get_erasers
from .families import family_of, family_of_key
from .errors import EraserFormatError, WriteError

WEIGHTS_PT = "eraser_weights.pt"
WEIGHTS_SAFETENSORS = "eraser_weights.safetensors"
CONFIG_JSON = "eraser_config.json"
SIDECAR_JSON = "lowmem_eraser.json"
INNER_KEYS = ("down.weight", "down.bias", "up.weight", "up.bias")

# Besides the model families (families/, asked at read time so a family registered later is known too), the
# format is written by Receler's Stable Diffusion UNet erasers, which are read and inspected but not trained here.
FOREIGN_FAMILIES = {
    "Receler (Stable Diffusion UNet)": re.compile(
        r"(?:down_blocks\.\d+\.attentions\.\d+|mid_block\.attentions\.\d+|up_blocks\.\d+\.attentions\.\d+)"
    ),
}


@dataclass
class EraserFile:
    """A validated eraser checkpoint, independent of any model."""

    weights_path: Path
    state: dict[str, dict[str, torch.Tensor]]
    family: str
    rank: int
    config: dict | None = None
    sidecar: dict | None = None
    dims: dict[str, int] = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.state.values()))["down.weight"].dtype


_CAUSES = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EACCES: "permission denied",
           errno.EPERM: "permission denied", errno.EROFS: "read-only file system"}


def write_error(path: Path, exc: OSError) -> WriteError:
    """`exc` as one line naming `path` and the cause (disk full, permission denied, read-only, ...)."""
    cause = _CAUSES.get(exc.errno) or exc.strerror or str(exc) or type(exc).__name__
    error = WriteError(f"{path}: cannot write: {cause}", path, cause)
    error.errno = exc.errno  # kept for callers that look at it; the message stays the one line above
    return error


def atomic_write(path: Path, write) -> None:
    """Write through a temp file in the same folder, then rename: a crash never truncates `path`.

    A failed write raises WriteError naming `path` and the cause; the temp file is always removed."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except WriteError:
        raise
    except OSError as exc:
        raise write_error(path, exc) from exc
    except RuntimeError as exc:
        # torch.save(obj, path) writes through its C++ zip writer, which reports ENOSPC as a RuntimeError
        # ("[enforce fail at inline_container.cc ...] unexpected pos") with no errno: tell the user what we can.
        if "inline_container" not in str(exc) and "PytorchStreamWriter" not in str(exc):
            raise
        free = shutil.disk_usage(path.parent).free
        cause = "disk full" if free < 64 * 2**20 else "write failed"
        cause = f"{cause} ({free / 2**20:.0f} MiB free)"
        raise WriteError(f"{path}: cannot write: {cause}", path, cause) from exc
    finally:
        tmp.unlink(missing_ok=True)


def ensure_folder(folder: str | os.PathLike, field: str) -> Path:
    """Create `folder` if needed and prove it writable with a probe file, before any long work starts."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        cause = _CAUSES.get(exc.errno) or exc.strerror or str(exc)
        raise WriteError(f"{field}: cannot write to folder {folder}: {cause}") from exc
    return folder


def _write_json(path: Path, obj: dict) -> None:
    text = json.dumps(obj, indent=4)
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_config(folder: Path, rank: int) -> None:
    """Write `eraser_config.json` exactly as the published loader expects it (no extra keys)."""
    _write_json(folder / CONFIG_JSON, {"eraser_type": "adapter", "eraser_rank": rank})


def _family_of(key: str) -> str | None:
    family = family_of_key(key)
    if family is not None:
        return family.name
    return next((name for name, pattern in FOREIGN_FAMILIES.items() if pattern.fullmatch(key)), None)


def _flatten(state: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{outer}.{inner}": tensor for outer, inners in state.items() for inner, tensor in inners.items()}


def _unflatten(flat: dict[str, torch.Tensor], path: Path) -> dict[str, dict[str, torch.Tensor]]:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        outer, sep, inner = key.rpartition(".")
        outer, sep2, module = outer.rpartition(".")
        if not sep or not sep2:
            raise EraserFormatError(f"{path}: key {key!r} is not '<block>.<down|up>.<weight|bias>'")
        state.setdefault(outer, {})[f"{module}.{inner}"] = tensor
    return state


def _resolve_weights(path: Path) -> Path:
    if path.is_dir():
        candidates = [path / name for name in (WEIGHTS_PT, WEIGHTS_SAFETENSORS) if (path / name).is_file()]
        if not candidates:
            raise EraserFormatError(f"{path}: folder has neither {WEIGHTS_PT} nor {WEIGHTS_SAFETENSORS}")
        if len(candidates) > 1:
            raise EraserFormatError(f"{path}: folder has both {WEIGHTS_PT} and {WEIGHTS_SAFETENSORS}; pass one file")
        return candidates[0]
    if not path.is_file():
        raise EraserFormatError(f"{path}: no such eraser file or folder")
    return path


def _read_raw(path: Path) -> dict:
    try:
        if path.suffix == ".safetensors":
            return _unflatten(safetensors.torch.load_file(path, device="cpu"), path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except EraserFormatError:
        raise
    except Exception as exc:  # torch/pickle/safetensors raise many types for truncated or hostile files
        if isinstance(exc, pickle.UnpicklingError) and "weights_only" in str(exc):
            # torch's message advises retrying with weights_only=False, i.e. running the file's code: never
            # pass that on. Keep only the line saying which object was refused.
            detail = [line.strip() for line in str(exc).splitlines() if "GLOBAL" in line or "Unsupported" in line]
            if not any("GLOBAL" in line or "global" in line for line in detail):  # garbage, not a hostile pickle
                raise EraserFormatError(f"{path}: not a readable eraser weights file (not a torch checkpoint: "
                                        "corrupt, truncated or another format)") from None
            raise EraserFormatError(
                f"{path}: not a readable eraser weights file: refused because it contains code or Python objects, "
                f"not plain tensors ({detail[0]})"
            ) from None
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EraserFormatError(f"{path}: not a readable eraser weights file ({first_line})") from exc


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EraserFormatError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise EraserFormatError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _validate_block(path: Path, key: str, inners: object, allow_nonfinite: bool = False) -> tuple[int, int]:
    """Check one block's inner dict; returns (rank, dim)."""
    if not isinstance(inners, dict):
        raise EraserFormatError(f"{path}: {key!r} holds a {type(inners).__name__}, expected a dict of tensors")
    for inner in inners:
        if inner not in INNER_KEYS:
            raise EraserFormatError(f"{path}: {key!r} has unexpected key {inner!r} (expected {', '.join(INNER_KEYS)})")
    for inner in INNER_KEYS:
        if inner not in inners:
            raise EraserFormatError(f"{path}: {key!r} is missing {inner!r}")
        tensor = inners[inner]
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise EraserFormatError(f"{path}: {key}.{inner} is not a floating-point tensor")
    if inners["down.weight"].dim() != 2:
        raise EraserFormatError(f"{path}: {key}.down.weight must be 2-D [rank, dim], got {list(inners['down.weight'].shape)}")
    rank, dim = inners["down.weight"].shape
    expected = {"down.bias": [rank], "up.weight": [dim, rank], "up.bias": [dim]}
    for inner, shape in expected.items():
        if list(inners[inner].shape) != shape:
            raise EraserFormatError(f"{path}: {key}.{inner} has shape {list(inners[inner].shape)}, expected {shape}")
    for inner in INNER_KEYS:
        if not allow_nonfinite and not torch.isfinite(inners[inner]).all():
            raise EraserFormatError(f"{path}: {key}.{inner} contains NaN or Inf")
    return rank, dim


def read_erasers(path: str | os.PathLike, allow_nonfinite: bool = False) -> EraserFile:
    """Read and validate an eraser folder or weights file (.pt or .safetensors) of any published family.

    `allow_nonfinite` lets NaN/Inf through (for `inspect`, which reports them); loading never does."""
    weights_path = _resolve_weights(Path(path))
    state = _read_raw(weights_path)
    if not isinstance(state, dict) or not state:
        raise EraserFormatError(f"{weights_path}: expected a non-empty dict of blocks, got {type(state).__name__}")
    family, rank, dims = None, None, {}
    for key, inners in state.items():
        if not isinstance(key, str):
            raise EraserFormatError(f"{weights_path}: block key {key!r} is not a string")
        key_family = _family_of(key)
        if key_family is None:
            raise EraserFormatError(f"{weights_path}: {key!r} is not an eraser block name of any known family")
        if family is not None and key_family != family:
            raise EraserFormatError(f"{weights_path}: {key!r} is a {key_family} block in a {family} file")
        family = key_family
        block_rank, dims[key] = _validate_block(weights_path, key, inners, allow_nonfinite)
        if rank is not None and block_rank != rank:
            raise EraserFormatError(f"{weights_path}: {key} has rank {block_rank}, other blocks have rank {rank}")
        rank = block_rank
    config = _read_json(weights_path.parent / CONFIG_JSON)
    if config is not None:
        config_path = weights_path.parent / CONFIG_JSON
        if config.get("eraser_type", "adapter") != "adapter":
            raise EraserFormatError(f"{config_path}: eraser_type is {config['eraser_type']!r}, expected 'adapter'")
        config_rank = config.get("eraser_rank", rank)
        if isinstance(config_rank, bool) or not isinstance(config_rank, int):  # the published loader needs an int
            raise EraserFormatError(
                f"{config_path}: eraser_rank must be an integer, got {config_rank!r} ({type(config_rank).__name__}); "
                f"the tensors in {weights_path.name} have rank {rank}"
            )
        if config_rank != rank:
            raise EraserFormatError(
                f"{config_path}: eraser_rank is {config_rank} but the tensors in {weights_path.name} have rank {rank}"
            )
    sidecar = _read_json(weights_path.parent / SIDECAR_JSON)
    return EraserFile(weights_path, state, family, rank, config, sidecar, dims)


def _published_state(erasers: EraserSet) -> dict[str, dict[str, torch.Tensor]]:
    state = {}
    for name, adapter in erasers.items():
        inners = {key: tensor.detach().to("cpu", copy=True).contiguous() for key, tensor in adapter.state_dict().items()}
        for inner, tensor in inners.items():
            if not torch.isfinite(tensor).all():
                raise EraserFormatError(f"refusing to save {name}.{inner}: it contains NaN or Inf")
        state[name] = inners
    return state


def save_erasers(
    transformer_or_erasers: nn.Module | Sequence[nn.Module],
    folder: str | os.PathLike,
    metadata: dict | None = None,
    format: str = "pt",
) -> Path:
    """Write the published folder: weights (.pt or .safetensors), `eraser_config.json` and our sidecar.

    A sequence of transformers/eraser sets writes one file for a pipeline's experts (Wan2.2 A14B: the
    `transformer` and `transformer_2` erasers, attached with `attach_erasers(..., expert=...)`): same family and
    rank, each expert's keys under its own prefix."""
    several = isinstance(transformer_or_erasers, (list, tuple, nn.ModuleList))
    items = list(transformer_or_erasers) if several else [transformer_or_erasers]
    sets = [item if isinstance(item, EraserSet) else get_erasers(item) for item in items]
    if not sets or any(erasers is None for erasers in sets):
        raise EraserFormatError("save_erasers: the model has no erasers attached")
    if format not in ("pt", "safetensors"):
        raise EraserFormatError(f"save_erasers: format must be 'pt' or 'safetensors', got {format!r}")
    erasers = sets[0]
    state = {}
    for other in sets:
        if (other.family, other.rank) != (erasers.family, erasers.rank):
            raise EraserFormatError(f"save_erasers: one file holds one family and rank; got {erasers.family} rank "
                                    f"{erasers.rank} and {other.family} rank {other.rank}")
        for key, inners in _published_state(other).items():
            if key in state:
                raise EraserFormatError(f"save_erasers: {key!r} twice: attach each expert's erasers with its own "
                                        "`expert=`")
            state[key] = inners
    sidecar = {
        "family": erasers.family,
        "num_blocks": len(state),
        "dim": erasers.dim,
        "rank": erasers.rank,
        "dtype": str(erasers.values()[0].down.weight.dtype).removeprefix("torch."),
        "lowmem_eraser_version": __version__,
        "metadata": metadata or {},
    }
    try:
        sidecar_text = json.dumps(sidecar, indent=4)
    except TypeError as exc:
        raise EraserFormatError(f"save_erasers: metadata is not JSON-serialisable ({exc})") from exc
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_weights(state, folder / (WEIGHTS_PT if format == "pt" else WEIGHTS_SAFETENSORS))
    (folder / (WEIGHTS_SAFETENSORS if format == "pt" else WEIGHTS_PT)).unlink(missing_ok=True)  # no stale twin
    write_config(folder, erasers.rank)
    atomic_write(folder / SIDECAR_JSON, lambda tmp: tmp.write_text(sidecar_text))
    return folder


def write_weights(state: dict[str, dict[str, torch.Tensor]], path: Path) -> None:
    """Atomically write a nested eraser state as .pt (published layout) or .safetensors (flat keys)."""
    if path.suffix == ".safetensors":
        # safetensors refuses tensors that share storage (views of one tensor, as torch.save keeps them):
        # give every tensor its own contiguous copy (an eraser is small).
        flat = {key: tensor.detach().clone(memory_format=torch.contiguous_format) for key, tensor in _flatten(state).items()}
        # Written through Python's file API (here and below) so that a full disk is an OSError with its errno.
        data = safetensors.torch.save(flat, metadata={"format": "pt"})
        atomic_write(path, lambda tmp: tmp.write_bytes(data))
    elif path.suffix == ".pt":
        atomic_write(path, lambda tmp: _torch_save(state, tmp))
    else:
        raise EraserFormatError(f"{path}: eraser weights must end in .pt or .safetensors")


def _torch_save(obj, path: Path) -> None:
    with open(path, "wb") as handle:  # not torch.save(obj, path): its C++ writer loses the errno
        torch.save(obj, handle)


def load_erasers(transformer: nn.Module, path: str | os.PathLike, strict: bool = True,
                 expert: str | None = None) -> EraserSet:
    """Load a published eraser into `transformer` (of the eraser's family), attaching adapters if none are.
    `expert`: which of the pipeline's transformers this is, for families with several (families/); only that
    expert's keys of the file are loaded.

    With `strict=False`, blocks missing from the file keep their current weights and blocks the model lacks
    are ignored; shapes are always checked. Nothing on the model changes unless every check passes.
    """
    eraser_file = read_erasers(path)
    where = eraser_file.weights_path
    family = family_of(transformer)
    if eraser_file.family != family.name:
        raise EraserFormatError(f"{where}: this is a {eraser_file.family} eraser; the model is a {family.name} "
                                f"transformer ({type(transformer).__name__})")
    foreign = foreign_erasers(transformer)
    if foreign is not None:
        raise EraserFormatError(
            f"{where}: cannot load into this transformer: it already carries an eraser injected by other code "
            f"({foreign}); load into a plain {type(transformer).__name__} (load_erasers attaches its own)"
        )
    sites = family.sites(transformer, expert)
    has = f"the model has {len(sites)} {family.blocks}"  # HunyuanVideo: its single-stream blocks only
    expected = [key for key, _ in sites]
    mine = family.expert_of(expected[0]) if expected else None  # the other experts' keys are not ours to check
    if strict:
        missing = [key for key in expected if key not in eraser_file.state]
        if missing:
            raise EraserFormatError(f"{where}: missing block {missing[0]!r} ({has})")
        extra = [key for key in eraser_file.state if key not in expected and family.expert_of(key) == mine]
        if extra:
            raise EraserFormatError(f"{where}: unexpected block {extra[0]!r} ({has})")
    for key, attention in sites:
        if key in eraser_file.state and eraser_file.dims[key] != family.adapter_dim(attention):
            raise EraserFormatError(
                f"{where}: {key}.down.weight has dim {eraser_file.dims[key]}, the model's attention dim is "
                f"{family.adapter_dim(attention)}"
            )
    erasers = get_erasers(transformer)
    if erasers is not None and expected and expected[0] not in erasers:
        raise EraserFormatError(f"{where}: the erasers attached to this transformer are {erasers.keys()[0]!r}..., "
                                f"not {expected[0]!r}...: attach (or load) with the same `expert`")
    if erasers is not None and erasers.rank != eraser_file.rank:
        raise EraserFormatError(f"{where}: rank {eraser_file.rank} does not match the attached erasers' rank {erasers.rank}")
    if erasers is None:
        erasers = attach_erasers(transformer, rank=eraser_file.rank, expert=expert)
    with torch.no_grad():
        for key in expected:
            if key in eraser_file.state:
                for inner, param in erasers[key].state_dict(keep_vars=True).items():
                    param.copy_(eraser_file.state[key][inner].to(torch.float32))
    return erasers


def merge_erasers(paths: Sequence[str | os.PathLike], folder: str | os.PathLike, format: str = "pt") -> Path:
    """One published eraser equal to applying every eraser in `paths` at once, written to `folder`.

    Each adapter adds `up(GELU(down(h)))` to the same attention output h, and a sum of such terms is one adapter
    of the summed rank: `down` rows stacked, `down` biases concatenated, `up` columns concatenated, `up` biases
    summed (exact, up to the order of the final additions). The erasers must be of one family, with the same
    blocks and widths; the result's rank is the sum of theirs."""
    if len(paths) < 2:
        raise EraserFormatError(f"merge: expected two or more erasers, got {len(paths)}")
    if format not in ("pt", "safetensors"):
        raise EraserFormatError(f"merge: format must be 'pt' or 'safetensors', got {format!r}")
    files = [read_erasers(path) for path in paths]
    first = files[0]
    for other in files[1:]:
        if other.family != first.family:
            raise EraserFormatError(f"merge: {first.weights_path} is a {first.family} eraser and {other.weights_path} "
                                    f"a {other.family} eraser: erasers of one family only")
        if set(other.state) != set(first.state):
            missing = sorted(set(first.state) ^ set(other.state))
            raise EraserFormatError(f"merge: {first.weights_path} and {other.weights_path} have different blocks "
                                    f"(e.g. {missing[0]!r}): erasers of the same model only")
        for key in first.state:
            if other.dims.get(key) != first.dims.get(key):
                raise EraserFormatError(f"merge: {key} is {first.dims.get(key)} wide in {first.weights_path} and "
                                        f"{other.dims.get(key)} in {other.weights_path}: erasers of the same model only")
    dtypes = {eraser.dtype for eraser in files}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32  # mixed precisions meet in fp32
    state = {}
    for key in first.state:
        parts = [{name: tensor.to(dtype) for name, tensor in eraser.state[key].items()} for eraser in files]
        state[key] = {
            "down.weight": torch.cat([p["down.weight"] for p in parts], dim=0),
            "down.bias": torch.cat([p["down.bias"] for p in parts]),
            "up.weight": torch.cat([p["up.weight"] for p in parts], dim=1),
            "up.bias": torch.stack([p["up.bias"] for p in parts]).sum(0),
        }
    rank = sum(eraser.rank for eraser in files)
    folder = ensure_folder(folder, "--output")
    for name in (WEIGHTS_PT, WEIGHTS_SAFETENSORS):
        if (folder / name).exists():
            raise EraserFormatError(f"--output: {folder} already holds an eraser ({name}); merge into a new folder")
    sidecar = {
        "family": first.family,
        "num_blocks": len(state),
        "dim": next(iter(first.dims.values()), None),
        "rank": rank,
        "dtype": str(dtype).removeprefix("torch."),
        "lowmem_eraser_version": __version__,
        "metadata": {"merged_from": [{"path": str(eraser.weights_path), "rank": eraser.rank,
                                      "metadata": (eraser.sidecar or {}).get("metadata", {})} for eraser in files]},
    }
    sidecar_text = json.dumps(sidecar, indent=4, default=str)
    write_weights(state, folder / (WEIGHTS_PT if format == "pt" else WEIGHTS_SAFETENSORS))
    write_config(folder, rank)
    atomic_write(folder / SIDECAR_JSON, lambda tmp: tmp.write_text(sidecar_text))
    return folder

"""Load a diffusers transformer one block at a time, so host RAM never holds the whole model in bf16.

`from_pretrained(torch_dtype=...)` followed by `quantize_base` keeps every bf16 weight on the host until the last
linear is quantised: CogVideoX-5b needs ~11 GB of host RAM before anything reaches the GPU, and users were
OOM-killed. Here the model is built without weights, then the non-block tensors and each
`transformer_blocks.{i}` are read (only that block's tensors), cast exactly as `from_pretrained` casts, assigned,
quantised and moved to the device before the next block is read. Host RAM peaks at what stays on the host (8-bit
weights on a CPU device, or the blocks kept for the block streamer) plus about one block in flight.

The result is bit-identical to `from_pretrained(folder, torch_dtype=dtype)` + `quantize_base(backend)`: same
module types, state-dict entries, non-persistent buffers, dtypes and eval mode; every tensor is frozen and
gradient checkpointing is off (the caller enables it).

An optional int8 cache (`int8_cache/int8-<key>/`, one safetensors file per block plus one for the rest) stores the
quantised weights after the first load, so later loads skip reading bf16 and quantising. The key hashes what the
weights depend on: the source files' names, sizes and mtimes, the config, dtype and this package's version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Collection, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from . import __version__
from .errors import ConfigError, HostMemoryError, LowmemEraserError, ModelFileError
from .families import family_of
from .memory import return_freed_memory
from .quantize import quantize_linears, resolve_backend

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
BIN_NAMES = ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json")
CONFIG_NAME = "config.json"
CACHE_FORMAT = 1  # bump when the cache layout or the quantisation changes: old caches then miss
MANIFEST = "manifest.json"
REST_FILE = "rest.safetensors"
CACHED_KINDS = ("int8", "triton")  # same Int8Linear weights; bnb's int8 params cannot be built without data

_CACHE_TEMP = re.compile(r"^\.int8-[0-9a-f]+\.(?:tmp|old)-(\d+)$")  # a write in progress, a cache being removed
# Bytes per element of the safetensors header dtypes (only sizes the host-RAM estimate; unknown ones count 4).
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
GiB = 2**30


class _CacheUnusable(Exception):
    """The int8 cache cannot be read (missing file, truncated, wrong keys or shapes): reload from the source."""


def load_transformer_blockwise(
    folder: str | os.PathLike,
    dtype: torch.dtype,
    quantize: str,
    device: torch.device | str,
    host_blocks: Collection[int] = (),
    int8_cache: str | os.PathLike | None = None,
) -> nn.Module:
    """The transformer in `folder` (a diffusers `transformer/` folder with safetensors weights, one file or
    sharded), loaded block by block.

    `quantize`: "none" keeps `dtype`; "int8" / "triton" / "bnb" quantise each block's linears as `quantize_base`
    does ("auto" is resolved for `device`). Blocks in `host_blocks` stay on the CPU (for the block streamer);
    everything else ends on `device`. `int8_cache`: a folder for the pre-quantised copy (int8/triton only).
    Raises ModelFileError naming the file for missing/unreadable weights or keys, HostMemoryError before
    loading when the host RAM needed exceeds what is available.
    """
    folder, device = Path(folder), torch.device(device)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"load_transformer_blockwise: dtype must be a floating torch.dtype, got {dtype!r}")
    kind = "none" if quantize == "none" else resolve_backend(quantize, device)
    cls, config = _model_class(folder)
    source = _Checkpoint.of_folder(folder)
    model = _empty_model(cls, config, dtype, folder)
    blocks = _Blocks(model, folder)
    n_blocks = len(blocks.prefixes)
    bad = sorted(i for i in host_blocks if not 0 <= int(i) < n_blocks)
    if bad:
        raise ConfigError(f"host_blocks: block indices {bad} out of range: {folder} has {n_blocks} blocks")
    host = set(range(n_blocks)) if device.type == "cpu" else {int(i) for i in host_blocks}
    plan = _Plan(model, source, cls, dtype, folder)
    _check_host_ram(plan, kind, host, folder)

    cache_dir = key = None
    if int8_cache is not None and kind in CACHED_KINDS:
        key = _cache_key(source, folder, dtype)
        cache_dir = Path(int8_cache) / f"int8-{key}"
        if cache_dir.is_dir():
            try:
                cached = _open_cache(cache_dir, key, blocks)
                _fill(model, plan, cached, kind, device, host, from_cache=True)
                logger.info("loaded %s from the int8 cache %s", folder, cache_dir)
                return _finish(model)
            except _CacheUnusable as exc:
                logger.warning("int8 cache %s is unusable (%s); removing it and loading from %s", cache_dir, exc,
                               folder)
                _remove(cache_dir)
                model = blocks = plan.layout = None  # the blocks already filled are freed before the rebuild
                model = _empty_model(cls, config, dtype, folder)
                plan.layout = _Blocks(model, folder)
    elif int8_cache is not None:
        logger.info("int8 cache: not used for quantize=%s (only int8/triton weights are cached)", kind)

    writer = _CacheWriter(Path(int8_cache), key) if cache_dir is not None else None
    try:
        _fill(model, plan, source, kind, device, host, from_cache=False, writer=writer)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        writer.commit({"format": CACHE_FORMAT, "key": key, "source": str(folder.resolve()), "dtype": str(dtype),
                       "quantize": "int8", "blocks": n_blocks, "version": __version__})
    return _finish(model)


# --- the model and its tensors ----------------------------------------------------------------------------------


def _model_class(folder: Path) -> tuple[type, dict]:
    """(diffusers model class named by config.json's `_class_name`, its config as `load_config` returns it)."""
    import diffusers

    path = folder / CONFIG_NAME
    if not path.is_file():
        raise ModelFileError(f"{path}: missing: the transformer folder needs its config.json")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{path}: not a valid JSON config: {exc}") from None
    # As plan.transformer_config: a config without _class_name (hand-written) is a CogVideoX transformer.
    name = raw.get("_class_name", "CogVideoXTransformer3DModel") if isinstance(raw, dict) else None
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise ModelFileError(f"{path}: _class_name {name!r} is not a diffusers model class")
    try:
        config = cls.load_config(folder)
    except Exception as exc:  # noqa: BLE001 - diffusers raises several types for a bad config
        raise ModelFileError(f"{path}: cannot read the {name} config: {exc}") from None
    return cls, config


def _empty_model(cls: type, config: dict, dtype: torch.dtype, folder: Path) -> nn.Module:
    """The model with its parameters on `meta`, built the way `from_pretrained` builds it.

    accelerate's `init_empty_weights()` (what `from_pretrained(low_cpu_mem_usage=True)` uses) rather than a plain
    `with torch.device("meta")`: it moves only parameters to meta, so buffers computed in `__init__` and not saved
    in the checkpoint (CogVideoX's sin-cos `pos_embedding`) are real and identical to from_pretrained's. Under the
    default dtype `dtype`, as from_pretrained sets it, because those buffers are computed in it."""
    import accelerate
    from diffusers.models.modeling_utils import no_init_weights

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights(), accelerate.init_empty_weights():
            model = cls.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    _Blocks(model, folder)  # a model without its family's block lists is refused here, before any read
    model.register_to_config(_name_or_path=str(folder))
    # from_pretrained's eval() comes before quantize_base, so the 8-bit linears made after it are in training
    # mode there (no effect on Int8Linear; bnb reads it): the same order here keeps the modules identical.
    model.eval()
    return model


def _dtype_bytes(name: str) -> int:
    return _ITEMSIZE.get(name, 4)


def _is_float(name: str) -> bool:
    return name.startswith("F") or name == "BF16"


class _Checkpoint:
    """Where each tensor of a safetensors checkpoint lives (one file, or shards listed by an index), read from
    the headers only; `read` opens each file only for the tensors asked and closes it."""

    def __init__(self, files: dict[str, Path], headers: dict[str, tuple[str, tuple[int, ...]]], described: list[Path]):
        self.files = files  # key -> file
        self.headers = headers  # key -> (safetensors dtype, shape)
        self.described = described  # every file the weights depend on (index, shards or the single file)

    @classmethod
    def of_folder(cls, folder: Path) -> "_Checkpoint":
        single, index = folder / WEIGHTS_NAME, folder / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                if not isinstance(weight_map, dict):
                    raise ValueError("weight_map is not an object")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ModelFileError(f"{index}: not a valid safetensors index: {exc}") from None
            shards = sorted({folder / name for name in weight_map.values()})
            described = [index, *shards]
        elif single.is_file():
            weight_map, shards, described = None, [single], [single]
        else:
            bins = [folder / name for name in BIN_NAMES if (folder / name).is_file()]
            if bins:
                raise ModelFileError(
                    f"{bins[0]}: the low-RAM loader reads safetensors weights only (a .bin is a pickle that must "
                    "be loaded whole); convert the folder once (from_pretrained(folder).save_pretrained(folder) "
                    f"writes {WEIGHTS_NAME}) or set memory.blockwise_load: false")
            raise ModelFileError(f"{single}: missing: no {WEIGHTS_NAME} or {INDEX_NAME} in {folder}")
        files, headers = {}, {}
        for shard in shards:
            if not shard.is_file():
                raise ModelFileError(f"{shard}: missing: listed in {index.name} but not in {folder}")
            for key, header in _read_header(shard).items():
                files[key], headers[key] = shard, header
        if weight_map is not None:
            for key, name in weight_map.items():
                if files.get(key) != folder / name:
                    raise ModelFileError(f"{folder / name}: has no tensor {key!r} (listed in {index.name})")
        return cls(files, headers, described)

    def bytes(self, key: str) -> int:
        name, shape = self.headers[key]
        return _dtype_bytes(name) * _numel(shape)

    def read(self, keys: Iterable[str], dtype: torch.dtype | None, keep_fp32: tuple[str, ...]) -> dict:
        """The tensors `keys`, cast as from_pretrained casts when `dtype` is given (the cache stores them cast)."""
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.files[key], []).append(key)
        out = {}
        for path, file_keys in by_file.items():
            key = file_keys[0]
            try:
                handle, mapped = _open(path)
                with handle:
                    for key in file_keys:
                        raw = handle.get_tensor(key)
                        tensor = raw if dtype is None else _cast(key, raw, dtype, keep_fp32)
                        # A mapped tensor keeps the file's pages resident for as long as it lives: own the bytes.
                        out[key] = tensor.clone() if mapped and tensor is raw else tensor
                        del raw, tensor
            except (OSError, SafetensorError) as exc:  # changed or damaged since its header was read
                raise ModelFileError(f"{path}: cannot read tensor {key!r}: {_first_line(exc)}") from None
        return out


def _read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    try:
        with safe_open(str(path), framework="pt") as handle:  # parses the header only; checks the file size
            return {key: (handle.get_slice(key).get_dtype(), tuple(handle.get_slice(key).get_shape()))
                    for key in handle.keys()}
    except (OSError, SafetensorError) as exc:
        raise ModelFileError(f"{path}: not a valid safetensors file (truncated or corrupt): {_first_line(exc)}") \
            from None


_PREAD: bool | None = None  # whether safe_open takes backend="pread" (newer safetensors), found on first use


def _open(path: Path):
    """(safe_open handle, whether its tensors are views of a file mapping).

    pread copies each tensor into its own memory and maps nothing, so the file's pages never count against the
    process; older safetensors only map the file (the tensors then keep the mapping alive: callers copy)."""
    global _PREAD
    if _PREAD is None:
        try:
            handle = safe_open(str(path), framework="pt", device="cpu", backend="pread")
            _PREAD = True
            return handle, False
        except TypeError:
            _PREAD = False
    if _PREAD:
        return safe_open(str(path), framework="pt", device="cpu", backend="pread"), False
    return safe_open(str(path), framework="pt", device="cpu"), True


def _cast(key: str, tensor: torch.Tensor, dtype: torch.dtype, keep_fp32: tuple[str, ...]) -> torch.Tensor:
    """diffusers' `load_model_dict_into_meta` cast: floating tensors to `dtype`, those of `_keep_in_fp32_modules`
    to fp32, integer tensors unchanged. That function itself is not called: it takes the whole model's state dict
    per call (`model.state_dict()` each time: quadratic in blocks), leaves missing keys silently on meta and its
    signature changes between diffusers releases; the cast is the part that decides bit-identity."""
    if not torch.is_floating_point(tensor):
        return tensor
    if keep_fp32 and any(module in key.split(".") for module in keep_fp32):
        return tensor.to(torch.float32)
    return tensor.to(dtype)


def _numel(shape: Iterable[int]) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0][:300] if text else "") or type(exc).__name__


class _Plan:
    """Which checkpoint keys go to which part (the non-block modules, each block), checked against the model:
    a missing key or a wrong shape is a ModelFileError naming the file; unused keys are a warning, as in
    from_pretrained."""

    def __init__(self, model: nn.Module, source: _Checkpoint, cls: type, dtype: torch.dtype, folder: Path):
        self.dtype = dtype
        self.keep_fp32 = tuple(cls._keep_in_fp32_modules or ())
        expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
        self.layout = _Blocks(model, folder)
        self.blocks: list[list[str]] = [[] for _ in self.layout.prefixes]
        self.rest: list[str] = []
        for key in expected:
            index = self.layout.index(key)
            (self.blocks[index] if index is not None else self.rest).append(key)
        missing = [key for key in expected if key not in source.files]
        if missing:  # named by the index of a sharded checkpoint (the shard is unknown), else by the file
            raise ModelFileError(f"{source.described[0]}: has no tensor {missing[0]!r} ({len(missing)} of the "
                                 f"{cls.__name__}'s {len(expected)} tensors missing)")
        for key, shape in expected.items():
            if source.headers[key][1] != shape:
                raise ModelFileError(f"{source.files[key]}: tensor {key!r} has shape {list(source.headers[key][1])}, "
                                     f"the {cls.__name__} in {folder / CONFIG_NAME} expects {list(shape)}")
        unused = sorted(set(source.files) - set(expected))
        if unused:
            logger.warning("%s: %d tensors are not used by the %s (first: %s)", folder, len(unused), cls.__name__,
                           unused[0])
        self.source = source
        self.linear_weights = {f"{prefix}{name}.weight" for prefix, block in zip(self.layout.prefixes,
                                                                                 self.layout.modules)
                               for name, module in block.named_modules() if type(module) is nn.Linear}

    def final_bytes(self, key: str, quantized: bool) -> int:
        """Bytes `key` takes once loaded: cast to dtype (fp32 if kept), or int8 + an fp32 scale per row."""
        name, shape = self.source.headers[key]
        if quantized and key in self.linear_weights:
            return _numel(shape) + 4 * shape[0]
        if not _is_float(name):
            return _dtype_bytes(name) * _numel(shape)
        keep = self.keep_fp32 and any(module in key.split(".") for module in self.keep_fp32)
        return _numel(shape) * (4 if keep else self.dtype.itemsize)

    def block_bytes(self, i: int, quantized: bool) -> int:
        return sum(self.final_bytes(key, quantized) for key in self.blocks[i])


def _check_host_ram(plan: _Plan, kind: str, host: set[int], folder: Path) -> None:
    """Refuse before reading anything when the host cannot hold what stays on it plus one block in flight."""
    from .memory import HOST_RAM_RESERVE, host_ram_available

    available = host_ram_available()
    if available is None:
        return
    quantized = kind != "none"
    kept = sum(plan.block_bytes(i, quantized) for i in host)
    # In flight: one block cast to dtype, its 8-bit copy while the linears are replaced, and the largest tensor
    # as read (before its cast).
    flight = max((plan.block_bytes(i, False) + (plan.block_bytes(i, True) if quantized else 0)
                  + max((plan.source.bytes(key) for key in plan.blocks[i]), default=0)
                  for i in range(len(plan.blocks))), default=0)
    rest = sum(plan.final_bytes(key, False) for key in plan.rest)
    need = kept + flight + rest
    if need > available:
        raise HostMemoryError(
            f"loading {folder}: needs {need / GiB:.2f} GiB of host RAM ({kept / GiB:.2f} GiB for the {len(host)} "
            f"blocks kept on the host, {flight / GiB:.2f} GiB for one block in flight, {rest / GiB:.2f} GiB of "
            f"non-block weights) but only {available / GiB:.2f} GiB is available (MemAvailable minus a "
            f"{HOST_RAM_RESERVE / GiB:.0f} GiB reserve); keep fewer blocks on the host, quantise them "
            "(memory.quantize), or free host memory")


def _fill(model: nn.Module, plan: _Plan, source, kind: str, device: torch.device, host: set[int],
          from_cache: bool, writer: "_CacheWriter | None" = None) -> None:
    """Assign the non-block tensors, then each block in turn (read, quantise, write to the cache, move)."""
    cast = None if from_cache else plan.dtype
    try:
        state = source.read(plan.rest, cast, plan.keep_fp32)
    except ModelFileError as exc:
        if from_cache:
            raise _CacheUnusable(str(exc)) from None
        raise
    _assign(model, state, from_cache, skip=plan.layout.pattern)
    if writer is not None:
        writer.add(REST_FILE, state)
    del state
    _move_except_blocks(model, device, plan.layout)
    return_freed_memory()
    for i, (prefix, block) in enumerate(zip(plan.layout.prefixes, plan.layout.modules)):
        if from_cache and kind != "none":
            quantize_linears(block, kind)  # Int8Linear shells on meta, then the cached tensors are assigned
        try:
            state = source.read(plan.blocks[i], cast, plan.keep_fp32)
        except ModelFileError as exc:
            if from_cache:
                raise _CacheUnusable(str(exc)) from None
            raise
        _assign(block, {key[len(prefix):]: tensor for key, tensor in state.items()}, from_cache)
        del state
        if not from_cache and kind != "none":
            quantize_linears(block, kind)
        block.requires_grad_(False)
        if writer is not None:
            writer.add(_block_file(i), block.state_dict())
        if i not in host:
            block.to(device)
        return_freed_memory()


def _assign(module: nn.Module, state: dict, from_cache: bool, skip: re.Pattern | None = None) -> None:
    """`load_state_dict(assign=True)` of exactly the expected keys (those not matching `skip`)."""
    expected = {key: t for key, t in module.state_dict().items() if skip is None or not skip.match(key)}
    wrong = next((key for key, t in state.items() if key not in expected or expected[key].shape != t.shape), None)
    if wrong is not None or len(state) != len(expected):
        # The source checkpoint's keys and shapes were checked in _Plan: only a cache can get here.
        detail = f"tensor {wrong!r}" if wrong is not None else f"{len(state)} tensors, expected {len(expected)}"
        if from_cache:
            raise _CacheUnusable(f"unexpected {detail}")
        raise LowmemEraserError(f"load_transformer_blockwise: {detail} does not fit the model")
    module.load_state_dict(state, strict=skip is None, assign=True)




class _Blocks:
    """The model's repeated blocks in execution order, as its family lists them (families/: CogVideoX
    `transformer_blocks`, Wan `blocks`, HunyuanVideo dual- then single-stream), indexed globally the way the
    block streamer indexes them: `host_blocks` and the cache's block files use these indices."""

    def __init__(self, model: nn.Module, folder: Path):
        try:
            family = family_of(model)
        except LowmemEraserError as exc:
            raise LowmemEraserError(f"{folder}: {exc}; set memory.blockwise_load: false") from None
        names = family.stacks or (family.blocks,)
        self.stacks = [(name, getattr(model, name, None)) for name in names]
        missing = [name for name, blocks in self.stacks if not isinstance(blocks, nn.ModuleList)]
        if missing:
            raise LowmemEraserError(f"{folder}: a {type(model).__name__} has no `{missing[0]}` to load block by "
                                    "block; set memory.blockwise_load: false")
        self.prefixes = [f"{name}.{i}." for name, blocks in self.stacks for i in range(len(blocks))]
        self.modules = [block for _, blocks in self.stacks for block in blocks]
        self.pattern = re.compile(r"^(" + "|".join(re.escape(name) for name in names) + r")\.(\d+)\.")
        self._first = {}
        for name, blocks in self.stacks:
            self._first[name] = sum(len(b) for n, b in self.stacks[: names.index(name)])

    def index(self, key: str) -> int | None:
        """The global block index of a state-dict key, None for a key outside the blocks."""
        match = self.pattern.match(key)
        return self._first[match.group(1)] + int(match.group(2)) if match else None


def _move_except_blocks(model: nn.Module, device: torch.device, layout: _Blocks) -> None:
    stacks = [blocks for _, blocks in layout.stacks]
    for child in model.children():
        if not any(child is blocks for blocks in stacks):
            child.to(device)
    for name, buffer in model._buffers.items():
        if buffer is not None:
            model._buffers[name] = buffer.to(device)
    for name, param in model._parameters.items():
        if param is not None:
            model._parameters[name] = nn.Parameter(param.detach().to(device), requires_grad=False)


def _finish(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model


# --- the int8 cache --------------------------------------------------------------------------------------------


def _block_file(i: int) -> str:
    return f"block-{i:04d}.safetensors"


def _cache_key(source: _Checkpoint, folder: Path, dtype: torch.dtype) -> str:
    """What the cached weights depend on. Files by name, size and mtime (hashing gigabytes of content on every
    load would cost as much as the load); the config by content; int8 for both int8 and triton."""
    files = []
    for path in sorted({*source.described, folder / CONFIG_NAME}):
        stat = path.stat()
        files.append([path.name, stat.st_size, stat.st_mtime_ns])
    config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    payload = json.dumps({"format": CACHE_FORMAT, "version": __version__, "files": files, "config": config,
                          "dtype": str(dtype), "quantize": "int8"}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


class _CachedCheckpoint:
    """The cache folder as a source: the same `read` as `_Checkpoint`, tensors stored already cast/quantised."""

    def __init__(self, folder: Path, layout: _Blocks):
        self.folder, self.layout = folder, layout

    def read(self, keys: list[str], dtype, keep_fp32) -> dict:
        keys = list(keys)
        index = self.layout.index(keys[0]) if keys else None
        path = self.folder / (_block_file(index) if index is not None else REST_FILE)
        try:
            handle, mapped = _open(path)
            with handle:
                prefix = self.layout.prefixes[index] if index is not None else ""
                out = {}
                for name in handle.keys():
                    tensor = handle.get_tensor(name)
                    out[prefix + name] = tensor.clone() if mapped else tensor
                    del tensor
                return out
        except (OSError, SafetensorError) as exc:  # a truncated or garbage file: the caller reloads from source
            raise _CacheUnusable(f"{path}: {_first_line(exc)}") from None


def _open_cache(folder: Path, key: str, layout: _Blocks) -> _CachedCheckpoint:
    """The cache in `folder` if its manifest matches and every file is there with its recorded size."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _CacheUnusable(f"{folder / MANIFEST}: {_first_line(exc)}") from None
    n_blocks = len(layout.prefixes)
    if not isinstance(manifest, dict) or manifest.get("key") != key or manifest.get("blocks") != n_blocks:
        raise _CacheUnusable(f"{folder / MANIFEST} does not describe this model")
    files = manifest.get("files")
    expected = {REST_FILE, *(_block_file(i) for i in range(n_blocks))}
    if not isinstance(files, dict) or set(files) != expected:
        raise _CacheUnusable(f"{folder / MANIFEST} lists the wrong files")
    for name, size in files.items():
        try:
            actual = (folder / name).stat().st_size
        except OSError as exc:
            raise _CacheUnusable(f"{folder / name}: {exc.strerror or exc}") from None
        if actual != size:
            raise _CacheUnusable(f"{folder / name}: {actual} bytes, {size} written")
    return _CachedCheckpoint(folder, layout)


class _CacheWriter:
    """Writes the cache into a temp folder beside its final name and renames it into place when complete, so a
    killed or failed write never leaves a folder that a later load would use. A write error only costs the
    cache: it is logged and the load goes on."""

    def __init__(self, root: Path, key: str):
        self.final = root / f"int8-{key}"
        self.tmp = root / f".int8-{key}.tmp-{os.getpid()}"
        self.files: dict[str, int] = {}
        self.failed = False
        try:
            root.mkdir(parents=True, exist_ok=True)
            _remove_dead_temps(root)
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir()
        except OSError as exc:
            self._fail(root, exc)

    def _fail(self, path: Path, exc: BaseException) -> None:
        from .serialization import write_error

        cause = write_error(path, exc).cause if isinstance(exc, OSError) else _first_line(exc)
        logger.warning("int8 cache: cannot write %s (%s); loading goes on without a cache", path, cause)
        self.failed = True
        self.abort()

    def add(self, name: str, state: dict) -> None:
        if self.failed:
            return
        from safetensors.torch import save_file

        path = self.tmp / name
        try:
            save_file({key: tensor.detach().contiguous() for key, tensor in state.items()}, str(path))
            _fsync(path)
            self.files[name] = path.stat().st_size
        except Exception as exc:  # noqa: BLE001 - safetensors reports a full disk as its own error type
            self._fail(path, exc)

    def commit(self, manifest: dict) -> None:
        if self.failed:
            return
        try:
            path = self.tmp / MANIFEST
            path.write_text(json.dumps({**manifest, "files": self.files}, indent=1), encoding="utf-8")
            _fsync(path)
            _fsync(self.tmp)
            if self.final.exists():  # another process finished the same cache first: keep its copy
                self.abort()
                return
            os.replace(self.tmp, self.final)
            _fsync(self.final.parent)
            logger.info("int8 cache written: %s", self.final)
        except OSError as exc:
            self._fail(self.final, exc)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_dead_temps(root: Path) -> None:
    """Temp folders of cache writes whose process is gone (killed mid-write)."""
    from .runfolder import _pid_alive

    for path in root.iterdir():
        match = _CACHE_TEMP.match(path.name)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def _remove(folder: Path) -> None:
    """Take a corrupt cache out of use first (rename), then delete it: a failed delete leaves nothing usable."""
    aside = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    try:
        os.replace(folder, aside)
    except OSError as exc:
        logger.warning("int8 cache: cannot remove %s (%s)", folder, exc.strerror or exc)
        return
    shutil.rmtree(aside, ignore_errors=True)

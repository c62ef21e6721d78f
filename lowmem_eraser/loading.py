"""Model loading that names the broken file: one ModelFileError line instead of a diffusers/transformers traceback.

`from_pretrained` on a truncated `*.safetensors` or a garbage `config.json` raises whatever the library raises
(OSError, SafetensorError, JSONDecodeError, ...), sometimes naming the file, sometimes not. On failure the
folder's JSON and safetensors files are checked (cheap: JSON parse, safetensors header) to name the culprit.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

from .errors import LowmemEraserError, ModelFileError


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0][:300] if text else "") or type(exc).__name__


def folder_json(model: str | os.PathLike, relative: str) -> dict:
    """A JSON object in a local model folder (`transformer/config.json`, `vae/config.json`, `model_index.json`);
    {} when it is missing or unreadable (the loaders name a broken file when they load the component)."""
    try:
        value = json.loads((Path(model) / relative).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def find_broken_file(folder: Path) -> tuple[Path, str] | None:
    """The first JSON or safetensors file in `folder` that does not parse, with the reason; None if all do."""
    import safetensors

    if not folder.is_dir():
        return None
    for path in sorted(folder.iterdir()):
        try:
            if path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
            elif path.suffix == ".safetensors":
                with safetensors.safe_open(path, "pt"):  # checks the header covers the whole file (truncation)
                    pass
        except Exception as exc:  # noqa: BLE001 - any failure to parse is what we are looking for
            kind = "JSON" if path.suffix == ".json" else "safetensors file (truncated or corrupt)"
            return path, f"not a valid {kind}: {_first_line(exc)}"
    return None


@contextlib.contextmanager
def model_files(folder: str | os.PathLike, what: str):
    """Turn any error raised while loading `what` from `folder` into one ModelFileError naming the file.

    Out-of-memory errors and our own errors pass through unchanged: they are not a broken file."""
    try:
        yield
    except (LowmemEraserError, MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as exc:
        broken = find_broken_file(Path(folder))
        if broken is not None:
            raise ModelFileError(f"{broken[0]}: cannot load the {what}: {broken[1]}") from exc
        raise ModelFileError(f"{folder}: cannot load the {what}: {_first_line(exc)}") from exc


def from_pretrained_or_error(cls, folder: str | os.PathLike, **kwargs):
    """`cls.from_pretrained(folder, **kwargs)`; a broken file becomes one ModelFileError naming it."""
    with model_files(folder, cls.__name__):
        return cls.from_pretrained(folder, **kwargs)

"""Nothing lost, nothing silent: the output folder of a training run.

- one run at a time: a lock file naming the holder's pid (a stale lock of a dead process is taken over);
- no silent overwrite: a folder that holds a run is refused unless the run resumes or `--overwrite` moves the old
  run aside (its content-keyed `cache/` is reused);
- temp files of a killed write are removed at the next start;
- checkpoints are folders `checkpoint/step-NNNNNN/`, written under a temp name and renamed into place (one unit,
  never half old and half new), the newest `train.keep_checkpoints` kept; resume takes the newest readable one;
- resume refuses a config that would change the result, listing each changed field;
- SIGINT, SIGTERM and SIGHUP end the run the same way: the step in progress is rewound, a checkpoint is saved
  once (signals arriving during the save wait for it), and the run ends with `TrainingInterrupted`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import time
from pathlib import Path

import torch

from .errors import RunFolderError, TrainingInterrupted, WriteError  # noqa: F401  (importable from here too)
from .serialization import atomic_write, write_error

logger = logging.getLogger(__name__)

LOCK = ".lock"
CHECKPOINTS = "checkpoint"
STATE = "training_state.pt"
# A folder holds a run when it has an eraser or a checkpoint; metrics alone (a run killed before its first
# checkpoint) hold nothing to lose: a new run rewrites them.
RUN_FILES = ("eraser_weights.pt", "eraser_weights.safetensors")
_TEMP = re.compile(r"^\..+\.tmp-\d+$")  # serialization.atomic_write's and save_checkpoint's temp names
_STEP = re.compile(r"^step-(\d+)$")


# --- the folder ------------------------------------------------------------------------------------------------


def holds_run(out: Path) -> bool:
    return any((out / name).exists() for name in RUN_FILES) or bool(checkpoint_folders(out))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """`output_dir/.lock` holding this process's pid, created exclusively; removed on release."""

    def __init__(self, out: Path):
        self.path = out / LOCK

    def acquire(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and holder != os.getpid() and _pid_alive(holder):
                    raise RunFolderError(
                        f"output_dir: {self.path.parent} is in use by another training run (pid {holder}); "
                        f"wait for it, stop it, or use another output_dir (lock file: {self.path})"
                    ) from None
                logger.warning("output_dir: removing the stale lock of pid %s (no longer running)", holder)
                self.path.unlink(missing_ok=True)
                continue
            except OSError as exc:
                raise RunFolderError(f"output_dir: cannot create {self.path}: {exc.strerror}") from None
            with os.fdopen(fd, "w") as handle:
                handle.write(str(os.getpid()))
            return
        raise RunFolderError(f"output_dir: could not take the lock {self.path}")

    def _holder(self) -> int | None:
        try:
            return int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self._holder() == os.getpid():
            self.path.unlink(missing_ok=True)


def remove_stale_temp_files(out: Path) -> list[Path]:
    """Temp files and folders that a killed write left behind (we hold the lock: nobody else is writing)."""
    removed = []
    for folder in (out, out / "cache", out / CHECKPOINTS, *sorted((out / "cache").glob("x0-*/"))):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if _TEMP.match(path.name):
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
                removed.append(path)
    if removed:
        logger.info("removed %d temp file(s) of an interrupted write: %s", len(removed),
                    ", ".join(str(p) for p in removed[:5]))
    return removed


def prepare(out: Path, resume: bool, overwrite: bool) -> RunLock:
    """Create/lock `out` and make it safe to write; returns the held lock (release it when the run ends)."""
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite contradict each other: pick one")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunFolderError(f"output_dir: cannot create {out}: {exc.strerror}") from None
    if not os.access(out, os.W_OK):
        raise RunFolderError(f"output_dir: {out} is not writable (permission denied)")
    lock = RunLock(out)
    lock.acquire()
    try:
        if not resume and holds_run(out):
            if not overwrite:
                raise RunFolderError(
                    f"output_dir: {out} already holds a run (an eraser or checkpoints); continue it with "
                    "--resume, replace it with --overwrite (the old run is moved aside), or pick another output_dir"
                )
            _move_aside(out)
        remove_stale_temp_files(out)
    except BaseException:
        lock.release()
        raise
    return lock


def _move_aside(out: Path) -> None:
    """--overwrite: the old run's files go to `<out>.replaced-<time>/`; nothing is deleted. `cache/` stays (its
    entries are keyed by their content: the new run reuses what still matches)."""
    aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    aside.mkdir()
    for path in out.iterdir():
        if path.name not in ("cache", LOCK):
            path.rename(aside / path.name)
    logger.warning("--overwrite: moved the previous run in %s to %s (cache/ kept and reused)", out, aside)


# --- checkpoints --------------------------------------------------------------------------------------------------


def checkpoint_folders(out: Path) -> list[Path]:
    """Complete checkpoints, newest first (a temp folder is never complete; the pre-rotation layout counts)."""
    root = out / CHECKPOINTS
    found = []
    if root.is_dir():
        for path in root.iterdir():
            match = _STEP.match(path.name)
            if match and (path / STATE).is_file():
                found.append((int(match.group(1)), path))
    if (root / STATE).is_file():  # a run written before checkpoints were rotated
        found.append((-1, root))
    return [path for _, path in sorted(found, key=lambda item: item[0], reverse=True)]


def save_checkpoint(out: Path, step: int, state: dict, write_eraser, keep: int) -> Path:
    """Write `state` (+ the eraser, via `write_eraser(folder)`) as `checkpoint/step-N/`: into a temp folder first,
    renamed into place when complete; then only the newest `keep` checkpoints stay."""
    root = out / CHECKPOINTS
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        atomic_write(tmp / STATE, lambda path: torch.save(state, path))  # maps a full disk etc. to one cause
        write_eraser(tmp)
        for path in tmp.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():  # the same step saved again (e.g. an interrupt right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as exc:  # atomic_write's WriteError, or mkdir/rename/fsync failing
        shutil.rmtree(tmp, ignore_errors=True)
        error = exc if isinstance(exc, WriteError) else write_error(tmp, exc)
        raise RunFolderError(f"checkpoint: cannot write {error.path}: {error.cause}; the previous checkpoint is "
                             "intact") from None
    for old in checkpoint_folders(out)[keep:]:
        shutil.rmtree(old) if old != root else (root / STATE).unlink(missing_ok=True)
    return final


def load_checkpoint(out: Path) -> tuple[dict, Path]:
    """The newest readable checkpoint's state; an unreadable one is skipped with a warning."""
    folders = checkpoint_folders(out)
    if not folders:
        raise RunFolderError(f"--resume: no checkpoint to resume from in {out / CHECKPOINTS}")
    for folder in folders:
        try:
            return torch.load(folder / STATE, weights_only=True), folder
        except Exception as exc:  # noqa: BLE001 -- a truncated or corrupt file: try the one before
            logger.warning("--resume: %s is unreadable (%s: %s); trying the checkpoint before it",
                           folder / STATE, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    raise RunFolderError(f"--resume: none of the {len(folders)} checkpoints in {out / CHECKPOINTS} is readable")


# --- what a resume may change -------------------------------------------------------------------------------------

# Fields that change the trained eraser; everything else (train.steps to extend a run, save/log cadence,
# keep_checkpoints, the memory switches that do not change numerics, tracking, validation) may change on resume.
RESULT_FIELDS = ("model", "concept", "eraser", "loss", "sampling", "video", "train.seed", "train.batch_size",
                 "train.lr", "train.grad_clip", "train.warmup_steps", "train.lr_schedule", "memory.dtype",
                 "memory.quantize")


def fingerprint(config_dict: dict, prompt_pairs: list) -> dict:
    """The values of RESULT_FIELDS (dotted names) plus a hash of the prompts' content. A config of several
    `concepts` has no `concept`: each entry's concept and eta instead (its prompts are in the hash)."""
    values = {}
    if "concepts" in config_dict:
        values["concepts"] = [{"concept": entry["concept"], "eta": entry.get("eta")}
                              for entry in config_dict["concepts"]]
    for name in RESULT_FIELDS:
        if name not in config_dict and name == "concept" and "concepts" in config_dict:
            continue
        value = config_dict
        for part in name.split("."):
            value = value[part]
        values[name] = value
    values["model"] = str(Path(values["model"]).resolve())
    values["prompts (content)"] = hashlib.sha256(json.dumps(prompt_pairs).encode()).hexdigest()[:16]
    return values


def check_resume(saved: dict | None, current: dict, saved_step: int, steps: int) -> None:
    """Refuse a resume whose config would change the result (each changed field: old -> new)."""
    if saved is not None:
        changed = [f"{name}: {_short(saved.get(name))} -> {_short(value)}"
                   for name, value in current.items() if saved.get(name) != value]
        if changed:
            raise RunFolderError(
                "--resume: the config changed fields that change the result, so the checkpoint cannot continue "
                "under it:\n  " + "\n  ".join(changed)
                + "\nrestore them, or start a new run (--overwrite, or another output_dir)"
            )
    if steps < saved_step:
        raise RunFolderError(
            f"--resume: the checkpoint is at step {saved_step} but train.steps is {steps}; raise train.steps "
            f"to at least {saved_step} (a run can be extended, not shortened)"
        )


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 120 else text[:117] + "..."


# --- signals ------------------------------------------------------------------------------------------------------

STOP_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)


class Stop(BaseException):
    """Raised in the main thread by a stop signal (a BaseException, like KeyboardInterrupt: nothing swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """While active, SIGINT/SIGTERM/SIGHUP raise `Stop` in the main thread, except inside `deferred()`, where
    the first one is remembered and raised when the block ends (a save is never cut in half) and repeats are
    ignored. Restores the previous handlers on exit. Only the main thread can install handlers: elsewhere
    (e.g. a notebook's worker thread) this is a no-op."""

    def __init__(self):
        self.pending: int | None = None
        self._deferring = 0
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        try:
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread
            self._previous = {}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        if self._deferring:
            if self.pending is None:
                self.pending = signum
                logger.warning("%s received: finishing the checkpoint first", signal.Signals(signum).name)
            return
        raise Stop(signum)

    @contextlib.contextmanager
    def deferred(self, swallow: bool = False):
        """Signals inside wait for the block to end; with `swallow` (the run is already stopping) they are
        dropped instead of raised afterwards."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
        if not self._deferring and self.pending is not None:
            signum, self.pending = self.pending, None
            if not swallow:
                raise Stop(signum)

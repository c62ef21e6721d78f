"""Project error types: one exception per bad input, naming the file or field at fault."""


class LowmemEraserError(Exception):
    """Base class of every error this package raises on bad input."""


class EraserFormatError(LowmemEraserError, ValueError):
    """An eraser checkpoint (file, folder or state) that cannot be used; the message names file and key."""


class ConfigError(LowmemEraserError, ValueError):
    """A bad configuration value; the message names the field."""


class MissingDependencyError(LowmemEraserError, ImportError):
    """An optional package a setting needs is not installed; the message names the `pip install` to run."""


class WriteError(LowmemEraserError, OSError):
    """A file could not be written (disk full, permission, read-only); names the file and the cause.

    Also an OSError, so code that already catches OSError around a save keeps working. `path` and `cause`
    let a caller put the same facts in its own words (the checkpoint save does)."""

    def __init__(self, message: str, path=None, cause: str = ""):
        super().__init__(message)
        self.path, self.cause = path, cause


class ModelFileError(LowmemEraserError):
    """A model file (config, weights, tokenizer) that cannot be loaded; names the file."""


class HostMemoryError(LowmemEraserError, MemoryError):
    """Not enough host RAM for what a setting pins or loads; raised before allocating, with the figures."""


class RunFolderError(LowmemEraserError):
    """The output folder cannot be used as asked (locked, holds a run, unwritable)."""


class TrainingError(LowmemEraserError):
    """Training cannot go on (e.g. the loss stayed non-finite, a rank of a multi-process run failed)."""


class TrainingInterrupted(LowmemEraserError):
    """The run was stopped by a signal; `message` says what was saved and how to continue."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for Ctrl-C, 143 for SIGTERM


class DistributedError(LowmemEraserError):
    """A multi-process launch that cannot work (batch split, processes vs GPUs, mixed devices)."""


class AttackError(LowmemEraserError, ValueError):
    """Attack settings that cannot work (vector count, steps) or a model the attack does not support."""


class PlanError(LowmemEraserError):
    """A bad `plan` argument; the message names it."""

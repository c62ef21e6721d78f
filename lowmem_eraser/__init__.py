"""lowmem-eraser: train T2VUnlearning concept erasers for CogVideoX on one consumer GPU."""

__version__ = "0.1.0"

from .adapter import (  # noqa: E402
    EraserAdapter,
    EraserSet,
    attach_erasers,
    detach_erasers,
    erasers_disabled,
    get_erasers,
    set_eraser_scale,
)
from .errors import ConfigError, EraserFormatError, LowmemEraserError  # noqa: E402
from .quantize import Int8Linear, quantize_base  # noqa: E402
from .serialization import load_erasers, read_erasers, save_erasers  # noqa: E402

__all__ = [
    "ConfigError",
    "EraserAdapter",
    "EraserFormatError",
    "EraserSet",
    "Int8Linear",
    "LowmemEraserError",
    "attach_erasers",
    "detach_erasers",
    "erasers_disabled",
    "get_erasers",
    "load_erasers",
    "quantize_base",
    "read_erasers",
    "save_erasers",
    "set_eraser_scale",
]

"""Fused Triton kernels for the eraser adapter and the int8 frozen base.

Each op falls back to its PyTorch reference where Triton cannot run (triton missing, or
neither a GPU nor the Triton interpreter), so importing this package never fails.
"""

import os

import torch

from .eraser_adapter import eraser_adapter, eraser_adapter_reference
from .int8_linear import int8_linear, int8_linear_reference

try:
    import triton as _triton
except ImportError:
    _triton = None

__all__ = ["eraser_adapter", "eraser_adapter_reference", "int8_linear", "int8_linear_reference", "triton_available"]


def triton_available() -> bool:
    """True when the Triton kernels can run here: triton imports and there is a GPU or the
    interpreter (``TRITON_INTERPRET=1``, set before triton is first imported) is on."""
    return _triton is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")

"""Fused Triton kernels for the eraser adapter and the int8 frozen base.

Each op falls back to its PyTorch reference where Triton cannot run (triton missing, neither a GPU nor the
Triton interpreter, or a GPU/Triton version the kernels fail on: see `utils.kernel_usable`), so importing
this package never fails.
"""

from .eraser_adapter import eraser_adapter, eraser_adapter_reference
from .int8_linear import int8_linear, int8_linear_reference
from .utils import triton_available

__all__ = ["eraser_adapter", "eraser_adapter_reference", "int8_linear", "int8_linear_reference", "triton_available"]

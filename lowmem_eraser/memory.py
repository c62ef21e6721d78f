"""Memory measurement that works without a GPU.

On CPU, process RSS overstates tensor memory 1.6-2.6x and is useless after warm-up. Counting the bytes of
live tensor storages from a dispatch mode agrees with the profiler's memory timeline to 0.1 MiB, so the
tests and the CPU progress bar measure that; on CUDA the allocator's own peak is exact.
"""

from __future__ import annotations

import ctypes
import logging
import os
import weakref
from contextlib import nullcontext
from typing import Iterable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

logger = logging.getLogger(__name__)


class LiveTensorTracker(TorchDispatchMode):
    """Counts the bytes of tensor storages that are alive, and their peak.

    Only storages allocated by an operator while the mode is active count: tensors that already existed
    (weights, inputs built before `with`) and views of them are invisible, which is what makes "activations of one pass"
    measurable. A storage is counted once however many views of it exist, and uncounted when it is freed
    (a finalizer on the storage object, which PyTorch keeps alive exactly as long as the storage).
    Works for CPU, CUDA and fake tensors.
    """

    def __init__(self):
        super().__init__()
        self._sizes: dict[int, int] = {}
        self.live_bytes = 0
        self.peak_bytes = 0

    def reset_peak(self) -> None:
        """Restart the peak from the bytes alive now."""
        self.peak_bytes = self.live_bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and id(leaf.untyped_storage()) not in inputs:
                self._track(leaf.untyped_storage())  # a new storage, not a view of (or in-place on) an input
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key, nbytes = id(storage), storage.nbytes()
        if key not in self._sizes:
            weakref.finalize(storage, self._release, key)
        self.live_bytes += nbytes - self._sizes.get(key, 0)  # also follows a storage resized in place
        self._sizes[key] = nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def _release(self, key: int) -> None:
        self.live_bytes -= self._sizes.pop(key)


class MemoryMeter:
    """Peak memory of the training steps, for the progress bar; wrap each step in `meter.step()`.

    CUDA: `torch.cuda.max_memory_allocated` since the meter was made (everything on the device, weights
    included). CPU: the peak of a LiveTensorTracker (tensors created inside the steps) over the first
    `cpu_steps` steps only: the tracker runs Python for every operator, which made toy-model steps several
    times slower, and a step's shapes are fixed, so later steps repeat its peak.
    """

    def __init__(self, device: torch.device | str, cpu_steps: int = 1):
        self.device = torch.device(device)
        self.cpu_steps = cpu_steps
        self._tracker = None if self.device.type == "cuda" else LiveTensorTracker()
        self._steps = 0
        if self._tracker is None:
            torch.cuda.reset_peak_memory_stats(self.device)

    def step(self):
        """A context manager around one training step."""
        measured = self._tracker is not None and self._steps < self.cpu_steps
        self._steps += 1
        return self._tracker if measured else nullcontext()

    @property
    def peak_bytes(self) -> int:
        if self._tracker is None:
            return torch.cuda.max_memory_allocated(self.device)
        return self._tracker.peak_bytes

    @property
    def reserved_bytes(self) -> int | None:
        """CUDA: the caching allocator's reserved peak (what the card must hold); None on CPU."""
        return torch.cuda.max_memory_reserved(self.device) if self._tracker is None else None


CUDA_ALLOC_CONF = "expandable_segments:True"


def configure_cuda_allocator() -> None:
    """Use expandable segments unless the user configured the allocator: a training step allocates and frees
    block-sized activations of changing sizes, which fragments fixed segments (reserved >> allocated).
    Read when CUDA's allocator starts, so this must run before the first CUDA allocation."""
    if "PYTORCH_CUDA_ALLOC_CONF" in os.environ or "PYTORCH_ALLOC_CONF" in os.environ:
        return
    if torch.cuda.is_initialized():
        logger.info(
            "CUDA already started: PYTORCH_CUDA_ALLOC_CONF=%s not applied", CUDA_ALLOC_CONF)
        return
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = CUDA_ALLOC_CONF


def tensor_bytes(module_or_tensors: nn.Module | Iterable[torch.Tensor]) -> int:
    """Bytes held by a module's parameters and buffers (or by some tensors), each storage counted once."""
    if isinstance(module_or_tensors, nn.Module):
        tensors = [*module_or_tensors.parameters(), *module_or_tensors.buffers()]
    else:
        tensors = list(module_or_tensors)
    storages = {id(s): s for s in (t.untyped_storage() for t in tensors)}
    return sum(s.nbytes() for s in storages.values())


HOST_RAM_RESERVE = 2**30  # left to the OS, the Python process and the page cache when pinning or loading


def mem_available_bytes() -> int | None:
    """Host RAM this process can still take without swapping or being OOM-killed: the kernel's `MemAvailable`,
    or less where a cgroup (a container, a job scheduler's slot: common on rented GPU hosts) limits the process
    to less. None where neither is known (not Linux): the callers then skip their check."""
    available = None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    limit = _cgroup_headroom()
    if limit is not None:
        available = limit if available is None else min(available, limit)
    return available


def _cgroup_headroom() -> int | None:
    """cgroup v2 `memory.max - memory.current` (or v1 `limit_in_bytes - usage_in_bytes`) of this process's
    cgroup; None when unlimited or unknown."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as limit, open(usage_file) as usage:
                text = limit.read().strip()
                if text == "max" or int(text) >= 2**60:  # v1 writes a huge number for "no limit"
                    return None
                return max(0, int(text) - int(usage.read().strip()))
        except (OSError, ValueError):
            continue
    return None


_MALLOC_TRIM = None  # glibc's malloc_trim, False where there is none (musl, macOS): found on first use


def return_freed_memory() -> None:
    """Hand freed host tensors back to the OS. Tensors under 32 MiB come from glibc's heap, and anything
    allocated after them pins the heap's top, so free() keeps their pages resident: measured on 6 blocks of 2b
    (lowram_load.py), RSS after loading was 1.9x the loaded model without this call, 1.0x (+96 MiB) with it.
    Called wherever a copy replaces host tensors (block-by-block loading, pinning streamed blocks)."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


def pinned_allocation_bytes(nbytes: int) -> int:
    """Host RAM that pinning `nbytes` takes: torch's caching host allocator rounds each block up to a power of two."""
    return 1 << max(nbytes - 1, 0).bit_length()


def host_ram_available() -> int | None:
    """Host RAM that can still be taken: MemAvailable minus HOST_RAM_RESERVE (None where unknown)."""
    available = mem_available_bytes()
    return None if available is None else max(0, available - HOST_RAM_RESERVE)

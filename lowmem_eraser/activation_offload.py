"""Activation offload (`memory.offload_activations`): what a student pass saves for backward waits in host RAM.

With gradient checkpointing, what a training step keeps on the GPU between forward and backward is mostly
each checkpointed block's saved inputs (5b at 49×480×720: 42 blocks × 17,776 tokens × 3072 × 2 B ≈ 4.6 GB).
torch's non-reentrant checkpoint saves those inputs through autograd's saved-tensor machinery *outside*
its own `saved_tensors_hooks` (torch 2.13: `_CheckpointFrame.save_inputs` → `_make_saved_tensor`, called
before the checkpoint pushes its hook), so an outer `torch.autograd.graph.saved_tensors_hooks` packs them
while everything saved inside a block still goes to the checkpoint (tests/test_activation_offload.py
checks this on the installed torch).

The mechanism is the stock one, `saved_tensors_hooks`. torch's own `save_on_cpu(pin_memory=True)` is not
used because it lacks what makes offload pay on one GPU (torchtune's `OffloadActivations` adds the first
three; none of them adds the rest):
- it copies on the compute stream, so every copy stalls compute; here copies run on a side stream and the
  device tensor is kept alive only until its copy has finished;
- it offloads parameters and tiny tensors too;
- backward brings each tensor back when it is needed and waits for it; here unpacking a tensor starts the
  copy of the one backward will need next (the previous one in pack order that is not on the device);
- a tensor saved by many blocks is copied once per save; here once (and one device copy serves the unpacks
  that happen while it is alive);
- it allocates fresh pinned memory every step and cannot tell when host RAM runs out (the kernel's OOM
  killer ends the run); here pinned buffers are pooled by (shape, stride, dtype) across steps and a new one
  is only allocated after checking `MemAvailable`, raising `HostMemoryError` with the figures otherwise.

Three modes share all of the bookkeeping above and differ only in how bytes move:
- "cuda": pinned host buffers, copies on a side stream with events;
- "emulate" (CPU, for tests): real, synchronous copies into host tensors made with the dispatch modes
  disabled, so an active LiveTensorTracker counts device memory exactly as it would on CUDA;
- "simulate" (for the planner under FakeTensorMode): no copy at all, a tensor is reduced to its
  shape/stride/dtype and unpacking allocates an empty one, so a fake step's tracked peak equals the emulated
  one.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes

from .errors import HostMemoryError, LowmemEraserError
from .memory import HOST_RAM_RESERVE, mem_available_bytes, pinned_allocation_bytes

logger = logging.getLogger(__name__)

MODES = ("cuda", "emulate", "simulate")
MIN_BYTES = 2**20  # smaller saved tensors stay where they are: a copy's fixed cost outweighs what it frees
HOST_RESERVE_BYTES = HOST_RAM_RESERVE  # host RAM left to everything else when the pool grows
MAX_IN_FLIGHT = 4  # a block saves 2-3 inputs: compute waits only if the copies fall a block behind
MiB = 2**20


def offload_activations(enabled: bool, device: torch.device | str, mode: str | None = None, *,
                        min_bytes: int = MIN_BYTES, host_reserve_bytes: int = HOST_RESERVE_BYTES,
                        model: nn.Module | None = None, max_in_flight: int = MAX_IN_FLIGHT):
    """A reusable context manager that offloads what autograd saves on `device` while it is entered.

    `enabled` False: a `contextlib.nullcontext()`. `mode` None picks "cuda" on a CUDA device; on any other
    device there is nothing to offload to (the activations already are in host memory), so it logs that and
    returns a nullcontext. "emulate" and "simulate": see the module docstring. Saved tensors smaller than
    `min_bytes`, `nn.Parameter`s and views of them, the buffers of `model` (when given; matched by storage,
    so streamed block weights count too) and tensors on other devices are left to autograd.
    `host_reserve_bytes`: host RAM the pool never takes (see `HostMemoryError`); `max_in_flight` (CUDA):
    forward copies whose device tensor may still be alive before compute waits for the oldest one.
    """
    if not enabled:
        return contextlib.nullcontext()
    device = torch.device(device)
    if mode is None:
        if device.type != "cuda":
            logger.info("offload_activations does nothing on %s: the activations already are in host memory",
                        device.type)
            return contextlib.nullcontext()
        mode = "cuda"
    return ActivationOffloader(device, mode, min_bytes=min_bytes, host_reserve_bytes=host_reserve_bytes,
                               model=model, max_in_flight=max_in_flight)


@dataclass
class OffloadCounters:
    """What an ActivationOffloader moved since it was made (or since `reset`)."""

    bytes_to_host: int = 0  # device -> host in forward, each offloaded tensor once
    bytes_to_device: int = 0  # host -> device in backward, prefetched or on demand
    host_pool_bytes: int = 0  # host buffers allocated (pinned on CUDA), in use or free for the next step
    offloaded: int = 0  # tensors copied to the host
    shared: int = 0  # saves of a tensor already offloaded in the same pass (no second copy)
    prefetched: int = 0  # host -> device copies started before their tensor was unpacked
    prefetch_hits: int = 0  # unpacks served by a prefetched copy
    on_demand: int = 0  # unpacks that had to start their copy themselves
    kept: int = 0  # unpacks served by a device tensor that was still alive (no copy)

    def reset(self) -> None:
        pool = self.host_pool_bytes  # the pool outlives a reset: it is memory held, not traffic
        for name in asdict(self):
            setattr(self, name, 0)
        self.host_pool_bytes = pool


class _Pass:
    """One entered forward: the offloaded tensors in pack order, and the saves shared between them."""

    def __init__(self):
        self.order: list[weakref.ref] = []  # weak: an entry lives exactly as long as autograd holds it
        self.shared: dict[tuple, weakref.ref] = {}


class _Entry:
    """One offloaded tensor: its host buffer and what is needed to bring it back. Autograd holds it (the
    pack hook returns it) until the last saved tensor referring to it is released; then its host buffer
    goes back to the pool."""

    def __init__(self, offloader, step: _Pass, tensor: torch.Tensor, storage, stride: tuple, host):
        self.offloader, self.step, self.index = offloader, step, len(step.order)
        self.shape, self.stride, self.dtype = tuple(tensor.shape), stride, tensor.dtype
        self.nbytes = tensor.numel() * tensor.element_size()
        self.pool_key = (self.shape, stride, self.dtype)
        self.host = host
        self.original = weakref.ref(tensor)  # still alive at unpack (and unchanged): no copy needed
        self.version = tensor._version
        self.storage = weakref.ref(storage)  # a shared-save hit is only valid while this storage lives
        # simulate: new device tensors are made from this one, so that they are fake in its fake mode
        self.stub = tensor.new_empty(0) if offloader.mode == "simulate" else None
        self.prefetched: torch.Tensor | None = None
        self.ready = None  # CUDA event: the prefetched copy has landed
        # The storage of the device copy handed to autograd last. Not the tensor: autograd keeps a shallow copy
        # of what the unpack hook returns, so the returned object dies at once while its storage lives on.
        self.unpacked: weakref.ref | None = None
        self.consumed = False  # brought back once already: prefetching it again would only duplicate it
        # Saved again after later tensors (Wan's text states, saved by every block): its pack index says
        # nothing about where backward is, so unpacking it must not start a prefetch.
        self.shared_later = False

    def empty(self, shape: tuple = None, stride: tuple = None) -> torch.Tensor:
        """A new, uninitialised device tensor of this entry's dtype (of its shape and strides by default)."""
        shape, stride = shape or self.shape, stride or self.stride
        if self.stub is not None:
            return self.stub.new_empty_strided(shape, stride)
        return torch.empty_strided(shape, stride, dtype=self.dtype, device=self.offloader.device)

    def resident(self) -> bool:
        """Whether a device tensor holding this entry's values is alive (the original, or a device copy)."""
        original = self.original()
        if original is not None and original._version == self.version:
            return True
        return self.unpacked is not None and self.unpacked() is not None

    def alive(self) -> torch.Tensor | None:
        """That device tensor, if there is one."""
        original = self.original()
        if original is not None and original._version == self.version:
            return original.detach()
        storage = self.unpacked() if self.unpacked is not None else None
        if storage is None:
            return None
        return self.empty((0,), (1,)).set_(storage, 0, self.shape, self.stride)

    def __del__(self):
        self.offloader._give_back(self.pool_key, self.host)


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, step = [], 1
    for size in reversed(shape):
        stride.append(step)
        step *= max(size, 1)
    return tuple(reversed(stride))


def _dense_stride(tensor: torch.Tensor) -> tuple[int, ...]:
    """The tensor's own strides if its elements fill their span without gaps or overlap (contiguous or
    permuted: copies are then one memcpy, and backward sees the layout it would have seen), else the
    contiguous strides (what `empty_like` decides)."""
    expected = 1
    for d in sorted(range(tensor.dim()), key=tensor.stride):
        if tensor.shape[d] == 1:
            continue
        if tensor.stride(d) != expected:
            return _contiguous_stride(tuple(tensor.shape))
        expected *= tensor.shape[d]
    return tuple(tensor.stride())


class ActivationOffloader:
    """The context manager `offload_activations` returns when on; enter it around each pass that builds a
    graph, run backward after leaving it. Reusable across passes and steps (the host pool is kept)."""

    def __init__(self, device: torch.device | str, mode: str, min_bytes: int = MIN_BYTES,
                 host_reserve_bytes: int = HOST_RESERVE_BYTES, model: nn.Module | None = None,
                 max_in_flight: int = MAX_IN_FLIGHT):
        if mode not in MODES:
            raise LowmemEraserError(f"offload_activations: mode must be one of {', '.join(MODES)}, got {mode!r}")
        device = torch.device(device)
        if mode == "cuda":
            if device.type != "cuda" or not torch.cuda.is_available():
                raise LowmemEraserError(f"offload_activations: mode 'cuda' needs a CUDA device, got {device}")
            if device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
        self.device, self.mode, self.min_bytes = device, mode, min_bytes
        self.host_reserve_bytes, self.model, self.max_in_flight = host_reserve_bytes, model, max(1, max_in_flight)
        self.counters = OffloadCounters()
        self._pool: dict[tuple, list] = {}
        self._step: _Pass | None = None
        self._hooks = None
        self._model_storages: set[int] = set()
        self._in_flight: list[tuple[object, torch.Tensor]] = []  # CUDA: (copy done event, device tensor)
        self._stream = torch.cuda.Stream(device) if mode == "cuda" else None
        self._reported = False

    def __enter__(self) -> "ActivationOffloader":
        if self._step is not None:
            raise LowmemEraserError("offload_activations: this context is already entered")
        if self.model is not None:  # collected per pass: streamed blocks rebind their tensors
            self._model_storages = {id(t.untyped_storage()) for t in (*self.model.parameters(),
                                                                       *self.model.buffers())}
        self._step = _Pass()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self._hooks.__exit__(*exc_info)
        self._hooks, self._step, self._model_storages = None, None, set()
        if self._in_flight and self.mode == "cuda":  # the last copies: compute waits, then their memory is free
            self._release_copied(wait=len(self._in_flight))
        self._in_flight = []
        if not self._reported:
            self._reported = True
            logger.log(logging.DEBUG if self.mode == "simulate" else logging.INFO,
                       "activation offload (%s): %.1f MiB of %d saved tensors to host, host pool %.1f MiB",
                        self.mode, self.counters.bytes_to_host / MiB, self.counters.offloaded,
                        self.counters.host_pool_bytes / MiB)

    # -- pack: forward -------------------------------------------------------------------------------------
    def _offloadable(self, tensor: torch.Tensor) -> bool:
        if tensor.layout != torch.strided or tensor.device != self.device:
            return False
        if isinstance(tensor, nn.Parameter) or isinstance(tensor._base, nn.Parameter):  # F.linear saves weight.t()
            return False
        if self.mode != "simulate" and type(tensor) is not torch.Tensor:  # subclasses own their storage layout
            return False
        if tensor.numel() * tensor.element_size() < max(self.min_bytes, 1):
            return False
        return id(tensor.untyped_storage()) not in self._model_storages

    def _pack(self, tensor: torch.Tensor):
        if not self._offloadable(tensor):
            # detached: returning an output itself would make output -> grad_fn -> saved -> output a cycle
            return tensor.detach()
        storage = tensor.untyped_storage()
        key = (id(storage), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype,
               tensor._version)
        step = self._step
        hit = step.shared.get(key)
        entry = hit() if hit is not None else None
        if entry is not None and entry.storage() is storage:
            self.counters.shared += 1
            entry.shared_later = entry.shared_later or entry.index != len(step.order) - 1
            return entry
        stride = _dense_stride(tensor)
        host = self._take(tuple(tensor.shape), stride, tensor.dtype)
        entry = _Entry(self, step, tensor, storage, stride, host)
        step.order.append(weakref.ref(entry))
        step.shared[key] = weakref.ref(entry)
        self._to_host(tensor, host)
        self.counters.offloaded += 1
        self.counters.bytes_to_host += entry.nbytes
        return entry

    def _to_host(self, tensor: torch.Tensor, host) -> None:
        if self.mode != "cuda":
            if self.mode == "emulate":
                with _disable_current_modes(), torch.no_grad():
                    host.copy_(tensor.detach())
            # On CUDA the CPU runs ahead of the copies, so up to `max_in_flight` device tensors wait for theirs;
            # the emulated and simulated device memory keeps as many alive (the worst case) so that what they
            # measure and predict is what a CUDA run can reach.
            self._in_flight.append((None, tensor.detach()))
            del self._in_flight[: -self.max_in_flight]
            return
        compute = torch.cuda.current_stream(self.device)
        self._release_copied()
        self._stream.wait_stream(compute)  # the tensor is complete on the compute stream
        with torch.cuda.stream(self._stream), torch.no_grad():
            host.copy_(tensor.detach(), non_blocking=True)
            done = self._stream.record_event()
        # Kept alive until the copy is done: its memory belongs to the compute stream, which could reuse it
        # while the side stream still reads it (torchtune's forward stash).
        self._in_flight.append((done, tensor.detach()))
        if len(self._in_flight) > self.max_in_flight:
            self._release_copied(wait=len(self._in_flight) - self.max_in_flight)

    def _release_copied(self, wait: int = 0) -> None:
        """Drop the device tensors whose copy has finished; for the oldest `wait` ones, make the compute
        stream wait for their copy first (then the allocator may reuse the memory on that stream at once)."""
        compute = torch.cuda.current_stream(self.device)
        still = []
        for i, (done, tensor) in enumerate(self._in_flight):
            if i < wait:
                compute.wait_event(done)
            elif not done.query():
                still.append((done, tensor))
        self._in_flight = still

    # -- the host pool -------------------------------------------------------------------------------------
    def _buffer_bytes(self, key: tuple) -> int:
        shape, _, dtype = key
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        # simulate predicts a CUDA run, so it counts what CUDA would pin
        return pinned_allocation_bytes(nbytes) if self.mode in ("cuda", "simulate") else nbytes

    def _take(self, shape: tuple, stride: tuple, dtype: torch.dtype):
        key = (shape, stride, dtype)
        free = self._pool.setdefault(key, [])
        if free:
            return free.pop()
        nbytes = self._buffer_bytes(key)
        if self.mode != "simulate":
            self._check_host_memory(nbytes, shape, dtype)
        self.counters.host_pool_bytes += nbytes
        if self.mode == "simulate":
            return None  # nothing is copied: the pool only counts what the real run would pin
        with _disable_current_modes():  # emulate: host memory must not count as device memory
            return torch.empty_strided(shape, stride, dtype=dtype, device="cpu", pin_memory=self.mode == "cuda")

    def _give_back(self, key: tuple, host) -> None:
        # Reuse needs no wait: on CUDA every copy touching a pinned buffer runs on the one side stream.
        self._pool.setdefault(key, []).append(host)

    def _check_host_memory(self, nbytes: int, shape: tuple, dtype: torch.dtype) -> None:
        available = mem_available_bytes()
        if available is None or nbytes <= available - self.host_reserve_bytes:
            return
        raise HostMemoryError(
            f"activation offload: the host pool needs {nbytes / MiB:.1f} MiB more "
            f"{'pinned ' if self.mode == 'cuda' else ''}RAM for a saved {str(dtype).removeprefix('torch.')} "
            f"tensor of shape {list(shape)} (pool so far {self.counters.host_pool_bytes / MiB:.1f} MiB), but "
            f"MemAvailable is {available / MiB:.1f} MiB and {self.host_reserve_bytes / MiB:.1f} MiB stay reserved "
            "for the rest of the system. Free host RAM, train a shorter or smaller video, or set "
            "memory.offload_activations: false"
        )

    # -- unpack: backward ----------------------------------------------------------------------------------
    def _unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        entry = packed
        alive = entry.alive()
        if alive is not None:
            self.counters.kept += 1
            return alive
        if entry.prefetched is not None:
            tensor, entry.prefetched = entry.prefetched, None
            self.counters.prefetch_hits += 1
        else:
            self._fetch(entry)
            tensor, entry.prefetched = entry.prefetched, None
            self.counters.on_demand += 1
        if self.mode == "cuda":
            torch.cuda.current_stream(self.device).wait_event(entry.ready)
        entry.ready = None
        entry.unpacked, entry.consumed = weakref.ref(tensor.untyped_storage()), True
        if not entry.shared_later:  # its neighbour in pack order would come back blocks too early
            self._prefetch_before(entry)
        return tensor

    def _prefetch_before(self, entry: _Entry) -> None:
        """Start bringing back the nearest tensor before `entry` in pack order that is not on the device:
        backward unpacks roughly in reverse pack order (a checkpointed block's inputs in argument order,
        the blocks last to first), so that is the one it needs next that is not already coming."""
        order = entry.step.order
        for index in range(entry.index - 1, -1, -1):
            other = order[index]()
            if other is None or other.consumed or other.prefetched is not None or other.resident():
                continue
            self._fetch(other)
            self.counters.prefetched += 1
            return

    def _fetch(self, entry: _Entry) -> None:
        """Copy `entry` from the host into a new device tensor, `entry.prefetched`."""
        self.counters.bytes_to_device += entry.nbytes
        if self.mode == "simulate":
            entry.prefetched = entry.empty()
            return
        if self.mode == "emulate":
            tensor = entry.empty()
            with torch.no_grad():
                tensor.copy_(entry.host)
            entry.prefetched = tensor
            return
        # Allocated on the compute stream, whose cached pool holds the activations forward freed (a side-stream
        # allocation would grow a second pool and, under pressure, flush the cache with a device sync). The side
        # stream waits for the compute queued so far -- the memory may be a block that work still reads --
        # and so the copy overlaps with the backward of the block about to run.
        compute = torch.cuda.current_stream(self.device)
        tensor = entry.empty()
        self._stream.wait_stream(compute)
        with torch.cuda.stream(self._stream), torch.no_grad():
            tensor.copy_(entry.host, non_blocking=True)
            entry.ready = self._stream.record_event()
        tensor.record_stream(self._stream)  # the side stream writes it: not reusable before that is done
        entry.prefetched = tensor

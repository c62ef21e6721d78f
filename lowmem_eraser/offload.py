"""Streamed block weights (`offload: blocks`): only two transformer blocks' base weights on the GPU at a time.

Each block's frozen parameters and buffers live in one flat pinned CPU buffer. A forward pre-hook on every
block copies the block into one of two device slots (ring of two) and points the block's tensors at views
of that slot, then starts copying the next block into the other slot on a side stream while this one
computes. The next block is i+1 while blocks run forward and i-1 while checkpoint recomputation runs them
backwards.

Training relies on gradient checkpointing: the checkpointed forward saves nothing, and the recomputation
during backward runs the block again, so its pre-hook fetches the weights again. Nothing depends on autograd
keeping streamed weights alive (accelerate's and diffusers' offloading do, see SPEC §5). If a saved
reference to a slot view does outlive its block anyway, backward raises instead of computing wrong
gradients: copying into a slot bumps the slot's version counter, which every view of it shares, and autograd
checks that counter when it unpacks a saved tensor ("modified by an inplace operation").
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .errors import LowmemEraserError

_ALIGN = 256  # bytes; every tensor starts aligned in the flat buffers (CUDA kernels want 16+)


@dataclass
class _Entry:
    """One unique tensor of a block: where it sits in the block's flat buffer, and every name it is bound to."""

    owners: list[tuple[nn.Module, str]]  # (module, attribute name)
    is_param: bool
    dtype: torch.dtype
    shape: torch.Size
    offset: int
    nbytes: int
    device: torch.device
    requires_grad: bool


def aligned_bytes(tensor: torch.Tensor) -> int:
    """Bytes `tensor` takes in a block's flat buffer: its size rounded up to the alignment."""
    return -(-(tensor.numel() * tensor.element_size()) // _ALIGN) * _ALIGN


def _block_entries(block: nn.Module) -> tuple[list[_Entry], int]:
    """Index a block's parameters and buffers (tied tensors once); returns the entries and the buffer size."""
    entries: dict[int, _Entry] = {}
    size = 0
    for module in block.modules():
        for table, is_param in ((module._parameters, True), (module._buffers, False)):
            for name, tensor in table.items():
                if tensor is None:
                    continue
                if type(tensor) not in (torch.Tensor, nn.Parameter):
                    raise LowmemEraserError(
                        f"offload: blocks cannot stream {type(tensor).__module__}.{type(tensor).__name__} "
                        f"({type(module).__name__}.{name}); quantize with backend 'int8' or 'triton' instead of 'bnb'"
                    )
                if id(tensor) not in entries:
                    nbytes = tensor.numel() * tensor.element_size()
                    entries[id(tensor)] = _Entry(
                        [], is_param, tensor.dtype, tensor.shape, size, nbytes, tensor.device, tensor.requires_grad
                    )
                    size += aligned_bytes(tensor)
                entries[id(tensor)].owners.append((module, name))
    return list(entries.values()), size


def _view(flat: torch.Tensor, entry: _Entry) -> torch.Tensor:
    return flat[entry.offset : entry.offset + entry.nbytes].view(entry.dtype).view(entry.shape)


def _set(entry: _Entry, tensor: torch.Tensor) -> None:
    for module, name in entry.owners:
        (module._parameters if entry.is_param else module._buffers)[name] = tensor


def _bind(entries: list[_Entry], flat: torch.Tensor) -> None:
    """Point every owner of every entry at its view of `flat` (a host buffer or a device slot)."""
    for entry in entries:
        view = _view(flat, entry)  # shares `flat`'s version counter, and so does a Parameter made from it
        _set(entry, nn.Parameter(view, requires_grad=False) if entry.is_param else view)


class BlockOffloader:
    """Streams the base weights of `transformer.transformer_blocks` from CPU through two device slots.

    `stream` defaults to True on CUDA and False elsewhere, where the offloader is a no-op (with a warning):
    on CPU the weights are already in host memory. `stream=True` on CPU performs the real slot copies
    (synchronously, no pinning), which is how the tests check that streaming changes no number.
    Everything outside the blocks (embeddings, final norm, `proj_out`) stays where the caller put it. Do not
    move the transformer between `attach()` and `detach()`.
    """

    def __init__(self, transformer: nn.Module, device: torch.device | str, stream: bool | None = None):
        self.transformer = transformer
        self.device = torch.device(device)
        self.enabled = self.device.type == "cuda" if stream is None else stream
        self._hooks = []

    def __enter__(self) -> "BlockOffloader":
        self.attach()
        return self

    def __exit__(self, *exc_info) -> None:
        self.detach()

    @property
    def slot_bytes(self) -> int:
        """Device bytes held by the slots (two of the largest block)."""
        return sum(slot.nbytes for slot in self._slots) if self._hooks else 0

    def attach(self) -> None:
        """Move every block's tensors into its flat host buffer, allocate the slots and install the hooks."""
        if self._hooks:
            raise LowmemEraserError("BlockOffloader is already attached; call detach() first")
        if not self.enabled:
            warnings.warn(f"offload: blocks does nothing on {self.device.type}: the weights are already in host memory")
            return
        blocks = list(getattr(self.transformer, "transformer_blocks", None) or [])
        if not blocks:
            raise LowmemEraserError(f"{type(self.transformer).__name__} has no `transformer_blocks` to offload")
        indexed = [_block_entries(block) for block in blocks]  # raises before anything has moved
        pin = self.device.type == "cuda"
        self._entries, self._host = [], []
        for entries, size in indexed:
            host = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
            for entry in entries:
                module, name = entry.owners[0]
                _view(host, entry).copy_(getattr(module, name).detach())
            _bind(entries, host)  # the originals are released here
            self._entries.append(entries)
            self._host.append(host)
        largest = max(host.numel() for host in self._host)
        self._slots = [torch.empty(largest, dtype=torch.uint8, device=self.device) for _ in blocks[:2]]
        self._resident: list[int | None] = [None] * len(self._slots)
        self._ready: list[torch.cuda.Event | None] = [None] * len(self._slots)
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._last, self._step = None, 1
        self._hooks = [block.register_forward_pre_hook(self._make_pre_hook(i)) for i, block in enumerate(blocks)]

    def detach(self) -> None:
        """Remove the hooks and give every block ordinary tensors again, on their original devices."""
        if not self.enabled:
            return
        if not self._hooks:
            raise LowmemEraserError("BlockOffloader is not attached")
        if self._copy_stream is not None:
            self._copy_stream.synchronize()
        for hook in self._hooks:
            hook.remove()
        for entries, host in zip(self._entries, self._host):
            for entry in entries:
                tensor = _view(host, entry).to(entry.device, copy=True)
                _set(entry, nn.Parameter(tensor, requires_grad=entry.requires_grad) if entry.is_param else tensor)
        self._hooks, self._entries, self._host, self._slots = [], [], [], []

    def _make_pre_hook(self, index: int):
        return lambda module, args: self._fetch(index)

    def _fetch(self, index: int) -> None:
        """Make block `index` resident and bound to its slot, then prefetch its neighbour in the direction of travel."""
        if torch.is_grad_enabled() and not getattr(self.transformer, "gradient_checkpointing", False):
            raise LowmemEraserError(
                "offload: blocks needs gradient checkpointing for passes with autograd: call "
                "transformer.enable_gradient_checkpointing(), or run frozen passes under torch.no_grad()"
            )
        slot = index % len(self._slots)
        if self._resident[slot] != index:
            self._copy(index, slot)
        if self._ready[slot] is not None:
            torch.cuda.current_stream(self.device).wait_event(self._ready[slot])
        if self._last is not None and index != self._last:
            self._step = 1 if index > self._last else -1
        if not 0 <= index + self._step < len(self._host):
            self._step = -self._step  # at either end the next pass (or the recomputation) turns round
        self._last = index
        neighbour = index + self._step
        if 0 <= neighbour < len(self._host) and self._resident[neighbour % len(self._slots)] != neighbour:
            self._copy(neighbour, neighbour % len(self._slots))

    def _copy(self, index: int, slot: int) -> None:
        """Copy block `index` into `slot` (on the side stream on CUDA) and bind the block to it."""
        evicted = self._resident[slot]
        if evicted is not None:
            _bind(self._entries[evicted], self._host[evicted])
        host, target = self._host[index], self._slots[slot][: self._host[index].numel()]
        if self._copy_stream is None:
            target.copy_(host)
        else:
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))  # the slot's last reader is done
            with torch.cuda.stream(self._copy_stream):
                target.copy_(host, non_blocking=True)
                self._ready[slot] = torch.cuda.Event()
                self._ready[slot].record()
        _bind(self._entries[index], self._slots[slot])
        self._resident[slot] = index

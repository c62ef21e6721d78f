"""Streamed block weights (`memory.offload: all | N`): the base weights of N transformer blocks (all of them, or
the first N) live in host memory and pass through two device slots; the other blocks stay resident.

Each streamed block's frozen parameters and buffers live in one flat pinned CPU buffer. A forward pre-hook on
every block (streamed or not: resident blocks are where the next pass's first streamed blocks get prefetched)
predicts the next streamed blocks in visit order, copies them into free slots on a side stream while the
current block computes, and points each block's tensors at views of its slot. Visit order: ascending while
blocks run forward, descending while checkpoint recomputation runs them in backward; at the last block a pass
with autograd (the student forward, or a recomputation) turns round and a no-grad pass (the teacher passes,
which follow each other) starts again at block 0.

Which blocks stream: the first N or the last N copy the same bytes per step (tests/test_offload.py: 7N - 8
block copies per eraser step with beta > 0 for N > 2; N <= 2 blocks simply stay in the slots) and, after the
first visit, every copy is issued before its block is needed (`misses` stays 0). The first N are the default:
the stretch of resident blocks that ends every forward pass is where the next pass's first streamed blocks
are copied, so that copy has the most compute to hide behind; which overlaps better on a real GPU is for
bench/gpu_check.sh to measure (not measured yet).

Training relies on gradient checkpointing: the checkpointed forward saves nothing, and the recomputation
during backward runs the block again, so its pre-hook fetches the weights again. Nothing depends on autograd
keeping streamed weights alive (accelerate's and diffusers' offloading do, see SPEC §5). Outside any
`saved_tensors_hooks`, a saved reference to a slot view that outlives its block makes backward raise instead of
computing wrong gradients: copying into a slot bumps the slot's version counter, which every view of it shares,
and autograd checks that counter when it unpacks a saved tensor ("modified by an inplace operation").
Under hooks (checkpointing, activation offload) autograd does not check it, so what protects training is the
checkpointed forward saving nothing and `_visit` refusing a streamed block in a graph-building pass without
checkpointing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .errors import HostMemoryError, LowmemEraserError
from .families import repeated_blocks
from .memory import return_freed_memory

logger = logging.getLogger(__name__)

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


def streamed_indices(count: int, depth: int, placement: str = "first") -> range:
    """The indices of the `count` streamed blocks of a `depth`-block model: what BlockOffloader streams, and so
    what a loader must leave on the host for it."""
    return range(count) if placement == "first" else range(depth - count, depth)


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
                        f"memory.offload cannot stream {type(tensor).__module__}.{type(tensor).__name__} "
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
    """Streams the base weights of the transformer's repeated blocks (CogVideoX: `transformer_blocks`; any
    registered family's, in execution order: families/) from CPU through two device slots.

    `blocks`: how many blocks stream (None: all); `placement`: which ones, the `first` N or the `last` N.
    The others are moved to `device` and stay there. `stream` defaults to True on CUDA and False elsewhere,
    where the offloader is a no-op (with a warning): on CPU the weights are already in host memory.
    `stream=True` on CPU performs the real slot copies (synchronously, no pinning), which is how the tests check
    that streaming changes no number. Everything outside the blocks (embeddings, final norm, `proj_out`) stays
    where the caller put it. Do not move the transformer between `attach()` and `detach()`.
    Counters (since attach): `copies` and `bytes_copied` host -> device, `misses`: copies issued only when the
    block was already needed (not prefetched; on CUDA the compute waits for them).
    """

    def __init__(self, transformer: nn.Module, device: torch.device | str, stream: bool | None = None,
                 blocks: int | None = None, placement: Literal["first", "last"] = "first"):
        self.transformer = transformer
        self.device = torch.device(device)
        self.enabled = self.device.type == "cuda" if stream is None else stream
        if placement not in ("first", "last"):
            raise LowmemEraserError(f"BlockOffloader placement must be 'first' or 'last', got {placement!r}")
        self.blocks, self.placement = blocks, placement
        self._hooks = []
        self.copies = self.bytes_copied = self.misses = 0

    def __enter__(self) -> "BlockOffloader":
        self.attach()
        return self

    def __exit__(self, *exc_info) -> None:
        self.detach()

    @property
    def slot_bytes(self) -> int:
        """Device bytes held by the slots (two of the largest streamed block)."""
        return sum(slot.nbytes for slot in self._slots) if self._hooks else 0

    @property
    def host_bytes(self) -> int:
        """Host bytes of the streamed blocks' flat buffers (pinned on CUDA)."""
        return sum(host.numel() for host in self._host.values()) if self._hooks else 0

    def attach(self) -> None:
        """Move every streamed block's tensors into its flat host buffer, allocate the slots, move the resident
        blocks to the device and install the hooks."""
        if self._hooks:
            raise LowmemEraserError("BlockOffloader is already attached; call detach() first")
        if not self.enabled:
            logger.warning("offload does nothing on %s: the weights are already in host memory", self.device.type)
            return
        blocks = repeated_blocks(self.transformer)
        if not blocks:
            raise LowmemEraserError(f"{type(self.transformer).__name__} has no blocks to offload")
        count = len(blocks) if self.blocks is None else self.blocks
        if not 0 <= count <= len(blocks):
            raise LowmemEraserError(
                f"memory.offload: {self.blocks} blocks to stream, but the model has {len(blocks)} blocks "
                f"(use 0..{len(blocks)}, or `all`)")
        streamed = streamed_indices(count, len(blocks), self.placement)
        indexed = {i: _block_entries(blocks[i]) for i in streamed}  # raises before anything has moved
        pin = self.device.type == "cuda"
        if pin and indexed:
            _check_host_ram(blocks, indexed)
        self._entries, self._host = {}, {}
        for i, (entries, size) in indexed.items():
            host = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
            for entry in entries:
                module, name = entry.owners[0]
                _view(host, entry).copy_(getattr(module, name).detach())
            _bind(entries, host)  # the originals are released here
            return_freed_memory()  # ... and their pages given back, or the host would hold every block twice
            self._entries[i], self._host[i] = entries, host
        self._resident_devices = {}
        for i, block in enumerate(blocks):
            if i not in indexed:
                first = next(iter([*block.parameters(), *block.buffers()]), None)
                self._resident_devices[i] = first.device if first is not None else self.device
                block.to(self.device)
        self._order = sorted(indexed)
        largest = max((host.numel() for host in self._host.values()), default=0)
        self._slots = [torch.empty(largest, dtype=torch.uint8, device=self.device) for _ in self._order[:2]]
        self._in_slot: list[int | None] = [None] * len(self._slots)  # the streamed block each slot holds
        self._ready: list[torch.cuda.Event | None] = [None] * len(self._slots)
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._count, self._last, self._direction = len(blocks), None, 1
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
        for i, entries in self._entries.items():
            for entry in entries:
                tensor = _view(self._host[i], entry).to(entry.device, copy=True)
                _set(entry, nn.Parameter(tensor, requires_grad=entry.requires_grad) if entry.is_param else tensor)
        blocks = repeated_blocks(self.transformer)
        for i, device in self._resident_devices.items():
            blocks[i].to(device)
        self._hooks, self._entries, self._host, self._slots = [], {}, {}, []

    def _make_pre_hook(self, index: int):
        return lambda module, args: self._visit(index)

    def _predicted(self, index: int) -> list[int]:
        """The streamed blocks after `index`, in the order the passes are expected to visit them."""
        n, d = self._count, self._direction
        ahead = range(index + d, n if d > 0 else -1, d)
        if torch.is_grad_enabled():  # a graph-building pass or a recomputation turns round at the end
            after = range(n - 1, -1, -1) if d > 0 else range(n)
        else:  # frozen (teacher, sampling) passes follow each other
            after = range(n) if d > 0 else range(n - 1, -1, -1)
        order = []
        for i in (*ahead, *after):
            if i in self._host and i != index and i not in order:
                order.append(i)
                if len(order) == len(self._slots):
                    break
        return order

    def _next_direction(self, index: int) -> int:
        """+1 while a pass runs forward, -1 while backward recomputes the blocks in reverse. Frozen passes only
        run forward; with autograd on, a step back is a recomputation and a jump starts a pass at its end."""
        last = self._last
        if not torch.is_grad_enabled() or last is None or index == last + 1:
            return 1
        if index == last - 1:
            return -1
        if index == last:  # the same block twice: the pass turned round there (or a one-block model)
            return -1 if index == self._count - 1 else 1 if index == 0 else self._direction
        return 1 if index == 0 else -1

    def _visit(self, index: int) -> None:
        """Before block `index` runs: make it resident if it is streamed, then prefetch what comes next."""
        streamed = index in self._host
        if streamed and torch.is_grad_enabled() and not getattr(self.transformer, "gradient_checkpointing", False):
            raise LowmemEraserError(
                "memory.offload needs gradient checkpointing for passes with autograd: call "
                "transformer.enable_gradient_checkpointing(), or run frozen passes under torch.no_grad()"
            )
        self._direction = self._next_direction(index)
        self._last = index
        upcoming = self._predicted(index)
        if len(self._slots) == 0:
            return
        if streamed:
            if index not in self._in_slot:
                self.misses += 1
                self._copy(index, keep=upcoming[:1])
            slot = self._in_slot.index(index)
            if self._ready[slot] is not None:
                torch.cuda.current_stream(self.device).wait_event(self._ready[slot])
            upcoming = upcoming[: len(self._slots) - 1]
        for nxt in upcoming:
            if nxt not in self._in_slot:  # never evict the current block or one that is needed sooner or as soon
                self._copy(nxt, keep=([index] if streamed else []) + upcoming)

    def _copy(self, index: int, keep: list[int]) -> None:
        """Copy block `index` into a slot that holds none of `keep` (on the side stream on CUDA) and bind the
        block to it. The slot's previous block goes back to its host views."""
        slot = next(s for s, held in enumerate(self._in_slot) if held not in keep)
        evicted = self._in_slot[slot]
        if evicted is not None:
            _bind(self._entries[evicted], self._host[evicted])
        host = self._host[index]
        target = self._slots[slot][: host.numel()]
        if self._copy_stream is None:
            target.copy_(host)
        else:
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))  # the slot's last reader is done
            with torch.cuda.stream(self._copy_stream):
                target.copy_(host, non_blocking=True)
                self._ready[slot] = torch.cuda.Event()
                self._ready[slot].record()
        _bind(self._entries[index], self._slots[slot])
        self._in_slot[slot] = index
        self.copies += 1
        self.bytes_copied += host.numel()


def _check_host_ram(blocks: list[nn.Module], indexed: dict) -> None:
    """Pinned memory cannot be swapped out: refuse before pinning more than the host has. The blocks' current
    host tensors are freed block by block as their pinned copies are made, so the new memory needed is what the
    blocks do not already hold on the CPU, plus one block in flight."""
    from .memory import host_ram_available, pinned_allocation_bytes

    need = sum(pinned_allocation_bytes(size) for _, size in indexed.values())  # CUDA rounds pinned sizes up
    held = sum(entry.nbytes for entries, _ in indexed.values() for entry in entries if entry.device.type == "cpu")
    largest = max(pinned_allocation_bytes(size) for _, size in indexed.values())
    extra, available = need - held + largest, host_ram_available()
    if available is not None and extra > available:
        raise HostMemoryError(
            f"memory.offload: pinning {need / 2**30:.2f} GiB of streamed block weights needs {extra / 2**30:.2f} GiB "
            f"more host RAM, but only {available / 2**30:.2f} GiB is available; stream fewer blocks "
            "(memory.offload: N) or free host memory")

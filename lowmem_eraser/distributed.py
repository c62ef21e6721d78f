"""Data-parallel training over torch.distributed: one process per GPU (or per CPU under gloo), launched by
`torchrun --nproc_per_node N -m lowmem_eraser train ...` or `accelerate launch` (which sets the same RANK /
WORLD_SIZE / LOCAL_RANK / MASTER_ADDR variables). A run without them is one process and nothing here does work.

Only the adapters train, so data parallelism over them is the whole engine: every process holds the frozen base
and a copy of the erasers, draws the SAME global batch from the one seeded generator and trains its own slice of
it; after the step's backward passes ONE flat all-reduce averages the adapter gradients together with the step's
loss terms and a flag (a rank's step failed), so every rank takes the same update and the same skip decision, and
a failure stops every rank with the failing rank's error. A stop signal stops each rank at once, as in one process
(torchrun forwards Ctrl-C / SIGTERM to every worker and kills them 30 s later): rank 0 saves the checkpoint of the
last finished step, and a rank left waiting in a collective ends with a lost-contact error. Deliberately not DDP: the erasers are not a submodule of the transformer that
runs forward, and one step accumulates gradients over up to four backward passes (unlearn, adversarial, L_pre,
each expert's), which DDP would all-reduce once each; one flat buffer after the last is one collective a step.
FSDP/ZeRO would have nothing to shard (the frozen int8 weights are buffers).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import DistributedError, TrainingError

logger = logging.getLogger(__name__)
# x0 generation, text encoding and validation run on some ranks while the others wait in a collective: on a
# real model that can take far longer than the backends' default timeouts (NCCL 10 min)
TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class Processes:
    """This process's place in the run: rank `rank` of `world_size` (1: a plain single-process run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """The rank that writes: metrics, plots, checkpoints, the final eraser, the tracker's events."""
        return self.rank == 0

    def slice(self, batch_size: int) -> slice:
        """This rank's part of a global batch of `batch_size` (divisible by world_size: checked at start)."""
        share = batch_size // self.world_size
        return slice(self.rank * share, (self.rank + 1) * share)

    def barrier(self, where: str = "setup") -> None:
        if self.enabled:
            with lost_contact(where):
                dist.barrier()

    def in_turn(self, make):
        """`make()` on one rank after the other, in rank order (loading the base: each rank's host-RAM check then
        sees what the ranks before it pinned; N processes on a node hold N copies of what one process holds)."""
        result = None
        for turn in range(self.world_size):
            if turn == self.rank:
                result = make()
            self.barrier()
        return result

    def same_everywhere(self, value, what: str) -> None:
        """A DistributedError on every rank when the ranks hold different `value`s (e.g. the checkpoint each read)."""
        if not self.enabled:
            return
        values = [None] * self.world_size
        with lost_contact("setup"):
            dist.all_gather_object(values, value)
        if len(set(values)) > 1:
            held = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise DistributedError(f"{what} differs between the processes ({held}); output_dir must be one folder "
                                   "every process reads (a shared filesystem across nodes)")

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (e.g. filling a cache on disk), the others after it, reading what it wrote.
        An error on rank 0 is raised on every rank instead of leaving them waiting. (Not accelerate's
        `main_process_first`: it needs accelerate's state to own the process group, and a failing rank 0 leaves the
        others in its barrier until the timeout.)"""
        if not self.enabled:
            yield
            return
        if not self.main:
            failure = [None]
            with lost_contact("setup"):
                dist.broadcast_object_list(failure, src=0)
            if failure[0] is not None:
                raise DistributedError(f"rank 0 failed: {failure[0]}")
            yield
            return
        try:
            yield
        except BaseException as exc:
            dist.broadcast_object_list([f"{type(exc).__name__}: {exc}"], src=0)
            raise
        dist.broadcast_object_list([None], src=0)


SINGLE = Processes()
LOSS_TERMS = ("loss", "unlearn", "loc", "pre", "adv")  # what every step reports (train.eraser_losses_backward)


def launched_processes() -> Processes:
    """The launcher's view from the environment (torchrun, accelerate launch); one process without it."""
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise DistributedError(f"WORLD_SIZE / RANK / LOCAL_RANK must be integers: {exc}") from None
    if world_size <= 1:
        return SINGLE
    return Processes(rank, world_size, local_rank)


def local_device(processes: Processes) -> torch.device:
    """The device this rank trains on: its own GPU (LOCAL_RANK), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", processes.local_rank)
    return torch.device("cpu")


def start(batch_size: int) -> Processes:
    """Join the launcher's process group (nothing for a single process). Checks what can be wrong before any
    work: a global batch that does not split evenly, more processes on this node than GPUs, ranks on different
    device types."""
    processes = launched_processes()
    if not processes.enabled:
        return processes
    if batch_size % processes.world_size:
        raise DistributedError(f"train.batch_size: {batch_size} does not split over {processes.world_size} processes "
                               "(the global batch: each process trains batch_size / WORLD_SIZE samples); use a "
                               f"multiple of {processes.world_size}")
    if torch.cuda.is_available():
        on_node = int(os.environ.get("LOCAL_WORLD_SIZE", processes.world_size))
        count = torch.cuda.device_count()
        if on_node > count or processes.local_rank >= count:
            raise DistributedError(f"{on_node} processes on this node but {count} GPU(s): one process per GPU "
                                   f"(torchrun --nproc_per_node {count})")
        torch.cuda.set_device(processes.local_rank)
    device = local_device(processes)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    kinds = [None] * processes.world_size
    dist.all_gather_object(kinds, device.type)
    if len(set(kinds)) > 1:
        ranks = ", ".join(f"rank {r}: {kind}" for r, kind in enumerate(kinds))
        dist.destroy_process_group()  # every rank leaves the group it joined before saying why (else: an abort at exit)
        raise DistributedError(f"mixed device types ({ranks}): every process must train on the same kind of "
                               "device (one GPU each, or all on the CPU)")
    _rank_zero_notices(processes)
    logger.info("data-parallel training on %d processes (%s, %s)", processes.world_size, dist.get_backend(),
                device.type)
    return processes


def stop(processes: Processes) -> None:
    if processes.enabled and dist.is_initialized():
        dist.destroy_process_group()


class _RankFilter(logging.Filter):
    """Ranks other than 0 keep their warnings and errors (prefixed with the rank); their info notices, the same
    on every rank, are dropped."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        if self.rank == 0:
            return True
        if record.levelno < logging.WARNING:
            return False
        record.msg = f"[rank {self.rank}] {record.msg}"
        return True


def _rank_zero_notices(processes: Processes) -> None:
    # on the handlers, not the logger: a logger's filters never see its children's records
    for handler in logging.getLogger("lowmem_eraser").handlers:
        if not any(isinstance(f, _RankFilter) for f in handler.filters):
            handler.addFilter(_RankFilter(processes.rank))


class StepSync:
    """The one collective of a training step: averages the adapter gradients and the step's loss terms over the
    ranks and tells every rank whether some rank's step failed. Parameters whose gradient is None on every rank (a
    Wan2.2 expert that no sample of the global batch reached) keep None, as in one process. A rank that is gone
    (stopped by a signal, killed) surfaces here as a lost-contact error."""

    def __init__(self, processes: Processes, params: list[torch.nn.Parameter]):
        self.processes, self.params = processes, params

    def __call__(self, terms: dict[str, torch.Tensor], failed: bool, step: int) -> tuple[dict, bool]:
        """Returns (averaged terms, some rank failed). Gradients are averaged in place."""
        if not self.processes.enabled:
            return terms, failed
        device = self.params[0].device
        names = LOSS_TERMS  # a failed rank has none: it sends zeros, the others' are dropped anyway
        has_grad = [p.grad is not None for p in self.params]
        parts = [p.grad.reshape(-1).float() if p.grad is not None else torch.zeros(p.numel(), device=device)
                 for p in self.params]
        # the loss terms stay on the device (no host sync per term); a failed rank has none and sends zeros
        values = (torch.zeros(len(names), device=device) if failed
                  else torch.stack([terms[n].detach().float().reshape(()) for n in names]).to(device))
        head = torch.cat([values, torch.tensor([*map(float, has_grad), float(failed)], device=device)])
        flat = torch.cat([head, *parts])
        with lost_contact(step):
            dist.all_reduce(flat)  # SUM; divided below (equal local batches: the mean of means is the batch mean)
        world = self.processes.world_size
        flags = flat[len(names):len(head)].tolist()  # one host sync: each param's has-grad count, then failures
        flat[:len(names)] /= world
        flat[len(head):] /= world
        offset = len(head)
        for p, had, part in zip(self.params, flags, parts):
            n = part.numel()
            if had > 0:  # a view of the reduced buffer (fp32 adapters: no copy)
                p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
            offset += n
        averaged = {n: flat[i].clone() for i, n in enumerate(names)}
        return averaged, flags[-1] > 0

    def failure(self, error: BaseException | None, step: int) -> str:
        """The first failed rank's error (collective: every rank calls it once a failure is known)."""
        messages = [None] * self.processes.world_size
        with lost_contact(step):
            dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
        return next(f"rank {r}: {m}" for r, m in enumerate(messages) if m is not None)

    def gather(self, tensor: torch.Tensor, step: int) -> torch.Tensor:
        """Every rank's `tensor` (equal shapes) concatenated along dim 0 in rank order."""
        if not self.processes.enabled:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.processes.world_size)]
        with lost_contact(step):
            dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def broadcast_parameters(self) -> None:
        """Rank 0's adapter weights on every rank (they start equal from the one seed; this makes it certain)."""
        if self.processes.enabled:
            for p in self.params:
                dist.broadcast(p.data, src=0)


@contextlib.contextmanager
def lost_contact(where: int | str):
    """A collective that fails because another process left (stopped by a signal: rank 0 saved the checkpoint;
    crashed; killed) becomes one TrainingError instead of the backend's traceback."""
    try:
        yield
    except (RuntimeError, dist.DistBackendError) as exc:
        where = f"step {where}" if isinstance(where, int) else where
        raise TrainingError(f"{where}: lost contact with another process of the run (it stopped or crashed; "
                            f"its own output says why): {str(exc).splitlines()[0] if str(exc) else exc}") from None

"""Several processes, one pruning: which process this is, which calibration samples it takes, and the one
point where the statistics the processes collected are summed.

Under ``torchrun`` or ``accelerate launch`` every process runs the same job. Each takes a contiguous share
of the calibration samples (``shard``) through the same sequential engine; before a method decides
anything, the engine sums what the method's hooks collected over the processes (``all_reduce_stats``,
reached through ``BlockStep.reduce`` and the whole-model gradient pass), so every process takes the
decision one process would take on all the samples, and only the main process writes the result.

A statistic declares what is summed: ``partial_sums()`` gives its additive tensors (sums over tokens,
token counts; a running mean as mean x count), ``set_totals`` takes their totals over the processes
back. Means are therefore combined as sums and counts, which is right for shares of unequal size.
Nothing here runs in a single process: ``world()`` is then rank 0 of 1 and the reduction returns at once.

The processes join one group the way recovery's accelerate does (gloo on CPUs, NCCL plus gloo on GPUs),
lazily, at the first collective call.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist

from prunekit.errors import PrunekitError

# A process waits at its first reduction while the main one measures perplexity before pruning (--eval):
# the default of 30 minutes would end a large model's run there.
JOIN_TIMEOUT = timedelta(hours=6)


@dataclass(frozen=True)
class World:
    """This process's place among those launched together (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # the process's index on its machine: its GPU

    @property
    def main(self) -> bool:
        """The process that logs progress and writes the outputs."""
        return self.rank == 0


def world() -> World:
    """This process's rank and the number of processes, from the process group or the launcher's environment."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), local)
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), local)


def accelerated() -> bool:
    """Is there an accelerator for the processes to use? (Otherwise they join over gloo on the CPU.)"""
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def _join() -> None:
    """Join the launched processes' group as recovery's ``Accelerator`` does (``recover.train.make_accelerator``)."""
    if not dist.is_initialized():
        from accelerate import PartialState

        PartialState(cpu=not accelerated(), timeout=JOIN_TIMEOUT)


def require_single(what: str) -> None:
    """Refuse a command that has no multi-process form, rather than letting every process write the same files."""
    if world().size > 1:
        raise PrunekitError(f"{what} runs in one process; launch it without torchrun / accelerate launch")


def shard(count: int) -> slice:
    """The calibration samples, of ``count``, that this process takes: a contiguous run; the first
    ``count % size`` processes take one more. Deterministic, so a resumed run takes the same ones."""
    rank, size = world().rank, world().size
    if count < size:
        raise PrunekitError(
            f"{count} calibration samples cannot be shared by {size} processes; pass --nsamples {size} or more"
        )
    base, extra = divmod(count, size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def process_folder(folder: Path | None) -> Path | None:
    """A folder of this process's own under ``folder`` (checkpoints hold its share's activations), or ``folder``
    itself in a single process."""
    w = world()
    if folder is None or w.size == 1:
        return folder
    return Path(folder) / f"process-{w.rank}-of-{w.size}"


@runtime_checkable
class Statistic(Protocol):
    """Calibration statistics as the processes sum them."""

    def partial_sums(self) -> dict[str, torch.Tensor]:
        """The additive parts collected by this process: sums over tokens, token counts (as tensors). Called
        once, right before ``set_totals``: it may scale its own tensors in place (a mean to mean x count)."""

    def set_totals(self, totals: dict[str, torch.Tensor]) -> None:
        """Take the sums of those parts over all processes."""


def all_reduce_stats(stats):
    """Sum ``stats`` over the processes, in place: a ``Statistic``, a tensor, or a dict, list or tuple of them.

    Every process must call it with the same structure in the same order (they do: they run the same
    blocks and hooks). Each tensor is summed in its own dtype, so float64 sums stay float64. Returns ``stats``."""
    if world().size == 1:
        return stats
    _join()
    _reduce(stats)
    return stats


def _reduce(stats) -> None:
    if isinstance(stats, torch.Tensor):
        dense = stats if stats.is_contiguous() else stats.contiguous()  # e.g. GPT-2's transposed Conv1D gradients
        dist.all_reduce(dense, op=dist.ReduceOp.SUM)
        if dense is not stats:
            stats.copy_(dense)
    elif isinstance(stats, Statistic):
        totals = stats.partial_sums()
        _reduce(list(totals.values()))
        stats.set_totals(totals)
    elif isinstance(stats, Mapping):
        _reduce(list(stats.values()))
    elif isinstance(stats, (list, tuple)):
        for item in stats:
            _reduce(item)
    else:
        raise TypeError(f"cannot sum {type(stats).__name__} over processes; give tensors or Statistic objects")


def barrier() -> None:
    """Wait until every process arrives (the main one has written the outputs); nothing in one process."""
    if world().size > 1:
        _join()
        dist.barrier()

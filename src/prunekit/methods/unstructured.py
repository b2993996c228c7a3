"""What Wanda and SparseGPT share: the config, which linears to prune, and the two pruning orders.

Orders:

- ``sequential`` (default): each linear is pruned as soon as its calibration inputs reach it, so
  the layers after it in the same block see pruned inputs (SparseGPT's "true sequential"). The
  pruned block's outputs come out of that same pass: one forward per block, the speed limit. It
  runs the whole calibration set through a block as one batch.
- ``block``: all linears of a block are scored on one dense pass of the block, then pruned, then
  the block is re-run for its outputs (the order of the Wanda reference code). Any batch size.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.methods.masks import parse_nm, sparsity_of
from prunekit.methods.registry import MethodConfig
from prunekit.methods.stats import on_inputs
from prunekit.models import linear_weight
from prunekit.sequential import EngineConfig

ORDERS = ("sequential", "block")


@dataclass
class UnstructuredConfig(MethodConfig):
    sparsity: float = 0.5
    """Fraction of the weights to remove from each linear layer."""
    nm: str | None = None
    """N:M sparsity, e.g. 2:4 or 4:8: prune N of every M consecutive weights of a row (overrides --sparsity)."""
    order: str = "sequential"
    """'sequential' (one pass per block) or 'block' (the reference order: score the dense block, prune, re-run)."""
    include: tuple[str, ...] = ()
    """Only the linears matching this pattern, e.g. 'mlp.*' (fnmatch on names inside a block; repeatable)."""
    exclude: tuple[str, ...] = ()
    """Skip the linears matching this pattern (repeatable)."""
    owl: bool = False
    """OWL: blocks with more outlier scores keep more weights; the mean sparsity stays the target."""
    owl_lambda: float = 0.08
    """OWL: every block's sparsity stays within the target +- lambda."""
    owl_m: float = 5.0
    """OWL: a score is an outlier above m times its block's mean."""
    block_sparsity: list[float] | None = field(default=None, repr=False, metadata={"cli": False})  # filled by OWL
    sparse_weights: ClassVar[bool] = True

    def engine_for(self, engine: EngineConfig, calibration) -> EngineConfig:
        if calibration is not None and self.order == "sequential":  # one pass per block sees every sample
            return replace(engine, batch_size=len(calibration.tokens))
        return engine

    def __post_init__(self):
        if not 0.0 <= self.sparsity < 1.0:
            raise PrunekitError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        nm = parse_nm(self.nm)
        if nm is not None:
            self.sparsity = nm[0] / nm[1]
            if self.owl:
                raise PrunekitError("--owl sets a sparsity per block and cannot be combined with --nm")
        if self.order not in ORDERS:
            raise PrunekitError(f"--order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        if self.owl and not 0 <= self.owl_lambda < min(self.sparsity, 1 - self.sparsity) + 1e-9:
            raise PrunekitError(f"--owl-lambda must be in [0, {min(self.sparsity, 1 - self.sparsity)}]")
        self.include, self.exclude = tuple(self.include), tuple(self.exclude)

    @property
    def nm_pair(self) -> tuple[int, int] | None:
        return parse_nm(self.nm)

    def sparsity_for(self, block_index: int) -> float:
        return self.block_sparsity[block_index] if self.block_sparsity else self.sparsity


def select_linears(block, include: tuple[str, ...], exclude: tuple[str, ...]) -> dict[str, nn.Module]:
    """The block's linears whose names match ``include`` (all when empty) and not ``exclude``; a pattern that
    matches none of them (a typo) or a selection left empty is an error."""
    linears = block.linears()
    for flag, patterns in (("--include", include), ("--exclude", exclude)):
        for pattern in patterns:
            if not any(fnmatch.fnmatch(name, pattern) for name in linears):
                raise PrunekitError(
                    f"{flag} {pattern!r} matches no linear of a block; they are named {', '.join(linears)}"
                )
    chosen = {}
    for name, linear in linears.items():
        if include and not any(fnmatch.fnmatch(name, p) for p in include):
            continue
        if any(fnmatch.fnmatch(name, p) for p in exclude):
            continue
        chosen[name] = linear
    if not chosen:
        raise PrunekitError(f"--include {list(include)} with --exclude {list(exclude)} leaves no linear to prune")
    return chosen


PruneLinear = Callable[[nn.Module, object], None]  # (linear, statistics) -> prune in place


def prune_block(
    config: UnstructuredConfig, step, new_stats: Callable[[nn.Module], object], prune_linear: PruneLinear
) -> dict:
    """Collect ``new_stats`` for each selected linear and call ``prune_linear``, in ``config.order``."""
    linears = select_linears(step.block, config.include, config.exclude)
    if config.order == "sequential":
        if step.num_batches != 1:
            raise PrunekitError("order 'sequential' needs the calibration set in one batch; use --order block")

        def prune_on_arrival(name, linear, x):
            if name not in done:
                stats = new_stats(linear)
                stats.update(x)
                prune_linear(linear, step.reduce(stats))  # every process reaches each linear once, in order
                done.add(name)

        done: set[str] = set()
        with on_inputs(linears, prune_on_arrival):
            step.accept(step.forward())
        missing = set(linears) - done
        if missing:  # a linear the calibration never reached (e.g. an unused branch)
            raise PrunekitError(f"block {step.index}: no calibration input reached {sorted(missing)}")
    else:
        stats = {name: new_stats(linear) for name, linear in linears.items()}
        with on_inputs(linears, lambda name, linear, x: stats[name].update(x)):
            step.forward()
        step.reduce(stats)
        for name, linear in linears.items():
            prune_linear(linear, stats[name])
    return {"sparsity": {name: sparsity_of(linear_weight(linear)) for name, linear in linears.items()}}


def in_features(linear: nn.Module) -> int:
    return linear_weight(linear).shape[1]


def weight_device(linear: nn.Module) -> torch.device:
    return linear_weight(linear).device

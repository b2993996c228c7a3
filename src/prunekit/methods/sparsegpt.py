"""SparseGPT (Frantar & Alistarh 2023): prune column by column with an OBS update of the remaining
weights, using the inverse Hessian of the layer-wise reconstruction loss, H = 2/n * X X^T.

Blocks of ``blocksize`` columns with lazy updates; the mask is chosen adaptively per block from
w^2 / [H^-1]_jj^2 (for N:M, per group of M columns from the already-updated weights). Dead inputs
(zero diagonal) are pruned outright; the dampening starts at ``percdamp`` of the mean diagonal and
is raised tenfold whenever the Cholesky factorisation fails. The Hessian maths and the column sweep are
shared with GPTQ (``prunekit.methods.hessian``); with ``bits`` set, each kept weight is also rounded to
GPTQ's grid in the same sweep (the SparseGPT paper's joint 50% + 4-bit), so pruned weights stay exactly zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import torch

from prunekit.methods.hessian import (
    HESSIAN_DTYPES,
    check_sweep_settings,
    inverse_hessian_factor,
    obs_sweep,
    without_dead_inputs,
)
from prunekit.methods.masks import matrix_mask
from prunekit.methods.owl import owl_prepare
from prunekit.methods.quant import (
    QuantGrid,
    QuantRule,
    check_grid,
    load_block_grids,
    record_grid,
    save_block_grids,
    sweep_blocksize,
)
from prunekit.methods.registry import register
from prunekit.methods.stats import Hessian
from prunekit.methods.unstructured import UnstructuredConfig, in_features, prune_block, select_linears, weight_device
from prunekit.models import linear_weight

__all__ = ["HESSIAN_DTYPES", "SparseGPTConfig", "inverse_hessian_factor", "sparsegpt_prune"]


@dataclass
class SparseGPTConfig(UnstructuredConfig):
    blocksize: int = 128
    """Columns per lazy-update block."""
    percdamp: float = 0.01
    """Initial dampening, a fraction of the mean of diag(H) (raised tenfold until H factors)."""
    hessian_dtype: str = "float32"
    """float32 or float64."""
    bits: int | None = None
    """Also round the kept weights to GPTQ's grid of this many bits, in the same sweep (the paper's 50% + 4-bit)."""
    group_size: int = 128
    """With --bits: input columns per scale (-1: one per row)."""
    sym: bool = field(default=True, metadata={"flag": "--sym/--asym"})
    """With --bits: a symmetric grid (zero point 0) or an asymmetric one."""
    grid_dir: Path | None = field(default=None, repr=False, metadata={"cli": False})  # prepare: the checkpoints
    method: ClassVar[str] = "sparsegpt"
    summary: ClassVar[str] = "optimal brain surgeon with the Hessian XX^T; the surviving weights are updated"

    @classmethod
    def study_variants(cls):
        return {"sparsegpt": lambda ratio: cls(sparsity=ratio)}

    def __post_init__(self):
        super().__post_init__()
        check_sweep_settings(self.blocksize, self.percdamp, self.hessian_dtype)
        check_grid(self.bits, self.group_size)

    @property
    def grid(self) -> QuantGrid | None:
        return None if self.bits is None else QuantGrid(self.bits, self.group_size, self.sym)

    @property
    def quant_grid(self) -> QuantGrid | None:
        return self.grid


class PruneRule:
    """SparseGPT's targets: zero where pruned, else the weight (or, with a grid, its grid point)."""

    def __init__(self, sparsity: float, nm: tuple[int, int] | None, quant: QuantRule | None = None):
        self.sparsity, self.nm, self.quant = sparsity, nm, quant

    def begin_block(self, W1, d, i1) -> None:
        # pruned[r, c] is True where the weight goes; unstructured: chosen for the whole block now.
        self.pruned = (
            ~matrix_mask(W1**2 / d.unsqueeze(0) ** 2, self.sparsity)
            if self.nm is None
            else torch.zeros_like(W1, dtype=torch.bool)
        )

    def target(self, W1, d, i, column) -> torch.Tensor:
        if self.nm is not None and i % self.nm[1] == 0:
            n, m = self.nm
            group = W1[:, i : i + m] ** 2 / d[i : i + m].unsqueeze(0) ** 2
            drop = torch.argsort(group, dim=1, stable=True)[:, :n]
            self.pruned[:, i : i + m].scatter_(1, drop, True)
        w = W1[:, i]
        kept = w if self.quant is None else self.quant.target(W1, d, i, column)
        return torch.where(self.pruned[:, i], torch.zeros_like(w), kept)


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    grid: QuantGrid | None = None,
) -> torch.Tensor:
    """The pruned and updated weight [out, in] (float32 maths, returned in the weight's dtype).

    With ``grid``, returns (weight, scale, zero) as ``gptq_quantize`` does."""
    W, H = without_dead_inputs(weight, hessian)
    Hinv = inverse_hessian_factor(H, percdamp)
    quant = QuantRule(W, grid, weight.dtype) if grid is not None else None
    if grid is not None and nm is not None and blocksize % nm[1]:
        blocksize = nm[1] * max(1, blocksize // nm[1])
    W = obs_sweep(W, Hinv, sweep_blocksize(blocksize, grid), PruneRule(sparsity, nm, quant))
    if quant is None:
        return W.to(weight.dtype)
    return W.to(weight.dtype), quant.scale.to(weight.dtype), quant.zero


def sparsegpt_prepare(config: SparseGPTConfig, model, calibration, engine) -> SparseGPTConfig:
    if config.grid is not None:
        config = replace(config, grid_dir=engine.checkpoint_dir)
    return owl_prepare(config, model, calibration, engine)


def sparsegpt_restore(config: SparseGPTConfig, block, report: dict) -> None:
    if config.grid is not None:
        load_block_grids(config.grid_dir, block.index, select_linears(block, config.include, config.exclude))


@register(SparseGPTConfig, prepare=sparsegpt_prepare, restore=sparsegpt_restore)
def sparsegpt_block(config: SparseGPTConfig, step) -> dict:
    sparsity = config.sparsity_for(step.index)
    dtype = HESSIAN_DTYPES[config.hessian_dtype]

    def prune_linear(linear, stats: Hessian) -> None:
        weight = linear_weight(linear)
        args = (weight, stats.matrix, sparsity, config.nm_pair, config.blocksize, config.percdamp, config.grid)
        result = sparsegpt_prune(*args)
        new = result if config.grid is None else result[0]
        with torch.no_grad():
            weight.copy_(new)
        if config.grid is not None:
            record_grid(linear, result[1], result[2])

    report = prune_block(config, step, lambda lin: Hessian(in_features(lin), weight_device(lin), dtype), prune_linear)
    if config.bits is not None:
        save_block_grids(config.grid_dir, step.index, select_linears(step.block, config.include, config.exclude))
        report["bits"] = config.bits
    return report

"""GPTQ (Frantar et al. 2023): round weights to a low-bit grid column by column, compensating each rounding
error on the columns not yet rounded with the inverse Hessian of the layer-wise reconstruction loss.

It runs in the sequential engine exactly like SparseGPT (same calibration capture, Hessian, dampening
retries, checkpoints) and shares its column sweep (``prunekit.methods.hessian``); only the target of a
column differs: its nearest grid point instead of zero.

The grid and its maths are in ``prunekit.methods.quant``.

Weights stay in the model as floats on the grid (fake quantization), each quantized linear carrying its grid,
from which ``prunekit.export.compressed`` recovers the integer codes exactly and saves them packed. The scale is
rounded to the weight's dtype before use, so (c - z) * s in that dtype is the stored weight bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import torch

from prunekit.errors import PrunekitError
from prunekit.methods.hessian import (
    HESSIAN_DTYPES,
    check_sweep_settings,
    inverse_hessian_factor,
    obs_sweep,
    without_dead_inputs,
)
from prunekit.methods.quant import (
    QuantGrid,
    QuantRule,
    check_grid,
    load_block_grids,
    record_grid,
    save_block_grids,
    sweep_blocksize,
)
from prunekit.methods.registry import MethodConfig, register
from prunekit.methods.stats import Hessian
from prunekit.methods.unstructured import ORDERS, in_features, prune_block, select_linears, weight_device
from prunekit.models import linear_weight


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    grid: QuantGrid,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    keep_zeros: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(quantized weight in the weight's dtype, scale [out, groups] in that dtype, zero [out, groups]).

    ``keep_zeros``: weights that are exactly zero stay zero (a pruned model keeps its sparsity; zero is on
    every grid), the others absorb their error as usual."""
    zeros = (weight == 0) if keep_zeros and bool((weight == 0).any()) else None
    W, H = without_dead_inputs(weight, hessian)
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        zeros = zeros[:, perm] if zeros is not None else None
        rule = QuantRule(W, grid, weight.dtype, perm, zeros)  # static groups, from the original order
        W, H = W[:, perm], H[perm][:, perm]
    else:
        rule = QuantRule(W, grid, weight.dtype, zeros=zeros)
    Hinv = inverse_hessian_factor(H, percdamp, who="GPTQ")
    W = obs_sweep(W, Hinv, sweep_blocksize(blocksize, grid), rule)
    if perm is not None:
        W = W[:, torch.argsort(perm)]
    return W.to(weight.dtype), rule.scale.to(weight.dtype), rule.zero


# --- GPTQ as a method -----------------------------------------------------------------------------------


@dataclass
class GPTQConfig(MethodConfig):
    """GPTQ weight quantization of every decoder linear (embeddings and the head stay as they are)."""

    bits: int = 4
    """Bits per weight: 2, 3, 4 or 8."""
    group_size: int = 128
    """Input columns per scale; -1: one scale per output row."""
    sym: bool = field(default=True, metadata={"flag": "--sym/--asym"})
    """A symmetric grid (zero point 0, the W4A16 convention of vLLM and llm-compressor) or an asymmetric one."""
    act_order: bool = False
    """Visit columns by decreasing Hessian diagonal (static groups)."""
    keep_zeros: bool = True
    """Weights already exactly zero (a pruned model) stay zero."""
    percdamp: float = 0.01
    """Dampening, a fraction of the mean Hessian diagonal (raised tenfold until it factors)."""
    blocksize: int = 128
    """Columns per lazy update (rounded to whole groups)."""
    hessian_dtype: str = "float32"
    """float32 or float64."""
    order: str = "sequential"
    """'sequential' (one pass per block) or 'block' (quantize the dense block's inputs, then re-run)."""
    include: tuple[str, ...] = ()
    """Only the linears matching this pattern, e.g. 'mlp.*' (repeatable)."""
    exclude: tuple[str, ...] = ()
    """Skip the linears matching this pattern (repeatable)."""
    grid_dir: Path | None = field(default=None, repr=False, metadata={"cli": False})  # prepare: the checkpoints
    method: ClassVar[str] = "gptq"
    summary: ClassVar[str] = "round weights to a low-bit grid column by column, compensating each error (GPTQ)"

    @property
    def quant_grid(self) -> QuantGrid:
        return self.grid

    def engine_for(self, engine, calibration):
        if calibration is not None and self.order == "sequential":  # one pass per block sees every sample
            return replace(engine, batch_size=len(calibration.tokens))
        return engine

    def __post_init__(self):
        check_grid(self.bits, self.group_size)
        check_sweep_settings(self.blocksize, self.percdamp, self.hessian_dtype)
        if self.order not in ORDERS:
            raise PrunekitError(f"--order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        self.include, self.exclude = tuple(self.include), tuple(self.exclude)

    @property
    def grid(self) -> QuantGrid:
        return QuantGrid(self.bits, self.group_size, self.sym)


def gptq_prepare(config: GPTQConfig, model, calibration, engine) -> GPTQConfig:
    return replace(config, grid_dir=engine.checkpoint_dir)


def gptq_restore(config: GPTQConfig, block, report: dict) -> None:
    load_block_grids(config.grid_dir, block.index, select_linears(block, config.include, config.exclude))


@register(GPTQConfig, prepare=gptq_prepare, restore=gptq_restore)
def gptq_block(config: GPTQConfig, step) -> dict:
    dtype = HESSIAN_DTYPES[config.hessian_dtype]

    def quantize_linear(linear, stats: Hessian) -> None:
        weight = linear_weight(linear)
        W, scale, zero = gptq_quantize(
            weight, stats.matrix, config.grid, config.blocksize, config.percdamp, config.act_order, config.keep_zeros
        )
        with torch.no_grad():
            weight.copy_(W)
        record_grid(linear, scale, zero)

    report = prune_block(
        config, step, lambda lin: Hessian(in_features(lin), weight_device(lin), dtype), quantize_linear
    )
    save_block_grids(config.grid_dir, step.index, select_linears(step.block, config.include, config.exclude))
    report["bits"] = config.bits
    return report

"""The integer grid GPTQ rounds to, as pure functions, and the column rule GPTQ and SparseGPT (with --bits) sweep with.

The grid (the compressed-tensors convention, so a saved model needs no re-rounding): signed integer codes
c in [-2^(b-1), 2^(b-1) - 1], one scale s and zero point z per output row and group of ``group_size``
input columns (column j in group j // group_size; when the size does not divide the width the last group is
shorter, as in GPTQ's reference code), value (c - z) * s. Symmetric grids have z = 0 and
s = max|w| / (2^b - 1) * 2; asymmetric ones stretch [min(w, 0), max(w, 0)] over the 2^b codes. Zero is on
every grid (c = z), so pruned weights stay exactly zero when SparseGPT quantizes in the same sweep.

Each quantized linear carries its grid (``grid_of(linear)``: scale and zero point, [out, groups]), from which
``prunekit.export.compressed`` recovers the integer codes exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.methods.unstructured import select_linears
from prunekit.models import get_adapter, linear_weight

BITS = (2, 3, 4, 8)
SCALE, ZERO = "weight_scale", "weight_zero_point"


# --- the grid (pure functions) --------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantGrid:
    """What the integer grid is: bits per weight, input columns per scale (-1: one per row), symmetric or not."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True

    def __post_init__(self):
        check_grid(self.bits, self.group_size)

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def groups(self, columns: int) -> int:
        """Groups per row: column j is in group j // group_size; the last one is shorter when the size does
        not divide the width (SmolLM2's 576 columns are 4.5 groups of 128), as GPTQ's reference code does."""
        return 1 if self.group_size == -1 else -(-columns // self.group_size)


def check_grid(bits: int | None, group_size: int) -> None:
    if bits is not None and bits not in BITS:
        raise PrunekitError(f"--bits must be one of {', '.join(map(str, BITS))}, got {bits}")
    if group_size != -1 and group_size < 1:
        raise PrunekitError(f"--group-size must be -1 (one scale per row) or a positive number, got {group_size}")


def quant_grid(W: torch.Tensor, bits: int, group_size: int = -1, sym: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point ([out, groups], zero as integers in W's dtype) of the grid for each row and group."""
    grid = QuantGrid(bits, group_size, sym)
    rows, columns = W.shape
    groups = grid.groups(columns)
    # zero padding of a short last group changes nothing: zero is always inside [lo, hi]
    width = columns if group_size == -1 else group_size
    G = torch.nn.functional.pad(W, (0, groups * width - columns)).reshape(rows, groups, width)
    lo, hi = G.amin(-1).clamp(max=0), G.amax(-1).clamp(min=0)  # zero must be on the grid
    levels = 2**bits - 1
    if sym:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    flat = hi == lo  # an all-zero group: any scale works, 1 keeps the codes finite
    hi, lo = torch.where(flat, torch.ones_like(hi), hi), torch.where(flat, -torch.ones_like(lo), lo)
    scale = (hi - lo) / levels
    zero = torch.zeros_like(scale) if sym else (grid.qmin - lo / scale).round().clamp(grid.qmin, grid.qmax)
    return scale, zero


def quant_codes(
    W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int | None = None
) -> torch.Tensor:
    """The integer codes (as W's dtype) of W on the grid; ``scale``/``zero`` are [out, groups].

    ``group_size`` is needed only when the last group is short (else it follows from the shapes)."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    s, z = per_column(scale, W.shape[1], group_size), per_column(zero, W.shape[1], group_size)
    return (W / s).round().add(z).clamp(qmin, qmax)


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int | None = None
) -> torch.Tensor:
    """(c - z) * s: the formula compressed-tensors uses too, so the floats match bit for bit."""
    columns = codes.shape[1]
    return (codes - per_column(zero, columns, group_size)) * per_column(scale, columns, group_size)


def quantize_dequantize(
    W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int | None = None
) -> torch.Tensor:
    """W rounded to its nearest grid point (round-to-nearest, no error compensation)."""
    return dequantize(quant_codes(W, scale, zero, bits, group_size), scale, zero, group_size)


def per_column(values: torch.Tensor, columns: int, group_size: int | None) -> torch.Tensor:
    """[out, groups] -> [out, columns], each group's value repeated over its columns (the last may be short)."""
    size = group_size if group_size not in (None, -1) else -(-columns // values.shape[1])
    return values.repeat_interleave(size, dim=1)[:, :columns]


def rtn(weight: torch.Tensor, grid: QuantGrid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest baseline: (weight on the grid, scale, zero), scale rounded to the weight's dtype."""
    W = weight.detach().float()
    scale, zero = quant_grid(W, grid.bits, grid.group_size, grid.sym)
    scale = scale.to(weight.dtype).float()
    W = quantize_dequantize(W, scale, zero, grid.bits, grid.group_size)
    return W.to(weight.dtype), scale.to(weight.dtype), zero


@torch.no_grad()
def rtn_model(model, grid: QuantGrid, include=(), exclude=()) -> None:
    """Round every selected decoder linear to ``grid`` without error compensation (the baseline GPTQ beats);
    the grids are recorded as GPTQ's are, so the result saves the same way."""
    adapter = get_adapter(model)
    for i in range(adapter.num_blocks()):
        for linear in select_linears(adapter.block(i), include, exclude).values():
            weight = linear_weight(linear)
            W, scale, zero = rtn(weight, grid)
            weight.copy_(W)
            record_grid(linear, scale, zero)


# --- the column rule GPTQ (and SparseGPT with --bits) sweeps with ---------------------------------------


class QuantRule:
    """Targets each column at its grid point. Without act-order, a group's grid is chosen when the sweep
    reaches its first column, from the already-updated weights (GPTQ's order); with act-order (columns
    visited by decreasing Hessian diagonal) the grid is fixed beforehand from the original weights in
    their original order ("static groups", llm-compressor's ``actorder="weight"``), so a saved group is
    still a run of consecutive columns that every reader understands."""

    def __init__(
        self,
        W: torch.Tensor,
        grid: QuantGrid,
        dtype: torch.dtype,
        perm: torch.Tensor | None = None,
        zeros: torch.Tensor | None = None,
    ):
        self.grid, self.dtype, self.perm = grid, dtype, perm
        self.zeros = zeros  # [out, in] in sweep order: weights held at exactly zero (a pruned model's mask)
        groups = grid.groups(W.shape[1])
        self.scale = torch.zeros(W.shape[0], groups, dtype=W.dtype, device=W.device)
        self.zero = torch.zeros_like(self.scale)
        self.fixed = grid.group_size == -1 or perm is not None
        if self.fixed:
            self.scale, self.zero = self._grid(W, grid.group_size)

    def _grid(self, W: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        scale, zero = quant_grid(W, self.grid.bits, group_size, self.grid.sym)
        # the scale the model's dtype can hold, so dequantising the saved codes reproduces these floats
        return scale.to(self.dtype).to(W.dtype), zero

    def begin_block(self, W1, d, i1) -> None:
        pass

    def target(self, W1, d, i, column) -> torch.Tensor:
        g = self.grid.group_size
        original = int(self.perm[column]) if self.perm is not None else column
        k = 0 if g == -1 else original // g
        if not self.fixed and column % g == 0:
            self.scale[:, k : k + 1], self.zero[:, k : k + 1] = self._grid(W1[:, i : i + g], -1)
        s, z = self.scale[:, k], self.zero[:, k]
        # quantize_dequantize on one column, spelled out: this runs once per column of every matrix
        codes = (W1[:, i] / s).round().add(z).clamp(self.grid.qmin, self.grid.qmax)
        q = (codes - z) * s
        return q if self.zeros is None else torch.where(self.zeros[:, column], torch.zeros_like(q), q)


def sweep_blocksize(blocksize: int, grid: QuantGrid | None) -> int:
    """A block size holding whole groups, so a group's grid is chosen from its current weights."""
    if grid is None or grid.group_size == -1:
        return blocksize
    return grid.group_size * max(1, blocksize // grid.group_size)


# --- the grid recorded on the model ---------------------------------------------------------------------
# A plain attribute, not a buffer: buffers would show in state_dict and in the shape checks of prunekit's
# saves and surgery, which must keep seeing a plain model. A run with a checkpoint folder writes each
# block's grids beside its checkpoint (``grids_NNNNN.safetensors``) so a resumed run gets them back.

GRID_ATTR = "prunekit_grid"


def record_grid(linear: nn.Module, scale: torch.Tensor, zero: torch.Tensor) -> None:
    object.__setattr__(linear, GRID_ATTR, (scale.detach().clone(), zero.detach().to(torch.int8)))


def grid_of(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scale, zero point) of a quantized linear, both [out, groups]; None if it was not quantized."""
    return getattr(linear, GRID_ATTR, None)


def clear_grids(model: nn.Module) -> None:
    """Forget the recorded grids (the weights stay on the grid)."""
    for module in model.modules():
        module.__dict__.pop(GRID_ATTR, None)


def grids_file(folder: Path, index: int) -> Path:
    return Path(folder) / f"grids_{index:05d}.safetensors"


def save_block_grids(folder: Path | None, index: int, linears: dict[str, nn.Module]) -> None:
    """Write a block's grids before the engine checkpoints the block (a crash in between recomputes both)."""
    if folder is None:
        return
    tensors = {}
    for name, linear in linears.items():
        scale, zero = grid_of(linear)
        tensors[f"{name}.{SCALE}"], tensors[f"{name}.{ZERO}"] = scale.cpu().contiguous(), zero.cpu().contiguous()
    Path(folder).mkdir(parents=True, exist_ok=True)
    tmp = grids_file(folder, index).with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, grids_file(folder, index))


def load_block_grids(folder: Path | None, index: int, linears: dict[str, nn.Module]) -> None:
    """Give a block restored from a checkpoint back the grids its run recorded."""
    if folder is None:
        return
    tensors = load_file(str(grids_file(folder, index)))
    for name, linear in linears.items():
        device = linear_weight(linear).device
        record_grid(linear, tensors[f"{name}.{SCALE}"].to(device), tensors[f"{name}.{ZERO}"].to(device))

"""The Hessian maths that SparseGPT and GPTQ share: one place for the OBS column sweep.

Both methods minimise the layer-wise reconstruction loss ||W X - W' X||^2, whose Hessian is
H = 2/n * X X^T (``prunekit.methods.stats.Hessian``). They walk the columns of W left to right,
set each column to a target value (zero where pruned, its grid point where quantized) and spread
the error over the columns not yet visited with the upper Cholesky factor of H^-1 (Frantar &
Alistarh, OBC / GPTQ / SparseGPT). Updates are applied lazily per block of columns, so the big
matrix is touched once per block, not once per column.

A method supplies a ``ColumnRule``: what to decide at the start of a block (SparseGPT's adaptive
mask) and the target value of each column.
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch

from prunekit.errors import PrunekitError
from prunekit.threads import fixed_threads

log = logging.getLogger(__name__)

HESSIAN_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class ColumnRule(Protocol):
    def begin_block(self, W1: torch.Tensor, d: torch.Tensor, i1: int) -> None:
        """Called with the block's current columns ``W1`` and the diagonal ``d`` of its H^-1 factor."""

    def target(self, W1: torch.Tensor, d: torch.Tensor, i: int, column: int) -> torch.Tensor:
        """The value column ``i`` of the block (``column`` of the matrix) is set to, from its current value."""


def check_sweep_settings(blocksize: int, percdamp: float, hessian_dtype: str) -> None:
    """The column sweep's settings, as SparseGPT and GPTQ both take them (errors name the flags)."""
    if blocksize < 1:
        raise PrunekitError(f"--blocksize must be at least 1, got {blocksize}")
    if not 0 < percdamp < 1:
        raise PrunekitError(f"--percdamp must be in (0, 1), got {percdamp}")
    if hessian_dtype not in HESSIAN_DTYPES:
        raise PrunekitError(f"--hessian-dtype must be float32 or float64, got {hessian_dtype!r}")


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float, tries: int = 6, who: str = "SparseGPT"):
    """Upper Cholesky factor of (H + damp*I)^-1, raising the dampening tenfold until it factors."""
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    damp = percdamp * torch.diag(hessian).mean()
    with fixed_threads(1 if hessian.device.type == "cpu" else None):  # see prunekit.threads: busy CPUs
        for attempt in range(tries):
            factor, info = torch.linalg.cholesky_ex(hessian + damp * eye)
            if info == 0:
                inverse = torch.cholesky_inverse(factor)
                upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
                if info == 0:
                    if attempt:
                        log.info("%s: Hessian needed dampening %.3g (try %d)", who, damp.item(), attempt + 1)
                    return upper
            damp = damp * 10
    raise PrunekitError(f"{who}: the Hessian stayed singular after raising the dampening; add calibration data")


def without_dead_inputs(weight: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Working copies of W (in H's dtype) and H, with inputs the calibration never saw (zero diagonal) zeroed
    in W and given a unit diagonal in H, so H factors and those weights (which cost nothing) go."""
    W = weight.detach().to(hessian.dtype).clone()
    H = hessian.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    return W, H


def obs_sweep(W: torch.Tensor, Hinv: torch.Tensor, blocksize: int, rule: ColumnRule) -> torch.Tensor:
    """Set every column of ``W`` (in place) to ``rule``'s target, compensating the error on the columns after it."""
    columns = W.shape[1]
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        errors = torch.zeros_like(W1)
        rule.begin_block(W1, d, i1)
        for i in range(i2 - i1):
            w = W1[:, i]
            q = rule.target(W1, d, i, i1 + i)
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            errors[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= errors @ Hinv[i1:i2, i2:]
    return W

"""SparseGPT (Frantar & Alistarh 2023): prune column by column with an OBS update of the remaining
weights, using the inverse Hessian of the layer-wise reconstruction loss, H = 2/n * X X^T.

Blocks of ``blocksize`` columns with lazy updates; the mask is chosen adaptively per block from
w^2 / [H^-1]_jj^2 (for N:M, per group of M columns from the already-updated weights). Dead inputs
(zero diagonal) are pruned outright; the dampening starts at ``percdamp`` of the mean diagonal and
is raised tenfold whenever the Cholesky factorisation fails.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from prunekit.errors import PrunekitError
from prunekit.methods.masks import matrix_mask
from prunekit.methods.owl import owl_prepare
from prunekit.methods.registry import register
from prunekit.methods.stats import Hessian
from prunekit.methods.unstructured import UnstructuredConfig, in_features, prune_block, weight_device
from prunekit.models import linear_weight
from prunekit.threads import fixed_threads

log = logging.getLogger(__name__)
HESSIAN_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class SparseGPTConfig(UnstructuredConfig):
    blocksize: int = 128
    """Columns per lazy-update block."""
    percdamp: float = 0.01
    """Initial dampening, a fraction of the mean of diag(H) (raised tenfold until H factors)."""
    hessian_dtype: str = "float32"
    """float32 or float64."""
    method: ClassVar[str] = "sparsegpt"
    summary: ClassVar[str] = "optimal brain surgeon with the Hessian XX^T; the surviving weights are updated"

    @classmethod
    def study_variants(cls):
        return {"sparsegpt": lambda ratio: cls(sparsity=ratio)}

    def __post_init__(self):
        super().__post_init__()
        if self.blocksize < 1:
            raise PrunekitError(f"--blocksize must be at least 1, got {self.blocksize}")
        if not 0 < self.percdamp < 1:
            raise PrunekitError(f"--percdamp must be in (0, 1), got {self.percdamp}")
        if self.hessian_dtype not in HESSIAN_DTYPES:
            raise PrunekitError(f"--hessian-dtype must be float32 or float64, got {self.hessian_dtype!r}")


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float, tries: int = 6) -> torch.Tensor:
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
                        log.info("SparseGPT: Hessian needed dampening %.3g (try %d)", damp.item(), attempt + 1)
                    return upper
            damp = damp * 10
    raise PrunekitError("SparseGPT: the Hessian stayed singular after raising the dampening; add calibration data")


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> torch.Tensor:
    """The pruned and updated weight [out, in] (float32 maths, returned in the weight's dtype)."""
    W = weight.detach().to(hessian.dtype).clone()
    H = hessian.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv = inverse_hessian_factor(H, percdamp)
    columns = W.shape[1]
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        errors = torch.zeros_like(W1)
        # pruned[r, c] is True where the weight goes; unstructured: chosen for the whole block now.
        pruned = (
            ~matrix_mask(W1**2 / d.unsqueeze(0) ** 2, sparsity)
            if nm is None
            else torch.zeros_like(W1, dtype=torch.bool)
        )
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                group = W1[:, i : i + m] ** 2 / d[i : i + m].unsqueeze(0) ** 2
                drop = torch.argsort(group, dim=1, stable=True)[:, :n]
                pruned[:, i : i + m].scatter_(1, drop, True)
            w = W1[:, i]
            q = torch.where(pruned[:, i], torch.zeros_like(w), w)
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            errors[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= errors @ Hinv[i1:i2, i2:]
    return W.to(weight.dtype)


@register(SparseGPTConfig, prepare=owl_prepare)
def sparsegpt_block(config: SparseGPTConfig, step) -> dict:
    sparsity = config.sparsity_for(step.index)
    dtype = HESSIAN_DTYPES[config.hessian_dtype]

    def prune_linear(linear, stats: Hessian) -> None:
        weight = linear_weight(linear)
        with torch.no_grad():
            weight.copy_(
                sparsegpt_prune(weight, stats.matrix, sparsity, config.nm_pair, config.blocksize, config.percdamp)
            )

    return prune_block(config, step, lambda lin: Hessian(in_features(lin), weight_device(lin), dtype), prune_linear)

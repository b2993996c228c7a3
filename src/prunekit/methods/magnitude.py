"""One-shot magnitude pruning: zero the smallest |W| of each weight matrix (the baseline of Wanda
and SparseGPT). Prune-retrain, global thresholds and Han et al.'s std-based threshold come with
the unstructured-sparsity issue."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from prunekit.errors import PrunekitError
from prunekit.methods import register
from prunekit.methods.masks import matrix_mask, nm_mask, parse_nm
from prunekit.methods.unstructured import select_linears
from prunekit.models import linear_weight


@dataclass
class MagnitudeConfig:
    sparsity: float = 0.5
    nm: str | None = None  # "2:4": prune the 2 smallest of every 4 consecutive weights of a row
    include: tuple[str, ...] = ()  # fnmatch patterns on names inside a block, e.g. "mlp.*"
    exclude: tuple[str, ...] = ()
    method: ClassVar[str] = "magnitude"
    needs_calibration: ClassVar[bool] = False

    def __post_init__(self):
        if not 0.0 <= self.sparsity < 1.0:
            raise PrunekitError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        self.include, self.exclude = tuple(self.include), tuple(self.exclude)
        if self.nm is not None:
            n, m = parse_nm(self.nm)
            self.sparsity = n / m


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask that removes exactly ``round(sparsity * numel)`` entries of smallest magnitude."""
    return matrix_mask(weight.detach().abs(), sparsity)


@register(MagnitudeConfig)
def magnitude_block(config: MagnitudeConfig, step) -> dict:
    sparsity = {}
    with torch.no_grad():
        for name, linear in select_linears(step.block, config.include, config.exclude).items():
            weight = linear_weight(linear)
            nm = parse_nm(config.nm)
            weight.mul_(nm_mask(weight.detach().abs(), *nm) if nm else magnitude_mask(weight, config.sparsity))
            sparsity[name] = (weight == 0).float().mean().item()
    return {"sparsity": sparsity}

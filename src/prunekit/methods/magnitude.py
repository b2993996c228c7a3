"""One-shot magnitude pruning: zero the smallest |W| of each weight matrix (the baseline of Wanda
and SparseGPT). Prune-retrain, global thresholds and Han et al.'s std-based threshold come with
the unstructured-sparsity issue."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from prunekit.errors import PrunekitError
from prunekit.methods import register
from prunekit.models import linear_weight


@dataclass
class MagnitudeConfig:
    sparsity: float = 0.5
    method: ClassVar[str] = "magnitude"
    needs_calibration: ClassVar[bool] = False

    def __post_init__(self):
        if not 0.0 <= self.sparsity < 1.0:
            raise PrunekitError(f"--sparsity must be in [0, 1), got {self.sparsity}")


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask that removes exactly ``round(sparsity * numel)`` entries of smallest magnitude.

    Ties at the threshold are broken by position (a stable sort), so the count is always exact.
    """
    n_prune = round(sparsity * weight.numel())
    mask = torch.ones(weight.numel(), dtype=torch.bool, device=weight.device)
    if n_prune:
        order = torch.argsort(weight.detach().abs().flatten().float(), stable=True)
        mask[order[:n_prune]] = False
    return mask.view_as(weight)


@register(MagnitudeConfig)
def magnitude_block(config: MagnitudeConfig, step) -> dict:
    sparsity = {}
    with torch.no_grad():
        for name, linear in step.block.linears().items():
            weight = linear_weight(linear)
            weight.mul_(magnitude_mask(weight, config.sparsity))
            sparsity[name] = (weight == 0).float().mean().item()
    return {"sparsity": sparsity}

"""Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2, prune the lowest scores of each output row
(or of each group of M inputs for N:M). No weight update, no retraining."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from prunekit.methods.masks import nm_mask, row_mask
from prunekit.methods.owl import owl_prepare
from prunekit.methods.registry import register
from prunekit.methods.stats import InputNorms, wanda_scores
from prunekit.methods.unstructured import UnstructuredConfig, in_features, prune_block, weight_device
from prunekit.models import linear_weight


@dataclass
class WandaConfig(UnstructuredConfig):
    method: ClassVar[str] = "wanda"
    summary: ClassVar[str] = "|W| times the input feature norms, compared per output row (Sun et al. 2024)"

    @classmethod
    def study_variants(cls):
        return {"wanda": lambda ratio: cls(sparsity=ratio)}


def wanda_mask(scores: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> torch.Tensor:
    return nm_mask(scores, *nm) if nm else row_mask(scores, sparsity)


@register(WandaConfig, prepare=owl_prepare)
def wanda_block(config: WandaConfig, step) -> dict:
    sparsity = config.sparsity_for(step.index)

    def prune_linear(linear, stats: InputNorms) -> None:
        weight = linear_weight(linear)
        with torch.no_grad():
            weight.mul_(wanda_mask(wanda_scores(weight, stats.norms()), sparsity, config.nm_pair))

    return prune_block(config, step, lambda lin: InputNorms(in_features(lin), weight_device(lin)), prune_linear)

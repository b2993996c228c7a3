"""Iterative prune-retrain (Han et al. 2015): prune by magnitude, retrain the survivors with the
pruned weights held at zero, prune further, over a schedule of rising sparsities."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from prunekit.errors import PrunekitError
from prunekit.methods import prune
from prunekit.methods.magnitude import MagnitudeConfig
from prunekit.recover.finetune import FinetuneConfig, finetune, make_optimizer, sparse_masks
from prunekit.sequential import EngineConfig

log = logging.getLogger(__name__)


@dataclass
class PruneRetrainConfig:
    schedule: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.6, 0.7])
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.schedule or any(not 0 <= s < 1 for s in self.schedule) or sorted(self.schedule) != self.schedule:
            raise PrunekitError(f"--schedule must be rising sparsities in [0, 1), got {self.schedule}")


def prune_retrain(
    model,
    train_tokens: torch.Tensor,
    config: PruneRetrainConfig,
    evaluate: Callable[[], float] | None = None,
    progress: bool = True,
) -> list[dict]:
    """Run the schedule; after each stage record the sparsity, the training loss and ``evaluate()``."""
    optimizer = make_optimizer(model, config.finetune)  # one optimizer: its state is masked at each stage
    stages = []
    for stage, sparsity in enumerate(config.schedule):
        prune(
            model,
            MagnitudeConfig(sparsity, include=config.include, exclude=config.exclude),
            engine=EngineConfig(progress=False),
        )
        masks = sparse_masks(model, config.include, config.exclude)
        train = finetune(model, train_tokens, config.finetune, masks, optimizer, progress=progress)
        achieved = sum(int((p == 0).sum()) for p in masks) / sum(p.numel() for p in masks)
        record = {
            "stage": stage,
            "sparsity": sparsity,
            "achieved": achieved,
            "final_loss": train.losses[-1] if train.losses else None,
            "train_seconds": train.seconds,
        }
        if evaluate is not None:
            record["metric"] = evaluate()
        log.info("prune-retrain stage %d: %s", stage, record)
        stages.append(record)
    return stages

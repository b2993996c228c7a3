"""A short full fine-tune on token windows, with sparse masks held fixed.

Masked weights stay exactly zero: their gradients are zeroed before each optimizer step, the
optimizer's moments at those positions are zeroed whenever the masks change (so AdamW's momentum
from before a pruning step cannot revive them), and the weights are re-masked after each step.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.errors import PrunekitError

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    steps: int = 50
    lr: float = 2e-5
    batch_size: int = 4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0:
            raise PrunekitError("fine-tuning needs --steps >= 0, --batch-size >= 1 and --lr > 0")


@dataclass
class FinetuneReport:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def make_optimizer(model: nn.Module, config: FinetuneConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def mask_optimizer_state(optimizer: torch.optim.Optimizer, masks: dict[nn.Parameter, torch.Tensor]) -> None:
    """Zero every optimizer moment at pruned positions."""
    for param, mask in masks.items():
        for value in optimizer.state.get(param, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == mask.shape:
                value.mul_(mask)


def sparse_masks(model: nn.Module, include=(), exclude=()) -> dict[nn.Parameter, torch.Tensor]:
    """The keep-mask (nonzero entries) of each selected block linear's weight, keyed by the parameter."""
    from prunekit.methods.unstructured import select_linears
    from prunekit.models import get_adapter

    adapter = get_adapter(model)
    masks = {}
    for i in range(adapter.num_blocks()):
        for linear in select_linears(adapter.block(i), include, exclude).values():
            masks[linear.weight] = linear.weight.detach() != 0
    return masks


def finetune(
    model: nn.Module,
    tokens: torch.Tensor,
    config: FinetuneConfig,
    masks: dict[nn.Parameter, torch.Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    progress: bool = True,
) -> FinetuneReport:
    """Train on random batches of ``tokens`` [n, seqlen] with the causal LM loss."""
    masks = masks or {}
    optimizer = optimizer or make_optimizer(model, config)
    mask_optimizer_state(optimizer, masks)
    generator = torch.Generator().manual_seed(config.seed)
    device = next(model.parameters()).device
    report = FinetuneReport()
    start = time.perf_counter()
    model.train()
    try:
        for _ in tqdm(range(config.steps), desc="fine-tune", unit="step", disable=not progress):
            batch = tokens[torch.randint(0, len(tokens), (config.batch_size,), generator=generator)].to(device)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            if not math.isfinite(loss.item()):
                raise PrunekitError("fine-tuning diverged (loss is not finite); lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for param, mask in masks.items():
                param.grad.mul_(mask)
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            with torch.no_grad():
                for param, mask in masks.items():
                    param.mul_(mask)
            report.losses.append(loss.item())
    finally:
        model.eval()
        optimizer.zero_grad(set_to_none=True)
    report.seconds = time.perf_counter() - start
    return report

"""Magnitude pruning, in the forms the field uses:

- ``scope="layer"`` (default): the smallest |W| of each weight matrix, the baseline Wanda and
  SparseGPT compare against; or N:M within each row (``nm="2:4"``).
- ``scope="global"``: one threshold over all selected matrices of the model (exact count: ties at
  the threshold go to the earliest layers).
- ``std_quality=q``: Han et al. (2015)'s threshold, q times the standard deviation of each layer's
  weights; the sparsity is then an outcome, reported per layer.

Iterative prune-retrain (Han et al.) lives in ``prunekit.methods.retrain``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from prunekit.errors import PrunekitError
from prunekit.methods.masks import matrix_mask, nm_mask, parse_nm, sparsity_of
from prunekit.methods.registry import MethodConfig, register
from prunekit.methods.unstructured import select_linears
from prunekit.models import get_adapter, linear_weight
from prunekit.sequential import EngineReport

SCOPES = ("layer", "global")


@dataclass
class MagnitudeConfig(MethodConfig):
    sparsity: float = 0.5
    """Fraction of the weights to remove from each linear layer."""
    nm: str | None = None
    """N:M sparsity, e.g. 2:4: prune the N smallest of every M consecutive weights of a row."""
    scope: str = "layer"
    """'layer' (a threshold per matrix) or 'global' (one threshold for the whole model)."""
    std_quality: float | None = None
    """Han et al.'s threshold: prune |w| < q * std(W), per layer."""
    include: tuple[str, ...] = ()
    """Only the linears matching this pattern, e.g. 'mlp.*' (fnmatch on names inside a block; repeatable)."""
    exclude: tuple[str, ...] = ()
    """Skip the linears matching this pattern (repeatable)."""
    prune_embeddings: bool = False
    """Also prune the embeddings (off in every reference)."""
    prune_lm_head: bool = False
    """Also prune the head (a tied head is the embedding matrix: pruning one prunes both)."""
    layer_counts: dict[str, int] | None = field(default=None, repr=False, metadata={"cli": False})  # scope=global
    method: ClassVar[str] = "magnitude"
    summary: ClassVar[str] = "the smallest |W| go, no data needed (Han et al. 2015)"
    sparse_weights: ClassVar[bool] = True

    @property
    def needs_calibration(self) -> bool:
        return False

    @classmethod
    def study_variants(cls):
        return {"magnitude": lambda ratio: cls(sparsity=ratio)}

    def __post_init__(self):
        if not 0.0 <= self.sparsity < 1.0:
            raise PrunekitError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        if self.scope not in SCOPES:
            raise PrunekitError(f"--scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if self.std_quality is not None and self.std_quality <= 0:
            raise PrunekitError(f"--std-quality must be positive, got {self.std_quality}")
        if sum(x is not None for x in (self.nm, self.std_quality)) + (self.scope == "global") > 1:
            raise PrunekitError("choose one of --nm, --std-quality and --scope global")
        self.include, self.exclude = tuple(self.include), tuple(self.exclude)
        if self.nm is not None:
            n, m = parse_nm(self.nm)
            self.sparsity = n / m


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask that removes exactly ``round(sparsity * numel)`` entries of smallest magnitude."""
    return matrix_mask(weight.detach().abs(), sparsity)


def std_threshold_mask(weight: torch.Tensor, quality: float) -> torch.Tensor:
    """Han et al.: keep |w| >= quality * std(W)."""
    w = weight.detach().float()
    return w.abs() >= quality * w.std()


def global_counts(magnitudes: dict[str, torch.Tensor], sparsity: float) -> dict[str, int]:
    """How many weights each layer loses under one global threshold, the total exact.

    Everything below the k-th smallest magnitude goes; the ties at it go to the earliest layers.
    """
    total = sum(m.numel() for m in magnitudes.values())
    k = round(sparsity * total)
    if k == 0:
        return {name: 0 for name in magnitudes}
    threshold = torch.cat([m.flatten() for m in magnitudes.values()]).kthvalue(k).values
    below = {name: int((m < threshold).sum()) for name, m in magnitudes.items()}
    ties_left = k - sum(below.values())
    counts = {}
    for name, m in magnitudes.items():
        take = min(int((m == threshold).sum()), ties_left)
        counts[name], ties_left = below[name] + take, ties_left - take
    return counts


def magnitude_prepare(config: MagnitudeConfig, model, calibration, engine) -> MagnitudeConfig:
    """For the global scope: read every selected matrix once and fix each layer's count."""
    if config.scope != "global":
        return config
    from prunekit.sequential import run_sequential

    magnitudes: dict[str, torch.Tensor] = {}

    def collect(step):
        for name, linear in select_linears(step.block, config.include, config.exclude).items():
            magnitudes[f"{step.index}.{name}"] = linear_weight(linear).detach().abs().float().cpu()

    run_sequential(model, collect, None, dataclasses.replace(engine, checkpoint_dir=None), read_only=True)
    return dataclasses.replace(config, layer_counts=global_counts(magnitudes, config.sparsity))


def layer_mask(config: MagnitudeConfig, key: str, weight: torch.Tensor) -> torch.Tensor:
    if config.std_quality is not None:
        return std_threshold_mask(weight, config.std_quality)
    if config.nm is not None:
        return nm_mask(weight.detach().abs(), *parse_nm(config.nm))
    if config.layer_counts is not None:
        return magnitude_mask(weight, config.layer_counts[key] / weight.numel())
    return magnitude_mask(weight, config.sparsity)


def magnitude_finish(config: MagnitudeConfig, model, report: EngineReport) -> dict:
    """Prune the token embeddings and/or the head when asked (at ``config.sparsity``, per matrix)."""
    adapter = get_adapter(model)
    targets = {}
    if config.prune_embeddings:
        targets["embeddings"] = adapter.embeddings()[0].weight
    if config.prune_lm_head:
        targets["lm_head"] = adapter.lm_head().weight
    sparsity, done = {}, set()
    with torch.no_grad():
        for name, weight in targets.items():
            if id(weight) not in done:  # a tied head and embedding are one tensor
                nm = parse_nm(config.nm)
                weight.mul_(nm_mask(weight.abs(), *nm) if nm else magnitude_mask(weight, config.sparsity))
                done.add(id(weight))
            sparsity[name] = sparsity_of(weight)
    return {"sparsity": sparsity} if sparsity else {}


@register(MagnitudeConfig, prepare=magnitude_prepare, finish=magnitude_finish)
def magnitude_block(config: MagnitudeConfig, step) -> dict:
    sparsity = {}
    with torch.no_grad():
        for name, linear in select_linears(step.block, config.include, config.exclude).items():
            weight = linear_weight(linear)
            weight.mul_(layer_mask(config, f"{step.index}.{name}", weight))
            sparsity[name] = sparsity_of(weight)
    return {"sparsity": sparsity}

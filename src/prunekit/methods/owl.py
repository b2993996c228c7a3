"""OWL (Yin et al. 2024): blocks with more outlier scores keep more weights.

A block's outlier ratio is the fraction of its Wanda scores above ``m`` times their mean. The
ratios are scaled to [0, 2*lambda], centred, and turned into per-block sparsities whose mean is the
target: sparsity_l = target - (ratio_l - mean ratio), within target +- lambda.
"""

from __future__ import annotations

import dataclasses

import torch

from prunekit.methods.stats import InputNorms, on_inputs, wanda_scores
from prunekit.methods.unstructured import in_features, select_linears, weight_device
from prunekit.models import linear_weight
from prunekit.sequential import run_sequential


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Fraction of all the scores (of one block's linears together) above ``m`` times their mean."""
    flat = torch.cat([s.flatten().float() for s in scores])
    return (flat > m * flat.mean()).float().mean().item()


def owl_sparsities(ratios: list[float], target: float, lam: float) -> list[float]:
    r = torch.tensor(ratios, dtype=torch.float64)
    spread = r.max() - r.min()
    scaled = (r - r.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(r)
    density = scaled - scaled.mean() + (1 - target)
    return (1 - density).tolist()


def owl_prepare(config, model, calibration, engine):
    """A read-only pass over the dense model that fills ``config.block_sparsity`` when OWL is on."""
    if not config.owl:
        return config
    ratios = []

    def census(step):
        linears = select_linears(step.block, config.include, config.exclude)
        stats = {name: InputNorms(in_features(lin), weight_device(lin)) for name, lin in linears.items()}
        with on_inputs(linears, lambda name, linear, x: stats[name].update(x)):
            step.forward()
        step.reduce(stats)
        scores = [wanda_scores(linear_weight(lin), stats[name].norms()) for name, lin in linears.items()]
        ratios.append(outlier_ratio(scores, config.owl_m))

    engine = dataclasses.replace(engine, checkpoint_dir=None)
    run_sequential(model, census, calibration.tokens, engine, read_only=True)
    return dataclasses.replace(config, block_sparsity=owl_sparsities(ratios, config.sparsity, config.owl_lambda))

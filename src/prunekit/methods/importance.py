"""Importance of width-pruning groups: pure functions of weights, gradients and input statistics.

Every score is per *channel* and higher means "keep". A channel is a neuron of the MLP (the input
channel i of down) or one of the ``head_dim`` channels of an attention head (the input channel of o,
or the output row of q). A group's score aggregates the scores its members give it: the MLP neuron i
has members gate row i, up row i and down column i; a head's channel has members q row and o column.

- magnitude-lp: per member sum of |w|^p (Torch-Pruning's and LLM-Pruner's local norm, unrooted);
- wanda-sp: sum over output rows of |W_ij|·||X_j|| at the consuming projection (down / o);
- activation: ||X_j||² at the consuming projection (Minitron ranks by activation norms);
- fluctuation: FLAP's Var(X_j)·||W_:,j||², the variance of the channel's input over the calibration
  tokens times the squared norm of the column that reads it;
- taylor (LLM-Pruner): the change of the loss when a weight goes to zero, to first order W·∇W,
  to second order ½·W·F·W with F the per-sample Fisher diagonal; ``element`` sums |W·∇W| over a
  member's weights, ``vector`` takes |Σ W·∇W| of the member's weight vector, ``second`` sums
  |W·F·W| and ``mix`` |W·∇W - ½·W·F·W| (LLM-Pruner's param_first, vectorize, param_second,
  param_mix).
"""

from __future__ import annotations

import torch

AGGREGATIONS = ("sum", "mean", "max", "prod", "last")
TAYLOR_ORDERS = ("element", "vector", "second", "mix")


def aggregate(members: list[torch.Tensor], how: str) -> torch.Tensor:
    """Combine the per-channel scores several members of a group give it (LLM-Pruner's group reduction)."""
    stacked = torch.stack([m.float() for m in members])
    if how == "sum":
        return stacked.sum(0)
    if how == "mean":
        return stacked.mean(0)
    if how == "max":
        return stacked.max(0).values
    if how == "prod":
        return stacked.prod(0)
    if how == "last":
        return stacked[-1]
    raise ValueError(f"unknown aggregation {how!r}; use one of {', '.join(AGGREGATIONS)}")


def per_channel(values: torch.Tensor, by: str) -> torch.Tensor:
    """Sum a member's per-weight values per channel: ``by="rows"`` (channel = output row) or ``"cols"``."""
    return values.sum(dim=1 if by == "rows" else 0)


def magnitude(weight: torch.Tensor, by: str, p: int) -> torch.Tensor:
    """Sum of |w|^p of each channel's weights in one member."""
    return per_channel(weight.detach().float().abs() ** p, by)


def wanda_sp(consumer: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """Wanda-sp: sum over output rows of |W_ij|·||X_j||, per input channel j of the consuming linear."""
    return (consumer.detach().abs().float() * input_norms.float().unsqueeze(0)).sum(0)


def fluctuation(consumer: torch.Tensor, input_variance: torch.Tensor) -> torch.Tensor:
    """FLAP's fluctuation metric: Var(X_j) · sum_i W_ij² per input channel j of the consuming linear."""
    return input_variance.float() * (consumer.detach().float() ** 2).sum(0)


def taylor_salience(weight: torch.Tensor, grad: torch.Tensor, fisher: torch.Tensor | None, order: str) -> torch.Tensor:
    """Per-weight estimate of the loss change when the weight is removed (signed for ``vector``)."""
    w = weight.detach().float()
    first = w * grad.float()
    if order in ("element", "vector"):
        return first
    if fisher is None:
        raise ValueError(f"taylor order {order!r} needs the Fisher diagonal")
    second = w * fisher.float() * w
    return second if order == "second" else first - 0.5 * second


def taylor(weight, grad, fisher, order: str, by: str) -> torch.Tensor:
    """A member's Taylor score per channel: |Σ| of the salience for ``vector``, Σ|·| otherwise."""
    salience = taylor_salience(weight, grad, fisher, order)
    if order == "vector":
        return per_channel(salience, by).abs()
    return per_channel(salience.abs(), by)


def standardize(scores: torch.Tensor) -> torch.Tensor:
    """(s - mean) / std over one layer's channels, so layers compare on one scale (FLAP's AL-AM)."""
    scores = scores.double()
    std = scores.std() if scores.numel() > 1 else scores.new_tensor(0.0)
    return (scores - scores.mean()) / (std if std > 0 else 1.0)

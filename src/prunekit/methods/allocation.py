"""How many heads and neurons each block keeps: uniform shapes, or a global ranking across blocks.

Uniform (the default): every pruned block gets one shape, so the result has a standard config.
The target fraction is split between heads and neurons so that both lose as similar a fraction as
the head granularity allows; the MLP width is rounded down to a multiple of ``round_to``.

Global (FLAP's adaptive structure search): each block's scores are standardised per layer and per
module (so layers compare on one scale), every removable unit (a neuron; a KV group, or one query
head from every group, depending on the GQA policy) is ranked by its standardised score, and units
are removed cheapest-first until the removed parameters reach the target. A head costs more
parameters than a neuron; the cost of each unit is its parameter count, which is FLAP's exchange
rate between the two. Every block keeps at least one head per group and ``round_to`` neurons.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunekit.errors import PrunekitError
from prunekit.methods.importance import standardize


@dataclass(frozen=True)
class Shape:
    intermediate_size: int
    num_heads: int
    num_kv_heads: int


@dataclass(frozen=True)
class Geometry:
    """What the parameter cost of a block depends on."""

    hidden: int
    head_dim: int
    gated: bool

    @property
    def per_neuron(self) -> int:
        return (3 if self.gated else 2) * self.hidden

    def params(self, shape: Shape) -> int:
        """Weights of one block's linears (biases and norms are noise at this scale)."""
        attention = self.hidden * self.head_dim * (2 * shape.num_heads + 2 * shape.num_kv_heads)
        return attention + self.per_neuron * shape.intermediate_size


def head_options(heads: int, kv_heads: int, gqa: str) -> list[tuple[int, int]]:
    """Every (query heads, KV heads) a policy can reach, from none removed to one group/head per group left."""
    per_group = heads // kv_heads
    if gqa == "kv-groups":
        return [(g * per_group, g) for g in range(kv_heads, 0, -1)]
    return [(q * kv_heads, kv_heads) for q in range(per_group, 0, -1)]


def round_down(value: float, multiple: int) -> int:
    return max(multiple, int(value // multiple) * multiple)


def explicit_shape(dense: Shape, intermediate_size: int | None, num_heads: int | None, gqa: str) -> Shape:
    """The shape the user asked for, checked against what the GQA policy can reach."""
    heads = num_heads or dense.num_heads
    per_group = dense.num_heads // dense.num_kv_heads
    if gqa == "kv-groups":
        if heads % per_group:
            raise PrunekitError(f"--num-heads {heads}: with --gqa kv-groups it must be a multiple of {per_group}")
        kv = heads // per_group
    else:
        if heads % dense.num_kv_heads:
            raise PrunekitError(
                f"--num-heads {heads}: with --gqa query-even it must be a multiple of "
                f"{dense.num_kv_heads} (the KV heads)"
            )
        kv = dense.num_kv_heads
    if heads > dense.num_heads or (intermediate_size or 0) > dense.intermediate_size:
        raise PrunekitError(f"asked for {heads} heads / {intermediate_size} neurons; the model has {dense}")
    return Shape(intermediate_size or dense.intermediate_size, heads, kv)


def uniform_shape(fraction: float, dense: Shape, geometry: Geometry, gqa: str, round_to: int, heads: bool) -> Shape:
    """One block's shape with ``fraction`` of its weights removed, heads and neurons cut alike."""
    goal = geometry.params(dense) * (1 - fraction)
    options = [(dense.num_heads, dense.num_kv_heads)]
    if heads:
        options = head_options(dense.num_heads, dense.num_kv_heads, gqa)
    best = None
    for q, kv in options:
        attention = geometry.params(Shape(0, q, kv))
        neurons = round_down((goal - attention) / geometry.per_neuron, round_to)
        if neurons > dense.intermediate_size or goal - attention <= 0:
            continue
        imbalance = abs((1 - q / dense.num_heads) - (1 - neurons / dense.intermediate_size))
        if best is None or imbalance < best[0]:
            best = (imbalance, Shape(neurons, q, kv))
    if best is None:
        raise PrunekitError(f"removing {fraction:.1%} of a block cannot be reached with whole heads and neurons")
    return best[1]


# --- global ------------------------------------------------------------------------------------------


def _head_units(head_channels: torch.Tensor, dense: Shape, gqa: str, geometry: Geometry):
    """(scores, costs) of a block's removable head units, in the order they must go (lowest first)."""
    z = standardize(head_channels).mean(1).view(dense.num_kv_heads, -1)  # [kv groups, query heads per group]
    per_group = z.shape[1]
    if gqa == "kv-groups":
        scores = z.mean(1).sort().values[:-1]  # one group always stays
        cost = (2 * per_group + 2) * geometry.hidden * geometry.head_dim
    else:
        scores = z.sort(1).values.mean(0)[:-1]  # unit k: the k-th weakest head of every group
        cost = dense.num_kv_heads * 2 * geometry.hidden * geometry.head_dim
    return scores, torch.full_like(scores, float(cost))


def global_shapes(
    scores: dict[int, tuple[torch.Tensor, torch.Tensor]],
    dense: dict[int, Shape],
    geometry: Geometry,
    remove_params: float,
    gqa: str,
    round_to: int,
    heads: bool = True,
) -> dict[int, Shape]:
    """Per-block shapes from one ranking of every block's standardised units (see the module docstring).

    ``scores[i]`` is (head channel scores [num_heads, channels], neuron scores [intermediate]) of block i.
    """
    all_scores, all_costs, owners, kinds = [], [], [], []
    for i, (head_channels, neurons) in scores.items():
        if heads:
            s, c = _head_units(head_channels, dense[i], gqa, geometry)
            all_scores.append(s), all_costs.append(c)
            owners += [i] * len(s)
            kinds += [0] * len(s)
        removable = max(0, dense[i].intermediate_size - round_to)
        s = standardize(neurons).sort().values[:removable]
        all_scores.append(s), all_costs.append(torch.full_like(s, float(geometry.per_neuron)))
        owners += [i] * len(s)
        kinds += [1] * len(s)
    score, cost = torch.cat(all_scores), torch.cat(all_costs)
    if cost.sum() < remove_params:
        raise PrunekitError("the target removes more than the prunable blocks can lose; lower --target-params")
    removed = {(i, k): 0 for i in scores for k in (0, 1)}
    blocked, total = set(), 0.0
    for t in torch.argsort(score, stable=True).tolist():
        if total >= remove_params:
            break
        unit = (owners[t], kinds[t])
        # A unit that overshoots the target is skipped (a head is worth many neurons); the block's later
        # units of that kind are weaker-ranked and costlier-or-equal, so they are skipped too.
        if unit in blocked or total + cost[t] > remove_params + geometry.per_neuron:
            blocked.add(unit)
            continue
        removed[unit] += 1
        total += float(cost[t])
    shapes = {}
    for i in scores:
        d = dense[i]
        per_group = d.num_heads // d.num_kv_heads
        gone = removed[(i, 0)]
        q, kv = (
            (d.num_heads - gone * per_group, d.num_kv_heads - gone)
            if gqa == "kv-groups"
            else (
                d.num_heads - gone * d.num_kv_heads,
                d.num_kv_heads,
            )
        )
        neurons = d.intermediate_size - removed[(i, 1)]
        if removed[(i, 1)]:
            neurons = min(d.intermediate_size, max(round_to, round(neurons / round_to) * round_to))
        shapes[i] = Shape(neurons, q, kv)
    return shapes

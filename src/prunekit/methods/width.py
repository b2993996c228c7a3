"""Width pruning: remove whole GLU-MLP neurons and attention heads, so the model really shrinks.

Groups (one per structure that must go together):
- an MLP neuron i: row i of gate and up (fc1 with its bias for plain MLPs), column i of down;
- an attention head: its q rows and o columns; with grouped-query attention either whole KV groups
  go (the KV head with all its query heads, as LLM-Pruner does; ``gqa="kv-groups"``) or the same
  number of query heads inside every group (all KV heads stay, as Torch-Pruning and Minitron do;
  ``gqa="query-even"``).

Importance of a group (pure functions below, aggregated over the group's members):
- ``magnitude-l1`` / ``magnitude-l2``: norms of the member weights;
- ``wanda-sp``: |W|·||X|| at the input channels of down / o (Wanda's structured variant);
- ``activation``: the L2 norm of the channel's activation at the input of down / o (Minitron);
- ``random``: a seeded baseline.

Allocation here is uniform (every block gets the same shape, so the result is a standard config):
the target fraction of non-embedding parameters is split between heads and neurons so that both
are pruned by as similar a fraction as the head granularity allows, and the MLP width is rounded
to a multiple of ``round_to``. FLAP, Taylor importance and global allocation come next.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from prunekit.errors import PrunekitError
from prunekit.methods import register
from prunekit.methods.stats import InputNorms, on_inputs
from prunekit.models import linear_weight
from prunekit.surgery import (
    heads_for_even_query_removal,
    heads_for_kv_group_removal,
    prune_attention_heads,
    prune_mlp_neurons,
    update_config_uniform,
)

IMPORTANCES = ("magnitude-l1", "magnitude-l2", "wanda-sp", "activation", "random")
GQA_POLICIES = ("kv-groups", "query-even")
DATA_FREE = ("magnitude-l1", "magnitude-l2", "random")


@dataclass
class WidthConfig:
    target_params: float | None = 0.2  # fraction of non-embedding parameters to remove
    intermediate_size: int | None = None  # or explicit sizes: MLP width kept ...
    num_heads: int | None = None  # ... and query heads kept per block
    importance: str = "wanda-sp"
    gqa: str = "kv-groups"
    round_to: int = 8
    prune_heads: bool = True  # with target_params: may heads go too, or only MLP neurons?
    seed: int = 0
    method: ClassVar[str] = "width"

    def __post_init__(self):
        if self.importance not in IMPORTANCES:
            raise PrunekitError(f"--importance must be one of {', '.join(IMPORTANCES)}, got {self.importance!r}")
        if self.gqa not in GQA_POLICIES:
            raise PrunekitError(f"--gqa must be one of {', '.join(GQA_POLICIES)}, got {self.gqa!r}")
        explicit = self.intermediate_size is not None or self.num_heads is not None
        if explicit:
            self.target_params = None
        elif self.target_params is None or not 0 < self.target_params < 1:
            raise PrunekitError(f"--target-params must be in (0, 1), got {self.target_params}")
        if self.round_to < 1:
            raise PrunekitError(f"--round-to must be at least 1, got {self.round_to}")

    @property
    def needs_calibration(self) -> bool:
        return self.importance not in DATA_FREE


# --- importance: pure functions ---------------------------------------------------------------------


def channel_scores(weights_by_rows: list[torch.Tensor], weights_by_cols: list[torch.Tensor], norm: str) -> torch.Tensor:
    """Per-channel magnitude: channel i owns row i of each ``by_rows`` matrix and column i of each ``by_cols``."""
    p = 1 if norm == "magnitude-l1" else 2
    parts = [w.detach().float().norm(p=p, dim=1) ** p for w in weights_by_rows]
    parts += [w.detach().float().norm(p=p, dim=0) ** p for w in weights_by_cols]
    return torch.stack(parts).sum(0) ** (1 / p)


def wanda_sp_scores(consumer: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """Wanda-sp: sum over output rows of |W_ij|·||X_j||, per input channel j of the consuming linear."""
    return (consumer.detach().abs().float() * input_norms.float().unsqueeze(0)).sum(0)


def heads_from_channels(channel_scores_: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Sum channel scores over each head's ``head_dim`` channels."""
    return channel_scores_.view(-1, head_dim).sum(1)


# --- allocation ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    intermediate_size: int
    num_heads: int
    num_kv_heads: int


def block_params(shape: Shape, hidden: int, head_dim: int, gated: bool) -> int:
    """Weights of one block's linears (biases and norms are noise at this scale)."""
    attention = hidden * head_dim * (2 * shape.num_heads + 2 * shape.num_kv_heads)
    return attention + (3 if gated else 2) * hidden * shape.intermediate_size


def head_options(heads: int, kv_heads: int, gqa: str) -> list[tuple[int, int]]:
    """Every (query heads, KV heads) a policy can reach, from none removed to one group/head per group left."""
    per_group = heads // kv_heads
    if gqa == "kv-groups":
        return [(g * per_group, g) for g in range(kv_heads, 0, -1)]
    return [(q * kv_heads, kv_heads) for q in range(per_group, 0, -1)]


def round_down(value: float, multiple: int) -> int:
    return max(multiple, int(value // multiple) * multiple)


def allocate(config: WidthConfig, dense: Shape, hidden: int, head_dim: int, gated: bool) -> Shape:
    """The uniform target shape: explicit sizes, or the target split to prune heads and neurons alike."""
    if config.target_params is None:
        heads = config.num_heads or dense.num_heads
        if config.gqa == "kv-groups":
            per_group = dense.num_heads // dense.num_kv_heads
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
        return Shape(config.intermediate_size or dense.intermediate_size, heads, kv)
    dense_params = block_params(dense, hidden, head_dim, gated)
    goal = dense_params * (1 - config.target_params)
    mlp_per_neuron = (3 if gated else 2) * hidden
    options = (
        head_options(dense.num_heads, dense.num_kv_heads, config.gqa)
        if config.prune_heads
        else [(dense.num_heads, dense.num_kv_heads)]
    )
    best = None
    for heads, kv in options:
        attention = block_params(Shape(0, heads, kv), hidden, head_dim, gated)
        neurons = round_down((goal - attention) / mlp_per_neuron, config.round_to)
        if neurons > dense.intermediate_size or goal - attention <= 0:
            continue
        attention_cut = 1 - heads / dense.num_heads
        mlp_cut = 1 - neurons / dense.intermediate_size
        candidate = (abs(attention_cut - mlp_cut), Shape(neurons, heads, kv))
        if best is None or candidate[0] < best[0]:
            best = candidate
    if best is None:
        raise PrunekitError(f"--target-params {config.target_params} cannot be reached with whole heads and neurons")
    return best[1]


# --- the block step --------------------------------------------------------------------------------


def _mlp_scores(config: WidthConfig, block, stats: InputNorms | None, generator) -> torch.Tensor:
    mlp = block.mlp
    down = linear_weight(mlp.down)
    if config.importance == "random":
        return torch.rand(down.shape[1], generator=generator)
    if config.importance == "wanda-sp":
        return wanda_sp_scores(down, stats.norms())
    if config.importance == "activation":
        return stats.norms()
    rows = [linear_weight(m) for m in (mlp.gate, mlp.up) if m is not None]
    if mlp.gate_up is not None:
        gate, up = linear_weight(mlp.gate_up).chunk(2, dim=0)
        rows = [gate, up]
    return channel_scores(rows, [down], config.importance)


def _head_scores(config: WidthConfig, block, stats: InputNorms | None, generator) -> torch.Tensor:
    attn = block.attention
    o = linear_weight(attn.o)
    if config.importance == "random":
        return torch.rand(attn.num_heads, generator=generator)
    if config.importance == "wanda-sp":
        return heads_from_channels(wanda_sp_scores(o, stats.norms()), attn.head_dim)
    if config.importance == "activation":
        return heads_from_channels(stats.norms() ** 2, attn.head_dim).sqrt()
    q = linear_weight(attn.q) if attn.q is not None else linear_weight(attn.qkv)[: attn.num_heads * attn.head_dim]
    per_channel = channel_scores([q], [o], config.importance)
    p = 1 if config.importance == "magnitude-l1" else 2
    return heads_from_channels(per_channel**p, attn.head_dim) ** (1 / p)


def _keep_heads(config: WidthConfig, scores: torch.Tensor, heads: int, kv_heads: int, target: Shape) -> torch.Tensor:
    if config.gqa == "kv-groups":
        group_scores = scores.view(kv_heads, -1).sum(1)
        remove = torch.argsort(group_scores, stable=True)[: kv_heads - target.num_kv_heads].tolist()
        return heads_for_kv_group_removal(heads, kv_heads, remove)
    per_group_removed = (heads - target.num_heads) // kv_heads
    return heads_for_even_query_removal(heads, kv_heads, per_group_removed, scores)


def width_prepare(config: WidthConfig, model, calibration, engine) -> WidthConfig:
    if config.needs_calibration and calibration is None:
        raise PrunekitError(f"--importance {config.importance} needs calibration data; pass --calib (e.g. c4)")
    return config


def width_finish(config: WidthConfig, model) -> dict:
    """Every block has the same shape now: write it into the config, so any tool loads the result."""
    return {"config": update_config_uniform(model)}


def width_restore(config: WidthConfig, block, report: dict) -> None:
    """Give a block the shape a checkpoint recorded; the checkpoint's weights then overwrite it."""
    heads, kv_heads = block.attention.num_heads, block.attention.num_kv_heads
    if report["num_heads"] < heads:
        target = Shape(report["intermediate_size"], report["num_heads"], report["num_kv_heads"])
        prune_attention_heads(block, _keep_heads(config, torch.zeros(heads), heads, kv_heads, target))
    prune_mlp_neurons(block, torch.arange(report["intermediate_size"]))


@register(WidthConfig, prepare=width_prepare, finish=width_finish, restore=width_restore)
def width_block(config: WidthConfig, step) -> dict:
    block = step.block
    down, o = linear_weight(block.mlp.down), linear_weight(block.attention.o)
    dense = Shape(down.shape[1], block.attention.num_heads, block.attention.num_kv_heads)
    hidden = o.shape[0]  # o writes the residual stream
    target = allocate(config, dense, hidden, block.attention.head_dim, block.mlp.gated)
    stats = {}
    if config.needs_calibration:
        stats = {"down": InputNorms(down.shape[1], down.device), "o": InputNorms(o.shape[1], o.device)}
        linears = {"down": block.mlp.down, "o": block.attention.o}
        with on_inputs(linears, lambda name, linear, x: stats[name].update(x)):
            step.forward()
    generator = torch.Generator().manual_seed(config.seed + step.index)
    if target.num_heads < dense.num_heads:
        scores = _head_scores(config, block, stats.get("o"), generator)
        prune_attention_heads(block, _keep_heads(config, scores, dense.num_heads, dense.num_kv_heads, target))
    if target.intermediate_size < dense.intermediate_size:
        scores = _mlp_scores(config, block, stats.get("down"), generator)
        prune_mlp_neurons(block, torch.argsort(scores, descending=True, stable=True)[: target.intermediate_size])
    return {
        "intermediate_size": target.intermediate_size,
        "num_heads": target.num_heads,
        "num_kv_heads": target.num_kv_heads,
    }

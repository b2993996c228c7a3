"""Hidden-size pruning (Minitron: Muralidharan et al. 2024, Sreenivas et al. 2024): remove the residual-stream
channels the calibration data uses least, from the embeddings, every norm, reader and writer, and the head.

Importance (Minitron's embedding-channel importance): the stream is only ever read through a norm, so a
channel matters as much as the normalised signal the sub-layers and the head read from it. For every norm
whose output is read (each block's attention and MLP input norms, and the final norm before the head), per
calibration sample the mean of ``|norm output|`` over its tokens, then the L2 norm of that over the samples
(mean over the sequence, L2 over the batch, the aggregation NVIDIA's Model Optimizer uses); a channel's
importance is the sum of that over all those norms. The norms' gains are included, as they are in what the
readers see. Model Optimizer hooks the block norms only; the final norm is added here because the head reads
the stream through it alone. Gemma 3's sandwich norms (after attention and MLP) are left out: they
normalise what a sub-layer writes, which the next norm's output already reflects.

The run: one pass of the sequential engine over the unchanged blocks collects the statistics with forward
hooks (the accumulated importance travels in the engine's checkpointed carry, so a run resumes); the
channels are one choice for the whole model, so nothing is cut before the last block. ``hidden_finish``
keeps the most important channels and cuts every module at once (``prunekit.surgery.channels``: exactly
the masked model, a standard config that stock transformers loads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.io.lazy import is_lazy
from prunekit.methods.registry import MethodConfig, register
from prunekit.methods.stats import on_outputs
from prunekit.models import get_adapter, parameter_counts
from prunekit.sequential import EngineReport
from prunekit.surgery.channels import check_removable, remove_hidden_channels, width_problem
from prunekit.surgery.hidden import SHORTCUTS, hidden_width, norm_before, stream
from prunekit.surgery.linear import in_features, out_features

TARGETS = ("ratio", "target_params", "hidden_size")
MIN_KEPT = 0.25  # without force, at least a quarter of the hidden channels stays


@dataclass
class HiddenConfig(MethodConfig):
    ratio: float | None = None
    """Fraction of the hidden channels (the residual stream's width, hidden_size) to remove."""
    target_params: float | None = None
    """Instead of --ratio: the fraction of non-embedding parameters to remove."""
    hidden_size: int | None = None
    """Instead of --ratio: the number of hidden channels to keep (a multiple of --round-to)."""
    round_to: int = 8
    """Keep a multiple of this many hidden channels (32 keeps rows whole blocks for GGUF's q8_0 / q4_0)."""
    force: bool = False
    """Accept a target that keeps under a quarter of the hidden channels (refused otherwise)."""
    method: ClassVar[str] = "hidden"
    summary: ClassVar[str] = "remove the least active residual-stream channels: a smaller hidden_size (Minitron)"
    reshapes_blocks: ClassVar[bool] = True

    @classmethod
    def study_variants(cls):
        return {"hidden": lambda ratio: cls(target_params=ratio)}

    def __post_init__(self):
        given = [name for name in TARGETS if getattr(self, name) is not None]
        if len(given) != 1:
            raise PrunekitError("--method hidden needs exactly one of --ratio, --target-params or --hidden-size")
        for name in ("ratio", "target_params"):
            value = getattr(self, name)
            if value is not None and not 0 < value < 1:
                raise PrunekitError(f"--{name.replace('_', '-')} must be a fraction in (0, 1), got {value}")
        if self.round_to < 1:
            raise PrunekitError(f"--round-to must be at least 1, got {self.round_to}")
        if self.hidden_size is not None and (self.hidden_size < 1 or self.hidden_size % self.round_to):
            raise PrunekitError(
                f"--hidden-size must be a positive multiple of --round-to {self.round_to}, got {self.hidden_size} "
                "(pass --round-to 1 to allow any width)"
            )

    def kept_channels(self, width: int, per_channel: int, non_embedding: int, problem=lambda kept: None) -> int:
        """The hidden channels to keep of ``width``: the explicit size, or the multiple of ``round_to`` nearest
        the target (``per_channel`` non-embedding parameters go with each channel, of ``non_embedding``) that
        the model's config can describe (``problem(kept)`` says why it cannot, or ``None``)."""
        if self.hidden_size is not None:
            wanted, asked = self.hidden_size, f"--hidden-size {self.hidden_size}"
        elif self.ratio is not None:
            wanted, asked = (1 - self.ratio) * width, f"--ratio {self.ratio}"
        else:
            wanted = width - self.target_params * non_embedding / per_channel
            asked = f"--target-params {self.target_params}"
        rounded = nearest_multiple(wanted, self.round_to)
        if not 0 < rounded < width:
            largest = (width - 1) // self.round_to * self.round_to
            raise PrunekitError(
                f"{asked} keeps {rounded} of the {width} hidden channels (a multiple of --round-to {self.round_to}); "
                f"choose a target that keeps between {self.round_to} and {largest}"
            )
        by_distance = sorted(range(self.round_to, width, self.round_to), key=lambda k: (abs(k - wanted), -k))
        kept = next((k for k in by_distance if problem(k) is None), None)
        if kept is None or (self.hidden_size is not None and kept != self.hidden_size):
            nearest = f"the nearest it takes is {kept}" if kept else "it takes none of them"
            raise PrunekitError(
                f"{asked}: the config cannot say {rounded} hidden channels ({problem(rounded)}); of the multiples of "
                f"--round-to {self.round_to}, {nearest} (a smaller --round-to allows more)"
            )
        if kept < MIN_KEPT * width and not self.force:
            raise PrunekitError(
                f"{asked} would keep {kept} of the {width} hidden channels, under a quarter: what is left is hardly "
                "the model any more; lower the target, or pass --force to prune anyway"
            )
        return kept


def nearest_multiple(value: float, step: int) -> int:
    """The multiple of ``step`` nearest ``value`` (halves go up)."""
    return math.floor(value / step + 0.5) * step


# -- the math ---------------------------------------------------------------------------------------


class ChannelActivity:
    """One norm's output over the calibration samples: per sample the mean ``|y|`` of each channel over its
    tokens, whose squares are summed over the samples; ``importance`` is the root (mean over the sequence,
    L2 over the batch). Float64; a sample is one calibration window, which has no padding."""

    def __init__(self, width: int, device=None):
        self.squares = torch.zeros(width, dtype=torch.float64, device=device)

    def update(self, y: torch.Tensor) -> None:
        per_sample = y.detach().double().abs().mean(-2)  # [batch, tokens, width] -> [batch, width]
        self.squares += per_sample.pow(2).reshape(-1, per_sample.shape[-1]).sum(0).to(self.squares.device)

    def importance(self) -> torch.Tensor:
        return self.squares.sqrt()


def most_important(importance: torch.Tensor, kept: int) -> torch.Tensor:
    """The ``kept`` channels of highest importance, in increasing order (ties: the lower index stays)."""
    return torch.argsort(importance, descending=True, stable=True)[:kept].sort().values


def channel_params(model: nn.Module) -> int:
    """Non-embedding parameters one residual channel costs: a column of every reader, a row (and bias entry)
    of every writer, a gain (and bias) of every norm. The embeddings and the head are not counted here."""
    parts = stream(model)
    readers = sum(out_features(linear) for linear in parts.readers)
    writers = sum(in_features(linear) + (linear.bias is not None) for linear in parts.writers)
    norms = sum(1 + (getattr(norm, "bias", None) is not None) for norm in parts.norms)
    return readers + writers + norms


# -- the run ----------------------------------------------------------------------------------------


@dataclass
class HiddenPlan:
    config: HiddenConfig
    width: int
    kept: int
    final_norm: nn.Module
    last: int  # index of the last block, after which the final norm's output is measured


def hidden_prepare(config: HiddenConfig, model, calibration, engine) -> HiddenPlan:
    if is_lazy(model):
        raise PrunekitError("--method hidden cuts the embeddings and every block at the end; load without --lazy")
    check_removable(model)  # before the calibration pass, not after it
    adapter = get_adapter(model)
    width = hidden_width(model)
    per_channel, total = channel_params(model), parameter_counts(model)["non_embedding"]
    kept = config.kept_channels(width, per_channel, total, partial(width_problem, model))
    return HiddenPlan(config, width, kept, adapter.final_norm(), adapter.num_blocks() - 1)


@torch.no_grad()
def hidden_block(plan: HiddenPlan, step) -> None:
    """Add this block's norms (and after the last block the final norm) to the importance in the carry."""
    norms = {part: norm_before(step.block, part) for part in SHORTCUTS}
    activity = {part: ChannelActivity(plan.width, step.device) for part in norms}
    with on_outputs(norms, lambda part, norm, y: activity[part].update(y)):
        outputs = step.forward()
    step.accept(outputs)  # nothing changes in this pass: these are the next block's inputs
    if step.index == plan.last:
        activity["final"] = ChannelActivity(plan.width, step.device)
        device = plan.final_norm.weight.device
        for hidden in outputs:
            activity["final"].update(plan.final_norm(hidden.to(device)))
    total = sum(a.importance() for a in activity.values())
    step.carry["importance"] = step.carry.get("importance", torch.zeros_like(total)) + total


@torch.no_grad()
def hidden_finish(plan: HiddenPlan, model, report: EngineReport) -> dict:
    """Keep the most important channels; cut every module touching the stream (exactly the masked model)."""
    importance = report.carry["importance"].cpu()
    keep = most_important(importance, plan.kept)
    config = remove_hidden_channels(model, keep)
    removed = sorted(set(range(plan.width)) - set(keep.tolist()))
    return {
        "hidden_size": {
            "before": plan.width,
            "after": plan.kept,
            "config": config,
            "removed": removed,
            "importance": [round(float(x), 6) for x in importance],
        }
    }


register(HiddenConfig, prepare=hidden_prepare, finish=hidden_finish)(hidden_block)

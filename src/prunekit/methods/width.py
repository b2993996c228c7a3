"""Width pruning: remove whole GLU-MLP neurons and attention heads, so the model really shrinks.

Groups (one per structure that must go together):
- an MLP neuron i: row i of gate and up (fc1 with its bias for plain MLPs), column i of down;
- an attention head: its q rows and o columns; with grouped-query attention either whole KV groups
  go (the KV head with all its query heads, as LLM-Pruner does; ``gqa="kv-groups"``) or the same
  number of query heads inside every group (all KV heads stay, as Torch-Pruning and Minitron do;
  ``gqa="query-even"``).

Importance: ``prunekit.methods.importance`` (magnitude, Wanda-sp, activation, FLAP's fluctuation,
LLM-Pruner's Taylor criteria, random). Allocation: ``prunekit.methods.allocation`` (uniform shapes,
or FLAP-style global ranking), optionally only over a range of blocks (LLM-Pruner's protected first
and last blocks). FLAP's bias compensation folds the removed channels' mean contribution into the
output bias of down / o.

The run: ``width_prepare`` computes what needs the whole model first (Taylor gradients; for global
allocation, every block's scores from one read-only pass over the dense model) and fixes each
block's shape. Then the engine visits the blocks; a block whose scores are not known yet (uniform
allocation with calibration statistics) is scored from its own inputs, i.e. after the earlier blocks
were pruned, and cut to its shape.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch

from prunekit.errors import PrunekitError
from prunekit.io.lazy import is_lazy
from prunekit.methods.allocation import Geometry, Shape, explicit_shape, global_shapes, uniform_shape
from prunekit.methods.gradients import Gradients, accumulate_gradients
from prunekit.methods.importance import AGGREGATIONS, TAYLOR_ORDERS, aggregate, fluctuation, magnitude, taylor, wanda_sp
from prunekit.methods.registry import MethodConfig, register
from prunekit.methods.stats import InputMoments, on_inputs
from prunekit.models import get_adapter, linear_weight
from prunekit.sequential import EngineReport, run_sequential
from prunekit.surgery.config import reference_shapes
from prunekit.surgery.linear import SurgeryError, add_output_bias
from prunekit.surgery.width import (
    block_shape,
    express_added_biases,
    heads_for_even_query_removal,
    heads_for_kv_group_removal,
    prune_attention_heads,
    prune_mlp_neurons,
    update_config_uniform,
)

IMPORTANCES = ("magnitude-l1", "magnitude-l2", "wanda-sp", "activation", "fluctuation", "taylor", "random")
GQA_POLICIES = ("kv-groups", "query-even")
ALLOCATIONS = ("uniform", "global")
DATA_FREE = ("magnitude-l1", "magnitude-l2", "random")
FROM_INPUTS = ("wanda-sp", "activation", "fluctuation")  # scored from the inputs of down / o
MIN_NEURONS = 0.1  # without force, the pruned blocks keep at least a tenth of their MLP neurons


def _choice(option: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise PrunekitError(f"--{option} must be one of {', '.join(allowed)}, got {value!r}")


@dataclass
class WidthConfig(MethodConfig):
    # Defaults: the best configuration in BENCHMARKS' width table whose output stock transformers loads
    # (activation norms, MLP neurons only, uniform shapes: 59.5 at 20% on SmolLM2-135M); the best overall
    # is one flag away, --allocation global (53.2; per-block shapes, loaded by prunekit.load).
    target_params: float | None = None
    """Fraction of the non-embedding parameters to remove (0.2 unless explicit sizes are given)."""
    intermediate_size: int | None = None
    """Explicit sizes instead of --target-params: MLP neurons kept per block."""
    num_heads: int | None = None
    """Explicit sizes instead of --target-params: query heads kept per block."""
    importance: str = "activation"
    """activation (Minitron's activation norms, the best measured), magnitude-l1, magnitude-l2, wanda-sp,
    fluctuation (FLAP), taylor, random."""
    taylor: str = "element"
    """With --importance taylor: element, vector, second or mix (LLM-Pruner's variants)."""
    aggregation: str = "sum"
    """How a group's members combine: sum, mean, max, prod, last."""
    gqa: str = "query-even"
    """With --prune-heads: 'query-even' (the same number of query heads from every KV group) or 'kv-groups'."""
    allocation: str = "uniform"
    """'uniform' (every block the same shape: a plain folder stock transformers loads) or 'global' (FLAP's
    ranking across blocks: the best measured quality, per-block shapes that prunekit.load rebuilds)."""
    layers: str | None = None
    """Blocks to prune as start:end, a Python slice such as 4:-2 (the others are kept)."""
    bias_compensation: bool = False
    """FLAP: fold the removed channels' mean output into the bias."""
    round_to: int = 8
    """Round the MLP width down to a multiple of this."""
    prune_heads: bool = False
    """With --target-params: may attention heads go too, or only MLP neurons?"""
    seed: int = 0
    """Seed of --importance random."""
    force: bool = False
    """Accept a target that keeps under a tenth of the pruned blocks' MLP neurons (refused otherwise)."""
    method: ClassVar[str] = "width"
    summary: ClassVar[str] = "remove MLP neurons (and attention heads) by structured importance"
    reshapes_blocks: ClassVar[bool] = True

    @classmethod
    def study_variants(cls):
        return {
            "width": lambda ratio: cls(ratio, importance="activation", prune_heads=False, allocation="global"),
            "width-mlp": lambda ratio: cls(ratio, importance="activation", prune_heads=False, allocation="uniform"),
        }

    def __post_init__(self):
        _choice("importance", self.importance, IMPORTANCES)
        _choice("taylor", self.taylor, TAYLOR_ORDERS)
        _choice("aggregation", self.aggregation, AGGREGATIONS)
        _choice("gqa", self.gqa, GQA_POLICIES)
        _choice("allocation", self.allocation, ALLOCATIONS)
        for name in ("intermediate_size", "num_heads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise PrunekitError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        explicit = self.intermediate_size is not None or self.num_heads is not None
        if explicit and self.target_params is not None:
            raise PrunekitError("give --target-params or explicit sizes (--intermediate-size, --num-heads), not both")
        if not explicit and self.target_params is None:
            self.target_params = 0.2
        if explicit:
            if self.allocation == "global":
                raise PrunekitError("--allocation global ranks blocks against a --target-params, not explicit sizes")
        elif self.target_params is None or not 0 < self.target_params < 1:
            raise PrunekitError(f"--target-params must be in (0, 1), got {self.target_params}")
        if self.round_to < 1:
            raise PrunekitError(f"--round-to must be at least 1, got {self.round_to}")
        if self.layers is not None:
            parse_layers(self.layers, 1 << 16)  # syntax now; the range is checked against the model later

    @property
    def needs_calibration(self) -> bool:
        return self.importance not in DATA_FREE or self.bias_compensation


@dataclass(frozen=True)
class Recipe:
    """A published setting: the method options and the calibration it used (each overridable)."""

    options: dict
    calib: str
    nsamples: int
    seqlen: int
    source: str


RECIPES = {
    # LLM-Pruner (Ma et al. 2023), its Llama setting: block-wise groups, element-wise first-order Taylor
    # summed over the group, blocks 4..30 of 32 pruned (the first 4 and last 2 kept), 10 samples of 64
    # tokens. Its scripts calibrate on BookCorpus or C4; C4 is what is available here.
    "llm-pruner": Recipe(
        {
            "importance": "taylor",
            "taylor": "element",
            "aggregation": "sum",
            "gqa": "kv-groups",
            "layers": "4:-2",
            "prune_heads": True,
        },
        "c4",
        10,
        64,
        "LLM-Pruner, scripts/prune_llama-7b.sh: --block_wise --pruner_type taylor --taylor param_first",
    ),
    # FLAP (An et al. 2024): fluctuation metric, adaptive structure across layers and modules (AL-AM),
    # bias compensation, 1024 samples of 128 tokens (WikiText-2 train there; C4 here).
    "flap": Recipe(
        {
            "importance": "fluctuation",
            "allocation": "global",
            "bias_compensation": True,
            "gqa": "kv-groups",
            "prune_heads": True,
        },
        "c4",
        1024,
        128,
        "FLAP, main.py: --metrics WIFV --structure AL-AM --nsamples 1024",
    ),
}


def parse_layers(spec: str | None, num_blocks: int) -> list[int]:
    """The blocks a "start:end" slice selects (Python semantics, negatives from the end)."""
    if spec is None:
        return list(range(num_blocks))
    parts = spec.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        start, end = (int(p) if p.strip() else None for p in parts)
    except ValueError:
        raise PrunekitError(f"--layers must be start:end (e.g. 4:-2 or 3:28), got {spec!r}") from None
    chosen = list(range(num_blocks)[slice(start, end)])
    if not chosen:
        raise PrunekitError(f"--layers {spec} selects no block of the model's {num_blocks}")
    return chosen


# --- scoring one block ---------------------------------------------------------------------------


@dataclass
class Scores:
    heads: torch.Tensor  # [num_heads, channels]: per-channel scores of each query head (higher = keep)
    neurons: torch.Tensor  # [intermediate_size]


def _rows(module, start: int = 0, end: int | None = None):
    """A member: the weight rows [start:end] of a linear (and of its gradients, when there are any)."""
    return module, slice(start, end), "rows"


def _mlp_members(block) -> list:
    mlp = block.mlp
    if mlp.gate_up is not None:
        width = linear_weight(mlp.down).shape[1]
        first = [_rows(mlp.gate_up, 0, width), _rows(mlp.gate_up, width, 2 * width)]
    else:
        first = [_rows(m) for m in (mlp.gate, mlp.up) if m is not None]
    return [*first, (mlp.down, slice(None), "cols")]


def _attention_members(block) -> tuple[list, list]:
    """(members per query-head channel, members per KV-head channel)."""
    attn = block.attention
    q_width, kv_width = attn.num_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim
    if attn.qkv is not None:
        q, k, v = (
            _rows(attn.qkv, 0, q_width),
            _rows(attn.qkv, q_width, q_width + kv_width),
            _rows(attn.qkv, q_width + kv_width),
        )
    else:
        q, k, v = _rows(attn.q), _rows(attn.k), _rows(attn.v)
    return [q, (attn.o, slice(None), "cols")], [k, v]


def _member_score(config: WidthConfig, member, gradients: Gradients | None) -> torch.Tensor:
    module, rows, by = member
    weight = linear_weight(module)[rows]
    if config.importance.startswith("magnitude"):
        return magnitude(weight, by, p=1 if config.importance == "magnitude-l1" else 2)
    fisher = gradients.fisher[module][rows] if gradients.fisher is not None else None
    return taylor(weight, gradients.grad[module][rows], fisher, config.taylor, by)


def score_block(
    config: WidthConfig, block, moments: dict[str, InputMoments] | None, gradients: Gradients | None, generator
) -> Scores:
    """Per-channel scores of the block's heads and neurons under ``config.importance``."""
    attn = block.attention
    heads, head_dim = attn.num_heads, attn.head_dim
    neurons = linear_weight(block.mlp.down).shape[1]
    if config.importance == "random":
        return Scores(torch.rand(heads, 1, generator=generator), torch.rand(neurons, generator=generator))
    if config.importance in FROM_INPUTS:
        metric = {
            "wanda-sp": lambda w, m: wanda_sp(w, m.norms()),
            "activation": lambda w, m: m.squares.float(),  # squared: a head's score is its squared norm
            "fluctuation": lambda w, m: fluctuation(w, m.variance()),
        }[config.importance]
        o, down = linear_weight(attn.o), linear_weight(block.mlp.down)
        return Scores(metric(o, moments["o"]).view(heads, head_dim), metric(down, moments["down"]))
    mlp = aggregate([_member_score(config, m, gradients) for m in _mlp_members(block)], config.aggregation)
    per_head, per_kv = _attention_members(block)
    members = [_member_score(config, m, gradients) for m in per_head]
    if config.gqa == "kv-groups":  # the group owns its k and v rows: share them among its query heads
        share = attn.queries_per_kv
        members += [
            (_member_score(config, m, gradients).view(attn.num_kv_heads, head_dim) / share)
            .repeat_interleave(share, 0)
            .flatten()
            for m in per_kv
        ]
    return Scores(aggregate(members, config.aggregation).view(heads, head_dim), mlp)


def collect_moments(step) -> tuple[dict[str, InputMoments], list[torch.Tensor]]:
    """Mean, variance and norm of every input channel of down and o over the block's calibration inputs,
    and the block's outputs from that same pass."""
    block = step.block
    linears = {"down": block.mlp.down, "o": block.attention.o}
    device = linear_weight(block.attention.o).device
    moments = {name: InputMoments(linear_weight(m).shape[1], device) for name, m in linears.items()}
    with on_inputs(linears, lambda name, linear, x: moments[name].update(x)):
        outputs = step.forward()
    return step.reduce(moments), outputs


# --- applying a shape ----------------------------------------------------------------------------


def keep_heads(gqa: str, head_scores: torch.Tensor, heads: int, kv_heads: int, target: Shape) -> torch.Tensor:
    """The query heads to keep for ``target`` under a GQA policy, the lowest-scored going first."""
    if gqa == "kv-groups":
        group_scores = head_scores.view(kv_heads, -1).sum(1)
        remove = torch.argsort(group_scores, stable=True)[: kv_heads - target.num_kv_heads].tolist()
        return heads_for_kv_group_removal(heads, kv_heads, remove)
    per_group_removed = (heads - target.num_heads) // kv_heads
    return heads_for_even_query_removal(heads, kv_heads, per_group_removed, head_scores)


def _compensate(linear, keep_channels: torch.Tensor, mean: torch.Tensor) -> None:
    """FLAP: the removed input channels' mean contribution, W[:, removed] @ mean[removed], into the bias."""
    weight = linear_weight(linear)
    removed = torch.ones(weight.shape[1], dtype=torch.bool)
    removed[keep_channels] = False
    add_output_bias(linear, weight[:, removed].float() @ mean[removed].to(weight.device).float())


def apply_shape(config: WidthConfig, block, target: Shape, scores: Scores, moments) -> list[str]:
    """Cut the block to ``target`` keeping its best heads and neurons; returns the linears given a bias."""
    attn, mlp = block.attention, block.mlp
    compensated = []
    if target.num_heads < attn.num_heads:
        keep = keep_heads(config.gqa, scores.heads.sum(1), attn.num_heads, attn.num_kv_heads, target)
        if config.bias_compensation:
            channels = (keep[:, None] * attn.head_dim + torch.arange(attn.head_dim)).flatten()
            _compensate(attn.o, channels, moments["o"].mean())
            compensated.append("o")
        prune_attention_heads(block, keep)
    width = linear_weight(mlp.down).shape[1]
    if target.intermediate_size < width:
        keep = torch.argsort(scores.neurons, descending=True, stable=True)[: target.intermediate_size]
        if config.bias_compensation:
            _compensate(mlp.down, keep, moments["down"].mean())
            compensated.append("down")
        prune_mlp_neurons(block, keep)
    return compensated


# --- the run -------------------------------------------------------------------------------------


@dataclass
class WidthPlan:
    """A width run after ``width_prepare``: each pruned block's shape, and what was scored ahead."""

    config: WidthConfig
    shapes: dict[int, Shape]
    scores: dict[int, Scores] = field(default_factory=dict)
    moments: dict[int, dict] = field(default_factory=dict)

    @property
    def needs_block_inputs(self) -> bool:
        """Does the engine's pass still need block inputs (blocks scored or compensated from them)?"""
        c = self.config
        return any(
            (i not in self.scores and c.importance in FROM_INPUTS) or (c.bias_compensation and i not in self.moments)
            for i in self.shapes
        )


def _dense_shape(block) -> Shape:
    s = block_shape(block)
    return Shape(s.intermediate_size, s.num_heads, s.num_kv_heads)


def _geometry(block) -> Geometry:
    return Geometry(linear_weight(block.attention.o).shape[0], block.attention.head_dim, block.mlp.gated)


def _score_ahead(config: WidthConfig, model, calibration, engine, blocks: list[int], gradients) -> tuple[dict, dict]:
    """Every chosen block's scores (and input moments) from one read-only pass over the dense model."""
    scores, moments = {}, {}
    wants_inputs = config.importance in FROM_INPUTS or config.bias_compensation

    def visit(step):
        if step.index not in blocks:
            return
        if wants_inputs:
            moments[step.index], outputs = collect_moments(step)
            step.accept(outputs)  # nothing changes in this pass: the next block's inputs are these
        generator = torch.Generator().manual_seed(config.seed + step.index)
        scores[step.index] = score_block(config, step.block, moments.get(step.index), gradients, generator)

    tokens = calibration.tokens if (calibration is not None and wants_inputs) else None
    # Read-only: every block stays dense, so "pruned" propagation feeds dense outputs, and accepting
    # the statistics pass's outputs spares a second run of each block.
    pass_engine = replace(engine, propagate="pruned", checkpoint_dir=None)
    run_sequential(model, visit, tokens, pass_engine, read_only=True)
    return scores, moments


def check_bias_expressible(model) -> None:
    """Refuse FLAP's compensation where the config could not say the biases exist.

    Such a folder would load in ``from_pretrained`` (and vLLM) without the biases and without an
    error, computing something else than what was measured. A family qualifies when its o / down
    projections have biases already (OPT, GPT-2) or a config flag gives them one (Llama)."""
    adapter = get_adapter(model)
    block = adapter.block(0)
    names = {id(m): n for n, m in model.named_modules()}
    config = copy.deepcopy(model.config)
    for flag in ("attention_bias", "mlp_bias"):
        if hasattr(config, flag):
            setattr(config, flag, True)
    possible = reference_shapes(model, config)
    missing = [names[id(m)] for m in (block.attention.o, block.mlp.down) if f"{names[id(m)]}.bias" not in possible]
    if missing:
        raise PrunekitError(
            f"--bias-compensation adds biases to {' and '.join(missing)}, which {type(model.config).__name__} "
            "has no setting for: standard loaders would silently drop them. Prune without it, or use a family "
            "whose config can carry them (Llama, OPT, GPT-2)"
        )


def width_prepare(config: WidthConfig, model, calibration, engine) -> WidthPlan:
    if config.needs_calibration and calibration is None:
        raise PrunekitError(f"--importance {config.importance} needs calibration data; pass --calib (e.g. c4)")
    if config.bias_compensation:
        check_bias_expressible(model)
    adapter = get_adapter(model)
    blocks = parse_layers(config.layers, adapter.num_blocks())
    views = {i: adapter.block(i) for i in range(adapter.num_blocks())}
    dense = {i: _dense_shape(v) for i, v in views.items()}
    geometry = _geometry(views[0])

    gradients, scores, moments = None, {}, {}
    if config.importance == "taylor":
        if is_lazy(model):
            raise PrunekitError("--importance taylor back-propagates through the whole model; drop --lazy")
        needs_fisher = config.taylor in ("second", "mix")
        gradients = accumulate_gradients(model, calibration.tokens, needs_fisher, engine.progress)
    if config.allocation == "global" or gradients is not None:
        scores, moments = _score_ahead(config, model, calibration, engine, blocks, gradients)
        del gradients  # the scores hold what was needed; the gradients are the size of the model

    if config.target_params is None:
        shapes = {i: explicit_shape(dense[i], config.intermediate_size, config.num_heads, config.gqa) for i in blocks}
    else:
        total = sum(geometry.params(s) for s in dense.values())
        remove = config.target_params * total
        if config.allocation == "global":
            pairs = {i: (scores[i].heads, scores[i].neurons) for i in blocks}
            shapes = global_shapes(
                pairs, dense, geometry, remove, config.gqa, config.round_to, heads=config.prune_heads
            )
        else:
            fraction = remove / sum(geometry.params(dense[i]) for i in blocks)
            if fraction >= 1:
                raise PrunekitError(
                    f"--target-params {config.target_params} over only {len(blocks)} blocks (--layers "
                    f"{config.layers}) would remove whole blocks; widen --layers or lower the target"
                )
            shapes = {
                i: uniform_shape(fraction, dense[i], geometry, config.gqa, config.round_to, config.prune_heads)
                for i in blocks
            }
    check_neurons_kept(config, dense, shapes)
    return WidthPlan(config, shapes, scores, moments)


def check_neurons_kept(config: WidthConfig, dense: dict[int, Shape], shapes: dict[int, Shape]) -> None:
    """Refuse (unless ``force``) shapes that keep under ``MIN_NEURONS`` of the pruned blocks' MLP neurons."""
    kept = sum(s.intermediate_size for s in shapes.values())
    full = sum(dense[i].intermediate_size for i in shapes)
    if config.force or kept >= MIN_NEURONS * full:
        return
    asked = (
        f"--target-params {config.target_params}"
        if config.target_params is not None
        else f"--intermediate-size {config.intermediate_size}"
    )
    raise PrunekitError(
        f"{asked} would keep {kept} of the {full} MLP neurons of the pruned blocks ({kept / full:.1%}), under a "
        "tenth: what is left is hardly the model any more; lower the target, or pass --force to prune anyway"
    )


def _report(block, compensated: list[str] | None = None) -> dict:
    shape = _dense_shape(block)
    report = {
        "intermediate_size": shape.intermediate_size,
        "num_heads": shape.num_heads,
        "num_kv_heads": shape.num_kv_heads,
    }
    if compensated:
        report["bias_added"] = compensated
    return report


def width_block(plan: WidthPlan, step) -> dict:
    block, i = step.block, step.index
    target = plan.shapes.get(i)
    if target is None or target == _dense_shape(block):
        return _report(block)
    moments, scores = plan.moments.get(i), plan.scores.get(i)
    from_inputs = scores is None and plan.config.importance in FROM_INPUTS
    if moments is None and (plan.config.bias_compensation or from_inputs):
        moments, _ = collect_moments(step)  # the block changes next, so the engine re-runs it
    if scores is None:
        generator = torch.Generator().manual_seed(plan.config.seed + i)
        scores = score_block(plan.config, block, moments, None, generator)
    compensated = apply_shape(plan.config, block, target, scores, moments)
    return _report(block, compensated)


def width_finish(plan: WidthPlan, model, report: EngineReport) -> dict:
    """Write the new widths into the config when one config describes every block (a standard folder).

    Otherwise (blocks of different widths; OPT / GPT-2 with heads removed; added biases the family's
    config has no flag for) the config keeps the dense widths and the saved folder gets a shape
    manifest that ``prunekit.load`` rebuilds from.
    """
    flags = express_added_biases(model)
    try:
        return {"config": update_config_uniform(model), **({"bias_flags": flags} if flags else {})}
    except SurgeryError as err:
        return {"config": None, "shape_manifest": str(err)}


def width_restore(plan: WidthPlan, block, report: dict) -> None:
    """Give a block the shape (and biases) a checkpoint recorded; the checkpoint's weights then overwrite it."""
    from prunekit.surgery.config import editable_on_meta  # a lazy model's blocks are on meta here

    heads, kv_heads = block.attention.num_heads, block.attention.num_kv_heads
    with editable_on_meta(block.module):
        if report["num_heads"] < heads:
            target = Shape(report["intermediate_size"], report["num_heads"], report["num_kv_heads"])
            prune_attention_heads(block, keep_heads(plan.config.gqa, torch.zeros(heads), heads, kv_heads, target))
        prune_mlp_neurons(block, torch.arange(report["intermediate_size"]))
    linears = {"o": block.attention.o, "down": block.mlp.down}
    for name in report.get("bias_added", []):
        add_output_bias(linears[name], torch.zeros(linear_weight(linears[name]).shape[0]))


register(WidthConfig, prepare=width_prepare, finish=width_finish, restore=width_restore)(width_block)

"""Depth pruning: remove whole blocks (Shortened LLaMA, ShortGPT, SLEB, Gromov et al.), or single
attention or MLP sub-layers (He et al. 2024, "What matters in transformers?").

Not a per-block method: removal changes the block list, and a greedy ranking scores in one pass per
removal, so depth registers a whole-model function instead of a block function
(``register_whole_model``). Its scoring passes run in the sequential engine all the same
(``depth_scores.Context.sweep``): with ``checkpoint_dir`` they are checkpointed and resume.

The run:
1. candidates: every unit (block, or attention / MLP sub-layer) outside the protected first and last
   blocks (Taylor+ keeps the first four and the last two by default, as Shortened LLaMA does);
2. ranking: one-shot, every candidate scored once on the dense model (``depth_scores``); or
   iterative, the best unit removed and the rest re-scored, until the count or the parameter
   target is reached (SLEB's greedy loop; with ``ppl`` it is SLEB);
3. selection: the first units of the ranking, ``remove`` of them or as many as bring the removed
   parameters nearest ``target_params`` (sub-layers counted by their own size); for one-shot
   angular blocks, the best contiguous run of that length;
4. removal: blocks for real, with the config rewritten (a standard folder); sub-layers replaced
   by stand-ins, saved with a shape manifest (see ``prunekit.surgery.depth``).

The ranking is returned (and saved in ``prunekit.json`` under ``metrics.ranking``); passing that file
as ``ranking_from`` (``--ranking-from``) prunes at another count without scoring again. A greedy
ranking holds only the removals it made: any shorter prefix is what a shorter greedy run would have
chosen.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from prunekit.errors import PrunekitError
from prunekit.io.lazy import is_lazy
from prunekit.methods.depth_scores import CRITERIA, Context, Network, Unit, angular_runs
from prunekit.methods.registry import MethodConfig, register_whole_model, run_fingerprint
from prunekit.models import parameter_counts
from prunekit.sequential import EngineReport
from prunekit.surgery.depth import has_removed_sublayers
from prunekit.surgery.hidden import describe_hidden

log = logging.getLogger(__name__)

UNITS = {"block": ("block",), "attention": ("attention",), "mlp": ("mlp",), "sublayer": ("attention", "mlp")}
PROTECT = {"taylor": (4, 2)}  # Taylor+: Shortened LLaMA keeps the first four and the last two blocks
RANKED_BY = ("criterion", "unit", "iterative", "protect_first", "protect_last")
MIN_KEPT = 0.25  # without force, at least a quarter of the blocks (of each sub-layer kind pruned) stays


@dataclass
class DepthConfig(MethodConfig):
    criterion: str | None = None
    """block-influence (default; ShortGPT, the best measured), ppl, taylor (Taylor+), magnitude, angular (Gromov)."""
    remove: int | None = None
    """Blocks (or sub-layers, with --unit) to remove."""
    target_params: float | None = None
    """Instead of --remove: the fraction of non-embedding parameters to remove."""
    unit: str | None = None
    """block (default), attention, mlp, or sublayer (both kinds, ranked together)."""
    iterative: bool | None = field(default=None, metadata={"flag": "--iterative/--one-shot"})
    """Remove the best unit, re-score the rest, repeat (SLEB)."""
    protect_first: int | None = None
    """First blocks never removed (taylor: 4, else 0)."""
    protect_last: int | None = None
    """Last blocks never removed (taylor: 2, else 0)."""
    ranking_from: str | None = None
    """The prunekit.json of an earlier depth run: reuse its ranking instead of scoring again."""
    force: bool = False
    """Accept a removal that keeps under a quarter of the blocks (or of the sub-layers of a kind)."""
    method: ClassVar[str] = "depth"
    summary: ClassVar[str] = "remove whole blocks or sub-layers (Shortened LLaMA, ShortGPT, SLEB)"
    calibration_defaults: ClassVar[tuple[int, int]] = (10, 128)  # Shortened LLaMA's PPL calibration
    reshapes_blocks: ClassVar[bool] = True

    @classmethod
    def study_variants(cls):
        return {"depth": lambda ratio: cls(criterion="block-influence", target_params=ratio)}

    def __post_init__(self):
        if (self.remove is None) == (self.target_params is None):
            raise PrunekitError("--method depth needs exactly one of --remove N or --target-params FRACTION")
        if self.remove is not None and self.remove < 1:
            raise PrunekitError(f"--remove must be at least 1, got {self.remove}")
        if self.target_params is not None and not 0 < self.target_params < 1:
            raise PrunekitError(f"--target-params must be in (0, 1), got {self.target_params}")
        if self.criterion is not None and self.criterion not in CRITERIA:
            raise PrunekitError(f"--criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}")
        if self.unit is not None and self.unit not in UNITS:
            raise PrunekitError(f"--unit must be one of {', '.join(UNITS)}, got {self.unit!r}")
        for name in ("protect_first", "protect_last"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise PrunekitError(f"--{name.replace('_', '-')} must be at least 0, got {getattr(self, name)}")
        if self.ranking_from is not None:
            self.ranking_from = str(self.ranking_from)
            self._take_from(read_ranking(self.ranking_from))
        # block influence: the best one-shot criterion in BENCHMARKS' depth table (79.3 at 20% on SmolLM2-135M,
        # in under one forward pass; ppl 84.7 in 20)
        self.criterion = self.criterion or "block-influence"
        self.unit = self.unit or "block"
        self.iterative = bool(self.iterative)
        first, last = PROTECT.get(self.criterion, (0, 0))
        self.protect_first = first if self.protect_first is None else self.protect_first
        self.protect_last = last if self.protect_last is None else self.protect_last
        if self.iterative and self.criterion == "magnitude":
            raise PrunekitError("--criterion magnitude does not change when other blocks go; drop --iterative")

    def _take_from(self, ranking: dict) -> None:
        """The ranking's settings, unless the user asked for different ones (then it is the wrong ranking)."""
        for name in RANKED_BY:
            mine, theirs = getattr(self, name), ranking[name]
            if mine is not None and mine != theirs:
                raise PrunekitError(
                    f"--{name.replace('_', '-')} {mine} differs from the ranking's {theirs} ({self.ranking_from}); "
                    "drop the option to reuse the ranking, or drop --ranking-from to score again"
                )
            setattr(self, name, theirs)

    @property
    def needs_calibration(self) -> bool:
        return self.ranking_from is None and self.criterion != "magnitude"


def read_ranking(path: str | Path) -> dict:
    """The depth ranking in a ``prunekit.json`` (under ``metrics.ranking``) or in a JSON file of its own."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PrunekitError(f"cannot read the ranking {path} ({str(err).splitlines()[0]})") from None
    ranking = (data.get("metrics") or {}).get("ranking") if isinstance(data, dict) and "metrics" in data else data
    if not isinstance(ranking, dict) or any(k not in ranking for k in (*RANKED_BY, "num_blocks", "order")):
        raise PrunekitError(f"{path} holds no depth ranking; pass the prunekit.json of an earlier --method depth run")
    return ranking


# -- the run ---------------------------------------------------------------------------------------


@register_whole_model(DepthConfig)
def depth_prune(config: DepthConfig, model, calibration, engine) -> tuple[EngineReport, dict]:
    """Score (or reuse a ranking), select, remove; returns the removals per unit and ``{"ranking": ...}``."""
    start = time.perf_counter()
    if is_lazy(model):
        raise PrunekitError("depth pruning renumbers the blocks a lazy model reads from disk; drop --lazy")
    if has_removed_sublayers(model):
        raise PrunekitError("this model already lacks sub-layers; depth-prune the model it was made from")
    if describe_hidden(model) is not None:  # each block's shortcuts change the stream's basis: none may be skipped
        raise PrunekitError("this model was sliced by SliceGPT, whose blocks each turn the residual stream into the "
                            "next block's basis; depth-prune first, then slice")  # fmt: skip
    network = Network(model)
    total = len(network.alive)
    candidates = _candidates(config, total)
    costs = {unit: network.params(unit) for unit in candidates}
    target = config.target_params * parameter_counts(model)["non_embedding"] if config.target_params else None
    tokens = calibration.tokens if calibration is not None else None
    fingerprint = run_fingerprint(model, config, calibration)
    ctx = Context(network, tokens, engine.batch_size, engine.progress, engine.checkpoint_dir, fingerprint)
    check_kept(config, total, _fewest_removals(config, total, candidates, target, costs))  # before any scoring
    ranking, chosen = _rank_and_select(config, ctx, candidates, target, costs)
    check_kept(config, total, chosen)
    if config.needs_calibration:
        ranking["calibration"] = calibration.describe()
    network.commit([u for u in chosen if u[0] in network.alive and u not in network.muted])  # greedy: done already
    network.finish()
    scores = {(u["block"], u["part"]): u.get("score") for u in ranking["order"]}
    removed = [{"block": b, "removed": part, "score": scores.get((b, part))} for b, part in chosen]
    log.info("depth: removed %s", ", ".join(f"{b}.{p}" for b, p in chosen))
    report = EngineReport(blocks=removed, resumed_from=ctx.resumed, seconds=time.perf_counter() - start)
    return report, {"ranking": ranking}


def _rank_and_select(config: DepthConfig, ctx: Context, candidates, target, costs) -> tuple[dict, list[Unit]]:
    """The ranking (reused, greedy or one-shot) and the units it removes."""
    if config.ranking_from is not None:
        ranking = read_ranking(config.ranking_from)
        _check_fits(ranking, len(ctx.network.alive), config.ranking_from)
        return ranking, select(ranking, config.remove, target, costs)
    if config.iterative:
        ranking = _greedy(ctx, config, candidates, target, costs)
        return ranking, [(u["block"], u["part"]) for u in ranking["order"]]
    ranking = _one_shot(ctx, config, candidates, costs)
    return ranking, select(ranking, config.remove, target, costs)


def _candidates(config: DepthConfig, total: int) -> list[Unit]:
    """Every removable unit; ``PrunekitError`` when the protected blocks leave too few."""
    first, last = config.protect_first, config.protect_last
    blocks = list(range(first, total - last))
    units = [(b, part) for b in blocks for part in UNITS[config.unit]]
    if not units:
        raise PrunekitError(
            f"--protect-first {first} and --protect-last {last} leave no block of {total} to remove; lower them"
        )
    if config.remove is not None:
        if config.unit == "block" and config.remove >= total:
            raise PrunekitError(f"cannot remove all {total} blocks (--remove {config.remove}); keep at least one")
        if config.remove > len(units):
            raise PrunekitError(
                f"--remove {config.remove} but only {len(units)} {config.unit} units lie outside the protected "
                f"blocks (--protect-first {first}, --protect-last {last}, of {total}); remove fewer or protect fewer"
            )
    return units


def _fewest_removals(config: DepthConfig, total: int, candidates: list[Unit], target, costs) -> list[Unit]:
    """Units any ranking will remove at the least: ``remove`` of them (of one kind), or, for a target, as
    many of the largest as come nearest it; ``[]`` where the kinds removed depend on the scores."""
    if config.unit == "sublayer":
        return []
    if config.remove is not None:
        return candidates[: config.remove]
    chosen, removed = [], 0
    for unit in sorted(candidates, key=lambda u: -costs[u]):
        if chosen and not _nearer(removed, costs[unit], target):
            break
        chosen.append(unit)
        removed += costs[unit]
    return chosen[: total - 1]  # a target never takes the last block (``select``)


def check_kept(config: DepthConfig, total: int, removed: list[Unit]) -> None:
    """Refuse a removal that leaves a husk: none of a kind (always), or fewer than ``MIN_KEPT`` of the
    blocks or of a sub-layer kind (unless ``force``)."""
    asked = f"--remove {config.remove}" if config.remove is not None else f"--target-params {config.target_params}"
    least = max(1, math.ceil(total * MIN_KEPT))
    for kind in UNITS[config.unit]:
        kept = total - sum(1 for _, part in removed if part == kind)
        what = "blocks" if kind == "block" else f"{kind} sub-layers"
        if kept == 0:
            raise PrunekitError(f"{asked} would remove all {total} {what}; keep at least one")
        if kept < least and not config.force:
            raise PrunekitError(
                f"{asked} would keep {kept} of {total} {what}, fewer than a quarter ({least}): what is left "
                "is hardly the model any more; lower the target, or pass --force to remove them anyway"
            )


def _check_fits(ranking: dict, total: int, path: str) -> None:
    if ranking["num_blocks"] != total:
        raise PrunekitError(
            f"the ranking in {path} is for a model of {ranking['num_blocks']} blocks, this one has {total}; "
            "pass the ranking of this model or score again"
        )


def _ranking(config: DepthConfig, total: int, order: list[tuple[Unit, float]], started: float, costs) -> dict:
    return {
        **{name: getattr(config, name) for name in RANKED_BY},
        "num_blocks": total,
        "order": [{"block": b, "part": p, "score": s, "params": costs[(b, p)]} for (b, p), s in order],
        "seconds": time.perf_counter() - started,
    }


def _one_shot(ctx: Context, config: DepthConfig, candidates: list[Unit], costs) -> dict:
    """Every candidate scored once on the dense model; for angular blocks also the best run of each length."""
    started, total = time.perf_counter(), len(ctx.network.alive)
    if config.criterion == "angular" and config.unit == "block":
        blocks = [b for b, _ in candidates]
        runs, singles = angular_runs(ctx, blocks, min(len(blocks), total - 1))
        return {**_ranking(config, total, _sorted(singles), started, costs), "runs": runs}
    scores = CRITERIA[config.criterion](ctx, candidates)
    return _ranking(config, total, _sorted(scores), started, costs)


def _sorted(scores: dict[Unit, float]) -> list[tuple[Unit, float]]:
    return sorted(scores.items(), key=lambda item: (item[1], item[0]))


def _greedy(ctx: Context, config: DepthConfig, candidates: list[Unit], target, costs) -> dict:
    """Remove the unit whose removal costs least, re-score the rest on the pruned network, repeat."""
    started, total = time.perf_counter(), len(ctx.network.alive)
    remaining = list(candidates)
    limit = config.remove or (len(remaining) if config.unit != "block" else min(len(remaining), total - 1))
    order: list[tuple[Unit, float]] = []
    removed = 0
    while remaining and len(order) < limit:
        scores = CRITERIA[config.criterion](ctx, remaining)
        unit = min(remaining, key=lambda u: (scores[u], u))
        if target is not None and order and not _nearer(removed, costs[unit], target):
            break
        ctx.network.commit([unit])
        order.append((unit, scores[unit]))
        removed += costs[unit]
        remaining.remove(unit)
        log.info("depth: step %d removes %s %s (score %.6g)", len(order), unit[1], unit[0], scores[unit])
    return _ranking(config, total, order, started, costs)


def _nearer(removed: int, cost: int, target: float) -> bool:
    """Does removing ``cost`` more parameters bring the total removed nearer ``target``?"""
    return abs(removed + cost - target) < abs(removed - target)


def select(ranking: dict, count: int | None, target: float | None, costs: dict[Unit, int]) -> list[Unit]:
    """The units to remove: the first ``count`` of the ranking, or the prefix whose size is nearest ``target``.

    One-shot angular block rankings hold a best run per length instead, chosen the same way."""
    if ranking.get("runs"):
        options = [[(r["start"] + k, "block") for k in range(r["blocks"])] for r in ranking["runs"]]
        if count is not None:
            if count > len(options):
                raise PrunekitError(f"the angular ranking holds runs of at most {len(options)} blocks; remove fewer")
            return options[count - 1]
        sizes = [sum(costs[u] for u in run) for run in options]
        return options[min(range(len(options)), key=lambda i: (abs(sizes[i] - target), i))]
    order = [(u["block"], u["part"]) for u in ranking["order"]]
    if ranking["unit"] == "block":
        order = order[: ranking["num_blocks"] - 1]  # at least one block stays
    if count is not None:
        if count > len(order):
            held = "greedy removals" if ranking["iterative"] else "removable units"
            raise PrunekitError(
                f"the ranking holds {len(order)} {held}, fewer than --remove {count}; remove fewer or score again"
            )
        return order[:count]
    chosen, removed = [], 0
    for unit in order:
        if chosen and not _nearer(removed, costs[unit], target):
            break
        chosen.append(unit)
        removed += costs[unit]
    return chosen

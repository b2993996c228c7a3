"""Mix search (``--method mix``): per block keep it, remove it, remove its attention or its MLP, or narrow
either, whichever mix does least damage under one global parameter budget (Minitron's axes, Puzzle's solver).

The run:
1. score (``mix_scores``): one read-only pass of the sequential engine over the dense model measures
   every block's choices (checkpointed; a rerun resumes), or ``--scores-from`` reads the table an
   earlier run recorded, so a second budget costs only the solver;
2. choose (``mix_solve``): the exact optimum of the additive damage under the budget (SciPy ``milp``);
3. apply, with the surgery the single-axis methods use: heads and neurons cut as width pruning cuts
   them (the same activation importance), removed sub-layers replaced by depth's stand-ins, removed
   blocks taken out with the config rewritten. A uniform result gets a standard config; the rest a
   shape manifest that ``prunekit.load`` rebuilds and the GGUF export turns into per-layer arrays.

Recorded: ``prunekit.json`` under ``metrics.mix`` (the settings, the calibration, every block's dense
shape and every choice with the parameters it removes and its measured errors, and the choice made),
and ``mix-importance.json`` beside it (each block's neuron order and head scores, which cutting
needs). ``--scores-from`` reads both.

Where the hidden size (a global axis: every block's cost depends on it) plugs in: score one table per
hidden size on the model pruned to it, then ``choose`` on each and keep the least damage, or give the
solver one one-hot variable set for the global level with block costs per level; ``Space`` and the
table stay per block either way.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch

from prunekit.errors import PrunekitError
from prunekit.io.files import MANIFEST
from prunekit.io.lazy import is_lazy
from prunekit.methods.mix_scores import DAMAGES, Choice, Importance, Space, damage, measure_block, removed_params
from prunekit.methods.mix_solve import Limit, Solution, solve
from prunekit.methods.registry import MethodConfig, register_whole_model, run_fingerprint
from prunekit.methods.width import GQA_POLICIES
from prunekit.models import get_adapter, parameter_counts
from prunekit.sequential import EngineReport, run_sequential
from prunekit.surgery.depth import has_removed_sublayers, remove_blocks, remove_sublayer
from prunekit.surgery.hidden import describe_hidden
from prunekit.surgery.linear import SurgeryError
from prunekit.surgery.width import block_shape, prune_attention_heads, prune_mlp_neurons, update_config_uniform

IMPORTANCE_FILE = "mix-importance.json"  # not .safetensors: loaders read those as weights
RESAVE = "the folder is not one mix run's output; score again"
SCORED_BY = ("mlp_levels", "head_levels", "gqa", "round_to")  # what the table depends on
DEFAULTS = {"mlp_levels": "0.75,0.5,0.25", "head_levels": "0.67,0.33", "gqa": "query-even", "round_to": 8}


@dataclass
class MixConfig(MethodConfig):
    target_params: float = 0.2
    """Fraction of the non-embedding parameters to remove."""
    mlp_levels: str | None = None
    """mix: fractions of a block's MLP neurons a choice may keep besides all and none (0.75,0.5,0.25)."""
    head_levels: str | None = None
    """mix: fractions of a block's query heads a choice may keep besides all and none, as --gqa reaches them
    (0.67,0.33)."""
    gqa: str | None = None
    """Remove query heads evenly from every KV group ('query-even') or whole KV groups ('kv-groups')."""
    round_to: int | None = None
    """Round the MLP width down to a multiple of this."""
    damage: str = "mse"
    """mix: a choice's damage: 'mse' (squared error of the residual stream after the block over its squared
    norm) or 'cosine' (mean per-token cosine distance); changes nothing in the scores, so --scores-from takes
    either."""
    scores_from: str | None = None
    """mix: an earlier mix run's folder (or its prunekit.json): reuse its scores, no calibration, only the solver."""
    method: ClassVar[str] = "mix"
    summary: ClassVar[str] = (
        "per block keep, remove, drop attention or MLP, or narrow them, under one budget (solved exactly)"
    )
    reshapes_blocks: ClassVar[bool] = True

    @classmethod
    def study_variants(cls):
        return {"mix": lambda ratio: cls(target_params=ratio)}

    def __post_init__(self):
        if not 0 < self.target_params < 1:
            raise PrunekitError(f"--target-params must be in (0, 1), got {self.target_params}")
        if self.damage not in DAMAGES:
            raise PrunekitError(f"--damage must be one of {', '.join(DAMAGES)}, got {self.damage!r}")
        if self.scores_from is not None:
            self.scores_from = str(self.scores_from)
            self._take_from(read_scores(self.scores_from)[0]["settings"])
        for name, value in DEFAULTS.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.gqa not in GQA_POLICIES:
            raise PrunekitError(f"--gqa must be one of {', '.join(GQA_POLICIES)}, got {self.gqa!r}")
        if self.round_to < 1:
            raise PrunekitError(f"--round-to must be at least 1, got {self.round_to}")
        self.mlp_levels = ",".join(map(str, _fractions(self.mlp_levels, "--mlp-levels")))
        self.head_levels = ",".join(map(str, _fractions(self.head_levels, "--head-levels")))

    def _take_from(self, settings: dict) -> None:
        """The scores' settings, unless the user asked for different ones (then they are the wrong scores)."""
        for name in SCORED_BY:
            mine, theirs = getattr(self, name), settings[name]
            if mine is not None and str(mine) != str(theirs):
                raise PrunekitError(
                    f"--{name.replace('_', '-')} {mine} differs from the scores' {theirs} ({self.scores_from}); "
                    "drop the option to reuse the scores, or drop --scores-from to score again"
                )
            setattr(self, name, theirs)

    @property
    def needs_calibration(self) -> bool:
        return self.scores_from is None

    @property
    def space(self) -> Space:
        return Space(
            _fractions(self.mlp_levels, "--mlp-levels"),
            _fractions(self.head_levels, "--head-levels"),
            self.gqa,
            self.round_to,
        )


def _fractions(text: str, flag: str) -> tuple[float, ...]:
    """Comma-separated fractions in (0, 1); an empty list is allowed (no intermediate level)."""
    try:
        values = tuple(float(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise PrunekitError(f"{flag} must be comma-separated fractions like 0.75,0.5, got {text!r}") from None
    if any(not 0 < v < 1 for v in values):
        raise PrunekitError(f"{flag}: every fraction must lie in (0, 1), got {text!r}")
    return values


# -- the recorded scores ---------------------------------------------------------------------------


def read_scores(path: str | Path) -> tuple[dict, list[Importance]]:
    """The table (``metrics.mix`` of a ``prunekit.json``) and the importance file beside it."""
    path = Path(path)
    manifest = path / MANIFEST if path.is_dir() else path
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError) as err:
        raise PrunekitError(f"cannot read the mix scores {manifest} ({str(err).splitlines()[0]})") from None
    record = (data.get("metrics") or {}).get("mix") if isinstance(data, dict) else None
    if not isinstance(record, dict) or any(k not in record for k in ("settings", "blocks")):
        raise PrunekitError(f"{manifest} holds no mix scores; pass the folder of an earlier --method mix run")
    file = manifest.parent / IMPORTANCE_FILE
    try:
        rankings = json.loads(file.read_text())["blocks"]
    except (OSError, ValueError, KeyError, TypeError):
        raise PrunekitError(f"{file} is missing or unreadable; --scores-from needs the whole folder of a mix run") from None
    if len(rankings) != len(record["blocks"]):
        raise PrunekitError(f"{file} ranks {len(rankings)} blocks, {manifest} scores {len(record['blocks'])}; {RESAVE}")
    return record, [Importance(torch.tensor(r["neurons"]), torch.tensor(r["heads"])) for r in rankings]


def _importance_file(importance: list[Importance]) -> bytes:
    """Each block's neuron order and head scores, one compact JSON line (cutting needs them, the solver not)."""
    rankings = [{"neurons": imp.neurons.tolist(), "heads": imp.heads.tolist()} for imp in importance]
    return json.dumps({"blocks": rankings}, separators=(",", ":")).encode()


def _check_fits(record: dict, model, path: str) -> None:
    adapter = get_adapter(model)
    dense = [_shape_dict(adapter.block(i)) for i in range(adapter.num_blocks())]
    if [row["dense"] for row in record["blocks"]] != dense:
        raise PrunekitError(
            f"the scores in {path} are for a model of {len(record['blocks'])} blocks of other shapes; pass the "
            "scores of this model or score again"
        )


def _shape_dict(block) -> dict:
    s = block_shape(block)
    return {"num_heads": s.num_heads, "num_kv_heads": s.num_kv_heads, "intermediate_size": s.intermediate_size}


# -- the run ---------------------------------------------------------------------------------------


@register_whole_model(MixConfig)
def mix_prune(config: MixConfig, model, calibration, engine) -> tuple[EngineReport, dict]:
    """Score (or reuse the scores), solve, cut; returns each block's choice and ``{"mix": table, "files": ...}``."""
    start = time.perf_counter()
    _check_model(model)
    budget = math.ceil(config.target_params * parameter_counts(model)["non_embedding"])
    resumed = 0
    if config.scores_from is not None:
        record, importance = read_scores(config.scores_from)
        _check_fits(record, model, config.scores_from)
    else:
        choose(_costs_only(config.space, model), budget, config.damage)  # an unreachable budget fails before scoring
        record, importance, resumed = score(config, model, calibration, engine)
    solution = choose(record, budget, config.damage)
    blocks = apply_mix(model, config.space, record, solution.choices, importance)
    blocks = [{**b, "damage": damage(row, row["choices"][c], config.damage)}
              for b, row, c in zip(blocks, record["blocks"], solution.choices, strict=True)]  # fmt: skip
    record = {
        **record,
        "target_params": config.target_params,
        "budget": budget,
        "damage": config.damage,
        "chosen": solution.choices,
        "removed_params": int(solution.cost),
        "total_damage": solution.damage,
    }
    report = EngineReport(blocks=blocks, resumed_from=resumed, seconds=time.perf_counter() - start)
    return report, {"mix": record, "config": _config(model), "files": {IMPORTANCE_FILE: _importance_file(importance)}}


def _check_model(model) -> None:
    if is_lazy(model):
        raise PrunekitError("the mix search renumbers the blocks a lazy model reads from disk; drop --lazy")
    if has_removed_sublayers(model):
        raise PrunekitError("this model already lacks sub-layers; run the mix search on the model it was made from")
    if describe_hidden(model) is not None:
        raise PrunekitError("this model was sliced by SliceGPT, whose blocks each turn the residual stream into the "
                            "next block's basis; search the mix first, then slice")  # fmt: skip


def score(config: MixConfig, model, calibration, engine) -> tuple[dict, list[Importance], int]:
    """The table of every block's choices from one read-only pass (``mix_scores``), and the importance."""
    space = config.space
    fingerprint = run_fingerprint(model, replace(config, target_params=0.5, damage="mse"), calibration)
    # Read-only: every block stays dense, and each step accepts its dense outputs as the next inputs.
    pass_engine = replace(engine, propagate="pruned")
    report = run_sequential(model, lambda step: measure_block(space, step), calibration.tokens, pass_engine,
                            fingerprint=fingerprint, save_weights=False)  # fmt: skip
    rows = [{k: v for k, v in r.items() if k != "importance"} for r in report.blocks]
    importance = [
        Importance(torch.tensor(r["importance"]["neurons"]), torch.tensor(r["importance"]["heads"]))
        for r in report.blocks
    ]
    record = {
        "settings": {name: getattr(config, name) for name in SCORED_BY},
        "calibration": calibration.describe(),
        "scoring_seconds": report.seconds,
        "blocks": rows,
    }
    return record, importance, report.resumed_from


def _costs_only(space: Space, model) -> dict:
    """The table without damages (all zero): enough to know whether a budget can be met."""
    adapter = get_adapter(model)
    rows = []
    for i in range(adapter.num_blocks()):
        view = adapter.block(i)
        choices = space.choices(block_shape(view))
        zero = {"sse": 0.0, "cosine": 0.0}
        rows.append({"choices": [{**vars(c), "params": removed_params(view, c), **zero} for c in choices],
                     "norm2": 1.0, "tokens": 1})  # fmt: skip
    return {"blocks": rows}


def choose(record: dict, budget: int, measure: str) -> Solution:
    """The least-damage choice per block removing at least ``budget`` parameters; a block, an attention and
    an MLP always stay."""
    rows = record["blocks"]
    damages = [[damage(row, c, measure) for c in row["choices"]] for row in rows]
    costs = [[c["params"] for c in row["choices"]] for row in rows]

    def where(test) -> list[list[bool]]:
        return [[test(c) for c in row["choices"]] for row in rows]

    most = len(rows) - 1
    limits = [
        Limit(where(lambda c: c["num_heads"] == 0 and c["intermediate_size"] == 0), most, "a block"),
        Limit(where(lambda c: c["num_heads"] == 0), most, "an attention"),
        Limit(where(lambda c: c["intermediate_size"] == 0), most, "an MLP"),
    ]
    return solve(damages, costs, budget, limits)


def apply_mix(model, space: Space, record: dict, chosen: list[int], importance: list[Importance]) -> list[dict]:
    """Cut every block to its choice (width's and depth's surgery); returns what each block became."""
    adapter = get_adapter(model)
    views = [adapter.block(i) for i in range(adapter.num_blocks())]  # before any block changes
    reports, removed = [], []
    for i, (view, row, c) in enumerate(zip(views, record["blocks"], chosen, strict=True)):
        entry = row["choices"][c]
        choice = Choice(entry["num_heads"], entry["num_kv_heads"], entry["intermediate_size"])
        shape = block_shape(view)
        reports.append({"block": i, "choice": choice.describe(shape), **vars(choice), "removed_params": entry["params"]})
        if choice.removes_block:
            removed.append(i)
            continue
        if choice.num_heads == 0:
            remove_sublayer(view, "attention")
        elif choice.num_heads < shape.num_heads:
            prune_attention_heads(view, importance[i].kept_heads(space, shape, choice))
        if choice.intermediate_size == 0:
            remove_sublayer(view, "mlp")
        elif choice.intermediate_size < shape.intermediate_size:
            prune_mlp_neurons(view, importance[i].neurons[: choice.intermediate_size])
    if removed:
        remove_blocks(model, removed)
    return reports


def _config(model) -> dict | None:
    """The new widths in the config when every block has one shape (a standard folder); else ``None`` (the
    saved folder gets a shape manifest)."""
    if has_removed_sublayers(model):
        return None
    try:
        return update_config_uniform(model)
    except SurgeryError:
        return None

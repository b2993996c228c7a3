"""The study: which way of shrinking a model costs least quality for the size and speed it gains.

For every method and ratio: prune the model (optionally recover it), then measure perplexity, zero-shot
accuracy (when tasks are given) and speed, with the dense model measured in the same run. Each finished
point is a JSON file under ``<out>/points/``, keyed by everything that produced it, so an interrupted or
extended study only runs what is missing. The study writes ``results.json`` (every point and its
provenance), ``report.md`` (the headline table) and ``study.png`` (perplexity against parameters, prefill
latency and decode speed, and zero-shot accuracy against parameters; Pareto fronts marked).

What a ratio means per method: the fraction of non-embedding parameters removed for ``width``,
``width-mlp`` and ``depth``; the sparsity for ``wanda``, ``sparsegpt`` and ``magnitude`` (their dense
kernels gain no speed, and their size counts non-zero weights); the fraction of the hidden size sliced
for ``slicegpt`` (whose shortcuts and untied head take back part of the savings: its points sit where
their measured parameters put them). Width and depth are thereby matched in parameters, as the research
question asks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from prunekit.errors import PrunekitError

log = logging.getLogger(__name__)


def _method_configs() -> dict[str, Callable[[float], object]]:
    from prunekit.methods import DepthConfig, MagnitudeConfig, SliceGPTConfig, SparseGPTConfig, WandaConfig, WidthConfig

    return {  # the best configuration of each kind measured in BENCHMARKS.md that prunes in minutes on a CPU
        "width": lambda r: WidthConfig(r, importance="wanda-sp", gqa="query-even", allocation="global"),
        "width-mlp": lambda r: WidthConfig(r, importance="fluctuation", prune_heads=False),
        "depth": lambda r: DepthConfig(criterion="block-influence", target_params=r),
        "slicegpt": lambda r: SliceGPTConfig(slice=r),
        "wanda": lambda r: WandaConfig(sparsity=r),
        "sparsegpt": lambda r: SparseGPTConfig(sparsity=r),
        "magnitude": lambda r: MagnitudeConfig(sparsity=r),
    }


METHODS = ("width", "width-mlp", "depth", "slicegpt", "wanda", "sparsegpt", "magnitude")
SPARSE = ("wanda", "sparsegpt", "magnitude")


@dataclass
class StudyConfig:
    model: str = "smollm2-135m"
    methods: tuple[str, ...] = ("width", "depth", "slicegpt", "wanda")
    ratios: tuple[float, ...] = (0.1, 0.2, 0.3)
    recover: str | None = None  # a recovery mode (lora, cpt, ...) run after pruning, besides the unrecovered point
    recover_steps: int = 50
    recover_lr: float | None = None  # None: prunekit's defaults (LoRA 1e-4, full training 2e-5)
    calib: str = "c4"
    nsamples: int | None = None  # default: each method's own
    calib_seqlen: int | None = None
    seed: int = 0
    eval_data: str = "wikitext2"
    eval_seqlen: int = 512
    max_windows: int | None = 64
    tasks: tuple[str, ...] = ()
    task_limit: int | None = None
    train_data: str = "c4"
    train_seqlen: int = 256
    prompt_tokens: int = 512
    new_tokens: int = 32
    repeats: int = 3

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise PrunekitError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
        if not self.ratios or any(not 0 < r < 1 for r in self.ratios):
            raise PrunekitError(f"--ratios must be fractions in (0, 1), got {list(self.ratios)}")

    def points(self) -> list[tuple[str, float, str | None]]:
        recover = [None, self.recover] if self.recover else [None]
        return [(m, r, rec) for m in self.methods for r in self.ratios for rec in recover]


@dataclass
class StudyResult:
    provenance: dict
    dense: dict
    points: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


# -- running -------------------------------------------------------------------------------------------


def run_study(config: StudyConfig, out: str | Path, progress: Callable[[str], None] = log.info) -> StudyResult:
    """Run every missing point of ``config``, then write the results, the report and the plots to ``out``."""
    from prunekit.data import load_text
    from prunekit.loading import load

    start = time.perf_counter()
    out = Path(out)
    (out / "points").mkdir(parents=True, exist_ok=True)
    text = load_text(config.eval_data)
    dense, tokenizer = load(config.model)
    provenance = _provenance(config, text)
    progress(f"dense {config.model}: measuring")
    dense_path, dense_key = out / "points" / "dense.json", _key(provenance, "dense")
    dense_row = _cached(dense_path, dense_key, lambda: _measure(dense, tokenizer, text, config))
    result = StudyResult(provenance, dense_row)
    for method, ratio, recover in config.points():
        name = f"{method}-{ratio:g}" + (f"+{recover}" if recover else "")
        path = out / "points" / f"{name}.json"

        def compute(m=method, r=ratio, rec=recover):
            return _point(config, m, r, rec, text)

        result.points.append(_cached(path, _key(provenance, name), compute))
        progress(f"{name}: {_summary(result.points[-1], dense_row)}")
    _speed_baseline(result, dense, config)
    result.seconds = time.perf_counter() - start
    write_outputs(result, out)
    return result


def _point(config: StudyConfig, method: str, ratio: float, recover: str | None, text) -> dict:
    from prunekit.data import calibration
    from prunekit.loading import load
    from prunekit.methods import prune
    from prunekit.sequential import EngineConfig

    model, tokenizer = load(config.model)
    method_config = _method_configs()[method](ratio)
    samples, seqlen = getattr(type(method_config), "calibration_defaults", (64, 512))
    samples, seqlen = config.nsamples or samples, config.calib_seqlen or seqlen
    calib = None
    if method_config.needs_calibration:
        calib = calibration(tokenizer, config.calib, samples, seqlen, config.seed)
    started = time.perf_counter()
    engine = EngineConfig(progress=False, batch_size=min(8, samples))
    prune(model, method_config, calib, engine)
    row = {
        "method": method,
        "ratio": ratio,
        "recover": recover,
        "method_config": asdict(method_config),
        "calibration": calib.describe() if calib else None,
        "prune_seconds": time.perf_counter() - started,
    }
    if recover:
        row["recovery"] = _recover(model, tokenizer, config, recover, method in SPARSE)
    return {**row, **_measure(model, tokenizer, text, config)}


def _recover(model, tokenizer, config: StudyConfig, mode: str, sparse: bool) -> dict:
    from prunekit.recover import RecoverConfig, load_train_data, recover

    data = load_train_data(tokenizer, config.train_data, config.train_seqlen)
    steps, seed = config.recover_steps, config.seed
    settings = RecoverConfig(
        mode=mode, steps=steps, batch_size=8, lr=config.recover_lr, keep_sparsity=sparse, seed=seed
    )
    teacher = None
    if mode == "distill":
        from prunekit.loading import load

        teacher = load(config.model)[0]
    _, report = recover(model, data, settings, teacher=teacher, progress=False)
    return {
        "mode": mode,
        "steps": settings.steps,
        "lr": report.phases[-1]["lr"],
        "data": data.describe(),
        "loss_first": report.losses[0],
        "loss_last": report.losses[-1],
    }


def _measure(model, tokenizer, text, config: StudyConfig) -> dict:
    from prunekit.evaluate import measure_speed, perplexity
    from prunekit.models import parameter_counts

    row = {
        "params": parameter_counts(model),
        "nonzero_non_embedding": _nonzero_non_embedding(model),
        "ppl": perplexity(model, tokenizer, text, config.eval_seqlen, config.max_windows, progress=False).ppl,
        "speed": measure_speed(model, config.prompt_tokens, config.new_tokens, repeats=config.repeats).to_dict(),
    }
    if config.tasks:
        from prunekit.evaluate.zeroshot import evaluate_zeroshot

        row["zeroshot"] = evaluate_zeroshot(model, tokenizer, list(config.tasks), limit=config.task_limit).to_dict()
    return row


def _speed_baseline(result: StudyResult, dense, config: StudyConfig) -> None:
    """Measure the dense model's speed again now: every point's speed is reported against both
    measurements' mean, so a clock that drifted over the study shows as their difference."""
    from prunekit.evaluate import measure_speed

    again = measure_speed(dense, config.prompt_tokens, config.new_tokens, repeats=config.repeats).to_dict()
    result.dense["speed_after"] = again


def _nonzero_non_embedding(model) -> int:
    from prunekit.models import get_adapter, parameter_counts

    adapter = get_adapter(model)
    outside = {id(m.weight) for m in [*adapter.embeddings(), adapter.lm_head()]}
    zeros = sum(int((p == 0).sum()) for p in model.parameters() if id(p) not in outside)
    return parameter_counts(model)["non_embedding"] - zeros


def _cached(path: Path, key: str, compute: Callable[[], dict]) -> dict:
    """The point at ``path`` when it was made with the same ``key``; else computed and saved atomically."""
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            if saved.get("key") == key:
                return saved["row"]
        except (ValueError, KeyError):
            pass  # a damaged point is measured again
    row = compute()
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps({"key": key, "row": row}, indent=2, default=str))
    partial.replace(path)
    return row


def _key(provenance: dict, name: str) -> str:
    return hashlib.sha256(json.dumps({"name": name, **provenance}, sort_keys=True, default=str).encode()).hexdigest()


def _provenance(config: StudyConfig, text) -> dict:
    """What produced every number: perplexities in this field do not compare without it."""
    import transformers

    from prunekit import __version__
    from prunekit.io import folder_sha256
    from prunekit.loading import resolve_folder

    folder = resolve_folder(config.model)
    settings = {k: v for k, v in asdict(config).items() if k not in ("methods", "ratios", "recover")}
    try:
        import lm_eval

        lm_eval_version = lm_eval.__version__
    except (ImportError, AttributeError):
        lm_eval_version = None
    return {
        "model": config.model,
        "model_sha256": folder_sha256(folder) if folder else None,
        "eval_data": {"name": text.name, "sha256": text.sha256},
        "settings": settings,
        "versions": {
            "prunekit": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "lm_eval": lm_eval_version,
        },
    }


def _summary(point: dict, dense: dict) -> str:
    speed, base = point["speed"], dense["speed"]
    return (
        f"non-zero params {point['nonzero_non_embedding'] / dense['params']['non_embedding']:.0%} of dense, "
        f"ppl {point['ppl']:.2f} (dense {dense['ppl']:.2f}), prefill {base['prefill_ms'] / speed['prefill_ms']:.2f}x, "
        f"decode {speed['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x"
    )


# -- writing ---------------------------------------------------------------------------------------------


def table_rows(result: StudyResult) -> list[dict]:
    """One row per point with the derived figures the report and the plots use."""
    dense = result.dense
    base_prefill = (dense["speed"]["prefill_ms"] + dense["speed_after"]["prefill_ms"]) / 2
    base_decode = (dense["speed"]["decode_tokens_per_s"] + dense["speed_after"]["decode_tokens_per_s"]) / 2
    rows = []
    for point in [{"method": "dense", "ratio": 0.0, "recover": None, **dense}, *result.points]:
        size = point["nonzero_non_embedding"] if point["method"] in SPARSE else point["params"]["non_embedding"]
        zeroshot = point.get("zeroshot", {}).get("mean_acc")
        rows.append(
            {
                "point": point["method"]
                + (f" {point['ratio']:.0%}" if point["ratio"] else "")
                + (f" +{point['recover']}" if point.get("recover") else ""),
                "method": point["method"],
                "ratio": point["ratio"],
                "recovered": bool(point.get("recover")),
                "non_embedding_params": size,
                "params_share": size / dense["params"]["non_embedding"],
                "ppl": point["ppl"],
                "prefill_ms": point["speed"]["prefill_ms"],
                "prefill_speedup": base_prefill / point["speed"]["prefill_ms"],
                "decode_tokens_per_s": point["speed"]["decode_tokens_per_s"],
                "decode_speedup": point["speed"]["decode_tokens_per_s"] / base_decode,
                "zeroshot_avg": zeroshot,
            }
        )
    return rows


def write_outputs(result: StudyResult, out: Path) -> None:
    from prunekit.plots import study_png

    rows = table_rows(result)
    (out / "results.json").write_text(json.dumps({**result.to_dict(), "table": rows}, indent=2, default=str))
    (out / "report.md").write_text(markdown_report(result, rows))
    title = f"{result.provenance['model']}: width vs depth vs others"
    (out / "study.png").write_bytes(study_png(rows, title=title, chance=zeroshot_chance(result)))


def markdown_report(result: StudyResult, rows: list[dict]) -> str:
    settings = result.provenance["settings"]
    windows = settings["max_windows"] or "all"
    lines = [
        f"# Study: {result.provenance['model']}",
        "",
        f"Perplexity: {result.provenance['eval_data']['name']}, seqlen {settings['eval_seqlen']}, {windows} windows. "
        f"Speed: 1 x {settings['prompt_tokens']} prefill and {settings['new_tokens']} greedy tokens, median of "
        f"{settings['repeats']}, ratios to the dense model measured in the same run (before and after the points). "
        "Sparse methods count non-zero weights and run dense kernels.",
        "",
        "| point | non-emb params | ppl | prefill speed-up | decode speed-up | zero-shot avg |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        zeroshot = f"{row['zeroshot_avg']:.3f}" if row["zeroshot_avg"] is not None else "—"
        lines.append(
            f"| {row['point']} | {row['non_embedding_params'] / 1e6:.1f}M ({row['params_share']:.0%}) | "
            f"{row['ppl']:.2f} | {row['prefill_speedup']:.2f}x | {row['decode_speedup']:.2f}x | {zeroshot} |"
        )
    lines += ["", "![study](study.png)", ""]
    lines += _recovery_lines(result) + _zeroshot_lines(result, rows)
    lines.append(f"Provenance: `results.json`. Wall time {result.seconds:.0f} s.")
    return "\n".join(lines) + "\n"


def _recovery_lines(result: StudyResult) -> list[str]:
    recovered = [p["recovery"] for p in result.points if p.get("recovery")]
    if not recovered:
        return []
    first, settings = recovered[0], result.provenance["settings"]
    seqlen = first["data"]["seqlen"]
    return [
        f"Recovery: {first['mode']}, {first['steps']} steps of 8 x {seqlen} tokens "
        f"({first['steps'] * 8 * seqlen:,} tokens) of {settings['train_data']}, peak learning rate {first['lr']:g}; "
        "the same batches for every point.",
        "",
    ]


def _zeroshot_lines(result: StudyResult, rows: list[dict]) -> list[str]:
    """Accuracy per task for every point, with the chance level each task would score by guessing."""
    dense = result.dense.get("zeroshot")
    if not dense:
        return []
    tasks = list(dense["tasks"])
    items = ", ".join(f"{t} {dense['tasks'][t]['items']}" for t in tasks)
    lines = [
        f"Zero-shot accuracy (acc as lm-eval defines it; items per task: {items}; standard error about "
        f"{_typical_stderr(dense):.3f}):",
        "",
        "| point | " + " | ".join(tasks) + " | mean |",
        "|---|" + "---|" * (len(tasks) + 1),
    ]
    for row, point in zip(rows, [result.dense, *result.points], strict=True):  # rows: dense first, then the points
        scores = point["zeroshot"]["tasks"]
        cells = " | ".join(f"{scores[t]['acc']:.3f}" for t in tasks)
        lines.append(f"| {row['point']} | {cells} | {point['zeroshot']['mean_acc']:.3f} |")
    chance = " | ".join(f"{dense['tasks'][t]['chance'] or 0.0:.3f}" for t in tasks)
    lines.append(f"| chance | {chance} | {zeroshot_chance(result):.3f} |")
    return lines + [""]


def _typical_stderr(zeroshot: dict) -> float:
    errors = [t["acc_stderr"] for t in zeroshot["tasks"].values() if t["acc_stderr"] is not None]
    return sum(errors) / len(errors) if errors else float("nan")


def zeroshot_chance(result: StudyResult) -> float | None:
    """The mean accuracy of guessing over the study's tasks (0 for LAMBADA, which has no choices)."""
    dense = result.dense.get("zeroshot")
    if not dense:
        return None
    chance = [t["chance"] or 0.0 for t in dense["tasks"].values()]
    return sum(chance) / len(chance)

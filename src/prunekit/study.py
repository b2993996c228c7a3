"""The study: which way of shrinking a model costs least quality for the size and speed it gains.

For every method and ratio: prune the model (optionally recover it), then measure perplexity and zero-shot
accuracy (when tasks are given), and save the pruned model. Each finished point is a JSON file and a model
folder under ``<out>/points/``, keyed by everything that produced it, so an interrupted or extended study
only prunes what is missing. Speed is never taken from cache: at the end of every run each point's saved
model is timed interleaved with the dense model in this process (``compare_speed``), and its speed-ups
are the medians of per-round ratios with their quartiles; a ratio too spread to read is flagged. The
study writes ``results.json`` (every point and its provenance), ``report.md`` (the headline table) and
``study.png`` (perplexity against parameters, prefill and decode speed-up, and zero-shot accuracy against
parameters when tasks were given; Pareto fronts marked).

What a ratio means per method: the fraction of non-embedding parameters removed for ``width``,
``width-mlp``, ``depth`` and ``hidden``; the sparsity for ``wanda``, ``sparsegpt`` and ``magnitude`` (their dense
kernels gain no speed, and their size counts non-zero weights); the fraction of the hidden size sliced
for ``slicegpt`` (whose shortcuts and untied head take back part of the savings: its points sit where
their measured parameters put them). Width and depth are thereby matched in parameters, as the research
question asks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from prunekit.data import load_text
from prunekit.errors import PrunekitError
from prunekit.evaluate import compare_speed, perplexity
from prunekit.evaluate.zeroshot import evaluate_zeroshot
from prunekit.io.files import folder_sha256
from prunekit.io.load import load, resolve_folder
from prunekit.io.save import save_pruned
from prunekit.jobs import calibration_for, prune_job
from prunekit.methods import CONFIGS, study_variants
from prunekit.models import get_adapter, parameter_counts
from prunekit.plots import study_png
from prunekit.recover import RecoverConfig, load_train_data, recover
from prunekit.sequential import EngineConfig
from prunekit.study_size import check_quant_variants, megabytes, quantized_point, size_lines, size_rows

log = logging.getLogger(__name__)


@dataclass
class StudyConfig:
    model: str = "smollm2-135m"
    """Model folder, hub id, or alias."""
    methods: tuple[str, ...] = ("width", "depth", "slicegpt", "wanda")
    """Comma-separated study variants of the registered methods (see the report for what each ratio means)."""
    ratios: tuple[float, ...] = (0.1, 0.2, 0.3)
    """Comma-separated fractions to prune."""
    recover: str | None = None
    """Also recover every point: lora, cpt, cpt+lora or distill (the unrecovered point stays too)."""
    recover_steps: int = 50
    """Recovery steps (batch 8 x --train-seqlen)."""
    recover_lr: float | None = None
    """Peak recovery learning rate (default: LoRA 1e-4, full 2e-5)."""
    calib: str = "c4"
    """Calibration text."""
    nsamples: int | None = None
    """Calibration samples (default: each method's own)."""
    calib_seqlen: int | None = field(default=None, metadata={"flag": "--seqlen"})
    """Calibration sample length (default: each method's own)."""
    seed: int = 0
    """Calibration and training seed."""
    eval_data: str = field(default="wikitext2", metadata={"flag": "--eval"})
    """Perplexity text."""
    eval_seqlen: int = 512
    """Perplexity window length."""
    max_windows: int | None = 64
    """Perplexity windows (0: the whole text)."""
    tasks: tuple[str, ...] = ()
    """Zero-shot tasks, comma-separated (local data; none by default)."""
    task_limit: int | None = None
    """First N items of each zero-shot task."""
    train_data: str = "c4"
    """Recovery training text."""
    train_seqlen: int = 256
    """Recovery window length."""
    prompt_tokens: int = 512
    """Speed: prompt length."""
    new_tokens: int = 32
    """Speed: greedy tokens generated, each timed."""
    repeats: int = 5
    """Speed: interleaved rounds of each point against dense, after one warm-up (median ratio and quartiles)."""
    max_repeats: int = 15
    """Speed: more rounds, up to this many, while a ratio's spread is too wide to read (a busy machine)."""
    threads: int | None = None
    """Speed: intra-op CPU threads while timing (default: torch's); recorded either way."""
    quant: tuple[str, ...] = ()
    """Also quantize dense and every point with GPTQ: w8 (8-bit, a scale per row) and/or w4 (4-bit, groups of 32), comma-separated; adds a perplexity-against-size panel."""
    progress: bool = field(default=True, metadata={"cli": False})  # progress bars for pruning and perplexity

    def __post_init__(self):
        variants = study_variants()
        unknown = [m for m in self.methods if m not in variants]
        if unknown or not self.methods:
            raise PrunekitError(f"--methods: unknown {unknown}; choose from {', '.join(variants)}")
        if self.max_windows == 0:
            self.max_windows = None  # the whole text
        if not self.ratios or any(not 0 < r < 1 for r in self.ratios):
            raise PrunekitError(f"--ratios must be fractions in (0, 1), got {list(self.ratios)}")
        if self.repeats < 3:
            raise PrunekitError(f"--repeats must be at least 3 (a spread needs rounds to compare), got {self.repeats}")
        check_quant_variants(self.quant)
        if self.threads is not None and self.threads < 1:
            raise PrunekitError(f"--threads must be at least 1, got {self.threads}")

    def points(self) -> list[tuple[str, float, str | None]]:
        recover = [None, self.recover] if self.recover else [None]
        return [(m, r, rec) for m in self.methods for r in self.ratios for rec in recover]


def demo_config(eval_data: str = "kjv", max_windows: int = 16) -> StudyConfig:
    """``prunekit demo``: width, depth, SliceGPT and Wanda at 20% on the embedded model, calibrated on packaged text."""
    return StudyConfig(
        model="smollm2-135m",
        methods=("width", "depth", "slicegpt", "wanda"),
        ratios=(0.2,),
        calib="pydoc",  # Python's own documentation: always present, and not the evaluation text
        nsamples=16,
        eval_data=eval_data,
        max_windows=max_windows,
        prompt_tokens=256,
        new_tokens=16,
        repeats=5,
        threads=1,  # two threads on two cores stall whenever anything else runs; one thread reads truer ratios
    )


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
    """Run every missing point of ``config``, time every point against dense, then write the results,
    the report and the plots to ``out``."""
    from prunekit.distributed import require_single

    require_single("prunekit study")  # every point is pruned, measured and saved by one process
    start = time.perf_counter()
    out = Path(out)
    (out / "points").mkdir(parents=True, exist_ok=True)
    text = load_text(config.eval_data)
    dense, tokenizer = load(config.model)
    provenance = _provenance(config, text)
    progress(f"dense {config.model}: perplexity{' and zero-shot' if config.tasks else ''}")
    dense_path, dense_key = out / "points" / "dense.json", _key(provenance, "dense")
    dense_row = _cached(dense_path, dense_key, lambda: _measure(dense, tokenizer, text, config))
    result = StudyResult(provenance, dense_row)
    names = []
    for method, ratio, recovery in config.points():
        name = f"{method}-{ratio:g}" + (f"+{recovery}" if recovery else "")
        path = out / "points" / f"{name}.json"

        def compute(m=method, r=ratio, rec=recovery, folder=path.with_suffix("")):
            progress(f"{m} {r:g}{' + ' + rec if rec else ''}: pruning" + (" and recovering" if rec else ""))
            return _point(config, m, r, rec, text, folder)

        result.points.append(_cached(path, _key(provenance, name), compute, model_folder=path.with_suffix("")))
        names.append(name)
        progress(f"{name}: {_quality_summary(result.points[-1], dense_row)}")
    for name, point in [("dense", dense_row), *zip(names, result.points, strict=True)]:
        point["quantized"] = [_quantized(config, out / "points", provenance, name, q, text, progress) for q in config.quant]
    _time_points(result, names, dense, out / "points", config, progress)
    result.seconds = time.perf_counter() - start
    write_outputs(result, out)
    return result


def _point(config: StudyConfig, method: str, ratio: float, recover: str | None, text, folder: Path) -> dict:
    model, tokenizer = load(config.model)
    method_config = study_variants()[method](ratio)
    source = config.calib if method_config.needs_calibration else None
    calib = calibration_for(method_config, tokenizer, source, config.nsamples, config.calib_seqlen, config.seed)
    engine = EngineConfig(progress=config.progress, batch_size=min(8, len(calib.tokens)) if calib else 1)
    report = prune_job(model, tokenizer, config.model, method_config, calib, engine)
    row = {
        "method": method,
        "ratio": ratio,
        "recover": recover,
        "method_config": report["method_config"],
        "calibration": report["calibration"],
        "prune_seconds": report["metrics"]["prune_seconds"],
        "sparse_weights": method_config.sparse_weights,
    }
    if recover:
        row["recovery"] = _recover(model, tokenizer, config, recover, method_config.sparse_weights)
    row = {**row, **_measure(model, tokenizer, text, config)}
    manifest = {
        **report,
        "metrics": {**report["metrics"], "study_point": {k: row[k] for k in ("ratio", "recover", "ppl")}},
    }
    manifest.pop("out")
    save_pruned(model, tokenizer, folder, manifest, overwrite=True)  # kept: every run times it against dense
    return row


def _quantized(config: StudyConfig, folder: Path, provenance: dict, name: str, variant: str, text, progress) -> dict:
    """Point ``name``'s model quantized as ``variant`` says, measured (cached like the points)."""

    def compute():
        model, tokenizer = load(config.model if name == "dense" else folder / name)
        return quantized_point(model, tokenizer, name, variant, text, config, progress)

    return _cached(folder / f"{name}+{variant}.json", _key(provenance, f"{name}+{variant}"), compute)


def _recover(model, tokenizer, config: StudyConfig, mode: str, sparse: bool) -> dict:

    data = load_train_data(tokenizer, config.train_data, config.train_seqlen)
    steps, seed = config.recover_steps, config.seed
    settings = RecoverConfig(
        mode=mode, steps=steps, batch_size=8, lr=config.recover_lr, keep_sparsity=sparse, seed=seed
    )
    teacher = None
    if mode == "distill":
        teacher = load(config.model)[0]
    _, report = recover(model, data, settings, teacher=teacher, progress=config.progress)
    return {
        "mode": mode,
        "steps": settings.steps,
        "lr": report.phases[-1]["lr"],
        "data": data.describe(),
        "loss_first": report.losses[0],
        "loss_last": report.losses[-1],
    }


def _measure(model, tokenizer, text, config: StudyConfig) -> dict:
    """The quality figures of one model (cached with its point); speed is timed apart, against dense."""

    ppl = perplexity(model, tokenizer, text, config.eval_seqlen, config.max_windows, progress=config.progress)
    row = {
        "params": parameter_counts(model),
        "nonzero_non_embedding": _nonzero_non_embedding(model),
        "ppl": ppl.ppl,
        "megabytes": megabytes(model),
    }
    if config.tasks:
        row["zeroshot"] = evaluate_zeroshot(model, tokenizer, list(config.tasks), limit=config.task_limit).to_dict()
    return row


def _time_points(result: StudyResult, names: list[str], dense, folder: Path, config: StudyConfig, progress) -> None:
    """Time every point's saved model interleaved with the dense model (never from cache: speed ratios
    only mean something when both models ran under the same load). The dense row's absolute figures
    are the medians of its timings over all comparisons."""

    dense_prefill, dense_decode = [], []
    for name, point in zip(names, result.points, strict=True):
        model, _ = load(folder / name)
        comparison = compare_speed(
            {"dense": dense, name: model}, config.prompt_tokens, config.new_tokens, rounds=config.repeats,
            threads=config.threads, max_rounds=config.max_repeats,
        )  # fmt: skip
        del model
        timed = comparison.models[name]
        point["speed"] = {
            **timed.to_dict(),
            "prefill_speedup": asdict(comparison.prefill_speedup[name]),
            "decode_speedup": asdict(comparison.decode_speedup[name]),
            "dense": comparison.models["dense"].to_dict(),
            "settings": comparison.settings,
        }
        dense_prefill.append(comparison.models["dense"].prefill_ms)
        dense_decode.append(comparison.models["dense"].decode_tokens_per_s)
        progress(
            f"{name}: prefill {comparison.prefill_speedup[name]}, decode {comparison.decode_speedup[name]} "
            f"(interleaved with dense, {timed.threads} threads)"
        )
    one = {"median": 1.0, "q1": 1.0, "q3": 1.0, "rounds": config.repeats, "readable": True}
    result.dense["speed"] = {
        "prefill_ms": statistics.median(dense_prefill),
        "decode_tokens_per_s": statistics.median(dense_decode),
        "prefill_speedup": one,
        "decode_speedup": one,
    }


def _rounds(settings: dict) -> str:
    """The rounds a study timed: its minimum, and the maximum it may go to while a spread is too wide."""
    most = settings.get("max_repeats") or settings["repeats"]
    return f"{settings['repeats']}" if most <= settings["repeats"] else f"{settings['repeats']} to {most}"


def _nonzero_non_embedding(model) -> int:

    adapter = get_adapter(model)
    outside = {id(m.weight) for m in [*adapter.embeddings(), adapter.lm_head()]}
    zeros = sum(int((p == 0).sum()) for p in model.parameters() if id(p) not in outside)
    return parameter_counts(model)["non_embedding"] - zeros


def _cached(path: Path, key: str, compute: Callable[[], dict], model_folder: Path | None = None) -> dict:
    """The point at ``path`` when it was made with the same ``key`` (and its saved model is there);
    else computed and saved atomically."""
    if path.is_file() and (model_folder is None or (model_folder / "config.json").is_file()):
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

    folder = resolve_folder(config.model)
    settings = {k: v for k, v in asdict(config).items() if k not in ("methods", "ratios", "recover", "quant")}
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


def _quality_summary(point: dict, dense: dict) -> str:
    return (
        f"non-zero params {point['nonzero_non_embedding'] / dense['params']['non_embedding']:.0%} of dense, "
        f"ppl {point['ppl']:.2f} (dense {dense['ppl']:.2f})"
    )


# -- writing ---------------------------------------------------------------------------------------------


def _sparse(point: dict) -> bool:
    """Does the point keep zeros in dense shapes (its size is then its non-zero count)? Older results lack the key."""
    method = CONFIGS.get(point["method"])
    return bool(point.get("sparse_weights", method is not None and method.sparse_weights))


def table_rows(result: StudyResult) -> list[dict]:
    """One row per point with the derived figures the report and the plots use."""
    dense = result.dense
    rows = []
    for point in [{"method": "dense", "ratio": 0.0, "recover": None, **dense}, *result.points]:
        size = point["nonzero_non_embedding"] if _sparse(point) else point["params"]["non_embedding"]
        zeroshot = point.get("zeroshot", {}).get("mean_acc")
        speed = point["speed"]
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
                "prefill_ms": speed["prefill_ms"],
                "decode_tokens_per_s": speed["decode_tokens_per_s"],
                **_speedup_fields("prefill_speedup", speed["prefill_speedup"]),
                **_speedup_fields("decode_speedup", speed["decode_speedup"]),
                "zeroshot_avg": zeroshot,
                "megabytes": point.get("megabytes"),
                "quantized": point.get("quantized") or [],
            }
        )
    return rows


def _speedup_fields(key: str, ratio: dict) -> dict:
    """The median ratio under ``key``, its quartiles and whether it can be read (for the table and the plot)."""
    quartiles = {f"{key}_q1": ratio["q1"], f"{key}_q3": ratio["q3"], f"{key}_readable": ratio["readable"]}
    return {key: ratio["median"], **quartiles}


def write_outputs(result: StudyResult, out: Path) -> None:

    rows = table_rows(result)
    (out / "results.json").write_text(json.dumps({**result.to_dict(), "table": rows}, indent=2, default=str))
    (out / "report.md").write_text(markdown_report(result, rows))
    title = f"{result.provenance['model']}: width vs depth vs others"
    png = study_png(rows, title=title, chance=zeroshot_chance(result), sizes=size_rows(rows))
    (out / "study.png").write_bytes(png)


def _speedup_cell(row: dict, key: str) -> str:
    cell = f"{row[key]:.2f}x [{row[key + '_q1']:.2f}–{row[key + '_q3']:.2f}]"
    return cell if row[key + "_readable"] else cell + " ⚠"


def markdown_report(result: StudyResult, rows: list[dict]) -> str:
    settings = result.provenance["settings"]
    windows = settings["max_windows"] or "all"
    eval_data = result.provenance["eval_data"]
    timed = next((p["speed"]["settings"] for p in result.points), None)
    threads = f", {timed['threads']} threads" if timed else ""
    zeroshot_column = any(row["zeroshot_avg"] is not None for row in rows)
    lines = [
        f"# Study: {result.provenance['model']}",
        "",
        f"Perplexity: {eval_data['name']} (text sha256 `{eval_data['sha256'][:12]}…`), seqlen "
        f"{settings['eval_seqlen']}, {windows} windows. Speed: 1 x {settings['prompt_tokens']} prefill and "
        f"{settings['new_tokens']} greedy tokens timed one by one after it; each point's saved model timed "
        f"interleaved with the dense model in this run ({_rounds(settings)} rounds after a warm-up{threads}); "
        "speed-up = median of the per-round ratios [interquartile range]; ⚠ marks a spread wider than 10% of the "
        "median (not a result: the machine's load changed too much). Sparse methods count non-zero weights and run "
        "dense kernels.",
        "",
        "| point | non-emb params | ppl | prefill speed-up | decode speed-up |"
        + (" zero-shot avg |" if zeroshot_column else ""),
        "|---|---|---|---|---|" + ("---|" if zeroshot_column else ""),
    ]
    for row in rows:
        zeroshot = f" {row['zeroshot_avg']:.3f} |" if row["zeroshot_avg"] is not None else " — |"
        lines.append(
            f"| {row['point']} | {row['non_embedding_params'] / 1e6:.1f}M ({row['params_share']:.0%}) | "
            f"{row['ppl']:.2f} | {_speedup_cell(row, 'prefill_speedup')} | {_speedup_cell(row, 'decode_speedup')} |"
            + (zeroshot if zeroshot_column else "")
        )
    lines += ["", "![study](study.png)", ""]
    lines += size_lines(size_rows(rows)) + _recovery_lines(result) + _zeroshot_lines(result, rows)
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

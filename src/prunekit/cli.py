"""The ``prunekit`` command: a thin layer over the Python API.

Every command converts its options into the library's typed configs; errors caused by the input
are printed as one line (``prunekit: error: ...``) with exit status 2, never as a traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Optional

import typer

from prunekit.errors import PrunekitError
from prunekit.methods import calibration_defaults
from prunekit.recover.train import LLM_PRUNER_TARGETS
from prunekit.study import METHODS as STUDY_METHODS

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Make Hugging Face causal LMs smaller and faster by pruning.",
)
eval_app = typer.Typer(no_args_is_help=True, help="Evaluate a model.")
app.add_typer(eval_app, name="eval")

log = logging.getLogger("prunekit")


def friendly(fn):
    """Turn input errors into one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PrunekitError as err:
            typer.echo(f"prunekit: error: {err}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("prunekit: interrupted; rerun the same command to resume from its checkpoint", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PrunekitError(f"--device {device} was asked for but no CUDA device is available; use --device cpu")
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise PrunekitError(f"unknown --device {device!r}; use cpu, cuda, cuda:N, mps or auto") from None
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise PrunekitError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA devices (cuda:0...)")
    if parsed.type not in ("cpu", "cuda", "mps") or (parsed.type == "mps" and not torch.backends.mps.is_available()):
        raise PrunekitError(f"--device {device} is not available here; use --device cpu (or cuda, mps where present)")
    return device


def _write_json(path: Optional[Path], payload: dict) -> None:
    if path is not None:
        path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def _check_json(path: Optional[Path]) -> None:
    """Refuse a --json path that cannot be written, before the work whose result it would hold."""
    if path is None:
        return
    if path.is_dir():
        raise PrunekitError(f"--json {path} is a folder; pass a file path such as {path / 'result.json'}")
    if not path.parent.is_dir():
        raise PrunekitError(f"--json {path}: its folder {path.parent} does not exist or is a file; create it first")


def _at_least(value: Optional[int], flag: str, minimum: int = 1) -> None:
    """One line for a count given below its minimum (``None``: not given, the default applies)."""
    if value is not None and value < minimum:
        raise PrunekitError(f"{flag} must be at least {minimum}, got {value}")


@eval_app.command("ppl")
@friendly
def eval_ppl(
    model: str = typer.Option(..., help="Model folder, hub id, or alias (smollm2-135m)."),
    data: str = typer.Option(
        "wikitext2", help="wikitext2, wikitext2-valid, c4, kjv, pydoc, a text file, or hf:DATASET?name=&split=&rows=."
    ),
    seqlen: int = typer.Option(512, help="Window length in tokens."),
    max_windows: Optional[int] = typer.Option(None, help="Evaluate only the first N windows."),
    batch_size: int = typer.Option(4, help="Windows per forward pass."),
    bos: str = typer.Option("stream", help="'stream' (GPTQ convention) or 'window' (BOS before every window)."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:1, ... or auto."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the result to this JSON file."),
    allow_pickle: bool = typer.Option(False, help="Allow pickle (.bin) weights."),
    trust_remote_code: bool = typer.Option(False, help="Run the model repository's own code."),
):
    """Perplexity over non-overlapping windows (loss in float32)."""
    from prunekit.data import load_text
    from prunekit.evaluate import perplexity
    from prunekit.io.load import load

    _check_json(json_out)
    text = load_text(data)
    lm, tokenizer = load(
        model, dtype=dtype, device=_device(device), allow_pickle=allow_pickle, trust_remote_code=trust_remote_code
    )
    result = perplexity(lm, tokenizer, text, seqlen=seqlen, max_windows=max_windows, batch_size=batch_size, bos=bos)
    typer.echo(f"{model}: {result.summary()}")
    _write_json(json_out, {"model": model, **result.to_dict()})


@eval_app.command("zeroshot")
@friendly
def eval_zeroshot(
    model: str = typer.Option(..., help="Model folder, hub id, or alias (smollm2-135m)."),
    tasks: str = typer.Option(
        "piqa,arc_easy,arc_challenge,hellaswag,winogrande,boolq,openbookqa",
        help="Comma-separated: piqa, arc_easy, arc_challenge, hellaswag, winogrande, boolq, openbookqa, lambada.",
    ),
    limit: Optional[int] = typer.Option(None, help="Evaluate only the first N items of each task."),
    batch_size: int = typer.Option(8, help="Requests per forward pass."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:1, ... or auto."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the result to this JSON file."),
    allow_pickle: bool = typer.Option(False, help="Allow pickle (.bin) weights."),
    trust_remote_code: bool = typer.Option(False, help="Run the model repository's own code."),
):
    """Zero-shot accuracy on local copies of the standard sets, scored as lm-evaluation-harness scores them."""
    from prunekit.evaluate.zeroshot import check_tasks, evaluate_zeroshot
    from prunekit.io.load import load

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    check_tasks(names, limit)  # unknown names, then missing files, fail before the model loads
    _check_json(json_out)
    lm, tokenizer = load(
        model, dtype=dtype, device=_device(device), allow_pickle=allow_pickle, trust_remote_code=trust_remote_code
    )
    result = evaluate_zeroshot(lm, tokenizer, names, limit=limit, batch_size=batch_size)

    def cell(value):
        return "-" if value is None else f"{value:.4f}"

    typer.echo(f"{model}: zero-shot ({result.seconds:.0f} s)")
    typer.echo(f"{'task':<14} {'items':>6} {'acc':>7} {'acc_norm':>8} {'chance':>7}")
    for name, r in result.tasks.items():
        extra = f"  perplexity {r.perplexity:.3f}" if r.perplexity is not None else ""
        typer.echo(f"{name:<14} {r.items:>6} {cell(r.acc):>7} {cell(r.acc_norm):>8} {cell(r.chance):>7}{extra}")
    typer.echo(f"{'mean acc':<14} {'':>6} {cell(result.mean_acc):>7}")
    _write_json(json_out, {"model": model, **result.to_dict()})


@app.command()
@friendly
def prune(
    model: str = typer.Option(..., help="Model folder, hub id, or alias (smollm2-135m)."),
    method: str = typer.Option(..., help="Pruning method: magnitude, wanda, sparsegpt, width, depth or slicegpt."),
    out: Path = typer.Option(..., help="Output folder (written atomically)."),
    sparsity: Optional[float] = typer.Option(
        None, help="Fraction of weights to remove from each linear layer (magnitude, wanda, sparsegpt; default 0.5)."
    ),
    target_params: Optional[float] = typer.Option(
        None, help="width, depth: fraction of non-embedding parameters to remove."
    ),
    force: bool = typer.Option(
        False,
        help="width, depth: accept a target that leaves a husk (depth: under a quarter of the blocks; width: "
        "under a tenth of the MLP neurons), refused otherwise.",
    ),
    intermediate_size: Optional[int] = typer.Option(None, help="width: MLP neurons to keep per block."),
    num_heads: Optional[int] = typer.Option(None, help="width: query heads to keep per block."),
    importance: Optional[str] = typer.Option(
        None,
        help="width: activation (default: Minitron's activation norms, the best measured), magnitude-l1, "
        "magnitude-l2, wanda-sp, fluctuation (FLAP), taylor, random.",
    ),
    taylor: Optional[str] = typer.Option(None, help="width taylor: element, vector, second or mix (LLM-Pruner)."),
    aggregation: Optional[str] = typer.Option(None, help="width: join a group's members (sum, mean, max, prod, last)."),
    allocation: Optional[str] = typer.Option(
        None,
        help="width: 'uniform' (default: every block the same shape, a plain folder stock transformers loads) or "
        "'global' (FLAP's ranking across blocks: the best measured quality, per-block shapes that prunekit.load "
        "rebuilds).",
    ),
    layers: Optional[str] = typer.Option(None, help="width: blocks to prune as start:end, e.g. 4:-2 (others kept)."),
    bias_compensation: Optional[bool] = typer.Option(
        None, "--bias-compensation/--no-bias-compensation", help="width: FLAP's bias compensation."
    ),
    recipe: Optional[str] = typer.Option(
        None, help="width: a published setting, 'llm-pruner' or 'flap' (options given explicitly win)."
    ),
    gqa: Optional[str] = typer.Option(
        None, help="width, with --prune-heads: 'query-even' (default) or 'kv-groups' (remove whole KV groups)."
    ),
    round_to: Optional[int] = typer.Option(
        None, help="width: round the MLP width down to a multiple (8); slicegpt: round the hidden size (8)."
    ),
    slice_fraction: Optional[float] = typer.Option(
        None, "--slice", help="slicegpt: fraction of the hidden size (embedding dimension) to delete (0.25)."
    ),
    orientation: Optional[str] = typer.Option(
        None, help="slicegpt: 'pca' (default) or 'random' (a random turn of each kept subspace)."
    ),
    prune_heads: Optional[bool] = typer.Option(
        None, "--prune-heads/--no-prune-heads", help="width: may attention heads go too? (default: MLP neurons only)"
    ),
    criterion: Optional[str] = typer.Option(
        None,
        help="depth: block-influence (default; ShortGPT, the best measured), ppl, taylor (Taylor+), magnitude, "
        "angular (Gromov).",
    ),
    remove: Optional[int] = typer.Option(None, help="depth: blocks (or sub-layers, with --unit) to remove."),
    unit: Optional[str] = typer.Option(
        None, help="depth: block (default), attention, mlp, or sublayer (both kinds, ranked together)."
    ),
    iterative: Optional[bool] = typer.Option(
        None, "--iterative/--one-shot", help="depth: remove the best unit, re-score the rest, repeat (SLEB)."
    ),
    protect_first: Optional[int] = typer.Option(None, help="depth: first blocks never removed (taylor: 4, else 0)."),
    protect_last: Optional[int] = typer.Option(None, help="depth: last blocks never removed (taylor: 2, else 0)."),
    ranking_from: Optional[Path] = typer.Option(
        None, help="depth: the prunekit.json of an earlier depth run; reuse its ranking instead of scoring again."
    ),
    nm: Optional[str] = typer.Option(None, help="N:M sparsity, e.g. 2:4 or 4:8: prune N of every M weights."),
    order: Optional[str] = typer.Option(
        None,
        help="wanda/sparsegpt: 'sequential' (one pass per block) or "
        "'block' (reference order: score the dense block, prune, re-run).",
    ),
    scope: Optional[str] = typer.Option(None, help="magnitude: 'layer' (per matrix) or 'global' (one threshold)."),
    std_quality: Optional[float] = typer.Option(None, help="magnitude: Han et al.'s threshold, q * std(W) per layer."),
    prune_embeddings: Optional[bool] = typer.Option(None, "--prune-embeddings", help="magnitude: also the embeddings."),
    prune_lm_head: Optional[bool] = typer.Option(None, "--prune-lm-head", help="magnitude: also the head."),
    include: Optional[list[str]] = typer.Option(None, help="Only linears matching this pattern (e.g. 'mlp.*')."),
    exclude: Optional[list[str]] = typer.Option(None, help="Skip linears matching this pattern."),
    owl: Optional[bool] = typer.Option(None, "--owl", help="wanda/sparsegpt: per-block sparsity from outliers."),
    owl_lambda: Optional[float] = typer.Option(None, help="OWL: per-block sparsity stays within target +- lambda."),
    blocksize: Optional[int] = typer.Option(None, help="sparsegpt: columns per lazy-update block (128)."),
    percdamp: Optional[float] = typer.Option(None, help="sparsegpt: initial dampening, fraction of mean diag(H)."),
    hessian_dtype: Optional[str] = typer.Option(None, help="sparsegpt: float32 or float64."),
    calib: Optional[str] = typer.Option(
        None, help="Calibration data (c4, wikitext2, kjv, pydoc, a file, hf:DATASET?...)."
    ),
    nsamples: Optional[int] = typer.Option(None, help="Calibration samples (64; depth: 10; a recipe may set its own)."),
    seqlen: Optional[int] = typer.Option(
        None, help="Calibration sample length in tokens (512; depth: 128; or the recipe's)."
    ),
    seed: int = typer.Option(0, help="Calibration sampling seed."),
    eval_data: Optional[str] = typer.Option(None, "--eval", help="Measure perplexity before and after on this data."),
    eval_seqlen: int = typer.Option(512, help="Perplexity window length."),
    max_windows: Optional[int] = typer.Option(None, help="Perplexity on the first N windows only."),
    device: str = typer.Option("auto", help="Compute device: cpu, cuda, ... or auto."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    batch_size: int = typer.Option(1, help="Calibration samples per forward pass."),
    propagate: str = typer.Option("pruned", help="Feed the next block 'pruned' or 'dense' outputs."),
    lazy: bool = typer.Option(False, help="Keep blocks on disk until reached (models larger than memory)."),
    checkpoint_dir: Optional[Path] = typer.Option(
        None, help="Where finished blocks are checkpointed (default: beside --out); a rerun resumes from it."
    ),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
    fmt: str = typer.Option(
        "dense",
        "--format",
        help="'dense': a standard HF folder; 'compact': sparse "
        "matrices as bitmask + values (smaller on disk; prunekit.load or unpack restores it).",
    ),
    allow_pickle: bool = typer.Option(False, help="Allow pickle (.bin) weights."),
    trust_remote_code: bool = typer.Option(False, help="Run the model repository's own code."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the report to this JSON file."),
):
    """Prune a model and save it as a standard Hugging Face folder with a prunekit.json manifest."""
    from prunekit.data import calibration, load_text
    from prunekit.io.files import check_folder_path, check_output
    from prunekit.io.save import check_format
    from prunekit.sequential import EngineConfig

    _at_least(nsamples, "--nsamples")
    _at_least(seqlen, "--seqlen", 2)
    _at_least(max_windows, "--max-windows")
    _at_least(eval_seqlen, "--eval-seqlen", 2)
    _check_json(json_out)
    if target_params is not None and (intermediate_size is not None or num_heads is not None):
        raise PrunekitError("give --target-params or explicit sizes (--intermediate-size, --num-heads), not both")
    options = dict(
        importance=importance,
        taylor=taylor,
        aggregation=aggregation,
        allocation=allocation,
        layers=layers,
        bias_compensation=bias_compensation,
        gqa=gqa,
        prune_heads=prune_heads,
    )
    if recipe is not None:
        options, calib, nsamples, seqlen = apply_recipe(method, recipe, options, calib, nsamples, seqlen)
    default_samples, default_seqlen = calibration_defaults(_config_class(method))
    nsamples, seqlen = nsamples or default_samples, seqlen or default_seqlen
    method_config = method_config_from_options(
        method,
        sparsity=sparsity,
        target_params=target_params,
        intermediate_size=intermediate_size,
        num_heads=num_heads,
        **options,
        round_to=round_to,
        slice=slice_fraction,
        orientation=orientation,
        nm=nm,
        order=order,
        scope=scope,
        std_quality=std_quality,
        include=include,
        exclude=exclude,
        prune_embeddings=prune_embeddings,
        prune_lm_head=prune_lm_head,
        owl=owl,
        owl_lambda=owl_lambda,
        blocksize=blocksize,
        percdamp=percdamp,
        hessian_dtype=hessian_dtype,
        criterion=criterion,
        remove=remove,
        unit=unit,
        iterative=iterative,
        protect_first=protect_first,
        protect_last=protect_last,
        ranking_from=str(ranking_from) if ranking_from is not None else None,
        force=force or None,
    )
    if getattr(method_config, "needs_calibration", False) and calib is None:
        raise PrunekitError(f"--method {method} needs calibration data; pass --calib (e.g. c4 or a text file)")
    check_output(out, overwrite)
    check_format(fmt, lazy)  # before any work, not after the pruning
    if lazy and eval_data:
        raise PrunekitError("--eval needs the whole model in memory; drop --lazy or evaluate the saved model")
    text = load_text(eval_data) if eval_data else None
    checkpoint_dir = checkpoint_dir or out.parent / f".{out.name}.checkpoint"
    check_folder_path(checkpoint_dir, "--checkpoint-dir")
    engine = EngineConfig(
        device=_device(device), batch_size=batch_size, propagate=propagate, checkpoint_dir=checkpoint_dir
    )
    from prunekit.io.load import load

    # A lazy model stays on disk and the CPU; the engine brings each block to the compute device.
    lm, tokenizer = load(
        model,
        dtype=dtype,
        device="cpu" if lazy else engine.device,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        lazy=lazy,
    )
    calib_data = calibration(tokenizer, calib, nsamples, seqlen, seed) if calib else None
    report = run_prune_job(
        lm, tokenizer, model, method_config, calib_data, engine, out, overwrite, text, eval_seqlen, max_windows, fmt
    )
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    typer.echo(format_report(report))
    _write_json(json_out, report)


def apply_recipe(method: str, recipe: str, options: dict, calib, nsamples, seqlen):
    """A recipe's options and calibration, under what the user set explicitly."""
    from prunekit.methods.width import RECIPES

    if method != "width":
        raise PrunekitError(f"--recipe applies to --method width, not {method}")
    if recipe not in RECIPES:
        raise PrunekitError(f"unknown --recipe {recipe!r}; available: {', '.join(RECIPES)}")
    chosen = RECIPES[recipe]
    merged = {**options, **{k: v for k, v in chosen.options.items() if options.get(k) is None}}
    return merged, calib or chosen.calib, nsamples or chosen.nsamples, seqlen or chosen.seqlen


def _config_class(method: str):
    from prunekit.methods import CONFIGS

    if method not in CONFIGS:
        raise PrunekitError(f"unknown --method {method!r}; available: {', '.join(CONFIGS)}")
    return CONFIGS[method]


def method_config_from_options(method: str, **options):
    """The method's config from the options the user set; an option the method does not take is an error."""
    cls = _config_class(method)
    accepted = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in options.items() if v not in (None, [])}
    for name in given.keys() - accepted:
        raise PrunekitError(f"--{name.replace('_', '-')} does not apply to --method {method}")
    return cls(**given)


def run_prune_job(
    lm,
    tokenizer,
    model_name,
    method_config,
    calib_data,
    engine,
    out,
    overwrite,
    text,
    eval_seqlen,
    max_windows,
    fmt="dense",
) -> dict:
    """Evaluate, prune, evaluate, save: the job shared by ``prune`` and ``demo``."""
    from prunekit.evaluate import perplexity
    from prunekit.io.load import resolve_folder
    from prunekit.io.manifest import build_manifest
    from prunekit.io.save import save_pruned
    from prunekit.methods import prune as run_method
    from prunekit.models import parameter_counts

    metrics: dict = {"params_before": parameter_counts(lm)}
    if text is not None:
        metrics["ppl_before"] = perplexity(lm, tokenizer, text, eval_seqlen, max_windows).to_dict()
    result = run_method(lm, method_config, calib_data, engine)
    metrics["params_after"] = parameter_counts(lm)
    layers = result.layer_sparsity()
    if layers:
        metrics["sparsity_mean"] = sum(layers.values()) / len(layers)
        metrics["layer_sparsity"] = layers
    shapes = [b for b in result.engine.blocks if set(b) - {"block", "sparsity"}]
    if shapes:
        metrics["blocks"] = shapes
    if "ranking" in result.outside_blocks:  # depth: reusable with --ranking-from
        metrics["ranking"] = result.outside_blocks["ranking"]
    metrics["prune_seconds"] = result.seconds
    if text is not None:
        metrics["ppl_after"] = perplexity(lm, tokenizer, text, eval_seqlen, max_windows).to_dict()
    manifest = build_manifest(
        source=model_name,
        source_folder=resolve_folder(model_name),
        method=result.method,
        method_config=result.config,
        calibration=result.calibration,
        metrics=metrics,
    )
    save_pruned(lm, tokenizer, out, manifest, overwrite=overwrite, fmt=fmt)
    return {"out": str(out), **manifest}


def format_report(report: dict) -> str:
    m = report["metrics"]
    before, after = m["params_before"], m["params_after"]
    cut = 1 - after["non_embedding"] / before["non_embedding"]
    settings = {k: v for k, v in (report["method_config"] or {}).items() if v not in (None, (), [], {}, False)}
    params = (
        f"{before['total']:,} -> {after['total']:,} (non-embedding {before['non_embedding']:,} -> "
        f"{after['non_embedding']:,}, {cut:.1%} removed)"
        if cut
        else f"{after['total']:,} (shapes unchanged: the pruned weights are stored as zeros)"
    )
    lines = [
        f"method       {report['method']} {settings}",
        f"source       {report['source_model']['name']}",
        f"parameters   {params}",
    ]
    if "sparsity_mean" in m:
        lines.append(
            f"sparsity     {m['sparsity_mean']:.1%} of the weights of {len(m['layer_sparsity'])} linear layers"
        )
    if "ranking" in m:
        removed = ", ".join(f"{b['removed']} {b['block']}" for b in m.get("blocks", []))
        lines.append(f"removed      {removed} (ranking reusable: --ranking-from {report['out']}/prunekit.json)")
    lines.append(f"pruning time {m['prune_seconds']:.1f} s")
    if "ppl_before" in m:
        before, after = m["ppl_before"], m["ppl_after"]
        lines.append(
            f"perplexity   {before['ppl']:.2f} -> {after['ppl']:.2f} ({before['dataset']}, seqlen {before['seqlen']}, "
            f"{before['windows']} windows)"
        )
    lines.append(f"saved        {report['out']} (prunekit.json has the full report)")
    return "\n".join(lines)


@app.command("prune-retrain")
@friendly
def prune_retrain_command(
    model: str = typer.Option(..., help="Model folder, hub id, or alias (smollm2-135m)."),
    out: Path = typer.Option(..., help="Output folder (written atomically)."),
    schedule: str = typer.Option("0.3,0.5,0.6,0.7", help="Rising sparsities, comma-separated."),
    train_data: str = typer.Option("c4", help="Text to retrain on (c4, kjv, pydoc, a file, hf:DATASET?...)."),
    steps: int = typer.Option(50, help="Fine-tuning steps after each pruning stage."),
    lr: float = typer.Option(5e-5, help="AdamW learning rate."),
    batch_size: int = typer.Option(4, help="Windows per step."),
    train_seqlen: int = typer.Option(256, help="Training window length."),
    seed: int = typer.Option(0, help="Sampling seed of the training windows and batches."),
    eval_data: Optional[str] = typer.Option(None, "--eval", help="Measure perplexity after every stage."),
    eval_seqlen: int = typer.Option(512, help="Perplexity window length."),
    max_windows: Optional[int] = typer.Option(None, help="Perplexity on the first N windows only."),
    device: str = typer.Option("auto", help="cpu, cuda, ... or auto."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
):
    """Han et al.'s iterative pruning: magnitude-prune, retrain the survivors (pruned weights held at
    zero), prune further, along the schedule."""
    from prunekit.data import calibration, load_text
    from prunekit.evaluate import perplexity
    from prunekit.io.files import check_output
    from prunekit.io.load import load, resolve_folder
    from prunekit.io.manifest import build_manifest
    from prunekit.io.save import save_pruned
    from prunekit.methods.retrain import PruneRetrainConfig, prune_retrain
    from prunekit.recover import FinetuneConfig

    try:
        sparsities = [float(x) for x in schedule.split(",")]
    except ValueError:
        raise PrunekitError(f"--schedule must be comma-separated numbers like 0.3,0.5,0.7, got {schedule!r}") from None
    config = PruneRetrainConfig(sparsities, FinetuneConfig(steps=steps, lr=lr, batch_size=batch_size, seed=seed))
    _at_least(train_seqlen, "--train-seqlen", 2)
    _at_least(max_windows, "--max-windows")
    _at_least(eval_seqlen, "--eval-seqlen", 2)
    check_output(out, overwrite)
    text = load_text(eval_data) if eval_data else None
    lm, tokenizer = load(model, device=_device(device))
    train = calibration(tokenizer, train_data, max(steps * batch_size, batch_size), train_seqlen, seed)

    def evaluate():
        return perplexity(lm, tokenizer, text, eval_seqlen, max_windows, progress=False).ppl

    stages = prune_retrain(lm, train.tokens, config, evaluate if text else None)
    for stage in stages:
        metric = f", perplexity {stage['metric']:.2f}" if "metric" in stage else ""
        loss = "no retraining (--steps 0)" if stage["final_loss"] is None else f"train loss {stage['final_loss']:.3f}"
        typer.echo(f"stage {stage['stage']}: sparsity {stage['achieved']:.1%}, {loss}{metric}")
    manifest = build_manifest(
        source=model,
        source_folder=resolve_folder(model),
        method="magnitude-prune-retrain",
        method_config=dataclasses.asdict(config),
        calibration=train.describe(),
        metrics={"stages": stages},
    )
    save_pruned(lm, tokenizer, out, manifest, overwrite=overwrite)
    typer.echo(f"saved {out}")


@app.command()
@friendly
def recover(
    model: str = typer.Option(..., help="The pruned model: a prunekit output folder (or any model)."),
    out: Path = typer.Option(..., help="Output folder (written atomically)."),
    mode: str = typer.Option("lora", help="lora, cpt (continued pretraining), cpt+lora, or distill."),
    data: str = typer.Option(
        "c4", help="Training text (c4, wikitext2, kjv, a .txt/.jsonl file, hf:DATASET?...) or Alpaca .json."
    ),
    seqlen: int = typer.Option(512, help="Training sequence length (text is packed into windows of it)."),
    steps: int = typer.Option(100, help="Optimizer steps (all phases)."),
    batch_size: int = typer.Option(8, help="Examples per optimizer step, over all processes."),
    micro_batch: Optional[int] = typer.Option(
        None, help="Examples per forward pass; the rest of a step is gradient accumulation (default 2: bounded memory)."
    ),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (LoRA 1e-4, full training 2e-5)."),
    warmup_steps: Optional[int] = typer.Option(None, help="Linear warm-up steps before the cosine decay (10%)."),
    precision: str = typer.Option("fp32", help="fp32 or bf16 (autocast)."),
    gradient_checkpointing: bool = typer.Option(False, help="Recompute activations in the backward pass."),
    lora_r: int = typer.Option(8, help="LoRA rank (LLM-Pruner: 8)."),
    lora_alpha: int = typer.Option(16, help="LoRA alpha (LLM-Pruner: 16)."),
    lora_dropout: float = typer.Option(0.05, help="LoRA dropout (LLM-Pruner: 0.05)."),
    lora_targets: str = typer.Option(
        ",".join(LLM_PRUNER_TARGETS), help="Module names to adapt, comma-separated, or one regular expression."
    ),
    cpt_steps: Optional[int] = typer.Option(None, help="cpt+lora: CPT steps before the LoRA steps (half)."),
    teacher: Optional[str] = typer.Option(None, help="distill: the dense teacher model."),
    teacher_topk: Optional[int] = typer.Option(
        None, help="distill: precompute the teacher's top-k logits once, stream them from disk."
    ),
    temperature: float = typer.Option(2.0, help="distill: softmax temperature."),
    distill_weight: float = typer.Option(1.0, help="distill: weight of the KL term (the rest: the LM loss)."),
    keep_sparsity: Optional[bool] = typer.Option(
        None,
        "--keep-sparsity/--no-keep-sparsity",
        help="Hold pruned weights at zero (default: yes for magnitude, wanda and sparsegpt outputs).",
    ),
    checkpoint_every: int = typer.Option(50, help="Checkpoint every N steps (0: never); a rerun resumes."),
    checkpoint_dir: Optional[Path] = typer.Option(None, help="Where checkpoints go (default: beside --out)."),
    seed: int = typer.Option(0, help="Data order and initialisation seed."),
    eval_data: Optional[str] = typer.Option(None, "--eval", help="Measure perplexity before and after."),
    eval_seqlen: int = typer.Option(512, help="Perplexity window length."),
    max_windows: Optional[int] = typer.Option(None, help="Perplexity on the first N windows only."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the report to this JSON file."),
):
    """Recover a pruned model's quality by LoRA, continued pretraining or distillation; runs under
    `accelerate launch` (DDP, FSDP) unchanged."""
    from prunekit.io.files import check_folder_path, check_output
    from prunekit.recover import LoraSettings, RecoverConfig
    from prunekit.recover.train import make_accelerator

    targets = tuple(t.strip() for t in lora_targets.split(",") if t.strip())
    config = RecoverConfig(
        mode=mode,
        steps=steps,
        batch_size=batch_size,
        micro_batch=micro_batch,
        lr=lr,
        warmup_steps=warmup_steps,
        precision=precision,
        gradient_checkpointing=gradient_checkpointing,
        lora=LoraSettings(lora_r, lora_alpha, lora_dropout, targets),
        cpt_steps=cpt_steps,
        temperature=temperature,
        distill_weight=distill_weight,
        checkpoint_every=checkpoint_every,
        seed=seed,
    )
    if mode == "distill" and teacher is None:
        raise PrunekitError("--mode distill needs a teacher: pass --teacher DENSE_MODEL")
    if mode != "distill" and (teacher is not None or teacher_topk is not None):
        raise PrunekitError(f"--teacher and --teacher-topk apply to --mode distill, not {mode}")
    _at_least(teacher_topk, "--teacher-topk")
    _at_least(max_windows, "--max-windows")
    _at_least(eval_seqlen, "--eval-seqlen", 2)
    _check_json(json_out)
    state = make_accelerator(config)  # first: every process must know which one it is
    if state.is_main_process:
        check_output(out, overwrite)
    checkpoint_dir = checkpoint_dir or out.parent / f".{out.name}.recover-checkpoint"
    check_folder_path(checkpoint_dir, "--checkpoint-dir")
    report = run_recover_job(
        model, out, config, data, seqlen, keep_sparsity, teacher, teacher_topk, checkpoint_dir, state,
        (eval_data, eval_seqlen, max_windows), overwrite,
    )  # fmt: skip
    if state.is_main_process:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        rec = report["recovery"]
        typer.echo(f"recovered {model} by {mode} in {rec['seconds']:.1f} s: loss {rec['losses'][0]:.3f} -> "
                   f"{rec['losses'][-1]:.3f}" + (f", perplexity {rec['ppl_before']['ppl']:.2f} -> "
                   f"{rec['ppl_after']['ppl']:.2f}" if "ppl_after" in rec else ""))  # fmt: skip
        typer.echo(f"saved {out} (loss curve: {out / 'loss.png'})")
        _write_json(json_out, report)


def run_recover_job(
    model_name, out, config, data_source, seqlen, keep_sparsity, teacher_name, topk, checkpoint_dir, state, evaluation,
    overwrite,
) -> dict:  # fmt: skip
    """Load, train (every process), evaluate and save (the main process); the report as ``prunekit.json`` has it."""
    from prunekit.evaluate import perplexity
    from prunekit.io.load import load, resolve_folder
    from prunekit.io.manifest import build_manifest
    from prunekit.io.save import save_pruned
    from prunekit.plots import loss_curve_png
    from prunekit.recover import TeacherTopK, load_train_data, precompute_teacher_topk
    from prunekit.recover import recover as train

    lm, tokenizer = load(model_name)
    folder = resolve_folder(model_name)
    previous = _read_manifest(folder)
    if keep_sparsity is None:  # unstructured outputs keep their zeros unless told otherwise
        keep_sparsity = previous.get("method") in ("magnitude", "wanda", "sparsegpt", "magnitude-prune-retrain")
    config = dataclasses.replace(config, keep_sparsity=keep_sparsity)
    train_data = load_train_data(tokenizer, data_source, seqlen)
    teacher = load(teacher_name)[0] if teacher_name else None
    store = None
    if teacher is not None and topk:
        path = Path(checkpoint_dir) / f"teacher-top{topk}.safetensors"
        if state.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                precompute_teacher_topk(teacher, train_data, topk, path)
        state.wait_for_everyone()
        store, teacher = TeacherTopK(path, train_data), None
    text_name, eval_seqlen, max_windows = evaluation
    text = None
    if text_name and state.is_main_process:
        from prunekit.data import load_text

        text = load_text(text_name)
    before = perplexity(lm, tokenizer, text, eval_seqlen, max_windows).to_dict() if text else None
    lm, result = train(lm, train_data, config, teacher, store, checkpoint_dir, accelerator=state)
    recovery = {
        "config": dataclasses.asdict(config),
        "data": train_data.describe(),
        "teacher": teacher_name,
        "processes": state.num_processes,
        **{k: v for k, v in dataclasses.asdict(result).items()},
    }
    if not state.is_main_process:
        return {"recovery": recovery}
    if text is not None:
        recovery["ppl_before"] = before
        recovery["ppl_after"] = perplexity(lm, tokenizer, text, eval_seqlen, max_windows).to_dict()
    manifest = previous or build_manifest(
        source=model_name, source_folder=folder, method=None, method_config=None, calibration=None, metrics={}
    )
    manifest = {**manifest, "recovery": recovery}
    title = f"{config.mode} recovery of {Path(str(model_name)).name}"
    png = loss_curve_png(result.losses, result.phases, title)
    save_pruned(lm, tokenizer, out, manifest, overwrite=overwrite, extra_files={"loss.png": png})
    return {"out": str(out), "recovery": recovery}


def _read_manifest(folder: Path | None) -> dict:
    from prunekit.io.files import MANIFEST

    path = folder / MANIFEST if folder is not None else None
    if path is None or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise PrunekitError(f"cannot read {path}; fix or remove it") from None


@app.command()
@friendly
def bench(
    model: list[str] = typer.Option(..., help="Models to compare; give it once per model, the first is the baseline."),
    batch_sizes: str = typer.Option("1", help="Batch sizes, comma-separated."),
    prompt_lengths: str = typer.Option("512", help="Prompt lengths in tokens, comma-separated."),
    new_tokens: int = typer.Option(64, help="Greedy tokens generated per decode measurement (forced)."),
    repeats: int = typer.Option(
        5, help="Interleaved rounds per setting after one warm-up round; medians and quartiles are reported."
    ),
    threads: Optional[int] = typer.Option(None, help="Intra-op CPU threads for the timing (default: torch's)."),
    device: str = typer.Option("auto", help="cpu, cuda, ... or auto."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results to this JSON file."),
):
    """Prefill latency, decode tokens/s, memory, parameters and MACs per token, all models timed
    interleaved in one run; speed-ups over the first as medians of per-round ratios with their quartiles."""
    from prunekit.evaluate.bench import benchmark
    from prunekit.io.load import load

    sizes, lengths = _integers(batch_sizes, "--batch-sizes"), _integers(prompt_lengths, "--prompt-lengths")
    models = {name: load(name, dtype=dtype, device=_device(device))[0] for name in dict.fromkeys(model)}
    if threads is not None and threads < 1:
        raise PrunekitError(f"--threads must be at least 1, got {threads}")
    result = benchmark(models, sizes, lengths, new_tokens, repeats, lambda row: log.info("%s", row), threads)
    typer.echo(format_bench(result))
    _write_json(json_out, {**result.to_dict(), "ratios": result.ratios()})


def _integers(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PrunekitError(f"{flag} must be comma-separated integers like 1,8, got {text!r}") from None


def format_bench(result) -> str:
    from prunekit.evaluate import Ratio

    lines = ["model | params (non-emb) | weights MB | MACs/token (prefill, longest prompt)"]
    for name, facts in result.models.items():
        longest = max(facts.prefill_macs_per_token)
        lines.append(
            f"{name} | {facts.params['total']:,} ({facts.params['non_embedding']:,}) | {facts.weights_mb:.1f} | "
            f"{facts.prefill_macs_per_token[longest] / 1e6:.1f}M"
        )
    threads = result.speed[0]["threads"] if result.speed else "?"
    lines.append(
        f"model | batch x prompt | prefill ms | speed-up [q1-q3] | decode tok/s | speed-up [q1-q3]  ({threads} threads)"
    )
    for row in result.speed:
        lines.append(
            f"{row['model']} | {row['batch_size']} x {row['prompt_tokens']} | {row['prefill_ms']:.1f} | "
            f"{Ratio(**row['prefill'])} | {row['decode_tokens_per_s']:.1f} | {Ratio(**row['decode'])}"
        )
    return "\n".join(lines)


@app.command()
@friendly
def unpack(
    model: str = typer.Option(..., help="A folder saved with --format compact."),
    out: Path = typer.Option(..., help="Where to write the standard (dense) Hugging Face folder."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
):
    """Restore a compact folder to a standard Hugging Face folder that any tool loads."""
    from prunekit.io.compact import COMPACT_FILE
    from prunekit.io.files import MANIFEST, check_output
    from prunekit.io.load import load
    from prunekit.io.save import save_pruned

    if not Path(model).is_dir():
        raise PrunekitError(f"--model {model} is not a folder; pass a folder saved with --format compact")
    if not (Path(model) / COMPACT_FILE).exists():
        raise PrunekitError(f"{model} holds no {COMPACT_FILE}; it is not a compact prunekit folder")
    check_output(out, overwrite)
    lm, tokenizer = load(model)
    manifest_path = Path(model) / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest.pop("storage", None)
    save_pruned(lm, tokenizer, out, manifest, overwrite=overwrite)
    typer.echo(f"unpacked {model} -> {out}")


@app.command()
@friendly
def study(
    model: str = typer.Option("smollm2-135m", help="Model folder, hub id, or alias."),
    out: Path = typer.Option(..., help="Study folder: points/, results.json, report.md, study.png."),
    methods: str = typer.Option("width,depth,slicegpt,wanda", help="Comma-separated: " + ", ".join(STUDY_METHODS)),
    ratios: str = typer.Option("0.1,0.2,0.3", help="Comma-separated fractions (see the report for each meaning)."),
    recover: Optional[str] = typer.Option(None, help="Also recover every point: lora, cpt, cpt+lora or distill."),
    recover_steps: int = typer.Option(50, help="Recovery steps (batch 8 x --train-seqlen)."),
    recover_lr: Optional[float] = typer.Option(
        None, help="Peak recovery learning rate (default: LoRA 1e-4, full 2e-5)."
    ),
    calib: str = typer.Option("c4", help="Calibration text."),
    nsamples: Optional[int] = typer.Option(None, help="Calibration samples (default: each method's own)."),
    seqlen: Optional[int] = typer.Option(None, help="Calibration sample length (default: each method's own)."),
    eval_data: str = typer.Option("wikitext2", "--eval", help="Perplexity text."),
    eval_seqlen: int = typer.Option(512, help="Perplexity window length."),
    max_windows: int = typer.Option(64, help="Perplexity windows (0: the whole text)."),
    tasks: str = typer.Option("", help="Zero-shot tasks, comma-separated (local data; none by default)."),
    task_limit: Optional[int] = typer.Option(None, help="First N items of each zero-shot task."),
    train_data: str = typer.Option("c4", help="Recovery training text."),
    prompt_tokens: int = typer.Option(512, help="Speed: prompt length."),
    new_tokens: int = typer.Option(32, help="Speed: greedy tokens generated, each timed."),
    repeats: int = typer.Option(
        5, help="Speed: interleaved rounds of each point against dense (median ratio and quartiles)."
    ),
    threads: Optional[int] = typer.Option(None, help="Speed: intra-op CPU threads while timing (default: torch's)."),
    seed: int = typer.Option(0, help="Calibration and training seed."),
):
    """Prune the model with every method at every ratio (optionally recover), measure perplexity,
    zero-shot accuracy and speed against the dense model, and write a report with plots. Finished
    points are cached: rerun to resume or extend."""
    from prunekit.study import StudyConfig

    config = StudyConfig(
        model=model,
        methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
        ratios=tuple(_floats(ratios, "--ratios")),
        recover=recover,
        recover_steps=recover_steps,
        recover_lr=recover_lr,
        calib=calib,
        nsamples=nsamples,
        calib_seqlen=seqlen,
        seed=seed,
        eval_data=eval_data,
        eval_seqlen=eval_seqlen,
        max_windows=max_windows or None,
        tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()),
        task_limit=task_limit,
        train_data=train_data,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        repeats=repeats,
        threads=threads,
    )
    if recover is not None:
        from prunekit.recover import RecoverConfig

        RecoverConfig(mode=recover, lr=recover_lr)  # a bad mode or rate fails now, not after the first point
    _run_study(config, out)


def _run_study(config, out: Path) -> None:
    from prunekit.study import run_study

    result = run_study(config, out, progress=typer.echo)
    typer.echo("")
    typer.echo((out / "report.md").read_text())
    typer.echo(f"report: {out / 'report.md'}  plots: {out / 'study.png'}  ({result.seconds:.0f} s)")


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PrunekitError(f"{flag} must be comma-separated numbers like 0.1,0.2, got {text!r}") from None


@app.command()
@friendly
def demo(
    out: Path = typer.Option(Path("outputs/demo-study"), help="Where the study goes."),
    data: str = typer.Option("kjv", help="Evaluation text (the packaged King James Bible by default)."),
    max_windows: int = typer.Option(16, help="Perplexity windows of 512 tokens."),
):
    """The study on the embedded SmolLM2-135M on CPU, offline (minutes; see BENCHMARKS): width,
    depth, SliceGPT and Wanda at 20%, against dense."""
    from prunekit.study import StudyConfig

    typer.echo("loading smollm2-135m (the first run dequantizes the packaged GGUF once)...")
    config = StudyConfig(
        model="smollm2-135m",
        methods=("width", "depth", "slicegpt", "wanda"),
        ratios=(0.2,),
        calib="pydoc",  # Python's own documentation: always present, and not the evaluation text
        nsamples=16,
        eval_data=data,
        max_windows=max_windows,
        prompt_tokens=256,
        new_tokens=16,
        repeats=5,
    )
    _run_study(config, out)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    app()


if __name__ == "__main__":
    main()

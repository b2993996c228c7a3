"""The ``prunekit`` command: a thin layer over the Python API and ``prunekit.jobs``.

Method, recovery and study options are generated from the config dataclasses (``prunekit.options``):
a field is an option, its docstring the help. Errors caused by the input are printed as one line
(``prunekit: error: ...``) with exit status 2, never as a traceback.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from typing import Optional

import typer
from typer import rich_utils

from prunekit import options as opts
from prunekit.distributed import world
from prunekit.errors import PrunekitError
from prunekit.jobs import GgufExport, PerplexityJob, PruneJob, PruneRetrainJob, RecoverJob, ZeroShotJob
from prunekit.methods import CONFIGS, config_class, study_variants
from prunekit.recover.train import LoraSettings, RecoverConfig
from prunekit.study import StudyConfig

app = typer.Typer(
    add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
    context_settings={"max_content_width": 120}, help="Make Hugging Face causal LMs smaller and faster by pruning.",
)  # fmt: skip
# --help as wide as the terminal (120 columns when there is none), not rich's 80
rich_utils.MAX_WIDTH = rich_utils.MAX_WIDTH or max(shutil.get_terminal_size((120, 24)).columns, 100)
eval_app = typer.Typer(no_args_is_help=True, help="Evaluate a model.")
app.add_typer(eval_app, name="eval")
log = logging.getLogger("prunekit")

DEVICE = "cpu, cuda, cuda:1, ... or auto."
JSON = "Also write the result to this JSON file."


@opts.friendly
def eval_ppl(json_out: Optional[Path] = typer.Option(None, "--json", help=JSON), **options):
    """Perplexity over non-overlapping windows (loss in float32)."""
    from prunekit.data import load_text
    from prunekit.evaluate import perplexity

    job = PerplexityJob(**options)
    opts.check_json(json_out)
    text = load_text(job.data)
    if job.engine == "llama.cpp":
        from prunekit.evaluate.llamacpp import gguf_perplexity

        result = gguf_perplexity(job.model, job.tokenizer, text, job.seqlen, job.max_windows, job.bos, job.threads)
    else:
        lm, tokenizer = job.load(opts.device(job.device))
        result = perplexity(lm, tokenizer, text, job.seqlen, job.max_windows, job.batch_size, bos=job.bos)
    typer.echo(f"{job.model}: {result.summary()}")
    opts.write_json(json_out, {"model": job.model, "engine": job.engine, **result.to_dict()})


@opts.friendly
def eval_zeroshot(json_out: Optional[Path] = typer.Option(None, "--json", help=JSON), **options):
    """Zero-shot accuracy on local copies of the standard sets, scored as lm-evaluation-harness scores them."""
    from prunekit.evaluate.zeroshot import check_tasks, evaluate_zeroshot

    job = ZeroShotJob(**options)
    names = [t.strip() for t in job.tasks.split(",") if t.strip()]
    check_tasks(names, job.limit)  # unknown names, then missing files, fail before the model loads
    opts.check_json(json_out)
    lm, tokenizer = job.load(opts.device(job.device))
    result = evaluate_zeroshot(lm, tokenizer, names, limit=job.limit, batch_size=job.batch_size)
    typer.echo(f"{job.model}: zero-shot ({result.seconds:.0f} s)\n{result.table()}")
    opts.write_json(json_out, {"model": job.model, **result.to_dict()})


eval_app.command("ppl")(opts.command(eval_ppl, opts.option_parameters([PerplexityJob], unset=False)))
eval_app.command("zeroshot")(opts.command(eval_zeroshot, opts.option_parameters([ZeroShotJob], unset=False)))


@opts.friendly
def prune(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(None, help="A recipe file (YAML or JSON) of these options; flags given win."),
    json_out: Optional[Path] = typer.Option(None, "--json", help=JSON),
    **options,
):
    """Prune a model and save it as a standard Hugging Face folder with a prunekit.json manifest; under
    `torchrun --nproc-per-node N` the processes share the calibration samples."""
    from prunekit.jobs import PruneJob, apply_recipe, describe_prune, run_prune_job

    values = {k: v for k, v in ctx.params.items() if k not in ("config", "json_out")}
    values = opts.merge_recipe(ctx, values, opts.read_recipe(config))
    if values["method"] is None:
        raise PrunekitError(f"pass --method ({', '.join(CONFIGS)}) or set method in the --config file")
    cls = config_class(values["method"])
    job_fields = [f.name for f in opts.cli_fields(PruneJob)]
    chosen = {k: v for k, v in values.items() if k not in job_fields}
    chosen, values["calib"], values["nsamples"], values["seqlen"] = apply_recipe(
        values["recipe"], cls.method, chosen, values["calib"], values["nsamples"], values["seqlen"]
    )
    job = PruneJob(**{k: values[k] for k in job_fields})
    shared = {f.name: values[f.name] for f in opts.cli_fields(cls) if f.name in job_fields}  # e.g. --seed
    method_config = opts.build_config(cls, {**chosen, **shared}, f"--method {cls.method}")
    opts.check_json(json_out)
    report = run_prune_job(job, method_config, opts.device(job.device))
    if world().main:  # under torchrun every process prunes; the main one saved and speaks
        typer.echo(describe_prune(report))
        opts.write_json(json_out, report)


_job_options = opts.option_parameters([PruneJob], unset=False)
_job_options[2].default.help += " " + "; ".join(f"{n}: {c.summary}" for n, c in CONFIGS.items()) + "."
_method_options = opts.option_parameters(CONFIGS.values(), lambda c: c.method, skip=[p.name for p in _job_options])
app.command(name="prune")(opts.command(prune, [*_job_options, *_method_options]))


@opts.friendly
def prune_retrain(**options):
    """Han et al.'s iterative pruning: magnitude-prune, retrain the survivors (pruned weights held at
    zero), prune further, along the schedule."""
    from prunekit.jobs import PruneRetrainJob, prune_retrain_job

    job = PruneRetrainJob(**options)
    for stage in prune_retrain_job(job, opts.device(job.device)):
        metric = f", perplexity {stage['metric']:.2f}" if "metric" in stage else ""
        loss = "no retraining (--steps 0)" if stage["final_loss"] is None else f"train loss {stage['final_loss']:.3f}"
        typer.echo(f"stage {stage['stage']}: sparsity {stage['achieved']:.1%}, {loss}{metric}")
    typer.echo(f"saved {job.out}")


app.command(name="prune-retrain")(opts.command(prune_retrain, opts.option_parameters([PruneRetrainJob], unset=False)))


@opts.friendly
def recover(json_out: Optional[Path] = typer.Option(None, "--json", help=JSON), **options):
    """Recover a pruned model's quality by LoRA, continued pretraining or distillation; runs under
    `accelerate launch` (DDP) unchanged."""
    from prunekit.jobs import recover_job
    from prunekit.recover.train import make_accelerator

    job_fields = [f.name for f in opts.cli_fields(RecoverJob)]
    job = RecoverJob(**{k: options.pop(k) for k in job_fields})
    lora = {k.removeprefix("lora_"): options.pop(k) for k in list(options) if k.startswith("lora_")}
    if lora.get("targets"):
        lora["targets"] = [t.strip() for t in ",".join(lora["targets"]).split(",") if t.strip()]
    config = opts.build_config(RecoverConfig, options, "prunekit recover")
    config.lora = opts.build_config(LoraSettings, lora, "LoRA")
    job.check(config)
    opts.check_json(json_out)
    state = make_accelerator(config)  # first: every process must know which one it is
    report = recover_job(job, config, state)
    if state.is_main_process:
        rec = report["recovery"]
        ppl = (
            f", perplexity {rec['ppl_before']['ppl']:.2f} -> {rec['ppl_after']['ppl']:.2f}"
            if "ppl_after" in rec
            else ""
        )
        typer.echo(f"recovered {job.model} by {config.mode} in {rec['seconds']:.1f} s: loss {rec['losses'][0]:.3f} -> "
                   f"{rec['losses'][-1]:.3f}{ppl}\nsaved {job.out} (loss curve: {job.out / 'loss.png'})")  # fmt: skip
        opts.write_json(json_out, report)


app.command(name="recover")(opts.command(recover, [
    *opts.option_parameters([RecoverJob], unset=False), *opts.option_parameters([RecoverConfig]),
    *opts.option_parameters([LoraSettings], prefix="lora_"),
]))  # fmt: skip


@app.command()
@opts.friendly
def bench(
    model: list[str] = typer.Option(..., help="Models to compare; give it once per model, the first is the baseline."),
    batch_sizes: str = typer.Option("1", help="Batch sizes, comma-separated."),
    prompt_lengths: str = typer.Option("512", help="Prompt lengths in tokens, comma-separated."),
    new_tokens: int = typer.Option(64, help="Greedy tokens generated per decode measurement (forced)."),
    repeats: int = typer.Option(5, help="Interleaved rounds per setting after a warm-up (medians and quartiles)."),
    threads: Optional[int] = typer.Option(None, help="Intra-op CPU threads for the timing (default: torch's)."),
    engine: str = typer.Option(
        "pytorch", help="pytorch, or llama.cpp for .gguf files (ABBA order, first prompt length)."
    ),
    device: str = typer.Option("auto", help=DEVICE),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    json_out: Optional[Path] = typer.Option(None, "--json", help=JSON),
):
    """Prefill latency, decode tokens/s, memory, parameters and MACs per token, all models timed
    interleaved in one run; speed-ups over the first as medians of per-round ratios with their quartiles."""
    from prunekit.evaluate.bench import benchmark
    from prunekit.io.load import load

    sizes, lengths = _integers(batch_sizes, "--batch-sizes"), _integers(prompt_lengths, "--prompt-lengths")
    opts.at_least(threads, "--threads")
    opts.check_json(json_out)
    if engine == "llama.cpp":
        from prunekit.evaluate.llamacpp import compare_gguf_speed

        comparison = compare_gguf_speed(list(dict.fromkeys(model)), lengths[0], new_tokens, repeats, threads=threads)
        typer.echo(comparison.table())
        return opts.write_json(json_out, comparison.to_dict())
    if engine != "pytorch":
        raise PrunekitError(f"--engine must be pytorch or llama.cpp, got {engine!r}")
    models = {name: load(name, dtype=dtype, device=opts.device(device))[0] for name in dict.fromkeys(model)}
    result = benchmark(models, sizes, lengths, new_tokens, repeats, lambda row: log.info("%s", row), threads)
    typer.echo(result.table())
    opts.write_json(json_out, {**result.to_dict(), "ratios": result.ratios()})


@app.command()
@opts.friendly
def unpack(
    model: str = typer.Option(..., help="A folder saved with --format compact."),
    out: Path = typer.Option(..., help="Where to write the standard (dense) Hugging Face folder."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
):
    """Restore a compact folder to a standard Hugging Face folder that any tool loads."""
    from prunekit.io.save import unpack_compact

    unpack_compact(model, out, overwrite)
    typer.echo(f"unpacked {model} -> {out}")


@opts.friendly
def export(json_out: Optional[Path] = typer.Option(None, "--json", help=JSON), **options):
    """Write a model (dense, pruned, recovered; per-block shapes included) as one GGUF file for llama.cpp."""
    from prunekit.export.gguf import export_gguf_model

    job = GgufExport(**options)
    opts.check_json(json_out)
    report = export_gguf_model(job.model, job.out, job.quant, job.overwrite)
    typer.echo(report.summary())
    opts.write_json(json_out, report.to_dict())


app.command(name="export")(opts.command(export, opts.option_parameters([GgufExport], unset=False)))


@opts.friendly
def study(out: Path = typer.Option(..., help="Study folder: points/, results.json, report.md, study.png."), **fields):
    """Prune the model with every method at every ratio (optionally recover), measure perplexity,
    zero-shot accuracy and speed against the dense model, and write a report with plots. Finished
    points are cached: rerun to resume or extend."""
    for name in ("methods", "tasks", "ratios"):  # comma-separated lists
        fields[name] = [x.strip() for x in ",".join(fields[name] or []).split(",") if x.strip()] or None
    fields["ratios"] = fields["ratios"] and _floats(",".join(fields["ratios"]), "--ratios")
    config = opts.build_config(StudyConfig, fields, "prunekit study")
    if config.recover is not None:
        RecoverConfig(mode=config.recover, lr=config.recover_lr)  # a bad mode or rate fails now, not after a point
    _run_study(config, out)


_study_options = opts.option_parameters([StudyConfig])
_study_options[1].default.help += f" Available: {', '.join(study_variants())}."
app.command(name="study")(opts.command(study, _study_options))


def _run_study(config, out: Path) -> None:
    from prunekit.study import run_study

    result = run_study(config, out, progress=typer.echo)
    typer.echo(f"\n{(out / 'report.md').read_text()}\nreport: {out / 'report.md'}  plots: {out / 'study.png'}  "
               f"({result.seconds:.0f} s)")  # fmt: skip


def _integers(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PrunekitError(f"{flag} must be comma-separated integers like 1,8, got {text!r}") from None


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PrunekitError(f"{flag} must be comma-separated numbers like 0.1,0.2, got {text!r}") from None


@app.command()
@opts.friendly
def demo(
    out: Path = typer.Option(Path("outputs/demo-study"), help="Where the study goes."),
    data: str = typer.Option("kjv", help="Evaluation text (the packaged King James Bible by default)."),
    max_windows: int = typer.Option(16, help="Perplexity windows of 512 tokens."),
):
    """The study on the embedded SmolLM2-135M on CPU, offline (minutes; see BENCHMARKS): width,
    depth, SliceGPT and Wanda at 20%, against dense."""
    from prunekit.study import demo_config

    typer.echo("loading smollm2-135m (the first run dequantizes the packaged GGUF once)...")
    _run_study(demo_config(data, max_windows), out)


def main() -> None:
    # under torchrun the main process logs the progress; the others only what goes wrong
    level = logging.INFO if world().main else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    app()


if __name__ == "__main__":
    main()

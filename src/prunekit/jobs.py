"""Jobs: what the CLI, the study and the demo run, with one set of defaults.

- ``calibration_for``: the calibration a method needs, with its declared defaults (``calibration_defaults``).
- ``prune_job``: evaluate, prune, evaluate, and save with a manifest (or hand the pruned model back); under
  several processes every one prunes (on its share of the calibration), the main one evaluates and saves.
- ``recover_job``: load, train (every process), evaluate and save (the main process).
- ``describe_prune``: the human-readable summary of a prune job's report.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from prunekit.data import Calibration, calibration
from prunekit.distributed import barrier, require_single, world
from prunekit.errors import PrunekitError
from prunekit.evaluate import perplexity
from prunekit.export.compressed import check_compressible, save_compressed
from prunekit.io.load import load, resolve_folder
from prunekit.io.manifest import build_manifest, read_manifest
from prunekit.io.save import save_pruned
from prunekit.methods import CONFIGS, MethodConfig, calibration_defaults, prune
from prunekit.models import parameter_counts
from prunekit.sequential import EngineConfig


@dataclasses.dataclass
class Evaluation:
    """Perplexity measured before and after a job (``--eval``, ``--eval-seqlen``, ``--max-windows``)."""

    data: str
    seqlen: int = 512
    max_windows: int | None = None

    def __post_init__(self):
        from prunekit.data import load_text

        self.text = load_text(self.data)  # a bad name fails before the model loads

    def measure(self, model, tokenizer) -> dict:
        return perplexity(model, tokenizer, self.text, self.seqlen, self.max_windows).to_dict()


@dataclasses.dataclass(kw_only=True)
class ModelSource:
    """Where a job's model comes from and how it is loaded."""

    model: str
    """Model folder, hub id, or alias (smollm2-135m)."""
    device: str = "auto"
    """Compute device: cpu, cuda, cuda:1, mps or auto."""
    dtype: str = "float32"
    """float32, bfloat16 or float16."""
    allow_pickle: bool = False
    """Allow pickle (.bin) weights."""
    trust_remote_code: bool = False
    """Run the model repository's own code."""

    def load(self, device: str, lazy: bool = False):
        """``(model, tokenizer)`` on ``device`` (the resolved --device)."""
        return load(self.model, dtype=self.dtype, device=device, allow_pickle=self.allow_pickle,
                    trust_remote_code=self.trust_remote_code, lazy=lazy)  # fmt: skip


@dataclasses.dataclass(kw_only=True)
class PerplexityJob(ModelSource):
    """``prunekit eval ppl``."""

    data: str = "wikitext2"
    """wikitext2, wikitext2-valid, c4, kjv, pydoc, a text file, or hf:DATASET?name=&split=&rows=."""
    seqlen: int = 512
    """Window length in tokens."""
    max_windows: int | None = None
    """Evaluate only the first N windows."""
    batch_size: int = 4
    """Windows per forward pass."""
    bos: str = "stream"
    """'stream' (GPTQ convention) or 'window' (BOS before every window)."""
    engine: str = "pytorch"
    """'pytorch', or 'llama.cpp' for a .gguf --model (prunekit[deploy]): the same windows, the same tokens."""
    tokenizer: str | None = None
    """llama.cpp: the model (alias or folder) the GGUF was exported from, whose tokenizer makes the windows."""
    threads: int | None = None
    """llama.cpp: CPU threads (default: all cores)."""

    def __post_init__(self):
        if self.engine not in ("pytorch", "llama.cpp"):
            raise PrunekitError(f"--engine must be pytorch or llama.cpp, got {self.engine!r}")
        if self.engine == "llama.cpp" and self.tokenizer is None:
            raise PrunekitError("--engine llama.cpp needs --tokenizer: the model the GGUF was exported from")


@dataclasses.dataclass(kw_only=True)
class ZeroShotJob(ModelSource):
    """``prunekit eval zeroshot``."""

    tasks: str = "piqa,arc_easy,arc_challenge,hellaswag,winogrande,boolq,openbookqa"
    """Comma-separated: piqa, arc_easy, arc_challenge, hellaswag, winogrande, boolq, openbookqa, lambada."""
    limit: int | None = None
    """Evaluate only the first N items of each task."""
    batch_size: int = 8
    """Requests per forward pass."""


@dataclasses.dataclass
class GgufExport:
    """``prunekit export``: a model to one GGUF file that llama.cpp runs."""

    model: str
    """The model: a prunekit output folder, a model folder, or the alias smollm2-135m."""
    out: Path
    """The .gguf file to write (atomically)."""
    fmt: str = dataclasses.field(default="gguf", metadata={"flag": "--format"})
    """The file format: gguf (llama.cpp). Quantized safetensors (compressed-tensors) come from prune --method gptq."""
    quant: str = "f32"
    """f32, f16, bf16, q8_0 or q4_0 (the gguf package's own block quantization)."""
    overwrite: bool = False
    """Replace an existing file."""

    def __post_init__(self):
        if self.fmt != "gguf":
            raise PrunekitError(f"--format must be gguf, got {self.fmt!r} (compressed-tensors: prune --method gptq)")


@dataclasses.dataclass(kw_only=True)
class PruneJob(ModelSource):
    """What ``prunekit prune`` does besides the method: input, calibration, evaluation, engine and output."""

    out: Path
    """Output folder (written atomically)."""
    method: str | None = None
    """The pruning method (see the option groups below for each one's options)."""
    recipe: str | None = None
    """A published width setting, 'llm-pruner' or 'flap' (options given explicitly win)."""
    calib: str | None = None
    """Calibration data (c4, wikitext2, kjv, pydoc, a text file, hf:DATASET?name=&split=&rows=)."""
    nsamples: int | None = None
    """Calibration samples (default: the method's own; 64, depth 10)."""
    seqlen: int | None = None
    """Calibration sample length in tokens (default: the method's own; 512, depth 128)."""
    seed: int = 0
    """Calibration sampling seed (and the seed of a method's random choices)."""
    eval_data: str | None = dataclasses.field(default=None, metadata={"flag": "--eval"})
    """Measure perplexity before and after on this data."""
    eval_seqlen: int = 512
    """Perplexity window length."""
    max_windows: int | None = None
    """Perplexity on the first N windows only."""
    batch_size: int = 1
    """Calibration samples per forward pass."""
    propagate: str = "pruned"
    """Feed the next block 'pruned' or 'dense' outputs."""
    lazy: bool = False
    """Keep blocks on disk until reached (models larger than memory)."""
    checkpoint_dir: Path | None = None
    """Where finished blocks are checkpointed (default: beside --out); a rerun resumes from it."""
    overwrite: bool = False
    """Replace an existing output folder."""
    fmt: str = dataclasses.field(default="dense", metadata={"flag": "--format"})
    """'dense': a standard HF folder; 'compact': sparse matrices as bitmask + values (prunekit.load or unpack)."""

    def __post_init__(self):
        for flag, value, minimum in (
            ("--nsamples", self.nsamples, 1),
            ("--seqlen", self.seqlen, 2),
            ("--max-windows", self.max_windows, 1),
            ("--eval-seqlen", self.eval_seqlen, 2),
        ):
            if value is not None and value < minimum:
                raise PrunekitError(f"{flag} must be at least {minimum}, got {value}")  # fmt: skip
        self.out = Path(self.out)
        self.checkpoint_dir = Path(self.checkpoint_dir or self.out.parent / f".{self.out.name}.checkpoint")


def run_prune_job(job: PruneJob, method_config: MethodConfig, device: str) -> dict:
    """Everything ``prunekit prune`` checks and does, in order: refuse bad outputs before any work, load,
    calibrate, prune (checkpointed: a rerun resumes), evaluate, save; the checkpoint goes once saved."""
    import shutil

    from prunekit.io.files import check_folder_path, check_output
    from prunekit.io.save import check_format

    if method_config.needs_calibration and job.calib is None:
        raise PrunekitError(f"--method {job.method} needs calibration data; pass --calib (e.g. c4 or a text file)")
    check_output(job.out, job.overwrite)
    check_format(job.fmt, job.lazy)
    if job.lazy and job.eval_data:
        raise PrunekitError("--eval needs the whole model in memory; drop --lazy or evaluate the saved model")
    evaluation = Evaluation(job.eval_data, job.eval_seqlen, job.max_windows) if job.eval_data else None
    check_folder_path(job.checkpoint_dir, "--checkpoint-dir")
    engine = EngineConfig(device, batch_size=job.batch_size, propagate=job.propagate, checkpoint_dir=job.checkpoint_dir)
    # A lazy model stays on disk and the CPU; the engine brings each block to the compute device.
    model, tokenizer = job.load("cpu" if job.lazy else device, lazy=job.lazy)
    calib = calibration_for(method_config, tokenizer, job.calib, job.nsamples, job.seqlen, job.seed)
    report = prune_job(model, tokenizer, job.model, method_config, calib, engine, out=job.out,
                       overwrite=job.overwrite, fmt=job.fmt, evaluation=evaluation)  # fmt: skip
    # every process, after the save (a lazy model's blocks are read from there): on separate machines each has one
    shutil.rmtree(job.checkpoint_dir, ignore_errors=True)
    return report


def calibration_for(
    config: MethodConfig, tokenizer, source: str | None, nsamples: int | None = None, seqlen: int | None = None,
    seed: int = 0,
) -> Calibration | None:  # fmt: skip
    """Calibration from ``source`` (``None``: none), samples and length defaulting to the method's own.

    A method that reads calibration data refuses to go without; one that reads none records what it was given."""
    if source is None:
        if config.needs_calibration:
            raise PrunekitError(f"--method {config.method} needs calibration data; pass --calib (e.g. c4 or a file)")
        return None
    default_samples, default_seqlen = calibration_defaults(config)
    return calibration(tokenizer, source, nsamples or default_samples, seqlen or default_seqlen, seed)


def prune_job(
    model, tokenizer, model_name: str, config: MethodConfig, calib: Calibration | None, engine: EngineConfig, *,
    out: Path | None = None, overwrite: bool = False, fmt: str = "dense", evaluation: Evaluation | None = None,
) -> dict:  # fmt: skip
    """Prune ``model`` in place; with ``out``, save it there. Returns the manifest (plus ``"out"``).

    Under several processes each prunes its copy alike; only the main process evaluates and saves, and
    the others wait for it, so none is gone (nor its checkpoint) before the save is complete."""
    main = world().main
    grid = config.quant_grid
    if grid is not None:  # refuse what compressed-tensors cannot store before the work, not after it
        check_compressible(model, grid, getattr(config, "include", ()), getattr(config, "exclude", ()))
        if fmt != "dense":
            raise PrunekitError("a quantized model is saved as compressed-tensors; drop --format")
    metrics: dict = {"params_before": parameter_counts(model)}
    if evaluation is not None and main:
        metrics["ppl_before"] = evaluation.measure(model, tokenizer)
    result = prune(model, config, calib, engine)
    metrics["params_after"] = parameter_counts(model)
    layers = result.layer_sparsity()
    if layers:
        metrics["sparsity_mean"] = sum(layers.values()) / len(layers)
        metrics["layer_sparsity"] = layers
    shapes = [b for b in result.engine.blocks if set(b) - {"block", "sparsity"}]
    if shapes:
        metrics["blocks"] = shapes
    if "ranking" in result.outside_blocks:  # depth: reusable with --ranking-from
        metrics["ranking"] = result.outside_blocks["ranking"]
    if "hidden_size" in result.outside_blocks:  # SliceGPT, hidden: the stream's width before and after
        metrics["hidden_size"] = result.outside_blocks["hidden_size"]
    if "mix" in result.outside_blocks:  # the mix search's table: reusable with --scores-from
        metrics["mix"] = result.outside_blocks["mix"]
    metrics["prune_seconds"] = result.seconds
    if evaluation is not None and main:
        metrics["ppl_after"] = evaluation.measure(model, tokenizer)
    manifest = build_manifest(
        source=model_name, source_folder=resolve_folder(model_name), method=result.method,
        method_config=result.config, calibration=result.calibration, metrics=metrics,
        extra={"sparse_weights": config.sparse_weights},
    )  # fmt: skip
    if out is not None and grid is not None and main:
        save_compressed(model, tokenizer, out, grid, manifest, overwrite=overwrite)
    elif out is not None and main:  # with the files a method hands over (the mix search's importance)
        files = result.outside_blocks.get("files")
        save_pruned(model, tokenizer, out, manifest, overwrite=overwrite, fmt=fmt, extra_files=files)
    barrier()
    return {"out": str(out) if out is not None else None, **manifest}


def keeps_sparsity(manifest: dict) -> bool:
    """Did the model's method leave zeros that recovery should keep? (older manifests: from the method's config)"""
    if "sparse_weights" in manifest:
        return bool(manifest["sparse_weights"])
    method = CONFIGS.get(manifest.get("method") or "")
    return bool(method and method.sparse_weights)


@dataclasses.dataclass
class RecoverJob:
    """What ``prunekit recover`` does besides training: the model, its data, the teacher, evaluation and output."""

    model: str
    """The pruned model: a prunekit output folder (or any model)."""
    out: Path
    """Output folder (written atomically)."""
    data: str = "c4"
    """Training text (c4, wikitext2, kjv, a .txt/.jsonl file, hf:DATASET?...) or an Alpaca .json."""
    seqlen: int = 512
    """Training sequence length (text is packed into windows of it)."""
    teacher: str | None = None
    """distill: the dense teacher model."""
    teacher_topk: int | None = None
    """distill: precompute the teacher's top-k logits once and stream them from disk."""
    checkpoint_dir: Path | None = None
    """Where checkpoints go (default: beside --out); a rerun resumes."""
    eval_data: str | None = dataclasses.field(default=None, metadata={"flag": "--eval"})
    """Measure perplexity before and after on this data."""
    eval_seqlen: int = 512
    """Perplexity window length."""
    max_windows: int | None = None
    """Perplexity on the first N windows only."""
    overwrite: bool = False
    """Replace an existing output folder."""

    def __post_init__(self):
        for flag, value, minimum in (
            ("--teacher-topk", self.teacher_topk, 1),
            ("--max-windows", self.max_windows, 1),
            ("--eval-seqlen", self.eval_seqlen, 2),
        ):
            if value is not None and value < minimum:
                raise PrunekitError(f"{flag} must be at least {minimum}, got {value}")  # fmt: skip
        self.out = Path(self.out)
        self.checkpoint_dir = Path(self.checkpoint_dir or self.out.parent / f".{self.out.name}.recover-checkpoint")

    def check(self, config) -> None:
        """Refuse what does not fit together (teacher and mode), before any process loads anything."""
        if config.mode == "distill" and self.teacher is None:
            raise PrunekitError("--mode distill needs a teacher: pass --teacher DENSE_MODEL")
        if config.mode != "distill" and (self.teacher is not None or self.teacher_topk is not None):
            raise PrunekitError(f"--teacher and --teacher-topk apply to --mode distill, not {config.mode}")


def recover_job(job: RecoverJob, config, state, progress: bool = True) -> dict:
    """Load, train (every process), evaluate and save (the main process); the report as ``prunekit.json`` has it.

    ``state``: the accelerate state every process made first (``recover.train.make_accelerator``)."""
    import shutil

    from prunekit.io.files import check_folder_path, check_output
    from prunekit.plots import loss_curve_png
    from prunekit.recover import TeacherTopK, load_train_data, precompute_teacher_topk
    from prunekit.recover import recover as train

    job.check(config)
    evaluation = Evaluation(job.eval_data, job.eval_seqlen, job.max_windows) if job.eval_data else None
    if state.is_main_process:
        check_output(job.out, job.overwrite)
    check_folder_path(job.checkpoint_dir, "--checkpoint-dir")
    model, tokenizer = load(job.model)
    folder = resolve_folder(job.model)
    previous = read_manifest(folder)
    keep = keeps_sparsity(previous) if config.keep_sparsity is None else config.keep_sparsity
    config = dataclasses.replace(config, keep_sparsity=keep)
    train_data = load_train_data(tokenizer, job.data, job.seqlen)
    teacher = load(job.teacher)[0] if job.teacher else None
    store, topk = None, job.teacher_topk
    if teacher is not None and topk:
        path = job.checkpoint_dir / f"teacher-top{topk}.safetensors"
        if state.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                precompute_teacher_topk(teacher, train_data, topk, path)
        state.wait_for_everyone()
        store, teacher = TeacherTopK(path, train_data), None
    evaluate = evaluation is not None and state.is_main_process
    before = evaluation.measure(model, tokenizer) if evaluate else None
    model, result = train(
        model, train_data, config, teacher, store, job.checkpoint_dir, accelerator=state, progress=progress
    )
    recovery = {
        "config": dataclasses.asdict(config),
        "data": train_data.describe(),
        "teacher": job.teacher,
        "processes": state.num_processes,
        **dataclasses.asdict(result),
    }
    if not state.is_main_process:
        return {"recovery": recovery}
    if evaluate:
        recovery["ppl_before"], recovery["ppl_after"] = before, evaluation.measure(model, tokenizer)
    manifest = previous or build_manifest(
        source=job.model, source_folder=folder, method=None, method_config=None, calibration=None, metrics={}
    )
    manifest = {**manifest, "recovery": recovery}
    png = loss_curve_png(result.losses, result.phases, f"{config.mode} recovery of {Path(str(job.model)).name}")
    save_pruned(model, tokenizer, job.out, manifest, overwrite=job.overwrite, extra_files={"loss.png": png})
    shutil.rmtree(job.checkpoint_dir, ignore_errors=True)
    return {"out": str(job.out), "recovery": recovery}


def apply_recipe(recipe: str | None, method: str, options: dict, calib, nsamples, seqlen):
    """A published setting's method options and calibration (``--recipe``), under what the user set explicitly."""
    from prunekit.methods.width import RECIPES

    if recipe is None:
        return options, calib, nsamples, seqlen
    if method != "width":
        raise PrunekitError(f"--recipe applies to --method width, not {method}")
    if recipe not in RECIPES:
        raise PrunekitError(f"unknown --recipe {recipe!r}; available: {', '.join(RECIPES)}")
    chosen = RECIPES[recipe]
    merged = {**options, **{k: v for k, v in chosen.options.items() if options.get(k) is None}}
    return merged, calib or chosen.calib, nsamples or chosen.nsamples, seqlen or chosen.seqlen


@dataclasses.dataclass
class PruneRetrainJob:
    """Han et al.'s iterative pruning as ``prunekit prune-retrain`` runs it."""

    model: str
    """Model folder, hub id, or alias (smollm2-135m)."""
    out: Path
    """Output folder (written atomically)."""
    schedule: str = "0.3,0.5,0.6,0.7"
    """Rising sparsities, comma-separated."""
    train_data: str = "c4"
    """Text to retrain on (c4, kjv, pydoc, a file, hf:DATASET?...)."""
    steps: int = 50
    """Fine-tuning steps after each pruning stage."""
    lr: float = 5e-5
    """AdamW learning rate."""
    batch_size: int = 4
    """Windows per step."""
    train_seqlen: int = 256
    """Training window length."""
    seed: int = 0
    """Sampling seed of the training windows and batches."""
    eval_data: str | None = dataclasses.field(default=None, metadata={"flag": "--eval"})
    """Measure perplexity after every stage."""
    eval_seqlen: int = 512
    """Perplexity window length."""
    max_windows: int | None = None
    """Perplexity on the first N windows only."""
    device: str = "auto"
    """cpu, cuda, ... or auto."""
    overwrite: bool = False
    """Replace an existing output folder."""


def prune_retrain_job(job: PruneRetrainJob, device: str) -> list[dict]:
    """Prune and retrain along the schedule, save to ``job.out``; returns one report per stage."""
    from prunekit.io.files import check_output
    from prunekit.methods.retrain import PruneRetrainConfig, prune_retrain
    from prunekit.recover import FinetuneConfig

    require_single("prunekit prune-retrain")
    try:
        schedule = [float(x) for x in job.schedule.split(",")]
    except ValueError:
        raise PrunekitError(
            f"--schedule must be comma-separated numbers like 0.3,0.5,0.7, got {job.schedule!r}"
        ) from None
    finetune = FinetuneConfig(steps=job.steps, lr=job.lr, batch_size=job.batch_size, seed=job.seed)
    config = PruneRetrainConfig(schedule, finetune)
    if job.train_seqlen < 2:
        raise PrunekitError(f"--train-seqlen must be at least 2, got {job.train_seqlen}")
    evaluation = Evaluation(job.eval_data, job.eval_seqlen, job.max_windows) if job.eval_data else None
    check_output(job.out, job.overwrite)
    model, tokenizer = load(job.model, device=device)
    batches = max(job.steps * job.batch_size, job.batch_size)
    train = calibration(tokenizer, job.train_data, batches, job.train_seqlen, job.seed)

    def evaluate():
        return perplexity(
            model, tokenizer, evaluation.text, evaluation.seqlen, evaluation.max_windows, progress=False
        ).ppl

    stages = prune_retrain(model, train.tokens, config, evaluate if evaluation else None)
    manifest = build_manifest(
        source=job.model, source_folder=resolve_folder(job.model), method="magnitude-prune-retrain",
        method_config=dataclasses.asdict(config), calibration=train.describe(), metrics={"stages": stages},
        extra={"sparse_weights": True},
    )  # fmt: skip
    save_pruned(model, tokenizer, job.out, manifest, overwrite=job.overwrite)
    return stages


def describe_prune(report: dict) -> str:
    """A prune job's report in a few lines: method, parameters, sparsity, removals, time, perplexity, folder."""
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
    if "hidden_size" in m:
        lines.append(f"hidden size  {m['hidden_size']['before']} -> {m['hidden_size']['after']}")
    if "mix" in m:
        lines.append(f"chose        {_mix_summary(m.get('blocks', []))} (scores reusable: --scores-from {report['out']})")
    lines.append(f"pruning time {m['prune_seconds']:.1f} s")
    if "ppl_before" in m:
        before, after = m["ppl_before"], m["ppl_after"]
        lines.append(
            f"perplexity   {before['ppl']:.2f} -> {after['ppl']:.2f} ({before['dataset']}, seqlen {before['seqlen']}, "
            f"{before['windows']} windows)"
        )
    if report.get("out"):
        lines.append(f"saved        {report['out']} (prunekit.json has the full report)")
    return "\n".join(lines)


def _mix_summary(blocks: list[dict]) -> str:
    """How many blocks the mix search removed, left without attention or MLP, narrowed or kept."""
    kinds = [
        "removed" if b["num_heads"] == 0 and b["intermediate_size"] == 0
        else "without attention" if b["num_heads"] == 0
        else "without MLP" if b["intermediate_size"] == 0
        else "narrowed" if b["removed_params"]
        else "kept"
        for b in blocks
    ]
    return "blocks " + ", ".join(f"{kinds.count(k)} {k}" for k in dict.fromkeys(kinds))

"""Recovery training for pruned models: LoRA (PEFT), continued pretraining, CPT then LoRA, distillation.

One loop for every mode, on ``accelerate``: a plain run uses one process; the same code under
``accelerate launch`` (DDP) splits each step's examples over the processes with no change. FSDP is
refused for now (exporting needs the shards gathered, and sparse masks would meet flattened shards).
What makes runs comparable and resumable:

- ``batch_size`` is the global batch of one optimizer step. Each process takes its share of the
  step's examples (``recover.data.batch_indices``, a pure function of seed and step) in micro-batches
  of ``micro_batch``, accumulating gradients; DDP averages them, so two processes compute the step one
  process would. The logged loss is the mean over all micro-batches of all processes.
- Checkpoints (``accelerate``'s ``save_state``: weights, optimizer, schedule, RNG) are written every
  ``checkpoint_every`` steps, atomically; a rerun with the same settings resumes from the last one
  and sees the same batches in the same order.
- ``keep_sparsity``: the zeros of the block linears are masks. Full-parameter modes zero the masked
  gradients before each step, keep AdamW's moments at zero there and re-apply the masks after it;
  LoRA's base weights are frozen, and the merged update is masked again, so the model leaves with
  exactly the zeros it came with (``RecoverReport.sparsity_kept`` checks it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models import get_adapter
from prunekit.recover.data import IGNORE, TrainData, batch_indices
from prunekit.recover.finetune import mask_optimizer_state, sparse_masks

log = logging.getLogger(__name__)

MODES = ("lora", "cpt", "cpt+lora", "distill")
DEFAULT_LR = {"lora": 1e-4, "cpt": 2e-5, "distill": 2e-5}


@dataclass
class LoraSettings:
    """LLM-Pruner's LoRA: rank 8, alpha 16, dropout 0.05, on every linear of the blocks."""

    r: int = 8
    """LoRA rank (LLM-Pruner: 8)."""
    alpha: int = 16
    """LoRA alpha (LLM-Pruner: 16)."""
    dropout: float = 0.05
    """LoRA dropout (LLM-Pruner: 0.05)."""
    targets: tuple[str, ...] | None = None
    """Module names to adapt, comma-separated, or one regular expression (default: every linear of the blocks,
    named as the model's family names them)."""

    def __post_init__(self):
        if self.r < 1 or self.alpha <= 0:
            raise PrunekitError(f"--lora-r must be at least 1 and --lora-alpha positive, got {self.r} and {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise PrunekitError(f"--lora-dropout must lie in [0, 1), got {self.dropout}")
        if self.targets is not None and not self.targets:
            raise PrunekitError("--lora-targets names no module; e.g. q_proj,v_proj")


# Examples per forward pass unless --micro-batch says otherwise; the rest of a step is gradient accumulation.
# The whole step of 8 x 512 tokens in one pass held 10.8 GB for SmolLM2-135M (its logits alone are 8 x 512 x 49k).
DEFAULT_MICRO_BATCH = 2


@dataclass
class RecoverConfig:
    mode: str = "lora"
    """lora, cpt (continued pretraining), cpt+lora, or distill."""
    steps: int = 100
    """Optimizer steps (all phases)."""
    batch_size: int = 8
    """Examples per optimizer step, over all processes."""
    micro_batch: int | None = None
    """Examples per forward pass; the rest of a step is gradient accumulation (default 2: bounded memory)."""
    lr: float | None = None
    """Peak learning rate (LoRA 1e-4, full training 2e-5)."""
    warmup_steps: int | None = None
    """Linear warm-up steps before the cosine decay (10% of the steps)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this."""
    precision: str = "fp32"
    """fp32 or bf16 (autocast)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass."""
    lora: LoraSettings = field(default_factory=LoraSettings, metadata={"cli": False})  # its own options: --lora-*
    cpt_steps: int | None = None
    """cpt+lora: CPT steps before the LoRA steps (half)."""
    temperature: float = 2.0
    """distill: softmax temperature."""
    distill_weight: float = 1.0
    """distill: weight of the KL term (the rest: the LM loss)."""
    keep_sparsity: bool | None = None
    """Hold pruned weights at zero (default: yes for the outputs of methods that leave zeros)."""
    checkpoint_every: int = 50
    """Checkpoint every N steps (0: never); a rerun resumes."""
    seed: int = 0
    """Data order and initialisation seed."""

    def __post_init__(self):
        if self.mode not in MODES:
            raise PrunekitError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise PrunekitError(f"--steps and --batch-size must be at least 1, got {self.steps} and {self.batch_size}")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise PrunekitError(f"--micro-batch must be at least 1, got {self.micro_batch}")
        if self.precision not in ("fp32", "bf16"):
            raise PrunekitError(f"--precision must be fp32 or bf16, got {self.precision!r}")
        if not 0 <= self.distill_weight <= 1 or self.temperature <= 0:
            raise PrunekitError("--distill-weight must lie in [0, 1] and --temperature be positive")
        if self.lr is not None and self.lr <= 0:
            raise PrunekitError(f"--lr must be positive, got {self.lr}")
        for name in ("warmup_steps", "checkpoint_every", "cpt_steps"):
            if (getattr(self, name) or 0) < 0:
                raise PrunekitError(f"--{name.replace('_', '-')} must be at least 0, got {getattr(self, name)}")
        if self.cpt_steps is not None and self.mode != "cpt+lora":
            raise PrunekitError(f"--cpt-steps applies to --mode cpt+lora, not {self.mode}")
        if self.mode == "cpt+lora" and not 0 < self.phases()[0][1] < self.steps:
            raise PrunekitError(f"--cpt-steps must lie between 1 and --steps - 1 ({self.steps - 1})")

    def phases(self) -> list[tuple[str, int]]:
        """(mode, steps) per phase: ``cpt+lora`` trains fully first, then with LoRA."""
        if self.mode != "cpt+lora":
            return [(self.mode, self.steps)]
        cpt = self.cpt_steps if self.cpt_steps is not None else self.steps // 2
        return [("cpt", cpt), ("lora", self.steps - cpt)]


@dataclass
class RecoverReport:
    losses: list[float] = field(default_factory=list)  # one per optimizer step, all phases
    phases: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    resumed_at: int = 0  # steps restored from a checkpoint instead of trained again
    sparsity_kept: bool | None = None  # with keep_sparsity: every masked weight is exactly zero


# -- the loop --------------------------------------------------------------------------------------


def recover(
    model: nn.Module,
    data: TrainData,
    config: RecoverConfig,
    teacher: nn.Module | None = None,
    teacher_topk=None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    accelerator=None,
) -> tuple[nn.Module, RecoverReport]:
    """Train ``model`` as ``config`` says; returns the trained model (LoRA merged in) and the report.

    ``teacher`` (run alongside) or ``teacher_topk`` (a ``TeacherTopK`` precomputed on ``data``) is needed
    by ``mode="distill"``. ``on_step(step, loss)`` is called after every optimizer step. ``accelerator``:
    the run's ``make_accelerator(config)``, when the caller needs it first (to know its process)."""
    if config.mode == "distill" and teacher is None and teacher_topk is None:
        raise PrunekitError("--mode distill needs a teacher: --teacher DENSE_MODEL (or precomputed top-k logits)")
    accelerator = accelerator or make_accelerator(config)
    if accelerator.distributed_type.value == "FSDP":
        raise PrunekitError(
            "recovery under FSDP is not supported yet (gathering the sharded model for export and keeping sparse "
            "masks on flattened shards are not written); launch with DDP (accelerate launch --multi_gpu)"
        )
    masks = sparse_masks(model) if config.keep_sparsity else {}
    run = _Run(accelerator, data, config, masks, teacher, teacher_topk, progress, on_step)
    report = RecoverReport()
    start = time.perf_counter()
    done = 0
    for index, (mode, steps) in enumerate(config.phases()):
        folder = Path(checkpoint_dir) / f"phase{index}-{mode}" if checkpoint_dir else None
        model, phase = _train_phase(run, model, mode, steps, done, folder)
        report.losses += phase["losses"]
        report.resumed_at += phase["resumed_at"]
        report.phases.append({"mode": mode, "steps": steps, "lr": phase["lr"]})
        done += steps
    if masks:
        report.sparsity_kept = all(bool((p[~m] == 0).all()) for p, m in masks.items())
    report.seconds = time.perf_counter() - start
    model.eval()
    return model, report


def make_accelerator(config: RecoverConfig):
    """The run's ``Accelerator``: one process, or each of those ``accelerate launch`` / torchrun started."""
    from accelerate import Accelerator

    from prunekit.distributed import accelerated

    # Without an accelerator, accelerate runs several launched processes as one each unless told cpu=True
    # (then they join over gloo); pruning's processes join the same way (``prunekit.distributed``).
    return Accelerator(mixed_precision="bf16" if config.precision == "bf16" else "no", cpu=not accelerated())


@dataclass
class _Run:
    """What stays the same over the phases of one recovery run."""

    accelerator: object
    data: TrainData
    config: RecoverConfig
    masks: dict
    teacher: nn.Module | None
    topk: object
    progress: bool
    on_step: Callable[[int, float], None] | None


def _train_phase(run: _Run, model, mode: str, steps: int, step_offset: int, folder: Path | None):
    accelerator, data, config, masks, teacher = run.accelerator, run.data, run.config, run.masks, run.teacher
    lr = config.lr or DEFAULT_LR["lora" if mode == "lora" else "cpt"]
    if mode == "lora":
        model = _with_lora(model, config.lora)
    else:
        for param in model.parameters():
            param.requires_grad_(True)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if mode == "lora":
            model.enable_input_require_grads()
    optimizer, scheduler = _optimizer(model, config, lr, steps)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    # Not prepared: accelerate would advance it once per process per step (it assumes sharded epochs).
    accelerator.register_for_checkpointing(scheduler)
    share, micro = _shares(config, accelerator.num_processes)
    state = _Checkpoints(folder, config, mode, steps, accelerator)
    first, losses = state.resume()
    mask_optimizer_state(optimizer, masks)
    wrapped.train()
    if teacher is not None:
        teacher.to(accelerator.device).eval()
    bar = _bar(steps, first, run.progress and accelerator.is_main_process, mode)
    for step in range(first, steps):
        indices = batch_indices(len(data), step_offset + step, config.batch_size, config.seed)
        mine = indices[accelerator.process_index * share : (accelerator.process_index + 1) * share]
        chunks = mine.split(micro)
        total = torch.zeros((), device=accelerator.device)
        for i, chunk in enumerate(chunks):
            sync = contextlib.nullcontext() if i == len(chunks) - 1 else accelerator.no_sync(wrapped)
            with sync, accelerator.autocast():
                loss = _loss(wrapped, data, chunk, accelerator.device, mode, config, teacher, run.topk)
                accelerator.backward(loss / len(chunks))
            total += loss.detach() / len(chunks)
        for param, mask in masks.items():
            if param.grad is not None:
                param.grad.mul_(mask)
        if config.grad_clip:
            accelerator.clip_grad_norm_(wrapped.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        _apply_masks(masks)
        value = accelerator.reduce(total, reduction="mean").item()
        if not math.isfinite(value):
            raise PrunekitError(f"training diverged at step {step + 1} (loss {value}); lower --lr")
        losses.append(value)
        bar.update(1)
        bar.set_postfix(loss=f"{value:.3f}")
        state.maybe_save(step + 1, losses)
        if run.on_step is not None:
            run.on_step(step_offset + step + 1, value)
    bar.close()
    model = accelerator.unwrap_model(wrapped)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    if mode == "lora":
        model = model.merge_and_unload()
        _apply_masks(masks)  # the merged update B·A is dense: the pruned weights stay pruned
    accelerator.free_memory()
    return model, {"losses": losses, "resumed_at": first, "lr": lr}


def _shares(config: RecoverConfig, processes: int) -> tuple[int, int]:
    """Examples per process per step, and per micro-batch; the global batch must split evenly."""
    if config.batch_size % processes:
        raise PrunekitError(f"--batch-size {config.batch_size} does not split over {processes} processes")
    share = config.batch_size // processes
    micro = config.micro_batch or max(d for d in range(1, min(share, DEFAULT_MICRO_BATCH) + 1) if share % d == 0)
    if share % micro:
        raise PrunekitError(f"each process's {share} examples per step do not split into --micro-batch {micro}")
    return share, micro


def _loss(model, data: TrainData, indices, device, mode, config, teacher, topk) -> torch.Tensor:
    ids = data.input_ids[indices].to(device)
    labels = data.labels[indices].to(device)
    out = model(input_ids=ids, labels=labels, use_cache=False)
    if mode != "distill":
        return out.loss
    kl = distillation_loss(out.logits, labels, indices, config.temperature, teacher, topk, ids)
    return config.distill_weight * kl + (1 - config.distill_weight) * out.loss


def distillation_loss(logits, labels, indices, temperature, teacher=None, topk=None, ids=None) -> torch.Tensor:
    """KL(teacher || student) at temperature T, times T² (Hinton et al.), averaged over the learned tokens.

    With precomputed top-k logits the teacher's distribution is its softmax over its k best tokens
    (the rest taken as zero); with k = the vocabulary it is the full KL."""
    student = F.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    learned = labels[:, 1:] != IGNORE
    if topk is not None:
        values, token_ids = topk.read(indices, device=logits.device)
        target = F.softmax(values.float() / temperature, dim=-1)
        per_token = (target * (torch.log(target.clamp_min(1e-30)) - student.gather(-1, token_ids))).sum(-1)
    else:
        with torch.no_grad():
            reference = teacher(input_ids=ids, use_cache=False).logits[:, :-1].float() / temperature
        target = F.log_softmax(reference, dim=-1)
        per_token = F.kl_div(student, target, log_target=True, reduction="none").sum(-1)
    return (per_token * learned).sum() / learned.sum().clamp_min(1) * temperature**2


def _with_lora(model, settings: LoraSettings):
    from peft import LoraConfig, get_peft_model

    names = settings.targets or get_adapter(model).lora_targets()
    single = len(names) == 1 and not names[0].isidentifier()
    targets = names[0] if single else list(names)  # one pattern is a regular expression
    try:
        return get_peft_model(
            model,
            LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=targets),
        )
    except ValueError as err:
        raise PrunekitError(f"--lora-targets {names} match no linear layer of this model ({err})") from None


def _optimizer(model, config: RecoverConfig, lr: float, steps: int):
    from transformers import get_cosine_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
    warmup = config.warmup_steps if config.warmup_steps is not None else steps // 10
    return optimizer, get_cosine_schedule_with_warmup(optimizer, warmup, steps)


def _bar(steps: int, first: int, show: bool, mode: str):
    from tqdm.auto import tqdm

    return tqdm(total=steps, initial=first, desc=f"recover ({mode})", unit="step", disable=not show)


# -- sparsity ----------------------------------------------------------------------------------------


@torch.no_grad()
def _apply_masks(masks: dict) -> None:
    for param, mask in masks.items():
        param.mul_(mask)


# -- checkpoints ---------------------------------------------------------------------------------------


class _Checkpoints:
    """``folder/step-NNNNNN`` (accelerate state) plus ``losses.json``; ``run.json`` names the run it belongs to."""

    def __init__(self, folder: Path | None, config: RecoverConfig, mode: str, steps: int, accelerator):
        self.folder, self.every, self.steps, self.accelerator = folder, config.checkpoint_every, steps, accelerator
        self.run = json.dumps({"config": asdict(config), "mode": mode, "steps": steps}, sort_keys=True, default=str)

    def resume(self) -> tuple[int, list[float]]:
        if self.folder is None or not self.folder.exists():
            return 0, []
        run_file = self.folder / "run.json"
        if run_file.exists() and run_file.read_text() != self.run:
            raise PrunekitError(
                f"{self.folder} holds the checkpoint of a different recovery run; remove it or choose another "
                "--checkpoint-dir"
            )
        saved = sorted(self.folder.glob("step-*"))
        if not saved:
            return 0, []
        self.accelerator.load_state(saved[-1])
        losses = json.loads((saved[-1] / "losses.json").read_text())
        log.info("resuming recovery at step %d from %s", len(losses), saved[-1])
        return len(losses), losses

    def maybe_save(self, step: int, losses: list[float]) -> None:
        if self.folder is None or not self.every or (step % self.every and step != self.steps):
            return
        target = self.folder / f"step-{step:06d}"
        partial = self.folder / f".partial-{step:06d}"
        if self.accelerator.is_main_process:
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / "run.json").write_text(self.run)
            shutil.rmtree(partial, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(partial)
        if self.accelerator.is_main_process:
            (partial / "losses.json").write_text(json.dumps(losses))
            partial.rename(target)
            for old in sorted(self.folder.glob("step-*"))[:-1]:  # the newest is all a resume needs
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()

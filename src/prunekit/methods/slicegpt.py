"""SliceGPT (Ashkboos et al. 2024): rotate the residual stream onto its principal components, delete the rest.

The model is first made invariant (``prunekit.surgery.hidden``: untied head, norms folded into their
readers, LayerNorm turned into RMSNorm). Then, sequentially over the calibration set:

- the embeddings' output gives the first basis (PCA of the signal entering block 0);
- for each block, the stream entering it lives in the previous basis, already sliced. The block runs
  unrotated in the original coordinates on that sliced signal, written back as ``x Q̄ Q̄ᵀ`` (exactly
  what the sliced block will compute). The signal entering its MLP (the attention's output added
  to the residual) gives the block's middle basis; the MLP then runs on that signal sliced in the
  middle basis, and the block's output gives the next basis. Each PCA therefore sees what the
  already-sliced blocks before it produce, as in SliceGPT's ``rotate_and_slice_sequential``.
- the block is rotated (readers by the basis they read, writers by the basis they write, two
  shortcut matrices between them), and finally everything keeps the leading ``size`` coordinates.

PCA: float64 sums of ``xᵀx`` over every calibration token, damped by 1% of the mean diagonal before
the eigendecomposition (SliceGPT's damping), eigenvectors sorted by eigenvalue, largest first. The
report gives each basis's kept share of the signal's energy.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch

from prunekit.errors import PrunekitError, StopForward
from prunekit.io.lazy import is_lazy
from prunekit.methods.registry import MethodConfig, register
from prunekit.models import get_adapter
from prunekit.sequential import EngineReport, call_block, run_sequential
from prunekit.surgery.hidden import (
    SHORTCUTS,
    attach_shortcut,
    hidden_width,
    make_invariant,
    norm_before,
    rotate_block,
    rotate_embedding,
    rotate_readers,
    slice_hidden,
)
from prunekit.threads import fixed_threads

ORIENTATIONS = ("pca", "random")


@dataclass
class SliceGPTConfig(MethodConfig):
    """``orientation="random"`` turns each kept subspace by a random orthogonal matrix (seeded by
    ``seed``), SliceGPT's ``--final-orientation random``: the same subspace, its energy spread over
    every coordinate instead of the first (it helps later quantization, not perplexity)."""

    method: ClassVar[str] = "slicegpt"
    summary: ClassVar[str] = "rotate the residual stream by PCA and delete its least-used directions (SliceGPT)"
    reshapes_blocks: ClassVar[bool] = True

    slice: float = 0.25
    """Fraction of the hidden size (embedding dimension) to delete."""
    round_to: int = 8
    """Round the kept hidden size to a multiple of this."""
    orientation: str = "pca"
    """'pca' or 'random' (a random turn of each kept subspace)."""
    damp: float = 0.01
    """Dampening of the covariance before its eigendecomposition, a fraction of its mean diagonal."""
    seed: int = 0
    """Seed of --orientation random."""

    @classmethod
    def study_variants(cls):
        return {"slicegpt": lambda ratio: cls(slice=ratio)}

    def __post_init__(self):
        if not 0 < self.slice < 1:
            raise PrunekitError(f"--slice must be a fraction in (0, 1) of the hidden size to delete, got {self.slice}")
        if self.round_to < 1:
            raise PrunekitError(f"--round-to must be a positive integer, got {self.round_to}")
        if self.orientation not in ORIENTATIONS:
            raise PrunekitError(f"--orientation must be one of {', '.join(ORIENTATIONS)}, got {self.orientation!r}")
        if not 0 <= self.damp < 1:
            raise PrunekitError(f"damp must lie in [0, 1), got {self.damp}")

    def kept_size(self, width: int) -> int:
        """The hidden size after slicing: ``(1 - slice) * width`` rounded to a multiple of ``round_to``."""
        size = int(round((1 - self.slice) * width / self.round_to)) * self.round_to
        if not 0 < size < width:
            raise PrunekitError(
                f"--slice {self.slice} of a hidden size of {width}, rounded to a multiple of {self.round_to}, "
                f"keeps {size}: choose a slice that keeps between {self.round_to} and {width - self.round_to}"
            )
        return size


class Covariance:
    """Float64 sums of ``xᵀx`` over tokens (a ``distributed.Statistic``)."""

    def __init__(self, width: int, device):
        self.sum = torch.zeros(width, width, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1]).double()
        self.sum += flat.T @ flat

    def partial_sums(self) -> dict[str, torch.Tensor]:
        return {"sum": self.sum}

    def set_totals(self, totals: dict[str, torch.Tensor]) -> None:
        self.sum = totals["sum"]


@dataclass
class Basis:
    vectors: torch.Tensor  # [width, width] float64, orthogonal, principal directions first
    kept_energy: float  # share of the signal's energy in the leading ``size`` directions


def principal_basis(cov: torch.Tensor, size: int, damp: float = 0.01) -> Basis:
    """Eigenvectors of ``cov`` as columns, largest eigenvalue first, after ``damp`` x mean-diagonal damping."""
    cov = cov.double()
    damped = cov + damp * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    with fixed_threads(1 if cov.device.type == "cpu" else None):  # see prunekit.threads: busy CPUs
        values, vectors = torch.linalg.eigh(damped)
    order = torch.argsort(values, descending=True)
    vectors = vectors[:, order]
    energy = (vectors.T @ cov @ vectors).diagonal()
    total = float(energy.sum())
    return Basis(vectors, float(energy[:size].sum()) / total if total > 0 else 1.0)


def project(x: torch.Tensor, basis: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` sliced to the leading ``size`` directions of ``basis``, in the original coordinates."""
    kept = basis[:, :size].to(x.device)
    return ((x.double() @ kept) @ kept.T).to(x.dtype)


def _oriented(basis: Basis, size: int, config: SliceGPTConfig, generator: torch.Generator) -> Basis:
    if config.orientation == "pca":
        return basis
    turn, _ = torch.linalg.qr(torch.randn(size, size, dtype=torch.float64, generator=generator))
    vectors = basis.vectors.clone()
    vectors[:, :size] = vectors[:, :size] @ turn.to(vectors.device)
    return Basis(vectors, basis.kept_energy)


@dataclass
class SlicePlan:
    """What every block's step shares: the config, the stream's width before slicing and after."""

    config: SliceGPTConfig
    width: int
    size: int

    def basis(self, step, signals: list[torch.Tensor], generator: torch.Generator) -> Basis:
        """The principal basis of ``signals`` (this process's share) over every process's samples."""
        cov = Covariance(self.width, step.device)
        for x in signals:
            cov.add(x.to(step.device))
        step.reduce(cov)
        return _oriented(principal_basis(cov.sum, self.size, self.config.damp), self.size, self.config, generator)


def slicegpt_prepare(config: SliceGPTConfig, model, calibration, engine) -> SlicePlan:
    if is_lazy(model):
        raise PrunekitError("SliceGPT folds the norms into every block before block 0 runs; load without --lazy")
    return invariant_plan(model, config, config.kept_size(hidden_width(model)), engine)


def invariant_plan(model, config: SliceGPTConfig, size: int, engine) -> SlicePlan:
    """Make ``model`` invariant (every norm folded into its readers); the plan for slicing it to ``size``."""
    from prunekit.surgery.depth import has_removed_sublayers

    if has_removed_sublayers(model):
        raise PrunekitError("SliceGPT needs both sub-layers of every block; slice the model before depth pruning")
    if engine.propagate == "dense":
        raise PrunekitError("SliceGPT's blocks read the stream the sliced blocks before them write; drop --propagate")
    make_invariant(model)
    return SlicePlan(config, hidden_width(model), size)


@torch.no_grad()
def slicegpt_block(plan: SlicePlan, step) -> dict:
    """Rotate one block (see the module docstring); the next block's inputs and basis go on in the step.

    The carry holds the basis the block's input stream is in (``leaving`` of the block before), the
    embeddings' basis (``first``, applied in ``slicegpt_finish``: nothing reads the embeddings before)
    and the random orientation's generator, so a resumed run turns the next basis as an unbroken one."""
    carry, device = step.carry, step.device
    generator = torch.Generator().manual_seed(plan.config.seed)
    if step.index == 0:  # the stream the embeddings write: its basis comes from block 0's inputs
        entering = plan.basis(step, step.inputs, generator)
        carry["first"] = entering.vectors
        step.inputs = [project(x, entering.vectors, plan.size) for x in step.inputs]
    else:
        generator.set_state(carry["generator"])
        entering = Basis(carry["leaving"], float(carry["leaving_energy"]))
    block = step.block
    middle = plan.basis(step, _mlp_inputs(block, step.inputs, step.calls, device), generator)
    outputs = _outputs_with_sliced_middle(block, step.inputs, step.calls, device, middle.vectors, plan.size)
    leaving = plan.basis(step, outputs, generator)
    rotate_block(block, *(b.vectors.to(device) for b in (entering, middle, leaving)))
    # the next block runs unrotated on this stream sliced in the leaving basis: not what the rotated block computes
    step.accept([project(x, leaving.vectors, plan.size).to(step.offload) for x in outputs])
    carry["leaving"] = leaving.vectors
    carry["leaving_energy"] = torch.tensor(leaving.kept_energy, dtype=torch.float64)
    carry["generator"] = generator.get_state()
    return {"kept_energy": {"attention": entering.kept_energy, "mlp": middle.kept_energy}}


@torch.no_grad()
def slicegpt_finish(plan: SlicePlan, model, report: EngineReport) -> dict:
    """Rotate the embeddings and the head by the first and last bases, then slice everything to ``size``."""
    adapter = get_adapter(model)
    for embedding in adapter.embeddings():
        rotate_embedding(embedding, report.carry["first"].to(embedding.weight.device))
    head = adapter.lm_head()
    rotate_readers([head], report.carry["leaving"].to(head.weight.device))
    report.blocks.append({"block": "head", "kept_energy": {"head": float(report.carry["leaving_energy"])}})
    if plan.size < plan.width:
        slice_hidden(model, plan.size)
    return {"hidden_size": {"before": plan.width, "after": plan.size}}


def slicegpt_restore(plan: SlicePlan, block, report: dict) -> None:
    """A checkpointed block is rotated, not yet sliced (``finish`` slices): it only lacks its two shortcuts."""
    like = block.mlp.down.weight
    for part in SHORTCUTS:
        attach_shortcut(block, part, torch.zeros(plan.width, plan.width, dtype=like.dtype, device=like.device))


register(SliceGPTConfig, prepare=slicegpt_prepare, finish=slicegpt_finish, restore=slicegpt_restore)(slicegpt_block)


def rotate_and_slice(model, tokens: torch.Tensor, size: int, config: SliceGPTConfig, engine) -> EngineReport:
    """Make ``model`` invariant, rotate it block by block, slice its stream to ``size`` (``size`` = the
    width rotates without slicing: the function is unchanged, which is what the tests check)."""
    plan = invariant_plan(model, config, size, engine)
    report = run_sequential(
        model,
        partial(slicegpt_block, plan),
        tokens,
        engine,
        restore=partial(slicegpt_restore, plan),
    )
    slicegpt_finish(plan, model, report)
    return report


def _mlp_inputs(block, inputs, calls, device) -> list[torch.Tensor]:
    """The stream entering the MLP's norm (residual plus attention output), the MLP itself not run."""
    seen: list[torch.Tensor] = []

    def grab(module, args):
        seen.append(args[0])
        raise StopForward

    handle = norm_before(block, "mlp").register_forward_pre_hook(grab)
    try:
        for hidden, call in zip(inputs, calls, strict=True):
            with contextlib.suppress(StopForward):
                call_block(block.module, hidden, call, device)
    finally:
        handle.remove()
    return seen


def _outputs_with_sliced_middle(block, inputs, calls, device, middle: torch.Tensor, size: int) -> list[torch.Tensor]:
    """The block's outputs when its MLP reads (and its residual carries) the middle stream sliced to ``size``.

    The hook slices what the MLP's norm reads; the layer still adds the MLP's output to the unsliced
    middle stream, so that difference is swapped afterwards."""
    middles: list[tuple[torch.Tensor, torch.Tensor]] = []

    def slice_middle(module, args):
        sliced = project(args[0], middle, size)
        middles.append((args[0], sliced))
        return (sliced, *args[1:])

    handle = norm_before(block, "mlp").register_forward_pre_hook(slice_middle)
    outputs = []
    try:
        for hidden, call in zip(inputs, calls, strict=True):
            out = call_block(block.module, hidden, call, device)
            full, sliced = middles.pop()
            outputs.append(out - full.view_as(out) + sliced.view_as(out))  # OPT's layer flattens the tokens
    finally:
        handle.remove()
    return outputs

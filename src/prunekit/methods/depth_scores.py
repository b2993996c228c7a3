"""The importance of blocks and sub-layers, measured on calibration data: depth pruning's criteria.

A unit is ``(block, part)``: ``block`` is the block's index in the original model, ``part`` one of
``block``, ``attention``, ``mlp``. Lower scores are removed first.

- ``ppl`` (Shortened LLaMA): calibration perplexity with the unit left out. The network before a
  unit is the same with or without it, so one walk over the blocks keeps the current block's input
  and runs only the rest of the network from there for each unit: about N²/2 block forwards, not N².
- ``taylor`` (Shortened LLaMA's Taylor+; the "+" is the selection's protected blocks):
  Σ over the unit's linear weights of |W ⊙ ḡ|, ḡ the loss gradient averaged over the samples.
- ``magnitude``: Σ|W| over the unit's linear weights; a data-free baseline.
- ``block-influence`` (ShortGPT): 1 − cos(input, output), averaged over every token.
- ``angular`` (Gromov et al. 2024): arccos(cos(input, output)) / π at the last token of each sample,
  averaged; for blocks also between the input of block l and the output of block l + n − 1, which
  gives the best contiguous run of n blocks (``angular_runs``).

The data-driven criteria but Taylor (ppl, block-influence, angular) score in passes of the sequential
engine (``Context.sweep``): each block's step scores its units and reports them, so a pass is
checkpointed block by block and an interrupted run resumes (greedy runs make one pass per removal,
each in a checkpoint folder of its own). Taylor needs one backward pass through the whole model and
magnitude no data; both score outside the engine, in seconds.

For a sub-layer, input and output are the residual stream before and after it (the state between
attention and MLP is the block's output with its MLP left out). A sub-layer is left out by zeroing its
output projection, weight and bias: it then adds exactly zero to the residual stream, which is what
the removed model computes (Gemma 3's post-norms map zero to zero), and the adapter's view of the
block stays intact for the gradients. Blocks are left out by not running them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from prunekit.methods.gradients import accumulate_gradients
from prunekit.models import Block, get_adapter, linear_weight
from prunekit.sequential import BlockStep, EngineConfig, EngineReport, capture, run_sequential
from prunekit.surgery.depth import remove_blocks, remove_sublayer, sublayer_params

Unit = tuple[int, str]  # (original block index, "block" | "attention" | "mlp")


# -- the model being pruned ------------------------------------------------------------------------


class Network:
    """The model being depth-pruned and what has gone so far, in the original block indices.

    Blocks are removed for real as they go (``remove_blocks``); sub-layers are zeroed (see the module
    docstring) and replaced by stand-ins at the end (``finish``), since the adapter cannot view a
    block that lacks a part and the Taylor gradients need those views."""

    def __init__(self, model):
        self.model = model
        self.adapter = get_adapter(model)
        self.alive = list(range(self.adapter.num_blocks()))
        self.muted: list[Unit] = []

    @property
    def device(self) -> torch.device:
        return self.adapter.embeddings()[0].weight.device

    def view(self, block: int) -> Block:
        return self.adapter.block(self.alive.index(block))

    def params(self, unit: Unit) -> int:
        """Parameters that removing ``unit`` removes."""
        view = self.view(unit[0])
        if unit[1] == "block":
            return sum(p.numel() for p in view.module.parameters())
        return sublayer_params(view, unit[1])

    @contextlib.contextmanager
    def without(self, unit: Unit) -> Iterator[None]:
        """Leave a sub-layer out for the duration (no-op if it is out already)."""
        if unit in self.muted:
            yield
            return
        saved = _zero_output(self.view(unit[0]), unit[1])
        try:
            yield
        finally:
            with torch.no_grad():
                for tensor, value in saved:
                    tensor.copy_(value)

    def commit(self, units: list[Unit]) -> None:
        """Remove ``units`` for good: blocks at once, sub-layers zeroed until ``finish``."""
        blocks = [b for b, part in units if part == "block"]
        if blocks:
            remove_blocks(self.model, [self.alive.index(b) for b in blocks])
            self.alive = [b for b in self.alive if b not in blocks]
        for unit in units:
            if unit[1] != "block":
                _zero_output(self.view(unit[0]), unit[1])
                self.muted.append(unit)

    def finish(self) -> None:
        """Replace the zeroed sub-layers by stand-ins (``depth_surgery.remove_sublayer``)."""
        views = {b: self.view(b) for b, _ in self.muted}  # before any part of a block goes
        for block, part in self.muted:
            remove_sublayer(views[block], part)
        self.muted = []


def _zero_output(view: Block, part: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zero the sub-layer's output projection (weight and bias); returns what to copy back to undo it."""
    projection = view.attention.o if part == "attention" else view.mlp.down
    tensors = [t for t in (projection.weight, getattr(projection, "bias", None)) if t is not None]
    saved = [(t, t.detach().clone()) for t in tensors]
    with torch.no_grad():
        for t in tensors:
            t.zero_()
    return saved


# -- replaying blocks on calibration inputs --------------------------------------------------------


@dataclass
class Context:
    """What every criterion gets: the network, the calibration tokens, how to batch and checkpoint them."""

    network: Network
    tokens: torch.Tensor | None
    batch_size: int = 1
    progress: bool = True
    checkpoint_dir: Path | None = None  # each scoring pass checkpoints in a folder of its own under it
    fingerprint: str = ""  # the run's; each pass adds what it scores on which network
    passes: int = 0
    resumed: int = 0  # blocks restored from checkpoints, over every pass

    def replay(self) -> Replay:
        return Replay(self.network, self.tokens, self.batch_size)

    def sweep(self, score: Callable[[BlockStep], dict], what: str, units: list) -> EngineReport:
        """One pass of ``score`` over the network's blocks in the sequential engine, checkpointed.

        The blocks stay where they are (as ``Replay`` runs them) and change no weight, so the
        checkpoint keeps the scores, next inputs and carry only."""
        network = self.network
        folder = self.checkpoint_dir / f"depth-{self.passes:03d}" if self.checkpoint_dir is not None else None
        self.passes += 1
        device = str(network.device)
        engine = EngineConfig(None, device, self.batch_size, checkpoint_dir=folder, progress=self.progress)
        payload = [self.fingerprint, what, network.alive, network.muted, sorted(units)]
        fingerprint = hashlib.sha256(json.dumps(payload).encode()).hexdigest()
        report = run_sequential(network.model, score, self.tokens, engine, fingerprint=fingerprint, save_weights=False)
        self.resumed += report.resumed_from
        return report


def _scores(report: EngineReport) -> dict[Unit, float]:
    """The scores the blocks of a pass reported, as ``[block, part, score]`` lists (JSON keeps them exact)."""
    return {(block, part): score for r in report.blocks for block, part, score in r.get("scores", [])}


class Replay:
    """The network's blocks run on captured inputs: any run of blocks, from any block's input.

    ``sequential.capture`` records every block's call arguments (masks, position embeddings) without
    running a block, so each block here gets exactly what the model's own forward would give it."""

    def __init__(self, network: Network, tokens: torch.Tensor, batch_size: int):
        self.network = network
        device = network.device
        engine = EngineConfig(batch_size=batch_size, offload_device=str(device), progress=False)
        self.inputs, self.calls = capture(network.model, tokens, engine, device)
        self.labels = [t.to(device) for t in tokens.split(batch_size)]

    @torch.no_grad()
    def run(self, position: int, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        block = self.network.adapter.blocks()[position]
        outputs = []
        for h, calls in zip(hidden, self.calls, strict=True):
            args, kwargs = calls[position]
            out = block(h, *args, **kwargs)
            outputs.append(out[0] if isinstance(out, tuple) else out)
        return outputs

    @torch.no_grad()
    def nll(self, hidden: list[torch.Tensor], start: int) -> torch.Tensor:
        """Next-token loss of the blocks from ``start`` on, then the head, on ``hidden``: [sum, tokens] (float64)."""
        for position in range(start, len(self.network.alive)):
            hidden = self.run(position, hidden)
        total, count = 0.0, 0
        for h, labels in zip(hidden, self.labels, strict=True):
            logits = self.network.adapter.logits(h)[:, :-1].float()
            total += F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), reduction="sum").item()
            count += labels[:, 1:].numel()
        return torch.tensor([total, count], dtype=torch.float64)


def _means(step: BlockStep, sums: list[torch.Tensor]) -> list[float]:
    """Means from [sum, count] pairs measured on this process's samples, every process's sums and counts
    added first (``step.reduce``), so all processes rank alike."""
    if not sums:
        return []
    return [total / count for total, count in step.reduce(torch.stack(sums)).tolist()]


def _scored(units: list[Unit], means: list[float]) -> list[list]:
    """``[block, part, score]`` per unit, the form a block reports (JSON keeps it exact)."""
    return [[*unit, score] for unit, score in zip(units, means, strict=True)]


def _by_block(units: list[Unit]) -> dict[int, list[Unit]]:
    grouped: dict[int, list[Unit]] = {}
    for unit in units:
        grouped.setdefault(unit[0], []).append(unit)
    return grouped


# -- criteria --------------------------------------------------------------------------------------


def ppl_scores(ctx: Context, units: list[Unit]) -> dict[Unit, float]:
    """Calibration perplexity of the network without each unit (Shortened LLaMA's PPL; SLEB when greedy).

    Block p's step runs the rest of the network from its input: the engine keeps the walk, ``Replay``
    the rest, so the whole model stays in memory (no ``--lazy``)."""
    replay, network, grouped = ctx.replay(), ctx.network, _by_block(units)

    def score(step: BlockStep) -> dict:
        here, nlls = grouped.get(network.alive[step.index], []), []
        for unit in here:
            if unit[1] == "block":
                nlls.append(replay.nll(step.inputs, step.index + 1))
            else:
                with network.without(unit):
                    nlls.append(replay.nll(step.inputs, step.index))
        return {"scores": _scored(here, [math.exp(nll) for nll in _means(step, nlls)])}

    return _scores(ctx.sweep(score, "ppl", units))


def _sum_and_count(values: torch.Tensor) -> torch.Tensor:
    """[sum, count] of ``values`` on this process's tokens (float64): averaged once every process's are in."""
    return torch.tensor([float(values.sum()), values.numel()], dtype=torch.float64)


def _influence(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """1 − cos between two residual streams, averaged over every token (ShortGPT's Block Influence)."""
    cos = torch.cat([F.cosine_similarity(x.double(), y.double(), dim=-1).flatten() for x, y in zip(a, b, strict=True)])
    return _sum_and_count(1 - cos)


def _angle(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Angular distance arccos(cos) / π between rows of ``x`` and ``y``, to be averaged over the rows."""
    cos = F.cosine_similarity(x.double(), y.double(), dim=-1).clamp(-1, 1)
    return _sum_and_count(torch.arccos(cos) / math.pi)


def _angular(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """Angular distance at the last token of each sample (Gromov et al.: the causal model's summary)."""
    return _angle(torch.cat([x[:, -1] for x in a]), torch.cat([y[:, -1] for y in b]))


def _sweep(ctx: Context, units: list[Unit], measure: Callable, what: str) -> dict[Unit, float]:
    """The mean of ``measure(input, output)`` of every unit, from one pass over the blocks."""
    network, grouped = ctx.network, _by_block(units)

    def score(step: BlockStep) -> dict:
        block = network.alive[step.index]
        here = grouped.get(block, [])
        hidden, output = step.inputs, step.forward()
        step.accept(output)  # no weight changed: the next block's inputs
        if any(part != "block" for _, part in here):
            with network.without((block, "mlp")):
                middle = step.forward()  # the residual stream between attention and MLP
            ends = {"attention": (hidden, middle), "mlp": (middle, output)}
        pairs = {unit: (hidden, output) if unit[1] == "block" else ends[unit[1]] for unit in here}
        return {"scores": _scored(list(pairs), _means(step, [measure(*pair) for pair in pairs.values()]))}

    return _scores(ctx.sweep(score, what, units))


def block_influence_scores(ctx: Context, units: list[Unit]) -> dict[Unit, float]:
    return _sweep(ctx, units, _influence, "block-influence")


def angular_scores(ctx: Context, units: list[Unit]) -> dict[Unit, float]:
    return _sweep(ctx, units, _angular, "angular")


def _last_tokens(hidden: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([h[:, -1] for h in hidden])


def angular_runs(ctx: Context, blocks: list[int], longest: int) -> tuple[list[dict], dict[Unit, float]]:
    """For each run length n up to ``longest``: the start of the contiguous run of ``blocks`` whose
    input and output are nearest in angle (Gromov et al.), and that distance; and the distance of
    each single block. One forward pass: the last-token states of every block boundary ride in the carry,
    and each block reports the distances from every boundary before it to its output."""
    network = ctx.network

    def walk(step: BlockStep) -> dict:
        output = step.forward()
        step.accept(output)
        if "states" not in step.carry:  # block 0: the state entering the network
            step.carry["states"] = _last_tokens(step.inputs)[None]
        last = _last_tokens(output)
        states = step.carry["states"].to(last.device)  # a checkpoint's is on the CPU
        step.carry["states"] = torch.cat([states, last[None]])
        return {"angles": _means(step, [_angle(x, last) for x in states])}

    reports = ctx.sweep(walk, "angular-runs", [(b, "block") for b in blocks]).blocks

    def distance(start: int, end: int) -> float:  # between the states at two block boundaries
        return reports[end - 1]["angles"][start]

    allowed = {network.alive.index(b) for b in blocks}
    runs = []
    for n in range(1, longest + 1):
        starts = [p for p in range(len(network.alive) - n + 1) if all(p + k in allowed for k in range(n))]
        if not starts:
            break
        best = min(starts, key=lambda p: (distance(p, p + n), p))
        runs.append({"blocks": n, "start": network.alive[best], "score": distance(best, best + n)})
    singles = {(network.alive[p], "block"): distance(p, p + 1) for p in sorted(allowed)}
    return runs, singles


def _unit_linears(view: Block, part: str) -> list:
    if part == "block":
        return list(view.linears().values())
    if part == "attention":
        a = view.attention
        return [m for m in (a.q, a.k, a.v, a.qkv, a.o) if m is not None]
    m = view.mlp
    return [x for x in (m.gate, m.up, m.gate_up, m.down) if x is not None]


def taylor_scores(ctx: Context, units: list[Unit]) -> dict[Unit, float]:
    """Σ |W ⊙ ḡ| over each unit's linear weights (first-order Taylor estimate of the loss change)."""
    grads = accumulate_gradients(ctx.network.model, ctx.tokens, fisher=False, progress=ctx.progress).grad
    scores = {}
    for unit in units:
        linears = _unit_linears(ctx.network.view(unit[0]), unit[1])
        scores[unit] = sum(float((linear_weight(m).detach().float() * grads[m]).abs().sum()) for m in linears)
    return scores


def magnitude_scores(ctx: Context, units: list[Unit]) -> dict[Unit, float]:
    """Σ|W| over each unit's linear weights."""
    scores = {}
    for unit in units:
        linears = _unit_linears(ctx.network.view(unit[0]), unit[1])
        scores[unit] = sum(float(linear_weight(m).detach().float().abs().sum()) for m in linears)
    return scores


CRITERIA: dict[str, Callable[[Context, list[Unit]], dict[Unit, float]]] = {
    "ppl": ppl_scores,
    "taylor": taylor_scores,
    "magnitude": magnitude_scores,
    "block-influence": block_influence_scores,
    "angular": angular_scores,
}

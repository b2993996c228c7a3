"""The layer-by-layer calibration engine that every one-shot method runs in.

    capture the inputs of every block (hidden states of block 0, call arguments of each block)
    for each decoder block:
        onload it (from disk, for a lazy model) to ``device``
        METHOD(step): hooks + step.forward() to collect statistics, then score/decide/apply
        re-run the block to produce the next block's inputs (pruned outputs propagate by default)
        checkpoint it (weights, next inputs, carry), offload it

A method may replace the block's inputs before it runs them (``step.inputs``: SliceGPT projects the
stream onto its first basis), declare the next block's inputs itself (``step.accept``: SliceGPT's are
in coordinates the rotated block does not compute), and hand tensors to the next block's step
(``step.carry``: SliceGPT's basis, depth's angular states). The carry is checkpointed with the next
inputs, so a resumed run continues from exactly the state an uninterrupted one had.

Under several processes (``prunekit.distributed``) each runs this loop on its share of the calibration
samples; a method hands what its hooks collected to ``step.reduce`` before deciding on it, the one point
where statistics are summed over the processes, so every process prunes every block alike.

Capture replaces every block by a recorder that stores its call arguments and passes the hidden
states through untouched, so each block gets exactly the mask and position embeddings the model
would give it (Gemma 3's sliding-window layers get theirs, GPT-2's positional arguments stay
positional) without running any block. A ``StopForward`` ends the pass at the last block.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from prunekit.distributed import all_reduce_stats, world
from prunekit.errors import PrunekitError, StopForward
from prunekit.io.lazy import is_lazy, materialize, weight_source
from prunekit.models import Block, get_adapter
from prunekit.surgery.config import release

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
INPUTS_FILE = "inputs.safetensors"
CARRY_FILE = "carry.safetensors"


@dataclass
class EngineConfig:
    """How the engine runs. ``device`` computes; ``offload_device`` holds the activations between blocks.

    A block goes back where it was after its turn (or back to disk, for a lazy model)."""

    device: str | None = None  # None: the device of the model's embeddings
    offload_device: str = "cpu"
    batch_size: int = 1
    checkpoint_dir: Path | None = None
    propagate: str = "pruned"  # "pruned": the next block sees pruned outputs; "dense": the original ones
    progress: bool = True

    def __post_init__(self):
        if self.propagate not in ("pruned", "dense"):
            raise PrunekitError(f"--propagate must be 'pruned' or 'dense', got {self.propagate!r}")
        if self.batch_size < 1:
            raise PrunekitError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.checkpoint_dir is not None:
            self.checkpoint_dir = Path(self.checkpoint_dir)


@dataclass
class EngineReport:
    blocks: list[dict] = field(default_factory=list)  # what the method returned for each block
    resumed_from: int = 0  # blocks restored from a checkpoint instead of recomputed
    seconds: float = 0.0
    outputs: list[torch.Tensor] | None = None  # the last block's outputs, when asked for
    carry: dict[str, torch.Tensor] = field(default_factory=dict)  # what the last block's step handed on


class BlockStep:
    """What a method sees of one block: the adapter's view of it, its calibration inputs, the carry.

    ``inputs`` (per batch, on the offload device) and ``calls`` (the block's recorded call arguments per
    batch) are ``None`` without calibration data. A method may assign ``inputs`` before ``forward``;
    ``forward`` and the engine's re-run then use the new ones. ``carry`` comes from the previous block's
    step (empty at block 0); whatever the method leaves in it goes to the next one."""

    def __init__(self, block: Block, inputs, calls, device, offload, carry: dict[str, torch.Tensor]):
        self.block = block
        self.index = block.index
        self.inputs: list[torch.Tensor] | None = inputs
        self.calls: list[tuple] | None = calls
        self.device, self.offload = device, offload
        self.num_batches = len(calls or [])
        self.carry = carry
        self.accepted: list[torch.Tensor] | None = None

    @property
    def has_calibration(self) -> bool:
        return self.inputs is not None

    def forward(self) -> list[torch.Tensor]:
        """Run the block over all calibration inputs (the method's hooks see them); returns its outputs."""
        if self.inputs is None:
            raise PrunekitError("this method needs calibration data; pass --calib (e.g. c4)")
        return _run_block(self.block.module, self.inputs, self.calls, self.device, self.offload)

    def accept(self, outputs: list[torch.Tensor]) -> None:
        """Declare ``outputs`` the next block's inputs, so the engine need not re-run the block.

        Either the outputs of ``forward`` when the weights did not change after it, or what a method
        that changes the stream's coordinates computes itself (SliceGPT)."""
        self.accepted = outputs

    def reduce(self, stats):
        """Sum ``stats`` over the processes, in place, and return them: what the method's hooks collected on
        this process's share of the samples (a ``distributed.Statistic``, a tensor, or a dict or list of them)
        becomes what one process collects on all of them. Call it between collecting and deciding, in the
        same order on every process; in a single process it returns at once."""
        return all_reduce_stats(stats)


BlockFn = Callable[[BlockStep], dict | None]


# --- capture --------------------------------------------------------------------------------------


class _Recorder(nn.Module):
    """Stands in for a block during capture: records its call arguments, returns its input."""

    def __init__(self, index: int, last: int, sink: dict, first_inputs: list, offload):
        super().__init__()
        self.index, self.last, self.sink, self.first_inputs, self.offload = index, last, sink, first_inputs, offload

    def forward(self, hidden_states, *args, **kwargs):
        self.sink[self.index] = (args, kwargs)
        if self.index == 0:
            self.first_inputs.append(hidden_states.to(self.offload))
        if self.index == self.last:
            raise StopForward
        return hidden_states


def to_device(obj, device, memo: dict | None = None):
    """Move the tensors inside nested tuples/lists/dicts, moving a tensor shared by several places once."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.to(device)
        return memo[id(obj)]
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(x, device, memo) for x in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device, memo) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture(model, tokens: torch.Tensor, config: EngineConfig, device):
    """Block-0 hidden states per batch, and every block's call arguments per batch."""
    adapter = get_adapter(model)
    blocks = adapter.blocks()
    originals = list(blocks)
    home = adapter.embeddings()[0].weight.device
    first_inputs: list[torch.Tensor] = []
    calls: list[list] = []
    sink: dict[int, tuple] = {}
    try:
        for i in range(len(blocks)):
            blocks[i] = _Recorder(i, len(blocks) - 1, sink, first_inputs, config.offload_device)
        model.to(device)  # only the parts outside the blocks: the blocks are recorders now
        for batch in tokens.split(config.batch_size):
            sink.clear()
            with contextlib.suppress(StopForward):
                model(input_ids=batch.to(device), use_cache=False)
            memo: dict = {}
            calls.append([to_device(sink[i], config.offload_device, memo) for i in range(len(blocks))])
    finally:
        model.to(home)
        for i, block in enumerate(originals):
            blocks[i] = block
    return first_inputs, calls


# --- the loop -------------------------------------------------------------------------------------


def run_sequential(
    model,
    process: BlockFn,
    tokens: torch.Tensor | None,
    config: EngineConfig,
    fingerprint: str = "",
    keep_outputs: bool = False,
    read_only: bool = False,
    restore: Callable[[Block, dict], None] | None = None,
    save_weights: bool = True,
) -> EngineReport:
    """Run ``process`` on every decoder block in order (see the module docstring).

    ``tokens`` ([n, seqlen] calibration ids) may be ``None`` for methods that need no data.
    ``fingerprint`` identifies the run (method, config, data, model); a checkpoint written by a
    different run is refused instead of silently mixed in. ``read_only`` passes (statistics that
    change no weight, e.g. OWL's outlier census) neither need nor write a checkpoint. ``restore``
    reshapes a block to take its checkpoint when a method changes shapes (width pruning).
    ``save_weights=False`` checkpoints only the reports, next inputs and carry: for a pass that
    changes no weight but whose results are worth keeping (depth's scores).
    """
    start = time.perf_counter()
    adapter = get_adapter(model)
    blocks = adapter.blocks()
    device = torch.device(config.device) if config.device else adapter.embeddings()[0].weight.device
    lazy = is_lazy(model)
    if lazy and config.checkpoint_dir is None and not read_only and save_weights:
        raise PrunekitError("a lazily loaded model needs a checkpoint folder (--checkpoint-dir) for its blocks")
    use_checkpoint = config.checkpoint_dir is not None and not read_only
    checkpoint = _Checkpoint(config.checkpoint_dir, fingerprint, len(blocks)) if use_checkpoint else None
    report = EngineReport()

    inputs, calls = (None, None)
    if tokens is not None:
        inputs, calls = capture(model, tokens, config, device)

    carry: dict[str, torch.Tensor] = {}
    done = checkpoint.done if checkpoint else 0
    if checkpoint:
        _check_processes_agree(done, len(blocks), checkpoint.folder)
    if done:
        log.info("resuming after block %d from %s", done - 1, checkpoint.folder)
        for i in range(done):
            if restore is not None:
                restore(adapter.block(i), checkpoint.reports[i])
            if save_weights:
                checkpoint.restore_block(model, adapter, i, lazy)
        report.blocks = list(checkpoint.reports)
        if inputs is not None:
            inputs = checkpoint.load_inputs()
        carry = checkpoint.load_carry()
        report.resumed_from = done

    bar = tqdm(
        range(done, len(blocks)),
        desc="blocks",
        unit="block",
        disable=not (config.progress and world().main),
        initial=done,
        total=len(blocks),
    )
    for i in bar:
        block_module = blocks[i]
        home = next(block_module.parameters()).device
        if lazy:
            materialize(model, f"{adapter.blocks_path}.{i}", block_module, device)
        block_module.to(device)
        block_calls = [c[i] for c in calls] if calls is not None else None
        step = BlockStep(adapter.block(i), inputs, block_calls, device, config.offload_device, carry)
        dense = step.forward() if (inputs is not None and config.propagate == "dense") else None
        result = process(step) or {}
        outputs = dense if dense is not None else step.accepted
        if inputs is not None and outputs is None:
            outputs = step.forward()  # the pruned block, on the inputs the method may have replaced
        carry = step.carry
        report.blocks.append({"block": i, **result})
        if checkpoint:
            checkpoint.save_block(model, adapter, i, outputs, carry, report.blocks, lazy, save_weights)
        if lazy:
            release(block_module)
        else:
            block_module.to(home)
        inputs = outputs
    report.outputs = inputs if keep_outputs else None
    report.carry = carry
    report.seconds = time.perf_counter() - start
    return report


def _check_processes_agree(done: int, num_blocks: int, folder: Path) -> None:
    """Every process resumes after the same block, or none does (a process stopped while another was saving)."""
    if world().size == 1:
        return
    stopped = torch.zeros(num_blocks + 1, dtype=torch.int64)
    stopped[done] = 1
    all_reduce_stats(stopped)  # how many processes stopped after each block
    if int(stopped[done]) != world().size:
        after = [b for b in range(num_blocks + 1) if stopped[b]]
        raise PrunekitError(
            f"the processes' checkpoints under {folder.parent} stopped after different numbers of blocks ({after}); "
            "delete the checkpoint folder to start again"
        )


@torch.no_grad()
def _run_block(module, inputs, calls, device, offload) -> list[torch.Tensor]:
    return [call_block(module, hidden, call, device).to(offload) for hidden, call in zip(inputs, calls, strict=True)]


def call_block(module, hidden: torch.Tensor, call: tuple, device) -> torch.Tensor:
    """One block on one batch, with the call arguments ``capture`` recorded for it; its hidden states out."""
    args, kwargs = call
    memo: dict = {}
    out = module(hidden.to(device), *to_device(args, device, memo), **to_device(kwargs, device, memo))
    return out[0] if isinstance(out, tuple) else out


# --- checkpoints ----------------------------------------------------------------------------------


class _Checkpoint:
    """A folder with one safetensors file per finished block, the next block's inputs, and state.json."""

    def __init__(self, folder: Path, fingerprint: str, num_blocks: int):
        self.folder = folder
        self.fingerprint = fingerprint
        self.done = 0
        self.reports: list[dict] = []
        state_path = folder / STATE_FILE
        if state_path.exists():
            state = json.loads(state_path.read_text())
            if state.get("fingerprint") != fingerprint or state.get("num_blocks") != num_blocks:
                raise PrunekitError(
                    f"checkpoint {folder} belongs to a different run (model, method or data changed); "
                    "delete it or pass another --checkpoint-dir"
                )
            self.done, self.reports = state["done"], state["reports"]
        folder.mkdir(parents=True, exist_ok=True)

    def block_file(self, index: int) -> Path:
        return self.folder / f"block_{index:05d}.safetensors"

    def save_block(self, model, adapter, index, outputs, carry, reports, lazy, save_weights=True) -> None:
        if save_weights:
            prefix = f"{adapter.blocks_path}.{index}."
            module = adapter.blocks()[index]
            tensors = {prefix + k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
            _atomic_save(tensors, self.block_file(index))
            if lazy:
                weight_source(model).redirect(list(tensors), self.block_file(index))
        if outputs is not None:
            _atomic_save({f"batch_{b}": h.contiguous() for b, h in enumerate(outputs)}, self.folder / INPUTS_FILE)
        # always written (empty too), so a carry never outlives the block that handed it on
        _atomic_save({k: v.detach().to("cpu").contiguous() for k, v in carry.items()}, self.folder / CARRY_FILE)
        state = {
            "fingerprint": self.fingerprint,
            "num_blocks": len(adapter.blocks()),
            "done": index + 1,
            "reports": reports,
        }
        _atomic_write_text(self.folder / STATE_FILE, json.dumps(state, indent=1))

    def restore_block(self, model, adapter, index, lazy) -> None:
        file = self.block_file(index)
        if lazy:
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as handle:
                weight_source(model).redirect(list(handle.keys()), file)
            return
        prefix = f"{adapter.blocks_path}.{index}."
        state = {k.removeprefix(prefix): v for k, v in load_file(str(file)).items()}
        adapter.blocks()[index].load_state_dict(state)

    def load_inputs(self) -> list[torch.Tensor]:
        tensors = load_file(str(self.folder / INPUTS_FILE))
        return [tensors[f"batch_{b}"] for b in range(len(tensors))]

    def load_carry(self) -> dict[str, torch.Tensor]:
        file = self.folder / CARRY_FILE
        return dict(load_file(str(file))) if file.exists() else {}


def _atomic_save(tensors: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@torch.no_grad()
def sequential_logits(model, tokens: torch.Tensor, config: EngineConfig) -> torch.Tensor:
    """Logits computed block by block (a lazy model never has more than one block in memory)."""
    adapter = get_adapter(model)
    report = run_sequential(model, lambda step: None, tokens, config, keep_outputs=True, read_only=True)
    head_device = adapter.lm_head().weight.device
    return torch.cat([adapter.logits(h.to(head_device)).to(config.offload_device) for h in report.outputs])

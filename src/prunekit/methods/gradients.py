"""Gradients of the LM loss for LLM-Pruner's Taylor importance, one calibration sample at a time.

The loss of the whole model must be differentiated, so this cannot run block by block like the
other methods. Memory: the model, one fp32 gradient per decoder-block linear weight (the model's
linear weights again, in fp32), and the activations of one sample's forward and backward. The
second-order variants also keep the per-sample Fisher diagonal and the running mean gradient (two
more copies). Only the block linears require gradients, so embeddings and the head need none.
For SmolLM2-135M at 512 tokens that is about 1 GiB on top of the model (first order).

Under several processes each differentiates its share of the samples and the means are summed over the
processes here, at the end of the pass (the whole-model counterpart of ``BlockStep.reduce``), so the
importance computed from them is the same in every process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.distributed import all_reduce_stats, world
from prunekit.models import get_adapter, is_conv1d


@dataclass
class Gradients:
    """Per linear module: the mean gradient over the samples and, if asked, the Fisher diagonal.

    Both are [out_features, in_features], the ``linear_weight`` layout (GPT-2's Conv1D transposed)."""

    grad: dict[nn.Module, torch.Tensor]
    fisher: dict[nn.Module, torch.Tensor] | None
    samples: int = 0  # the means are over this many samples

    def _means(self) -> list[torch.Tensor]:
        return [*self.grad.values(), *(self.fisher or {}).values()]

    def partial_sums(self) -> dict[str, torch.Tensor]:
        # means over unequal shares are summed as mean x samples; scaled in place, they are the size of the model
        sums = {str(i): g.mul_(self.samples) for i, g in enumerate(self._means())}
        return {**sums, "samples": torch.tensor(self.samples, dtype=torch.int64)}

    def set_totals(self, totals: dict[str, torch.Tensor]) -> None:
        self.samples = int(totals["samples"])
        for i, g in enumerate(self._means()):
            g.copy_(totals[str(i)]).div_(self.samples)


def _out_in(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    return tensor.t() if is_conv1d(module) else tensor


def block_linears(model) -> list[nn.Module]:
    adapter = get_adapter(model)
    return [m for i in range(adapter.num_blocks()) for m in adapter.block(i).linears().values()]


def accumulate_gradients(model, tokens: torch.Tensor, fisher: bool, progress: bool = True) -> Gradients:
    """Gradient of the mean loss over ``tokens`` (one loss and backward per sample) and the Fisher diagonal;
    over every process's ``tokens`` when several run.

    The model's ``requires_grad`` flags and gradients are restored afterwards."""
    linears = block_linears(model)
    flags = {p: p.requires_grad for p in model.parameters()}
    device = next(model.parameters()).device
    n = len(tokens)
    mean = {m: torch.zeros_like(m.weight, dtype=torch.float32) for m in linears} if fisher else None
    diag = {m: torch.zeros_like(m.weight, dtype=torch.float32) for m in linears} if fisher else None
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for m in linears:
            m.weight.requires_grad_(True)
        for sample in tqdm(tokens.split(1), desc="gradients", unit="sample", disable=not (progress and world().main)):
            sample = sample.to(device)
            loss = model(input_ids=sample, labels=sample, use_cache=False).loss
            if not fisher:
                (loss / n).backward()  # .grad accumulates the mean gradient
                continue
            loss.backward()
            for m in linears:
                g = m.weight.grad.float()
                mean[m] += g / n
                diag[m] += g * g / n
                m.weight.grad = None
        grads = mean if fisher else {m: m.weight.grad.float() for m in linears}
        gradients = Gradients(
            {m: _out_in(m, g) for m, g in grads.items()},
            {m: _out_in(m, f) for m, f in diag.items()} if fisher else None,
            n,
        )
        return all_reduce_stats(gradients)
    finally:
        for p, flag in flags.items():
            p.grad = None
            p.requires_grad_(flag)

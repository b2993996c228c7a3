"""Statistics of the inputs of linear layers, collected by forward pre-hooks during calibration.

Each is a ``prunekit.distributed.Statistic``: it declares its additive parts (``partial_sums``), which the
engine sums over the processes of a multi-process run (``BlockStep.reduce``) before the method reads them.
Sums that a method compares element by element (Wanda's norms) are kept in float64, so that a few
processes' partial sums round to one process's sum in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


def flat_inputs(x: torch.Tensor) -> torch.Tensor:
    """[..., in_features] -> [tokens, in_features] (calibration windows carry no padding)."""
    return x.reshape(-1, x.shape[-1])


def _count(tokens: int) -> torch.Tensor:
    return torch.tensor(tokens, dtype=torch.int64)


class InputNorms:
    """Squared L2 norm of each input feature over all calibration tokens, accumulated in float64 (so the
    processes' partial sums add up to one process's sum: the same norms in float32, the same Wanda masks)."""

    def __init__(self, features: int, device):
        self.squares = torch.zeros(features, dtype=torch.float64, device=device)
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        x = flat_inputs(x).double()
        self.squares += (x * x).sum(0)
        self.tokens += x.shape[0]

    def norms(self) -> torch.Tensor:
        return self.squares.sqrt().float()

    def partial_sums(self) -> dict[str, torch.Tensor]:
        return {"squares": self.squares, "tokens": _count(self.tokens)}

    def set_totals(self, totals: dict[str, torch.Tensor]) -> None:
        self.squares, self.tokens = totals["squares"], int(totals["tokens"])


class InputMoments:
    """Per-feature sum and sum of squares over the calibration tokens, in float64 (means, variances, norms)."""

    def __init__(self, features: int, device):
        self.sums = torch.zeros(features, dtype=torch.float64, device=device)
        self.squares = torch.zeros(features, dtype=torch.float64, device=device)
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        x = flat_inputs(x).double()
        self.sums += x.sum(0)
        self.squares += (x * x).sum(0)
        self.tokens += x.shape[0]

    def norms(self) -> torch.Tensor:
        return self.squares.sqrt().float()

    def mean(self) -> torch.Tensor:
        return (self.sums / max(self.tokens, 1)).float()

    def variance(self) -> torch.Tensor:
        """The unbiased sample variance (FLAP's fluctuation), clamped at 0 against rounding."""
        n = max(self.tokens, 2)
        return ((self.squares - self.sums**2 / n) / (n - 1)).clamp_min(0).float()

    def partial_sums(self) -> dict[str, torch.Tensor]:
        return {"sums": self.sums, "squares": self.squares, "tokens": _count(self.tokens)}

    def set_totals(self, totals: dict[str, torch.Tensor]) -> None:
        self.sums, self.squares, self.tokens = totals["sums"], totals["squares"], int(totals["tokens"])


class Hessian:
    """SparseGPT's H = 2/n * sum x x^T over the calibration tokens, kept as a running mean."""

    def __init__(self, features: int, device, dtype: torch.dtype = torch.float32):
        self.matrix = torch.zeros(features, features, dtype=dtype, device=device)
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        x = flat_inputs(x).to(self.matrix.dtype)
        new = x.shape[0]
        self.matrix *= self.tokens / (self.tokens + new)
        self.tokens += new
        x = x * (2.0 / self.tokens) ** 0.5
        self.matrix += x.t() @ x

    def partial_sums(self) -> dict[str, torch.Tensor]:
        # a mean over shares of unequal size is summed as mean x count (to the rounding of the Hessian's dtype)
        return {"weighted": self.matrix * self.tokens, "tokens": _count(self.tokens)}

    def set_totals(self, totals: dict[str, torch.Tensor]) -> None:
        self.tokens = int(totals["tokens"])
        self.matrix = totals["weighted"] / max(self.tokens, 1)


@contextmanager
def on_inputs(linears: dict[str, nn.Module], fn: Callable[[str, nn.Module, torch.Tensor], None]) -> Iterator[None]:
    """Call ``fn(name, linear, input)`` before each forward of each linear; hooks removed on exit."""
    handles = [
        linear.register_forward_pre_hook(lambda module, args, name=name: fn(name, module, args[0]))
        for name, linear in linears.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def on_outputs(modules: dict[str, nn.Module], fn: Callable[[str, nn.Module, torch.Tensor], None]) -> Iterator[None]:
    """Call ``fn(name, module, output)`` after each forward of each module; hooks removed on exit."""
    handles = [
        module.register_forward_hook(lambda module, args, output, name=name: fn(name, module, output))
        for name, module in modules.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """Wanda's score: |W| scaled by the L2 norm of each input feature, [out, in] * [in] (OWL ranks blocks by it too)."""
    return weight.detach().abs().float() * input_norms.float().unsqueeze(0)

"""Pure mask functions shared by the unstructured methods. A mask is True where a weight is kept.

Every function removes an exact count: ties are broken by position (stable sorts), which matters
for checkpoints whose weights went through low-bit quantization and tie often.
"""

from __future__ import annotations

import torch

from prunekit.errors import PrunekitError


def parse_nm(text: str | None) -> tuple[int, int] | None:
    """``"2:4"`` -> ``(2, 4)``: prune N of every M consecutive weights of a row.

    This is the convention of the Wanda and SparseGPT code (``prune_n`` of ``prune_m``); for the
    patterns hardware accelerates, 2:4 and 4:8, it is also NVIDIA's "N non-zeros of M".
    """
    if text is None:
        return None
    try:
        n, m = (int(part) for part in text.split(":"))
    except ValueError:
        raise PrunekitError(f"--nm must look like 2:4 (prune N of every M weights), got {text!r}") from None
    if not 0 < n < m:
        raise PrunekitError(f"--nm {text}: N must be at least 1 and smaller than M (e.g. 2:4, 4:8)")
    return n, m


def matrix_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Remove the ``round(sparsity * numel)`` lowest scores of the whole matrix."""
    n_prune = round(sparsity * scores.numel())
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if n_prune:
        order = torch.argsort(scores.flatten().float(), stable=True)
        mask[order[:n_prune]] = False
    return mask.view_as(scores)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Remove the ``round(sparsity * columns)`` lowest scores of every row (Wanda's comparison group)."""
    n_prune = round(sparsity * scores.shape[1])
    mask = torch.ones_like(scores, dtype=torch.bool)
    if n_prune:
        order = torch.argsort(scores.float(), dim=1, stable=True)
        mask.scatter_(1, order[:, :n_prune], False)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Remove the ``n`` lowest scores in every group of ``m`` consecutive columns of each row."""
    rows, cols = scores.shape
    if cols % m:
        raise PrunekitError(f"N:M sparsity needs the input size ({cols}) to be a multiple of M={m}")
    groups = scores.float().reshape(rows, cols // m, m)
    order = torch.argsort(groups, dim=2, stable=True)
    mask = torch.ones_like(groups, dtype=torch.bool)
    mask.scatter_(2, order[:, :, :n], False)
    return mask.reshape(rows, cols)


def sparsity_of(weight: torch.Tensor) -> float:
    return (weight == 0).sum().item() / weight.numel()

"""The one place that slices a linear layer: ``nn.Linear`` and GPT-2's ``Conv1D`` alike.

``nn.Linear`` stores its weight as [out, in] and keeps ``in_features``/``out_features`` only as
metadata; transformers' ``Conv1D`` stores [in, out] and shapes its output with ``nf``, so that
attribute must follow the weight. Width, depth and hidden-size surgery all slice through here.
"""

from __future__ import annotations

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models import is_conv1d, linear_weight


class SurgeryError(PrunekitError, ValueError):
    """An edit the model (or its config) cannot express. A ``ValueError`` too, for library callers."""


def as_index(keep, size: int, what: str, device: torch.device) -> torch.Tensor:
    """``keep`` (indices or a boolean mask of length ``size``) as a LongTensor, range-checked."""
    keep = torch.as_tensor(keep, device=device)
    if keep.dtype == torch.bool:
        if keep.shape != (size,):
            raise SurgeryError(f"{what}: a boolean mask must have shape ({size},), got {tuple(keep.shape)}")
        return keep.nonzero().flatten()
    keep = keep.long().flatten()
    if keep.numel() and (keep.min() < 0 or keep.max() >= size):
        raise SurgeryError(f"{what}: indices must lie in [0, {size}), got min {keep.min()} max {keep.max()}")
    return keep


def sorted_unique(keep, size: int, what: str) -> torch.Tensor:
    """Channels to keep, sorted, without duplicates, at least one."""
    keep = as_index(keep, size, what, torch.device("cpu"))
    if keep.numel() == 0:
        raise SurgeryError(f"{what}: nothing would be kept; keep at least one")
    if keep.unique().numel() != keep.numel():
        raise SurgeryError(f"{what}: duplicate indices in {keep.tolist()}")
    return keep.sort().values


def replace_parameter(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Swap a Parameter for a new one holding ``value`` (same dtype and device; same requires_grad)."""
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


@torch.no_grad()
def slice_rows(linear: nn.Module, keep) -> None:
    """Keep only the output features ``keep`` (in that order) of an ``nn.Linear`` or ``Conv1D``.

    Output features are rows of an ``nn.Linear`` weight [out, in] and columns of a ``Conv1D``
    weight [in, out]; the bias (indexed by output) follows in both.
    """
    conv = is_conv1d(linear)
    if not conv and not isinstance(linear, nn.Linear):
        raise TypeError(f"{type(linear).__name__} is not a linear layer")
    out_features = linear.weight.shape[1] if conv else linear.weight.shape[0]
    keep = as_index(keep, out_features, "slice_rows", linear.weight.device)
    replace_parameter(linear, "weight", linear.weight.index_select(1 if conv else 0, keep))
    if linear.bias is not None:
        replace_parameter(linear, "bias", linear.bias.index_select(0, keep))
    if conv:
        linear.nf = keep.numel()  # Conv1D.forward shapes its output with nf
    else:
        linear.out_features = keep.numel()


@torch.no_grad()
def slice_columns(linear: nn.Module, keep) -> None:
    """Keep only the input features ``keep`` (in that order) of an ``nn.Linear`` or ``Conv1D``; bias unchanged."""
    conv = is_conv1d(linear)
    if not conv and not isinstance(linear, nn.Linear):
        raise TypeError(f"{type(linear).__name__} is not a linear layer")
    in_features = linear.weight.shape[0] if conv else linear.weight.shape[1]
    keep = as_index(keep, in_features, "slice_columns", linear.weight.device)
    replace_parameter(linear, "weight", linear.weight.index_select(0 if conv else 1, keep))
    if conv:
        linear.nx = keep.numel()
    else:
        linear.in_features = keep.numel()


def out_features(linear: nn.Module) -> int:
    return linear_weight(linear).shape[0]


def in_features(linear: nn.Module) -> int:
    return linear_weight(linear).shape[1]


def owner_of(root: nn.Module, child: nn.Module) -> nn.Module:
    """The module that holds ``child`` as a direct attribute (the attention or MLP module)."""
    for module in root.modules():
        if any(c is child for c in module.children()):
            return module
    raise LookupError(f"{type(child).__name__} is not inside {type(root).__name__}")


def add_output_bias(linear: nn.Module, delta: torch.Tensor) -> None:
    """Add ``delta`` to the linear's output bias, creating the bias if it has none (FLAP's compensation)."""
    delta = delta.to(dtype=linear_weight(linear).dtype, device=linear_weight(linear).device)
    if getattr(linear, "bias", None) is None:
        linear.bias = nn.Parameter(delta.clone(), requires_grad=linear_weight(linear).requires_grad)
    else:
        with torch.no_grad():
            linear.bias += delta


# Leading slices by ``narrow``: they need no index values, so loaders reshape meta models with them.


def narrow_parameter(param: nn.Parameter, dim: int, size: int) -> nn.Parameter:
    return nn.Parameter(param.detach().narrow(dim, 0, size).clone(), requires_grad=param.requires_grad)


def keep_leading_inputs(linear: nn.Module, size: int) -> None:
    """Keep the first ``size`` input features (works on meta weights)."""
    conv = is_conv1d(linear)
    linear.weight = narrow_parameter(linear.weight, 0 if conv else 1, size)
    if conv:
        linear.nx = size
    else:
        linear.in_features = size


def keep_leading_outputs(linear: nn.Module, size: int) -> None:
    """Keep the first ``size`` output features and their bias (works on meta weights)."""
    conv = is_conv1d(linear)
    linear.weight = narrow_parameter(linear.weight, 1 if conv else 0, size)
    if linear.bias is not None:
        linear.bias = narrow_parameter(linear.bias, 0, size)
    if conv:
        linear.nf = size
    else:
        linear.out_features = size

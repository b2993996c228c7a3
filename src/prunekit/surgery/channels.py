"""Hidden-size surgery (Minitron's embedding channels): delete channels of the residual stream from every module
that touches it, so the model computes exactly what it computed with those channels zeroed, and its config says
the smaller ``hidden_size``.

*Masking* a channel means zeroing it where the stream is written: its embedding column and its row (and bias) of
every o / down projection. Nothing then ever puts anything in it, every norm outputs 0 there, and no reader
gets anything from it. *Deleting* it (``prunekit.surgery.hidden.stream`` lists what to cut) changes one thing:
an RMSNorm divides by the root mean square over all the channels it sees, ``d`` before and ``d'`` after. With
``S`` the sum of squares over the kept channels (the masked ones add nothing to it):

    masked:   y_i = g_i  x_i / sqrt(S / d  + eps)
    deleted:  y_i = g'_i x_i / sqrt(S / d' + eps')

Put ``g' = g sqrt(d / d')`` and ``eps' = eps d / d'``: ``g sqrt(d/d') / sqrt(S/d' + eps d/d')`` is
``g / sqrt((d'/d) (S/d' + eps d/d'))`` = ``g / sqrt(S/d + eps)``, the masked output for every input. So
every norm over the stream (Gemma 3's sandwich norms too: they normalise o / down outputs whose deleted rows
were zero) has its gain scaled by ``sqrt(d/d')`` and the config's ``rms_norm_eps`` grows by ``d/d'``.

That epsilon is one config value, also read by the q/k norms inside attention (Qwen3, Gemma 3), whose
width (``head_dim``) does not change. Feeding them ``c = sqrt(d/d')`` times larger q and k (their rows and
biases scaled) undoes it: ``c q / sqrt(c² ms + eps d/d')`` = ``q / sqrt(ms + eps)``.

Gemma 3 multiplies the embeddings by ``sqrt(hidden_size)``, which a reload computes from the new config;
the embedding weights are scaled by ``sqrt(d/d')`` so the stream itself is unchanged, and a tied head
(which gets the same factor) is compensated in the final norm's gain.

LayerNorm (OPT, GPT-2) subtracts the mean over all channels: the masked model centres each kept channel by
``sum/d``, the deleted one by ``sum/d'``, a shift no weight can undo for every input (and the masked
channels come out of the norm as ``-mean/std`` times their gain, not 0). Those families are refused.
"""

from __future__ import annotations

import copy
import json
import math

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models import get_adapter, linear_weight
from prunekit.surgery.config import base_config, module_shapes, reference_shapes
from prunekit.surgery.hidden import describe_hidden, hidden_width, norm_eps, set_norm_eps, stream
from prunekit.surgery.linear import SurgeryError, replace_parameter, slice_columns, slice_rows, sorted_unique

QK_NORMS = {"q_norm": "q", "k_norm": "k"}  # a q/k norm inside attention, and the projection that feeds it


def rms_correction(width: int, kept: int) -> tuple[float, float]:
    """(gain factor, epsilon factor) that make an RMSNorm over ``kept`` channels equal one over ``width`` whose
    other channels are zero (see the module docstring): ``sqrt(width / kept)`` and ``width / kept``."""
    return math.sqrt(width / kept), width / kept


def removal_problem(model: nn.Module) -> str | None:
    """Why deleting residual channels cannot keep this model's function; ``None`` when it can."""
    if describe_hidden(model) is not None:
        return "its residual stream was rotated and sliced by SliceGPT (its norms divide by the original width)"
    parts = stream(model)
    if any(isinstance(norm, nn.LayerNorm) for norm in parts.norms):
        return (
            "its LayerNorms subtract the mean over all channels, so deleting channels shifts every kept one by a "
            "different mean than zeroing them does; no rescaling makes that exact (RMSNorm families only)"
        )
    if not hasattr(base_config(model.config), "rms_norm_eps"):
        return "its config has no rms_norm_eps to carry the corrected norm epsilon"
    qk = get_adapter(model).block(0).attention.extra_norms
    if set(qk) - set(QK_NORMS):
        return f"its attention has norms {sorted(qk)}, of which only q_norm / k_norm are understood"
    return None


def check_removable(model: nn.Module) -> None:
    problem = removal_problem(model)
    if problem:
        raise PrunekitError(
            f"hidden-size pruning cannot keep this {get_adapter(model).family} model's function: {problem}"
        )


@torch.no_grad()
def remove_hidden_channels(model: nn.Module, keep) -> dict:
    """Keep only the residual channels ``keep`` (indices or a boolean mask over ``hidden_size``), in place.

    The result computes what ``model`` computed with the other channels zeroed (to rounding), its config
    says the new ``hidden_size`` (``head_dim`` explicit, ``rms_norm_eps`` corrected), and a tied head stays
    tied. Returns the config values written."""
    check_removable(model)
    adapter = get_adapter(model)
    width = hidden_width(model)
    keep = sorted_unique(keep, width, "hidden channels")
    kept = keep.numel()
    reloaded, values = _config_at(model, kept)
    if reloaded is None:  # before anything is cut
        raise PrunekitError(f"this model's config cannot describe a hidden size of {kept}: {values}")
    before = _mismatches(model, model.config)  # e.g. per-block widths a shape manifest carries: not ours
    parts = stream(model)
    tied = parts.head.weight is parts.embeddings[0].weight
    embedding_factor = adapter.embedding_scale(width) / adapter.embedding_scale(kept)
    for embedding in parts.embeddings:
        _scale_and_keep(embedding, 1, keep, embedding_factor)
        embedding.embedding_dim = kept
    for linear in parts.readers + ([] if tied else [parts.head]):
        slice_columns(linear, keep)
    for linear in parts.writers:
        slice_rows(linear, keep)
    if tied:  # the head is the embedding matrix: it read the stream, now it reads it embedding_factor larger
        parts.head.weight = parts.embeddings[0].weight
        parts.head.in_features = kept
    gain, eps_factor = rms_correction(width, kept)
    for norm in parts.norms:
        head_factor = embedding_factor if (tied and norm is parts.norms[-1]) else 1.0
        _correct_norm(norm, keep, gain / head_factor, eps_factor, adapter.norm_gain_offset)
    _correct_qk_norms(model, gain, eps_factor)
    _write_config(model, reloaded, values, before)
    adapter.rebuild_embedding_scale()
    return values


def _scale_and_keep(module: nn.Module, dim: int, keep: torch.Tensor, factor: float) -> None:
    weight = module.weight.index_select(dim, keep.to(module.weight.device))
    replace_parameter(module, "weight", (weight.double() * factor).to(weight.dtype) if factor != 1 else weight)


def _correct_norm(norm: nn.Module, keep: torch.Tensor, factor: float, eps_factor: float, offset: float) -> None:
    """Slice a norm to ``keep``; multiply its gain ``offset + weight`` by ``factor``, its eps by ``eps_factor``."""
    weight = norm.weight.index_select(0, keep.to(norm.weight.device))
    replace_parameter(norm, "weight", ((offset + weight.double()) * factor - offset).to(weight.dtype))
    set_norm_eps(norm, norm_eps(norm) * eps_factor)


def _correct_qk_norms(model: nn.Module, gain: float, eps_factor: float) -> None:
    """The q/k norms share the config's eps: give them ``gain`` times larger inputs (see the module docstring)."""
    adapter = get_adapter(model)
    for i in range(adapter.num_blocks()):
        attention = adapter.block(i).attention
        for name, norm in attention.extra_norms.items():
            linear = getattr(attention, QK_NORMS[name])
            linear_weight(linear).mul_(gain)
            if linear.bias is not None:
                linear.bias.mul_(gain)
            set_norm_eps(norm, norm_eps(norm) * eps_factor)


def _mismatches(model: nn.Module, config) -> set[str]:
    """Names of the parameters and buffers whose shapes differ from those of a model built from ``config``."""
    ours, theirs = module_shapes(model), reference_shapes(model, config)
    return {name for name in ours.keys() | theirs.keys() if ours.get(name) != theirs.get(name)}


def width_problem(model: nn.Module, kept: int) -> str | None:
    """Why the model's config cannot say ``kept`` hidden channels (``None`` when it can), e.g. Llama's and
    Gemma 3's configs insist on a multiple of the head count even with ``head_dim`` explicit."""
    reloaded, why = _config_at(model, kept)
    return None if reloaded is not None else why


def _config_at(model: nn.Module, kept: int) -> tuple[object, dict | str]:
    """(the config at ``kept`` channels as a save and reload gives it back, the values to write), or (None, why not).

    ``head_dim`` is written explicitly: families that derive it from ``hidden_size // num_attention_heads``
    would otherwise build heads of another size."""
    config = base_config(model.config)
    _, eps_factor = rms_correction(hidden_width(model), kept)
    head_dim = get_adapter(model).block(0).attention.head_dim
    values = {"hidden_size": kept, "head_dim": head_dim, "rms_norm_eps": config.rms_norm_eps * eps_factor}
    candidate = copy.deepcopy(config)
    for key, value in values.items():
        setattr(candidate, key, value)
    try:
        reloaded = type(candidate).from_dict(json.loads(candidate.to_json_string()))
    except Exception as err:  # config validators raise ValueError, huggingface_hub's strict ones a bare Exception
        return None, f"{type(config).__name__} refuses it: {str(err.__cause__ or err).strip().splitlines()[-1]}"
    lost = [key for key in values if getattr(reloaded, key, None) != values[key]]
    if lost:
        return None, f"{type(config).__name__} does not keep {', '.join(lost)} through a save and reload"
    return reloaded, values


def _write_config(model: nn.Module, reloaded, values: dict, before: set[str]) -> None:
    """Write ``values`` into the config, once ``reloaded`` (its JSON round trip) is proven to build the cut model."""
    new = _mismatches(model, reloaded) - before
    if new:
        raise SurgeryError(f"the config at hidden size {values['hidden_size']} builds other shapes: {sorted(new)[:3]}")
    config = base_config(model.config)
    for key, value in values.items():
        setattr(config, key, value)

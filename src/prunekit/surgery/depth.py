"""Depth surgery: remove whole decoder blocks, or a block's attention or MLP sub-layer.

Block removal rebuilds the model instead of patching it: the block list gets shorter, every
``layer_idx`` is renumbered, and the config says what the model now is, so the result is a standard
folder that ``from_pretrained`` builds from its config. What transformers 5.24 reads per layer (from
the modeling files of the supported families):

- every model forward runs ``self.layers[: config.num_hidden_layers]``;
- Gemma 3, Qwen2 and Qwen3 pick each block's mask (and Gemma 3 its rotary table) by position from
  ``config.layer_types``; ``DynamicCache(config=...)`` makes one cache layer per position, sliding
  ones from ``layer_types`` (or the ``sliding_window`` every Mistral layer shares);
- an attention module indexes the KV cache with its own ``layer_idx``;
- Qwen2/Qwen3 derive ``layer_types`` from ``max_window_layers`` when a config has none;
- GPT-2 with ``scale_attn_by_inverse_layer_idx`` scales attention by ``1 / (layer_idx + 1)``: its
  blocks compute differently at another position, so removing blocks there is refused.

Every config list with one entry per layer (a name containing ``layer``) is cut like the block list.

A removed sub-layer is replaced by a stand-in that adds nothing to the residual stream (the block
computes ``x + 0``; its norms stay, they are a rounding error in size). A removed attention still
writes a one-wide placeholder key per token into the KV cache, because generation reads the
sequence length from the cache of layer 0. Each stand-in carries a zero-size parameter under the
name of the removed output projection's weight (``...self_attn.o_proj.weight``, shape ``[0]``): the
saved folder has a tensor whose shape no dense model has, so a plain ``from_pretrained`` stops with a
size-mismatch error instead of silently filling the missing sub-layer with random weights.
``prunekit.load`` rebuilds such a folder from its shape manifest (``prunekit.io.shapes``).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable

import torch
from torch import nn

from prunekit.models import Block, get_adapter, linear_weight
from prunekit.surgery.config import base_config
from prunekit.surgery.linear import SurgeryError, owner_of

PARTS = ("attention", "mlp")


# -- whole blocks ----------------------------------------------------------------------------------


def remove_blocks(model: nn.Module, indices: Iterable[int]) -> dict:
    """Remove the decoder blocks ``indices`` and rewrite the config to match; returns the config values set.

    The new config is proven before anything changes: it must survive a JSON round trip (its
    validators run, e.g. ``layer_types`` against ``num_hidden_layers``) and a model built from it
    must disagree with the pruned model on no parameter it did not disagree on before (a width-pruned
    model keeps its shape manifest; nothing new may appear). Otherwise ``SurgeryError``, model untouched.
    """
    adapter = get_adapter(model)
    blocks = adapter.blocks()
    total = len(blocks)
    remove = _block_indices(indices, total)
    keep = [i for i in range(total) if i not in remove]
    config = base_config(model.config)
    _check_movable(config)
    values = _config_values(config, keep, total)
    candidate = copy.deepcopy(config)
    for key, value in values.items():
        setattr(candidate, key, value)
    try:
        candidate = type(candidate).from_dict(json.loads(candidate.to_json_string()))
    except Exception as err:  # a config validator refused the new layer count
        raise SurgeryError(f"the config cannot describe {len(keep)} blocks: {str(err).splitlines()[0]}") from None
    rename = _renamer(adapter.blocks_path, keep)
    before = {rename(n) for n in _disagreements(model, config) if rename(n)}
    after = _disagreements(model, candidate, rename)
    if after != before:
        shown = "; ".join(sorted(after ^ before)[:3])
        raise SurgeryError(f"after removing blocks {sorted(remove)} the config no longer builds the model ({shown})")

    for i in sorted(remove, reverse=True):
        del blocks[i]  # ModuleList renumbers its keys
    for new_index, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index  # the KV cache slot of this block
    for key, value in values.items():
        setattr(config, key, value)
    for module in model.modules():  # Qwen2/Qwen3 decide at construction whether to build a sliding mask
        if isinstance(getattr(module, "has_sliding_layers", None), bool) and "layer_types" in values:
            module.has_sliding_layers = "sliding_attention" in values["layer_types"]
    return values


def _block_indices(indices: Iterable[int], total: int) -> set[int]:
    remove = [int(i) for i in indices]
    if len(set(remove)) != len(remove):
        raise SurgeryError(f"duplicate block indices in {remove}")
    if any(i < 0 or i >= total for i in remove):
        raise SurgeryError(f"block indices must lie in [0, {total}), got {sorted(remove)}")
    if not remove:
        raise SurgeryError("no block to remove; pass at least one block index")
    if len(remove) >= total:
        raise SurgeryError(f"cannot remove all {total} blocks; keep at least one")
    return set(remove)


def _check_movable(config) -> None:
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise SurgeryError(
            "this model scales attention by 1/(layer_idx + 1) (scale_attn_by_inverse_layer_idx), so a block "
            "computes differently at another position; its blocks cannot be removed"
        )
    if getattr(config, "is_heterogeneous", False):
        raise SurgeryError("configs with a per_layer_config are not supported by block removal yet")


def _config_values(config, keep: list[int], total: int) -> dict:
    """The config values that change when only the blocks ``keep`` (old indices) remain."""
    values = {"num_hidden_layers": len(keep)}
    for key, value in config.to_dict().items():
        if "layer" in key and isinstance(value, list) and len(value) == total:
            values[key] = [value[i] for i in keep]
    windows = getattr(config, "max_window_layers", None)
    if isinstance(windows, int) and windows < total:  # Qwen2/Qwen3: the first ``max_window_layers`` are full
        values["max_window_layers"] = sum(1 for i in keep if i < windows)
    return values


def _renamer(blocks_path: str, keep: list[int]):
    """Parameter name before removal -> after (``None`` for the removed blocks' parameters)."""
    prefix = blocks_path + "."
    new_index = {old: new for new, old in enumerate(keep)}

    def rename(name: str) -> str | None:
        if not name.startswith(prefix):
            return name
        index, _, rest = name[len(prefix) :].partition(".")
        if int(index) not in new_index:
            return None
        return f"{prefix}{new_index[int(index)]}.{rest}"

    return rename


def _disagreements(model: nn.Module, config, rename=None) -> set[str]:
    """Parameters whose shape differs between ``model`` (names through ``rename``) and a model built from ``config``.

    Parameters only, unlike ``surgery.config.config_mismatches``: buffers may rightly change with the blocks (Gemma 3's
    rotary tables exist per attention type, and removing every sliding block drops one)."""
    ours = {n: tuple(p.shape) for n, p in model.named_parameters()}
    if rename is not None:
        ours = {rename(n): s for n, s in ours.items() if rename(n)}
    with torch.device("meta"):
        reference = type(model)(copy.deepcopy(config))
    theirs = {n: tuple(p.shape) for n, p in reference.named_parameters()}
    return {n for n in ours.keys() | theirs.keys() if ours.get(n) != theirs.get(n)}


# -- sub-layers ------------------------------------------------------------------------------------


class _Marker(nn.Module):
    """Holds the zero-size ``weight`` that marks a removed output projection in the saved weights."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(0), requires_grad=False)


class RemovedAttention(nn.Module):
    """A removed attention sub-layer: returns zeros (and no attention weights), keeps the KV cache's length."""

    def __init__(self, layer_idx: int | None, projection: str):
        super().__init__()
        self.layer_idx = layer_idx
        self.add_module(projection, _Marker())

    def forward(self, hidden_states, *args, cache=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        if cache is not None:
            cache = getattr(cache, "self_attention_cache", cache)  # GPT-2 may wrap it for cross-attention
            placeholder = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            cache.update(placeholder, placeholder, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class RemovedMlp(nn.Module):
    """A removed MLP module: returns zeros shaped like its input."""

    def __init__(self, projection: str):
        super().__init__()
        self.add_module(projection, _Marker())

    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states)


class ZeroProjection(_Marker):
    """Stands in for the output linear of an MLP written inline in its block (OPT's fc2): ``out_features`` zeros."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, hidden_states):
        return hidden_states.new_zeros(*hidden_states.shape[:-1], self.out_features)


class NoFeatures(nn.Module):
    """Stands in for an input linear of an inline MLP (OPT's fc1): no features, nothing computed."""

    def forward(self, hidden_states):
        return hidden_states[..., :0]


STAND_INS = (RemovedAttention, RemovedMlp, ZeroProjection, NoFeatures)


def _output(block: Block, part: str) -> nn.Module:
    if part not in PARTS:
        raise SurgeryError(f"a sub-layer is one of {', '.join(PARTS)}, got {part!r}")
    return block.attention.o if part == "attention" else block.mlp.down


def _path(root: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in root.named_modules() if m is module)


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def sublayer_modules(block: Block, part: str) -> dict[str, nn.Module]:
    """The modules (by path inside the block) that removing ``part`` replaces, i.e. whose parameters go.

    The attention module that owns the output projection; the MLP module likewise, or, for an MLP
    written inline in the block (OPT), its linears."""
    owner = owner_of(block.module, _output(block, part))
    if owner is not block.module:
        return {_path(block.module, owner): owner}
    if part == "attention":
        raise SurgeryError(f"block {block.index}: an attention written inline in the block cannot be removed")
    mlp = block.mlp
    linears = [m for m in (mlp.gate, mlp.up, mlp.gate_up, mlp.down) if m is not None]
    return {_path(block.module, m): m for m in linears}


def sublayer_params(block: Block, part: str) -> int:
    """Parameters that removing ``part`` of ``block`` removes."""
    return sum(p.numel() for m in sublayer_modules(block, part).values() for p in m.parameters())


def remove_sublayer(block: Block, part: str) -> None:
    """Replace the block's attention or MLP by a stand-in that adds nothing to the residual stream.

    ``block`` is a view taken before any sub-layer of it was removed (the adapter cannot build one
    of a block that lacks a part), so both parts of a block can go with the same view."""
    output = _output(block, part)
    for path, module in sublayer_modules(block, part).items():
        if module is output:  # inline MLP
            stand_in = ZeroProjection(linear_weight(module).shape[0])
        elif output not in module.modules():
            stand_in = NoFeatures()
        elif part == "attention":
            stand_in = RemovedAttention(getattr(module, "layer_idx", None), _path(module, output))
        else:
            stand_in = RemovedMlp(_path(module, output))
        _set(block.module, path, stand_in)


def kept_sublayers(block_module: nn.Module) -> dict[str, bool]:
    """Which sub-layers a block still has: ``{"attention": bool, "mlp": bool}``."""
    modules = list(block_module.modules())
    return {
        "attention": not any(isinstance(m, RemovedAttention) for m in modules),
        "mlp": not any(isinstance(m, (RemovedMlp, ZeroProjection)) for m in modules),
    }


def has_removed_sublayers(model: nn.Module) -> bool:
    return any(isinstance(m, STAND_INS) for m in model.modules())

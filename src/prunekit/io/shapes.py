"""The shape manifest: describe, and replay on a freshly built model, the shapes its config cannot describe.

A config gives one width for every block, OPT and GPT-2 derive the head size from the head count,
and no config has a flag for a bias a method added where the family has none (FLAP's compensation
on Qwen2 or Mistral). Models pruned past what the config says are saved with the config as it is
(the dense widths) and a manifest under ``"shapes"`` in ``prunekit.json``::

    {"blocks": [{"intermediate_size": 80, "num_heads": 2, "num_kv_heads": 1, "head_dim": 16}, ...],
     "extra_parameters": {"model.layers.0.self_attn.o_proj.bias": [64]}}

A model whose residual stream was rotated and sliced (SliceGPT, ``prunekit.surgery.hidden``) adds
``"hidden": {"size": 432, "divisor": 576, "eps": 1e-05, "shortcuts": true}``: its width, its RMSNorms
(which still divide by the original width) and the shortcut matrix on each residual add. The config
keeps the original width, so a plain ``from_pretrained`` fails on the size mismatches.

A block whose attention or MLP sub-layer was removed (depth pruning) says so with ``"attention": false``
or ``"mlp": false``; its widths for the missing part are the config's. Such a folder holds a zero-size
tensor where the removed output projection's weight was (``prunekit.surgery.depth``), which a plain
``from_pretrained`` refuses as a size mismatch rather than loading a model with random sub-layers.

Loading builds the dense model on the meta device, reshapes it with the same surgery that pruned
it (keeping the leading neurons and heads, whose values the weights file then overwrites), and
reads every tensor once, straight to its device. A plain ``from_pretrained`` of such a folder
fails on the size mismatches; a folder whose only difference is an extra bias loads there without
that bias (transformers lists it as UNEXPECTED), so use ``prunekit.load`` for prunekit outputs.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, fields

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.io.files import MANIFEST
from prunekit.models import Block, get_adapter, heads_from_weights, is_linear, linear_weight
from prunekit.surgery.config import editable_on_meta, empty_model, module_shapes, reference_shapes
from prunekit.surgery.depth import PARTS, kept_sublayers, remove_sublayer
from prunekit.surgery.hidden import apply_hidden, describe_hidden
from prunekit.surgery.linear import add_output_bias
from prunekit.surgery.width import BlockShape, block_shape, prune_attention_heads, prune_mlp_neurons

BLOCK_KEYS = tuple(f.name for f in fields(BlockShape))
RESAVE = f"config.json and {MANIFEST} do not belong together; re-save the model with prunekit"


# -- describing ------------------------------------------------------------------------------------


def describe_shapes(model: nn.Module) -> dict | None:
    """The shape manifest ``model`` needs, or ``None`` when a model built from its config has its exact shapes.

    The manifest is proven before it is returned, as ``update_config_uniform`` proves a config: the
    dense model rebuilt from the config and reshaped by it must have exactly ``model``'s parameter
    and buffer names and shapes. Otherwise ``PrunekitError``, so a save never writes a folder that
    cannot be loaded back. Meta (lazy) models work: only ``.shape`` is read.
    """
    ours, dense = module_shapes(model), reference_shapes(model, model.config)
    if ours == dense:
        return None
    adapter = get_adapter(model)
    rebuilt = empty_model(copy.deepcopy(model.config), model.dtype)
    hidden = describe_hidden(model)
    if hidden is not None:  # the stream's own structure first: norms, shortcuts and width (SliceGPT)
        apply_hidden(rebuilt, hidden)
        dense = module_shapes(rebuilt)
    shapes = {
        "blocks": [_describe_block(adapter, i, get_adapter(rebuilt).block(i)) for i in range(adapter.num_blocks())],
        "extra_parameters": {name: list(shape) for name, shape in ours.items() if name not in dense},
        **({"hidden": hidden} if hidden is not None else {}),
    }
    rebuilt = empty_model(copy.deepcopy(model.config), model.dtype)
    apply_shapes(rebuilt, shapes)
    theirs = module_shapes(rebuilt)
    differ = [n for n in {**ours, **theirs} if ours.get(n) != theirs.get(n)]
    problems = [f"{n}: {ours.get(n)} here, {theirs.get(n)} rebuilt" for n in differ]
    if problems:
        raise PrunekitError(
            "the config plus a shape manifest (block widths, added biases) cannot rebuild this model: "
            + "; ".join(problems[:3])
            + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        )
    return shapes


def _describe_block(adapter, index: int, dense: Block) -> dict:
    """One block's manifest entry: its widths, and ``"attention": false`` / ``"mlp": false`` for a removed part.

    The adapter cannot view a block that lacks a part, so a removed part's widths come from ``dense``
    (the block as the config builds it)."""
    module = adapter.blocks()[index]
    kept = kept_sublayers(module)
    if all(kept.values()):
        return asdict(block_shape(adapter.block(index)))
    attention = heads_from_weights(adapter.attention(module)) if kept["attention"] else dense.attention
    mlp = adapter.mlp(module) if kept["mlp"] else dense.mlp
    entry = asdict(block_shape(Block(module, index, attention, mlp, {})))
    return {**entry, **{part: False for part in PARTS if not kept[part]}}


# -- applying --------------------------------------------------------------------------------------


def apply_shapes(model: nn.Module, shapes: dict) -> None:
    """Reshape a model freshly built from its (dense) config, in place, into the shapes a manifest gives.

    Meta parameters are fine, so loaders reshape before they allocate. Each block keeps its leading
    neurons and heads (the first ``num_kv_heads`` KV groups with the first ``num_heads // num_kv_heads``
    query heads of each, a selection grouped-query attention accepts); only the shapes matter, the
    weights file provides the values. A manifest that does not fit the model is a ``PrunekitError``.
    """
    adapter = get_adapter(model)
    blocks = shapes.get("blocks") if isinstance(shapes, dict) else None
    if not isinstance(blocks, list) or len(blocks) != adapter.num_blocks():
        count = len(blocks) if isinstance(blocks, list) else "no"
        raise PrunekitError(
            f"the shape manifest describes {count} blocks but the config builds {adapter.num_blocks()}; {RESAVE}"
        )
    if shapes.get("hidden") is not None:
        apply_hidden(model, shapes["hidden"])
    for i, entry in enumerate(blocks):
        block = adapter.block(i)
        with editable_on_meta(block.module):
            _reshape_block(block, _block_target(entry, i))
            for part in _removed_parts(entry, i):
                remove_sublayer(block, part)
    for name, shape in (shapes.get("extra_parameters") or {}).items():
        _add_bias(model, name, shape)


def _block_target(entry, index: int) -> BlockShape:
    try:
        return BlockShape(**{key: int(entry[key]) for key in BLOCK_KEYS})
    except (KeyError, TypeError, ValueError):
        raise PrunekitError(
            f"block {index} of the shape manifest must give {', '.join(BLOCK_KEYS)} as integers, got {entry!r}"
        ) from None


def _removed_parts(entry: dict, index: int) -> list[str]:
    flags = {part: entry.get(part, True) for part in PARTS}
    if not all(isinstance(flag, bool) for flag in flags.values()):
        raise PrunekitError(f"block {index} of the shape manifest: attention and mlp must be true or false: {flags}")
    return [part for part, kept in flags.items() if not kept]


def _reshape_block(block: Block, target: BlockShape) -> None:
    dense = block_shape(block)
    problem = _unreachable(dense, target)
    if problem:
        raise PrunekitError(f"block {block.index}: the shape manifest asks for {problem}; {RESAVE}")
    if (target.num_heads, target.num_kv_heads) != (dense.num_heads, dense.num_kv_heads):
        prune_attention_heads(block, _leading_heads(dense, target))
    if target.intermediate_size != dense.intermediate_size:
        prune_mlp_neurons(block, torch.arange(target.intermediate_size))


def _unreachable(dense: BlockShape, target: BlockShape) -> str | None:
    """Why removing neurons and heads cannot turn ``dense`` into ``target``, or ``None`` when it can."""
    if target.head_dim != dense.head_dim:
        return f"head_dim {target.head_dim}, but the config builds {dense.head_dim}"
    if not 0 < target.intermediate_size <= dense.intermediate_size:
        return f"{target.intermediate_size} MLP neurons, but the config builds {dense.intermediate_size}"
    group, kv = dense.num_heads // dense.num_kv_heads, target.num_kv_heads
    if not (0 < kv <= dense.num_kv_heads and target.num_heads % kv == 0 and 0 < target.num_heads // kv <= group):
        return (
            f"{target.num_heads} query heads over {target.num_kv_heads} KV heads, but the config builds "
            f"{dense.num_heads} over {dense.num_kv_heads}"
        )
    return None


def _leading_heads(dense: BlockShape, target: BlockShape) -> torch.Tensor:
    group = dense.num_heads // dense.num_kv_heads
    per_group = target.num_heads // target.num_kv_heads
    return torch.tensor([g * group + q for g in range(target.num_kv_heads) for q in range(per_group)])


def _add_bias(model: nn.Module, name: str, shape) -> None:
    """Recreate an extra parameter: an output bias on a linear that has none (the only kind methods add)."""
    owner_name, _, attr = name.rpartition(".")
    try:
        owner = model.get_submodule(owner_name)
    except AttributeError:
        owner = None
    width = linear_weight(owner).shape[0] if owner is not None and is_linear(owner) else None
    shape = list(shape) if isinstance(shape, (list, tuple)) else shape
    if attr != "bias" or width is None or getattr(owner, "bias", None) is not None or shape != [width]:
        raise PrunekitError(
            f"extra parameter {name} {shape}: prunekit recreates only an output bias ([out_features]) "
            "on a linear layer that has none"
        )
    add_output_bias(owner, torch.zeros(width))

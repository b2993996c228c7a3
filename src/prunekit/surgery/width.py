"""Width surgery: remove MLP neurons and attention heads of a block, and write a uniform result into the config.

Everything here works on the adapter's ``Block`` view, so nothing names an architecture. What the
families' forwards need after an edit (read from transformers' modeling files):

- ``nn.Linear`` keeps ``in_features``/``out_features`` only as metadata; transformers' ``Conv1D``
  (GPT-2) shapes its output with ``self.nf``, so that one must follow the weight.
- Llama-family, Gemma 3, Phi-3: ``num_key_value_groups`` drives ``repeat_kv`` (eager and SDPA);
  Phi-3 also keeps ``num_key_value_heads`` and splits its fused ``qkv_proj`` at
  ``self.config.num_attention_heads * head_dim``, read from the *shared* config at every forward.
- OPT: ``view(bsz, -1, self.num_heads, self.head_dim)``, so ``num_heads`` must follow.
- GPT-2: ``c_attn(x).split(self.split_size)`` into q, k, v, so ``split_size`` must follow; the
  head size is the stored ``head_dim``. ``embed_dim`` is the residual width and is not read by the
  forward, so it stays what it is.
- Qwen3 / Gemma 3 ``q_norm``/``k_norm`` act on one head (``head_dim`` wide): nothing to slice.
- MLP forwards never read the width from the config (Phi-3 chunks ``gate_up_proj`` in two halves);
  the ``intermediate_size`` attribute some MLPs keep is updated for consistency.

Because Phi-3 reads head counts from the config that all blocks share, a block whose head counts
differ from the config gets a ``BlockConfig`` view (the shared config with its own two counts).
``update_config_uniform`` writes the counts into the shared config and removes the views.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from prunekit.models import Block, get_adapter, linear_weight
from prunekit.surgery.config import BlockConfig, base_config, config_mismatches, module_shapes, reference_shapes
from prunekit.surgery.linear import (
    SurgeryError,
    add_output_bias,
    in_features,
    out_features,
    owner_of,
    slice_columns,
    slice_rows,
    sorted_unique,
)

# -- shapes ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockShape:
    """The width of one block as its weights say (the config may not have caught up yet)."""

    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


def block_shape(block: Block) -> BlockShape:
    """Read the current shape of a block from its weights. ``head_dim`` never changes with head pruning."""
    attn, head_dim = block.attention, block.attention.head_dim
    q_width = in_features(attn.o)  # o takes the concatenated heads
    # k and v are as wide as each other: the fused [q; k; v] rows minus q, halved.
    kv_width = (out_features(attn.qkv) - q_width) // 2 if attn.qkv is not None else out_features(attn.k)
    if q_width % head_dim or kv_width % head_dim:
        raise SurgeryError(f"block {block.index}: attention widths {q_width}, {kv_width} are not heads of {head_dim}")
    return BlockShape(in_features(block.mlp.down), q_width // head_dim, kv_width // head_dim, head_dim)


# -- MLP neurons -----------------------------------------------------------------------------------


def prune_mlp_neurons(block: Block, keep) -> None:
    """Keep only the intermediate channels ``keep`` of the block's MLP.

    Gated (SwiGLU/GeGLU): rows of gate and up, columns of down. Fused ``gate_up`` (Phi-3, rows
    [gate; up], split by ``chunk(2)``): the same channels in both halves. Plain (OPT fc1/fc2,
    GPT-2 c_fc/c_proj): rows of fc1 with its bias, columns of fc2 (fc2's bias stays).
    """
    mlp = block.mlp
    width = in_features(mlp.down)
    keep = sorted_unique(keep, width, f"block {block.index} MLP neurons")
    if mlp.gate_up is not None:
        slice_rows(mlp.gate_up, torch.cat([keep, keep + width]))
    else:
        if mlp.gate is not None:
            slice_rows(mlp.gate, keep)
        slice_rows(mlp.up, keep)
    slice_columns(mlp.down, keep)
    owner = owner_of(block.module, mlp.down)
    if isinstance(getattr(owner, "intermediate_size", None), int):
        owner.intermediate_size = keep.numel()  # metadata only in every family we support


# -- attention heads -------------------------------------------------------------------------------


def _head_rows(heads: torch.Tensor, head_dim: int, offset: int = 0) -> torch.Tensor:
    """The output rows of the given heads in a projection whose heads are stacked ``head_dim`` apart."""
    return (offset + heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def kv_heads_for(num_heads: int, num_kv_heads: int, keep_query_heads) -> tuple[torch.Tensor, int]:
    """The KV heads that survive and the query heads each keeps, for surviving query heads.

    Query head ``h`` reads KV head ``h // (num_heads // num_kv_heads)`` (``repeat_kv`` is a
    repeat-interleave). A KV head survives if any of its query heads does; ``repeat_kv`` needs every
    surviving group to keep the same number of query heads, else ``SurgeryError``.
    """
    if num_heads % num_kv_heads:
        raise SurgeryError(f"{num_heads} query heads do not split into {num_kv_heads} KV groups")
    keep = sorted_unique(keep_query_heads, num_heads, "query heads")
    group = num_heads // num_kv_heads
    kv, counts = torch.unique(keep // group, return_counts=True)
    if (counts != counts[0]).any():
        per_group = dict(zip(kv.tolist(), counts.tolist(), strict=True))
        raise SurgeryError(
            f"surviving KV groups keep different numbers of query heads {per_group} (KV head: query heads); "
            "grouped-query attention needs the same number in every group: remove whole groups "
            "(heads_for_kv_group_removal) or the same number per group (heads_for_even_query_removal)"
        )
    return kv, int(counts[0])


def _set_module_head_counts(module: nn.Module, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    """Update every attribute an attention forward reads for its head counts (see the module docstring)."""
    if hasattr(module, "num_key_value_groups"):
        module.num_key_value_groups = num_heads // num_kv_heads
    if hasattr(module, "num_heads"):
        module.num_heads = num_heads
    if hasattr(module, "num_key_value_heads"):
        module.num_key_value_heads = num_kv_heads
    if hasattr(module, "split_size"):
        module.split_size = num_heads * head_dim
    config = getattr(module, "config", None)
    if config is None or not hasattr(config, "num_attention_heads"):
        return
    base = base_config(config)
    own = {"num_attention_heads": num_heads}
    if hasattr(base, "num_key_value_heads"):
        own["num_key_value_heads"] = num_kv_heads
    for alias, real in getattr(base, "attribute_map", {}).items():  # GPT-2: num_attention_heads -> n_head
        if alias in own:
            own[real] = own[alias]
    if all(getattr(base, k) == v for k, v in own.items()):
        module.config = base
    else:
        module.config = BlockConfig(base, own)


def prune_attention_heads(block: Block, keep_query_heads) -> None:
    """Keep only the query heads ``keep_query_heads`` of the block, and the KV heads they read.

    Slices q rows (``head_dim`` per query head), k and v rows (per surviving KV head), o columns
    (per query head); fused ``qkv`` (Phi-3 rows, GPT-2 Conv1D output columns, both [q; k; v]) gets
    the same three selections at their offsets. The surviving KV groups must keep equally many
    query heads (``kv_heads_for``).
    """
    attn = block.attention
    shape = block_shape(block)
    heads, kv_heads, head_dim = shape.num_heads, shape.num_kv_heads, shape.head_dim
    keep = sorted_unique(keep_query_heads, heads, f"block {block.index} query heads")
    kv_keep, _ = kv_heads_for(heads, kv_heads, keep)
    q_rows = _head_rows(keep, head_dim)
    if attn.qkv is not None:
        k_offset = heads * head_dim
        v_offset = k_offset + kv_heads * head_dim
        rows = [q_rows, _head_rows(kv_keep, head_dim, k_offset), _head_rows(kv_keep, head_dim, v_offset)]
        slice_rows(attn.qkv, torch.cat(rows))
    else:
        kv_rows = _head_rows(kv_keep, head_dim)
        slice_rows(attn.q, q_rows)
        slice_rows(attn.k, kv_rows)
        slice_rows(attn.v, kv_rows)
    slice_columns(attn.o, q_rows)
    _set_module_head_counts(owner_of(block.module, attn.o), keep.numel(), kv_keep.numel(), head_dim)


# -- GQA policies ----------------------------------------------------------------------------------


def heads_for_kv_group_removal(num_heads: int, num_kv_heads: int, remove_kv: Sequence[int]) -> torch.Tensor:
    """Query heads to keep when whole KV groups go (the KV head and all its query heads; LLM-Pruner)."""
    if num_heads % num_kv_heads:
        raise SurgeryError(f"{num_heads} query heads do not split into {num_kv_heads} KV groups")
    remove = set(int(g) for g in remove_kv)
    if any(g < 0 or g >= num_kv_heads for g in remove):
        raise SurgeryError(f"KV groups to remove must lie in [0, {num_kv_heads}), got {sorted(remove)}")
    if len(remove) == num_kv_heads:
        raise SurgeryError("cannot remove every KV group; keep at least one")
    group = num_heads // num_kv_heads
    return torch.tensor([h for h in range(num_heads) if h // group not in remove], dtype=torch.long)


def heads_for_even_query_removal(num_heads: int, num_kv_heads: int, remove_per_group: int, scores=None) -> torch.Tensor:
    """Query heads to keep when every KV group loses ``remove_per_group`` query heads (Torch-Pruning, Minitron).

    All KV heads stay. With ``scores`` (one per query head, higher = more important) each group
    loses its lowest-scored heads, ties going to the later head; without, its last heads.
    """
    if num_heads % num_kv_heads:
        raise SurgeryError(f"{num_heads} query heads do not split into {num_kv_heads} KV groups")
    group = num_heads // num_kv_heads
    if not 0 <= remove_per_group < group:
        raise SurgeryError(f"remove_per_group must lie in [0, {group}) for {group} query heads per KV group")
    if scores is not None:
        scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
        if scores.numel() != num_heads:
            raise SurgeryError(f"expected {num_heads} head scores, got {scores.numel()}")
    keep = []
    for g in range(num_kv_heads):
        members = list(range(g * group, (g + 1) * group))
        if scores is None:
            removed = members[group - remove_per_group :]
        else:
            removed = sorted(members, key=lambda h: (scores[h].item(), -h))[:remove_per_group]
        keep += [h for h in members if h not in removed]
    return torch.tensor(keep, dtype=torch.long)


def express_added_biases(model: nn.Module) -> list[str]:
    """Turn on the config's bias flags (Llama's ``attention_bias`` / ``mlp_bias``) that cover biases a method added.

    Setting a flag gives every linear under it a bias, so those without one get zeros: the result
    computes the same and stays a standard folder. Families with no such flag keep the added biases
    as extra parameters, which the shape manifest describes. Returns the flags turned on.
    """
    config = base_config(model.config)
    turned_on = []
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, None) is not False:
            continue
        ours = module_shapes(model)
        before = set(ours) - set(reference_shapes(model, config))
        candidate = copy.deepcopy(config)
        setattr(candidate, flag, True)
        theirs = reference_shapes(model, candidate)
        missing = [n for n in theirs if n not in ours]
        if len(set(ours) - set(theirs)) >= len(before) or not all(n.endswith(".bias") for n in missing):
            continue
        for name in missing:
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            add_output_bias(owner, torch.zeros(linear_weight(owner).shape[0]))  # the pruned width, not the config's
        setattr(config, flag, True)
        turned_on.append(flag)
    return turned_on


def update_config_uniform(model: nn.Module) -> dict[str, int]:
    """Write the (uniform) pruned width of every block into ``model.config``; return what was set.

    Sets the MLP width under the family's name (``intermediate_size``, OPT ``ffn_dim``, GPT-2
    ``n_inner``), ``num_attention_heads``, ``num_key_value_heads`` and ``head_dim`` (explicitly where
    the config has it; as an extra key where ``hidden_size // num_heads`` no longer gives it, which
    Qwen2 and Phi-3 honour through ``getattr(config, "head_dim", ...)``).

    The new config is proven before it is written: saved to JSON and back (so its validators run,
    e.g. Phi-3's long-RoPE factor lengths) and built on the meta device, and every parameter and
    buffer must match the pruned model's shape. OPT and GPT-2 derive ``head_dim`` from
    ``hidden_size // num_heads`` with no override, so removing heads fails there with a
    ``SurgeryError``; such a model needs a shape manifest. Blocks of different widths raise too.
    The config is left untouched on failure.
    """
    adapter = get_adapter(model)
    shapes = [block_shape(adapter.block(i)) for i in range(adapter.num_blocks())]
    if len(set(shapes)) > 1:
        listing = "; ".join(f"block {i}: {s}" for i, s in enumerate(shapes))
        raise SurgeryError(f"blocks differ in width, so one config cannot describe them ({listing}); use a manifest")
    shape = shapes[0]
    config = base_config(model.config)
    if shape.num_kv_heads != shape.num_heads and not hasattr(config, "num_key_value_heads"):
        raise SurgeryError(f"{type(config).__name__} has no num_key_value_heads for {shape}")

    values = {}
    key = adapter.mlp_width_key
    if not hasattr(config, key):
        raise SurgeryError(f"{type(config).__name__} has no {key} for the MLP width")
    values[key] = shape.intermediate_size
    values["num_attention_heads"] = shape.num_heads
    if hasattr(config, "num_key_value_heads"):
        values["num_key_value_heads"] = shape.num_kv_heads
    if getattr(config, "head_dim", None) is not None or config.hidden_size // shape.num_heads != shape.head_dim:
        values["head_dim"] = shape.head_dim

    candidate = copy.deepcopy(config)
    for k, v in values.items():
        setattr(candidate, k, v)
    try:
        reloaded = type(candidate).from_dict(json.loads(candidate.to_json_string()))
    except Exception as err:  # a config validator refused the new shape
        problems = [f"the config does not validate: {err}".splitlines()[0]]
    else:
        problems = config_mismatches(model, reloaded)
    if problems:
        heads_changed = shape.num_heads != config.num_attention_heads
        hint = (
            f"{type(config).__name__} cannot express removed attention heads; head pruning for this family "
            "needs a shape manifest, which a later change provides"
            if heads_changed
            else f"{type(config).__name__} cannot describe the pruned model"
        )
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise SurgeryError(f"{hint} ({shown})")

    for k, v in values.items():
        setattr(config, k, v)
    # The shared config now has every block's head counts: drop the per-block views.
    for module in model.modules():
        if isinstance(getattr(module, "config", None), BlockConfig):
            module.config = module.config._base
    return values

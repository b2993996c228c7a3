"""What every architecture adapter exposes, and the registry that maps model types to adapters.

An adapter names the parts of one family (where the blocks live, which linears form the
attention and the MLP, the head counts); nothing outside ``prunekit.models`` names an
architecture. Methods ask the adapter, never the model's class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from prunekit.errors import PrunekitError


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: a linear layer that stores its weight as [in, out]."""
    return type(module).__name__ == "Conv1D"


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a linear layer as [out_features, in_features] (a view: writes go through).

    GPT-2's Conv1D stores [in, out]; every other linear stores [out, in].
    """
    if isinstance(module, nn.Linear):
        return module.weight
    if is_conv1d(module):
        return module.weight.t()
    raise TypeError(f"{type(module).__name__} is not a linear layer")


def tied_parameter_names(model: nn.Module) -> set[str]:
    """Parameters that are another parameter under a second name (a tied lm_head); saved once."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    return set(model.get_expanded_tied_weights_keys())


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Total parameters (a tied head counted once) and those outside the embeddings and the head."""
    adapter = get_adapter(model)
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    outside = {id(m.weight): m.weight.numel() for m in [*adapter.embeddings(), adapter.lm_head()]}
    return {"total": total, "non_embedding": total - sum(outside.values())}


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


@dataclass
class Attention:
    """The projections of one attention sub-layer. ``qkv`` is set instead of q/k/v when fused."""

    o: nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q: nn.Module | None = None
    k: nn.Module | None = None
    v: nn.Module | None = None
    qkv: nn.Module | None = None
    extra_norms: dict[str, nn.Module] = field(default_factory=dict)  # e.g. Qwen3 / Gemma 3 q/k norms

    @property
    def queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass
class Mlp:
    """The MLP of one block: gated (gate, up, down or fused gate_up) or plain (up=fc1, down=fc2)."""

    down: nn.Module
    up: nn.Module | None = None
    gate: nn.Module | None = None
    gate_up: nn.Module | None = None  # fused [gate; up] rows, as in Phi-3

    @property
    def gated(self) -> bool:
        return self.gate is not None or self.gate_up is not None


@dataclass
class Block:
    """One decoder block as the methods see it."""

    module: nn.Module
    index: int
    attention: Attention
    mlp: Mlp
    norms: dict[str, nn.Module]  # every norm over the residual width, by the family's names
    mlp_norm: str = "post_attention"  # the key of the norm whose output the MLP reads

    def norm_before(self, part: str) -> nn.Module:
        """The norm whose output ``part`` ("attention" or "mlp") reads."""
        return self.norms["input" if part == "attention" else self.mlp_norm]

    def linears(self) -> dict[str, nn.Module]:
        """Every linear layer of the block, keyed by its name inside the block."""
        return {name: mod for name, mod in self.module.named_modules() if is_linear(mod)}


class ModelAdapter:
    """Base class: a family's adapter sets the dotted paths and builds ``Block`` views."""

    model_types: ClassVar[tuple[str, ...]] = ()
    family: ClassVar[str] = ""
    blocks_path: ClassVar[str] = ""
    final_norm_path: ClassVar[str | None] = None
    embedding_paths: ClassVar[tuple[str, ...]] = ()
    lm_head_path: ClassVar[str] = "lm_head"
    mlp_width_key: ClassVar[str] = "intermediate_size"  # the config's name for the MLP width (OPT: ffn_dim)
    mlp_norm: ClassVar[str] = "post_attention"  # which of ``norms()`` feeds the MLP (Gemma 3: pre_feedforward)
    norm_gain_offset: ClassVar[float] = 0.0  # a norm multiplies by (offset + weight): Gemma's RMSNorm by (1 + w)

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # -- model-level parts --------------------------------------------------------------------
    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.blocks_path)

    def num_blocks(self) -> int:
        return len(self.blocks())

    def embeddings(self) -> list[nn.Module]:
        return [self.model.get_submodule(p) for p in self.embedding_paths if _has(self.model, p)]

    def final_norm(self) -> nn.Module | None:
        return self.model.get_submodule(self.final_norm_path) if self.final_norm_path else None

    def lm_head(self) -> nn.Module:
        return self.model.get_submodule(self.lm_head_path)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head applied to the last block's output (final norm, then lm_head)."""
        norm = self.final_norm()
        return self.lm_head()(norm(hidden) if norm is not None else hidden)

    def block(self, index: int) -> Block:
        module = self.blocks()[index]
        attention = heads_from_weights(self.attention(module))
        return Block(module, index, attention, self.mlp(module), self.norms(module), self.mlp_norm)

    def lora_targets(self) -> tuple[str, ...]:
        """LoRA's target module names: every linear of the blocks, as LLM-Pruner adapts all seven of a Llama block
        (GPT-2: c_attn, c_proj, c_fc; OPT: q/k/v/out_proj, fc1, fc2; Phi-3: qkv_proj, o_proj, gate_up_proj, ...)."""
        names = {name.rsplit(".", 1)[-1] for name, module in self.blocks().named_modules() if is_linear(module)}
        return tuple(sorted(names))

    def embedding_scale(self, hidden_size: int) -> float:
        """What the family multiplies the embeddings' output by in a model ``hidden_size`` wide (Gemma: its root)."""
        return 1.0

    def rebuild_embedding_scale(self) -> None:
        """Give the embeddings the scale a model built from the current config has (after ``hidden_size`` changed)."""

    def rotation_problem(self) -> str | None:
        """Why rotating the residual stream (SliceGPT) would change this model's function; ``None`` if it would not."""
        return "computational invariance has not been worked out for this family"

    # -- per-family parts ---------------------------------------------------------------------
    def attention(self, block: nn.Module) -> Attention:
        raise NotImplementedError

    def mlp(self, block: nn.Module) -> Mlp:
        raise NotImplementedError

    def norms(self, block: nn.Module) -> dict[str, nn.Module]:
        raise NotImplementedError

    def _heads(self) -> tuple[int, int, int]:
        cfg = self.config
        heads = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return heads, kv, head_dim


def heads_from_weights(attn: Attention) -> Attention:
    """Head counts as the weights say: after head pruning the config may not have caught up yet."""
    q_width = linear_weight(attn.o).shape[1]
    kv_width = (
        (linear_weight(attn.qkv).shape[0] - q_width) // 2 if attn.qkv is not None else linear_weight(attn.k).shape[0]
    )
    attn.num_heads, attn.num_kv_heads = q_width // attn.head_dim, kv_width // attn.head_dim
    return attn


def _has(model: nn.Module, path: str) -> bool:
    try:
        return model.get_submodule(path) is not None
    except AttributeError:
        return False


ADAPTERS: dict[str, type[ModelAdapter]] = {}


def register(adapter: type[ModelAdapter]) -> type[ModelAdapter]:
    for model_type in adapter.model_types:
        ADAPTERS[model_type] = adapter
    return adapter


def supported_families() -> str:
    families: dict[str, list[str]] = {}
    for model_type, adapter in ADAPTERS.items():
        families.setdefault(adapter.family, []).append(model_type)
    return "; ".join(f"{fam} ({', '.join(types)})" for fam, types in families.items())


def adapter_for_config(config) -> type[ModelAdapter]:
    """The adapter class for a config; an unsupported one gets an error listing the families."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise PrunekitError(f"unsupported architecture {model_type!r}; supported families: {supported_families()}")
    return ADAPTERS[model_type]


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for a loaded model."""
    return adapter_for_config(model.config)(model)

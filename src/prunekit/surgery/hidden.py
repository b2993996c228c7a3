"""Hidden-size surgery by computational invariance (SliceGPT, Ashkboos et al. 2024): fold the norms, rotate the
residual stream, slice it.

A pre-norm transformer reads its residual stream only through norms and writes it only through the
embeddings and the output projections (o, down). Once every norm is an RMSNorm whose scale sits in the
linears that read it, ``RMSNorm(x Q) = RMSNorm(x) Q`` for any orthogonal ``Q``: rotating what writes
a stream by ``Q`` and what reads it by ``Q`` again leaves the function unchanged. LayerNorm families
(OPT, GPT-2) get there first: their scale and bias are folded into the next linears and the stream is
kept zero-mean (embeddings and writers centred), where LayerNorm and RMSNorm agree.

Each block has two streams with their own basis (SliceGPT's layout for sequential blocks): the one
its attention reads, and the one its MLP reads. Where the basis changes, the residual needs the
shortcut matrix ``Q_inᵀ Q_out``. transformers adds the residual inside the decoder layer, so a
``Shortcut`` is a parameter of the block with two hooks: one remembers the stream entering the
sub-layer's norm, the other adds ``x S - x`` to the sub-layer's output projection; the layer's own
``x + output`` then makes it ``x S + output``. The extra rounding is that of one more addition.

Slicing keeps the leading ``size`` coordinates of every basis (the principal components, largest
first). The norms keep dividing by the original width (``RMSNorm.divisor``), so the sliced stream
is normalised as the full one was. All fusions run in float64 and are cast back once.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models import Block, get_adapter, linear_weight
from prunekit.surgery.linear import add_output_bias, keep_leading_inputs, keep_leading_outputs, narrow_parameter

SHORTCUTS = {"attention": "attn_shortcut", "mlp": "mlp_shortcut"}


class RMSNorm(nn.Module):
    """``weight * x / sqrt(sum(x²) / divisor + eps)``, in float32 like transformers' RMSNorms.

    ``divisor`` is the hidden width before slicing: the trailing coordinates slicing deletes carried
    (nearly) nothing, so the sum over the kept ones stands for the whole."""

    def __init__(self, size: int, divisor: int, eps: float, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device))
        self.divisor, self.eps = divisor, eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) / self.divisor + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, divisor={self.divisor}, eps={self.eps}"


class Shortcut(nn.Module):
    """The residual's change of basis at one residual add: ``x -> x @ weight`` (see the module docstring)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.residual: torch.Tensor | None = None
        self.handles: list = []


# -- which modules read and write the stream -------------------------------------------------------


def readers(block: Block, part: str) -> list[nn.Module]:
    """The linears that read the stream through the norm in front of ``part`` ("attention" or "mlp")."""
    attn, mlp = block.attention, block.mlp
    if part == "attention":
        return [attn.qkv] if attn.qkv is not None else [attn.q, attn.k, attn.v]
    return [m for m in (mlp.gate_up, mlp.gate, mlp.up) if m is not None]


def writer(block: Block, part: str) -> nn.Module:
    return block.attention.o if part == "attention" else block.mlp.down


def norm_before(block: Block, part: str) -> nn.Module:
    return block.norm_before(part)


@dataclass
class Stream:
    """Every module that touches the residual stream, by what it does with it. Hidden-size surgery (SliceGPT's
    slicing, Minitron's channel removal) cuts all of them along the stream's width, and only them."""

    embeddings: list[nn.Module]  # write it: weight [vocab or positions, width]
    readers: list[nn.Module]  # linears that read it through a norm: input features
    writers: list[nn.Module]  # linears whose output is added to it: output features and bias
    norms: list[nn.Module]  # every norm over its width, the final one last: weight (and LayerNorm's bias)
    head: nn.Module  # reads the final norm's output: input features


def stream(model: nn.Module) -> Stream:
    adapter = get_adapter(model)
    blocks = [adapter.block(i) for i in range(adapter.num_blocks())]
    return Stream(
        embeddings=adapter.embeddings(),
        readers=[linear for b in blocks for part in SHORTCUTS for linear in readers(b, part)],
        writers=[writer(b, part) for b in blocks for part in SHORTCUTS],
        norms=[norm for b in blocks for norm in b.norms.values()] + [adapter.final_norm()],
        head=adapter.lm_head(),
    )


def norm_eps(norm: nn.Module) -> float:
    """The epsilon of a norm: LayerNorm's and Gemma's ``eps``, the other RMSNorms' ``variance_epsilon``."""
    return norm.eps if hasattr(norm, "eps") else norm.variance_epsilon


def set_norm_eps(norm: nn.Module, eps: float) -> None:
    setattr(norm, "eps" if hasattr(norm, "eps") else "variance_epsilon", eps)


def check_invariant(model: nn.Module) -> None:
    """Refuse a model whose family cannot be rotated, saying why."""
    adapter = get_adapter(model)
    problem = adapter.rotation_problem()
    if problem:
        raise PrunekitError(f"SliceGPT cannot rotate this {adapter.family} model: {problem}")


def hidden_width(model: nn.Module) -> int:
    return get_adapter(model).embeddings()[0].weight.shape[1]


# -- making the stream rotatable -------------------------------------------------------------------


@torch.no_grad()
def make_invariant(model: nn.Module) -> None:
    """Untie the head, centre the stream (LayerNorm families), fold every norm into its readers.

    Afterwards every norm is a ``RMSNorm`` with weight 1 and the model computes the same function."""
    check_invariant(model)
    adapter = get_adapter(model)
    untie_head(model)
    blocks = [adapter.block(i) for i in range(adapter.num_blocks())]
    norms = [norm_before(b, part) for b in blocks for part in SHORTCUTS] + [adapter.final_norm()]
    if any(isinstance(norm, nn.LayerNorm) for norm in norms):
        _center_stream(adapter, blocks)
    width = hidden_width(model)
    for block in blocks:
        for part in SHORTCUTS:
            _fold(model, norm_before(block, part), readers(block, part), width)
    _fold(model, adapter.final_norm(), [adapter.lm_head()], width)


def untie_head(model: nn.Module) -> None:
    """Give the head its own weight: the embeddings and the head are rotated by different bases."""
    adapter = get_adapter(model)
    head, embedding = adapter.lm_head(), adapter.embeddings()[0]
    if head.weight is embedding.weight:
        head.weight = nn.Parameter(embedding.weight.detach().clone())
    model.config.tie_word_embeddings = False


def _center_stream(adapter, blocks: list[Block]) -> None:
    """Keep every write to the stream zero-mean, where LayerNorm equals RMSNorm."""
    for embedding in adapter.embeddings():
        weight = embedding.weight.double()
        embedding.weight.copy_(weight - weight.mean(-1, keepdim=True))
    for block in blocks:
        for part in SHORTCUTS:
            linear = writer(block, part)
            weight = linear_weight(linear)
            weight.copy_(weight.double() - weight.double().mean(0, keepdim=True))
            if linear.bias is not None:
                linear.bias.copy_(linear.bias.double() - linear.bias.double().mean())


def _fold(model: nn.Module, norm: nn.Module, linears: list[nn.Module], width: int) -> None:
    """Move ``norm``'s scale (and bias) into ``linears`` and put a plain ``RMSNorm`` in its place."""
    scale = norm.weight.double()
    shift = norm.bias.double() if getattr(norm, "bias", None) is not None else None
    for linear in linears:
        weight = linear_weight(linear)
        if shift is not None:
            add_output_bias(linear, (weight.double() @ shift).to(weight.dtype))
        weight.copy_(weight.double() * scale)
    replace_module(model, norm, RMSNorm(width, width, norm_eps(norm), norm.weight.dtype, norm.weight.device))


def replace_module(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    name = next(name for name, module in root.named_modules() if module is old)
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent), attr, new)


# -- rotating ----------------------------------------------------------------------------------------


def rotate_readers(linears: list[nn.Module], basis: torch.Tensor) -> None:
    """Linears reading a stream now expressed in ``basis`` (columns): ``W <- W Q``."""
    for linear in linears:
        weight = linear_weight(linear)
        weight.copy_(weight.double() @ basis)


def rotate_writer(linear: nn.Module, basis: torch.Tensor) -> None:
    """A linear writing the stream in ``basis``: ``W <- Qᵀ W``, ``b <- b Q``."""
    weight = linear_weight(linear)
    weight.copy_(basis.T @ weight.double())
    if linear.bias is not None:
        linear.bias.copy_(linear.bias.double() @ basis)


def rotate_embedding(embedding: nn.Module, basis: torch.Tensor) -> None:
    embedding.weight.copy_(embedding.weight.double() @ basis)


@torch.no_grad()
def rotate_block(block: Block, entering: torch.Tensor, middle: torch.Tensor, leaving: torch.Tensor) -> None:
    """Rotate a block whose input stream is in basis ``entering``, its MLP's input in ``middle``,
    its output in ``leaving``; attach the two shortcuts between them."""
    rotate_readers(readers(block, "attention"), entering)
    rotate_writer(writer(block, "attention"), middle)
    rotate_readers(readers(block, "mlp"), middle)
    rotate_writer(writer(block, "mlp"), leaving)
    dtype = block.mlp.down.weight.dtype
    attach_shortcut(block, "attention", (entering.T @ middle).to(dtype))
    attach_shortcut(block, "mlp", (middle.T @ leaving).to(dtype))


def attach_shortcut(block: Block, part: str, weight: torch.Tensor) -> None:
    shortcut = Shortcut(weight)
    block.module.add_module(SHORTCUTS[part], shortcut)
    hook_shortcut(block, part)


def hook_shortcut(block: Block, part: str) -> None:
    """Wire the block's ``Shortcut`` for ``part`` into its forward (again, after a reload or a copy)."""
    shortcut = getattr(block.module, SHORTCUTS[part])
    for handle in shortcut.handles:
        handle.remove()
    shortcut.handles = [
        norm_before(block, part).register_forward_pre_hook(partial(_remember_residual, shortcut)),
        writer(block, part).register_forward_hook(partial(_change_basis, shortcut)),
    ]


def _remember_residual(shortcut: Shortcut, module, args) -> None:
    shortcut.residual = args[0]


def _change_basis(shortcut: Shortcut, module, args, output):
    residual, shortcut.residual = shortcut.residual, None
    if residual is None:
        raise PrunekitError("a SliceGPT shortcut ran without the residual its norm passes it; run the whole block")
    return output + (residual @ shortcut.weight - residual)


# -- slicing ---------------------------------------------------------------------------------------


@torch.no_grad()
def slice_hidden(model: nn.Module, size: int) -> None:
    """Keep the leading ``size`` coordinates of the stream in every module that touches it.

    Works on meta tensors too (``narrow`` needs no values), so the loader reshapes before it reads."""
    parts = stream(model)
    for embedding in parts.embeddings:
        embedding.weight = narrow_parameter(embedding.weight, 1, size)
        embedding.embedding_dim = size
    for linear in [*parts.readers, parts.head]:
        keep_leading_inputs(linear, size)
    for linear in parts.writers:
        keep_leading_outputs(linear, size)
    for norm in parts.norms:
        norm.weight = narrow_parameter(norm.weight, 0, size)
    for block in get_adapter(model).blocks():
        for name in SHORTCUTS.values():
            shortcut = getattr(block, name, None)
            if shortcut is not None:
                shortcut.weight = narrow_parameter(narrow_parameter(shortcut.weight, 0, size), 1, size)


# -- describing and rebuilding a sliced model ------------------------------------------------------


def describe_hidden(model: nn.Module) -> dict | None:
    """The manifest entry of a model made invariant (``None`` otherwise): what ``apply_hidden`` needs."""
    norm = get_adapter(model).final_norm()
    if not isinstance(norm, RMSNorm):
        return None
    block = get_adapter(model).blocks()[0]
    return {
        "size": int(norm.weight.shape[0]),
        "divisor": norm.divisor,
        "eps": norm.eps,
        "shortcuts": all(hasattr(block, name) for name in SHORTCUTS.values()),
    }


def apply_hidden(model: nn.Module, entry: dict) -> None:
    """Give a model freshly built from its config the structure ``entry`` describes (values come later)."""
    try:
        size, divisor, eps = int(entry["size"]), int(entry["divisor"]), float(entry["eps"])
        shortcuts = bool(entry["shortcuts"])
    except (KeyError, TypeError, ValueError):
        raise PrunekitError(
            f"the manifest's hidden entry needs size, divisor, eps and shortcuts, got {entry!r}; re-save the model"
        ) from None
    adapter = get_adapter(model)
    width = hidden_width(model)
    if not 0 < size <= width:
        raise PrunekitError(f"the manifest slices the hidden size to {size}, but the config builds {width}")
    reference = adapter.embeddings()[0].weight
    blocks = [adapter.block(i) for i in range(adapter.num_blocks())]
    for norm in [norm_before(b, part) for b in blocks for part in SHORTCUTS] + [adapter.final_norm()]:
        replace_module(model, norm, RMSNorm(width, divisor, eps, reference.dtype, reference.device))
    if shortcuts:
        blocks = [adapter.block(i) for i in range(adapter.num_blocks())]  # views of the new norms
        for block in blocks:
            for part in SHORTCUTS:
                attach_shortcut(block, part, torch.zeros(width, width, dtype=reference.dtype, device=reference.device))
    slice_hidden(model, size)

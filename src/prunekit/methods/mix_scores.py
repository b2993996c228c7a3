"""The mix search's table: every block's choices, what each removes, and the damage each does.

A choice is one attention option (every query head; the heads a ``--head-levels`` fraction keeps, as
width pruning's GQA policy keeps them; none) times one MLP option (every neuron; the neurons a
``--mlp-levels`` fraction keeps, by Minitron's activation importance as width pruning ranks them;
none). No attention and no MLP is the block removed.

Cost: the parameters a choice removes, counted exactly from the block's weights and biases (a test
checks them against the pruned model).

Damage: one pass of the sequential engine over the dense model (read-only, checkpointed, resumable).
Each block, on the inputs the dense model gives it, is run once to collect the activation norms (its
outputs are the next block's inputs), then once per attention option with hooks that leave the removed
heads out (their columns of ``o`` see zeros: exactly what removing them computes) or the attention out
altogether. In that same forward the MLP's output projection sees every neuron; since the block adds
``down``'s output to the residual stream as it is, the output with only the best ``k`` neurons is the
output minus ``down``'s output plus ``down`` applied to those ``k`` (nested sets: one product in all),
so every MLP option costs no forward of its own. That addition is checked on the first batch of each
block against a real forward with the neurons masked; where it fails (Gemma 3 normalises the MLP's
output before adding it) the block runs once per choice instead. About 1 + (attention options) block
forwards per block: with the defaults about 6 calibration forwards in all.

Per choice the pass records the squared error of the block's output against the dense output and the
summed per-token cosine distance; per block the squared norm of the dense output. The damage the
solver minimises is computed from these (``damage``), so a second budget, or another damage measure,
needs no forward at all.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prunekit.methods.allocation import Shape, head_options, round_down
from prunekit.methods.width import WidthConfig, collect_moments, keep_heads, score_block
from prunekit.models import Block, get_adapter, linear_weight
from prunekit.sequential import BlockStep, call_block
from prunekit.surgery.depth import sublayer_params
from prunekit.surgery.linear import in_features, out_features
from prunekit.surgery.width import BlockShape, block_shape

DAMAGES = ("mse", "cosine")
ADDITIVE_TOLERANCE = 1e-4  # relative error of the shortcut for MLP options against a real masked forward


@dataclass(frozen=True)
class Choice:
    """What one block keeps: query and KV heads (0: no attention) and MLP neurons (0: no MLP)."""

    num_heads: int
    num_kv_heads: int
    intermediate_size: int

    @property
    def removes_block(self) -> bool:
        return self.num_heads == 0 and self.intermediate_size == 0

    def describe(self, dense: BlockShape) -> str:
        if self.removes_block:
            return "block removed"
        attention = "no attention" if self.num_heads == 0 else f"heads {self.num_heads}/{dense.num_heads}"
        mlp = "no MLP" if self.intermediate_size == 0 else f"MLP {self.intermediate_size}/{dense.intermediate_size}"
        return f"{attention}, {mlp}"


@dataclass(frozen=True)
class Space:
    """The options every block chooses from (fractions kept besides all and none)."""

    mlp_levels: tuple[float, ...]
    head_levels: tuple[float, ...]
    gqa: str
    round_to: int

    def policy(self, shape: BlockShape) -> str:
        """Without grouped queries (one query head per KV head) a head goes with its keys and values."""
        return "kv-groups" if shape.num_heads == shape.num_kv_heads else self.gqa

    def attention_options(self, shape: BlockShape) -> list[tuple[int, int]]:
        reachable = head_options(shape.num_heads, shape.num_kv_heads, self.policy(shape))
        options = [reachable[0]]
        for fraction in self.head_levels:
            nearest = min(reachable, key=lambda o: (abs(o[0] - fraction * shape.num_heads), -o[0]))
            if nearest not in options:
                options.append(nearest)
        return [*options, (0, 0)]

    def mlp_options(self, shape: BlockShape) -> list[int]:
        full = shape.intermediate_size
        widths = [full]
        for fraction in self.mlp_levels:
            width = round_down(fraction * full, self.round_to)
            if width < full and width not in widths:
                widths.append(width)
        return [*widths, 0]

    def choices(self, shape: BlockShape) -> list[Choice]:
        return [Choice(q, kv, w) for q, kv in self.attention_options(shape) for w in self.mlp_options(shape)]


@dataclass
class Importance:
    """A block's ranking: its MLP neurons best first, and a score per query head (higher = keep)."""

    neurons: torch.Tensor
    heads: torch.Tensor

    def kept_heads(self, space: Space, shape: BlockShape, choice: Choice) -> torch.Tensor:
        target = Shape(shape.intermediate_size, choice.num_heads, choice.num_kv_heads)
        return keep_heads(space.policy(shape), self.heads, shape.num_heads, shape.num_kv_heads, target)


def activation_importance(step: BlockStep) -> tuple[Importance, list[torch.Tensor]]:
    """Minitron's activation norms, as width pruning computes them, and the block's dense outputs."""
    moments, outputs = collect_moments(step)
    scores = score_block(WidthConfig(importance="activation"), step.block, moments, None, None)
    order = torch.argsort(scores.neurons, descending=True, stable=True)
    return Importance(order.cpu(), scores.heads.sum(1).cpu()), outputs


@torch.enable_grad()
def stream_gradients(model, tokens: torch.Tensor, batch_size: int, offload) -> list[list[torch.Tensor]]:
    """``g[i][b]``: the gradient of batch ``b``'s summed next-token loss with respect to block ``i``'s output.

    One forward and backward per batch through the whole model (no weight needs a gradient: the graph
    starts at the embeddings' output). Kept in bfloat16 on ``offload``: tokens x hidden x blocks."""
    adapter = get_adapter(model)
    blocks = adapter.blocks()
    grads: list[list[torch.Tensor]] = [[] for _ in blocks]
    device = adapter.embeddings()[0].weight.device
    flags = {p: p.requires_grad for p in model.parameters()}

    def keep(i):
        def hook(module, args, out):
            hidden = out[0] if isinstance(out, tuple) else out
            hidden.register_hook(lambda g: grads[i].append(g.detach().to(offload, torch.bfloat16)))

        return hook

    handles = [block.register_forward_hook(keep(i)) for i, block in enumerate(blocks)]
    handles.append(adapter.embeddings()[0].register_forward_hook(lambda m, a, out: out.detach().requires_grad_()))
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for batch in tokens.split(batch_size):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").backward()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return grads


# -- costs -----------------------------------------------------------------------------------------


def _row_params(linear) -> int:
    """Parameters of one output row: its weights and its bias entry."""
    return in_features(linear) + (1 if getattr(linear, "bias", None) is not None else 0)


def removed_params(block: Block, choice: Choice) -> int:
    """The parameters ``choice`` removes from the dense ``block`` (exactly, biases and norms included)."""
    if choice.removes_block:
        return sum(p.numel() for p in block.module.parameters())
    shape, attn, mlp = block_shape(block), block.attention, block.mlp
    if choice.num_heads == 0:
        attention = sublayer_params(block, "attention")
    else:
        per_query = attn.head_dim * (_row_params(attn.qkv or attn.q) + out_features(attn.o))
        per_kv = 2 * attn.head_dim * _row_params(attn.qkv or attn.k)
        attention = (shape.num_heads - choice.num_heads) * per_query + (
            shape.num_kv_heads - choice.num_kv_heads
        ) * per_kv
    if choice.intermediate_size == 0:
        return attention + sublayer_params(block, "mlp")
    rows = 2 * _row_params(mlp.gate_up) if mlp.gate_up is not None else sum(_row_params(m) for m in (mlp.gate, mlp.up) if m)
    return attention + (shape.intermediate_size - choice.intermediate_size) * (rows + out_features(mlp.down))


# -- hooks that make the dense block compute a choice -------------------------------------------------


def _channels(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


@contextlib.contextmanager
def _hooks(module, pre=None, post=None):
    handles = [module.register_forward_pre_hook(pre)] if pre else []
    handles += [module.register_forward_hook(post)] if post else []
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _keep_inputs(module, channels: torch.Tensor | None):
    """``module`` sees only the input ``channels`` (``None``: nothing at all, its output is zero)."""
    if channels is None:
        return _hooks(module, post=lambda m, args, out: torch.zeros_like(out))
    mask = torch.zeros(in_features(module), dtype=torch.bool)
    mask[channels] = True

    def pre(m, args):
        return (args[0] * mask.to(args[0].device), *args[1:])

    return _hooks(module, pre=pre)


def _attention_as(block: Block, importance: Importance, space: Space, shape: BlockShape, choice: Choice):
    if choice.num_heads == shape.num_heads:
        return contextlib.nullcontext()
    if choice.num_heads == 0:
        return _keep_inputs(block.attention.o, None)
    heads = importance.kept_heads(space, shape, choice)
    return _keep_inputs(block.attention.o, _channels(heads, block.attention.head_dim))


def _mlp_as(block: Block, importance: Importance, width: int, full: int):
    if width == full:
        return contextlib.nullcontext()
    return _keep_inputs(block.mlp.down, importance.neurons[:width] if width else None)


# -- measuring -------------------------------------------------------------------------------------


class _Errors:
    """Squared error and summed per-token cosine distance of a choice's outputs against the dense ones."""

    def __init__(self):
        self.sse = 0.0
        self.cosine = 0.0
        self.fisher = 0.0
        self.first = 0.0

    def add(self, output: torch.Tensor, dense: torch.Tensor, dense_norms: torch.Tensor, grad=None) -> None:
        diff = output - dense
        self.sse += float(torch.linalg.vector_norm(diff, dtype=torch.float64) ** 2)
        cos = (output * dense).sum(-1) / (output.norm(dim=-1) * dense_norms).clamp_min(1e-30)
        self.cosine += float((1 - cos).sum(dtype=torch.float64))
        if grad is not None:
            change = (diff * grad).sum(-1)  # per token: the loss's first-order change
            self.first += float(change.sum(dtype=torch.float64))
            self.fisher += float(change.pow(2).sum(dtype=torch.float64))


def _mlp_shortcut(y, down_in, down_out, down, order, widths) -> dict[int, torch.Tensor]:
    """The block's outputs for every MLP width from one forward (see the module docstring)."""
    weight = linear_weight(down).detach().float()[:, order].T  # [neurons, out], best neuron first
    bias = getattr(down, "bias", None)
    base = (y - down_out.float().reshape(y.shape)).reshape(-1, y.shape[-1])  # the stream without the MLP (OPT: 2-D)
    ordered = down_in.float().reshape(-1, down_in.shape[-1])[:, order]
    partial = base if bias is None else base + bias.float()
    done, outputs = 0, {}
    for width in sorted(widths):
        if width:  # the neurons done..width added to the output of the best ``done``
            partial = torch.addmm(partial, ordered[:, done:width], weight[done:width])
            done = width
        outputs[width] = (partial if width else base).reshape(y.shape)
    return outputs


@torch.no_grad()
def measure_block(space: Space, step: BlockStep, grads: list[torch.Tensor] | None = None) -> dict:
    """The engine step of the scoring pass: every choice of this block, its cost and its errors.

    The first pass is the dense block (its outputs go on as the next block's inputs); it collects the
    activation norms and keeps what ``down`` saw, so the MLP options of the full attention need no forward."""
    block = step.block
    shape = block_shape(block)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def capture(module, args, out):
        seen.append((args[0].to(step.offload), out.to(step.offload)))

    with _hooks(block.mlp.down, post=capture):
        importance, dense = activation_importance(step)
    step.accept(dense)  # nothing changes in this pass: the dense outputs are the next block's inputs
    widths = space.mlp_options(shape)
    errors = {choice: _Errors() for choice in space.choices(shape)}
    targets = [d.to(step.device).float() for d in dense]
    norms = [t.norm(dim=-1) for t in targets]
    additive = None
    for q, kv in space.attention_options(shape):
        with _attention_as(block, importance, space, shape, Choice(q, kv, shape.intermediate_size)):
            for b, (hidden, call) in enumerate(zip(step.inputs, step.calls, strict=True)):
                if q == shape.num_heads:  # the dense pass above computed this one
                    y, (down_in, down_out) = targets[b], seen[b]
                else:
                    latest = {}
                    with _hooks(block.mlp.down, post=lambda m, args, out: latest.update(down=(args[0], out))):
                        y = call_block(block.module, hidden, call, step.device).float()
                    down_in, down_out = latest["down"]
                outputs = _mlp_shortcut(y, down_in.to(step.device), down_out.to(step.device), block.mlp.down,
                                        importance.neurons, widths)  # fmt: skip
                if additive is None:
                    additive = _check_shortcut(block, importance, widths, shape, hidden, call, step.device, outputs)
                if not additive:
                    outputs = {w: _masked(block, importance, w, shape, hidden, call, step.device) for w in widths}
                grad = grads[b].to(step.device).float() if grads is not None else None
                for width, output in outputs.items():
                    errors[Choice(q, kv, width)].add(output, targets[b], norms[b], grad)
    return {
        "dense": {"num_heads": shape.num_heads, "num_kv_heads": shape.num_kv_heads,
                  "intermediate_size": shape.intermediate_size},
        "norm2": float(sum(float(t.double().pow(2).sum()) for t in targets)),
        "tokens": sum(t[..., 0].numel() for t in targets),
        "additive": bool(additive),
        "choices": [
            {**vars(choice), "params": removed_params(block, choice), "sse": e.sse, "cosine": e.cosine,
             **({"fisher": e.fisher, "first": e.first} if grads is not None else {})}
            for choice, e in errors.items()
        ],
        "importance": {"neurons": importance.neurons.tolist(), "heads": importance.heads.tolist()},
    }  # fmt: skip


def _masked(block, importance, width, shape, hidden, call, device) -> torch.Tensor:
    with _mlp_as(block, importance, width, shape.intermediate_size):
        return call_block(block.module, hidden, call, device).float()


def _check_shortcut(block, importance, widths, shape, hidden, call, device, outputs) -> bool:
    """Does the shortcut give what a forward with the neurons masked gives (the smallest width, one batch)?"""
    width = min(w for w in widths if w)
    real = _masked(block, importance, width, shape, hidden, call, device)
    return float((outputs[width] - real).norm()) <= ADDITIVE_TOLERANCE * float(real.norm())


def damage(row: dict, choice: dict, measure: str) -> float:
    """A choice's damage from its recorded errors: ``mse``, the squared error over the dense output's
    squared norm (relative error of the residual stream after the block); ``cosine``, the mean per-token
    cosine distance between the two (ShortGPT's block influence, for the block removed)."""
    if measure == "mse":
        return choice["sse"] / row["norm2"] if row["norm2"] else 0.0
    return choice["cosine"] / row["tokens"] if row["tokens"] else 0.0

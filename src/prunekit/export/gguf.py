"""Export to GGUF, llama.cpp's format: every llama-family model prunekit makes, optionally quantized.

Written with the ``gguf`` package's ``GGUFWriter`` and tensor-name maps (no vendored converter).
What llama.cpp's loader accepts decides the layout (read from its ``src/llama-model.cpp`` and
``src/models/deci.cpp``):

- a model whose blocks all have the same shape (dense, uniform width, blocks removed) keeps the plain
  ``llama`` architecture, scalar hyper-parameters;
- any other (per-block MLP widths, query or KV heads; a block without attention or MLP) is written as
  ``deci``, whose loader reads ``feed_forward_length``, ``attention.head_count`` and
  ``attention.head_count_kv`` as per-layer arrays, zero meaning the sub-layer is absent.

Two limits of llama.cpp's ``deci`` are worked around with exact zero stand-ins (they add nothing):
its graph skips a block's whole output when ``feed_forward_length`` is 0 but attention is present
(``if (n_ff == 0) continue`` before the residual is kept), so a block without MLP gets a 32-wide MLP of
zeros; and the loader takes the head size from block 0's head count (0 heads: no attention anywhere),
so a block 0 without attention gets one head of zeros. The report lists them.

HF Llama stores Q and K rows for rotate-half RoPE; llama.cpp rotates adjacent pairs, so those rows
are permuted per head, as llama.cpp's own converter does. Unstructured / N:M zeros are written as
zeros: llama.cpp runs dense kernels, so they make the file neither smaller nor faster.

The tokenizer comes from the GGUF the model was made from when there is one (the default model's
alias), else it is converted from the tokenizer (byte-level BPE, via ``gguf.SpecialVocab``).

The file is written beside ``out`` under a temporary name and renamed into place when complete: a
refusal, an error or an interruption leaves no file at ``out``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from prunekit.data import adds_bos
from prunekit.errors import PrunekitError
from prunekit.export.gguf_quant import HEAD_QUANT, QUANT_BLOCK, check_quant, encode
from prunekit.io.aliases import ALIASES, alias_gguf, cache_dir
from prunekit.io.load import load
from prunekit.io.manifest import read_manifest
from prunekit.methods.quant import grid_of, per_column
from prunekit.models import get_adapter
from prunekit.surgery.depth import kept_sublayers
from prunekit.surgery.hidden import describe_hidden

log = logging.getLogger(__name__)

STAND_IN_FF = QUANT_BLOCK  # the zero MLP of a block whose MLP was removed: one quantization block wide
FAMILIES = ("llama", "mistral")  # model types written as llama.cpp's llama / deci
SPARSE_NOTE_MIN = 0.01  # a zero fraction of block weights above this is reported as sparsity


@dataclass
class BlockPlan:
    """One block as GGUF describes it: 0 heads / 0 MLP width means the sub-layer is absent."""

    heads: int
    kv_heads: int
    ff: int
    attention: bool
    mlp: bool
    stand_ins: list[str] = field(default_factory=list)  # zero sub-layers written because llama.cpp needs them

    def shape(self) -> tuple[int, int, int]:
        return self.heads, self.kv_heads, self.ff


@dataclass
class GgufReport:
    """What ``export_gguf`` wrote."""

    path: str
    arch: str  # llama.cpp architecture: "llama" (uniform blocks) or "deci" (per-layer shapes)
    quant: str
    file_bytes: int
    tensors: int
    blocks: int
    feed_forward_length: list[int]
    head_count: list[int]
    head_count_kv: list[int]
    tokenizer: str  # where the tokenizer came from
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        size = self.file_bytes / 2**20
        lines = [f"wrote {self.path} ({self.arch}, {self.quant}, {size:.1f} MiB, {self.blocks} blocks)"]
        return "\n".join(lines + self.notes)


# -- public API ------------------------------------------------------------------------------------


def export_gguf_model(
    model: str | os.PathLike, out: str | os.PathLike, quant: str = "f32", overwrite: bool = False
) -> GgufReport:
    """``prunekit export MODEL --format gguf --quant QUANT --out OUT [--overwrite]`` in one call.

    Args:
        model: ``MODEL``: a prunekit output folder, a model folder or the alias ``smollm2-135m``.
        out: ``--out``: the ``.gguf`` file to write.
        quant: ``--quant``: one of f32, f16, bf16, q8_0, q4_0.
        overwrite: ``--overwrite``: replace an existing file.
    """
    check_quant(quant)
    check_gguf_output(out, overwrite)  # before the load, so a bad --out costs nothing
    loaded, tokenizer = load(model, dtype="float32")
    if getattr(loaded.config, "quantization_config", None) is not None:
        from prunekit.export.compressed import decompress_recording_grids

        decompress_recording_grids(loaded)  # GPTQ's codes and scales, for q8_0 / q4_0 to keep as they are
    return export_gguf(loaded, tokenizer, out, quant, source=str(model), overwrite=overwrite)


def export_gguf(
    model,
    tokenizer,
    out: str | os.PathLike,
    quant: str = "f32",
    *,
    source: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> GgufReport:
    """Write ``model`` (as ``prunekit.load`` returns it) and its tokenizer to the GGUF file ``out``.

    ``source`` is what the model was loaded from (an alias, a folder, a ``.gguf`` file): when it leads
    to a GGUF (the alias, or a prunekit output whose ``prunekit.json`` names one as its source), that
    file's tokenizer metadata is copied; otherwise ``tokenizer`` is converted. What GGUF cannot express
    (SliceGPT's rotated stream, families other than Llama/Mistral, a row length a block quantization
    cannot split) is refused with a ``PrunekitError`` before anything is written.
    """
    check_quant(quant)
    out = check_gguf_output(out, overwrite)
    plans = plan_blocks(model)
    arch = "llama" if _uniform(plans) else "deci"
    tensors, grids = gguf_tensors(model, plans, arch)
    head = "output.weight" if "output.weight" in tensors else "token_embd.weight"  # tied: the embedding
    encoded = {name: encode(name, data, HEAD_QUANT.get(quant, quant) if name == head else quant, grids.get(name))
               for name, data in tensors.items()}  # fmt: skip
    tokenizer_fields, tokenizer_origin = tokenizer_metadata(model, tokenizer, source)
    _write_atomically(out, lambda path: _write(path, model, plans, arch, quant, encoded, tokenizer_fields))
    return GgufReport(
        path=str(out),
        arch=arch,
        quant=quant,
        file_bytes=out.stat().st_size,
        tensors=len(encoded),
        blocks=len(plans),
        feed_forward_length=[p.ff for p in plans],
        head_count=[p.heads for p in plans],
        head_count_kv=[p.kv_heads for p in plans],
        tokenizer=tokenizer_origin,
        notes=_notes(model, plans),
    )


# -- checks ----------------------------------------------------------------------------------------


def check_gguf_output(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing file (unless overwriting), a folder, or a missing parent folder, before any work."""
    out = Path(out)
    if out.is_dir():
        raise PrunekitError(f"--out {out} is a folder; give a file path such as {out / 'model.gguf'}")
    if out.exists() and not overwrite:
        raise PrunekitError(f"output {out} already exists; pass --overwrite to replace it or choose another --out")
    if not out.parent.is_dir():
        raise PrunekitError(f"the parent folder of --out ({out.parent}) does not exist; create it first")
    return out


def plan_blocks(model) -> list[BlockPlan]:
    """Each block's GGUF shape, or a ``PrunekitError`` saying why GGUF cannot express this model."""
    config = model.config
    if config.model_type not in FAMILIES:
        raise PrunekitError(
            f"GGUF export writes the Llama family ({', '.join(FAMILIES)}); {config.model_type!r} is not supported yet"
        )
    if any(p.is_meta for p in model.parameters()):
        raise PrunekitError("GGUF export needs the model in memory; load it without --lazy")
    if describe_hidden(model) is not None:
        raise PrunekitError(
            "this model's residual stream was rotated and sliced (SliceGPT): its shortcut matrices and "
            "norm divisor have no GGUF form; export a width- or depth-pruned model instead"
        )
    window = getattr(config, "sliding_window", None)
    if window and window < config.max_position_embeddings:
        raise PrunekitError(
            f"this model uses sliding-window attention ({window} tokens), which llama.cpp's llama architecture "
            "does not apply; refusing to write a model that would compute differently"
        )
    _check_rope(config)
    if getattr(config, "hidden_act", "silu") != "silu":
        raise PrunekitError(f"llama.cpp's llama MLP is SwiGLU (silu); this model uses {config.hidden_act!r}")
    adapter = get_adapter(model)
    head_dim = _head_dim(config)
    plans = []
    for module in adapter.blocks():
        kept = kept_sublayers(module)
        heads = kv = ff = 0
        if kept["attention"]:
            heads = module.self_attn.q_proj.weight.shape[0] // head_dim
            kv = module.self_attn.k_proj.weight.shape[0] // head_dim
        if kept["mlp"]:
            ff = module.mlp.gate_proj.weight.shape[0]
        plans.append(BlockPlan(heads, kv, ff, kept["attention"], kept["mlp"]))
    _add_stand_ins(plans)
    return plans


def _add_stand_ins(plans: list[BlockPlan]) -> None:
    """Zero sub-layers where llama.cpp's deci cannot take an absent one (see the module docstring)."""
    for index, plan in enumerate(plans):
        if plan.attention and not plan.mlp:
            plan.ff = STAND_IN_FF
            plan.stand_ins.append("mlp")
        if index == 0 and not plan.attention:
            plan.heads = plan.kv_heads = 1
            plan.stand_ins.append("attention")


def _uniform(plans: list[BlockPlan]) -> bool:
    return all(p.attention and p.mlp for p in plans) and len({p.shape() for p in plans}) == 1


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope_parameters(config) -> dict:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return {"rope_type": params.get("rope_type", "default"), "rope_theta": float(theta)}


def _check_rope(config) -> None:
    rope = _rope_parameters(config)
    if rope["rope_type"] != "default":  # transformers 5 keeps any scaling (llama3, yarn, ...) here
        raise PrunekitError(
            f"RoPE scaling {rope['rope_type']!r} is not written to GGUF yet; only plain RoPE (rope_type default)"
        )


# -- tensors ---------------------------------------------------------------------------------------


def gguf_tensors(model, plans: list[BlockPlan], arch: str) -> tuple[dict[str, np.ndarray], dict[str, tuple]]:
    """GGUF tensor name -> float32 array (numpy [out, in], as GGUF stores a row-major ggml tensor); and for
    the weights GPTQ quantized, GGUF name -> (scale, zero point) of every weight, rows ordered as the weight's."""
    import gguf

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DECI if arch == "deci" else gguf.MODEL_ARCH.LLAMA, len(plans))
    head_dim = _head_dim(model.config)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    tensors, grids = {}, {}
    for name, value in model.state_dict().items():
        if value.numel() == 0 or (tied and name == "lm_head.weight"):
            continue  # zero-size markers of removed sub-layers; a tied head is the embedding
        block, part = _block_part(name)
        if block is not None and not _written(plans[block], part):
            continue  # the norm of a removed sub-layer: llama.cpp loads no tensor for it
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise PrunekitError(f"the tensor {name} has no GGUF name in llama.cpp's llama layout; cannot export it")
        arrays = [value, *_column_grid(model, name, value)]
        arrays = [a.detach().to("cpu", torch.float32).numpy() for a in arrays]
        if block is not None and name.split(".")[-2] in ("q_proj", "k_proj"):
            heads = plans[block].heads if "q_proj" in name else plans[block].kv_heads
            arrays = [_rope_permute(a, heads, head_dim) for a in arrays]  # rows move with their scales
        tensors[gguf_name] = arrays[0]
        if len(arrays) == 3:
            grids[gguf_name] = tuple(arrays[1:])
    for block, plan in enumerate(plans):
        tensors.update(_stand_in_tensors(block, plan, model.config.hidden_size, head_dim))
    return tensors, grids


def _column_grid(model, name: str, value: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(scales, zeros)`` per weight, the weight's shape, when ``name`` is the weight of a linear GPTQ
    quantized (its grid recorded); else ``()``."""
    if not name.endswith(".weight"):
        return ()
    grid = grid_of(model.get_submodule(name.removesuffix(".weight")))
    if grid is None:
        return ()
    columns, groups = value.shape[1], grid[0].shape[1]
    if columns % groups:  # the recorded grid does not say how long its groups were
        raise PrunekitError(
            f"{name} was quantized with a short last group ({columns} columns in {groups} groups); GGUF export "
            "needs a --group-size that divides every layer's width (e.g. 32 or 64), or -1"
        )
    return tuple(per_column(g.float(), columns, columns // groups) for g in grid)


def _block_part(name: str) -> tuple[int | None, str | None]:
    parts = name.split(".")
    if parts[:2] != ["model", "layers"]:
        return None, None
    if parts[3] in ("self_attn", "input_layernorm"):
        return int(parts[2]), "attention"
    return int(parts[2]), "mlp"


def _written(plan: BlockPlan, part: str) -> bool:
    """Whether this block's tensors of ``part`` go into the file: not the leftover norm of a removed part
    (a stand-in writes its own)."""
    return plan.attention if part == "attention" else plan.mlp


def _rope_permute(weight: np.ndarray, heads: int, head_dim: int) -> np.ndarray:
    """Rows of each head from rotate-half order (HF: first half, second half) to interleaved pairs (ggml)."""
    shape = weight.shape
    return weight.reshape(heads, 2, head_dim // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _stand_in_tensors(block: int, plan: BlockPlan, hidden: int, head_dim: int) -> dict[str, np.ndarray]:
    """Zero weights (unit norms) for the stand-in sub-layers of one block: they add exactly 0."""
    zeros, tensors = np.zeros, {}
    if "mlp" in plan.stand_ins:
        tensors[f"blk.{block}.ffn_norm.weight"] = np.ones(hidden, np.float32)
        tensors[f"blk.{block}.ffn_gate.weight"] = zeros((plan.ff, hidden), np.float32)
        tensors[f"blk.{block}.ffn_up.weight"] = zeros((plan.ff, hidden), np.float32)
        tensors[f"blk.{block}.ffn_down.weight"] = zeros((hidden, plan.ff), np.float32)
    if "attention" in plan.stand_ins:
        tensors[f"blk.{block}.attn_norm.weight"] = np.ones(hidden, np.float32)
        for part in ("attn_q", "attn_k", "attn_v"):
            tensors[f"blk.{block}.{part}.weight"] = zeros((head_dim, hidden), np.float32)
        tensors[f"blk.{block}.attn_output.weight"] = zeros((hidden, head_dim), np.float32)
    return tensors


# -- tokenizer -------------------------------------------------------------------------------------


def tokenizer_metadata(model, tokenizer, source) -> tuple[list[tuple], str]:
    """The ``tokenizer.*`` key-value fields, as ``(key, value, type, sub_type)``, and where they came from."""
    vocab = model.get_input_embeddings().weight.shape[0]
    gguf_path = source_gguf(source) if source is not None else None
    if gguf_path is not None:
        fields = _fields_from_gguf(gguf_path)
        tokens = next((f[1] for f in fields if f[0] == "tokenizer.ggml.tokens"), [])
        if len(tokens) == vocab:
            return fields, f"copied from {gguf_path.name}"
        log.warning("%s has %d tokens, the model %d; converting the tokenizer instead", gguf_path, len(tokens), vocab)
    return _fields_from_tokenizer(tokenizer, vocab), "converted from tokenizer.json"


def source_gguf(source: str | os.PathLike, depth: int = 0) -> Path | None:
    """The GGUF file a model was made from: the alias's, a ``.gguf`` path, or (following ``prunekit.json``'s
    ``source_model``, a few steps back) that of the model a prunekit output was pruned from."""
    text = str(source)
    if text in ALIASES:
        return alias_gguf(text)
    path = Path(text).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path
    for alias in ALIASES:  # the alias's cached fp32 folder, passed as a path
        if path.exists() and path.resolve() == (cache_dir() / "models" / alias).resolve():
            return alias_gguf(alias)
    if depth >= 8 or not path.is_dir():
        return None
    try:
        parent = (read_manifest(path).get("source_model") or {}).get("name")
    except (PrunekitError, AttributeError):
        return None
    return source_gguf(parent, depth + 1) if parent else None


def _fields_from_gguf(path: Path) -> list[tuple]:
    import gguf

    reader = gguf.GGUFReader(path)
    fields = []
    for key, item in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = item.types[0]
        sub = item.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        fields.append((key, item.contents(), vtype, sub))
    return fields


def _fields_from_tokenizer(tokenizer, vocab: int) -> list[tuple]:
    """A byte-level BPE tokenizer (GPT-2 style, ``tokenizer.json``) as llama.cpp's ``gpt2`` tokenizer model.

    Ids the tokenizer lacks up to the embedding's rows are padding tokens marked unused (as llama.cpp's
    converter does), since llama.cpp sizes the vocabulary from the token list."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    if (spec.get("model") or {}).get("type") != "BPE":
        raise PrunekitError(
            "converting this tokenizer to GGUF is not supported (only BPE tokenizer.json); export a model whose "
            "tokenizer came from a GGUF (e.g. the smollm2-135m alias) or has a BPE tokenizer.json"
        )
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab:
        raise PrunekitError(f"the tokenizer has ids up to {max(by_id)}, beyond the model's {vocab} embeddings")
    special = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    added = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    tokens, types = [], []
    for i in range(vocab):
        token = by_id.get(i)
        tokens.append(token if token is not None else f"[PAD{i}]")
        kind = (
            gguf.TokenType.UNUSED
            if token is None
            else gguf.TokenType.CONTROL
            if token in special
            else gguf.TokenType.USER_DEFINED
            if token in added
            else gguf.TokenType.NORMAL
        )
        types.append(int(kind))
    array, string, int32 = gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING, gguf.GGUFValueType.INT32
    fields = [
        ("tokenizer.ggml.model", "gpt2", string, None),
        ("tokenizer.ggml.pre", "default", string, None),
        ("tokenizer.ggml.tokens", tokens, array, string),
        ("tokenizer.ggml.token_type", types, array, int32),
    ]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    if merges:
        fields.append(("tokenizer.ggml.merges", merges, array, string))
    for key, token in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                       ("unknown", tokenizer.unk_token_id), ("padding", tokenizer.pad_token_id)):  # fmt: skip
        if token is not None:
            fields.append((f"tokenizer.ggml.{key}_token_id", int(token), gguf.GGUFValueType.UINT32, None))
    fields.append(("tokenizer.ggml.add_bos_token", adds_bos(tokenizer), gguf.GGUFValueType.BOOL, None))
    return fields


# -- writing ---------------------------------------------------------------------------------------


def _write(path: Path, model, plans, arch, quant, encoded, tokenizer_fields) -> None:
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(str(getattr(config, "_name_or_path", "") or "prunekit model").rstrip("/").split("/")[-1])
    writer.add_type("model")
    writer.add_block_count(len(plans))
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_vocab_size(int(model.get_input_embeddings().weight.shape[0]))
    if arch == "llama":
        writer.add_feed_forward_length(plans[0].ff)
        writer.add_head_count(plans[0].heads)
        writer.add_head_count_kv(plans[0].kv_heads)
    else:
        writer.add_feed_forward_length([p.ff for p in plans])
        writer.add_head_count([p.heads for p in plans])
        writer.add_head_count_kv([p.kv_heads for p in plans])
    head_dim = _head_dim(config)
    writer.add_key_length(head_dim)  # explicit: llama.cpp would derive it from block 0's head count
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_parameters(config)["rope_theta"])
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_file_type(_file_type(quant))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value, vtype, sub in tokenizer_fields:
        writer.add_key_value(key, value, vtype, sub)
    for name, (data, raw) in encoded.items():
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _file_type(quant: str) -> int:
    import gguf

    names = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}
    return int(getattr(gguf.LlamaFileType, names[quant]))


def _write_atomically(out: Path, write) -> None:
    """``write(tmp)`` beside ``out``, then rename: readers never see a partial file, failures leave none."""
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.partial-", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # mkstemp's file is private; the finished one gets the usual mode
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# -- report ----------------------------------------------------------------------------------------


def _notes(model, plans: list[BlockPlan]) -> list[str]:
    notes = []
    for index, plan in enumerate(plans):
        for part in plan.stand_ins:
            notes.append(
                f"block {index}: its removed {part} is written as a zero {part} "
                f"({'one head' if part == 'attention' else f'{STAND_IN_FF} neurons'}) that adds nothing, "
                "because llama.cpp's deci architecture cannot express it absent there"
            )
    if any(grid_of(m) is not None for m in model.modules()):
        notes.append(
            "weights quantized by GPTQ: q8_0 / q4_0 hold its integer codes as they are (each block's scale "
            "rounded to f16); f32 / f16 / bf16 hold their dequantized values"
        )
        return notes  # a 4-bit grid rounds many weights to 0: that is not sparsity worth a note
    zero = _zero_fraction(model)
    if zero > SPARSE_NOTE_MIN:
        notes.append(
            f"{zero:.0%} of the block weights are zeros (unstructured or N:M sparsity); GGUF stores them as "
            "zeros and llama.cpp runs dense kernels, so this file is no smaller and no faster than the dense one"
        )
    return notes


def _zero_fraction(model) -> float:
    total = zeros = 0
    for module in get_adapter(model).blocks():
        for param in module.parameters():
            if param.dim() == 2:
                total += param.numel()
                zeros += int((param == 0).sum())
    return zeros / max(total, 1)

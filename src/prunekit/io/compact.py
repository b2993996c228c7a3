"""A compact on-disk format for unstructured sparsity: a bitmask plus the surviving values.

A tensor that is at least ``MIN_SPARSITY`` zeros is stored as ``NAME::mask`` (the keep-mask, one
bit per element, packed into uint8) and ``NAME::values`` (the non-zeros in row-major order, in the
original dtype); other tensors are stored as they are. At 50% sparsity a float32 matrix takes
1/2 + 1/32 of its dense size, a bfloat16 one 1/2 + 1/16.

This is prunekit's own format: ``prunekit.load`` restores the dense model from it, and
``prunekit unpack`` writes a plain Hugging Face folder that every tool loads. The plain folder
(dense tensors with zeros) stays the default output.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from prunekit.io.shapes import apply_shapes
from prunekit.models import tied_parameter_names

COMPACT_FILE = "model.compact.safetensors"
FORMAT = "prunekit-compact-v1"
MIN_SPARSITY = 0.25  # below this the mask costs more than the zeros it saves (for 16-bit weights)


def pack(tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"mask": uint8 bits, "values": non-zeros}`` for one tensor."""
    flat = tensor.detach().cpu().contiguous().flatten()
    keep = flat != 0
    bits = np.packbits(keep.numpy())
    return {"mask": torch.from_numpy(bits), "values": flat[keep].clone()}


def unpack(mask: torch.Tensor, values: torch.Tensor, shape: list[int]) -> torch.Tensor:
    numel = int(np.prod(shape)) if shape else 1
    keep = torch.from_numpy(np.unpackbits(mask.numpy(), count=numel).astype(bool))
    dense = torch.zeros(numel, dtype=values.dtype)
    dense[keep] = values
    return dense.view(shape)


def save_compact_weights(state_dict: dict[str, torch.Tensor], folder: Path) -> dict:
    """Write ``COMPACT_FILE``; returns sizes for the manifest."""
    tensors, shapes, dense_bytes = {}, {}, 0
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu().contiguous()
        dense_bytes += tensor.numel() * tensor.element_size()
        if tensor.numel() and (tensor == 0).float().mean().item() >= MIN_SPARSITY:
            packed = pack(tensor)
            tensors[f"{name}::mask"], tensors[f"{name}::values"] = packed["mask"], packed["values"]
            shapes[name] = list(tensor.shape)
        else:
            tensors[name] = tensor
    save_file(tensors, str(folder / COMPACT_FILE), metadata={"format": FORMAT, "shapes": json.dumps(shapes)})
    return {"format": FORMAT, "dense_bytes": dense_bytes, "compact_bytes": (folder / COMPACT_FILE).stat().st_size}


def read_compact_weights(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not in {FORMAT} format")
        shapes = json.loads(metadata["shapes"])
        state = {key: handle.get_tensor(key) for key in handle.keys() if "::" not in key}
        for name, shape in shapes.items():
            state[name] = unpack(handle.get_tensor(f"{name}::mask"), handle.get_tensor(f"{name}::values"), shape)
    return state


def load_compact_model(folder: Path, config, dtype: torch.dtype, device, shapes: dict | None = None):
    """Rebuild the dense model from a compact folder (no pickles, no custom code).

    ``shapes`` (a shape manifest, see ``prunekit.io.shapes``) reshapes the freshly built model before
    its weights are loaded, for outputs whose block widths the config cannot describe.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if shapes is not None:
        apply_shapes(model, shapes)
    state = read_compact_weights(folder / COMPACT_FILE)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    tied = tied_parameter_names(model)
    if unexpected or set(missing) - tied:
        raise ValueError(
            f"compact weights do not match the config: missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    model.tie_weights()
    return model.to(device)

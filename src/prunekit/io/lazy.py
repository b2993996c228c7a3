"""Models whose decoder blocks stay on disk until the sequential engine reaches them.

``load_lazy`` builds the model with its parameters on the meta device (buffers such as rotary
frequencies are computed for real), loads everything outside the decoder blocks, and attaches a
``WeightSource``: a map from parameter name to the safetensors file that holds it. The engine
materialises one block at a time from that map; once a block is pruned and checkpointed, its
entries point at the checkpoint file and the block goes back to meta. Saving streams the weights
from the map, so a model larger than memory never has to be whole in memory. A folder with a shape
manifest (``prunekit.io.shapes``) is reshaped on meta before anything is read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.io.shapes import apply_shapes
from prunekit.models import get_adapter, tied_parameter_names
from prunekit.surgery.config import empty_model, set_parameter

SOURCE_ATTR = "prunekit_weight_source"


class WeightSource:
    """Where each parameter of a lazy model lives on disk."""

    def __init__(self, folder: Path, dtype: torch.dtype):
        self.dtype = dtype
        self.files: dict[str, Path] = {}
        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {key: folder / name for key, name in weight_map.items()}
        else:
            for file in sorted(folder.glob("*.safetensors")):
                with safe_open(str(file), framework="pt") as handle:
                    self.files.update({key: file for key in handle.keys()})

    def key_for(self, name: str) -> str | None:
        """The checkpoint key of a parameter (some checkpoints drop the base-model prefix)."""
        if name in self.files:
            return name
        stripped = name.split(".", 1)[-1]
        return stripped if stripped in self.files else None

    def read(self, name: str) -> torch.Tensor:
        key = self.key_for(name)
        if key is None:
            raise KeyError(name)
        with safe_open(str(self.files[key]), framework="pt") as handle:
            return handle.get_tensor(key).to(self.dtype)

    def redirect(self, names: list[str], file: Path) -> None:
        """After a block is checkpointed, read its parameters from the checkpoint file."""
        for name in names:
            self.files[name] = file


def weight_source(model: nn.Module) -> WeightSource | None:
    return getattr(model, SOURCE_ATTR, None)


def load_lazy(folder: Path, config, dtype: torch.dtype, device, shapes: dict | None = None) -> nn.Module:
    """A lazy model of ``folder``; ``shapes`` (a shape manifest, see ``prunekit.io.shapes``) reshapes it first."""
    model = empty_model(config, dtype)
    if shapes is not None:
        apply_shapes(model, shapes)
    source = WeightSource(folder, dtype)
    setattr(model, SOURCE_ATTR, source)
    blocks_prefix = get_adapter(model).blocks_path + "."
    tied = tied_parameter_names(model)
    # every block's weights must be there before any work, not when the engine reaches the block
    missing = [n for n, _ in model.named_parameters() if n not in tied and source.key_for(n) is None]
    check_no_missing_weights(folder, missing)
    names = [n for n, _ in model.named_parameters() if not n.startswith(blocks_prefix) and n not in tied]
    load_parameters(model, source, names, device)
    model.tie_weights()
    return model


def check_no_missing_weights(folder, missing: list[str]) -> None:
    """Refuse a model some of whose weights are not in the folder (loaders would leave them random)."""
    if missing:
        raise PrunekitError(
            f"{folder} lacks {len(missing)} weight(s) its config.json describes (e.g. {', '.join(missing[:2])}); "
            "the config and the weights do not belong together, or the weight files are incomplete: re-download "
            "the model, or re-save it with save_pretrained"
        )


def load_parameters(model: nn.Module, source: WeightSource, names: list[str], device) -> None:
    """Read each named meta parameter from ``source`` straight onto ``device``, so it is allocated once.

    The checkpoint must hold the shape the model was built with: a silent swap would hide a config
    (or shape manifest) that does not belong to the weights.
    """
    for name in names:
        value = source.read(name)
        expected = tuple(model.get_parameter(name).shape)
        if tuple(value.shape) != expected:
            raise PrunekitError(
                f"{name} is {tuple(value.shape)} in the checkpoint but {expected} in the model its config "
                "(and shape manifest, if any) describes; the folder's files do not belong together, re-save it"
            )
        set_parameter(model, name, value.to(device))


def materialize(model: nn.Module, prefix: str, module: nn.Module, device) -> None:
    """Read a meta module's parameters from the model's weight source onto ``device``."""
    source = weight_source(model)
    for name, param in list(module.named_parameters()):
        if param.is_meta:
            set_parameter(module, name, source.read(f"{prefix}.{name}").to(device))


def is_lazy(model: nn.Module) -> bool:
    return weight_source(model) is not None

"""Configs against weights: per-block config views, models built on meta, and the proof that a config
(or a config plus a shape manifest) describes a model's weights exactly.

Every loader and every surgery that changes a config checks itself here: build the model the config
describes on the meta device (nothing allocated) and compare every parameter and buffer shape.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class BlockConfig:
    """The shared model config as one attention module should see it: its own head counts, the rest shared.

    Reads and writes of every other attribute go to the shared config, so a later
    ``set_attn_implementation`` still reaches this module.
    """

    __slots__ = ("_base", "_own")

    def __init__(self, base, own: dict):
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_own", dict(own))

    def __getattr__(self, name):  # only called for names not found normally, i.e. not the slots
        if name.startswith("__"):
            raise AttributeError(name)
        own = object.__getattribute__(self, "_own")
        return own[name] if name in own else getattr(object.__getattribute__(self, "_base"), name)

    def __setattr__(self, name, value):
        if name in self._own:
            self._own[name] = value
        else:
            setattr(self._base, name, value)

    def __deepcopy__(self, memo):
        return BlockConfig(copy.deepcopy(self._base, memo), self._own)

    def __reduce__(self):
        return BlockConfig, (self._base, self._own)

    def __repr__(self):
        return f"BlockConfig({self._own} over {type(self._base).__name__})"


def base_config(config):
    return config._base if isinstance(config, BlockConfig) else config


def module_shapes(module: nn.Module) -> dict[str, tuple]:
    return {n: tuple(t.shape) for n, t in [*module.named_parameters(), *module.named_buffers()]}


def reference_shapes(model: nn.Module, config) -> dict[str, tuple]:
    """Parameter and buffer shapes of a model built from ``config`` on the meta device (nothing allocated)."""
    with torch.device("meta"):
        return module_shapes(type(model)(copy.deepcopy(config)))


def config_mismatches(model: nn.Module, config) -> list[str]:
    """Where a model built from ``config`` differs from ``model``."""
    ours, theirs = module_shapes(model), reference_shapes(model, config)
    problems = [f"{n}: {ours.get(n)} here, {theirs.get(n)} from the config" for n in ours if ours[n] != theirs.get(n)]
    problems += [f"{n}: missing here" for n in theirs if n not in ours]
    return problems


def empty_model(config, dtype: torch.dtype) -> nn.Module:
    """The model ``config`` describes with its parameters on meta (nothing allocated) and its buffers real.

    Buffers such as rotary frequencies are computed at construction and are in no checkpoint, so
    they must not be left on meta. A tied head is tied here already (``init_empty_weights`` leaves
    it a parameter of its own), so parameter names are those of a loaded model; loaders tie again
    once the embeddings are read.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    return model


def set_parameter(root: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    old = getattr(owner, attr)
    setattr(owner, attr, nn.Parameter(value, requires_grad=old.requires_grad))


def release(module: nn.Module) -> None:
    """Send a module's parameters back to meta, freeing their memory."""
    for name, param in list(module.named_parameters()):
        set_parameter(module, name, torch.empty_like(param, device="meta"))


@contextmanager
def editable_on_meta(module: nn.Module) -> Iterator[None]:
    """Let surgery edit a module whose parameters are on meta, and put the result back on meta.

    Surgery range-checks its indices, which needs values a meta tensor does not have. Zero-stride
    CPU stand-ins have shapes and values and take no memory; the slices taken from them are the
    pruned size and are released again at once.
    """
    if not any(p.is_meta for p in module.parameters()):
        yield
        return
    for name, param in list(module.named_parameters()):
        set_parameter(module, name, torch.zeros((), dtype=param.dtype).expand(param.shape))
    try:
        yield
    finally:
        release(module)

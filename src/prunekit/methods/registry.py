"""The method protocol: a typed base config, and the registry that maps each config type to its method.

A method is a config dataclass (its fields are the method's options; each field's docstring is its
``--help``) plus the functions the engine calls, registered with ``@register(ConfigType)``. What the
tools need to know about a method is declared on its config class, never looked up by name:

- ``method``: its name (``--method NAME``);
- ``needs_calibration``: whether it reads calibration data (a property: width's depends on the importance);
- ``calibration_defaults``: samples x tokens when the user gives none;
- ``reshapes_blocks``: whether blocks change shape (the result needs the config or a shape manifest);
- ``sparse_weights``: whether it leaves zeros in dense shapes (recovery then keeps them at zero);
- ``study_variants``: the configurations ``prunekit study`` prunes at a given ratio.

This module imports nothing of the methods themselves, so every method file imports it one way.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import ClassVar

from prunekit.errors import PrunekitError
from prunekit.sequential import BlockStep, EngineConfig, EngineReport

# Calibration when a method declares none: the setting of BENCHMARKS' unstructured, SliceGPT and study runs
# (C4, 64 samples of 512 tokens); a 135M model calibrates in about a minute on two CPU cores.
DEFAULT_CALIBRATION = (64, 512)


@dataclass
class MethodConfig:
    """Base of every method's config."""

    method: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for --help
    calibration_defaults: ClassVar[tuple[int, int]] = DEFAULT_CALIBRATION
    reshapes_blocks: ClassVar[bool] = False
    sparse_weights: ClassVar[bool] = False

    @property
    def needs_calibration(self) -> bool:
        return True

    @property
    def quant_grid(self):
        """The integer grid the weights end on (GPTQ, SparseGPT with --bits), saved as compressed-tensors; or None."""
        return None

    def engine_for(self, engine: EngineConfig, calibration) -> EngineConfig:
        """The engine settings this configuration runs with (e.g. one batch of every sample per block)."""
        return engine

    @classmethod
    def study_variants(cls) -> dict[str, Callable[[float], MethodConfig]]:
        """Named configurations that prune a fraction ``ratio`` of the model, for ``prunekit study``."""
        return {}


@dataclass(frozen=True)
class Method:
    block: Callable[[MethodConfig, BlockStep], dict] | None  # prune one block: (config, step) -> report
    prepare: Callable | None = None  # (config, model, calibration, engine) -> config, before block 0
    finish: Callable | None = None  # (config, model, engine report) -> report outside the blocks, after the last block
    restore: Callable | None = None  # (config, block, report) -> None: reshape a block to take its checkpoint
    # instead of all the above: (config, model, calibration, engine) -> (EngineReport, report outside the blocks)
    whole_model: Callable[..., tuple[EngineReport, dict]] | None = None


METHODS: dict[type, Method] = {}
CONFIGS: dict[str, type[MethodConfig]] = {}  # --method name -> config class, in registration order


def _add(config_type: type, method: Method) -> None:
    if not (isinstance(config_type, type) and issubclass(config_type, MethodConfig)) or not config_type.method:
        raise TypeError(f"{config_type!r} must be a MethodConfig subclass with a `method` name")
    METHODS[config_type] = method
    CONFIGS[config_type.method] = config_type


def register(
    config_type: type, prepare: Callable | None = None, finish: Callable | None = None, restore: Callable | None = None
):
    """Register ``fn(config, step) -> dict`` as the block function for ``config_type``."""

    def wrap(fn):
        _add(config_type, Method(fn, prepare, finish, restore))
        return fn

    return wrap


def register_whole_model(config_type: type):
    """Register ``fn(config, model, calibration, engine) -> (EngineReport, dict)``, run instead of the engine."""

    def wrap(fn):
        _add(config_type, Method(None, whole_model=fn))
        return fn

    return wrap


def config_class(name: str) -> type[MethodConfig]:
    """The config class of ``--method NAME``; an unknown name is a one-line error listing the known ones."""
    if name not in CONFIGS:
        raise PrunekitError(f"unknown --method {name!r}; available: {', '.join(CONFIGS)}")
    return CONFIGS[name]


def calibration_defaults(config: MethodConfig | type[MethodConfig]) -> tuple[int, int]:
    """Calibration samples and length for ``config`` (an instance or a class) when the user gives none."""
    return config.calibration_defaults


def study_variants() -> dict[str, Callable[[float], MethodConfig]]:
    """Every registered method's study configurations, by name (``width``, ``width-mlp``, ``depth``, ...)."""
    return {name: make for cls in CONFIGS.values() for name, make in cls.study_variants().items()}


def run_fingerprint(model, config: MethodConfig, calibration) -> str:
    """Identifies a run, so a checkpoint is only resumed by the run that wrote it."""
    payload = {
        "model": getattr(model.config, "_name_or_path", ""),
        "config": model.config.to_diff_dict(),
        "method": config.method,
        "method_config": asdict(config),
        "calibration": calibration.describe() if calibration else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()

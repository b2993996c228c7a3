"""Pruning methods: one file each, a config dataclass and a per-block function, joined by a registry.

``prune(model, config, calibration, engine)`` looks the config's type up in ``METHODS`` and runs
its block function in the sequential engine.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

from prunekit.data import Calibration
from prunekit.errors import PrunekitError
from prunekit.sequential import BlockStep, EngineConfig, EngineReport, run_sequential


@dataclass(frozen=True)
class Method:
    block: Callable[[object, BlockStep], dict]  # prune one block: (config, step) -> report
    prepare: Callable | None = None  # (config, model, calibration, engine) -> config, before block 0
    finish: Callable | None = None  # (config, model) -> report, after the last block
    restore: Callable | None = None  # (config, block, report) -> None: reshape a block to take its checkpoint


METHODS: dict[type, Method] = {}


def register(
    config_type: type, prepare: Callable | None = None, finish: Callable | None = None, restore: Callable | None = None
):
    """Register ``fn(config, step) -> dict`` as the block function for ``config_type``."""

    def wrap(fn):
        METHODS[config_type] = Method(fn, prepare, finish, restore)
        return fn

    return wrap


def method_name(config) -> str:
    return type(config).method


@dataclass
class PruneResult:
    method: str
    config: dict
    engine: EngineReport
    calibration: dict | None
    seconds: float
    outside_blocks: dict = field(default_factory=dict)  # what ``finish`` did (e.g. a pruned lm_head)

    def layer_sparsity(self) -> dict[str, float]:
        layers = {f"{b['block']}.{name}": s for b in self.engine.blocks for name, s in b.get("sparsity", {}).items()}
        return {**layers, **self.outside_blocks.get("sparsity", {})}


def run_fingerprint(model, config, calibration: Calibration | None) -> str:
    """Identifies a run, so a checkpoint is only resumed by the run that wrote it."""
    payload = {
        "model": getattr(model.config, "_name_or_path", ""),
        "config": model.config.to_diff_dict(),
        "method": method_name(config),
        "method_config": asdict(config),
        "calibration": calibration.describe() if calibration else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def prune(model, config, calibration: Calibration | None = None, engine: EngineConfig | None = None) -> PruneResult:
    """Prune ``model`` in place with the method that ``config`` selects."""
    try:
        method = METHODS[type(config)]
    except KeyError:
        raise PrunekitError(f"no pruning method is registered for {type(config).__name__}") from None
    if getattr(config, "needs_calibration", False) and calibration is None:
        raise PrunekitError(f"{method_name(config)} needs calibration data; pass --calib (e.g. c4)")
    engine = engine or EngineConfig()
    if calibration is not None and getattr(config, "order", None) == "sequential":
        engine = replace(engine, batch_size=len(calibration.tokens))  # one pass per block sees every sample
    fingerprint = run_fingerprint(model, config, calibration)
    start = time.perf_counter()
    # ``prepare`` may return a richer object (e.g. width's plan); the report keeps the user's config.
    prepared = method.prepare(config, model, calibration, engine) if method.prepare is not None else config
    # A method that needs no block inputs (data-free, or scored ahead by ``prepare``) skips their forwards.
    feed = calibration is not None and getattr(prepared, "needs_calibration", True)
    report = run_sequential(
        model,
        lambda step: method.block(prepared, step),
        calibration.tokens if feed else None,
        engine,
        fingerprint=fingerprint,
        restore=(lambda block, report: method.restore(prepared, block, report)) if method.restore else None,
    )
    outside = method.finish(prepared, model) if method.finish is not None else {}
    return PruneResult(
        method_name(config),
        asdict(config),
        report,
        calibration.describe() if calibration else None,
        time.perf_counter() - start,
        outside,
    )


from prunekit.methods.magnitude import MagnitudeConfig  # noqa: E402  (each registers itself)
from prunekit.methods.sparsegpt import SparseGPTConfig  # noqa: E402
from prunekit.methods.wanda import WandaConfig  # noqa: E402
from prunekit.methods.width import WidthConfig  # noqa: E402

CONFIGS = {cls.method: cls for cls in (MagnitudeConfig, WandaConfig, SparseGPTConfig, WidthConfig)}

__all__ = [
    "CONFIGS",
    "METHODS",
    "MagnitudeConfig",
    "PruneResult",
    "SparseGPTConfig",
    "WandaConfig",
    "WidthConfig",
    "prune",
    "register",
]

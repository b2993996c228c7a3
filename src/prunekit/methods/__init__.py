"""Pruning methods: one file each, a config dataclass and a per-block function, joined by a registry.

``prune(model, config, calibration, engine)`` looks the config's type up in ``METHODS`` and runs
its block function in the sequential engine. A method that cannot work block by block (depth
pruning: its scores need the whole network, and it changes the block list) registers a whole-model
function instead, which returns the same report.
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
    block: Callable[[object, BlockStep], dict] | None  # prune one block: (config, step) -> report
    prepare: Callable | None = None  # (config, model, calibration, engine) -> config, before block 0
    finish: Callable | None = None  # (config, model) -> report, after the last block
    restore: Callable | None = None  # (config, block, report) -> None: reshape a block to take its checkpoint
    # instead of all the above: (config, model, calibration, engine) -> (EngineReport, report outside the blocks)
    whole_model: Callable | None = None


METHODS: dict[type, Method] = {}


def register(
    config_type: type, prepare: Callable | None = None, finish: Callable | None = None, restore: Callable | None = None
):
    """Register ``fn(config, step) -> dict`` as the block function for ``config_type``."""

    def wrap(fn):
        METHODS[config_type] = Method(fn, prepare, finish, restore)
        return fn

    return wrap


def register_whole_model(config_type: type):
    """Register ``fn(config, model, calibration, engine) -> (EngineReport, dict)``, run instead of the engine."""

    def wrap(fn):
        METHODS[config_type] = Method(None, whole_model=fn)
        return fn

    return wrap


def method_name(config) -> str:
    return type(config).method


# Calibration when a method declares none: the setting of BENCHMARKS' unstructured, SliceGPT and study runs
# (C4, 64 samples of 512 tokens); a 135M model calibrates in about a minute on two CPU cores.
DEFAULT_CALIBRATION = (64, 512)


def calibration_defaults(config) -> tuple[int, int]:
    """Calibration samples and length for ``config`` (an instance or a class) when the user gives none:
    the method's own (depth: 10 x 128, Shortened LLaMA's), else ``DEFAULT_CALIBRATION``."""
    return getattr(config, "calibration_defaults", DEFAULT_CALIBRATION)


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
    start = time.perf_counter()
    if method.whole_model is not None:
        report, outside = method.whole_model(config, model, calibration, engine)
    else:
        report, outside = _run_blocks(method, model, config, calibration, engine)
    return PruneResult(
        method_name(config),
        asdict(config),
        report,
        calibration.describe() if calibration else None,
        time.perf_counter() - start,
        outside,
    )


def _run_blocks(method: Method, model, config, calibration, engine: EngineConfig) -> tuple[EngineReport, dict]:
    """A per-block method in the sequential engine: prepare, every block, finish."""
    from prunekit.depth_surgery import has_removed_sublayers

    if has_removed_sublayers(model):
        raise PrunekitError(
            f"this model lacks attention or MLP sub-layers (depth-pruned with --unit); {method_name(config)} needs "
            "both parts of every block: prune the model it was made from, then remove the sub-layers"
        )
    if calibration is not None and getattr(config, "order", None) == "sequential":
        engine = replace(engine, batch_size=len(calibration.tokens))  # one pass per block sees every sample
    fingerprint = run_fingerprint(model, config, calibration)
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
    return report, outside


from prunekit.methods.depth import DepthConfig  # noqa: E402  (each registers itself)
from prunekit.methods.gptq import GPTQConfig  # noqa: E402
from prunekit.methods.magnitude import MagnitudeConfig  # noqa: E402
from prunekit.methods.slicegpt import SliceGPTConfig  # noqa: E402
from prunekit.methods.sparsegpt import SparseGPTConfig  # noqa: E402
from prunekit.methods.wanda import WandaConfig  # noqa: E402
from prunekit.methods.width import WidthConfig  # noqa: E402

CONFIGS = {
    cls.method: cls
    for cls in (MagnitudeConfig, WandaConfig, SparseGPTConfig, WidthConfig, DepthConfig, SliceGPTConfig, GPTQConfig)
}

__all__ = [
    "CONFIGS",
    "METHODS",
    "DepthConfig",
    "GPTQConfig",
    "MagnitudeConfig",
    "PruneResult",
    "SliceGPTConfig",
    "SparseGPTConfig",
    "WandaConfig",
    "WidthConfig",
    "calibration_defaults",
    "prune",
    "register",
    "register_whole_model",
]

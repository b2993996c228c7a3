"""Pruning methods: one file each, a config dataclass and a per-block function, joined by a registry
(``prunekit.methods.registry``).

``prune(model, config, calibration, engine)`` looks the config's type up in ``METHODS`` and runs
its block function in the sequential engine. A method that cannot be one pass of blocks (depth
pruning: it changes the block list, and its greedy mode scores in several passes) registers a
whole-model function instead, which returns the same report (its scoring passes still run in the
engine, with checkpoints).

Under several processes (``torchrun``), each prunes with its share of the calibration samples and a
checkpoint folder of its own; the engine sums the statistics (``prunekit.distributed``), so every process
ends with the model one process would make.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

from prunekit.data import Calibration
from prunekit.distributed import process_folder, shard, world
from prunekit.errors import PrunekitError
from prunekit.methods.registry import (
    CONFIGS,
    DEFAULT_CALIBRATION,
    METHODS,
    Method,
    MethodConfig,
    calibration_defaults,
    config_class,
    register,
    register_whole_model,
    run_fingerprint,
    study_variants,
)
from prunekit.sequential import EngineConfig, EngineReport, run_sequential
from prunekit.surgery.depth import has_removed_sublayers


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


def prune(model, config, calibration: Calibration | None = None, engine: EngineConfig | None = None) -> PruneResult:
    """Prune ``model`` in place with the method that ``config`` selects."""
    try:
        method = METHODS[type(config)]
    except KeyError:
        raise PrunekitError(f"no pruning method is registered for {type(config).__name__}") from None
    if config.needs_calibration and calibration is None:
        raise PrunekitError(f"{config.method} needs calibration data; pass --calib (e.g. c4)")
    engine = engine or EngineConfig()
    start = time.perf_counter()
    calibration, engine = _this_process(calibration, engine)
    if method.whole_model is not None:
        report, outside = method.whole_model(config, model, calibration, engine)
    else:
        report, outside = _run_blocks(method, model, config, calibration, engine)
    return PruneResult(
        config.method,
        asdict(config),
        report,
        calibration.describe() if calibration else None,
        time.perf_counter() - start,
        outside,
    )


def _this_process(calibration: Calibration | None, engine: EngineConfig) -> tuple[Calibration | None, EngineConfig]:
    """Under several processes: this process's share of the samples, and a checkpoint folder of its own
    (a checkpoint holds its share's activations)."""
    if world().size == 1:
        return calibration, engine
    if calibration is not None:
        calibration = calibration.share(shard(len(calibration.tokens)))
    return calibration, replace(engine, checkpoint_dir=process_folder(engine.checkpoint_dir))


def _run_blocks(method: Method, model, config, calibration, engine: EngineConfig) -> tuple[EngineReport, dict]:
    """A per-block method in the sequential engine: prepare, every block, finish."""
    if has_removed_sublayers(model):
        raise PrunekitError(
            f"this model lacks attention or MLP sub-layers (depth-pruned with --unit); {config.method} needs "
            "both parts of every block: prune the model it was made from, then remove the sub-layers"
        )
    engine = config.engine_for(engine, calibration)
    fingerprint = run_fingerprint(model, config, calibration)
    # ``prepare`` may return a richer object (e.g. width's plan); the report keeps the user's config.
    prepared = method.prepare(config, model, calibration, engine) if method.prepare is not None else config
    # A method that needs no block inputs (data-free, or scored ahead by ``prepare``) skips their forwards.
    feed = calibration is not None and getattr(prepared, "needs_block_inputs", True)
    report = run_sequential(
        model,
        lambda step: method.block(prepared, step),
        calibration.tokens if feed else None,
        engine,
        fingerprint=fingerprint,
        restore=(lambda block, report: method.restore(prepared, block, report)) if method.restore else None,
    )
    outside = method.finish(prepared, model, report) if method.finish is not None else {}
    return report, outside


# The registration order is the order --help and error messages list the methods in.
# isort: off
from prunekit.methods.magnitude import MagnitudeConfig  # noqa: E402
from prunekit.methods.wanda import WandaConfig  # noqa: E402
from prunekit.methods.sparsegpt import SparseGPTConfig  # noqa: E402
from prunekit.methods.width import WidthConfig  # noqa: E402
from prunekit.methods.depth import DepthConfig  # noqa: E402
from prunekit.methods.mix import MixConfig  # noqa: E402
from prunekit.methods.slicegpt import SliceGPTConfig  # noqa: E402
from prunekit.methods.hidden import HiddenConfig  # noqa: E402
from prunekit.methods.gptq import GPTQConfig  # noqa: E402

# isort: on

__all__ = [
    "CONFIGS",
    "DEFAULT_CALIBRATION",
    "Method",
    "MethodConfig",
    "config_class",
    "study_variants",
    "METHODS",
    "DepthConfig",
    "GPTQConfig",
    "HiddenConfig",
    "MagnitudeConfig",
    "MixConfig",
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

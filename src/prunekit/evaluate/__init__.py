"""Evaluation: perplexity, speed, and zero-shot tasks scored the way lm-evaluation-harness scores them."""

from prunekit.evaluate.perplexity import PerplexityResult, perplexity
from prunekit.evaluate.speed import Ratio, SpeedComparison, SpeedResult, compare_speed, measure_speed
from prunekit.evaluate.zeroshot import ZeroShotResult, evaluate_zeroshot, lm_eval_model

__all__ = [
    "PerplexityResult",
    "Ratio",
    "SpeedComparison",
    "SpeedResult",
    "ZeroShotResult",
    "compare_speed",
    "evaluate_zeroshot",
    "lm_eval_model",
    "measure_speed",
    "perplexity",
]

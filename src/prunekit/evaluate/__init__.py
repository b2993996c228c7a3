"""Evaluation: perplexity and speed; zero-shot tasks come with the evaluation issue."""

from prunekit.evaluate.perplexity import PerplexityResult, perplexity
from prunekit.evaluate.speed import SpeedResult, measure_speed

__all__ = ["PerplexityResult", "SpeedResult", "measure_speed", "perplexity"]

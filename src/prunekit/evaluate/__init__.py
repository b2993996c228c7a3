"""Evaluation: perplexity, speed, and ``bench`` (models side by side: speed, memory, parameters, MACs)."""

from prunekit.evaluate.bench import BenchResult, benchmark
from prunekit.evaluate.perplexity import PerplexityResult, perplexity
from prunekit.evaluate.speed import SpeedResult, measure_speed

__all__ = ["BenchResult", "PerplexityResult", "SpeedResult", "benchmark", "measure_speed", "perplexity"]

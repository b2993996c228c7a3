"""Evaluation: perplexity now; zero-shot tasks and speed come with the evaluation issue."""

from prunekit.evaluate.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]

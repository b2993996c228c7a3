"""prunekit: make Hugging Face causal LMs smaller and faster by pruning."""

from prunekit.errors import PrunekitError
from prunekit.io.load import load
from prunekit.io.save import save_pruned
from prunekit.version import __version__

__all__ = ["PrunekitError", "__version__", "load", "save_pruned"]

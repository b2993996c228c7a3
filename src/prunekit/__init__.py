"""prunekit: make Hugging Face causal LMs smaller and faster by pruning."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("prunekit")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"

from prunekit.errors import PrunekitError
from prunekit.io import save_pruned
from prunekit.loading import load
from prunekit.shapes import load_pruned

__all__ = ["PrunekitError", "__version__", "load", "load_pruned", "save_pruned"]

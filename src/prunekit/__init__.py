"""prunekit: make Hugging Face causal LMs smaller and faster by pruning."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("prunekit")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"

from prunekit.errors import PrunekitError  # noqa: E402
from prunekit.io import save_pruned  # noqa: E402
from prunekit.loading import load  # noqa: E402

__all__ = ["PrunekitError", "__version__", "load", "save_pruned"]

"""The installed prunekit version (a module of its own, so the manifest can read it without importing the package)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("prunekit")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"

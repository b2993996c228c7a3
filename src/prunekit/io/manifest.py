"""``prunekit.json``: how a model was made (prunekit version, method and config, the source model and
its hash, the calibration data and seed, the measured metrics) and, for models their config cannot
describe, the block shapes that ``prunekit.io.shapes`` rebuilds them from.
"""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch

from prunekit.errors import PrunekitError
from prunekit.io.files import MANIFEST, folder_sha256
from prunekit.version import __version__


def build_manifest(
    *,
    source: str,
    source_folder: Path | None,
    method: str | None,
    method_config: dict | None,
    calibration: dict | None,
    metrics: dict,
    extra: dict | None = None,
) -> dict:
    import transformers

    return {
        "prunekit_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "method": method,
        "method_config": method_config,
        "source_model": {
            "name": source,
            "path": str(source_folder) if source_folder else None,
            "sha256": folder_sha256(source_folder) if source_folder else None,
        },
        "calibration": calibration,
        "metrics": metrics,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        **(extra or {}),
    }


def read_manifest(folder: Path | None) -> dict:
    """The manifest saved in ``folder`` (``{}`` when there is none: any model folder, not only prunekit's)."""
    path = Path(folder) / MANIFEST if folder is not None else None
    if path is None or not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PrunekitError(f"cannot read {path} ({str(err).splitlines()[0]}); fix or remove it") from None
    if not isinstance(manifest, dict):
        raise PrunekitError(f"{path} is not a JSON object; fix or remove it")
    return manifest

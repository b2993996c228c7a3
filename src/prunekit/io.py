"""Saving pruned models: standard HF folders, written atomically, with a prunekit manifest.

The folder is written beside the target under a temporary name and renamed into place only when
complete, so an interrupted save never leaves a folder that looks valid. ``prunekit.json`` records
how the model was made: prunekit version, method and config, the source model and its hash, the
calibration data and seed, the measured metrics, and (for models the config cannot describe) the
block shapes that ``prunekit.shapes`` rebuilds them from.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import save_file

from prunekit.errors import PrunekitError
from prunekit.lazy import is_lazy, weight_source
from prunekit.models import get_adapter, tied_parameter_names

MANIFEST = "prunekit.json"


def check_output(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output before any work is done (and never replace a foreign folder)."""
    out = Path(out)
    if out.exists():
        if not overwrite:
            raise PrunekitError(f"output {out} already exists; pass --overwrite to replace it or choose another --out")
        if out.is_file():
            raise PrunekitError(f"output {out} is a file; choose a folder path for --out")
        if any(out.iterdir()) and not (out / MANIFEST).exists():
            raise PrunekitError(
                f"{out} exists and is not a prunekit output; refusing to replace it, choose another --out"
            )
    check_folder_path(out, "--out")
    if not out.parent.is_dir():
        raise PrunekitError(f"the parent folder of --out ({out.parent}) does not exist; create it first")
    return out


def check_folder_path(folder: str | os.PathLike, flag: str) -> None:
    """Refuse a folder path that cannot be created because a file stands where one of its folders would."""
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise PrunekitError(f"{flag} {folder}: {existing} is a file, not a folder; choose another path")


FORMATS = ("dense", "compact")


def check_format(fmt: str, lazy: bool) -> None:
    """Refuse an unknown output format, or the compact one for a model that is not in memory."""
    if fmt not in FORMATS:
        raise PrunekitError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "compact" and lazy:
        raise PrunekitError("--format compact needs the model in memory; drop --lazy, or save dense and convert")


def save_pruned(
    model,
    tokenizer,
    out: str | os.PathLike,
    manifest: dict,
    overwrite: bool = False,
    fmt: str = "dense",
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write ``model``, ``tokenizer`` and ``manifest`` to ``out`` atomically.

    ``fmt="dense"``: a standard Hugging Face folder (zeros stored as zeros; any tool loads it).
    ``fmt="compact"``: sparse matrices as bitmask + values (see ``prunekit.compact``); ``prunekit.load``
    and ``prunekit unpack`` restore it.

    A model its config cannot describe (blocks of different widths, heads OPT/GPT-2 configs cannot
    express, added biases) gets a shape manifest under ``"shapes"``; ``prunekit.load`` rebuilds it.
    ``extra_files`` (name -> content, e.g. a loss plot) are written into the folder with the rest.
    """
    check_format(fmt, lazy=is_lazy(model))
    out = check_output(out, overwrite)
    manifest = _with_shapes(manifest, model)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        if fmt == "compact":
            manifest = {**manifest, "storage": _save_compact(model, tmp)}
        elif is_lazy(model):
            _save_streaming(model, tmp)
        else:
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        for name, content in (extra_files or {}).items():
            (tmp / name).write_bytes(content)
        publish_permissions(tmp)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _with_shapes(manifest: dict, model) -> dict:
    """``manifest`` with the model's shape manifest, or without one (a stale one copied from an input goes)."""
    from prunekit.shapes import describe_shapes

    shapes = describe_shapes(model)
    manifest = {key: value for key, value in manifest.items() if key != "shapes"}
    return manifest if shapes is None else {**manifest, "shapes": shapes}


def publish_permissions(folder: Path) -> None:
    """A temporary folder is private (0700); give the finished one the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for file in folder.rglob("*"):
        file.chmod((0o777 if file.is_dir() else 0o666) & ~umask)


def _replace(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.rename(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, old / out.name)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _save_compact(model, folder: Path) -> dict:
    from prunekit.compact import save_compact_weights

    tied = tied_parameter_names(model)
    state = {k: v for k, v in model.state_dict().items() if k not in tied}
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    return save_compact_weights(state, folder)


def _save_streaming(model, folder: Path) -> None:
    """Save a lazy model one shard per block, reading each block from its checkpoint file."""

    source = weight_source(model)
    prefix = get_adapter(model).blocks_path + "."
    tied = tied_parameter_names(model)
    groups: dict[str, list[str]] = {}
    for name, _ in model.named_parameters(remove_duplicate=False):
        if name in tied:
            continue
        key = ".".join(name.split(".")[: prefix.count(".") + 1]) if name.startswith(prefix) else "rest"
        groups.setdefault(key, []).append(name)
    params = dict(model.named_parameters(remove_duplicate=False))
    weight_map, total = {}, 0
    for n, names in enumerate(groups.values(), 1):
        shard = f"model-{n:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            value = params[name]
            tensors[name] = (source.read(name) if value.is_meta else value.detach().cpu()).contiguous()
            total += tensors[name].numel() * tensors[name].element_size()
            weight_map[name] = shard
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


def folder_sha256(folder: str | os.PathLike) -> str:
    """sha256 over a model folder's config and weight files (names and contents, in sorted order)."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for file in sorted([folder / "config.json", *folder.glob("*.safetensors")]):
        if file.exists():
            digest.update(file.name.encode())
            with open(file, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 23), b""):
                    digest.update(chunk)
    return digest.hexdigest()


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

    from prunekit import __version__

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

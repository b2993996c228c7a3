"""Saving models: standard HF folders (or prunekit's compact one), written atomically, with a manifest.

The folder is written beside the target under a temporary name and renamed into place only when
complete, so an interrupted save never leaves a folder that looks valid. ``prunekit.json`` records
how the model was made: prunekit version, method and config, the source model and its hash, the
calibration data and seed, the measured metrics, and (for models the config cannot describe) the
block shapes that ``prunekit.io.shapes`` rebuilds them from.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import save_file

from prunekit.errors import PrunekitError
from prunekit.io.compact import COMPACT_FILE, save_compact_weights
from prunekit.io.files import check_output, publish_permissions, replace_folder
from prunekit.io.lazy import is_lazy, weight_source
from prunekit.io.load import load
from prunekit.io.manifest import MANIFEST, read_manifest
from prunekit.io.shapes import describe_shapes
from prunekit.models import get_adapter, tied_parameter_names

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

    def write(folder: Path) -> dict:
        if fmt == "compact":
            return {"storage": _save_compact(model, folder)}
        if is_lazy(model):
            _save_streaming(model, folder)
        else:
            model.save_pretrained(folder)
        return {}

    return save_folder(model, tokenizer, out, manifest, write, overwrite, extra_files)


def save_folder(
    model,
    tokenizer,
    out: str | os.PathLike,
    manifest: dict,
    write: Callable[[Path], dict],
    overwrite: bool = False,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """The one atomic save: ``write(folder)`` puts the weights and config in a temporary folder beside ``out``
    (returning manifest entries, e.g. how they are stored); the tokenizer, the manifest with the model's
    shape manifest and ``extra_files`` go in with them; the folder is renamed into place when complete."""
    out = check_output(out, overwrite)
    manifest = _with_shapes(manifest, model)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        manifest = {**manifest, **write(tmp)}
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        for name, content in (extra_files or {}).items():
            (tmp / name).write_bytes(content)
        publish_permissions(tmp)
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def unpack_compact(folder: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Restore a compact folder (``--format compact``) to a standard Hugging Face folder that any tool loads."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PrunekitError(f"--model {folder} is not a folder; pass a folder saved with --format compact")
    if not (folder / COMPACT_FILE).exists():
        raise PrunekitError(f"{folder} holds no {COMPACT_FILE}; it is not a compact prunekit folder")
    check_output(out, overwrite)
    model, tokenizer = load(folder)
    manifest = {k: v for k, v in read_manifest(folder).items() if k != "storage"}
    return save_pruned(model, tokenizer, out, manifest, overwrite=overwrite)


def _with_shapes(manifest: dict, model) -> dict:
    """``manifest`` with the model's shape manifest, or without one (a stale one copied from an input goes)."""
    shapes = describe_shapes(model)
    manifest = {key: value for key, value in manifest.items() if key != "shapes"}
    return manifest if shapes is None else {**manifest, "shapes": shapes}


def _save_compact(model, folder: Path) -> dict:
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

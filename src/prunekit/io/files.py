"""Output folders: refuse a bad path before any work, and publish a finished folder atomically.

A folder is written beside its target under a temporary name and renamed into place only when
complete, so an interrupted save never leaves a folder that looks valid.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from prunekit.errors import PrunekitError

MANIFEST = "prunekit.json"  # the file that marks a prunekit output (see prunekit.io.manifest)


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


def publish_permissions(folder: Path) -> None:
    """A temporary folder is private (0700); give the finished one the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for file in folder.rglob("*"):
        file.chmod((0o777 if file.is_dir() else 0o666) & ~umask)


def replace_folder(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.rename(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, old / out.name)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


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

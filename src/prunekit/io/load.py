"""Load a causal LM and its tokenizer: a local folder, a hub id, or a packaged alias (``prunekit.io.aliases``).

A prunekit output whose manifest has ``"shapes"`` is rebuilt from the config plus the shape
manifest (``prunekit.io.shapes``), strictly: every tensor the model expects must be in the folder.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from prunekit.errors import PrunekitError
from prunekit.io.aliases import ALIASES, materialize_alias
from prunekit.io.compact import COMPACT_FILE, load_compact_model
from prunekit.io.lazy import WeightSource, check_no_missing_weights, load_lazy, load_parameters
from prunekit.io.manifest import read_manifest
from prunekit.io.shapes import RESAVE, apply_shapes
from prunekit.models import adapter_for_config, supported_families, tied_parameter_names
from prunekit.surgery.config import empty_model

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise PrunekitError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}") from None


def load(
    name_or_path: str | os.PathLike,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    *,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    lazy: bool = False,
):
    """Load ``(model, tokenizer)`` from a local folder, the alias ``smollm2-135m``, or a hub id.

    ``lazy=True`` (local safetensors folders only) leaves the decoder blocks' weights on the meta
    device; the sequential engine reads each block from disk when it reaches it, so a model
    larger than memory can be pruned.

    A prunekit output whose ``prunekit.json`` has ``"shapes"`` (blocks of different widths, heads
    the config cannot express, added biases) is rebuilt from that manifest (``prunekit.io.shapes``),
    in every mode: eager, lazy and compact.
    """
    torch_dtype = resolve_dtype(dtype)
    folder = resolve_folder(str(name_or_path), trust_remote_code=trust_remote_code)
    if folder is None:  # a hub id
        if lazy:
            raise PrunekitError("--lazy needs a local folder; download the model first and pass its path")
        return _load_from_hub(str(name_or_path), torch_dtype, device, trust_remote_code)
    check_weights(folder, allow_pickle)
    config = _load_config(folder, trust_remote_code)

    adapter_for_config(config)  # refuse unsupported architectures before reading any weight
    tokenizer = _load_tokenizer(folder, trust_remote_code)
    model = _load_local_model(folder, config, torch_dtype, device, lazy, trust_remote_code, allow_pickle)
    model.eval()
    return model, tokenizer


def _load_local_model(folder: Path, config, dtype, device, lazy, trust_remote_code, allow_pickle):
    """``from_pretrained``, unless the folder must be rebuilt from its config: compact, lazy, or a shape manifest."""

    shapes = read_manifest(folder).get("shapes")
    compact = (folder / COMPACT_FILE).exists()
    if compact and lazy:
        raise PrunekitError(f"{folder} is in prunekit's compact format; unpack it first (prunekit unpack)")
    if compact:
        model = load_compact_model(folder, config, dtype, device, shapes)
    elif lazy:
        model = load_lazy(folder, config, dtype, device, shapes)
    elif shapes is not None:
        model = load_shaped_model(folder, config, shapes, dtype, device)
    else:
        return _from_pretrained(folder, dtype, device, trust_remote_code, allow_pickle)
    _read_generation_config(model, folder)
    return model


def _read_generation_config(model, folder: Path) -> None:
    """What ``from_pretrained`` reads besides the weights: the folder's generation settings (eos ids, defaults)."""
    from transformers import GenerationConfig

    if (folder / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(folder)


def resolve_folder(name: str, trust_remote_code: bool = False) -> Path | None:
    """A local folder for ``name``, building the cache for an alias; ``None`` means a hub id."""
    if name in ALIASES:
        return materialize_alias(name)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise PrunekitError(f"{path} is a file; pass the model folder that holds config.json")
        if not (path / "config.json").exists():
            raise PrunekitError(f"{path} has no config.json; pass a Hugging Face model folder")
        return path
    # A hub id is "name" or "org/name"; anything else that does not exist is a mistyped path.
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise PrunekitError(
            f"model folder {name} does not exist; pass an existing folder, a hub id (org/name), "
            f"or an alias ({', '.join(ALIASES)})"
        )
    return None


def check_weights(folder: Path, allow_pickle: bool) -> None:
    """Refuse pickle weights unless allowed, and corrupt safetensors files, with one line each."""
    safetensors_files = sorted(folder.glob("*.safetensors"))
    pickle_files = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt"))
    if not safetensors_files:
        if not pickle_files:
            raise PrunekitError(f"{folder} holds no weights (*.safetensors); pass a complete model folder")
        if not allow_pickle:
            raise PrunekitError(
                f"{folder} has only pickle weights ({pickle_files[0].name}), which can run code on load; "
                "convert them to safetensors, or pass --allow-pickle if you trust the source"
            )
    for file in safetensors_files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                keys = list(handle.keys())
                if keys:  # the header can be intact while the data is cut short
                    handle.get_slice(keys[-1])
            _check_safetensors_length(file)
        except (SafetensorError, OSError, ValueError) as err:
            raise PrunekitError(
                f"{file} is not a valid safetensors file ({str(err).splitlines()[0]}); re-download or re-save it"
            ) from None


def _check_safetensors_length(file: Path) -> None:
    """safetensors checks offsets lazily; compare the header's promised size with the file's."""
    import struct

    with open(file, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    actual = file.stat().st_size - 8 - header_len
    if actual < end:
        raise ValueError(f"file is truncated: {actual} data bytes, header promises {end}")


RESAVE_HINT = "re-download the model, or re-save it with save_pretrained"


def _load_config(folder: Path, trust_remote_code: bool):
    """The folder's config, or one line on what is wrong with config.json and what would work."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise PrunekitError(f"cannot read {path} ({_first_line(err)}); {RESAVE_HINT}") from None
    except ValueError as err:
        raise PrunekitError(f"{path} is not valid JSON ({err}); fix it, or {RESAVE_HINT}") from None
    if not isinstance(raw, dict):
        raise PrunekitError(f"{path} must hold a JSON object (a transformers config); {RESAVE_HINT}")
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise PrunekitError(
            f'{path} has no usable "model_type" (got {model_type!r}); it names the architecture, e.g. '
            f'"model_type": "llama"; supported families: {supported_families()}'
        )
    if model_type not in CONFIG_MAPPING and "auto_map" not in raw:
        raise PrunekitError(
            f"{path} names model_type {model_type!r}, which this transformers does not know; "
            f"supported families: {supported_families()}"
        )
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as err:  # transformers and huggingface_hub raise many types for a bad config
        if "trust_remote_code" in str(err):
            raise PrunekitError(
                f"{folder} needs custom code to load; pass --trust-remote-code only if you trust it"
            ) from None
        reason = _first_line(err.__cause__ or err)  # validators wrap the useful message
        raise PrunekitError(f"{path} does not describe a valid {model_type} model ({reason}); fix it") from None


def _load_tokenizer(folder: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError) as err:
        reason = _first_line(err).rstrip(": ")
        raise PrunekitError(
            f"cannot load the tokenizer from {folder} ({reason}); the folder needs tokenizer.json or the "
            "tokenizer files it was saved with"
        ) from None


def _drop_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in record.getMessage()


def _from_pretrained(folder, dtype, device, trust_remote_code, allow_pickle):
    """``from_pretrained``, strict: weights missing from the folder or of another shape than its config says
    are an error, not a randomly initialised model."""
    from transformers import AutoModelForCausalLM

    transformers_log = logging.getLogger("transformers.modeling_utils")
    transformers_log.addFilter(_drop_load_report)  # its table of keys: the lines below say it in one
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=dtype,
            device_map=str(device),
            trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True,
            ignore_mismatched_sizes=True,  # reported below, with the names
            output_loading_info=True,
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise PrunekitError(f"cannot load the weights in {folder} ({_first_line(err)}); {RESAVE_HINT}") from None
    finally:
        transformers_log.removeFilter(_drop_load_report)
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        log.warning("%s: %d unused tensor(s) ignored (e.g. %s)", folder, len(unexpected), unexpected[0])
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        name, *shapes = mismatched[0] if isinstance(mismatched[0], tuple) else (mismatched[0],)
        detail = f" ({tuple(shapes[0])} in the checkpoint, {tuple(shapes[1])} in the model)" if len(shapes) == 2 else ""
        raise PrunekitError(
            f"{len(mismatched)} weight(s) in {folder} do not have the shape its config.json describes, e.g. "
            f"{name}{detail}; the config and the weights do not belong together: {RESAVE_HINT}"
        )
    check_no_missing_weights(folder, sorted(info.get("missing_keys") or []))
    return model


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick connection test, so an offline user waits seconds, not huggingface_hub's retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_from_hub(name: str, dtype, device, trust_remote_code):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # Offline, only the local Hugging Face cache can answer; it answers at once.
    local_only = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or not hub_reachable()
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code, local_files_only=local_only)
    except (OSError, ValueError) as err:
        reason = "the hub is unreachable and it is not in the local cache" if local_only else _first_line(err)
        raise PrunekitError(
            f"could not get {name!r} from the Hugging Face Hub ({reason}); it is not a local folder "
            f"or an alias either: pass a local model folder or one of {', '.join(ALIASES)}"
        ) from None
    adapter_for_config(config)
    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, local_files_only=local_only)
    model = AutoModelForCausalLM.from_pretrained(
        name,
        dtype=dtype,
        device_map=str(device),
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
        local_files_only=local_only,
    )
    return model.eval(), tokenizer


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0][:160] if text else type(err).__name__


# --- the packaged alias -------------------------------------------------------------------------


def load_shaped_model(folder: Path, config, shapes: dict, dtype: torch.dtype, device) -> torch.nn.Module:
    """Build the model ``config`` and ``shapes`` describe on meta, then read each tensor once onto ``device``.

    Strict, unlike ``from_pretrained``: every tensor the model expects must be in the folder and no
    other (a tied head may be stored or not), since a tensor the manifest missed would otherwise be
    left uninitialised.
    """
    model = empty_model(config, dtype)
    apply_shapes(model, shapes)
    source = WeightSource(folder, dtype)
    tied = tied_parameter_names(model)
    names = [name for name, _ in model.named_parameters() if name not in tied]
    _check_complete(folder, source, names, tied)
    load_parameters(model, source, names, device)
    model.tie_weights()
    untied = [name for name, p in model.named_parameters(remove_duplicate=False) if p.is_meta]
    if untied:
        raise PrunekitError(f"{folder}: {untied[:3]} did not tie to the weights they share; re-save the model")
    return model.to(device)


def _check_complete(folder: Path, source: WeightSource, names: list[str], tied: set[str]) -> None:
    missing = [name for name in names if source.key_for(name) is None]
    claimed = {source.key_for(name) for name in names} | tied
    unexpected = [key for key in source.files if key not in claimed]
    if missing or unexpected:
        raise PrunekitError(
            f"{folder} does not hold the safetensors weights its config and shape manifest describe: "
            f"{len(missing)} missing {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}; {RESAVE}"
        )

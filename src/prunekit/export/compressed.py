"""Save a GPTQ-quantized model in the compressed-tensors format, through the ``compressed-tensors`` library.

The folder is a standard Hugging Face one whose ``config.json`` carries a ``quantization_config``
(``quant_method: compressed-tensors``): transformers, vLLM and llm-compressor load it. Each quantized
linear is stored as its integer codes (symmetric grids: ``pack-quantized``, packed into int32 as
``weight_packed`` with its shape; asymmetric: ``int-quantized``, int8 ``weight``, see below), its scales
(``weight_scale``, the model's dtype) and, when the grid is asymmetric, its zero points.

The codes are not re-rounded from a fresh grid: prunekit's GPTQ leaves every weight exactly on the grid
it recorded (``weight_scale`` / ``weight_zero_point`` buffers, see ``prunekit.methods.gptq``), so
the library's quantizer recovers the very codes GPTQ chose, and its dequantiser, (c - z) * s, gives back
the very floats prunekit evaluated. ``save_compressed`` checks that before writing anything.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.io.lazy import is_lazy
from prunekit.io.save import save_folder
from prunekit.methods.quant import SCALE, ZERO, QuantGrid, dequantize, grid_of, quant_codes, record_grid
from prunekit.methods.unstructured import select_linears
from prunekit.models import get_adapter, linear_weight, tied_parameter_names

# Symmetric grids are saved packed (int4 codes 8 to an int32). Asymmetric ones are saved one code per int8
# ("int-quantized"): with compressed-tensors 0.20.1 and transformers 5.24 a pack-quantized asymmetric folder
# does not load, because the library packs the zero points when it saves but its load path (compressing the
# empty model on meta) expects them unpacked, [out, groups], and transformers refuses the size mismatch.


def compression_format(grid: QuantGrid) -> str:
    return "pack-quantized" if grid.sym else "int-quantized"


def _library():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise PrunekitError(
            "saving compressed-tensors needs the compressed-tensors library: pip install 'prunekit[quant]'"
        ) from None


def quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The model's linears that carry a recorded grid, by module name."""
    return {name: m for name, m in model.named_modules() if grid_of(m) is not None}


def quantization_config(grid: QuantGrid, ignore: list[str]):
    """The compressed-tensors description of ``grid`` on every Linear but those in ``ignore`` (W4A16-style)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    weights = QuantizationArgs(
        num_bits=grid.bits,
        type="int",
        symmetric=grid.sym,
        strategy="channel" if grid.group_size == -1 else "group",
        group_size=None if grid.group_size == -1 else grid.group_size,
    )
    fmt = compression_format(grid)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights, format=fmt)
    return QuantizationConfig(
        config_groups={"group_0": scheme}, ignore=ignore, format=fmt, quantization_status="compressed"
    )


def compressed_state_dict(model: nn.Module, grid: QuantGrid) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors to save (quantized linears packed, the rest as they are) and the Linear names left dense."""
    from compressed_tensors.compressors import BaseCompressor

    config = quantization_config(grid, [])
    scheme = config.config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(compression_format(grid))
    quantized = quantized_linears(model)
    tied = tied_parameter_names(model)
    state = {k: v for k, v in model.state_dict().items() if k not in tied}
    for name, linear in quantized.items():
        local = _checked_module_state(name, linear, grid)
        for key in (*local, "bias"):
            state.pop(f"{name}.{key}", None)
        if linear.bias is not None:
            local["bias"] = linear.bias.detach()
        for key, value in compressor.compress(local, scheme).items():
            state[f"{name}.{key}"] = value
    dense = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized]
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}, dense


def _checked_module_state(name: str, linear: nn.Module, grid: QuantGrid) -> dict[str, torch.Tensor]:
    """weight, scale and zero point of one linear, after proving the weight lies on that grid."""
    if not isinstance(linear, nn.Linear):
        raise PrunekitError(f"{name} is a {type(linear).__name__}; compressed-tensors stores nn.Linear layers only")
    weight = linear.weight.detach()
    columns = weight.shape[1]
    if grid.group_size != -1 and columns % grid.group_size:
        divisor = columns & -columns  # the largest power of two that divides the width
        raise PrunekitError(
            f"compressed-tensors needs --group-size to divide every layer's width, and {name} has {columns} input "
            f"columns (not a multiple of {grid.group_size}); quantize with --group-size {min(divisor, 128)} or -1"
        )
    scale, zero = grid_of(linear)
    expected = (weight.shape[0], grid.groups(weight.shape[1]))
    if tuple(scale.shape) != expected:
        raise PrunekitError(
            f"{name}'s recorded grid has {scale.shape[1]} groups, not the {expected[1]} of --bits {grid.bits} "
            f"--group-size {grid.group_size}; save with the settings it was quantized with"
        )
    W = weight.float()
    codes = quant_codes(W, scale.float(), zero.float(), grid.bits, grid.group_size)
    if not torch.equal(dequantize(codes, scale.float(), zero.float(), grid.group_size).to(weight.dtype), weight):
        raise PrunekitError(
            f"{name}'s weights are off the grid GPTQ recorded (changed after quantization, e.g. by recovery); "
            "quantize again after the last change"
        )
    return {"weight": weight, SCALE: scale.detach(), ZERO: zero.detach().to(torch.int8)}


def check_compressible(model: nn.Module, grid: QuantGrid, include=(), exclude=()) -> None:
    """Refuse, before any quantization, what ``save_compressed`` could not store: no library, a lazy model,
    a group size that does not divide a block linear's width."""
    _library()
    if is_lazy(model):
        raise PrunekitError("saving compressed-tensors needs the model in memory; drop --lazy")
    adapter = get_adapter(model)
    for i in range(adapter.num_blocks()):
        for name, linear in select_linears(adapter.block(i), include, exclude).items():
            columns = linear_weight(linear).shape[1]
            if grid.group_size != -1 and columns % grid.group_size:
                divisor = columns & -columns  # the largest power of two that divides the width
                raise PrunekitError(
                    f"compressed-tensors needs --group-size to divide every layer's width, and block {i}'s {name} "
                    f"has {columns} input columns; use --group-size {min(divisor, 128)} or -1"
                )


def save_compressed(
    model: nn.Module,
    tokenizer,
    out: str | os.PathLike,
    grid: QuantGrid,
    manifest: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (quantized by GPTQ, or SparseGPT with ``bits``, with ``grid``) to ``out`` atomically."""
    _library()
    from compressed_tensors.compressors import ModelCompressor

    if is_lazy(model):
        raise PrunekitError("saving compressed-tensors needs the model in memory; drop --lazy")
    if not quantized_linears(model):
        raise PrunekitError("the model has no quantized layer to save; run GPTQ (or SparseGPT with --bits) first")
    state, dense = compressed_state_dict(model, grid)

    def write(folder: Path) -> dict:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(folder)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(folder)
        ModelCompressor(quantization_config=quantization_config(grid, dense)).update_config(str(folder))
        return {"storage": {"format": "compressed-tensors", "bits": grid.bits}}

    return save_folder(model, tokenizer, out, manifest or {}, write, overwrite)


def decompress_recording_grids(model: nn.Module) -> int:
    """Turn every quantized linear of a model loaded from a compressed-tensors folder back into a plain
    ``nn.Linear`` with float weights (the library's dequantiser: exactly the floats GPTQ evaluated), its
    scale and zero point recorded as GPTQ records them, so exporters can write the codes as they are.
    Returns how many linears it turned back."""
    from compressed_tensors.compressors import decompress_module
    from compressed_tensors.quantization import QuantizationMetadata, QuantizationStatus

    hook = model.__dict__.pop("ct_decompress_hook", None)  # the library's decompress-on-first-forward
    if hook is not None:
        hook.remove()
    count = 0
    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is None or not hasattr(module, "weight_scale"):
            continue
        scale = module.weight_scale.detach().clone()
        zero = getattr(module, "weight_zero_point", None)
        zero = torch.zeros_like(scale) if zero is None else zero.detach().clone().reshape(scale.shape)
        if module.quantization_status == QuantizationStatus.COMPRESSED:
            decompress_module(module, leave_decompressed=False)  # a plain Linear again, forward restored
        else:  # already decompressed by a forward pass: only the quantization wrappers are left to drop
            QuantizationMetadata.clear_quantization(module)
        record_grid(module, scale, zero)
        count += 1
    return count


def folder_bytes(folder: str | os.PathLike) -> int:
    """Bytes of a saved model's weight files (what the size-versus-quality tables compare)."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))

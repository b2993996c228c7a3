"""The study's size axis: every point also quantized by GPTQ, and perplexity against megabytes.

Pruning and quantization are two halves of one budget: "which mix of width, depth, sparsity and bits
gives the best model at N megabytes". ``prunekit study --quant w8,w4`` quantizes the dense model and
every point (after its recovery, as models ship) with GPTQ on the study's calibration text, measures
its perplexity, and adds a panel of perplexity against size.

Size is counted one way for every row, so rows compare: a quantized linear takes ``bits`` per weight
plus a 16-bit scale per group (and a zero point per group when asymmetric); every other tensor (the
embeddings, norms, the untied head, the layers of an unquantized point) takes 16 bits per value, as a
bf16 checkpoint stores it; a tied head is counted once. Zeros of sparse methods are counted as
stored (dense shapes). Speed is not timed for quantized rows: PyTorch runs dequantized weights, so
what they gain shows only in an engine with quantized kernels (``prunekit export --format gguf``).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from prunekit.errors import PrunekitError
from prunekit.evaluate import perplexity
from prunekit.jobs import calibration_for
from prunekit.methods import GPTQConfig, prune
from prunekit.methods.quant import grid_of
from prunekit.models import get_adapter, linear_weight
from prunekit.sequential import EngineConfig

QUANT_VARIANTS = {  # --quant name -> (bits, preferred group size; -1: one scale per row)
    "w8": (8, -1),
    "w4": (4, 32),  # groups of 32: GGUF's Q4_0 blocks hold these codes as they are
}
UNQUANTIZED_BITS = 16


def check_quant_variants(names: tuple[str, ...]) -> None:
    unknown = [n for n in names if n not in QUANT_VARIANTS]
    if unknown:
        raise PrunekitError(f"--quant: unknown {unknown}; choose from {', '.join(QUANT_VARIANTS)} (comma-separated)")


def group_size_for(model, preferred: int) -> int:
    """``preferred`` when it divides every block linear's input width, else the largest power of two below
    it that does (pruned widths are multiples of --round-to, not always of 32), or -1 (one scale per row)."""
    if preferred == -1:
        return -1
    adapter = get_adapter(model)
    widths = {linear_weight(lin).shape[1] for i in range(adapter.num_blocks()) for lin in adapter.block(i).linears().values()}
    size = preferred
    while size >= 8:
        if all(w % size == 0 for w in widths):
            return size
        size //= 2
    return -1


def megabytes(model: nn.Module, bits: int | None = None) -> float:
    """Millions of bytes the model takes as counted in the module docstring (``bits``: of its GPTQ grids)."""
    total, seen = 0.0, set()
    for module in model.modules():
        grid = grid_of(module)
        for param in module.parameters(recurse=False):
            if id(param) in seen:
                continue  # a tied head is the embedding
            seen.add(id(param))
            if grid is not None and param.dim() == 2:
                scale, zero = grid
                side = scale.numel() * UNQUANTIZED_BITS * (2 if bool((zero != 0).any()) else 1)
                total += param.numel() * bits + side
            else:
                total += param.numel() * UNQUANTIZED_BITS
    return total / 8 / 1e6


def quantized_point(
    model, tokenizer, name: str, variant: str, text, settings, progress: Callable[[str], None]
) -> dict:
    """Quantize ``model`` (in place) with GPTQ as ``variant`` says, and measure it: perplexity and size.

    ``settings``: the study's config (calibration text, samples, seed, evaluation windows)."""
    bits, preferred = QUANT_VARIANTS[variant]
    config = GPTQConfig(bits=bits, group_size=group_size_for(model, preferred))
    progress(f"{name} {variant}: GPTQ {bits}-bit, group {config.group_size}")
    calib = calibration_for(config, tokenizer, settings.calib, settings.nsamples, settings.calib_seqlen, settings.seed)
    prune(model, config, calib, EngineConfig(progress=settings.progress, batch_size=min(8, len(calib.tokens))))
    ppl = perplexity(model, tokenizer, text, settings.eval_seqlen, settings.max_windows, progress=settings.progress)
    return {"quant": variant, "bits": bits, "group_size": config.group_size, "ppl": ppl.ppl, "megabytes": megabytes(model, bits)}


def size_rows(rows: list[dict]) -> list[dict]:
    """The size panel's rows: each table row at 16 bits, then its quantized variants (rows measured before
    sizes were recorded are left out)."""
    out = []
    for row in rows:
        if row.get("megabytes") is None:
            continue
        out.append({**_base(row), "quant": None, "bits": UNQUANTIZED_BITS, "ppl": row["ppl"], "megabytes": row["megabytes"]})
        for q in row.get("quantized") or []:
            out.append({**_base(row), **q, "point": f"{row['point']} {q['quant']}"})
    return out


def _base(row: dict) -> dict:
    return {k: row[k] for k in ("point", "method", "ratio", "recovered")}


def size_lines(sizes: list[dict]) -> list[str]:
    """The report's size table: every point at 16 bits and quantized, smallest first."""
    if not any(s["quant"] for s in sizes):
        return []
    lines = [
        "Size (quantized linears at their bits plus a 16-bit scale per group; every other tensor at 16 bits; "
        "GPTQ on the calibration text; speed not timed, PyTorch runs dequantized weights):",
        "",
        "| point | bits | MB | ppl |",
        "|---|---|---|---|",
    ]
    for s in sorted(sizes, key=lambda s: s["megabytes"]):
        group = f" (group {s['group_size']})" if s.get("group_size", -1) != -1 else ""
        lines.append(f"| {s['point']} | {s['bits']}{group} | {s['megabytes']:.1f} | {s['ppl']:.2f} |")
    return lines + [""]

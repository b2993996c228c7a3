"""How a tensor becomes GGUF bytes: float types, llama.cpp's Q8_0 / Q4_0 blocks, and GPTQ's own codes.

Q8_0 and Q4_0 split every row into blocks of 32 weights, each with one f16 scale ``d``: Q8_0 stores
``q`` in int8 (weight = d * q), Q4_0 stores ``q`` in 4 bits (weight = d * (q - 8), two codes a byte:
byte j holds code j in its low nibble and code j + 16 in its high one). A float weight is rounded onto
a fresh grid per block by the ``gguf`` package. A weight GPTQ already put on a symmetric grid (a
recorded ``(scale, zero)``, ``prunekit.methods.quant``) is not rounded again: its grid is one of these
when each block of 32 lies inside one of its groups and its codes fit, so the file holds GPTQ's very
integers with its scale (rounded to f16, as every GGUF scale is) and llama.cpp runs the error-compensated
weights, not a second rounding of them.
"""

from __future__ import annotations

import numpy as np

from prunekit.errors import PrunekitError

QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0")
QUANT_BLOCK = 32  # Q8_0 and Q4_0 quantize each row in blocks of 32
CODE_RANGE = {"q8_0": (-128, 127), "q4_0": (-8, 7)}  # the integers a block can hold (Q4_0: q - 8)
# Under q4_0 the output head (the token embedding when tied) is written as Q8_0: llama.cpp's own
# llama-quantize keeps the head at Q6_K in its Q4_0 files (a type gguf-py cannot write), because 4-bit
# logits cost the most: SmolLM2's tied head in Q4_0 cost +41-74% perplexity (16 windows).
HEAD_QUANT = {"q4_0": "q8_0"}


def check_quant(quant: str) -> None:
    if quant not in QUANTS:
        raise PrunekitError(f"--quant must be one of {', '.join(QUANTS)}, got {quant!r}")


def encode(name: str, data: np.ndarray, quant: str, grid=None) -> tuple[np.ndarray, object | None]:
    """``(array, raw ggml type or None)`` for ``GGUFWriter.add_tensor``; vectors (norms, biases) stay f32.

    ``grid``: ``(column_scales, zeros)`` of a weight GPTQ quantized, both arrays of the weight's shape (each
    column's scale and zero point, transformed as the weight was); its codes are then written as they are."""
    import gguf

    if data.ndim < 2 or quant == "f32":
        return data, None
    if quant == "f16":
        return data.astype(np.float16), None
    if quant == "bf16":
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    if data.shape[-1] % QUANT_BLOCK:
        raise PrunekitError(
            f"{quant} quantizes rows in blocks of {QUANT_BLOCK}, but {name} has rows of {data.shape[-1]}; "
            f"prune with --round-to {QUANT_BLOCK} (a multiple of {QUANT_BLOCK} neurons per block), "
            "or export as f16 / bf16 / f32"
        )
    qtype = getattr(gguf.GGMLQuantizationType, quant.upper())
    if grid is None:
        return gguf.quants.quantize(data, qtype), qtype
    scale, codes = block_codes(name, data, *grid, quant)
    return pack_blocks(scale, codes, quant), qtype


def block_codes(name: str, weight: np.ndarray, scales: np.ndarray, zeros: np.ndarray, quant: str):
    """``(scale [rows, blocks], codes [rows, blocks, 32])`` of a weight on its GPTQ grid, or a one-line
    ``PrunekitError`` when the grid is not a ``quant`` one."""
    rows = weight.shape[0]
    blocks = lambda a: a.reshape(rows, -1, QUANT_BLOCK)  # noqa: E731
    if np.any(zeros != 0):
        raise PrunekitError(
            f"{name} was quantized on an asymmetric grid, which {quant} (symmetric blocks) cannot hold; "
            "quantize with --sym, or export as f16 / f32"
        )
    block_scales = blocks(scales)
    if np.any(block_scales != block_scales[..., :1]):
        raise PrunekitError(
            f"{name}'s quantization groups do not align with {quant}'s blocks of {QUANT_BLOCK}; "
            f"quantize with a --group-size that is a multiple of {QUANT_BLOCK} (or -1), or export as f16 / f32"
        )
    scale = block_scales[..., 0]
    codes = np.rint(blocks(weight) / scale[..., None])
    lo, hi = CODE_RANGE[quant]
    if codes.min(initial=0) < lo or codes.max(initial=0) > hi:
        raise PrunekitError(
            f"{name}'s codes go beyond {quant}'s range [{lo}, {hi}] (more bits than it holds); export with a "
            "wider --quant (q8_0) or as f16 / f32"
        )
    if not np.array_equal(codes * scale[..., None], blocks(weight)):
        raise PrunekitError(f"{name}'s weights are off their recorded grid; quantize again after the last change")
    return scale, codes


def pack_blocks(scale: np.ndarray, codes: np.ndarray, quant: str) -> np.ndarray:
    """GGUF's byte layout of Q8_0 / Q4_0 rows: per block its f16 scale, then its codes."""
    rows, nblocks = scale.shape
    d = scale.astype(np.float16)[..., None].view(np.uint8)  # [rows, blocks, 2], little-endian as ggml reads it
    if quant == "q8_0":
        q = codes.astype(np.int8).view(np.uint8)
    else:
        stored = (codes + 8).astype(np.uint8)
        half = QUANT_BLOCK // 2
        q = stored[..., :half] | (stored[..., half:] << 4)
    return np.concatenate([d, q], axis=-1).reshape(rows, -1)

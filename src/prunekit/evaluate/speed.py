"""Speed as gpt-fast measures it: warm-up excluded, device synced before reading the clock, medians
over repeats. Prefill latency for one prompt, greedy decode tokens/s with the KV cache, peak memory.

Prefill is what ``generate`` does before the first new token: one forward of the prompt that fills
the KV cache and computes the logits of the last position only (``logits_to_keep=1``); logits for
every prompt position would add a vocabulary-sized matmul per token that no generation pays."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from prunekit.errors import PrunekitError


@dataclass
class SpeedResult:
    batch_size: int
    prompt_tokens: int
    new_tokens: int
    prefill_ms: float  # median: prompt forward filling the KV cache, last-position logits
    decode_tokens_per_s: float  # median: the n - 1 cached steps after the first new token
    repeats: int
    peak_memory_mb: float | None  # CUDA only

    def to_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_speed(
    model,
    prompt_tokens: int = 512,
    new_tokens: int = 64,
    batch_size: int = 1,
    repeats: int = 5,
    warmup: int = 1,
    seed: int = 0,
) -> SpeedResult:
    """Median prefill latency (one forward of the prompt) and greedy decode throughput."""
    if min(prompt_tokens, new_tokens, batch_size, repeats) < 1:
        raise PrunekitError("speed needs at least one prompt token, new token, sample and repeat")
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch_size, prompt_tokens), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prefill, decode = [], []

    def timed(fn) -> float:
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - start

    def generate(n):
        return lambda: model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    for i in range(warmup + repeats):
        prefill_s = timed(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1))
        # generate(1) is the prefill plus the first token; generate(n) adds n - 1 cached decode steps
        decode_s = timed(generate(new_tokens)) - timed(generate(1))
        if i >= warmup:
            prefill.append(prefill_s)
            decode.append(max(decode_s, 1e-9))
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return SpeedResult(
        batch_size,
        prompt_tokens,
        new_tokens,
        1000 * statistics.median(prefill),
        batch_size * (new_tokens - 1) / statistics.median(decode),
        repeats,
        peak,
    )

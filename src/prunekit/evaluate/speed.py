"""Speed you can believe on a shared machine: models timed in the same process, interleaved.

A CPU shared with other work changes speed by tens of percent within a minute, so a ratio between two
models means something only when both were timed under the same load. ``compare_speed`` therefore
times every model once per round, round-robin (the order rotates each round, so a load that rises
during a round does not always hit the same model), and reports each model's speed-up over the
baseline as the median of its per-round ratios with their interquartile range. A ratio whose spread
is wider than ``max_spread`` is flagged unreadable instead of being reported as fact.

What is timed (gpt-fast's rules: warm-up rounds excluded, device synced before reading the clock):

- prefill: what ``generate`` does before the first new token, one forward of the prompt that fills
  the KV cache and computes the logits of the last position only (``logits_to_keep=1``);
- decode: after that one prefill, ``new_tokens`` greedy steps of one token each through the cache,
  each timed on its own; a round's decode speed is tokens over the sum of its steps.

The thread count is fixed for the whole comparison and recorded.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from prunekit.errors import PrunekitError
from prunekit.threads import fixed_threads

MAX_SPREAD = 0.10  # a ratio whose interquartile range exceeds 10% of it is not read as a result


@dataclass
class SpeedResult:
    """One model's speed: medians over the measured rounds."""

    batch_size: int
    prompt_tokens: int
    new_tokens: int
    prefill_ms: float  # median: prompt forward filling the KV cache, last-position logits
    decode_tokens_per_s: float  # median over rounds of new tokens / time of the cached steps
    repeats: int
    threads: int
    peak_memory_mb: float | None  # CUDA only

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Ratio:
    """A speed-up over the baseline: the median of the per-round ratios and their quartiles."""

    median: float
    q1: float
    q3: float
    rounds: int
    readable: bool  # False: the spread is too wide for the median to mean anything

    @classmethod
    def of(cls, ratios: list[float], max_spread: float = MAX_SPREAD) -> Ratio:
        median = statistics.median(ratios)
        q1, q3 = _quartiles(ratios)
        return cls(median, q1, q3, len(ratios), (q3 - q1) <= max_spread * median)

    def __str__(self) -> str:
        flag = "" if self.readable else " (spread too wide)"
        return f"{self.median:.2f}x [{self.q1:.2f}-{self.q3:.2f}]{flag}"


@dataclass
class SpeedComparison:
    baseline: str
    settings: dict
    models: dict[str, SpeedResult]
    prefill_speedup: dict[str, Ratio] = field(default_factory=dict)
    decode_speedup: dict[str, Ratio] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """One line per model: prefill and decode with their speed-ups [q1-q3] over the baseline."""
        lines = [f"model | prefill ms | speed-up [q1-q3] | decode tok/s | speed-up [q1-q3]  ({self.settings})"]
        for name, r in self.models.items():
            prefill, decode = self.prefill_speedup.get(name, "baseline"), self.decode_speedup.get(name, "baseline")
            lines.append(f"{name} | {r.prefill_ms:.1f} | {prefill} | {r.decode_tokens_per_s:.1f} | {decode}")
        return "\n".join(lines)


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_once(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """Seconds of one prefill of ``ids``, and of ``new_tokens`` greedy cached steps after it."""
    device = ids.device
    _sync(device)
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    _sync(device)
    prefill = time.perf_counter() - start
    cache, decode = out.cache, 0.0
    token = out.logits[:, -1:].argmax(-1)
    for _ in range(new_tokens):
        start = time.perf_counter()
        out = model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        _sync(device)
        decode += time.perf_counter() - start
        cache = out.cache
    return prefill, max(decode, 1e-9)


def compare_speed(
    models: dict,
    prompt_tokens: int = 512,
    new_tokens: int = 64,
    batch_size: int = 1,
    rounds: int = 5,
    warmup: int = 1,
    threads: int | None = None,
    seed: int = 0,
    max_spread: float = MAX_SPREAD,
    max_rounds: int | None = None,
) -> SpeedComparison:
    """Time ``models`` (name -> model; the first is the baseline) interleaved, ``rounds`` times each
    after ``warmup`` discarded rounds, on the same random prompt; speed-ups as medians of per-round ratios.

    With ``max_rounds``, rounds go on past ``rounds`` while any ratio's spread is too wide, up to
    ``max_rounds``: on a machine that gets busy for a while, more rounds let the quartiles settle
    instead of flagging the result (a quiet machine stops at ``rounds``)."""
    if not models:
        raise PrunekitError("a speed comparison needs at least one model")
    if min(prompt_tokens, new_tokens, batch_size, rounds) < 1 or warmup < 0:
        raise PrunekitError(
            "speed needs at least one prompt token, new token, sample and repeat (e.g. --repeats 5), got "
            f"prompt {prompt_tokens}, new tokens {new_tokens}, batch {batch_size}, repeats {rounds}"
        )
    names = list(models)
    devices = {next(m.parameters()).device for m in models.values()}
    if len(devices) != 1:
        raise PrunekitError(f"models to compare must sit on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    vocab = min(m.config.vocab_size for m in models.values())
    ids = torch.randint(0, vocab, (batch_size, prompt_tokens), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prefill = {n: [] for n in names}
    decode = {n: [] for n in names}
    limit = warmup + max(rounds, max_rounds or 0)
    with fixed_threads(threads) as used_threads:
        round_index = 0
        while round_index < warmup + rounds or (
            round_index < limit and not _all_readable(prefill, decode, names[0], max_spread)
        ):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                p, d = time_once(models[name], ids, new_tokens)
                if round_index >= warmup:
                    prefill[name].append(p)
                    decode[name].append(batch_size * new_tokens / d)
            round_index += 1
    rounds = round_index - warmup
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    settings = dict(
        batch_size=batch_size, prompt_tokens=prompt_tokens, new_tokens=new_tokens, rounds=rounds, warmup=warmup,
        max_rounds=max_rounds, threads=used_threads, device=str(device), interleaved=True,
    )  # fmt: skip
    results = {
        n: SpeedResult(
            batch_size,
            prompt_tokens,
            new_tokens,
            1000 * statistics.median(prefill[n]),
            statistics.median(decode[n]),
            rounds,
            used_threads,
            peak,
        )  # fmt: skip
        for n in names
    }
    comparison = SpeedComparison(names[0], settings, results)
    for n in names:
        comparison.prefill_speedup[n], comparison.decode_speedup[n] = _ratios(prefill, decode, names[0], n, max_spread)
    return comparison


def _ratios(prefill: dict, decode: dict, base: str, name: str, max_spread: float) -> tuple[Ratio, Ratio]:
    """``name``'s prefill and decode speed-ups over ``base``, from the rounds timed so far."""
    prefill_ratio = Ratio.of([b / x for b, x in zip(prefill[base], prefill[name], strict=True)], max_spread)
    decode_ratio = Ratio.of([x / b for b, x in zip(decode[base], decode[name], strict=True)], max_spread)
    return prefill_ratio, decode_ratio


def _all_readable(prefill: dict, decode: dict, base: str, max_spread: float) -> bool:
    return all(r.readable for n in prefill for r in _ratios(prefill, decode, base, n, max_spread))


def measure_speed(
    model,
    prompt_tokens: int = 512,
    new_tokens: int = 64,
    batch_size: int = 1,
    repeats: int = 5,
    warmup: int = 1,
    seed: int = 0,
    threads: int | None = None,
) -> SpeedResult:
    """One model's median prefill latency and greedy decode throughput (no baseline: absolute times only,
    which drift with the machine's load; compare models with ``compare_speed``)."""
    comparison = compare_speed(
        {"model": model}, prompt_tokens, new_tokens, batch_size, repeats, warmup, threads=threads, seed=seed
    )
    return comparison.models["model"]

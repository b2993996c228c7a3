"""``prunekit bench``: speed, memory, size and compute of models measured side by side in one run.

Every setting (batch size x prompt length) times all models interleaved, round by round
(``compare_speed``), so a shared machine's changing load hits all models alike; results are the
median per-round ratios to the first model (the baseline), with their interquartile range, and a
ratio whose spread is too wide is flagged rather than reported as fact. MACs are counted, not estimated:
``torch.utils.flop_counter`` records every matmul of one forward (linears, attention, SliceGPT's
shortcuts), halved to multiply-accumulates and divided by the tokens.
"""

from __future__ import annotations

import resource
from dataclasses import asdict, dataclass, field

import torch

from prunekit.errors import PrunekitError
from prunekit.evaluate.speed import Ratio, compare_speed
from prunekit.models import parameter_counts


@dataclass
class ModelFacts:
    params: dict  # total and non-embedding
    weights_mb: float  # parameters and buffers as stored
    prefill_macs_per_token: dict  # prompt length -> MACs per token of one prompt forward
    decode_macs_per_token: dict  # context length -> MACs of one cached decode step


@dataclass
class BenchResult:
    models: dict[str, ModelFacts]
    speed: list[dict] = field(default_factory=list)  # one row per model and setting, with its ratios
    baseline: str = ""
    peak_rss_mb: float = 0.0  # the whole process (CPU); CUDA peaks are in the speed rows

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """The models' sizes, then prefill and decode per setting with speed-ups [q1-q3] over the baseline."""
        lines = ["model | params (non-emb) | weights MB | MACs/token (prefill, longest prompt)"]
        for name, facts in self.models.items():
            longest = max(facts.prefill_macs_per_token)
            lines.append(
                f"{name} | {facts.params['total']:,} ({facts.params['non_embedding']:,}) | {facts.weights_mb:.1f} | "
                f"{facts.prefill_macs_per_token[longest] / 1e6:.1f}M"
            )
        threads = self.speed[0]["threads"] if self.speed else "?"
        header = "model | batch x prompt | prefill ms | speed-up [q1-q3] | decode tok/s | speed-up [q1-q3]"
        lines.append(f"{header}  ({threads} threads)")
        for row in self.speed:
            lines.append(
                f"{row['model']} | {row['batch_size']} x {row['prompt_tokens']} | {row['prefill_ms']:.1f} | "
                f"{Ratio(**row['prefill'])} | {row['decode_tokens_per_s']:.1f} | {Ratio(**row['decode'])}"
            )
        return "\n".join(lines)

    def ratios(self) -> list[dict]:
        """Each model's prefill and decode speed-up over the baseline (medians of interleaved rounds), per setting."""
        return [
            {**r, "prefill_speedup": r["prefill"]["median"], "decode_speedup": r["decode"]["median"]}
            for r in self.speed
        ]


@torch.no_grad()
def macs_per_token(model, prompt_tokens: int) -> tuple[float, float]:
    """MACs per token of a ``prompt_tokens`` prompt forward, and of one decode step at that context.

    The linears (and SliceGPT's shortcut matmuls: every 2-D matrix product) are counted by
    ``FlopCounterMode`` on one forward; attention's QKᵀ and AV are added by hand (2 x query width x
    context per block), since which attention kernel runs (and whether the counter sees it) depends
    on the device."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    ids = torch.zeros(1, prompt_tokens, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, use_cache=False, logits_to_keep=prompt_tokens)
    counts = counter.get_flop_counts().get("Global", {})
    matrix = sum(n for op, n in counts.items() if op in (torch.ops.aten.mm, torch.ops.aten.addmm))
    linear = matrix / 2 / prompt_tokens
    width = sum(_query_widths(model))
    return linear + 2 * width * (prompt_tokens + 1) / 2, linear + 2 * width * (prompt_tokens + 1)


def _query_widths(model) -> list[int]:
    """Each block's attention width (heads x head size); 0 where depth pruning removed the attention."""
    from prunekit.models import get_adapter, linear_weight
    from prunekit.surgery.depth import kept_sublayers

    adapter = get_adapter(model)
    widths = []
    for module in adapter.blocks():
        kept = kept_sublayers(module)["attention"]
        widths.append(linear_weight(adapter.attention(module).o).shape[1] if kept else 0)
    return widths


def model_facts(model, prompt_lengths: list[int]) -> ModelFacts:
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    macs = {length: macs_per_token(model, length) for length in prompt_lengths}
    return ModelFacts(
        parameter_counts(model),
        weights / 2**20,
        {length: m[0] for length, m in macs.items()},
        {length: m[1] for length, m in macs.items()},
    )


def benchmark(
    models: dict,
    batch_sizes: list[int],
    prompt_lengths: list[int],
    new_tokens: int = 64,
    repeats: int = 5,
    progress=None,
    threads: int | None = None,
) -> BenchResult:
    """Measure ``models`` (name -> model; the first is the baseline) at every batch size and prompt length,
    interleaved, ``repeats`` rounds each, with ``threads`` intra-op threads (None: torch's setting)."""
    if not models:
        raise PrunekitError("bench needs at least one model")
    if not batch_sizes or not prompt_lengths or min(*batch_sizes, *prompt_lengths) < 1:
        raise PrunekitError("--batch-sizes and --prompt-lengths must be positive integers, e.g. 1,8 and 128,512")
    facts = {name: model_facts(m, prompt_lengths) for name, m in models.items()}
    result = BenchResult(facts, baseline=next(iter(models)))
    for batch in batch_sizes:
        for length in prompt_lengths:
            comparison = compare_speed(models, length, new_tokens, batch_size=batch, rounds=repeats, threads=threads)
            for name in models:
                row = {
                    "model": name,
                    **comparison.models[name].to_dict(),
                    "prefill": asdict(comparison.prefill_speedup[name]),
                    "decode": asdict(comparison.decode_speedup[name]),
                }
                result.speed.append(row)
                if progress is not None:
                    progress(row)
    result.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result

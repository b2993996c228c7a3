"""What the width and depth benchmarks measure on a pruned model: perplexity, or speed with --speed."""

from __future__ import annotations

import json

from prunekit.evaluate import compare_speed, perplexity


def measure(model, tokenizer, text, args) -> dict:
    """``{"speed": ...}`` with ``args.speed``: the pruned model timed interleaved with ``args.dense_model``
    (``args.repeats`` rounds, 1 x 512 prefill, 64 greedy tokens; speed-ups as median per-round ratios with
    their quartiles, ``args.threads`` threads), else WikiText-2 ``{"ppl": ...}`` at
    seqlen 512 over ``args.max_windows`` windows (0: the full split), plus ``"ppl_full"`` over the full split
    when ``args.full_split`` is set (so one pruned model fills both columns of a table)."""
    if args.speed:
        models = {"dense": args.dense_model, "pruned": model}
        comparison = compare_speed(models, rounds=args.repeats, threads=getattr(args, "threads", None))
        return {"speed": comparison.to_dict()}
    windows = args.max_windows or None
    row = {"ppl": perplexity(model, tokenizer, text, seqlen=512, max_windows=windows, progress=False).ppl}
    if getattr(args, "full_split", False) and windows is not None:
        row["ppl_full"] = perplexity(model, tokenizer, text, seqlen=512, progress=False).ppl
    return row


def save(path, results) -> None:
    """Write the results so far (after every run: a benchmark killed half-way keeps what it measured)."""
    if path:
        with open(path, "w") as fh:
            json.dump(results, fh, indent=2, default=str)

"""Width pruning on SmolLM2-135M: 20% of non-embedding parameters removed, no recovery.

Perplexity (WikiText-2 raw test, seqlen 512, first --max-windows windows) and parameter counts for
each importance and GQA policy, uniform allocation. Calibration: C4 sample, --nsamples x 512, seed 0.
With --speed, also prefill latency (1 x 512) and greedy decode tokens/s (64 new tokens), dense and
pruned in the same run (median of --repeats after a warm-up).

    python benchmarks/width.py --json benchmarks/results/width-64.json
    python benchmarks/width.py --speed --runs "wanda-sp kv-groups" --json benchmarks/results/width-speed.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch

from prunekit import load
from prunekit.data import calibration, load_text
from prunekit.evaluate import measure_speed, perplexity
from prunekit.methods import WidthConfig, prune
from prunekit.models import parameter_counts
from prunekit.sequential import EngineConfig

IMPORTANCES = ("magnitude-l2", "wanda-sp", "activation", "random")
RUNS = {f"{imp} {gqa}": (imp, gqa) for imp in IMPORTANCES for gqa in ("kv-groups", "query-even")}
RUNS["wanda-sp mlp-only"] = ("wanda-sp", None)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--target", type=float, default=0.2)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--max-windows", type=int, default=64)
    parser.add_argument("--runs", nargs="*", default=list(RUNS))
    parser.add_argument("--speed", action="store_true", help="measure speed instead of perplexity")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    model, tokenizer = load(args.model)
    calib = calibration(tokenizer, "c4", n_samples=args.nsamples, seqlen=512, seed=0)
    text = load_text("wikitext2")
    results = {"model": args.model, "target": args.target, "calibration": calib.describe(), "runs": {}}
    if args.speed:
        results["dense_speed"] = measure_speed(model, repeats=args.repeats).to_dict()
        print(f"dense: {results['dense_speed']}", flush=True)
    else:
        dense = perplexity(model, tokenizer, text, seqlen=512, max_windows=args.max_windows, progress=False)
        results["dense"] = {"ppl": dense.ppl, "params": parameter_counts(model)}
        print(f"dense ppl {dense.ppl:.3f} params {parameter_counts(model)}", flush=True)
    for name in args.runs:
        importance, gqa = RUNS[name]
        model, _ = load(args.model)
        config = WidthConfig(
            args.target,
            importance=importance,
            gqa=gqa or "kv-groups",
            prune_heads=gqa is not None,
            round_to=args.round_to,
        )
        start = time.perf_counter()
        prune(model, config, calib if config.needs_calibration else None, EngineConfig(progress=False))
        row = {
            "prune_seconds": time.perf_counter() - start,
            "params": parameter_counts(model),
            "shape": [
                model.config.intermediate_size,
                model.config.num_attention_heads,
                model.config.num_key_value_heads,
            ],
        }
        if args.speed:
            row["speed"] = measure_speed(model, repeats=args.repeats).to_dict()
        else:
            row["ppl"] = perplexity(
                model, tokenizer, text, seqlen=512, max_windows=args.max_windows, progress=False
            ).ppl
        results["runs"][name] = row
        print(f"{name:24s} {row}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()

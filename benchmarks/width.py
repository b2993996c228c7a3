"""Width pruning on SmolLM2-135M: 20% of non-embedding parameters removed, no recovery.

Perplexity (WikiText-2 raw test, seqlen 512, first --max-windows windows; 0 = the full split) and
parameter counts for each importance, GQA policy ("mlp-only": heads kept) and allocation (uniform
shapes or FLAP-style global ranking), and the two recipes. Calibration: C4 sample, --nsamples x 512,
seed 0 (the recipes use their own sample counts and lengths). With --speed, prefill latency (1 x 512)
and greedy decode tokens/s (64 new tokens) instead, each pruned model timed interleaved with the dense
one (--repeats rounds after a warm-up; median per-round ratios with their quartiles), at each --round-to given.

    python benchmarks/width.py --json benchmarks/results/width-64.json
    python benchmarks/width.py --speed --runs "wanda-sp mlp-only uniform" --round-to 1 8 64 128 \
        --json benchmarks/results/width-speed.json
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from common import measure, save

from prunekit import load
from prunekit.data import calibration, load_text
from prunekit.methods import WidthConfig, prune
from prunekit.methods.width import RECIPES
from prunekit.models import parameter_counts
from prunekit.sequential import EngineConfig

IMPORTANCES = ("magnitude-l2", "wanda-sp", "activation", "fluctuation", "taylor", "random")
POLICIES = {"kv-groups": {"gqa": "kv-groups"}, "query-even": {"gqa": "query-even"}, "mlp-only": {"prune_heads": False}}
RUNS = {
    f"{imp} {policy} {alloc}": ({"importance": imp, "allocation": alloc, **options}, None)
    for imp in IMPORTANCES
    for policy, options in POLICIES.items()
    for alloc in ("uniform", "global")
}
RUNS.update({f"recipe {name}": (recipe.options, recipe) for name, recipe in RECIPES.items()})


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--target", type=float, default=0.2)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--max-windows", type=int, default=64)
    parser.add_argument("--full-split", action="store_true", help="also measure the full split (ppl_full)")
    parser.add_argument("--runs", nargs="*", default=list(RUNS))
    parser.add_argument("--speed", action="store_true", help="measure speed instead of perplexity")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--round-to", type=int, nargs="*", default=[8])
    parser.add_argument("--json", default=None)
    parser.add_argument("--batch-size", type=int, default=8, help="calibration samples per block forward")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense baseline (measured by another run)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    model, tokenizer = load(args.model)
    calib = calibration(tokenizer, "c4", n_samples=args.nsamples, seqlen=512, seed=0)
    text = load_text("wikitext2")
    results = {"model": args.model, "target": args.target, "calibration": calib.describe(), "runs": {}}
    if args.speed:
        args.dense_model = model  # every pruned model is timed interleaved with it
    elif not args.no_dense:
        results["dense"] = {**measure(model, tokenizer, text, args), "params": parameter_counts(model)}
        print(f"dense {results['dense']}", flush=True)
    for name in args.runs:
        for round_to in args.round_to:
            key = name if len(args.round_to) == 1 else f"{name} round-to {round_to}"
            results["runs"][key] = run_one(args, name, round_to, calib, tokenizer, text)
            print(f"{key:40s} {results['runs'][key]}", flush=True)
            save(args.json, results)  # after every run: a benchmark killed half-way keeps what it measured


def run_one(args, name, round_to, calib, tokenizer, text) -> dict:
    options, recipe = RUNS[name]
    model, _ = load(args.model)
    config = WidthConfig(args.target, round_to=round_to, **options)
    if recipe is not None:
        calib = calibration(tokenizer, recipe.calib, n_samples=recipe.nsamples, seqlen=recipe.seqlen, seed=0)
    start = time.perf_counter()
    engine = EngineConfig(progress=False, batch_size=args.batch_size)
    result = prune(model, config, calib if config.needs_calibration else None, engine)
    row = {
        "prune_seconds": time.perf_counter() - start,
        "params": parameter_counts(model),
        "calibration": result.calibration,
        "blocks": [[b["intermediate_size"], b["num_heads"], b["num_kv_heads"]] for b in result.engine.blocks],
    }
    return {**row, **measure(model, tokenizer, text, args)}


if __name__ == "__main__":
    torch.manual_seed(0)
    main()

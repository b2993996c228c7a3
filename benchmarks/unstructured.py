"""Unstructured and N:M sparsity on SmolLM2-135M: perplexity and pruning speed, one process.

Calibration: C4 sample, 64 windows of 512 tokens, seed 0. Evaluation: WikiText-2 raw test, seqlen 512.
Speed: each method's whole pruning time over the time of one plain forward pass of the model over the
same calibration set, both measured in this run.

    python benchmarks/unstructured.py --max-windows 64 --json benchmarks/results/unstructured.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch

from prunekit import load
from prunekit.data import calibration, load_text
from prunekit.evaluate import perplexity
from prunekit.methods import MagnitudeConfig, SparseGPTConfig, WandaConfig, prune
from prunekit.sequential import EngineConfig

RUNS = {
    "dense": None,
    "magnitude 50%": MagnitudeConfig(0.5),
    "wanda 50%": WandaConfig(0.5),
    "wanda 50% (block order)": WandaConfig(0.5, order="block"),
    "sparsegpt 50%": SparseGPTConfig(0.5),
    "magnitude 2:4": MagnitudeConfig(nm="2:4"),
    "wanda 2:4": WandaConfig(nm="2:4"),
    "sparsegpt 2:4": SparseGPTConfig(nm="2:4"),
}


@torch.no_grad()
def plain_forward_seconds(model, tokens, batch_size=8) -> float:
    start = time.perf_counter()
    for batch in tokens.split(batch_size):
        model(input_ids=batch, use_cache=False)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-windows", type=int, default=64, help="0: the full split")
    parser.add_argument("--runs", nargs="*", default=list(RUNS))
    parser.add_argument("--json", default=None)
    parser.add_argument("--speed-only", action="store_true", help="skip the perplexity evaluations")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    model, tokenizer = load(args.model)
    calib = calibration(tokenizer, "c4", n_samples=64, seqlen=512, seed=0)
    forward_s = plain_forward_seconds(model, calib.tokens)
    text = load_text("wikitext2")
    results = {
        "model": args.model,
        "calibration": calib.describe(),
        "forward_seconds": forward_s,
        "threads": torch.get_num_threads(),
        "runs": {},
    }
    for name in args.runs:
        config = RUNS[name]
        model, tokenizer = load(args.model)
        prune_s = None
        if config is not None:
            start = time.perf_counter()
            prune(model, config, calib if config.needs_calibration else None, EngineConfig(progress=False))
            prune_s = time.perf_counter() - start
        ppl = None
        if not args.speed_only:
            windows = args.max_windows or None
            ppl = perplexity(model, tokenizer, text, seqlen=512, max_windows=windows, progress=False).ppl
        results["runs"][name] = {
            "ppl": ppl,
            "windows": args.max_windows,
            "prune_seconds": prune_s,
            "prune_over_forward": prune_s / forward_s if prune_s else None,
        }
        ratio = (prune_s or 0) / forward_s
        print(f"{name:28s} ppl {ppl or float('nan'):9.3f}  prune {prune_s or 0:7.1f} s  ratio {ratio:5.2f}", flush=True)
    print(f"plain forward over the calibration set: {forward_s:.1f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()

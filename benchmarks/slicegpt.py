"""SliceGPT on SmolLM2-135M: the hidden size sliced by 10%, 20%, 25% and 30%, no recovery.

Perplexity (WikiText-2 raw test, seqlen 512, first --max-windows windows; 0 = the full split) and
parameter counts, with what the shortcut matrices and the untied head cost. Calibration: C4 sample,
--nsamples x 512, seed 0. With --speed, prefill latency (1 x 512) and greedy decode tokens/s (64 new
tokens) instead, each sliced model timed interleaved with the dense one (--repeats rounds after a warm-up; median
per-round ratios with their quartiles).

    python benchmarks/slicegpt.py --json benchmarks/results/slicegpt-64.json
    python benchmarks/slicegpt.py --speed --json benchmarks/results/slicegpt-speed.json
"""

from __future__ import annotations

import argparse
import logging

import torch
from common import measure, save

from prunekit import load
from prunekit.data import calibration, load_text
from prunekit.evaluate import perplexity
from prunekit.methods import SliceGPTConfig, prune
from prunekit.models import get_adapter, parameter_counts
from prunekit.sequential import EngineConfig


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--slices", type=float, nargs="*", default=[0.1, 0.2, 0.25, 0.3])
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--max-windows", type=int, default=64)
    parser.add_argument("--speed", action="store_true", help="measure speed instead of perplexity")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8, help="calibration samples per block forward")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense baseline (measured by another run)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    model, tokenizer = load(args.model)
    calib = calibration(tokenizer, "c4", n_samples=args.nsamples, seqlen=512, seed=0)
    text = load_text("wikitext2")
    results = {"model": args.model, "calibration": calib.describe(), "threads": torch.get_num_threads(), "runs": {}}
    if args.speed:
        args.dense_model = model  # every pruned model is timed interleaved with it
    elif not args.no_dense:
        dense = perplexity(model, tokenizer, text, seqlen=512, max_windows=args.max_windows or None, progress=False)
        results["dense"] = {"ppl": dense.ppl, "params": parameter_counts(model)}
        print(f"dense ppl {dense.ppl:.3f} params {parameter_counts(model)}", flush=True)
    for fraction in args.slices:
        key = f"slice {fraction:.0%}"
        results["runs"][key] = run_one(args, fraction, calib, tokenizer, text)
        print(f"{key:12s} {results['runs'][key]}", flush=True)
        save(args.json, results)  # after every run: a benchmark killed half-way keeps what it measured


def run_one(args, fraction, calib, tokenizer, text) -> dict:
    model, _ = load(args.model)
    engine = EngineConfig(progress=False, batch_size=args.batch_size)
    result = prune(model, SliceGPTConfig(slice=fraction), calib, engine)
    adapter = get_adapter(model)
    energies = [share for b in result.engine.blocks for share in b["kept_energy"].values()]
    row = {
        "hidden_size": result.outside_blocks["hidden_size"],
        "prune_seconds": result.seconds,
        "params": parameter_counts(model),
        "shortcut_params": sum(p.numel() for name, p in model.named_parameters() if "shortcut" in name),
        "head_params": adapter.lm_head().weight.numel(),
        "kept_energy": {"min": min(energies), "mean": sum(energies) / len(energies)},
    }
    return {**row, **measure(model, tokenizer, text, args)}


if __name__ == "__main__":
    torch.manual_seed(0)
    main()

"""Depth pruning on SmolLM2-135M: 6 of its 30 blocks (20%) removed by each criterion, no recovery.

Perplexity (WikiText-2 raw test, seqlen 512, first --max-windows windows; 0 = the full split) and
parameter counts for each criterion, one-shot and iterative, and for the sub-layer variant (attention
and MLP sub-layers ranked together, or attention only) removing as many parameters as the block runs,
and as many attention (or MLP) sub-layers as the block runs remove blocks. Calibration: C4
sample, --nsamples x --seqlen (Shortened LLaMA's 10 x 128), seed 0, scored in one batch. The time each
criterion takes is given as a ratio to one forward pass of the model over the same calibration
batch, measured just before it. With --speed: prefill latency (1 x 512) and greedy decode tokens/s
(64 new tokens), each pruned model timed interleaved with the dense one (--repeats rounds after a warm-up; median
per-round ratios with their quartiles).

    python benchmarks/depth.py --json benchmarks/results/depth-64.json
    python benchmarks/depth.py --runs "ppl attention one-shot, --remove N" "ppl mlp one-shot, --remove N" \
        --update --json benchmarks/results/depth-64.json
    python benchmarks/depth.py --speed --runs "ppl one-shot" "ppl sublayer one-shot" \
        --json benchmarks/results/depth-speed.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import torch
from common import measure, save

from prunekit import load
from prunekit.data import calibration, load_text
from prunekit.evaluate import perplexity
from prunekit.methods import DepthConfig, prune
from prunekit.models import get_adapter, parameter_counts
from prunekit.sequential import EngineConfig
from prunekit.surgery.depth import remove_blocks, remove_sublayer

BLOCK_RUNS = {
    f"{criterion} {mode}": {"criterion": criterion, "iterative": mode == "iterative"}
    for criterion in ("ppl", "taylor", "magnitude", "block-influence", "angular")
    for mode in ("one-shot", "iterative")
    if not (criterion == "magnitude" and mode == "iterative")
}
SUBLAYER_RUNS = {  # the same number of parameters as the block runs remove
    "ppl sublayer one-shot": {"criterion": "ppl", "unit": "sublayer"},
    "block-influence sublayer one-shot": {"criterion": "block-influence", "unit": "sublayer"},
    "block-influence sublayer iterative": {"criterion": "block-influence", "unit": "sublayer", "iterative": True},
    "ppl attention one-shot": {"criterion": "ppl", "unit": "attention"},
}
COUNT_RUNS = {  # as many sub-layers as the block runs remove blocks (far fewer parameters)
    "ppl attention one-shot, --remove N": {"criterion": "ppl", "unit": "attention"},
    "ppl mlp one-shot, --remove N": {"criterion": "ppl", "unit": "mlp"},
}
RUNS = {**BLOCK_RUNS, **SUBLAYER_RUNS, **COUNT_RUNS}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--remove", type=int, default=6)
    parser.add_argument("--nsamples", type=int, default=10)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--max-windows", type=int, default=64)
    parser.add_argument("--runs", nargs="*", default=list(RUNS))
    parser.add_argument("--speed", action="store_true", help="measure speed instead of perplexity")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    parser.add_argument("--update", action="store_true", help="add the runs to those already in --json")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense baseline (measured by another run)")
    parser.add_argument(
        "--removal-from",
        default=None,
        help="a results JSON of an earlier run: remove what its run of the same name removed instead of scoring "
        "again (the same calibration picks the same units), e.g. to evaluate the 64-window models on the full split",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    model, tokenizer = load(args.model)
    calib = calibration(tokenizer, "c4", n_samples=args.nsamples, seqlen=args.seqlen, seed=0)
    text = load_text("wikitext2")
    block_params = sum(p.numel() for p in get_adapter(model).blocks()[0].parameters())
    target = args.remove * block_params / parameter_counts(model)["non_embedding"]
    results = {
        "model": args.model,
        "remove_blocks": args.remove,
        "sublayer_target_params": target,
        "calibration": calib.describe(),
        "torch_threads": torch.get_num_threads(),
        "runs": {},
    }
    if args.update and args.json and os.path.exists(args.json):
        with open(args.json) as fh:
            results["runs"] = json.load(fh)["runs"]
    if args.removal_from:
        with open(args.removal_from) as fh:
            args.removals = {name: run["removed"] for name, run in json.load(fh)["runs"].items()}
        results["removal_from"] = args.removal_from
    if args.speed:
        args.dense_model = model  # every pruned model is timed interleaved with it
    elif not args.no_dense:
        windows = args.max_windows or None
        dense = perplexity(model, tokenizer, text, seqlen=512, max_windows=windows, progress=False)
        results["dense"] = {"ppl": dense.ppl, "params": parameter_counts(model), "eval_seconds": dense.seconds}
        print(f"dense ppl {dense.ppl:.3f} params {parameter_counts(model)}", flush=True)
    del model
    for name in args.runs:
        same = _same_removal(args, name, results["runs"])
        if same is not None:  # the same model was measured already: a second evaluation would only cost time
            results["runs"][name] = {**results["runs"][same], "same_model_as": same}
        elif args.removal_from:
            results["runs"][name] = run_recorded(args, name, tokenizer, text)
        else:
            results["runs"][name] = run_one(args, name, target, calib, tokenizer, text)
        print(f"{name:36s} {results['runs'][name]}", flush=True)
        save(args.json, results)  # after every run: a benchmark killed half-way keeps what it measured


@torch.no_grad()
def forward_seconds(model, tokens: torch.Tensor) -> float:
    """One plain forward over the calibration batch: the unit of the criteria's cost."""
    start = time.perf_counter()
    model(input_ids=tokens, use_cache=False)
    return time.perf_counter() - start


def run_one(args, name, target, calib, tokenizer, text) -> dict:
    options = RUNS[name]
    count = {"target_params": target} if name in SUBLAYER_RUNS else {"remove": args.remove}
    config = DepthConfig(**options, **count)
    model, _ = load(args.model)
    forward = forward_seconds(model, calib.tokens)
    engine = EngineConfig(batch_size=len(calib.tokens), progress=False)
    result = prune(model, config, calib if config.needs_calibration else None, engine)
    ranking = result.outside_blocks["ranking"]
    row = {
        "params": parameter_counts(model),
        "removed": [f"{b['removed']} {b['block']}" for b in result.engine.blocks],
        "criterion_seconds": ranking["seconds"],
        "forward_seconds": forward,
        "criterion_forwards": ranking["seconds"] / forward,
        "prune_seconds": result.seconds,
    }
    return {**row, **measure(model, tokenizer, text, args)}


def _same_removal(args, name, runs: dict) -> str | None:
    removed = sorted(args.removals[name]) if args.removal_from else None
    for other, run in runs.items():
        if removed is not None and sorted(run.get("removed", [])) == removed and "ppl" in run:
            return other
    return None


def run_recorded(args, name, tokenizer, text) -> dict:
    """The model the recorded run produced: its blocks and sub-layers removed, nothing scored."""
    removed = [entry.split() for entry in args.removals[name]]
    model, _ = load(args.model)
    adapter = get_adapter(model)
    views = {int(index): adapter.block(int(index)) for part, index in removed if part != "block"}
    for part, index in removed:
        if part != "block":
            remove_sublayer(views[int(index)], part)
    blocks = [int(index) for part, index in removed if part == "block"]
    if blocks:
        remove_blocks(model, blocks)
    row = {"params": parameter_counts(model), "removed": args.removals[name]}
    return {**row, **measure(model, tokenizer, text, args)}


if __name__ == "__main__":
    torch.manual_seed(0)
    main()

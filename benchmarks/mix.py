"""The mix search on SmolLM2-135M: score once, then solve and measure at every budget and damage measure.

Scoring (one read-only pass of the engine over C4 calibration, --nsamples x --seqlen, seed 0, batches of
--batch-size) is timed against one plain forward of the model over the same calibration in the same
batches. The table goes to --scores (a folder that ``--scores-from`` reads), so a rerun with other
--targets or --damages skips it. Each point: a fresh model cut to the choice for that budget and damage,
its parameters, its choices in words, and WikiText-2 perplexity (raw test as the hub yields its rows,
seqlen 512, the first --max-windows windows). No recovery.

    python benchmarks/mix.py --scores outputs/mix-scores --json benchmarks/results/mix-64.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import save

from prunekit import load
from prunekit.data import calibration, load_text
from prunekit.evaluate import perplexity
from prunekit.jobs import _mix_summary
from prunekit.methods import MixConfig, prune
from prunekit.methods.mix import IMPORTANCE_FILE, _importance_file, score
from prunekit.models import parameter_counts
from prunekit.sequential import EngineConfig


@torch.no_grad()
def forward_seconds(model, tokens: torch.Tensor, batch_size: int) -> float:
    """One plain forward over the calibration, in the engine's batches: the unit of the scoring's cost."""
    start = time.perf_counter()
    for batch in tokens.split(batch_size):
        model(input_ids=batch, use_cache=False)
    return time.perf_counter() - start


def scores_folder(args, tokenizer) -> dict:
    """Score into ``args.scores`` unless it holds a table already; returns what the scoring cost."""
    folder = Path(args.scores)
    if (folder / "prunekit.json").exists():
        return json.loads((folder / "prunekit.json").read_text())["metrics"]["timing"]
    model, _ = load(args.model)
    calib = calibration(tokenizer, "c4", n_samples=args.nsamples, seqlen=args.seqlen, seed=0)
    forward = forward_seconds(model, calib.tokens, args.batch_size)
    config = MixConfig(mlp_levels=args.mlp_levels, head_levels=args.head_levels)
    engine = EngineConfig(batch_size=args.batch_size)
    record, importance, _ = score(config, model, calib, engine)
    timing = {"forward_seconds": forward, "scoring_seconds": record["scoring_seconds"],
              "scoring_forwards": record["scoring_seconds"] / forward}  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / IMPORTANCE_FILE).write_bytes(_importance_file(importance))
    (folder / "prunekit.json").write_text(json.dumps({"metrics": {"mix": record, "timing": timing}}))
    return timing


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mlp-levels", default=None)
    parser.add_argument("--head-levels", default=None)
    parser.add_argument("--targets", type=float, nargs="*", default=[0.2, 0.3])
    parser.add_argument("--damages", nargs="*", default=["mse", "cosine"])
    parser.add_argument("--max-windows", type=int, default=64)
    parser.add_argument("--scores", required=True, help="folder of the scores (written unless it holds them)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    tokenizer = load(args.model)[1]
    text = load_text("wikitext2")
    results = {"model": args.model, "scores": args.scores, "timing": scores_folder(args, tokenizer), "runs": {}}
    print(f"scoring: {results['timing']}", flush=True)
    for target in args.targets:
        for measure in args.damages:
            model, _ = load(args.model)
            before = parameter_counts(model)["non_embedding"]
            result = prune(model, MixConfig(target_params=target, damage=measure, scores_from=args.scores))
            after = parameter_counts(model)["non_embedding"]
            ppl = perplexity(model, tokenizer, text, seqlen=512, max_windows=args.max_windows, progress=False).ppl
            run = {
                "target": target,
                "damage": measure,
                "removed": 1 - after / before,
                "non_embedding": after,
                "ppl": ppl,
                "summary": _mix_summary(result.engine.blocks),
                "choices": [b["choice"] for b in result.engine.blocks],
                "solve_seconds": result.seconds,
            }
            results["runs"][f"{target} {measure}"] = run
            print(f"{target} {measure}: ppl {ppl:.2f}, removed {run['removed']:.1%}, {run['summary']}", flush=True)
            print("   " + "; ".join(f"{i}: {c}" for i, c in enumerate(run["choices"])), flush=True)
            save(args.json, results)


if __name__ == "__main__":
    main()

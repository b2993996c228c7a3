"""Han et al.'s iterative prune-retrain versus one-shot magnitude pruning on SmolLM2-135M:
WikiText-2 perplexity against sparsity, and a plot.

Retraining data: C4 sample windows (seed 1), never WikiText. Evaluation: WikiText-2 raw test,
seqlen 512, first --max-windows windows.

    python benchmarks/prune_retrain.py --schedule 0.3 0.4 0.5 0.6 --steps 40 --max-windows 16 \
        --json benchmarks/results/prune_retrain.json --plot benchmarks/results/prune_retrain.png
"""

from __future__ import annotations

import argparse
import json
import logging

import torch

from prunekit import load
from prunekit.data import calibration, load_text
from prunekit.evaluate import perplexity
from prunekit.methods import MagnitudeConfig, prune
from prunekit.methods.retrain import PruneRetrainConfig, prune_retrain
from prunekit.recover import FinetuneConfig
from prunekit.sequential import EngineConfig


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--schedule", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6])
    parser.add_argument("--steps", type=int, default=40, help="fine-tuning steps after each pruning stage")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--train-seqlen", type=int, default=256)
    parser.add_argument("--max-windows", type=int, default=16)
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    model, tokenizer = load(args.model)
    text = load_text("wikitext2")
    train = calibration(tokenizer, "c4", n_samples=512, seqlen=args.train_seqlen, seed=1).tokens

    def ppl(m):
        return perplexity(m, tokenizer, text, seqlen=512, max_windows=args.max_windows, progress=False).ppl

    dense = ppl(model)
    print(f"dense ppl {dense:.2f}", flush=True)
    one_shot = []
    for s in args.schedule:
        model, _ = load(args.model)
        prune(model, MagnitudeConfig(s), engine=EngineConfig(progress=False))
        one_shot.append({"sparsity": s, "ppl": ppl(model)})
        print(f"one-shot {s:.2f}: ppl {one_shot[-1]['ppl']:.2f}", flush=True)

    model, _ = load(args.model)
    finetune = FinetuneConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size)
    iterative = prune_retrain(
        model, train, PruneRetrainConfig(list(args.schedule), finetune), evaluate=lambda: ppl(model), progress=False
    )
    for stage in iterative:
        print(
            f"prune-retrain {stage['sparsity']:.2f}: ppl {stage['metric']:.2f} "
            f"(train loss {stage['final_loss']:.3f}, {stage['train_seconds']:.0f} s)",
            flush=True,
        )

    results = {
        "model": args.model,
        "dense_ppl": dense,
        "settings": vars(args),
        "one_shot": one_shot,
        "iterative": iterative,
    }
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    if args.plot:
        plot(results, args.plot)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(
        [r["sparsity"] for r in results["one_shot"]],
        [r["ppl"] for r in results["one_shot"]],
        "o-",
        label="one-shot magnitude",
    )
    ax.plot(
        [r["sparsity"] for r in results["iterative"]],
        [r["metric"] for r in results["iterative"]],
        "s-",
        label=f"prune-retrain ({results['settings']['steps']} steps/stage)",
    )
    ax.axhline(results["dense_ppl"], color="grey", linestyle=":", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("sparsity of the decoder linears")
    ax.set_ylabel(f"WikiText-2 perplexity (first {results['settings']['max_windows']} x 512)")
    ax.set_title(f"{results['model']}: magnitude pruning")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

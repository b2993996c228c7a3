"""Recovery on SmolLM2-135M: pruned 20% by width and by depth, and 50% by Wanda, then the same token budget of
LoRA, continued pretraining and distillation (the dense model as teacher, run alongside), trained on C4.

Perplexity: WikiText-2 raw test, seqlen 512, first --max-windows windows, before and after each recovery.
Training: --steps optimizer steps of --batch-size windows of --seqlen C4 tokens (every mode sees the same
batches), peak learning rates raised above prunekit's defaults for a budget this short (--lora-lr 5e-4,
--full-lr 1e-4), warm-up 10%, cosine decay; tokens/s of training is measured per run.
Each pruned model is made once and kept under outputs/bench-recover/.

    python benchmarks/recover.py --steps 20 --json benchmarks/results/recover-64.json
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
from common import save

from prunekit import load, save_pruned
from prunekit.data import calibration, load_text
from prunekit.evaluate import perplexity
from prunekit.methods import DepthConfig, WandaConfig, WidthConfig, prune
from prunekit.models import parameter_counts
from prunekit.recover import RecoverConfig, load_train_data, recover
from prunekit.sequential import EngineConfig

PRUNED = {  # the best configuration of each kind in BENCHMARKS.md that prunes in about a minute
    "width 20%": (WidthConfig(0.2, importance="wanda-sp", gqa="query-even", allocation="global"), (16, 512)),
    "depth 20%": (DepthConfig(criterion="block-influence", remove=6), (10, 128)),
    "wanda 50%": (WandaConfig(0.5), (64, 512)),
}
MODES = ("lora", "cpt", "distill")
CACHE = Path("outputs/bench-recover")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pruned", nargs="*", default=list(PRUNED))
    parser.add_argument("--modes", nargs="*", default=list(MODES))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--lora-lr", type=float, default=5e-4, help="peak learning rate of LoRA (short budget)")
    parser.add_argument("--full-lr", type=float, default=1e-4, help="peak learning rate of cpt and distill")
    parser.add_argument("--max-windows", type=int, default=64)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    dense, tokenizer = load(args.model)
    text = load_text("wikitext2")
    train = load_train_data(tokenizer, "c4", args.seqlen)
    results = {"model": args.model, "train": train.describe(), "settings": vars(args), "runs": {}}
    for name in args.pruned:
        folder = pruned_model(args.model, name)
        model, _ = load(folder)
        before = ppl(model, tokenizer, text, args)
        row = {"params": parameter_counts(model), "ppl_before": before, "after": {}}
        print(f"{name}: ppl {before:.2f}", flush=True)
        for mode in args.modes:
            model, _ = load(folder)
            config = RecoverConfig(
                mode=mode,
                steps=args.steps,
                batch_size=args.batch_size,
                lr=args.lora_lr if mode == "lora" else args.full_lr,
                keep_sparsity=name.startswith("wanda"),
            )
            start = time.perf_counter()
            model, report = recover(model, train, config, teacher=dense if mode == "distill" else None, progress=False)
            seconds = time.perf_counter() - start
            row["after"][mode] = {
                "ppl": ppl(model, tokenizer, text, args),
                "train_tokens": args.steps * args.batch_size * args.seqlen,
                "train_tokens_per_second": args.steps * args.batch_size * args.seqlen / seconds,
                "loss_first": report.losses[0],
                "loss_last": report.losses[-1],
                "sparsity_kept": report.sparsity_kept,
            }
            print(f"  {mode:8s} {row['after'][mode]}", flush=True)
            results["runs"][name] = row
            save(args.json, results)


def pruned_model(model_name: str, name: str) -> Path:
    """The pruned model, made once (seed 0, C4 calibration) and reused by later invocations."""
    folder = CACHE / name.replace(" ", "-").replace("%", "")
    if not folder.exists():
        config, (nsamples, seqlen) = PRUNED[name]
        model, tokenizer = load(model_name)
        calib = calibration(tokenizer, "c4", n_samples=nsamples, seqlen=seqlen, seed=0)
        engine = EngineConfig(progress=False, batch_size=8 if not isinstance(config, DepthConfig) else nsamples)
        result = prune(model, config, calib, engine)
        CACHE.mkdir(parents=True, exist_ok=True)
        save_pruned(model, tokenizer, folder, {"method": result.method, "method_config": result.config})
    return folder


def ppl(model, tokenizer, text, args) -> float:
    return perplexity(model, tokenizer, text, seqlen=512, max_windows=args.max_windows or None, progress=False).ppl


if __name__ == "__main__":
    torch.manual_seed(0)
    main()

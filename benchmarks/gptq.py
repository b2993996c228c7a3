"""GPTQ on SmolLM2-135M: perplexity against round-to-nearest, pruning time against one forward pass, and
size on disk of pruned models at 16, 8 and 4 bits. One process, one model reload per row.

Calibration: C4 sample, 64 windows of 512 tokens, seed 0 (the unstructured benchmark's). Evaluation:
WikiText-2 raw test, seqlen 512, first ``--max-windows`` windows. Grids: symmetric, group 128 (W4A16's).
16 bits: the weights rounded to bfloat16 (perplexity evaluated in float32 on those values), saved as a
bfloat16 safetensors folder. 8 and 4 bits: saved as compressed-tensors; bytes are the weight files' sizes
(embeddings and the tied head stay in the model's float32).

    python benchmarks/gptq.py --part quant --json benchmarks/results/gptq-quant-64.json
    python benchmarks/gptq.py --part dense --group-size 64 --json benchmarks/results/gptq-dense-64.json
    (and --part wanda, --part sparsegpt likewise: one process each, so they can run side by side)
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch

from prunekit import load
from prunekit.data import calibration, eval_windows, load_text, tokenize
from prunekit.evaluate import perplexity
from prunekit.export.compressed import folder_bytes, save_compressed
from prunekit.methods import GPTQConfig, SparseGPTConfig, WandaConfig, prune
from prunekit.methods.quant import QuantGrid, clear_grids, rtn_model
from prunekit.sequential import EngineConfig

GRID = dict(group_size=128, sym=True)
PARTS = ("quant", "rtn", "gptq", "forward", "dense", "wanda", "sparsegpt")


@torch.no_grad()
def plain_forward_seconds(model, tokens, batch_size=8) -> float:
    start = time.perf_counter()
    for batch in tokens.split(batch_size):
        model(input_ids=batch, use_cache=False)
    return time.perf_counter() - start


def bf16_rounded(model):
    """A copy whose weights are rounded to bfloat16 and back (what a 16-bit save holds)."""
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return rounded


def bf16_bytes(model, tokenizer, folder: Path) -> int:
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(folder)
    return folder_bytes(folder)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-windows", type=int, default=64)
    parser.add_argument("--json", default="benchmarks/results/gptq-64.json")
    parser.add_argument("--md", default=None)
    parser.add_argument("--part", choices=PARTS, default="quant")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--bits", type=int, default=4, help="--part gptq")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    GRID["group_size"] = args.group_size
    work = Path(tempfile.mkdtemp(prefix="gptq-bench-"))

    model, tokenizer = load(args.model)
    calib = calibration(tokenizer, "c4", n_samples=64, seqlen=512, seed=0)
    text = load_text("wikitext2")
    engine = EngineConfig(progress=False)
    results = {
        "model": args.model,
        "calibration": calib.describe(),
        "eval": {"data": "wikitext2 test", "seqlen": 512, "windows": args.max_windows},
        "threads": torch.get_num_threads(),
        "grid": GRID,
        "runs": {},
    }

    def ppl(m):
        return perplexity(m, tokenizer, text, seqlen=512, max_windows=args.max_windows, progress=False).ppl

    def record(name, **row):
        results["runs"][name] = row
        print(name, json.dumps(row), flush=True)
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))

    def fresh():
        return load(args.model)[0]

    def quant_row(name, m, bits, prune_s=None, extra=None):
        folder = work / name.replace(" ", "_").replace("%", "").replace(":", "-")
        save_compressed(m, tokenizer, folder, QuantGrid(bits, **GRID))
        record(name, ppl=ppl(m), bytes=folder_bytes(folder), prune_seconds=prune_s, **(extra or {}))
        return folder

    if args.part == "rtn":  # round-to-nearest 4-bit alone (its own process on a busy machine)
        m = fresh()
        rtn_model(m, QuantGrid(4, **GRID))
        record(f"dense RTN 4-bit g{GRID['group_size']}", ppl=ppl(m))
    elif args.part == "gptq":  # one GPTQ row, timed (run beside --part forward for the time ratio)
        m = fresh()
        start = time.perf_counter()
        prune(m, GPTQConfig(bits=args.bits, **GRID), calib, engine)
        prune_s = time.perf_counter() - start
        record(f"dense GPTQ {args.bits}-bit g{GRID['group_size']}", ppl=ppl(m), prune_seconds=prune_s)
    elif args.part == "forward":  # plain forward passes over the calibration set, timed
        record("plain forward", seconds=[plain_forward_seconds(model, calib.tokens) for _ in range(2)])
    elif args.part == "quant":
        quant_rows(args, results, model, tokenizer, calib, text, engine, ppl, record, fresh, quant_row, work)
    elif args.part == "dense":
        dense_rows(args, results, model, tokenizer, calib, text, engine, ppl, record, fresh, quant_row, work)
    else:
        table_rows(args.part, calib, engine, ppl, record, fresh, quant_row, tokenizer, work)
    shutil.rmtree(work, ignore_errors=True)
    if args.md:
        Path(args.md).write_text(markdown(results))


def quant_rows(args, results, model, tokenizer, calib, text, engine, ppl, record, fresh, quant_row, work):
    """Round-to-nearest 4-bit and GPTQ 4- and 8-bit at ``--group-size`` (perplexity only: SmolLM2's 576-wide
    layers are 4.5 groups of 128, which compressed-tensors cannot store); GPTQ 4-bit's time against one
    plain forward pass over the calibration set, timed right before and right after it."""
    m = fresh()
    rtn_model(m, QuantGrid(4, **GRID))
    record(f"dense RTN 4-bit g{GRID['group_size']}", ppl=ppl(m))
    for bits in (4, 8):
        m = fresh()
        before = plain_forward_seconds(m, calib.tokens) if bits == 4 else None
        start = time.perf_counter()
        prune(m, GPTQConfig(bits=bits, **GRID), calib, engine)
        prune_s = time.perf_counter() - start
        extra = {}
        if bits == 4:
            after = plain_forward_seconds(fresh(), calib.tokens)
            extra = {"forward_seconds_before": before, "forward_seconds_after": after}
            extra["prune_over_forward"] = prune_s / ((before + after) / 2)
        record(f"dense GPTQ {bits}-bit g{GRID['group_size']}", ppl=ppl(m), prune_seconds=prune_s, **extra)


def dense_rows(args, results, model, tokenizer, calib, text, engine, ppl, record, fresh, quant_row, work):
    """The dense model at 16 bits and GPTQ 8 and 4 bits, saved (compressed-tensors) and reloaded by transformers."""
    for bits in (4, 8):  # 4 first: the transformers check matters most on a busy machine
        m = fresh()
        start = time.perf_counter()
        prune(m, GPTQConfig(bits=bits, **GRID), calib, engine)
        folder = quant_row(f"dense GPTQ {bits}-bit g{GRID['group_size']}", m, bits, time.perf_counter() - start)
        if bits == 4:
            results["transformers_load"] = transformers_check(m, folder, text, tokenizer)
            Path(args.json).write_text(json.dumps(results, indent=2, default=str))
            record("dense 16-bit", ppl=ppl(bf16_rounded(model)), bytes=bf16_bytes(model, tokenizer, work / "dense16"))


def table_rows(part, calib, engine, ppl, record, fresh, quant_row, tokenizer, work):
    """Wanda 50% then GPTQ (zeros kept); SparseGPT 2:4 jointly quantized in its own sweep; 16, 8, 4 bits."""
    g = GRID["group_size"]
    if part == "sparsegpt":
        return sparsegpt_rows(calib, engine, ppl, record, fresh, quant_row, tokenizer, work)
    wanda = fresh()
    start = time.perf_counter()
    prune(wanda, WandaConfig(0.5), calib, engine)
    wanda_s = time.perf_counter() - start
    zeros = sum((p == 0).sum().item() for n, p in wanda.named_parameters() if "layers" in n and p.dim() == 2)
    row = {"prune_seconds": wanda_s, "zeros_in_blocks": zeros}
    record("wanda 50% 16-bit", ppl=ppl(bf16_rounded(wanda)), bytes=bf16_bytes(wanda, tokenizer, work / "w16"), **row)
    for bits in (8, 4):
        m = copy.deepcopy(wanda)
        clear_grids(m)
        start = time.perf_counter()
        prune(m, GPTQConfig(bits=bits, **GRID), calib, engine)
        prune_s = time.perf_counter() - start
        zeros = sum((p == 0).sum().item() for n, p in m.named_parameters() if "layers" in n and p.dim() == 2)
        quant_row(f"wanda 50% + GPTQ {bits}-bit g{g}", m, bits, prune_s, {"zeros_in_blocks": zeros})


def sparsegpt_rows(calib, engine, ppl, record, fresh, quant_row, tokenizer, work):
    g = GRID["group_size"]
    for bits in (None, 8, 4):
        m = fresh()
        start = time.perf_counter()
        prune(m, SparseGPTConfig(nm="2:4", bits=bits, **GRID), calib, engine)
        prune_s = time.perf_counter() - start
        if bits is None:
            b16 = bf16_bytes(m, tokenizer, work / "s16")
            record("sparsegpt 2:4 16-bit", ppl=ppl(bf16_rounded(m)), bytes=b16, prune_seconds=prune_s)
        else:
            quant_row(f"sparsegpt 2:4 joint {bits}-bit g{g}", m, bits, prune_s)


@torch.no_grad()
def transformers_check(model, folder, text, tokenizer) -> dict:
    """Load the saved folder with plain transformers on CPU; compare its logits with prunekit's model."""
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(folder)
    ids = eval_windows(tokenize(tokenizer, text), 512, 2)
    a, b = model(input_ids=ids).logits, loaded(input_ids=ids).logits
    return {"windows": 2, "logits_equal": bool(torch.equal(a, b)), "max_abs_diff": (a - b).abs().max().item()}


def markdown(results: dict) -> str:
    runs = results["runs"]
    lines = [
        "## GPTQ on SmolLM2-135M",
        "",
        "Command: `python benchmarks/gptq.py --md benchmarks/results/gptq.md`"
        " (JSON: `benchmarks/results/gptq-64.json`).",
        f"Calibration: C4 sample, 64 × 512 tokens, seed 0. Perplexity: WikiText-2 test, seqlen 512, first "
        f"{results['eval']['windows']} windows. Grid: symmetric, group 128. {results['threads']} torch threads; "
        "the 2-core machine was shared with other work while this ran.",
        "",
        "| model | perplexity | bytes on disk (weight files) | pruning time |",
        "|---|---|---|---|",
    ]
    for name, row in runs.items():
        size = f"{row['bytes'] / 2**20:.1f} MiB" if row.get("bytes") else "—"
        t = f"{row['prune_seconds']:.0f} s" if row.get("prune_seconds") else "—"
        lines.append(f"| {name} | {row['ppl']:.2f} | {size} | {t} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

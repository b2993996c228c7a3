"""Reference width pruning: Torch-Pruning's LLM example on SmolLM2-135M, 20% of non-embedding parameters, no recovery.

    .venv/bin/pip install torch-pruning   # benchmark-only dependency, not in pyproject
    .venv/bin/python benchmarks/torch_pruning_reference.py --both-sides \
        --json benchmarks/results/torch-pruning-reference.json
    # full WikiText-2 test split (about 15 minutes per model on 2 cores): add --max-windows 0

What is reproduced, and from where: ``examples/LLMs/prune_llm.py`` of VainF/Torch-Pruning (the version that
calls ``tp.pruner.BasePruner``; see also ``examples/LLMs/readme.md``), run through the public API of the
installed ``torch-pruning`` package (1.6.x). The settings of that script:

* importance ``tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")`` (weights only, no
  calibration data);
* ``BasePruner(model, example_inputs=tokenizer.encode("Hello world."), global_pruning=False,
  output_transform=lambda x: x.logits, pruning_ratio=r, ignored_layers=[model.lm_head], num_heads={q_proj:
  num_attention_heads, k_proj/v_proj: num_key_value_heads}, prune_num_heads=True, prune_head_dims=False,
  head_pruning_ratio=r, out_channel_groups={}, round_to=4)``, then ``for g in pruner.step(interactive=True):
  g.prune()``. One ratio ``r`` drives the hidden size (the residual stream, embeddings and norms included),
  the MLP intermediate size of every layer, and the query heads;
* after pruning, the script's attribute update: ``config.hidden_size = lm_head.in_features``; per attention
  ``hidden_size = q_proj.out_features``, ``num_heads = hidden_size // head_dim``, ``config.num_attention_heads
  = num_heads``, ``num_key_value_groups = num_heads // config.num_key_value_heads`` (GQA: key/value heads are
  kept); per MLP ``hidden_size = gate_proj.in_features``, ``config.intermediate_size =
  gate_proj.out_features``.

For GQA, Torch-Pruning's local head pruning removes ``ceil(ceil(r * num_heads) / num_kv_heads)`` query heads
in every key/value group (lowest mean importance within the group) and leaves k_proj / v_proj whole. On
SmolLM2-135M (9 query heads, 3 key/value heads) any 0 < r <= 1/3 therefore removes one query head per
group (9 -> 6), and the hidden / MLP ratio is what the search below adjusts to reach the target.

The ratio: the script bisects ``r`` (each trial prunes a deep copy, about 30 s) on the fraction of
non-embedding parameters removed (``prunekit.models.parameter_counts``), down to the two neighbouring
shapes around the target (hidden and intermediate sizes at most one ``round_to`` step apart), and keeps the
side closest to the target (``--both-sides`` also evaluates the other one). Every evaluated model is checked
to be an exact slice of the dense one (``check_structure``) and to give the same logits with and without
the KV cache.

Deviations, each needed to run the example under transformers 5.x, none changing the pruning rule:

1. Tracing only: ``config.use_cache = False`` and ``transformers.integrations.sdpa_attention.use_gqa_in_sdpa``
   patched to return False. Transformers 5 concatenates every new key/value onto an empty cache tensor and
   passes grouped keys to SDPA (``enable_gqa``) instead of ``repeat_kv``. Unpatched, Torch-Pruning's group
   search does not finish: ``BasePruner.__init__`` spent >18 CPU-minutes in ``Group.has_pruning_op`` on the
   full model, and the k_proj group alone >10 CPU-minutes on a one-layer truncation (both stopped by hand;
   the two changes were applied together, not tested one by one). Patched, the traced graph is the one
   transformers 4.48 (the version in the example's logs) produced: no cache concat, keys/values expanded by
   ``repeat_kv``; ``BasePruner`` is then built in ~7 s.
   Evaluation afterwards uses the model's normal attention (SDPA, KV cache on).
2. Tied embeddings: ``embed_tokens`` and ``lm_head`` share one weight in SmolLM2; Torch-Pruning slices each
   module's parameter separately, which leaves two equal copies. The script checks they are equal and
   re-ties them (the saved model, ``tie_word_embeddings=True``, would re-tie on load anyway).
3. Attribute update: transformers 5 attention modules read only ``head_dim`` (unchanged) and
   ``num_key_value_groups``; the ``hidden_size`` / ``num_heads`` attributes the example also sets are set
   here too but are unused.

Variants (``--modes``): ``example`` (the script as is), ``keep-heads`` (the example's
``head_pruning_ratio=0``: hidden size and MLP only) and ``mlp-only`` (q/k/v/o/down_proj also in
``ignored_layers``: intermediate size only). Torch-Pruning documents no GQA-specific variant; its readme
only notes that HF-loadable GQA checkpoints need a ratio that is a multiple of kv_heads / q_heads (1/3 here).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from importlib.metadata import version
from pathlib import Path
from unittest import mock

import torch
import torch_pruning as tp
from transformers.integrations import sdpa_attention

from prunekit import load
from prunekit.data import load_text
from prunekit.evaluate import perplexity
from prunekit.models import parameter_counts

MODES = ("example", "keep-heads", "mlp-only")
ROUND_TO = 4
EXAMPLE_TEXT = "Hello world."  # the example's tracing input


def build_pruner(model, example_inputs, ratio: float, mode: str):
    """The example's BasePruner call; ``mode`` only changes the head ratio / ignored layers."""
    num_heads = {}
    ignored = [model.lm_head]
    for name, module in model.named_modules():
        if name.endswith("self_attn"):
            num_heads[module.q_proj] = model.config.num_attention_heads
            num_heads[module.k_proj] = model.config.num_key_value_heads
            num_heads[module.v_proj] = model.config.num_key_value_heads
            if mode == "mlp-only":
                ignored += [module.q_proj, module.k_proj, module.v_proj, module.o_proj]
        if name.endswith("mlp") and mode == "mlp-only":
            ignored.append(module.down_proj)
    use_cache = model.config.use_cache
    model.config.use_cache = False
    try:
        with mock.patch.object(sdpa_attention, "use_gqa_in_sdpa", lambda *args, **kwargs: False):
            pruner = tp.pruner.BasePruner(
                model,
                example_inputs=example_inputs,
                importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
                global_pruning=False,
                output_transform=lambda x: x.logits,
                pruning_ratio=ratio,
                ignored_layers=ignored,
                num_heads=num_heads,
                prune_num_heads=True,
                prune_head_dims=False,
                head_pruning_ratio=0.0 if mode == "keep-heads" else ratio,
                out_channel_groups={},
                round_to=ROUND_TO,
            )
    finally:
        model.config.use_cache = use_cache
    return pruner


def update_attributes(model) -> None:
    """The example's post-pruning update of ``model.config`` and module attributes (GQA branch)."""
    config = model.config
    gqa = config.num_attention_heads != config.num_key_value_heads
    config.hidden_size = model.lm_head.in_features
    for name, module in model.named_modules():
        if name.endswith("self_attn"):
            module.hidden_size = module.q_proj.out_features
            module.num_heads = module.hidden_size // module.head_dim
            config.num_attention_heads = module.num_heads
            if not gqa:
                module.num_key_value_heads = module.num_heads
                config.num_key_value_heads = module.num_heads
            module.num_key_value_groups = module.num_heads // config.num_key_value_heads
        elif name.endswith("mlp"):
            module.hidden_size = module.gate_proj.in_features
            config.intermediate_size = module.gate_proj.out_features


def retie(model) -> bool:
    """Re-share the embedding and head weights if they were tied and are still equal."""
    embed, head = model.model.embed_tokens, model.lm_head
    if not model.config.tie_word_embeddings or head.weight is embed.weight:
        return False
    if not torch.equal(head.weight, embed.weight):
        raise RuntimeError("tied embedding and lm_head were pruned differently")
    head.weight = embed.weight
    return True


def prune_copy(dense, example_inputs, ratio: float, mode: str) -> tuple[torch.nn.Module, dict]:
    model = copy.deepcopy(dense)
    start = time.perf_counter()
    pruner = build_pruner(model, example_inputs, ratio, mode)
    for group in pruner.step(interactive=True):
        group.prune()
    del pruner
    update_attributes(model)
    retied = retie(model)
    info = {"ratio": ratio, "seconds": round(time.perf_counter() - start, 1), "retied_embeddings": retied}
    info.update(describe(model, parameter_counts(dense)))
    return model, info


def describe(model, dense_counts: dict) -> dict:
    counts = parameter_counts(model)
    layers = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        layers.append(
            (
                layer.input_layernorm.weight.numel(),
                attn.q_proj.out_features // attn.head_dim,
                attn.k_proj.out_features // attn.head_dim,
                mlp.gate_proj.out_features,
            )
        )
    distinct = sorted(set(layers))
    return {
        "params": counts,
        "removed_non_embedding": 1 - counts["non_embedding"] / dense_counts["non_embedding"],
        "shapes": [
            {"hidden": h, "q_heads": q, "kv_heads": kv, "intermediate": m, "layers": layers.count((h, q, kv, m))}
            for h, q, kv, m in distinct
        ],
    }


def shape_key(info: dict) -> tuple:
    return tuple(tuple(sorted(s.items())) for s in info["shapes"])


def find_ratio(dense, example_inputs, mode: str, target: float, log) -> tuple[list, list]:
    """Bisect the ratio on the fraction removed; return the trials and the bracketing (model, info) pairs."""
    trials = []
    lo, hi = (0.0, None), None
    hi_ratio = 0.5 if mode != "mlp-only" else 0.6
    model, info = prune_copy(dense, example_inputs, hi_ratio, mode)
    trials.append(info)
    log(f"  {mode} r={hi_ratio:.5f} removed {info['removed_non_embedding']:.4%} ({info['seconds']}s)")
    if info["removed_non_embedding"] < target:
        raise RuntimeError(f"{mode}: ratio {hi_ratio} removes only {info['removed_non_embedding']:.2%}")
    hi = (hi_ratio, (model, info))
    while hi[0] - lo[0] > 2e-4:
        if lo[1] is not None and _one_step_apart(lo[1][1], hi[1][1]):
            break
        mid = round((lo[0] + hi[0]) / 2, 6)
        model, info = prune_copy(dense, example_inputs, mid, mode)
        trials.append(info)
        log(f"  {mode} r={mid:.5f} removed {info['removed_non_embedding']:.4%} ({info['seconds']}s)")
        if info["removed_non_embedding"] < target:
            lo = (mid, (model, info))
        else:
            hi = (mid, (model, info))
    sides = [side[1] for side in (lo, hi) if side[1] is not None]
    sides.sort(key=lambda pair: abs(pair[1]["removed_non_embedding"] - target))
    return trials, sides


def _one_step_apart(a: dict, b: dict) -> bool:
    """Neighbouring shapes: same heads, hidden and intermediate sizes each at most one rounding step apart."""
    if len(a["shapes"]) != 1 or len(b["shapes"]) != 1:
        return False
    sa, sb = a["shapes"][0], b["shapes"][0]
    if (sa["q_heads"], sa["kv_heads"]) != (sb["q_heads"], sb["kv_heads"]):
        return False
    diffs = [abs(sa[k] - sb[k]) for k in ("hidden", "intermediate")]
    return max(diffs) <= ROUND_TO and sum(diffs) > 0


def _rows_in(small: torch.Tensor, big: torch.Tensor) -> torch.Tensor:
    """Indices of ``small``'s rows inside ``big``, checked exactly."""
    probe = torch.randn(big.shape[1], 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    idx = torch.cdist(small.double() @ probe, big.double() @ probe).argmin(1)
    if not torch.equal(small, big[idx]):
        raise RuntimeError("pruned rows are not rows of the dense weight")
    return idx


@torch.no_grad()
def check_structure(dense, model) -> list[list[int]]:
    """Check the pruned model is an exact slice of the dense one (one hidden index set for the whole residual
    stream, whole query heads with matching o_proj columns, matching gate/up/down channels); return the query
    heads kept per layer."""
    hidden = _rows_in(model.model.embed_tokens.weight.T, dense.model.embed_tokens.weight.T)
    same = [
        torch.equal(model.model.norm.weight, dense.model.norm.weight[hidden]),
        torch.equal(model.lm_head.weight, dense.lm_head.weight[:, hidden]),
    ]
    kept_heads = []
    for small, big in zip(model.model.layers, dense.model.layers, strict=True):
        sa, ba, head_dim = small.self_attn, big.self_attn, big.self_attn.head_dim
        q = _rows_in(sa.q_proj.weight, ba.q_proj.weight[:, hidden])
        heads = sorted({int(i) // head_dim for i in q})
        kv = _rows_in(sa.k_proj.weight, ba.k_proj.weight[:, hidden])
        ch = _rows_in(small.mlp.gate_proj.weight, big.mlp.gate_proj.weight[:, hidden])
        same += [
            len(q) == head_dim * len(heads),
            torch.equal(sa.v_proj.weight, ba.v_proj.weight[kv][:, hidden]),
            torch.equal(sa.o_proj.weight, ba.o_proj.weight[hidden][:, q]),
            torch.equal(small.input_layernorm.weight, big.input_layernorm.weight[hidden]),
            torch.equal(small.post_attention_layernorm.weight, big.post_attention_layernorm.weight[hidden]),
            torch.equal(small.mlp.up_proj.weight, big.mlp.up_proj.weight[ch][:, hidden]),
            torch.equal(small.mlp.down_proj.weight, big.mlp.down_proj.weight[hidden][:, ch]),
        ]
        kept_heads.append(heads)
    if not all(same):
        raise RuntimeError("the pruned model is not a consistent slice of the dense model")
    return kept_heads


@torch.no_grad()
def sanity(model, tokenizer) -> dict:
    """Forward with and without the KV cache must agree; greedy ``generate`` must run."""
    ids = torch.tensor([tokenizer.encode("The capital of France is")])
    full = model(ids, use_cache=False).logits[0, -1]
    out = model(ids[:, :-1], use_cache=True)
    step = model(ids[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits[0, -1]
    gen = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return {
        "cache_max_abs_diff": float((full - step).abs().max()),
        "greedy": tokenizer.decode(gen[0, ids.shape[1] :]),
    }


def evaluate(model, tokenizer, text, max_windows) -> dict:
    result = perplexity(model, tokenizer, text, seqlen=512, max_windows=max_windows, progress=False)
    return {"ppl": result.ppl, "windows": result.windows, "tokens": result.tokens, "seconds": result.seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--target", type=float, default=0.2, help="fraction of non-embedding parameters removed")
    parser.add_argument("--max-windows", type=int, default=64, help="0: the full WikiText-2 test split")
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    parser.add_argument("--both-sides", action="store_true", help="also evaluate the other side of the target")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    max_windows = args.max_windows or None
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {msg}", flush=True)

    torch.manual_seed(0)
    dense, tokenizer = load(args.model)
    dense_counts = parameter_counts(dense)
    example_inputs = torch.tensor(tokenizer.encode(EXAMPLE_TEXT)).unsqueeze(0)
    text = load_text("wikitext2")
    results = {
        "model": args.model,
        "target": args.target,
        "torch_pruning": {"distribution": version("torch-pruning"), "__version__": tp.__version__},
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "reference": "VainF/Torch-Pruning examples/LLMs/prune_llm.py (BasePruner version)",
        "settings": {
            "importance": "GroupMagnitudeImportance(p=2, group_reduction='mean')",
            "pruner": "BasePruner",
            "global_pruning": False,
            "ignored_layers": ["lm_head"],
            "num_heads": "q_proj: num_attention_heads, k_proj/v_proj: num_key_value_heads",
            "prune_num_heads": True,
            "prune_head_dims": False,
            "head_pruning_ratio": "= pruning_ratio (example); 0 (keep-heads)",
            "round_to": ROUND_TO,
            "example_inputs": f"tokenizer.encode({EXAMPLE_TEXT!r}), shape {list(example_inputs.shape)}",
            "tracing": "config.use_cache=False, use_gqa_in_sdpa -> False (transformers 4.48 graph)",
        },
        "eval": {"dataset": "wikitext2", "seqlen": 512, "max_windows": max_windows},
        "dense": describe(dense, dense_counts),
        "modes": {},
    }
    log(f"dense params {dense_counts}")
    results["dense"]["sanity"] = sanity(dense, tokenizer)
    results["dense"]["ppl"] = evaluate(dense, tokenizer, text, max_windows)
    log(f"dense ppl {results['dense']['ppl']['ppl']:.3f}")

    for mode in args.modes:
        trials, sides = find_ratio(dense, example_inputs, mode, args.target, log)
        evaluated = []
        for model, info in sides[: 2 if args.both_sides else 1]:
            info = dict(info)
            info["q_heads_kept_per_layer"] = check_structure(dense, model)
            info["sanity"] = sanity(model, tokenizer)
            info["ppl"] = evaluate(model, tokenizer, text, max_windows)
            log(
                f"{mode} r={info['ratio']:.5f} removed {info['removed_non_embedding']:.4%} shapes {info['shapes']} "
                f"ppl {info['ppl']['ppl']:.3f} sanity {info['sanity']}"
            )
            evaluated.append(info)
        results["modes"][mode] = {
            "chosen": evaluated[0],
            "other_side": evaluated[1] if len(evaluated) > 1 else sides[1][1] if len(sides) > 1 else None,
            "trials": [
                {k: t[k] for k in ("ratio", "removed_non_embedding", "shapes", "params", "seconds")} for t in trials
            ],
        }
        del sides, trials
        write(results, args.json)  # after every mode, so a later failure keeps what is done
    results["seconds"] = round(time.perf_counter() - start, 1)
    write(results, args.json)
    log(f"done; wrote {args.json}")


def write(results: dict, json_path: str | None) -> None:
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

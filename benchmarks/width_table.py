"""Render width benchmark results (one or more JSON files from benchmarks/width.py) as a Markdown table.

Later files override earlier ones run by run (and the dense row key by key), so a re-measured run replaces its
old row and a run with the full split adds that column.

python benchmarks/width_table.py benchmarks/results/width-64.json [more.json ...]
"""

from __future__ import annotations

import json
import sys


def shape_text(blocks: list[list[int]]) -> str:
    shapes = {tuple(b) for b in blocks}
    if len(shapes) == 1:
        return "{}, {}, {}".format(*shapes.pop())
    mlp = [b[0] for b in blocks]
    heads = [b[1] for b in blocks]
    kv = [b[2] for b in blocks]
    return f"per block: MLP {span(mlp)}, q {span(heads)}, KV {span(kv)}"


def span(values: list[int]) -> str:
    return f"{min(values)}–{max(values)}" if min(values) != max(values) else f"{values[0]}"


def run_columns(name: str) -> tuple[str, str, str]:
    """(importance, heads, allocation) from a run name such as "taylor query-even global" or "recipe flap"."""
    if name.startswith("recipe "):
        return f"recipe `{name.split()[1]}`", "", ""
    importance, policy, allocation = name.split()
    return importance, "kept" if policy == "mlp-only" else policy, allocation


def ppl_text(value: float | None, best: float | None) -> str:
    if value is None:
        return ""
    text = f"{value:,.2f}" if value < 1000 else f"{value:,.0f}"
    return f"**{text}**" if value == best else text


def main(paths: list[str]) -> None:
    runs, dense = {}, None
    for path in paths:
        with open(path) as fh:
            results = json.load(fh)
        dense = {**(dense or {}), **results["dense"]} if "dense" in results else dense
        for name, row in results["runs"].items():
            runs[name] = {**runs.get(name, {}), **row}
    base = dense["params"]["non_embedding"] if dense else None
    best64 = min(row["ppl"] for row in runs.values())
    best_full = min((row["ppl_full"] for row in runs.values() if "ppl_full" in row), default=None)
    print(
        "| importance | heads (GQA policy) | allocation | shapes (MLP, q heads, KV heads) | non-embedding params "
        "| ppl, 64 windows | ppl, full split | prune s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    if dense:
        full = ppl_text(dense.get("ppl_full"), None)
        print(f"| dense | | | 1536, 9, 3 | {base:,} | {dense['ppl']:.2f} | {full} | |")
    for name, row in sorted(runs.items(), key=lambda kv: kv[1]["ppl"]):
        params = row["params"]["non_embedding"]
        removed = f" (−{1 - params / base:.1%})" if base else ""
        print(
            "| {} | {} | {} | {} | {:,}{} | {} | {} | {:.0f} |".format(
                *run_columns(name),
                shape_text(row["blocks"]),
                params,
                removed,
                ppl_text(row["ppl"], best64),
                ppl_text(row.get("ppl_full"), best_full),
                row["prune_seconds"],
            )
        )


if __name__ == "__main__":
    main(sys.argv[1:])

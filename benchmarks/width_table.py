"""Render width benchmark results (one or more JSON files from benchmarks/width.py) as a Markdown table.

python benchmarks/width_table.py benchmarks/results/width-64.json [more.json ...]
"""

from __future__ import annotations

import json
import sys


def shape_text(blocks: list[list[int]]) -> str:
    shapes = {tuple(b) for b in blocks}
    if len(shapes) == 1:
        return "uniform {}, {}, {}".format(*shapes.pop())
    mlp = [b[0] for b in blocks]
    heads = [b[1] for b in blocks]
    return f"per block: MLP {min(mlp)}–{max(mlp)}, q heads {min(heads)}–{max(heads)}"


def main(paths: list[str]) -> None:
    runs, dense = {}, None
    for path in paths:
        with open(path) as fh:
            results = json.load(fh)
        dense = results.get("dense", dense)
        runs.update(results["runs"])
    base = dense["params"]["non_embedding"] if dense else None
    print("| run | shapes (MLP, q heads, KV heads) | non-embedding params | removed | perplexity | prune s |")
    print("|---|---|---|---|---|---|")
    if dense:
        print(f"| dense | 1536, 9, 3 | {base:,} | 0 | {dense['ppl']:.2f} | |")
    for name, row in sorted(runs.items(), key=lambda kv: kv[1]["ppl"]):
        params = row["params"]["non_embedding"]
        removed = f"{1 - params / base:.1%}" if base else ""
        print(
            f"| {name} | {shape_text(row['blocks'])} | {params:,} | {removed} | {row['ppl']:,.2f} | "
            f"{row['prune_seconds']:.0f} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])

"""One zero-shot task split across processes: each part scores every ``parts``-th item, ``--merge`` scores
the whole set from the parts' loglikelihoods. The figures equal one ``prunekit eval zeroshot`` run (items are
scored independently); only the wall time is divided. Used for HellaSwag's 10,042 items on a 2-core machine.

    python benchmarks/zeroshot_parts.py --task hellaswag --part 0 --parts 2 --out outputs/hs
    python benchmarks/zeroshot_parts.py --task hellaswag --part 1 --parts 2 --out outputs/hs
    python benchmarks/zeroshot_parts.py --task hellaswag --parts 2 --out outputs/hs --merge --json hellaswag.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from prunekit.evaluate.zeroshot import ZeroShotResult, load_task, loglikelihoods, score_docs


def part_path(out: Path, task: str, part: int, parts: int) -> Path:
    return out / f"{task}-{part}-of-{parts}.json"


def run_part(args) -> None:
    from prunekit.io.load import load

    docs = load_task(args.task, args.limit)[args.part :: args.parts]
    model, tokenizer = load(args.model)
    start = time.perf_counter()
    requests = [r for doc in docs for r in doc.requests]
    lls = loglikelihoods(model, tokenizer, requests, args.batch_size, desc=f"{args.task} part {args.part}")
    path = part_path(args.out, args.task, args.part, args.parts)
    path.write_text(json.dumps({"loglikelihoods": lls, "seconds": time.perf_counter() - start}))


def merge(args) -> None:
    """Score the task from every saved part. With some parts missing, the parts present are an interleaved
    sample of the set (items ``i`` with ``i % parts`` among them), and the result says so."""
    docs = load_task(args.task, args.limit)
    present = [p for p in range(args.parts) if part_path(args.out, args.task, p, args.parts).is_file()]
    if not present:
        raise SystemExit(f"no parts of {args.task} under {args.out}")
    scored_docs = [i for i in range(len(docs)) if i % args.parts in present]
    per_doc, seconds = {}, 0.0
    for part in present:
        saved = json.loads(part_path(args.out, args.task, part, args.parts).read_text())
        lls, start, seconds = saved["loglikelihoods"], 0, seconds + saved["seconds"]
        for index in range(part, len(docs), args.parts):  # the part's docs, in the order it scored them
            count = len(docs[index].requests)
            per_doc[index], start = [tuple(r) for r in lls[start : start + count]], start + count
        assert start == len(lls), f"part {part}: {len(lls)} loglikelihoods, {start} expected"
    results = [r for i in scored_docs for r in per_doc[i]]
    task = score_docs(args.task, [docs[i] for i in scored_docs], results)
    result = ZeroShotResult({args.task: task}, task.acc, args.limit, args.batch_size, seconds)
    sample = (
        ""
        if len(present) == args.parts
        else f" (parts {present} of {args.parts}: {len(scored_docs)} of {len(docs)} items)"
    )
    print(f"{args.task}: {result.summary()}, chance {task.chance}{sample}, {seconds:.0f} s")
    if args.json:
        extra = {"parts": args.parts, "parts_merged": present, "items_in_set": len(docs)}
        Path(args.json).write_text(json.dumps({**result.to_dict(), **extra}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", required=True)
    parser.add_argument("--limit", type=int, help="first N items of the task (default: all)")
    parser.add_argument("--part", type=int, default=0)
    parser.add_argument("--parts", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, required=True, help="folder for the parts' loglikelihoods")
    parser.add_argument("--merge", action="store_true", help="score the whole task from the saved parts")
    parser.add_argument("--json", help="with --merge: write the result as `prunekit eval zeroshot --json` does")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    merge(args) if args.merge else run_part(args)


if __name__ == "__main__":
    main()

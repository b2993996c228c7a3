"""One process against two (torchrun, gloo) for Wanda and SparseGPT calibration on SmolLM2-135M: wall time,
pruning time, peak resident memory of each process, and whether the saved weights are the same.

    python benchmarks/distributed_calibration.py --work /tmp/dist-bench --json benchmarks/results/distributed-calibration.json

Each configuration runs `prunekit prune` end to end (load, calibration, prune, save) through this script's
``--child`` mode, which records the peak RSS of its process when it exits. Configurations: one process with
one thread, one process with two threads, two processes with one thread each (torchrun's default). Run
order: every method's configurations back to back, so a changing load on a shared machine shows up as
spread between methods rather than inside a comparison (it still does: repeat and compare medians).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {"1 process, 1 thread": (1, 1), "1 process, 2 threads": (1, 2), "2 processes, 1 thread each": (2, 1)}
METHODS = {"wanda": ["--method", "wanda"], "sparsegpt": ["--method", "sparsegpt"]}


def child(folder: Path, argv: list[str]) -> None:
    """Run the prunekit command ``argv``; at exit, write this process's peak RSS to ``folder/rss-RANK.json``."""

    def record():
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        rank = os.environ.get("RANK", "0")
        (folder / f"rss-{rank}.json").write_text(json.dumps({"rank": int(rank), "peak_rss_mib": peak}))

    atexit.register(record)
    from prunekit.cli import main

    sys.argv = ["prunekit", *argv]
    main()


def run(work: Path, method: str, label: str, args) -> dict:
    processes, threads = CONFIGS[label]
    folder = work / f"{method}-{processes}p{threads}t"
    out = folder / "pruned"
    subprocess.run(["rm", "-rf", str(folder)], check=True)
    folder.mkdir(parents=True)
    prune = ["prune", "--model", args.model, "--calib", "c4", "--nsamples", str(args.nsamples),
             "--seqlen", str(args.seqlen), "--device", "cpu", "--out", str(out), *METHODS[method]]  # fmt: skip
    me = [str(Path(__file__).resolve()), "--child", str(folder), "--"]
    if processes == 1:
        command = [sys.executable, *me, *prune]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
                   *me, *prune]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode:
        raise SystemExit(f"{method} ({label}) failed:\n{result.stderr[-3000:]}")
    manifest = json.loads((out / "prunekit.json").read_text())
    rss = sorted((json.loads(f.read_text()) for f in folder.glob("rss-*.json")), key=lambda r: r["rank"])
    return {
        "method": method,
        "config": label,
        "wall_seconds": wall,
        "prune_seconds": manifest["metrics"]["prune_seconds"],
        "peak_rss_mib": [r["peak_rss_mib"] for r in rss],
        "out": str(out),
        "load_average_after": os.getloadavg(),
    }


def compare(a: str, b: str) -> dict:
    """Saved weights of two outputs: how many differ and by how much."""
    from safetensors.torch import load_file

    def tensors(folder):
        return {k: v for f in sorted(Path(folder).glob("*.safetensors")) for k, v in load_file(str(f)).items()}

    x, y = tensors(a), tensors(b)
    assert x.keys() == y.keys()
    differ = sum(int((x[k] != y[k]).sum()) for k in x)
    masks = sum(int(((x[k] == 0) != (y[k] == 0)).sum()) for k in x)
    return {
        "tensors": len(x),
        "elements": sum(v.numel() for v in x.values()),
        "elements_differing": differ,
        "zeros_differing": masks,
        "max_abs_difference": max(float((x[k] - y[k]).abs().max()) for k in x),
    }


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        return child(Path(sys.argv[2]), sys.argv[4:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/prunekit-dist-bench"))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows, comparisons = [], []
    for method in args.methods:
        done = {}
        for label in args.configs:
            row = run(args.work, method, label, args)
            rows.append(row)
            done[label] = row["out"]
            print(json.dumps(row), flush=True)
        first = next(iter(done))
        for label in list(done)[1:]:
            comparisons.append({"method": method, "a": first, "b": label, **compare(done[first], done[label])})
            print(json.dumps(comparisons[-1]), flush=True)
        if args.json:
            args.json.write_text(json.dumps({"settings": vars(args), "runs": rows, "comparisons": comparisons},
                                            indent=2, default=str))  # fmt: skip


if __name__ == "__main__":
    main()

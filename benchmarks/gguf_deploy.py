"""SmolLM2-135M pruned 20% four ways, exported to GGUF (f32, Q8_0, Q4_0) and run in llama.cpp.

For each point (dense; width, uniform and global allocation; depth; sub-layer removal) and each
quantization: the file size, llama.cpp's WikiText-2 perplexity on exactly prunekit's windows (seqlen
512, first --max-windows), the PyTorch perplexity of the same model, and llama.cpp prefill (1 x 512)
and decode (--new-tokens greedy tokens) speed-ups over the dense GGUF of the same quantization, timed
interleaved in one process (ABBA order, a pause before each timed call, --rounds rounds after a
warm-up; median of per-round ratios [interquartile range], a flag where the spread exceeds 10%).

Pruning: activation-norm width (MLP neurons only, --round-to 32 so that every row splits into Q8_0 /
Q4_0 blocks of 32), calibrated on C4 (64 x 512, seed 0; --width-samples to change); depth (whole blocks) and
sub-layer removal (MLP sub-layers: at 20% ``--unit sublayer`` would take 24 of 30 attentions) by block
influence on C4 (10 x 128, seed 0). Pruned models are saved under --work and reused by later runs; every
measurement is written to --json as soon as it exists, and a later run skips what is there.

    python benchmarks/gguf_deploy.py --json benchmarks/results/gguf-deploy.json \
        --md benchmarks/results/gguf-deploy.md
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

from prunekit import load, save_pruned
from prunekit.data import calibration, load_text
from prunekit.evaluate import perplexity
from prunekit.evaluate.llamacpp import compare_gguf_speed, gguf_perplexity
from prunekit.export.gguf import export_gguf
from prunekit.methods import DepthConfig, WidthConfig, calibration_defaults, prune
from prunekit.models import parameter_counts
from prunekit.sequential import EngineConfig

MODEL = "smollm2-135m"
POINTS = {
    "dense": None,
    "width-uniform": WidthConfig(target_params=0.2, round_to=32),
    "width-global": WidthConfig(target_params=0.2, allocation="global", round_to=32),
    "depth": DepthConfig(criterion="block-influence", target_params=0.2),
    # --unit sublayer at 20% would remove 24 of 30 attention sub-layers (refused without --force): MLPs only
    "sublayer": DepthConfig(criterion="block-influence", target_params=0.2, unit="mlp"),
}
QUANTS = ("f32", "q8_0", "q4_0")


def without_extra_buffer_types() -> None:
    """Make every ``llama_cpp.Llama`` load with ``use_extra_bufts=False``: no runtime weight repacking and no
    AMX buffers. A ``GGML_NATIVE=ON`` build on this machine's CPU compiles AMX kernels whose tile instructions
    fault in its VM (Illegal instruction on the first Q8_0/Q4_0 matmul); this runs such a build safely."""
    import llama_cpp.llama_cpp as raw

    default = raw.llama_model_default_params

    def params():
        value = default()
        value.use_extra_bufts = False
        return value

    raw.llama_model_default_params = params


def model_folder(args, point: str) -> Path | str:
    return MODEL if point == "dense" else Path(args.work) / "models" / point


def make_model(args, point: str) -> None:
    """Prune and save ``point`` unless its folder exists."""
    folder = model_folder(args, point)
    if point == "dense" or (Path(folder) / "config.json").exists():
        return
    model, tokenizer = load(MODEL)
    config = POINTS[point]
    n, seqlen = calibration_defaults(config)
    if isinstance(config, WidthConfig) and args.width_samples:
        n = args.width_samples
    calib = calibration(tokenizer, "c4", n_samples=n, seqlen=seqlen, seed=0)
    start = time.perf_counter()
    batch = n if isinstance(config, DepthConfig) else 8
    result = prune(model, config, calib, EngineConfig(progress=False, batch_size=batch))
    logging.info("%s pruned in %.0f s", point, time.perf_counter() - start)
    manifest = {"method": result.method, "method_config": result.config, "source_model": {"name": MODEL}}
    save_pruned(model, tokenizer, folder, manifest)


def measure_model(args, point: str, results: dict, text) -> None:
    """PyTorch perplexity, GGUF exports and their llama.cpp perplexities of one point (what is missing)."""
    row = results["points"].setdefault(point, {})
    model, tokenizer = load(model_folder(args, point))
    row["non_embedding_params"] = parameter_counts(model)["non_embedding"]
    if "torch_ppl" not in row:
        row["torch_ppl"] = perplexity(model, tokenizer, text, seqlen=512, max_windows=args.max_windows).ppl
        save(args, results)
    for quant in args.quants:
        cell = row.setdefault(quant, {})
        path = gguf_path(args, point, quant)
        if not path.exists():
            report = export_gguf(model, tokenizer, path, quant, source=str(model_folder(args, point)))
            cell.update(arch=report.arch, notes=report.notes, tokenizer=report.tokenizer)
        cell["file_mib"] = path.stat().st_size / 2**20
        cell.setdefault("arch", gguf_arch(path))
        if "llamacpp_ppl" not in cell:
            result = gguf_perplexity(path, tokenizer, text, seqlen=512, max_windows=args.max_windows,
                                     threads=args.ppl_threads)  # fmt: skip
            cell["llamacpp_ppl"] = result.ppl
            cell["ppl_seconds"] = result.seconds
        save(args, results)


def gguf_arch(path: Path) -> str:
    import gguf

    return gguf.GGUFReader(path).fields["general.architecture"].contents()


def gguf_path(args, point: str, quant: str) -> Path:
    return Path(args.work) / "gguf" / f"{point}-{quant}.gguf"


def measure_speed(args, results: dict, quant: str) -> None:
    if quant in results["speed"]:
        return
    paths = {p: gguf_path(args, p, quant) for p in args.points}
    if args.control:  # an identical copy of the dense file: the method must read it as 1.00x
        copy = gguf_path(args, "dense-copy", quant)
        if not copy.exists():
            shutil.copyfile(paths["dense"], copy)
        paths = {"dense": paths["dense"], "dense-copy": copy, **paths}
    comparison = compare_gguf_speed(paths, new_tokens=args.new_tokens, rounds=args.rounds, threads=args.threads)
    results["speed"][quant] = comparison.to_dict()
    save(args, results)


def save(args, results: dict) -> None:
    Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")


def ratio(entry: dict) -> str:
    flag = "" if entry["readable"] else " ⚠"
    return f"{entry['median']:.2f}× [{entry['q1']:.2f}–{entry['q3']:.2f}]{flag}"


def markdown(results: dict) -> str:
    """The table: one row per point and quantization."""
    dense_params = results["points"]["dense"]["non_embedding_params"]
    lines = [
        "| point | quant | arch | file MiB | non-emb params | llama.cpp ppl | PyTorch ppl (f32) | prefill speed-up | "
        "decode speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for point, row in results["points"].items():
        for quant in QUANTS:
            cell = row.get(quant) or {}
            speed = results["speed"].get(quant, {})
            if "llamacpp_ppl" not in cell and point not in speed.get("models", {}):
                continue
            pre = speed.get("prefill_speedup", {}).get(point)
            dec = speed.get("decode_speedup", {}).get(point)
            params = row["non_embedding_params"]
            gguf_ppl = f"{cell['llamacpp_ppl']:.3f}" if cell.get("llamacpp_ppl") else "not measured"
            lines.append(
                f"| {point} | {quant} | {cell.get('arch', '')} | {cell.get('file_mib', 0):.1f} | "
                f"{params / 1e6:.1f}M ({params / dense_params:.0%}) | {gguf_ppl} | "
                f"{row['torch_ppl']:.3f} | {ratio(pre) if pre else '–'} | {ratio(dec) if dec else '–'} |"
            )
    for quant, speed in results["speed"].items():
        dense = speed["models"]["dense"]
        line = (
            f"\n{quant} dense GGUF: prefill {dense['prefill_ms']:.0f} ms, decode {dense['decode_tokens_per_s']:.1f} "
            f"tokens/s (medians of {speed['settings']['rounds']} rounds)"
        )
        if "dense-copy" in speed["prefill_speedup"]:
            control = speed["prefill_speedup"]["dense-copy"], speed["decode_speedup"]["dense-copy"]
            line += f"; an identical copy of it reads prefill {ratio(control[0])}, decode {ratio(control[1])}"
        lines.append(line + ".")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="outputs/gguf-deploy", help="pruned models and GGUF files")
    parser.add_argument("--json", default="benchmarks/results/gguf-deploy.json")
    parser.add_argument("--md", default=None, help="write the Markdown table here too")
    parser.add_argument("--points", nargs="+", default=list(POINTS), choices=list(POINTS))
    parser.add_argument("--quants", nargs="+", default=list(QUANTS), choices=list(QUANTS))
    parser.add_argument("--max-windows", type=int, default=64)
    parser.add_argument("--width-samples", type=int, default=None, help="width calibration samples (default 64)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads for the speed comparison")
    parser.add_argument("--ppl-threads", type=int, default=1, help="llama.cpp threads for perplexity (one: on a "
                        "machine shared with other jobs, two OpenMP threads wait on each other)")  # fmt: skip
    parser.add_argument("--control", action="store_true", help="also time an identical copy of the dense file")
    parser.add_argument("--no-extra-bufts", action="store_true", help="load without repacking / AMX buffers")
    parser.add_argument("--stage", choices=("prune", "ppl", "speed", "report", "all"), default="all")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.no_extra_bufts:
        without_extra_buffer_types()
    path = Path(args.json)
    results = json.loads(path.read_text()) if path.exists() else {"points": {}, "speed": {}}
    results["settings"] = {
        "model": MODEL, "data": "wikitext2 (hub rows), seqlen 512", "max_windows": args.max_windows,
        "calibration": f"c4, seed 0 (width {args.width_samples or 64} x 512, depth 10 x 128)", "rounds": args.rounds,
        "new_tokens": args.new_tokens, "prompt_tokens": 512, "threads": args.threads,
        "llama_cpp_extra_buffer_types": not args.no_extra_bufts,
    }  # fmt: skip
    Path(args.work, "gguf").mkdir(parents=True, exist_ok=True)
    Path(args.work, "models").mkdir(parents=True, exist_ok=True)
    if args.stage in ("prune", "all"):
        for point in args.points:
            make_model(args, point)
    if args.stage in ("ppl", "all"):
        text = load_text("wikitext2")
        for point in args.points:
            measure_model(args, point, results, text)
    if args.stage in ("speed", "all"):
        for quant in args.quants:
            measure_speed(args, results, quant)
    save(args, results)
    if args.md:
        Path(args.md).write_text(markdown(results))


if __name__ == "__main__":
    main()

"""GGUF files run in llama.cpp (through ``llama-cpp-python``, the optional extra ``deploy``).

- ``gguf_perplexity``: perplexity on exactly the token windows of prunekit's PyTorch ``perplexity``
  (same tokenizer, same ``eval_windows``, loss computed the same way from llama.cpp's logits of every
  position), so the two numbers compare directly. The KV cache is kept in f32 by default so that an
  f32 GGUF measures the weights and nothing else (llama.cpp's default cache is f16).
- ``compare_gguf_speed``: prefill (one prompt) and decode (greedy tokens, one at a time after it)
  of several GGUFs, timed in one process, interleaved, with ``prunekit.evaluate.speed``'s ratios
  (median of per-round ratios and their quartiles, flagged when the spread exceeds 10%).

A trap found on a 2-core machine: llama.cpp's worker threads keep spinning for a while after a call
and steal the cores from whatever runs next, so the model timed second in a round read slower
(a GGUF against an identical copy: 0.91x prefill). Each round therefore runs the models in the
opposite order of the previous one (ABBA: A B, B A, A B, ...), and every timed call starts after a
short pause that lets the spinning threads go to sleep.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from prunekit.data import Text, adds_bos, eval_windows, tokenize
from prunekit.errors import PrunekitError
from prunekit.evaluate.perplexity import PerplexityResult
from prunekit.evaluate.speed import MAX_SPREAD, Ratio, SpeedComparison, SpeedResult
from prunekit.io.load import resolve_folder

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'prunekit[deploy]' (builds llama-cpp-python from source, several minutes)"
GGML_TYPE_F32 = 0  # llama.cpp's ggml_type for an f32 KV cache
PAUSE_S = 0.5  # before every timed call: lets the previous call's spinning worker threads sleep


def require_llama_cpp():
    """The ``llama_cpp`` module, or a one-line error saying how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise PrunekitError(f"running GGUF files needs llama-cpp-python: {INSTALL_HINT}") from None
    return llama_cpp


def open_gguf(path: str | os.PathLike, n_ctx: int, *, threads: int | None = None, logits_all: bool = False,
              f32_cache: bool = True):  # fmt: skip
    """A ``llama_cpp.Llama`` on CPU for ``path``: the whole context in one batch, ``threads`` threads."""
    llama_cpp = require_llama_cpp()
    path = Path(path)
    if not path.is_file():
        raise PrunekitError(f"GGUF file {path} does not exist; export one with prunekit export --format gguf")
    threads = threads or os.cpu_count() or 1
    cache = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if f32_cache else {}
    try:
        return llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
            n_threads_batch=threads, logits_all=logits_all, n_gpu_layers=0, verbose=False, **cache,
        )  # fmt: skip
    except ValueError as err:  # llama-cpp-python's "Failed to load model from file"
        raise PrunekitError(f"llama.cpp cannot load {path} ({err}); re-export it with prunekit export") from None


def gguf_logits(llm, ids) -> np.ndarray:
    """llama.cpp's logits for every position of ``ids`` (a fresh context; ``llm`` opened with logits_all)."""
    ids = [int(i) for i in ids]
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def gguf_perplexity(
    path: str | os.PathLike,
    tokenizer,
    text: Text,
    seqlen: int = 512,
    max_windows: int | None = None,
    bos: str = "stream",
    threads: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """``prunekit eval ppl --engine llama.cpp FILE.gguf``: perplexity of a GGUF on prunekit's windows.

    Args:
        path: ``FILE.gguf`` (the positional model argument).
        tokenizer: a loaded tokenizer, or ``--tokenizer``: the alias or folder the GGUF was exported from
            (``load_tokenizer``); it must be the tokenizer of the PyTorch run to get the same windows.
        text: ``--data`` (``prunekit.data.load_text``).
        seqlen, max_windows, bos: ``--seqlen``, ``--max-windows``, ``--bos`` as in the PyTorch path.
        threads: ``--threads`` (default: all cores).
    """
    if bos not in ("stream", "window"):
        raise PrunekitError(f"--bos must be 'stream' or 'window', got {bos!r}")
    tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    bos_id = tokenizer.bos_token_id if bos == "window" and adds_bos(tokenizer) else None
    windows = eval_windows(tokenize(tokenizer, text), seqlen, max_windows, bos_id)
    llm = open_gguf(path, seqlen, threads=threads, logits_all=True)
    if llm.n_vocab() < int(windows.max()) + 1:
        raise PrunekitError(f"{path} has {llm.n_vocab()} tokens, fewer than the tokenizer's ids; wrong --tokenizer?")
    start = time.perf_counter()
    total = 0.0
    for window in tqdm(windows, desc=f"ppl {text.name} (llama.cpp)", unit="window", disable=not progress):
        logits = torch.from_numpy(gguf_logits(llm, window.tolist()))
        total += F.cross_entropy(logits[:-1], window[1:], reduction="sum").double().item()
    tokens = windows.shape[0] * (seqlen - 1)
    nll = total / tokens
    return PerplexityResult(
        dataset=text.name, dataset_sha256=text.sha256, seqlen=seqlen, windows=windows.shape[0], tokens=tokens,
        bos=bos, nll=nll, ppl=math.exp(nll), seconds=time.perf_counter() - start,
    )  # fmt: skip


def load_tokenizer(name_or_path: str | os.PathLike):
    """The tokenizer of a model prunekit loads (alias, folder or hub id), without loading its weights."""
    from transformers import AutoTokenizer

    folder = resolve_folder(str(name_or_path))
    return AutoTokenizer.from_pretrained(folder if folder is not None else str(name_or_path))


# -- speed -----------------------------------------------------------------------------------------


def _last_logits(llm) -> np.ndarray:
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))


def time_gguf(llm, ids: list[int], new_tokens: int, pause: float = PAUSE_S) -> tuple[float, float]:
    """Seconds of one prefill of ``ids`` (fresh context), and of ``new_tokens`` greedy steps after it.

    Each phase starts after ``pause`` seconds of sleep (the worker-thread trap, see the module docstring)."""
    llm.reset()
    time.sleep(pause)
    start = time.perf_counter()
    llm.eval(ids)
    prefill = time.perf_counter() - start
    token = int(_last_logits(llm).argmax())
    time.sleep(pause)
    decode = 0.0
    for _ in range(new_tokens):
        start = time.perf_counter()
        llm.eval([token])
        token = int(_last_logits(llm).argmax())
        decode += time.perf_counter() - start
    return prefill, max(decode, 1e-9)


def compare_gguf_speed(
    paths: dict[str, str | os.PathLike] | list[str | os.PathLike],
    prompt_tokens: int = 512,
    new_tokens: int = 128,
    rounds: int = 10,
    warmup: int = 1,
    threads: int | None = None,
    seed: int = 0,
    pause: float = PAUSE_S,
    max_spread: float = MAX_SPREAD,
) -> SpeedComparison:
    """``prunekit bench --engine llama.cpp BASELINE.gguf OTHER.gguf ...``: speed-ups over the first file.

    Args:
        paths: the GGUF files (positional ``FILE.gguf ...``; a list is named by file name, a dict name -> file);
            the first is the baseline (the dense GGUF of the same quantization).
        prompt_tokens: ``--prompt-tokens``, the prefill (1 x 512 by default).
        new_tokens: ``--new-tokens``, greedy decode steps after the prefill (128 by default).
        rounds: ``--repeats``, measured rounds after ``warmup`` discarded ones; ABBA order.
        threads: ``--threads`` (default: all cores), the same for every model. On a CPU oversubscribed by
            other jobs, llama.cpp's OpenMP threads wait on each other at every barrier and a 2-thread run
            crawls (measured: over 6 minutes for one round of four Q4_0 models); one thread stays readable.
        pause: seconds slept before each timed phase.
    """
    if not paths or len(set(map(str, paths))) < len(paths):
        raise PrunekitError("a speed comparison needs one or more different GGUF files")
    if min(prompt_tokens, new_tokens, rounds) < 1 or warmup < 0:
        raise PrunekitError(
            f"speed needs at least one prompt token, new token and repeat, got prompt {prompt_tokens}, "
            f"new tokens {new_tokens}, repeats {rounds}"
        )
    if not isinstance(paths, dict):
        named = {Path(p).name: p for p in paths}
        paths = named if len(named) == len(paths) else {str(p): p for p in paths}
    threads = threads or os.cpu_count() or 1
    names = list(paths)
    llms = {n: open_gguf(p, prompt_tokens + new_tokens, threads=threads, f32_cache=False) for n, p in paths.items()}
    vocab = min(llm.n_vocab() for llm in llms.values())
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (prompt_tokens,), generator=generator).tolist()
    prefill = {n: [] for n in names}
    decode = {n: [] for n in names}
    for round_index in tqdm(range(warmup + rounds), desc="llama.cpp speed", unit="round"):
        order = names if round_index % 2 == 0 else names[::-1]  # ABBA: each model first as often as last
        for name in order:
            p, d = time_gguf(llms[name], ids, new_tokens, pause)
            if round_index >= warmup:
                prefill[name].append(p)
                decode[name].append(new_tokens / d)
    return _comparison(names, paths, prefill, decode, dict(
        batch_size=1, prompt_tokens=prompt_tokens, new_tokens=new_tokens, rounds=rounds, warmup=warmup,
        threads=threads, device="cpu", interleaved=True, order="ABBA", pause_s=pause, engine="llama.cpp",
        kv_cache="f16",
    ), max_spread)  # fmt: skip


def _comparison(names, paths, prefill, decode, settings, max_spread) -> SpeedComparison:
    rounds, threads = settings["rounds"], settings["threads"]
    results = {
        n: SpeedResult(
            batch_size=1,
            prompt_tokens=settings["prompt_tokens"],
            new_tokens=settings["new_tokens"],
            prefill_ms=1000 * statistics.median(prefill[n]),
            decode_tokens_per_s=statistics.median(decode[n]),
            repeats=rounds,
            threads=threads,
            peak_memory_mb=None,
        )
        for n in names
    }
    comparison = SpeedComparison(names[0], {**settings, "files": {n: str(p) for n, p in paths.items()}}, results)
    base = names[0]
    for n in names:
        faster = [b / x for b, x in zip(prefill[base], prefill[n], strict=True)]  # time ratio: base / this
        comparison.prefill_speedup[n] = Ratio.of(faster, max_spread)
        more = [x / b for b, x in zip(decode[base], decode[n], strict=True)]  # tokens/s ratio: this / base
        comparison.decode_speedup[n] = Ratio.of(more, max_spread)
    return comparison

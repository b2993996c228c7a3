"""Zero-shot accuracy on local copies of the standard sets, computed the way lm-evaluation-harness does it.

lm-eval's tasks download their data from the hub; here the same sets are read from local files
(``$PRUNEKIT_DATA`` or ``../shared/data``) and turned into exactly the (context, continuation)
requests lm-eval's task YAMLs build (0.4.x: ``doc_to_text``, ``doc_to_choice``, target delimiter
``" "``). They are scored as lm-eval's ``HFLM`` scores them: trailing whitespace of the context moves
to the continuation, context + continuation are encoded together and the continuation is the tail
beyond the context's encoding, inputs are cut from the left to the model's length, and the metrics
follow ``ConfigurableTask.process_results``. The one deliberate difference: the log-softmax is always
taken in float32 (lm-eval takes it in the model's dtype).

``lm_eval_model`` wraps a loaded model for users who have lm-eval and the hub, to run its own tasks.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from prunekit.data import data_dirs, find_local
from prunekit.errors import PrunekitError

DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback when neither config nor tokenizer gives a length
TOKENIZER_INFINITY = 1000000000000000019884624838656  # transformers' "no limit" model_max_length


@dataclass(frozen=True)
class Doc:
    """One item: the (context, continuation) requests lm-eval builds for it and what scores them."""

    requests: tuple[tuple[str, str], ...]
    choices: tuple[str, ...]  # lm-eval's doc_to_choice; acc_norm divides by their lengths
    gold: int  # index of the right request (always 0 for LAMBADA's single request)


@dataclass(frozen=True)
class Task:
    name: str
    files: tuple[str, ...]  # relative to a data dir
    build: Callable[[list[Path]], list[Doc]]
    metrics: tuple[str, ...]  # lm-eval's metric_list for the task


# --- the tasks: one builder per lm-eval task definition --------------------------------------------


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _choice_doc(context: str, choices: list[str], gold: int) -> Doc:
    # multiple_choice: one request per choice, continuation = target_delimiter + choice
    return Doc(tuple((context, " " + c) for c in choices), tuple(choices), gold)


def _piqa(paths: list[Path]) -> list[Doc]:
    # piqa.yaml: "Question: {{goal}}\nAnswer:", choices [sol1, sol2], target = label
    rows, labels = _jsonl(paths[0]), _lines(paths[1])
    if len(rows) != len(labels):
        raise PrunekitError(f"{paths[0]} has {len(rows)} items but {paths[1]} {len(labels)} labels")
    return [
        _choice_doc(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], int(g))
        for r, g in zip(rows, labels, strict=True)
    ]


def _arc(paths: list[Path]) -> list[Doc]:
    # arc_easy.yaml: "Question: {{question}}\nAnswer:", choices.text, gold = choices.label.index(answerKey)
    docs = []
    for row in _jsonl(paths[0]):
        question = row["question"]
        labels = [c["label"] for c in question["choices"]]
        texts = [c["text"] for c in question["choices"]]
        docs.append(_choice_doc(f"Question: {question['stem']}\nAnswer:", texts, labels.index(row["answerKey"])))
    return docs


def _openbookqa(paths: list[Path]) -> list[Doc]:
    # openbookqa.yaml: the bare question_stem, choices.text, gold = choices.label.index(answerKey.lstrip())
    docs = []
    for row in _jsonl(paths[0]):
        question = row["question"]
        labels = [c["label"] for c in question["choices"]]
        texts = [c["text"] for c in question["choices"]]
        docs.append(_choice_doc(question["stem"], texts, labels.index(row["answerKey"].lstrip())))
    return docs


def _boolq(paths: list[Path]) -> list[Doc]:
    # super_glue/boolq: "{{passage}}\nQuestion: {{question}}?\nAnswer:", choices ["no", "yes"]. SuperGLUE's
    # passage is the original release's "title -- passage", so the local Google-format file is joined that way.
    docs = []
    for row in _jsonl(paths[0]):
        passage = f"{row['title']} -- {row['passage']}"
        docs.append(_choice_doc(f"{passage}\nQuestion: {row['question']}?\nAnswer:", ["no", "yes"], int(row["answer"])))
    return docs


def _winogrande(paths: list[Path]) -> list[Doc]:
    # preprocess_winogrande.py, partial evaluation: the blank is filled with each option in the context,
    # and the scored continuation is the same text after the blank in both requests.
    docs = []
    for row in _jsonl(paths[0]):
        sentence = row["sentence"]
        blank = sentence.index("_")
        contexts = [sentence[:blank] + row["option1"], sentence[:blank] + row["option2"]]
        target = sentence[blank + 1 :].strip()
        gold = {"1": 0, "2": 1}[row["answer"]]
        docs.append(Doc(tuple((c, " " + target) for c in contexts), tuple(contexts), gold))
    return docs


def _hellaswag_preprocess(text: str) -> str:
    # hellaswag/utils.py preprocess, verbatim
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


# ActivityNet items end with ctx_b, a lower-case sentence start after ctx_a's last sentence.
_CTX_B = re.compile(r"(?<=[.!?])(\s+)([a-z][^.!?]*)$")


def _hellaswag(paths: list[Path]) -> list[Doc]:
    # The local file (klosax's text form) has "label: ctx" with ctx = ctx_a + " " + ctx_b as in the raw
    # data; lm-eval builds ctx_a + " " + ctx_b.capitalize(). ctx_a/ctx_b are not stored, so the trailing
    # lower-case fragment after the last sentence end is taken as ctx_b (right on the first ten
    # validation items checked against the original jsonl). WikiHow endings that began with a
    # "[tag]" keep a leading space in lm-eval that this file no longer has: HellaSwag is close, not exact.
    lines = _lines(paths[0])
    if len(lines) % 6:
        raise PrunekitError(f"{paths[0]} should have 6 lines per item; it has {len(lines)} lines")
    docs = []
    for i in range(0, len(lines), 6):
        query = _CTX_B.sub(lambda m: m.group(1) + m.group(2).capitalize(), lines[i])
        endings = [_hellaswag_preprocess(e) for e in lines[i + 2 : i + 6]]
        docs.append(_choice_doc(_hellaswag_preprocess(query), endings, int(lines[i + 1])))
    return docs


def _lambada(paths: list[Path]) -> list[Doc]:
    # lambada_openai.yaml: context = all but the last ' '-separated word, continuation = ' ' + last word
    docs = []
    for row in _jsonl(paths[0]):
        words = row["text"].split(" ")
        docs.append(Doc(((" ".join(words[:-1]), " " + words[-1]),), (), 0))
    return docs


ACC_NORM = ("acc", "acc_norm")
TASKS = {
    t.name: t
    for t in (
        Task("piqa", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), _piqa, ACC_NORM),
        Task("arc_easy", ("arc/ARC-Easy-Test.jsonl",), _arc, ACC_NORM),
        Task("arc_challenge", ("arc/ARC-Challenge-Test.jsonl",), _arc, ACC_NORM),
        Task("hellaswag", ("hellaswag/hellaswag_val_full.txt",), _hellaswag, ACC_NORM),
        Task("winogrande", ("winogrande/dev.jsonl",), _winogrande, ("acc",)),
        Task("boolq", ("boolq/dev.jsonl",), _boolq, ("acc",)),
        Task("openbookqa", ("openbookqa/test.jsonl",), _openbookqa, ACC_NORM),
        Task("lambada", ("lambada/lambada_test.jsonl",), _lambada, ("perplexity", "acc")),
    )
}


def check_tasks(names: list[str], limit: int | None = None) -> dict[str, list[Doc]]:
    """Every task's items, read before any work: the names first (an unknown one is a typo whatever the
    data), then ``limit``, then the files."""
    if not names:
        raise PrunekitError(f"no tasks given; choose from {', '.join(TASKS)}")
    for name in names:
        _check_name(name)
    return {name: load_task(name, limit) for name in dict.fromkeys(names)}


def _check_name(name: str) -> None:
    if name not in TASKS:
        raise PrunekitError(f"unknown zero-shot task {name!r}; available: {', '.join(TASKS)}")


def load_task(name: str, limit: int | None = None) -> list[Doc]:
    """The items of a task (the first ``limit`` of them), read from the local data dirs."""
    _check_name(name)
    if limit is not None and limit < 1:
        raise PrunekitError(f"--limit must be at least 1, got {limit}")
    task = TASKS[name]
    paths = [find_local(f) for f in task.files]
    if None in paths:
        missing = task.files[paths.index(None)]
        looked = ", ".join(str(d) for d in data_dirs())
        folder = missing.split("/")[0]
        raise PrunekitError(
            f"task {name} needs {missing}, not found under {looked}; put the set in ../shared/data/{folder} "
            "beside the project or set PRUNEKIT_DATA to the folder that holds it"
        )
    return task.build(paths)[:limit]


# --- metrics: lm-eval's process_results and aggregations, on given loglikelihoods -----------------


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # the first maximum, as numpy's argmax


def choose(lls: list[float], choices: list[str]) -> tuple[int, int]:
    """``(pred, pred_norm)``: argmax of the loglikelihoods, and of each divided by its choice's length in
    characters (lm-eval's ``acc_norm``; ``acc_bytes`` would divide by UTF-8 bytes)."""
    return _argmax(lls), _argmax([ll / len(c) for ll, c in zip(lls, choices, strict=True)])


def _stderr(values: list[float]) -> float | None:
    # lm-eval's mean_stderr: sample standard deviation (n - 1) over sqrt(n)
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


@dataclass
class TaskResult:
    task: str
    items: int
    acc: float
    acc_stderr: float | None
    acc_norm: float | None  # only where lm-eval reports it
    perplexity: float | None  # LAMBADA only: exp(-mean continuation loglikelihood)
    chance: float | None  # mean of 1/choices over the items; None for LAMBADA
    predictions: list[int] = field(repr=False)  # per item: chosen request (LAMBADA: 1 if greedy)

    def to_dict(self) -> dict:
        return asdict(self)


def score_docs(task: str, docs: list[Doc], results: list[tuple[float, bool]]) -> TaskResult:
    """A task's metrics from the ``(loglikelihood, is_greedy)`` of every request of ``docs``, in order."""
    metrics = TASKS[task].metrics
    if len(results) != sum(len(d.requests) for d in docs):
        raise ValueError(f"{len(results)} results for {sum(len(d.requests) for d in docs)} requests")
    per_doc, start = [], 0
    for doc in docs:
        per_doc.append(results[start : start + len(doc.requests)])
        start += len(doc.requests)
    if "perplexity" in metrics:  # a loglikelihood task: one request per doc
        lls = [r[0][0] for r in per_doc]
        hits = [float(r[0][1]) for r in per_doc]
        ppl = math.exp(-sum(lls) / len(lls))
        return TaskResult(
            task, len(docs), sum(hits) / len(hits), _stderr(hits), None, ppl, None, [int(h) for h in hits]
        )
    preds, hits, norm_hits = [], [], []
    for doc, res in zip(docs, per_doc, strict=True):
        pred, pred_norm = choose([ll for ll, _ in res], list(doc.choices))
        preds.append(pred)
        hits.append(float(pred == doc.gold))
        norm_hits.append(float(pred_norm == doc.gold))
    acc_norm = sum(norm_hits) / len(docs) if "acc_norm" in metrics else None
    chance = sum(1 / len(d.requests) for d in docs) / len(docs)
    return TaskResult(task, len(docs), sum(hits) / len(docs), _stderr(hits), acc_norm, None, chance, preds)


# --- loglikelihoods as lm-eval's HFLM computes them ------------------------------------------------


def _encode(tokenizer, text: str) -> list[int]:
    # HFLM.tok_encode: the tokenizer's default special tokens, unless the text already starts with the prefix
    prefix = _prefix_token_id(tokenizer)
    if prefix is not None and text.startswith(tokenizer.decode(prefix)):
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


def _prefix_token_id(tokenizer) -> int | None:
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode_request(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """``(context_ids, continuation_ids)`` as lm-eval's ``loglikelihood`` / ``_encode_pair`` make them."""
    if context == "":  # BOS (or EOS) stands in for an empty context
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = _prefix_token_id(tokenizer)
        return ([prefix], cont) if prefix != cont[0] else (cont[:1], cont[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:  # "Answer: " + "x" would split the space from the word; score " x" instead
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = _encode(tokenizer, context + continuation)
    context_ids = _encode(tokenizer, context)
    return context_ids, whole[len(context_ids) :]


def max_length(model, tokenizer) -> int:
    """lm-eval's ``resolve_max_length``: the config's context length, else the tokenizer's, else 2048."""
    config = getattr(model.config, "text_config", None) or model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(config, attr, None) is not None:
            return int(getattr(config, attr))
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit is not None and limit != TOKENIZER_INFINITY else DEFAULT_MAX_LENGTH


@torch.no_grad()
def loglikelihoods(
    model, tokenizer, requests: list[tuple[str, str]], batch_size: int = 8, progress: bool = True, desc: str = "ll"
) -> list[tuple[float, bool]]:
    """``(log p(continuation | context), continuation is greedy)`` per request: lm-eval's ``loglikelihood``."""
    if batch_size < 1:
        raise PrunekitError(f"--batch-size must be at least 1, got {batch_size}")
    limit = max_length(model, tokenizer)
    # Requests with the same model input (BoolQ's " no" / " yes": one token after the same context) share
    # one forward pass, as lm-eval's one-token-continuation cache does.
    inputs: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}  # input -> (request index, continuation)
    for i, (context, continuation) in enumerate(requests):
        ctx, cont = encode_request(tokenizer, context, continuation)
        if not cont or len(cont) > limit:
            raise PrunekitError(f"the continuation {continuation!r} encodes to {len(cont)} tokens; cannot score it")
        inp = tuple((ctx + cont)[-(limit + 1) :][:-1])  # cut from the left to the model's length
        inputs.setdefault(inp, []).append((i, cont))
    # Longest first (as lm-eval) so similar lengths share a batch and the right padding stays small.
    order = sorted(inputs, key=len, reverse=True)
    results: list = [None] * len(requests)
    device = next(model.parameters()).device
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress):
        for i, result in _score_batch(model, [(inp, inputs[inp]) for inp in batch], device):
            results[i] = result
    return results


def _score_batch(model, batch, device) -> list[tuple[int, tuple[float, bool]]]:
    """``(request index, (loglikelihood, is_greedy))`` for every request of the batch's inputs."""
    width = max(len(inp) for inp, _ in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)  # right padding: after every real position
    for j, (inp, _) in enumerate(batch):
        ids[j, : len(inp)] = torch.tensor(inp)
    logits = model(ids.to(device)).logits  # no attention mask, as HFLM: causal attention never sees the padding
    out = []
    for j, (inp, wanted) in enumerate(batch):
        for i, cont in wanted:
            # position t predicts token t + 1: the last len(cont) positions of the input predict the continuation
            logprobs = logits[j, len(inp) - len(cont) : len(inp)].float().log_softmax(-1)
            target = torch.tensor(cont, device=logprobs.device)
            greedy = bool((logprobs.argmax(-1) == target).all())
            out.append((i, (float(logprobs.gather(1, target[:, None]).sum()), greedy)))
    return out


# --- the whole evaluation --------------------------------------------------------------------------


@dataclass
class ZeroShotResult:
    tasks: dict[str, TaskResult]
    mean_acc: float  # unweighted mean of the tasks' acc
    limit: int | None
    batch_size: int
    seconds: float

    def to_dict(self) -> dict:
        return {**asdict(self), "tasks": {name: r.to_dict() for name, r in self.tasks.items()}}

    def summary(self) -> str:
        return ", ".join(f"{n} {r.acc:.4f}" for n, r in self.tasks.items()) + f"; mean acc {self.mean_acc:.4f}"

    def table(self) -> str:
        """One line per task: items, acc, acc_norm, chance (and perplexity where the task has one)."""

        def cell(value):
            return "-" if value is None else f"{value:.4f}"

        lines = [f"{'task':<14} {'items':>6} {'acc':>7} {'acc_norm':>8} {'chance':>7}"]
        for name, r in self.tasks.items():
            extra = f"  perplexity {r.perplexity:.3f}" if r.perplexity is not None else ""
            lines.append(f"{name:<14} {r.items:>6} {cell(r.acc):>7} {cell(r.acc_norm):>8} {cell(r.chance):>7}{extra}")
        lines.append(f"{'mean acc':<14} {'':>6} {cell(self.mean_acc):>7}")
        return "\n".join(lines)


def evaluate_zeroshot(
    model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 8, progress: bool = True
) -> ZeroShotResult:
    """Zero-shot metrics of ``model`` on ``tasks`` (names from ``TASKS``), each on its first ``limit`` items."""
    if batch_size < 1:
        raise PrunekitError(f"--batch-size must be at least 1, got {batch_size}")
    docs = check_tasks(list(tasks), limit)  # every name and file checked before any work
    start = time.perf_counter()
    results = {}
    for name, items in docs.items():
        requests = [r for doc in items for r in doc.requests]
        lls = loglikelihoods(model, tokenizer, requests, batch_size, progress, desc=f"zeroshot {name}")
        results[name] = score_docs(name, items, lls)
    mean_acc = sum(r.acc for r in results.values()) / len(results)
    return ZeroShotResult(results, mean_acc, limit, batch_size, time.perf_counter() - start)


def lm_eval_model(model, tokenizer, batch_size: int = 1):
    """An lm-eval ``HFLM`` around an in-memory model, for ``lm_eval.simple_evaluate(model=...)`` with lm-eval's
    own tasks (they download from the hub). HFLM sets a pad token on ``tokenizer`` if it has none."""
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise PrunekitError("lm-eval is not installed; install it with `pip install 'prunekit[eval]'`") from None
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal")

"""Training data for recovery: packed text windows, or Alpaca-style instructions with the loss on the response.

Both give a fixed list of examples (``input_ids``, ``labels`` with -100 where no loss is taken) and a
data order that depends only on the seed and the step, so an interrupted run resumes on the same
batches and two processes together see exactly the batches one process would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from prunekit.data import load_text, tokenize
from prunekit.errors import PrunekitError

IGNORE = -100

# The Stanford Alpaca prompt (the one LLM-Pruner tunes on).
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass
class TrainData:
    """``input_ids`` and ``labels`` ``[n, seqlen]``; ``pad_id`` fills what an example does not use."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    source: str
    sha256: str

    def __len__(self) -> int:
        return len(self.input_ids)

    def describe(self) -> dict:
        return {"source": self.source, "text_sha256": self.sha256, "examples": len(self), "seqlen": self.seqlen}

    @property
    def seqlen(self) -> int:
        return self.input_ids.shape[1]


def load_train_data(tokenizer, source: str, seqlen: int) -> TrainData:
    """An Alpaca-format ``.json`` file (a list of instruction/input/output records), else a text corpus
    (``prunekit.data.load_text``: c4, wikitext2, kjv, a ``.txt``/``.jsonl`` file) packed into windows."""
    if seqlen < 2:
        raise PrunekitError(f"--seqlen must be at least 2 to train on, got {seqlen}")
    if source.endswith(".json") and Path(source).is_file():
        return alpaca(tokenizer, Path(source), seqlen)
    return packed_text(tokenizer, source, seqlen)


def packed_text(tokenizer, source: str, seqlen: int) -> TrainData:
    """The corpus as one token stream cut into consecutive windows of ``seqlen`` (every token trains)."""
    text = load_text(source)
    tokens = tokenize(tokenizer, text)
    count = tokens.numel() // seqlen
    if count < 1:
        raise PrunekitError(f"{text.name} has {tokens.numel()} tokens, fewer than one --seqlen {seqlen} window")
    windows = tokens[: count * seqlen].view(count, seqlen)
    return TrainData(windows, windows.clone(), text.name, text.sha256)


def alpaca(tokenizer, path: Path, seqlen: int) -> TrainData:
    """Alpaca records, prompt + response + EOS, cut to ``seqlen``; only the response (and EOS) is learned."""
    import hashlib

    raw = path.read_bytes()
    try:
        records = json.loads(raw)
    except ValueError as err:
        raise PrunekitError(f"{path} is not valid JSON ({err}); expected a list of Alpaca records") from None
    if not isinstance(records, list) or not records:
        raise PrunekitError(f"{path} must hold a non-empty list of {{instruction, input, output}} records")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(records), seqlen), pad if pad is not None else 0, dtype=torch.long)
    labels = torch.full((len(records), seqlen), IGNORE, dtype=torch.long)
    for row, record in enumerate(records):
        prompt, response = _alpaca_parts(record, row, path)
        prompt_ids = tokenizer(prompt)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            response_ids = [*response_ids, tokenizer.eos_token_id]
        example = (prompt_ids + response_ids)[:seqlen]
        ids[row, : len(example)] = torch.tensor(example)
        start = min(len(prompt_ids), seqlen)
        labels[row, start : len(example)] = ids[row, start : len(example)]
    if (labels != IGNORE).sum() == 0:
        raise PrunekitError(f"every response in {path} is cut off by --seqlen {seqlen}; raise --seqlen")
    return TrainData(ids, labels, path.name, hashlib.sha256(raw).hexdigest())


def _alpaca_parts(record, row: int, path: Path) -> tuple[str, str]:
    if not isinstance(record, dict) or not isinstance(record.get("instruction"), str) or "output" not in record:
        raise PrunekitError(f"{path} record {row} needs 'instruction' and 'output' strings (and optional 'input')")
    template = ALPACA_PROMPT if record.get("input") else ALPACA_PROMPT_NO_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input", "")), str(record["output"])


def batch_indices(size: int, step: int, global_batch: int, seed: int) -> torch.Tensor:
    """The examples of optimizer step ``step``: consecutive slices of one seeded permutation per epoch.

    A pure function of its arguments: a resumed run, or several processes each taking their share,
    see the same examples in the same order."""
    first = step * global_batch
    epochs = range(first // size, (first + global_batch - 1) // size + 1)
    order = torch.cat([torch.randperm(size, generator=torch.Generator().manual_seed(seed + e)) for e in epochs])
    offset = first - epochs[0] * size
    return order[offset : offset + global_batch]

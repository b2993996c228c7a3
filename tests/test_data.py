"""Text sources, evaluation windows and the seeded calibration sampler."""

import hashlib
import importlib.util
import json
import random

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

import prunekit.data
from conftest import SHARED_DATA
from prunekit.data import SOURCES, Text, adds_bos, calibration, eval_windows, load_text, tokenize
from prunekit.errors import PrunekitError

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "omicron",
    "pi",
    "rho",
    "sigma",
    "tau",
    "upsilon",
    "phi",
    "chi",
    "psi",
    "omega",
    "red",
    "green",
    "blue",
    "cyan",
    "magenta",
    "yellow",
    "black",
    "white",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
]
WIKITEXT_TEST = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"
WIKITEXT_TEST_SHA256 = "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"
# the text prunekit evaluates: the hub builder's rows ("" for a blank line) joined with "\n\n"
WIKITEXT_TEST_JOINED_SHA256 = "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83"


def corpus(n_words: int = 600, seed: int = 0) -> str:
    """Seeded random words, 12 per line: a stream in which most 8-token slices occur once."""
    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(n_words)]
    return "\n".join(" ".join(words[i : i + 12]) for i in range(0, n_words, 12)) + "\n"


def tiny_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer trained offline on WORDS; with ``bos`` it prepends [BOS] like Llama's."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["[UNK]", "[BOS]"]))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="[BOS]")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(corpus(), encoding="utf-8")
    return path


def occurs_at(stream: torch.Tensor, sample: torch.Tensor) -> list[int]:
    n = sample.numel()
    return [s for s in range(stream.numel() - n + 1) if torch.equal(stream[s : s + n], sample)]


# --- eval_windows ---------------------------------------------------------------------------------


def test_eval_windows_are_non_overlapping_and_drop_the_tail():
    got = eval_windows(torch.arange(10), seqlen=3)
    assert torch.equal(got, torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]]))
    assert got.dtype == torch.long


def test_eval_windows_exact_fit_keeps_every_token():
    assert torch.equal(eval_windows(torch.arange(8), seqlen=4), torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]]))


def test_eval_windows_max_windows_takes_the_first_windows():
    got = eval_windows(torch.arange(10), seqlen=3, max_windows=2)
    assert torch.equal(got, torch.tensor([[0, 1, 2], [3, 4, 5]]))
    # a limit above the number of windows changes nothing
    assert eval_windows(torch.arange(10), seqlen=3, max_windows=50).shape == (3, 3)


def test_eval_windows_bos_starts_each_window_with_bos_then_seqlen_minus_one_tokens():
    bos = 99
    got = eval_windows(torch.arange(10), seqlen=4, bos_id=bos)
    assert torch.equal(got, torch.tensor([[99, 0, 1, 2], [99, 3, 4, 5], [99, 6, 7, 8]]))


def test_eval_windows_bos_already_leading_the_stream_is_not_duplicated():
    bos = 99
    stream = torch.cat([torch.tensor([bos]), torch.arange(10)])
    got = eval_windows(stream, seqlen=4, bos_id=bos)
    assert torch.equal(got, torch.tensor([[99, 0, 1, 2], [99, 3, 4, 5], [99, 6, 7, 8]]))
    # a BOS later in the stream is ordinary data
    inner = torch.tensor([5, 99, 6, 7, 8, 9])
    got = eval_windows(inner, seqlen=3, bos_id=bos)
    assert torch.equal(got, torch.tensor([[99, 5, 99], [99, 6, 7], [99, 8, 9]]))


def test_eval_windows_bos_with_max_windows():
    got = eval_windows(torch.arange(10), seqlen=3, max_windows=1, bos_id=42)
    assert torch.equal(got, torch.tensor([[42, 0, 1]]))


def test_eval_windows_seqlen_larger_than_data_names_seqlen_and_token_count():
    with pytest.raises(PrunekitError) as err:
        eval_windows(torch.arange(7), seqlen=8)
    message = str(err.value)
    assert "--seqlen 8" in message and "7 tokens" in message and "\n" not in message


def test_eval_windows_bos_counts_the_stream_without_its_leading_bos():
    # 1 BOS + 2 tokens: windows of BOS + 3 stream tokens do not fit
    with pytest.raises(PrunekitError, match=r"--seqlen 4 .*\(2 tokens\)"):
        eval_windows(torch.tensor([9, 0, 1]), seqlen=4, bos_id=9)
    got = eval_windows(torch.tensor([9, 0, 1, 2]), seqlen=4, bos_id=9)
    assert torch.equal(got, torch.tensor([[9, 0, 1, 2]]))


@pytest.mark.parametrize("seqlen", [1, 0, -3])
def test_eval_windows_seqlen_below_two_is_an_error(seqlen):
    with pytest.raises(PrunekitError, match=f"--seqlen must be at least 2, got {seqlen}"):
        eval_windows(torch.arange(10), seqlen=seqlen)


@pytest.mark.parametrize("max_windows", [0, -1])
def test_eval_windows_max_windows_below_one_is_an_error(max_windows):
    with pytest.raises(PrunekitError, match=f"--max-windows must be at least 1, got {max_windows}"):
        eval_windows(torch.arange(10), seqlen=3, max_windows=max_windows)


# --- tokenize / adds_bos ----------------------------------------------------------------------------


def test_tokenize_adds_a_bos_once_at_the_start_of_the_stream():
    text = Text("t", "alpha beta\ngamma delta", "test")
    plain, with_bos = tiny_tokenizer(), tiny_tokenizer(bos=True)
    assert not adds_bos(plain) and adds_bos(with_bos)
    stream = tokenize(with_bos, text)
    assert stream.dtype == torch.long
    assert stream.tolist() == [with_bos.bos_token_id] + tokenize(plain, text).tolist()
    assert stream.tolist().count(with_bos.bos_token_id) == 1
    assert len(stream) == 5


# --- calibration ------------------------------------------------------------------------------------


def test_calibration_is_seeded_shaped_and_contiguous(corpus_file):
    tok = tiny_tokenizer()
    stream = tokenize(tok, load_text(str(corpus_file)))
    assert stream.numel() == 600 and (stream != tok.unk_token_id).all()
    first = calibration(tok, str(corpus_file), n_samples=6, seqlen=8, seed=1)
    again = calibration(tok, str(corpus_file), n_samples=6, seqlen=8, seed=1)
    other = calibration(tok, str(corpus_file), n_samples=6, seqlen=8, seed=2)
    assert first.tokens.shape == (6, 8) and first.tokens.dtype == torch.long
    assert torch.equal(first.tokens, again.tokens) and first.sha256 == again.sha256
    assert not torch.equal(first.tokens, other.tokens) and first.sha256 != other.sha256
    for sample in torch.cat([first.tokens, other.tokens]):
        assert occurs_at(stream, sample), f"sample {sample.tolist()} is not a slice of the stream"


def test_calibration_describe_has_the_hashes(corpus_file):
    cal = calibration(tiny_tokenizer(), str(corpus_file), n_samples=3, seqlen=5, seed=7)
    text_sha = hashlib.sha256(corpus_file.read_bytes()).hexdigest()
    tokens_sha = hashlib.sha256(cal.tokens.numpy().tobytes()).hexdigest()
    assert cal.describe() == {
        "source": "corpus.txt",
        "text_sha256": text_sha,
        "tokens_sha256": tokens_sha,
        "n_samples": 3,
        "seqlen": 5,
        "seed": 7,
    }


def test_calibration_seqlen_not_below_the_corpus_is_an_error(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text(" ".join(WORDS[:10]), encoding="utf-8")
    with pytest.raises(PrunekitError, match=r"--seqlen 12 is larger than short.txt \(10 tokens\)"):
        calibration(tiny_tokenizer(), str(path), n_samples=2, seqlen=12)


def test_calibration_needs_a_sample(corpus_file):
    with pytest.raises(PrunekitError, match="--nsamples must be at least 1, got 0"):
        calibration(tiny_tokenizer(), str(corpus_file), n_samples=0, seqlen=8)


# --- load_text ----------------------------------------------------------------------------------------


def test_load_text_reads_a_txt_path(corpus_file):
    text = load_text(str(corpus_file))
    assert text.text == corpus()
    assert text.name == "corpus.txt" and text.origin == str(corpus_file)
    assert text.sha256 == hashlib.sha256(corpus_file.read_bytes()).hexdigest()


def test_load_text_reads_a_jsonl_path_joining_documents(tmp_path):
    path = tmp_path / "docs.jsonl"
    docs = ["first doc\nwith two lines", "second", "third – ünïcode"]
    lines = [json.dumps({"text": d, "meta": i}) for i, d in enumerate(docs)]
    # a blank line between documents is skipped
    path.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n", encoding="utf-8")
    text = load_text(str(path))
    assert text.text == "\n\n".join(docs)
    assert text.name == "docs.jsonl"


@pytest.mark.parametrize("bad", ['{"text": "ok"', '["text"]', '{"body": "no text"}', '"just a string"'])
def test_load_text_malformed_jsonl_names_file_and_line(tmp_path, bad):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n' + bad + "\n", encoding="utf-8")
    with pytest.raises(PrunekitError) as err:
        load_text(str(path))
    assert f"{path}:3 " in str(err.value)


def test_load_text_unknown_name_lists_the_sources(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PrunekitError) as err:
        load_text("no-such-corpus")
    message = str(err.value)
    assert "'no-such-corpus'" in message
    for source in SOURCES:
        assert source in message


def test_load_text_pydoc_is_offline():
    import pydoc_data.topics

    text = load_text("pydoc")
    assert text.name == "pydoc"
    assert len(text.text) > 100_000
    assert next(iter(pydoc_data.topics.topics.values())) in text.text


@pytest.mark.skipif(not WIKITEXT_TEST.is_file(), reason="no shared WikiText-2 copy (../shared/data)")
def test_load_text_wikitext2_reads_the_shared_copy(monkeypatch):
    monkeypatch.delenv("PRUNEKIT_DATA", raising=False)
    raw = WIKITEXT_TEST.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == WIKITEXT_TEST_SHA256
    text = load_text("wikitext2")
    assert text.name == "wikitext2"
    assert text.origin == str(WIKITEXT_TEST)
    body = raw.decode("utf-8")
    assert "\r" not in body and body.endswith("\n")
    lines = [line + "\n" for line in body.split("\n")[:-1]]  # newline kept, split on "\n" only
    assert len(lines) == 4358
    rows = [line if line.strip() else "" for line in lines]  # the hub builder yields "" for a blank line
    assert rows.count("") > 1000
    assert text.text == "\n\n".join(rows)
    assert text.sha256 == WIKITEXT_TEST_JOINED_SHA256


def test_prunekit_data_folder_is_searched_first(tmp_path, monkeypatch):
    folder = tmp_path / "wikitext-2-raw"
    folder.mkdir()
    (folder / "wiki.valid.raw").write_text(" \n = Title = \n body line \n", encoding="utf-8")
    monkeypatch.setenv("PRUNEKIT_DATA", str(tmp_path))
    text = load_text("wikitext2-valid")
    assert text.origin == str(folder / "wiki.valid.raw")
    assert text.text == "\n\n = Title = \n\n\n body line \n"  # the blank first row is "", as on the hub


def test_missing_wikitext_without_datasets_is_one_line_naming_prunekit_data(tmp_path, monkeypatch):
    monkeypatch.setattr(prunekit.data, "data_dirs", lambda: [tmp_path])
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a, **k: None if name == "datasets" else real_find_spec(name, *a, **k)
    )
    with pytest.raises(PrunekitError) as err:
        load_text("wikitext2")
    message = str(err.value)
    assert "\n" not in message
    assert "PRUNEKIT_DATA" in message and "WikiText-2" in message
    assert "wikitext-2-raw/wiki.test.raw" in message and str(tmp_path) in message
    assert "datasets" in message


def test_missing_c4_names_prunekit_data(tmp_path, monkeypatch):
    monkeypatch.setattr(prunekit.data, "data_dirs", lambda: [tmp_path])
    with pytest.raises(PrunekitError, match="PRUNEKIT_DATA") as err:
        load_text("c4")
    assert "c4/c4_en_train_first1000.jsonl" in str(err.value)


needs_datasets = pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="needs datasets")


@needs_datasets
def test_load_text_hf_spec_streams_the_first_rows_of_a_datasets_builder(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": f"document {i}"}) + "\n" for i in range(5)))
    text = load_text(f"hf:json?data_files={path}&column=body&rows=3")
    assert text.text == "document 0\n\ndocument 1\n\ndocument 2"
    assert text.name.startswith("hf:json?")


@needs_datasets
def test_load_text_hf_spec_with_a_missing_column_names_the_column(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(PrunekitError, match="no column 'text'"):
        load_text(f"hf:json?data_files={path}")


@pytest.mark.parametrize(
    "spec, message",
    [("hf:", "bad dataset spec"), ("hf:json?colum=text", "unknown: colum"), ("hf:json?rows=0", "rows must be")],
)
def test_load_text_hf_spec_errors_say_what_would_work(spec, message):
    with pytest.raises(PrunekitError, match=message):
        load_text(spec)


@needs_datasets
def test_load_text_hf_spec_for_a_dataset_that_cannot_be_read_is_one_error(tmp_path):
    with pytest.raises(PrunekitError, match="could not read"):
        load_text(f"hf:json?data_files={tmp_path / 'absent.jsonl'}")

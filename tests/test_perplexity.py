"""Perplexity: hand-computed values on fake models, batch invariance and the recorded metadata."""

import hashlib
import math
from types import SimpleNamespace

import pytest
import torch

from prunekit.data import Text
from prunekit.errors import PrunekitError
from prunekit.evaluate.perplexity import perplexity
from tiny_models import VOCAB, tiny_model

ENGLISH = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of "
    "Light, it was the season of Darkness, it was the spring of hope, it was the winter of despair, we "
    "had everything before us, we had nothing before us, we were all going direct to Heaven, we were "
    "all going direct the other way."
)


class FakeTokenizer:
    """Characters to ids through ``encode``; with ``bos_token_id`` it prepends BOS like Llama's tokenizer."""

    def __init__(self, encode=lambda c: ord(c) % VOCAB, bos_token_id=None):
        self.encode = encode
        self.bos_token_id = bos_token_id

    def __call__(self, text, return_attention_mask=False):
        ids = [self.encode(c) for c in text]
        return {"input_ids": ([self.bos_token_id] if self.bos_token_id is not None else []) + ids}


class FakeModel(torch.nn.Module):
    """Logits from ``logits_fn(input_ids)``; records every batch it is given."""

    def __init__(self, logits_fn):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # perplexity() reads the device from a parameter
        self.logits_fn = logits_fn
        self.batches = []

    def forward(self, input_ids, use_cache=None):
        assert use_cache is False
        self.batches.append(input_ids.clone())
        return SimpleNamespace(logits=self.logits_fn(input_ids))


def uniform_model(vocab):
    # a different constant at every position and window: still uniform over the vocabulary
    return FakeModel(lambda ids: (ids.float() * 0.37 - 2.0).unsqueeze(-1).expand(*ids.shape, vocab).clone())


def successor_model(vocab=4, p_next=0.5):
    """P(next = (x + 1) % vocab) = p_next; every other token shares the rest."""
    other = (1 - p_next) / (vocab - 1)

    def logits(ids):
        probs = torch.full((*ids.shape, vocab), other)
        probs.scatter_(-1, ((ids + 1) % vocab).unsqueeze(-1), p_next)
        return probs.log()

    return FakeModel(logits)


DIGITS = FakeTokenizer(encode=int)


def text(body, name="sample"):
    return Text(name, body, "test")


@pytest.mark.parametrize("vocab", [2, 7, 128])
def test_uniform_logits_give_perplexity_equal_to_the_vocabulary(vocab):
    tok = FakeTokenizer(encode=lambda c: ord(c) % vocab)
    result = perplexity(uniform_model(vocab), tok, text(ENGLISH), seqlen=16, batch_size=3, progress=False)
    assert abs(result.nll - math.log(vocab)) < 1e-6
    assert result.ppl == pytest.approx(vocab, rel=1e-6, abs=1e-6)


def test_known_next_token_probabilities_give_the_hand_computed_perplexity():
    # 14 digits, seqlen 4 -> windows 0120 | 1201 | 2012, tail "01" dropped. Inside each window two
    # transitions are successors (p = 1/2) and one is not (p = 1/6); pairs across windows never count.
    result = perplexity(successor_model(), DIGITS, text("01201201201201"), seqlen=4, batch_size=2, progress=False)
    expected_nll = (2 * math.log(2) + math.log(6)) / 3
    assert result.windows == 3 and result.tokens == 9
    assert abs(result.nll - expected_nll) < 1e-6
    assert result.ppl == pytest.approx(24 ** (1 / 3), rel=1e-6)


def test_only_predicted_tokens_count_and_all_successors_give_one_over_p():
    # the stream 0123 0123 ...: every in-window transition is a successor
    result = perplexity(successor_model(p_next=0.8), DIGITS, text("0123" * 6), seqlen=6, progress=False)
    assert result.windows == 4 and result.tokens == 20
    assert result.ppl == pytest.approx(1 / 0.8, rel=1e-6)


def test_batch_size_does_not_change_the_result_on_a_real_model():
    model = tiny_model("llama")
    tok = FakeTokenizer()
    windows = 7  # batches of 3 leave a ragged last batch of 1
    results = [
        perplexity(model, tok, text(ENGLISH), seqlen=16, max_windows=windows, batch_size=b, progress=False)
        for b in (1, 3)
    ]
    assert all(r.windows == windows and r.tokens == windows * 15 for r in results)
    assert results[0].nll == pytest.approx(results[1].nll, rel=1e-5)
    # and equals the model's own mean loss over the same windows
    ids = torch.tensor(tok(ENGLISH)["input_ids"][: windows * 16]).view(windows, 16)
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None], use_cache=False).loss.item() for w in ids]
    assert results[1].nll == pytest.approx(sum(losses) / windows, rel=1e-5)
    assert results[1].ppl == pytest.approx(math.exp(sum(losses) / windows), rel=1e-5)
    # a random model is far from certain about characters
    assert 10 < results[1].ppl < 10 * VOCAB


def test_result_records_dataset_hash_windows_tokens_and_bos_mode():
    model = uniform_model(VOCAB)
    corpus = text(ENGLISH, name="dickens")
    result = perplexity(model, FakeTokenizer(), corpus, seqlen=32, batch_size=2, progress=False)
    windows = len(ENGLISH) // 32
    assert result.dataset == "dickens"
    assert result.dataset_sha256 == hashlib.sha256(ENGLISH.encode("utf-8")).hexdigest()
    assert (result.seqlen, result.windows, result.tokens, result.bos) == (32, windows, windows * 31, "stream")
    assert result.to_dict()["windows"] == windows and result.to_dict()["dataset"] == "dickens"
    assert result.seconds >= 0
    assert sum(b.shape[0] for b in model.batches) == windows
    assert all(b.shape[1] == 32 for b in model.batches)
    assert f"{windows} windows" in result.summary()


def test_max_windows_limits_the_windows_evaluated():
    model = uniform_model(VOCAB)
    result = perplexity(model, FakeTokenizer(), text(ENGLISH), seqlen=16, max_windows=5, batch_size=2, progress=False)
    assert result.windows == 5 and result.tokens == 5 * 15
    assert [b.shape[0] for b in model.batches] == [2, 2, 1]
    fed = torch.cat(model.batches).flatten().tolist()
    assert fed == FakeTokenizer()(ENGLISH)["input_ids"][: 5 * 16]


def test_bos_window_starts_every_window_with_bos_and_stream_only_the_first():
    bos = 127
    tok = FakeTokenizer(bos_token_id=bos)
    stream_ids = [ord(c) % VOCAB for c in ENGLISH]

    model = uniform_model(VOCAB)
    result = perplexity(model, tok, text(ENGLISH), seqlen=16, batch_size=4, bos="window", progress=False)
    fed = torch.cat(model.batches)
    assert result.bos == "window" and result.windows == len(ENGLISH) // 15 == fed.shape[0]
    assert result.tokens == result.windows * 15
    assert (fed[:, 0] == bos).all()
    assert fed[:, 1:].flatten().tolist() == stream_ids[: result.windows * 15]

    model = uniform_model(VOCAB)
    result = perplexity(model, tok, text(ENGLISH), seqlen=16, batch_size=4, bos="stream", progress=False)
    fed = torch.cat(model.batches)
    assert result.bos == "stream" and result.windows == (len(ENGLISH) + 1) // 16
    assert fed.flatten().tolist() == ([bos] + stream_ids)[: result.windows * 16]


def test_bos_window_without_a_bos_tokenizer_cuts_the_plain_stream():
    model = uniform_model(VOCAB)
    result = perplexity(model, FakeTokenizer(), text(ENGLISH), seqlen=16, bos="window", progress=False)
    assert result.bos == "window" and result.windows == len(ENGLISH) // 16
    fed = torch.cat(model.batches).flatten().tolist()
    assert fed == FakeTokenizer()(ENGLISH)["input_ids"][: result.windows * 16]


@pytest.mark.parametrize("bos", ["none", "Window", ""])
def test_bad_bos_mode_is_an_error(bos):
    model = uniform_model(VOCAB)
    with pytest.raises(PrunekitError, match="--bos must be 'stream' or 'window'"):
        perplexity(model, FakeTokenizer(), text(ENGLISH), seqlen=16, bos=bos, progress=False)
    assert model.batches == []


@pytest.mark.parametrize("batch_size", [0, -2])
def test_batch_size_below_one_is_an_error(batch_size):
    model = uniform_model(VOCAB)
    with pytest.raises(PrunekitError, match=f"--batch-size must be at least 1, got {batch_size}"):
        perplexity(model, FakeTokenizer(), text(ENGLISH), seqlen=16, batch_size=batch_size, progress=False)
    assert model.batches == []


def test_seqlen_larger_than_the_text_is_an_error():
    with pytest.raises(PrunekitError, match=r"--seqlen 64 is larger than the data \(10 tokens\)"):
        perplexity(uniform_model(VOCAB), FakeTokenizer(), text("0123456789"), seqlen=64, progress=False)

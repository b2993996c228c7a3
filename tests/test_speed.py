"""Speed comparisons that a shared machine cannot fool: interleaved rounds, median ratios with their
spread, decode timed per token after one prefill, threads fixed and recorded."""

import copy
import subprocess
import sys
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prunekit.errors import PrunekitError
from prunekit.evaluate import Ratio, compare_speed
from prunekit.evaluate.speed import time_once


def test_ratio_is_the_median_with_its_quartiles_and_flags_a_wide_spread():
    ratio = Ratio.of([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (ratio.median, ratio.q1, ratio.q3, ratio.rounds) == (3.0, 2.0, 4.0, 5)
    assert not ratio.readable  # an interquartile range of 2 around 3 says nothing
    tight = Ratio.of([0.99, 1.0, 1.01, 1.02, 0.98])
    assert tight.median == 1.0 and tight.readable
    assert str(tight) == "1.00x [0.99-1.01]"
    assert "spread too wide" in str(ratio)


class _Recorder(torch.nn.Module):
    """Stands in for a causal LM and records the token counts of the calls it gets."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, cache=None, use_cache=True, logits_to_keep=1):
        self.calls.append((input_ids.shape[1], cache))
        cache = (cache or 0) + input_ids.shape[1]
        return type("Out", (), {"logits": torch.zeros(input_ids.shape[0], 1, 5), "cache": cache})()


def test_decode_is_timed_token_by_token_after_one_prefill():
    model = _Recorder()
    prefill, decode = time_once(model, torch.zeros(2, 7, dtype=torch.long), new_tokens=4)
    assert prefill > 0 and decode > 0
    assert [n for n, _ in model.calls] == [7, 1, 1, 1, 1]  # one prompt forward, then one token per step
    assert [cache for _, cache in model.calls] == [None, 7, 8, 9, 10]  # each step extends the same cache


def _small_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_comparison_records_threads_settings_and_one_for_the_baseline():
    model = _small_llama()
    result = compare_speed({"a": model, "b": copy.deepcopy(model)}, prompt_tokens=16, new_tokens=3, rounds=3,
                           threads=1)  # fmt: skip
    assert result.settings["threads"] == 1 and result.settings["interleaved"]
    assert result.models["b"].threads == 1 and result.models["a"].repeats == 3
    assert result.prefill_speedup["a"].median == 1.0 and result.decode_speedup["a"].median == 1.0
    assert torch.get_num_threads() >= 1
    with pytest.raises(PrunekitError, match="at least one"):
        compare_speed({"a": model}, rounds=0)


def test_identical_copy_reads_one_while_the_machine_gets_busy():
    """A background process loads every core for part of the run: interleaving must keep the ratio of a
    model to its own copy at 1.00 +- 0.05, or flag it as unreadable, never report a false speed-up."""
    model = _small_llama()
    twin = copy.deepcopy(model)
    burn = "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass\n"
    # start the load a moment after the timing begins, so the machine changes during the run
    loaders = [subprocess.Popen([sys.executable, "-c", f"import time; time.sleep(0.3)\n{burn}"]) for _ in range(2)]
    try:
        started = time.perf_counter()
        result = compare_speed({"model": model, "copy": twin}, prompt_tokens=64, new_tokens=8, rounds=15,
                               threads=1)  # fmt: skip
        assert time.perf_counter() - started > 0.5  # the load arrived during the measurement
    finally:
        for p in loaders:
            p.wait()
    for ratio in (result.prefill_speedup["copy"], result.decode_speedup["copy"]):
        assert abs(ratio.median - 1.0) <= 0.05 or not ratio.readable, ratio


def test_rounds_go_on_while_the_spread_is_too_wide_and_stop_at_the_limit(monkeypatch):
    """Scripted timings: the candidate's first rounds swing by +-50%, then settle at the baseline's time.
    With ``max_rounds`` the comparison keeps timing until the quartiles are readable; without, it flags."""
    import prunekit.evaluate.speed as speed

    swings = iter([0.5, 1.5, 0.5, 1.5] + [1.0] * 100)

    def scripted(model, ids, new_tokens):
        return (next(swings), 1.0) if model == "b" else (1.0, 1.0)

    monkeypatch.setattr(speed, "time_once", scripted)
    models = {"a": _Stub("a"), "b": _Stub("b")}
    adaptive = compare_speed(models, prompt_tokens=4, new_tokens=2, rounds=4, warmup=0, max_rounds=30)
    assert adaptive.prefill_speedup["b"].readable and adaptive.prefill_speedup["b"].median == 1.0
    assert 4 < adaptive.settings["rounds"] < 30 and adaptive.models["b"].repeats == adaptive.settings["rounds"]

    swings = iter([0.5, 1.5] * 100)
    capped = compare_speed(models, prompt_tokens=4, new_tokens=2, rounds=4, warmup=0, max_rounds=10)
    assert capped.settings["rounds"] == 10 and not capped.prefill_speedup["b"].readable


class _Stub(torch.nn.Module):
    """A named stand-in whose timings the test scripts (compares equal to its name)."""

    def __init__(self, name):
        super().__init__()
        self.name = name
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = type("Config", (), {"vocab_size": 8})()

    def __eq__(self, other):
        return other == self.name if isinstance(other, str) else other is self

    __hash__ = torch.nn.Module.__hash__

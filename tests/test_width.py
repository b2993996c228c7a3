"""Width pruning: allocation by hand, importance by hand, real shrinkage, loadable outputs, resume."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunekit.data import Calibration
from prunekit.errors import PrunekitError
from prunekit.methods import METHODS, WidthConfig, prune
from prunekit.methods.width import Shape, allocate, block_params, channel_scores, head_options, wanda_sp_scores
from prunekit.models import get_adapter, parameter_counts
from prunekit.sequential import EngineConfig
from tiny_models import FAMILIES, tiny_model, tokens


def test_allocation_for_smollm2_by_hand():
    # hidden 576, head_dim 64, 9 query / 3 KV heads, 1536 GLU neurons: 3,538,944 weights per block.
    dense = Shape(1536, 9, 3)
    assert block_params(dense, 576, 64, True) == 3_538_944
    shape = allocate(WidthConfig(0.2, gqa="kv-groups"), dense, 576, 64, True)
    # keeping all heads would cut the MLP by 27%; dropping one KV group cuts 33% / 16%: closer.
    assert shape == Shape(1296, 6, 2)
    removed = 1 - block_params(shape, 576, 64, True) / 3_538_944
    assert 0.2 <= removed < 0.2 + 8 * 3 * 576 / 3_538_944  # within one rounding step of 8 neurons
    assert allocate(WidthConfig(0.2, prune_heads=False), dense, 576, 64, True) == Shape(1120, 9, 3)


def test_head_options_per_policy():
    assert head_options(9, 3, "kv-groups") == [(9, 3), (6, 2), (3, 1)]
    assert head_options(9, 3, "query-even") == [(9, 3), (6, 3), (3, 3)]


def test_importance_by_hand():
    rows = [torch.tensor([[3.0, 4.0], [1.0, 0.0]])]  # channel 0: row [3, 4]; channel 1: row [1, 0]
    cols = [torch.tensor([[0.0, 2.0]])]  # channel 0: column [0]; channel 1: column [2]
    assert torch.allclose(channel_scores(rows, cols, "magnitude-l2"), torch.tensor([5.0, 5**0.5]))
    assert torch.allclose(channel_scores(rows, cols, "magnitude-l1"), torch.tensor([7.0, 3.0]))
    w = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    assert torch.allclose(wanda_sp_scores(w, torch.tensor([2.0, 10.0])), torch.tensor([8.0, 25.0]))


def calib():
    return Calibration(tokens(n=4, seqlen=16), "random", "-", 0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("importance", ["magnitude-l2", "wanda-sp", "activation", "random"])
def test_width_shrinks_every_family_and_reloads(family, importance, tmp_path):
    model = tiny_model(family)
    before = parameter_counts(model)
    heads = family not in ("opt", "gpt2")  # their configs derive head_dim from the head count
    config = WidthConfig(0.25, importance=importance, prune_heads=heads, round_to=8)
    prune(model, config, calib(), EngineConfig(progress=False))
    after = parameter_counts(model)
    cut = 1 - after["non_embedding"] / before["non_embedding"]
    assert 0.2 < cut < 0.35, cut
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = tokens(n=1, seqlen=8)
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-5)
        assert torch.equal(
            reloaded.generate(ids, max_new_tokens=4, do_sample=False),
            model.generate(ids, max_new_tokens=4, do_sample=False),
        )


def test_explicit_sizes_and_query_even_policy():
    model = tiny_model("llama")  # 4 query heads, 2 KV heads, 128 neurons
    prune(model, WidthConfig(intermediate_size=64, num_heads=2, gqa="query-even", importance="magnitude-l1"))
    assert (model.config.intermediate_size, model.config.num_attention_heads, model.config.num_key_value_heads) == (
        64,
        2,
        2,
    )
    with pytest.raises(PrunekitError, match="multiple of 2"):
        prune(tiny_model("llama"), WidthConfig(num_heads=3, gqa="query-even", importance="random"))


def test_bad_width_configs():
    with pytest.raises(PrunekitError, match="--importance"):
        WidthConfig(importance="taylorish")
    with pytest.raises(PrunekitError, match="--target-params"):
        WidthConfig(1.2)
    with pytest.raises(PrunekitError, match="calibration"):
        prune(tiny_model("llama"), WidthConfig(0.2, importance="wanda-sp"))


def test_width_resumes_from_a_checkpoint(tmp_path):
    reference = tiny_model("qwen3")
    config = WidthConfig(0.25, importance="wanda-sp")
    prune(reference, config, calib(), EngineConfig(progress=False))

    original = METHODS[WidthConfig]

    def crash_on_block_1(cfg, step):
        if step.index == 1:
            raise KeyboardInterrupt
        return original.block(cfg, step)

    import dataclasses

    engine = EngineConfig(progress=False, checkpoint_dir=tmp_path / "ckpt")
    METHODS[WidthConfig] = dataclasses.replace(original, block=crash_on_block_1)
    try:
        with pytest.raises(KeyboardInterrupt):
            prune(tiny_model("qwen3"), config, calib(), engine)
    finally:
        METHODS[WidthConfig] = original
    resumed = tiny_model("qwen3")
    result = prune(resumed, config, calib(), engine)
    assert result.engine.resumed_from == 1
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert get_adapter(resumed).block(0).attention.num_heads == get_adapter(reference).block(0).attention.num_heads


def test_speed_measurement_runs_and_reports_sane_numbers():
    from prunekit.evaluate import measure_speed

    result = measure_speed(tiny_model("llama"), prompt_tokens=16, new_tokens=4, repeats=2)
    assert result.prefill_ms > 0 and result.decode_tokens_per_s > 0 and result.repeats == 2
    with pytest.raises(PrunekitError):
        measure_speed(tiny_model("llama"), new_tokens=0)


def test_lazy_width_pruning_matches_eager(tmp_path):
    from prunekit import load, save_pruned
    from tiny_models import save_tiny

    save_tiny(tmp_path / "src", "llama")
    config = WidthConfig(0.25, importance="activation")
    eager, tokenizer = load(tmp_path / "src")
    prune(eager, config, calib(), EngineConfig(progress=False))
    lazy, _ = load(tmp_path / "src", lazy=True)
    prune(lazy, config, calib(), EngineConfig(progress=False, checkpoint_dir=tmp_path / "ckpt"))
    save_pruned(lazy, tokenizer, tmp_path / "out", {})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.config.intermediate_size == eager.config.intermediate_size
    for (name, a), b in zip(eager.state_dict().items(), reloaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

"""Width pruning: allocation by hand, importance by hand, real shrinkage, loadable outputs, resume."""

import contextlib
import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunekit.data import Calibration
from prunekit.errors import PrunekitError
from prunekit.methods import METHODS, WidthConfig, prune
from prunekit.methods.allocation import Geometry, Shape, global_shapes, head_options, uniform_shape
from prunekit.methods.gradients import accumulate_gradients, block_linears
from prunekit.methods.importance import aggregate, fluctuation, magnitude, standardize, taylor, wanda_sp
from prunekit.methods.width import _compensate, parse_layers
from prunekit.models import get_adapter, parameter_counts
from prunekit.sequential import EngineConfig
from tiny_models import FAMILIES, tiny_model, tokens

SMOLLM2 = Geometry(hidden=576, head_dim=64, gated=True)


def test_allocation_for_smollm2_by_hand():
    # hidden 576, head_dim 64, 9 query / 3 KV heads, 1536 GLU neurons: 3,538,944 weights per block.
    dense = Shape(1536, 9, 3)
    assert SMOLLM2.params(dense) == 3_538_944
    shape = uniform_shape(0.2, dense, SMOLLM2, "kv-groups", 8, heads=True)
    # keeping all heads would cut the MLP by 27%; dropping one KV group cuts 33% / 16%: closer.
    assert shape == Shape(1296, 6, 2)
    removed = 1 - SMOLLM2.params(shape) / 3_538_944
    assert 0.2 <= removed < 0.2 + 8 * 3 * 576 / 3_538_944  # within one rounding step of 8 neurons
    assert uniform_shape(0.2, dense, SMOLLM2, "kv-groups", 8, heads=False) == Shape(1120, 9, 3)


def test_head_options_per_policy():
    assert head_options(9, 3, "kv-groups") == [(9, 3), (6, 2), (3, 1)]
    assert head_options(9, 3, "query-even") == [(9, 3), (6, 3), (3, 3)]


def test_importance_by_hand():
    w = torch.tensor([[3.0, 4.0], [1.0, 0.0]])  # rows: channel 0 = [3, 4], channel 1 = [1, 0]
    assert torch.equal(magnitude(w, "rows", p=2), torch.tensor([25.0, 1.0]))
    assert torch.equal(magnitude(w, "cols", p=1), torch.tensor([4.0, 4.0]))
    w = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    assert torch.allclose(wanda_sp(w, torch.tensor([2.0, 10.0])), torch.tensor([8.0, 25.0]))
    # FLAP: Var(X_j) * sum_i W_ij^2 -> column 0: 4 * (1 + 9), column 1: 0.5 * (4 + 0.25)
    assert torch.allclose(fluctuation(w, torch.tensor([4.0, 0.5])), torch.tensor([40.0, 2.125]))


def test_taylor_variants_by_hand():
    w = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    g = torch.tensor([[0.5, 0.5], [-1.0, 2.0]])
    f = torch.tensor([[2.0, 1.0], [0.0, 4.0]])
    # W*g = [[0.5, -1], [-3, 1]]; W*F*W = [[2, 4], [0, 1]]
    assert torch.allclose(taylor(w, g, None, "element", "rows"), torch.tensor([1.5, 4.0]))
    assert torch.allclose(taylor(w, g, None, "vector", "rows"), torch.tensor([0.5, 2.0]))
    assert torch.allclose(taylor(w, g, None, "vector", "cols"), torch.tensor([2.5, 0.0]))
    assert torch.allclose(taylor(w, g, f, "second", "rows"), torch.tensor([6.0, 1.0]))
    # mix: |W*g - W*F*W / 2| = [[0.5, 3], [3, 0.5]]
    assert torch.allclose(taylor(w, g, f, "mix", "cols"), torch.tensor([3.5, 3.5]))
    with pytest.raises(ValueError, match="Fisher"):
        taylor(w, g, None, "second", "rows")


def test_aggregation_and_standardisation_by_hand():
    a, b = torch.tensor([1.0, 4.0]), torch.tensor([3.0, 2.0])
    expected = {"sum": [4, 6], "mean": [2, 3], "max": [3, 4], "prod": [3, 8], "last": [3, 2]}
    for how, values in expected.items():
        assert torch.equal(aggregate([a, b], how), torch.tensor(values, dtype=torch.float32)), how
    z = standardize(torch.tensor([1.0, 2.0, 3.0]))
    assert torch.allclose(z, torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64))


def test_gradients_are_the_mean_loss_gradient_and_fisher_the_mean_square():
    model = tiny_model("llama")
    ids = tokens(n=3, seqlen=8)
    grads = accumulate_gradients(model, ids, fisher=True, progress=False)
    linear = block_linears(model)[0]
    per_sample = []
    for x in ids.split(1):
        model.zero_grad()
        model(input_ids=x, labels=x).loss.backward()
        per_sample.append(linear.weight.grad.clone())
    model.zero_grad()
    stacked = torch.stack(per_sample)
    assert torch.allclose(grads.grad[linear], stacked.mean(0), atol=1e-6)
    assert torch.allclose(grads.fisher[linear], (stacked**2).mean(0), atol=1e-8)
    first = accumulate_gradients(model, ids, fisher=False, progress=False)
    assert torch.allclose(first.grad[linear], stacked.mean(0), atol=1e-6)
    assert all(p.grad is None for p in model.parameters())  # nothing left behind


def test_global_allocation_takes_the_weakest_units_across_blocks():
    geometry = Geometry(hidden=4, head_dim=2, gated=True)  # a neuron costs 12 weights, a query head 16
    dense = {0: Shape(8, 4, 2), 1: Shape(8, 4, 2)}
    heads = torch.ones(4, 2)  # all heads alike: standardised to 0
    spread = torch.arange(8.0)  # standardised: -1.43, -1.02, -0.61, -0.20, ...
    outlier = torch.tensor([-100.0, 0, 0, 0, 0, 0, 0, 0])  # standardised: -2.47, then 0.35 seven times
    scores = {0: (heads, spread), 1: (heads, outlier)}
    # 4 neurons: block 1's outlier first, then block 0's three lowest (block 1's others sit above them)
    shapes = global_shapes(scores, dense, geometry, 4 * 12, "query-even", round_to=1, heads=False)
    assert shapes == {0: Shape(5, 4, 2), 1: Shape(7, 4, 2)}
    # heads allowed: a head unit (one query head per group, 32 weights) scores 0, above the two weakest neurons
    shapes = global_shapes(scores, dense, geometry, 2 * 12, "query-even", round_to=1)
    assert shapes == {0: Shape(7, 4, 2), 1: Shape(7, 4, 2)}
    # a larger target reaches the heads too (whole KV groups under kv-groups)
    shapes = global_shapes(scores, dense, geometry, 6 * 12 + 48, "kv-groups", round_to=1)
    assert sum(s.num_kv_heads for s in shapes.values()) == 3


def test_parse_layers():
    assert parse_layers("4:-2", 8) == [4, 5]
    assert parse_layers(":2", 8) == [0, 1]
    assert parse_layers(None, 3) == [0, 1, 2]
    with pytest.raises(PrunekitError, match="start:end"):
        parse_layers("4-8", 8)
    with pytest.raises(PrunekitError, match="selects no block"):
        parse_layers("9:", 8)


def test_bias_compensation_is_exact_for_constant_channels():
    torch.manual_seed(0)
    linear = torch.nn.Linear(4, 3, bias=False)
    x = torch.randn(10, 4)
    x[:, 2] = 0.7  # channel 2 never fluctuates: FLAP's compensation reproduces it exactly
    dense = linear(x)
    keep = torch.tensor([0, 1, 3])
    _compensate(linear, keep, x.mean(0))
    pruned = torch.nn.functional.linear(x[:, keep], linear.weight[:, keep], linear.bias)
    assert torch.allclose(pruned, dense, atol=1e-6)


def calib():
    return Calibration(tokens(n=4, seqlen=16), "random", "-", 0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("importance", ["magnitude-l2", "wanda-sp", "activation", "fluctuation", "taylor", "random"])
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
    with pytest.raises(PrunekitError, match="--taylor"):
        WidthConfig(importance="taylor", taylor="third")
    with pytest.raises(PrunekitError, match="--allocation global"):
        WidthConfig(num_heads=2, allocation="global")
    with pytest.raises(PrunekitError, match="--layers"):
        WidthConfig(layers="1-3")
    with pytest.raises(PrunekitError, match="widen --layers"):
        prune(tiny_model("llama"), WidthConfig(0.6, importance="random", layers="1:"))
    with pytest.raises(PrunekitError, match="--target-params"):
        WidthConfig(1.2)
    with pytest.raises(PrunekitError, match="calibration"):
        prune(tiny_model("llama"), WidthConfig(0.2, importance="wanda-sp"))


def test_shapes_that_leave_a_husk_are_refused_unless_forced():
    for name in ("intermediate_size", "num_heads"):
        with pytest.raises(PrunekitError, match=f"--{name.replace('_', '-')} must be at least 1"):
            WidthConfig(**{name: 0})
    model = tiny_model("llama")  # 128 neurons per block: a tenth is 12.8
    with pytest.raises(PrunekitError, match=r"keep 16 of the 256 MLP neurons .* pass --force"):
        prune(model, WidthConfig(intermediate_size=8, importance="magnitude-l1"))
    assert model.config.intermediate_size == 128  # refused before any weight changed
    prune(model, WidthConfig(intermediate_size=16, importance="magnitude-l1"))  # 12.5%: allowed
    prune(model, WidthConfig(intermediate_size=8, importance="magnitude-l1", force=True))
    assert model.config.intermediate_size == 8


@contextlib.contextmanager
def crash_on_block_1():
    """Make the width method raise KeyboardInterrupt when it reaches block 1 (an interrupted run)."""
    original = METHODS[WidthConfig]

    def crash(cfg, step):
        if step.index == 1:
            raise KeyboardInterrupt
        return original.block(cfg, step)

    METHODS[WidthConfig] = dataclasses.replace(original, block=crash)
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        METHODS[WidthConfig] = original


def test_width_resumes_from_a_checkpoint(tmp_path):
    reference = tiny_model("qwen3")
    config = WidthConfig(0.25, importance="wanda-sp")
    prune(reference, config, calib(), EngineConfig(progress=False))
    engine = EngineConfig(progress=False, checkpoint_dir=tmp_path / "ckpt")
    with crash_on_block_1():
        prune(tiny_model("qwen3"), config, calib(), engine)
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


@pytest.mark.parametrize(("allocation", "layers"), [("global", None), ("uniform", "1:"), ("global", "1:")])
def test_global_allocation_and_protected_blocks_reach_the_target(allocation, layers):
    model = tiny_model("qwen3")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    before = parameter_counts(model)["non_embedding"]
    config = WidthConfig(0.25, importance="wanda-sp", allocation=allocation, layers=layers, round_to=4)
    result = prune(model, config, calib(), EngineConfig(progress=False))
    cut = 1 - parameter_counts(model)["non_embedding"] / before
    assert 0.2 < cut < 0.3, cut
    if layers == "1:":  # block 0 is protected: untouched
        block0 = {k: v for k, v in model.state_dict().items() if ".layers.0." in k}
        assert all(torch.equal(v, original[k]) for k, v in block0.items())
        assert result.engine.blocks[0]["intermediate_size"] == 128
    with torch.no_grad():
        assert torch.isfinite(model(tokens(n=1, seqlen=8)).logits).all()


def test_bias_compensation_on_llama_keeps_a_standard_folder(tmp_path):
    model = tiny_model("llama")
    config = WidthConfig(intermediate_size=64, num_heads=2, importance="fluctuation", bias_compensation=True)
    prune(model, config, calib(), EngineConfig(progress=False))
    assert model.config.attention_bias and model.config.mlp_bias  # the flags cover the added biases
    down = get_adapter(model).block(0).mlp.down
    assert down.bias is not None and down.bias.abs().sum() > 0
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = tokens(n=1, seqlen=8)
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-5)


def test_taylor_width_runs_from_gradients_and_needs_no_block_pass():
    model = tiny_model("llama")
    for order in ("element", "vector", "second", "mix"):
        m = tiny_model("llama")
        prune(m, WidthConfig(0.25, importance="taylor", taylor=order), calib(), EngineConfig(progress=False))
        assert m.config.intermediate_size < model.config.intermediate_size
        assert all(p.grad is None for p in m.parameters())


@pytest.mark.parametrize("family", ["qwen2", "mistral", "gemma3"])
def test_bias_compensation_is_refused_where_standard_loaders_would_drop_the_bias(family):
    config = WidthConfig(0.25, importance="fluctuation", bias_compensation=True)
    with pytest.raises(PrunekitError, match="silently drop"):
        prune(tiny_model(family), config, calib(), EngineConfig(progress=False))


@pytest.mark.parametrize("family", ["opt", "gpt2"])
def test_bias_compensation_on_families_with_biases(family, tmp_path):
    model = tiny_model(family)
    down = get_adapter(model).block(0).mlp.down
    before = down.bias.detach().clone()
    config = WidthConfig(0.25, importance="fluctuation", bias_compensation=True, prune_heads=False)
    prune(model, config, calib(), EngineConfig(progress=False))
    down = get_adapter(model).block(0).mlp.down
    assert not torch.equal(down.bias, before)  # the existing bias took the removed neurons' mean output
    model.save_pretrained(tmp_path)  # and the config stays standard
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = tokens(n=1, seqlen=8)
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-5)


def test_lazy_width_run_resumes_from_a_checkpoint(tmp_path):
    from prunekit import load, save_pruned
    from tiny_models import save_tiny

    save_tiny(tmp_path / "src", "qwen3")
    config = WidthConfig(intermediate_size=64, num_heads=2, importance="wanda-sp")
    eager, tokenizer = load(tmp_path / "src")
    prune(eager, config, calib(), EngineConfig(progress=False))

    engine = EngineConfig(progress=False, checkpoint_dir=tmp_path / "ckpt")
    with crash_on_block_1():
        prune(load(tmp_path / "src", lazy=True)[0], config, calib(), engine)
    lazy, _ = load(tmp_path / "src", lazy=True)
    assert prune(lazy, config, calib(), engine).engine.resumed_from == 1  # block 0 reshaped on meta, then read
    save_pruned(lazy, tokenizer, tmp_path / "out", {})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for (name, a), b in zip(eager.state_dict().items(), reloaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

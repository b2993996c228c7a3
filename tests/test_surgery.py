"""Width-pruning surgery: a pruned model is exactly the masked model, and it saves as a standard folder."""

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, Phi3Config
from transformers.pytorch_utils import Conv1D

from prunekit.models import get_adapter, linear_weight
from prunekit.surgery.linear import SurgeryError, slice_columns, slice_rows
from prunekit.surgery.width import (
    block_shape,
    heads_for_even_query_removal,
    heads_for_kv_group_removal,
    kv_heads_for,
    prune_attention_heads,
    prune_mlp_neurons,
    update_config_uniform,
)
from tiny_models import FAMILIES, tiny_model, tokens

GQA_FAMILIES = [f for f in FAMILIES if f not in ("opt", "gpt2")]  # tiny configs: 4 query heads, 2 KV heads
HEAD_ROUNDTRIP = ["gemma3", "llama", "mistral", "phi3", "qwen2", "qwen3"]
ATOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: threads only contend (with each other and with whatever else the machine runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def logits(model, x=None):
    with torch.no_grad():
        return model(tokens() if x is None else x).logits


def removed(keep, size):
    return [i for i in range(size) if i not in set(torch.as_tensor(keep).tolist())]


def mask_neurons(model, keeps):
    """The reference: the same model with the removed neurons' down/fc2 columns zeroed."""
    adapter = get_adapter(model)
    with torch.no_grad():
        for i, keep in enumerate(keeps):
            down = adapter.block(i).mlp.down
            linear_weight(down)[:, removed(keep, linear_weight(down).shape[1])] = 0


def mask_heads(model, keeps):
    """The reference: the same model with the removed query heads' o-projection columns zeroed."""
    adapter = get_adapter(model)
    with torch.no_grad():
        for i, keep in enumerate(keeps):
            attn = adapter.block(i).attention
            for h in removed(keep, attn.num_heads):
                linear_weight(attn.o)[:, h * attn.head_dim : (h + 1) * attn.head_dim] = 0


def neuron_keeps(model, seed=0):
    """A different random half of the neurons for every block."""
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(seed)
    width = block_shape(adapter.block(0)).intermediate_size
    return [torch.randperm(width, generator=g)[: width // 2] for _ in range(adapter.num_blocks())]


def head_keeps(model, policy):
    """Per-block query heads to keep under a GQA policy (different choices in different blocks)."""
    adapter = get_adapter(model)
    attn = adapter.block(0).attention
    h, kv, n = attn.num_heads, attn.num_kv_heads, adapter.num_blocks()
    if policy == "kv_groups":
        return [heads_for_kv_group_removal(h, kv, [i % kv]) for i in range(n)]
    if policy == "even":
        scores = [torch.randn(h, generator=torch.Generator().manual_seed(i)) for i in range(n)]
        return [heads_for_even_query_removal(h, kv, 1, scores=s) for s in scores]
    return [torch.tensor([j for j in range(h) if j != i % h]) for i in range(n)]  # "any": no GQA


def prune(model, keeps, edit):
    adapter = get_adapter(model)
    for i, keep in enumerate(keeps):
        edit(adapter.block(i), keep)


# -- slicing primitives, by hand -------------------------------------------------------------------


def test_slice_linear_rows_and_columns():
    lin = nn.Linear(3, 4)
    with torch.no_grad():
        lin.weight.copy_(torch.arange(12.0).view(4, 3))
        lin.bias.copy_(torch.tensor([10.0, 11.0, 12.0, 13.0]))
    lin.weight.requires_grad_(False)
    slice_rows(lin, torch.tensor([3, 1]))
    assert lin.weight.tolist() == [[9, 10, 11], [3, 4, 5]]
    assert lin.bias.tolist() == [13, 11]
    assert lin.out_features == 2 and not lin.weight.requires_grad and lin.bias.requires_grad
    slice_columns(lin, [0, 2])
    assert lin.weight.tolist() == [[9, 11], [3, 5]] and lin.in_features == 2
    assert lin.bias.tolist() == [13, 11]
    assert lin(torch.tensor([[1.0, 1.0]])).tolist() == [[33, 19]]


def test_slice_conv1d_rows_and_columns():
    conv = Conv1D(nf=4, nx=3)  # weight [in=3, out=4]
    with torch.no_grad():
        conv.weight.copy_(torch.arange(12.0).view(3, 4))
        conv.bias.copy_(torch.tensor([10.0, 11.0, 12.0, 13.0]))
    slice_rows(conv, [3, 0])  # output features: Conv1D weight columns
    assert conv.weight.tolist() == [[3, 0], [7, 4], [11, 8]] and conv.bias.tolist() == [13, 10]
    assert conv.nf == 2
    slice_columns(conv, [1])  # input features: Conv1D weight rows
    assert conv.weight.tolist() == [[7, 4]] and conv.nx == 1
    assert conv(torch.tensor([[2.0]])).tolist() == [[27, 18]]  # forward shapes its output with nf


def test_slice_keeps_dtype_and_checks_range():
    lin = nn.Linear(4, 4, bias=False).to(torch.bfloat16)
    slice_rows(lin, torch.tensor([True, False, True, False]))
    assert lin.weight.dtype == torch.bfloat16 and lin.weight.shape == (2, 4) and lin.bias is None
    with pytest.raises(ValueError, match="indices"):
        slice_columns(lin, [4])


# -- GQA helpers, by hand --------------------------------------------------------------------------


def test_kv_group_removal():
    # 8 query heads, 4 KV heads: group g = query heads 2g, 2g+1.
    assert heads_for_kv_group_removal(8, 4, [1, 3]).tolist() == [0, 1, 4, 5]
    assert heads_for_kv_group_removal(4, 2, [0]).tolist() == [2, 3]
    assert heads_for_kv_group_removal(6, 6, [2]).tolist() == [0, 1, 3, 4, 5]  # no GQA: one head per group
    with pytest.raises(ValueError, match="every KV group"):
        heads_for_kv_group_removal(4, 2, [0, 1])
    with pytest.raises(ValueError):
        heads_for_kv_group_removal(4, 2, [2])


def test_even_query_removal():
    # 8 query heads, 2 KV heads: groups {0,1,2,3} and {4,5,6,7}.
    assert heads_for_even_query_removal(8, 2, 1).tolist() == [0, 1, 2, 4, 5, 6]
    assert heads_for_even_query_removal(8, 2, 2).tolist() == [0, 1, 4, 5]
    assert heads_for_even_query_removal(8, 2, 0).tolist() == list(range(8))
    scores = [0.5, 0.1, 0.9, 0.3, 2.0, 1.0, 0.2, 3.0]
    # lowest two in group 0: heads 1 (0.1), 3 (0.3); in group 1: heads 6 (0.2), 5 (1.0).
    assert heads_for_even_query_removal(8, 2, 2, scores=scores).tolist() == [0, 2, 4, 7]
    # ties go to the later head.
    assert heads_for_even_query_removal(4, 2, 1, scores=[1.0, 1.0, 1.0, 1.0]).tolist() == [0, 2]
    with pytest.raises(ValueError, match="remove_per_group"):
        heads_for_even_query_removal(8, 2, 4)  # would empty every group


def test_kv_heads_for_and_non_uniform_groups():
    kv, per_group = kv_heads_for(8, 4, [0, 1, 6, 7])
    assert kv.tolist() == [0, 3] and per_group == 2
    kv, per_group = kv_heads_for(8, 2, [1, 2, 4, 7])
    assert kv.tolist() == [0, 1] and per_group == 2
    with pytest.raises(ValueError, match="same number"):
        kv_heads_for(4, 2, [0, 1, 2])  # group 0 keeps 2, group 1 keeps 1


def test_prune_attention_rejects_non_uniform_groups():
    model = tiny_model("llama")
    block = get_adapter(model).block(0)
    with pytest.raises(ValueError, match="same number"):
        prune_attention_heads(block, [0, 1, 3])
    assert block_shape(block).num_heads == 4  # nothing was sliced


# -- equivalence with the masked model, every family -----------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_neurons_equal_masked_model(family):
    model = tiny_model(family)
    reference = copy.deepcopy(model)
    keeps = neuron_keeps(model)
    mask_neurons(reference, keeps)
    prune(model, keeps, prune_mlp_neurons)
    adapter = get_adapter(model)
    for i, keep in enumerate(keeps):
        assert block_shape(adapter.block(i)).intermediate_size == len(keep)
    torch.testing.assert_close(logits(model), logits(reference), atol=ATOL, rtol=0)


HEAD_CASES = [(f, "kv_groups") for f in GQA_FAMILIES] + [(f, "even") for f in GQA_FAMILIES]
HEAD_CASES += [("opt", "any"), ("gpt2", "any")]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(("family", "policy"), HEAD_CASES)
def test_heads_equal_masked_model(family, policy, attn):
    model = tiny_model(family)
    reference = copy.deepcopy(model)
    keeps = head_keeps(model, policy)
    mask_heads(reference, keeps)
    prune(model, keeps, prune_attention_heads)
    # Switched after pruning: the per-block config views (Phi-3) must follow the model's config.
    # Eager runs repeat_kv by num_key_value_groups; SDPA may hand GQA to the kernel instead.
    model.set_attn_implementation(attn)
    reference.set_attn_implementation(attn)
    adapter = get_adapter(model)
    shape = block_shape(adapter.block(0))
    if policy == "kv_groups":
        assert (shape.num_heads, shape.num_kv_heads) == (2, 1)
    elif policy == "even":
        assert (shape.num_heads, shape.num_kv_heads) == (2, 2)
    else:
        assert (shape.num_heads, shape.num_kv_heads) == (3, 3)
    torch.testing.assert_close(logits(model), logits(reference), atol=ATOL, rtol=0)


def test_pruning_twice_composes():
    """Heads then neurons then heads again on the same block: shapes are read from the weights each time."""
    model = tiny_model("qwen3")
    reference = copy.deepcopy(model)
    block = get_adapter(model).block(0)
    prune_attention_heads(block, heads_for_even_query_removal(4, 2, 1))  # keeps original heads 0, 2
    prune_mlp_neurons(block, torch.arange(0, 128, 2))
    prune_attention_heads(block, heads_for_kv_group_removal(2, 2, [1]))  # keeps original head 0
    mask_heads(reference, [[0]])
    mask_neurons(reference, [torch.arange(0, 128, 2)])
    torch.testing.assert_close(logits(model), logits(reference), atol=ATOL, rtol=0)


# -- config update and save / load ----------------------------------------------------------------


def generate(model, x, use_cache):
    with torch.no_grad():
        return model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=5, do_sample=False, use_cache=use_cache, pad_token_id=0
        )


def assert_roundtrip(model, reference, tmp_path):
    x = tokens(n=2, seqlen=12)
    expected = logits(model, x)
    torch.testing.assert_close(expected, logits(reference, x), atol=ATOL, rtol=0)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(loaded, x), expected, atol=ATOL, rtol=0)
    # The reloaded model, decoding with its KV cache, agrees with the in-memory one recomputing everything.
    assert torch.equal(generate(loaded, x, use_cache=True), generate(model, x, use_cache=False))
    return loaded


@pytest.mark.parametrize("family", FAMILIES)
def test_neurons_roundtrip(family, tmp_path):
    model = tiny_model(family)
    reference = copy.deepcopy(model)
    keep = torch.randperm(128, generator=torch.Generator().manual_seed(1))[:80]
    keeps = [keep] * get_adapter(model).num_blocks()
    mask_neurons(reference, keeps)
    prune(model, keeps, prune_mlp_neurons)
    values = update_config_uniform(model)
    assert 80 in values.values()
    loaded = assert_roundtrip(model, reference, tmp_path)
    assert block_shape(get_adapter(loaded).block(0)).intermediate_size == 80


@pytest.mark.parametrize("family", HEAD_ROUNDTRIP)
@pytest.mark.parametrize("policy", ["kv_groups", "even"])
def test_heads_roundtrip(family, policy, tmp_path):
    model = tiny_model(family)
    reference = copy.deepcopy(model)
    n = get_adapter(model).num_blocks()
    keep = heads_for_kv_group_removal(4, 2, [0]) if policy == "kv_groups" else heads_for_even_query_removal(4, 2, 1)
    mask_heads(reference, [keep] * n)
    prune(model, [keep] * n, prune_attention_heads)
    update_config_uniform(model)
    config = model.config
    expected_kv = 1 if policy == "kv_groups" else 2
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, expected_kv, 16)
    assert all(m.config is config for m in model.modules() if hasattr(m, "config"))  # per-block views gone
    assert_roundtrip(model, reference, tmp_path)


def test_heads_and_neurons_together_roundtrip(tmp_path):
    model = tiny_model("llama")
    reference = copy.deepcopy(model)
    heads, neurons = heads_for_even_query_removal(4, 2, 1), torch.arange(100)
    mask_heads(reference, [heads, heads])
    mask_neurons(reference, [neurons, neurons])
    prune(model, [heads, heads], prune_attention_heads)
    prune(model, [neurons, neurons], prune_mlp_neurons)
    assert update_config_uniform(model) == {
        "intermediate_size": 100,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 16,
    }
    assert_roundtrip(model, reference, tmp_path)


@pytest.mark.parametrize("family", ["opt", "gpt2"])
def test_heads_refused_where_config_derives_head_dim(family):
    model = tiny_model(family)
    before = model.config.to_dict()
    prune(model, [torch.tensor([0, 2])] * 2, prune_attention_heads)
    expected = logits(model)
    with pytest.raises(ValueError, match="shape manifest") as err:
        update_config_uniform(model)
    assert isinstance(err.value, SurgeryError)  # a PrunekitError too: the CLI prints it as one line
    assert model.config.to_dict() == before  # untouched on failure
    torch.testing.assert_close(logits(model), expected, atol=0, rtol=0)  # the in-memory model still works


def test_heads_refused_for_phi3_long_rope():
    """Phi-3's long-RoPE factors are sized by hidden_size // num_heads, so fewer heads cannot validate."""
    config = Phi3Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        max_position_embeddings=256,
        original_max_position_embeddings=128,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0] * 8,
            "long_factor": [1.0] * 8,
        },
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    prune(model, [heads_for_kv_group_removal(4, 2, [1])] * 2, prune_attention_heads)
    with pytest.raises(ValueError, match="shape manifest"):
        update_config_uniform(model)
    assert model.config.num_attention_heads == 4


def test_non_uniform_blocks_refused():
    model = tiny_model("llama")
    keeps = neuron_keeps(model)
    keeps[1] = keeps[1][:10]
    prune(model, keeps, prune_mlp_neurons)
    with pytest.raises(ValueError, match="blocks differ"):
        update_config_uniform(model)
    assert model.config.intermediate_size == 128


def test_unpruned_model_config_update_is_a_no_op(tmp_path):
    model = tiny_model("qwen2")
    reference = copy.deepcopy(model)
    update_config_uniform(model)
    assert model.config.num_attention_heads == 4 and model.config.intermediate_size == 128
    assert_roundtrip(model, reference, tmp_path)

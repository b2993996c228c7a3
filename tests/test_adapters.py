"""Adapters: every family exposes the same view, with the right shapes, and nothing else is accepted."""

import pytest

from prunekit.errors import PrunekitError
from prunekit.models import get_adapter, linear_weight
from tiny_models import FAMILIES, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_block_view_has_consistent_shapes(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    hidden = model.config.hidden_size
    assert adapter.num_blocks() == model.config.num_hidden_layers
    assert adapter.embeddings()[0].weight.shape[1] == hidden
    assert adapter.lm_head().weight.shape == (model.config.vocab_size, hidden)
    for i in range(adapter.num_blocks()):
        block = adapter.block(i)
        attn, mlp = block.attention, block.mlp
        q_rows = attn.num_heads * attn.head_dim
        kv_rows = attn.num_kv_heads * attn.head_dim
        if attn.qkv is not None:
            assert linear_weight(attn.qkv).shape == (q_rows + 2 * kv_rows, hidden)
        else:
            assert linear_weight(attn.q).shape == (q_rows, hidden)
            assert linear_weight(attn.k).shape == linear_weight(attn.v).shape == (kv_rows, hidden)
        assert linear_weight(attn.o).shape == (hidden, q_rows)
        assert attn.num_heads % attn.num_kv_heads == 0
        inner = linear_weight(mlp.down).shape[1]
        if mlp.gate_up is not None:
            assert linear_weight(mlp.gate_up).shape == (2 * inner, hidden)
        else:
            assert linear_weight(mlp.up).shape == (inner, hidden)
            if mlp.gate is not None:
                assert linear_weight(mlp.gate).shape == (inner, hidden)
        assert mlp.gated == (family not in ("opt", "gpt2"))
        assert all(n.weight.shape == (hidden,) for n in block.norms.values())
        assert len(block.linears()) == (4 if family in ("phi3", "gpt2") else 6 if family == "opt" else 7)


def test_gqa_is_reported():
    attn = get_adapter(tiny_model("llama")).block(0).attention
    assert (attn.num_heads, attn.num_kv_heads, attn.queries_per_kv) == (4, 2, 2)


def test_qwen3_and_gemma3_expose_their_qk_norms():
    for family in ("qwen3", "gemma3"):
        assert set(get_adapter(tiny_model(family)).block(0).attention.extra_norms) == {"q_norm", "k_norm"}


def test_unsupported_model_lists_the_families():
    from transformers import AutoModelForCausalLM, BloomConfig

    model = AutoModelForCausalLM.from_config(BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=2))
    with pytest.raises(PrunekitError, match="supported families:.*Llama.*OPT"):
        get_adapter(model)


def test_head_counts_follow_the_weights_after_head_pruning():
    from prunekit.surgery.width import heads_for_kv_group_removal, prune_attention_heads

    model = tiny_model("llama")
    adapter = get_adapter(model)
    prune_attention_heads(adapter.block(0), heads_for_kv_group_removal(4, 2, [1]))
    attn = adapter.block(0).attention
    assert (attn.num_heads, attn.num_kv_heads) == (2, 1)
    assert (adapter.block(1).attention.num_heads, adapter.block(1).attention.num_kv_heads) == (4, 2)

"""Shape manifests: pruned models their config cannot describe save, load back exactly, and take LoRA adapters."""

import json
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM

from prunekit import load, save_pruned
from prunekit.errors import PrunekitError
from prunekit.io.files import MANIFEST
from prunekit.io.shapes import describe_shapes
from prunekit.methods import MagnitudeConfig, prune
from prunekit.models import get_adapter
from prunekit.sequential import EngineConfig
from prunekit.surgery.width import (
    block_shape,
    heads_for_kv_group_removal,
    prune_attention_heads,
    prune_mlp_neurons,
    update_config_uniform,
)
from tiny_models import FAMILIES, tiny_model, tiny_tokenizer, tokens

ATOL = 1e-5
NO_GQA = ("gpt2", "opt")  # configs derive head_dim from the head count: removed heads need a manifest


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: threads only contend (with each other and with whatever else the machine runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def non_uniform(family: str):
    """Block 0 loses heads (its MLP stays dense), block 1 loses neurons, any later block stays dense."""
    model = tiny_model(family)
    adapter = get_adapter(model)
    heads = [0, 2, 3] if family in NO_GQA else heads_for_kv_group_removal(4, 2, [0])
    prune_attention_heads(adapter.block(0), heads)
    width = block_shape(adapter.block(1)).intermediate_size
    prune_mlp_neurons(adapter.block(1), torch.randperm(width, generator=torch.Generator().manual_seed(1))[:80])
    return model


def save(model, folder, **kwargs):
    return save_pruned(model, tiny_tokenizer(), folder, {"method": "test"}, **kwargs)


def manifest(folder) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def generate(model, x, use_cache):
    with torch.no_grad():
        return model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=5, do_sample=False, use_cache=use_cache, pad_token_id=0
        )


def assert_same_model(loaded, model):
    """Same logits, and the loaded model decoding with its KV cache agrees with the original recomputing all."""
    x = tokens(n=2, seqlen=12)
    assert not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=ATOL, rtol=0)
    assert torch.equal(generate(loaded, x, use_cache=True), generate(model, x, use_cache=False))


def assert_head_tied(model):
    adapter = get_adapter(model)
    if model.config.tie_word_embeddings:
        assert adapter.lm_head().weight is adapter.embeddings()[0].weight


@pytest.mark.parametrize("family", FAMILIES)
def test_non_uniform_blocks_round_trip(family, tmp_path):
    model = non_uniform(family)
    save(model, tmp_path / "out")
    adapter = get_adapter(model)
    blocks = manifest(tmp_path / "out")["shapes"]["blocks"]
    assert blocks == [asdict(block_shape(adapter.block(i))) for i in range(adapter.num_blocks())]
    assert blocks[0]["num_heads"] < blocks[1]["num_heads"] and blocks[0]["intermediate_size"] > 80
    for loader in (load,):
        loaded, _ = loader(tmp_path / "out")
        assert_same_model(loaded, model)
        assert_head_tied(loaded)


@pytest.mark.parametrize("family", NO_GQA)
def test_uniform_head_removal_the_config_cannot_express(family, tmp_path):
    model = tiny_model(family)
    adapter = get_adapter(model)
    for i in range(adapter.num_blocks()):
        prune_attention_heads(adapter.block(i), [1, 3])
    with pytest.raises(PrunekitError, match="shape manifest"):
        update_config_uniform(model)
    save(model, tmp_path / "out")
    assert [b["num_heads"] for b in manifest(tmp_path / "out")["shapes"]["blocks"]] == [2, 2]
    assert_same_model(load(tmp_path / "out")[0], model)


def test_config_expressible_result_has_no_manifest(tmp_path):
    assert describe_shapes(tiny_model("gpt2")) is None
    model = tiny_model("llama")
    adapter = get_adapter(model)
    for i in range(adapter.num_blocks()):
        prune_attention_heads(adapter.block(i), heads_for_kv_group_removal(4, 2, [1]))
        prune_mlp_neurons(adapter.block(i), torch.arange(0, 128, 2))
    update_config_uniform(model)
    assert describe_shapes(model) is None
    save_pruned(model, tiny_tokenizer(), tmp_path / "out", {"shapes": {"blocks": []}})  # a stale one goes
    assert "shapes" not in manifest(tmp_path / "out")
    assert_same_model(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), model)


def test_plain_from_pretrained_refuses_a_manifest_folder(tmp_path):
    """The saved config keeps the dense widths: transformers must fail, not fill the blocks with random weights."""
    save(non_uniform("llama"), tmp_path / "out")
    with pytest.raises(RuntimeError, match="mismatch"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_added_biases_round_trip(tmp_path):
    """FLAP adds biases to o_proj / down_proj; Qwen2's config has no flag for them."""
    model = non_uniform("qwen2")
    layers = model.model.layers
    g = torch.Generator().manual_seed(2)
    layers[0].self_attn.o_proj.bias = nn.Parameter(torch.randn(64, generator=g) * 0.1)
    layers[1].mlp.down_proj.bias = nn.Parameter(torch.randn(64, generator=g) * 0.1)
    assert describe_shapes(model)["extra_parameters"] == {
        "model.layers.0.self_attn.o_proj.bias": [64],
        "model.layers.1.mlp.down_proj.bias": [64],
    }
    save(model, tmp_path / "out")
    loaded, _ = load(tmp_path / "out")
    assert torch.equal(loaded.model.layers[0].self_attn.o_proj.bias, layers[0].self_attn.o_proj.bias)
    assert_same_model(loaded, model)


def test_save_refuses_what_it_could_not_load_back(tmp_path):
    model = non_uniform("llama")
    model.model.norm.bias = nn.Parameter(torch.zeros(64))  # RMSNorm ignores it: no way to rebuild that
    with pytest.raises(PrunekitError, match="prunekit recreates only an output bias"):
        save(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def drop_a_block(shapes):
    shapes["blocks"].pop()


def widen_the_mlp(shapes):
    shapes["blocks"][1]["intermediate_size"] = 256


def narrow_the_mlp(shapes):
    shapes["blocks"][1]["intermediate_size"] = 64


def bias_on_a_norm(shapes):
    shapes["extra_parameters"] = {"model.norm.bias": [64]}


def forget_a_key(shapes):
    del shapes["blocks"][0]["num_kv_heads"]


MISFITS = [
    (drop_a_block, "describes 1 blocks but the config builds 2"),
    (widen_the_mlp, "block 1: the shape manifest asks for 256 MLP neurons, but the config builds 128"),
    (narrow_the_mlp, r"gate_proj.weight is \(80, 64\) in the checkpoint but \(64, 64\)"),
    (bias_on_a_norm, r"model.norm.bias \[64\]: prunekit recreates only an output bias"),
    (forget_a_key, "block 0 of the shape manifest must give intermediate_size, num_heads, num_kv_heads, head_dim"),
]


@pytest.mark.parametrize(("edit", "message"), MISFITS, ids=[edit.__name__ for edit, _ in MISFITS])
def test_a_manifest_that_does_not_fit_is_refused(edit, message, tmp_path):
    save(non_uniform("llama"), tmp_path / "out")
    data = manifest(tmp_path / "out")
    edit(data["shapes"])
    (tmp_path / "out" / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(PrunekitError, match=message):
        load(tmp_path / "out")


def test_weights_must_match_the_manifest_exactly(tmp_path):
    save(non_uniform("llama"), tmp_path / "out")
    save_file({"model.layers.0.stray": torch.zeros(1)}, str(tmp_path / "out" / "stray.safetensors"))
    with pytest.raises(PrunekitError, match=r"0 missing \[\], 1 unexpected \['model.layers.0.stray'\]"):
        load(tmp_path / "out")


def test_lazy_pruning_of_a_manifest_folder_streams_it_back(tmp_path):
    """Lazy blocks are reshaped on meta, pruned one at a time, and saved sharded with the manifest again."""
    save(non_uniform("qwen3"), tmp_path / "out")
    engine = EngineConfig(progress=False)
    eager, tokenizer = load(tmp_path / "out")
    prune(eager, MagnitudeConfig(0.5), engine=engine)
    lazy, _ = load(tmp_path / "out", lazy=True)
    assert describe_shapes(lazy) == manifest(tmp_path / "out")["shapes"]
    prune(lazy, MagnitudeConfig(0.5), engine=EngineConfig(progress=False, checkpoint_dir=tmp_path / "ckpt"))
    save_pruned(lazy, tokenizer, tmp_path / "again", {})
    assert (tmp_path / "again" / "model.safetensors.index.json").exists()
    assert manifest(tmp_path / "again")["shapes"] == manifest(tmp_path / "out")["shapes"]
    assert_same_model(load(tmp_path / "again")[0], eager)


def test_compact_format_keeps_the_manifest(tmp_path):
    model = non_uniform("phi3")
    save(model, tmp_path / "out", fmt="compact")
    assert "shapes" in manifest(tmp_path / "out")
    assert_same_model(load(tmp_path / "out")[0], model)


def test_dtype_buffers_and_generation_settings(tmp_path):
    model = non_uniform("llama")
    model.generation_config.eos_token_id = 7  # not what the config would give: read from the folder
    save(model, tmp_path / "out")
    loaded, _ = load(tmp_path / "out", dtype="bfloat16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    assert loaded.generation_config.eos_token_id == 7


def test_lora_adapters_take_the_pruned_widths(tmp_path):
    from peft import LoraConfig, get_peft_model

    save(non_uniform("llama"), tmp_path / "out")
    base, _ = load(tmp_path / "out")
    x = tokens(n=2, seqlen=12)
    with torch.no_grad():
        expected = base(x).logits
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = get_peft_model(base, LoraConfig(target_modules=targets, r=4))
    layers = lora.base_model.model.model.layers
    assert layers[1].mlp.down_proj.lora_A["default"].in_features == 80  # the pruned MLP width
    assert layers[1].mlp.up_proj.lora_B["default"].out_features == 80
    assert layers[0].self_attn.q_proj.lora_B["default"].out_features == 2 * 16  # 2 of 4 heads left
    assert layers[0].self_attn.k_proj.lora_B["default"].out_features == 16  # 1 of 2 KV heads left
    assert layers[0].self_attn.o_proj.lora_A["default"].in_features == 2 * 16
    with torch.no_grad():  # LoRA's B starts at zero: the adapted model is the base model until trained
        torch.testing.assert_close(lora(x).logits, expected, atol=ATOL, rtol=0)
    lora.train()
    lora(x, labels=x).loss.backward()
    grads = {n: p.grad for n, p in lora.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n and g is not None for n, g in grads.items())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)

"""GGUF export: every shape kind runs in llama.cpp with PyTorch's logits; refusals and interruptions leave no file."""

import json
import os

import numpy as np
import pytest
import torch

from prunekit.errors import PrunekitError
from prunekit.export.gguf import export_gguf, source_gguf
from prunekit.models import get_adapter
from prunekit.surgery.depth import remove_blocks, remove_sublayer
from prunekit.surgery.hidden import make_invariant
from prunekit.surgery.width import heads_for_kv_group_removal, prune_attention_heads, prune_mlp_neurons
from tiny_models import tiny_model, tiny_tokenizer, tokens

RTOL = 1e-4  # f32 end to end: relative error of the logits, as a whole


def uniform_width(model):
    for i in range(get_adapter(model).num_blocks()):
        prune_mlp_neurons(get_adapter(model).block(i), torch.arange(0, 128, 2))


def per_block_shapes(model):
    """Block 0 loses a KV group (and its query heads), block 1 half its MLP: widths and heads differ per block."""
    adapter = get_adapter(model)
    prune_attention_heads(adapter.block(0), heads_for_kv_group_removal(4, 2, [0]))
    prune_mlp_neurons(adapter.block(1), torch.arange(64))


def removed_block(model):
    remove_blocks(model, [0])


def removed_attention(model):
    remove_sublayer(get_adapter(model).block(1), "attention")


def removed_attention_first(model):
    """Block 0 without attention: llama.cpp takes the head size from block 0, so a zero head stands in."""
    remove_sublayer(get_adapter(model).block(0), "attention")


def removed_mlp(model):
    remove_sublayer(get_adapter(model).block(0), "mlp")


SHAPES = {
    "dense": (lambda m: None, "llama"),
    "uniform-width": (uniform_width, "llama"),
    "per-block-shapes": (per_block_shapes, "deci"),
    "removed-block": (removed_block, "llama"),
    "removed-attention": (removed_attention, "deci"),
    "removed-attention-block0": (removed_attention_first, "deci"),
    "removed-mlp": (removed_mlp, "deci"),
}


def shaped(kind: str):
    model = tiny_model("llama")
    SHAPES[kind][0](model)
    return model


def llama_logits(path, ids) -> torch.Tensor:
    from prunekit.evaluate.llamacpp import gguf_logits, open_gguf

    llm = open_gguf(path, n_ctx=32, threads=1, logits_all=True)
    return torch.from_numpy(gguf_logits(llm, ids))


@pytest.mark.parametrize("kind", sorted(SHAPES))
def test_every_shape_kind_runs_in_llama_cpp_with_the_pytorch_logits(kind, tmp_path):
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (pip install 'prunekit[deploy]')")
    model = shaped(kind)
    report = export_gguf(model, tiny_tokenizer(), tmp_path / "m.gguf")
    assert report.arch == SHAPES[kind][1]
    ids = tokens(n=1, seqlen=16)[0]
    with torch.no_grad():
        expected = model(ids[None]).logits[0]
    got = llama_logits(tmp_path / "m.gguf", ids.tolist())
    error = (got - expected).norm() / expected.norm()
    assert error < RTOL, f"{kind}: relative logit error {error:.2e}"


@pytest.mark.parametrize("quant, tolerance", [("f16", 5e-3), ("bf16", 3e-2), ("q8_0", 3e-2), ("q4_0", 0.3)])
def test_quantized_exports_run_close_to_the_model(quant, tolerance, tmp_path):
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (pip install 'prunekit[deploy]')")
    model = shaped("per-block-shapes")
    report = export_gguf(model, tiny_tokenizer(), tmp_path / "m.gguf", quant)
    assert report.quant == quant
    ids = tokens(n=1, seqlen=16)[0]
    with torch.no_grad():
        expected = model(ids[None]).logits[0]
    got = llama_logits(tmp_path / "m.gguf", ids.tolist())
    assert (got - expected).norm() / expected.norm() < tolerance


def test_shapes_go_into_per_layer_arrays_and_stand_ins_are_reported(tmp_path):
    gguf = pytest.importorskip("gguf")
    model = shaped("per-block-shapes")
    remove_sublayer(get_adapter(model).block(1), "attention")
    report = export_gguf(model, tiny_tokenizer(), tmp_path / "m.gguf")
    fields = gguf.GGUFReader(tmp_path / "m.gguf").fields
    assert fields["deci.feed_forward_length"].contents() == [128, 64]
    assert fields["deci.attention.head_count"].contents() == [2, 0]
    assert fields["deci.attention.head_count_kv"].contents() == [1, 0]
    assert report.tokenizer == "converted from tokenizer.json"
    assert not report.notes  # attention-free block 1 needs no stand-in

    model = shaped("removed-mlp")
    report = export_gguf(model, tiny_tokenizer(), tmp_path / "n.gguf")
    assert report.feed_forward_length == [32, 128]
    assert any("block 0" in note and "zero mlp" in note for note in report.notes)


def test_sparse_weights_are_kept_and_the_report_says_llama_cpp_gains_nothing(tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():
        for module in get_adapter(model).blocks():
            for p in module.parameters():
                if p.dim() == 2:
                    p.mul_((torch.rand_like(p) > 0.5).float())
    report = export_gguf(model, tiny_tokenizer(), tmp_path / "m.gguf")
    assert report.arch == "llama"
    assert any("no smaller and no faster" in note for note in report.notes)


def no_files(folder) -> list[str]:
    return sorted(os.listdir(folder))


def test_refused_models_leave_no_file(tmp_path):
    sliced = tiny_model("llama")
    make_invariant(sliced)
    with pytest.raises(PrunekitError, match="SliceGPT"):
        export_gguf(sliced, tiny_tokenizer(), tmp_path / "m.gguf")
    with pytest.raises(PrunekitError, match="'gpt2' is not supported"):
        export_gguf(tiny_model("gpt2"), tiny_tokenizer(), tmp_path / "m.gguf")
    assert no_files(tmp_path) == []


@pytest.mark.parametrize(
    "quant, change, message",
    [
        ("q5_k", None, "--quant must be one of f32, f16, bf16, q8_0, q4_0"),
        ("q8_0", "mlp80", "--round-to 32"),
        ("q4_0", "mlp80", "mlp.down_proj|ffn_down"),
    ],
)
def test_bad_quant_and_row_lengths_are_one_line_errors(quant, change, message, tmp_path):
    model = tiny_model("llama")
    if change == "mlp80":
        prune_mlp_neurons(get_adapter(model).block(1), torch.arange(80))
    with pytest.raises(PrunekitError, match=message) as err:
        export_gguf(model, tiny_tokenizer(), tmp_path / "m.gguf", quant)
    assert "\n" not in str(err.value)
    assert no_files(tmp_path) == []


def test_an_interrupted_export_leaves_no_file(tmp_path, monkeypatch):
    import gguf

    def interrupted(self, *args, **kwargs):
        self.fout[0].write(b"half a tensor")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(tiny_model("llama"), tiny_tokenizer(), tmp_path / "m.gguf")
    assert no_files(tmp_path) == []


def test_an_existing_file_is_kept_unless_overwriting(tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"mine")
    with pytest.raises(PrunekitError, match="--overwrite"):
        export_gguf(tiny_model("llama"), tiny_tokenizer(), out)
    assert out.read_bytes() == b"mine"
    export_gguf(tiny_model("llama"), tiny_tokenizer(), out, overwrite=True)
    assert out.read_bytes()[:4] == b"GGUF"
    assert no_files(tmp_path) == ["m.gguf"]


def test_the_tokenizer_source_is_followed_back_through_prunekit_outputs(tmp_path):
    gguf_file = tmp_path / "base.gguf"
    gguf_file.write_bytes(b"GGUF")
    first, second = tmp_path / "pruned", tmp_path / "recovered"
    for folder, parent in ((first, gguf_file), (second, first)):
        folder.mkdir()
        (folder / "prunekit.json").write_text(json.dumps({"source_model": {"name": str(parent)}}))
    assert source_gguf(second) == gguf_file
    assert source_gguf(tmp_path / "elsewhere") is None


@pytest.mark.realmodel
def test_real_model_f32_gguf_perplexity_equals_prunekits(tmp_path):
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (pip install 'prunekit[deploy]')")
    from prunekit import load
    from prunekit.data import load_text
    from prunekit.evaluate import perplexity
    from prunekit.evaluate.llamacpp import gguf_perplexity

    model, tokenizer = load("smollm2-135m")
    report = export_gguf(model, tokenizer, tmp_path / "dense.gguf", source="smollm2-135m")
    assert report.arch == "llama" and report.tokenizer.startswith("copied from SmolLM2")
    text = load_text("wikitext2")
    ours = perplexity(model, tokenizer, text, seqlen=512, max_windows=4, progress=False)
    theirs = gguf_perplexity(tmp_path / "dense.gguf", tokenizer, text, seqlen=512, max_windows=4, progress=False)
    assert theirs.tokens == ours.tokens
    assert abs(theirs.ppl / ours.ppl - 1) < 1e-3, (theirs.ppl, ours.ppl)
    np.testing.assert_allclose(theirs.nll, ours.nll, rtol=1e-4)


def test_q4_0_keeps_the_output_head_at_q8_0(tmp_path):
    """As llama.cpp's own quantizer does (Q6_K there): the tied token embedding is the output head."""
    gguf = pytest.importorskip("gguf")
    model = tiny_model("llama")
    export_gguf(model, tiny_tokenizer(), tmp_path / "m.gguf", "q4_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    head = "output.weight" if "output.weight" in types else "token_embd.weight"
    assert types[head] == "Q8_0"
    assert types["blk.0.ffn_down.weight"] == "Q4_0" and types["blk.1.attn_q.weight"] == "Q4_0"


# --- GPTQ's codes written as they are -------------------------------------------------------------


def gptq_folder(tmp_path, bits=4, group_size=32, sym=True):
    pytest.importorskip("compressed_tensors")
    from prunekit.data import Calibration
    from prunekit.export.compressed import save_compressed
    from prunekit.methods import GPTQConfig, prune
    from prunekit.methods.quant import QuantGrid
    from prunekit.sequential import EngineConfig

    model = tiny_model("llama")
    calib = Calibration(tokens(n=8, seqlen=16, seed=0), "random", "-", 0)
    prune(model, GPTQConfig(bits=bits, group_size=group_size, sym=sym), calib, EngineConfig(progress=False))
    save_compressed(model, tiny_tokenizer(), tmp_path / "q", QuantGrid(bits, group_size, sym))
    return model, tmp_path / "q"


@pytest.mark.parametrize("bits, group_size, quant", [(4, 32, "q4_0"), (4, 64, "q8_0"), (8, -1, "q8_0")])
def test_gptq_codes_and_scales_go_into_q8_0_and_q4_0_blocks_unrounded(bits, group_size, quant, tmp_path):
    """Every block of the file dequantizes to GPTQ's codes times its scale in f16, never to a fresh rounding."""
    gguf = pytest.importorskip("gguf")
    from prunekit.export.gguf import export_gguf_model
    from prunekit.methods.quant import grid_of, per_column, quant_codes

    model, folder = gptq_folder(tmp_path, bits, group_size)
    report = export_gguf_model(folder, tmp_path / "m.gguf", quant)
    assert any("GPTQ" in note for note in report.notes) and not any("sparsity" in note for note in report.notes)
    stored = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    linear = model.model.layers[1].mlp.down_proj
    scale, zero = grid_of(linear)
    W = linear.weight.detach()
    codes = quant_codes(W, scale, zero, bits, group_size)
    expected = codes * per_column(scale.half().float(), W.shape[1], group_size)
    tensor = stored["blk.1.ffn_down.weight"]
    assert tensor.tensor_type.name == quant.upper()
    got = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type))
    assert torch.equal(got, expected)
    fresh = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(W.numpy(), tensor.tensor_type),
                                                    tensor.tensor_type))  # fmt: skip
    assert (got - W).norm() < (fresh - W).norm()  # re-rounding GPTQ's weights would move them


def test_gptq_exports_in_llama_cpp_give_the_quantized_model_logits(tmp_path):
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (pip install 'prunekit[deploy]')")
    from prunekit.export.gguf import export_gguf_model

    model, folder = gptq_folder(tmp_path)
    export_gguf_model(folder, tmp_path / "m.gguf", "q4_0")
    ids = tokens(n=1, seqlen=16)[0]
    with torch.no_grad():
        expected = model(ids[None]).logits[0]
    got = llama_logits(tmp_path / "m.gguf", ids.tolist())
    assert (got - expected).norm() / expected.norm() < 2e-2  # f16 scales and the Q8_0 head, not 4-bit rounding


@pytest.mark.parametrize(
    "bits, group_size, sym, quant, match",
    [
        (4, 32, False, "q4_0", "asymmetric grid"),
        (4, 16, True, "q4_0", "multiple of 32"),
        (8, 32, True, "q4_0", "beyond q4_0's range"),
    ],
)
def test_gptq_grids_gguf_cannot_hold_are_refused_with_the_fix(bits, group_size, sym, quant, match, tmp_path):
    pytest.importorskip("gguf")
    from prunekit.export.gguf import export_gguf_model

    _, folder = gptq_folder(tmp_path, bits, group_size, sym)
    with pytest.raises(PrunekitError, match=match):
        export_gguf_model(folder, tmp_path / "m.gguf", quant)
    assert not (tmp_path / "m.gguf").exists()
    export_gguf_model(folder, tmp_path / "m.gguf", "f16")  # the dequantized weights always export

"""SliceGPT: invariance (folding, LayerNorm -> RMSNorm, rotation) is exact, slicing is exact where the stream
has no energy to lose, and the sliced model saves, reloads and generates."""

import copy
import dataclasses

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from prunekit import load, save_pruned
from prunekit.data import Calibration
from prunekit.errors import PrunekitError
from prunekit.methods import SliceGPTConfig, prune
from prunekit.methods.slicegpt import principal_basis, project, rotate_and_slice
from prunekit.models import get_adapter, linear_weight, parameter_counts
from prunekit.sequential import EngineConfig
from prunekit.surgery.hidden import RMSNorm, make_invariant, writer
from test_cli import error_line, run
from tiny_models import SAMPLE_TEXT, save_tiny, tiny_model, tiny_tokenizer, tokens

INVARIANT = ["llama", "mistral", "opt", "gpt2", "phi3", "qwen2", "qwen3"]
ENGINE = EngineConfig(progress=False)


def logits(model, ids=None):
    with torch.no_grad():
        return model(tokens(2, 16, seed=1) if ids is None else ids).logits


def calibration(n=8) -> Calibration:
    return Calibration(tokens(n, 16), "random", "", 0)


def low_rank_stream(model, rank: int) -> None:
    """Confine everything that writes the residual stream to one ``rank``-dimensional subspace."""
    adapter = get_adapter(model)
    width = adapter.embeddings()[0].weight.shape[1]
    gaussian = torch.randn(width, width, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    basis = torch.linalg.qr(gaussian)[0][:, :rank]
    projector = (basis @ basis.T).float()
    with torch.no_grad():
        for embedding in adapter.embeddings():
            embedding.weight.copy_(embedding.weight @ projector)
        for i in range(adapter.num_blocks()):
            for part in ("attention", "mlp"):
                linear = writer(adapter.block(i), part)
                linear_weight(linear).copy_(projector @ linear_weight(linear))
                if linear.bias is not None:
                    linear.bias.copy_(linear.bias @ projector)


# -- the math, by hand -----------------------------------------------------------------------------


def test_principal_basis_sorts_directions_by_energy_and_reports_the_kept_share():
    cov = torch.diag(torch.tensor([1.0, 4.0, 0.0, 3.0], dtype=torch.float64))
    basis = principal_basis(cov, size=2, damp=0.0)
    leading = basis.vectors[:, :3].abs().argmax(0).tolist()
    assert leading == [1, 3, 0]  # eigenvalues 4, 3, 1 first
    assert basis.kept_energy == pytest.approx(7 / 8)
    assert torch.allclose(basis.vectors.T @ basis.vectors, torch.eye(4, dtype=torch.float64))


def test_project_keeps_the_leading_directions_only():
    basis = torch.eye(3, dtype=torch.float64)
    x = torch.tensor([[2.0, -1.0, 5.0]])
    assert project(x, basis, 2).tolist() == [[2.0, -1.0, 0.0]]


def test_rmsnorm_divides_by_the_width_before_slicing():
    norm = RMSNorm(2, divisor=4, eps=0.0)
    x = torch.tensor([[3.0, 4.0]])  # sum of squares 25 over a width of 4: rms 2.5
    assert torch.allclose(norm(x), torch.tensor([[1.2, 1.6]]))


def test_kept_size_rounds_and_refuses_a_slice_that_keeps_nothing_or_everything():
    assert SliceGPTConfig(slice=0.25).kept_size(576) == 432
    assert SliceGPTConfig(slice=0.3).kept_size(576) == 400  # 403.2 -> nearest multiple of 8
    with pytest.raises(PrunekitError, match="keeps 64"):
        SliceGPTConfig(slice=0.01).kept_size(64)
    for bad in (dict(slice=0.0), dict(slice=1.0), dict(round_to=0), dict(orientation="sideways")):
        with pytest.raises(PrunekitError):
            SliceGPTConfig(**bad)


# -- invariance ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["opt", "gpt2"])
def test_layernorm_to_rmsnorm_conversion_alone_is_exact(family):
    model = tiny_model(family)
    before = logits(model)
    make_invariant(model)
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    assert (logits(model) - before).abs().max() < 1e-5


@pytest.mark.parametrize("family", INVARIANT)
def test_rotation_without_slicing_keeps_the_logits(family):
    model = tiny_model(family)
    before = logits(model)
    width = get_adapter(model).embeddings()[0].weight.shape[1]
    rotate_and_slice(model, calibration().tokens, width, SliceGPTConfig(), ENGINE)
    assert hasattr(get_adapter(model).blocks()[0], "attn_shortcut")
    assert (logits(model) - before).abs().max() < 1e-4


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "phi3"])
def test_slicing_a_stream_of_lower_rank_loses_nothing(family):
    """Everything the model writes lies in 40 of 64 dimensions: PCA must find them, sequentially, block by
    block, and the model sliced to 40 must compute what the full one does (rotations, shortcuts, norms)."""
    model = tiny_model(family)
    low_rank_stream(model, 40)
    before = logits(model)
    rotate_and_slice(model, calibration().tokens, 40, SliceGPTConfig(), ENGINE)
    assert get_adapter(model).embeddings()[0].weight.shape[1] == 40
    assert (logits(model) - before).abs().max() < 1e-4


def test_random_orientation_turns_the_kept_subspace_but_keeps_the_function():
    model = tiny_model("llama")
    low_rank_stream(model, 40)
    before = logits(model)
    rotate_and_slice(model, calibration().tokens, 40, SliceGPTConfig(orientation="random"), ENGINE)
    assert (logits(model) - before).abs().max() < 1e-4


def test_slicing_real_energy_costs_quality_in_order():
    model = tiny_model("llama")
    before = logits(model)
    errors = []
    for size in (56, 40, 24):
        sliced = copy.deepcopy(model)
        rotate_and_slice(sliced, calibration().tokens, size, SliceGPTConfig(), ENGINE)
        errors.append((logits(sliced) - before).abs().mean().item())
    assert 0 < errors[0] < errors[1] < errors[2]


# -- the method, saving, loading ---------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "phi3"])
def test_sliced_model_saves_reloads_and_generates_with_prunekit_only(family, tmp_path):
    model = tiny_model(family)
    result = prune(model, SliceGPTConfig(slice=0.25), calibration(), ENGINE)
    assert result.outside_blocks["hidden_size"] == {"before": 64, "after": 48}
    assert [b["block"] for b in result.engine.blocks] == [0, 1, "head"]
    assert all(0 < share <= 1 for b in result.engine.blocks for share in b["kept_energy"].values())
    out = save_pruned(model, tiny_tokenizer(), tmp_path / "sliced", {"method": "slicegpt"})
    loaded, _ = load(out)
    assert torch.equal(logits(loaded), logits(model))
    prompt = tokens(1, 4, seed=2)
    greedy = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(loaded.generate(prompt, **greedy), model.generate(prompt, **greedy))
    assert parameter_counts(loaded) == parameter_counts(model)
    with pytest.raises((RuntimeError, ValueError), match="mismatch"):
        AutoModelForCausalLM.from_pretrained(out)  # the config keeps the original width: never a silent misload


def test_sliced_model_survives_a_deep_copy():
    model = tiny_model("llama")
    prune(model, SliceGPTConfig(slice=0.25), calibration(), ENGINE)
    assert torch.equal(logits(copy.deepcopy(model)), logits(model))


def test_slicing_shrinks_the_blocks_but_the_shortcuts_and_the_untied_head_cost_parameters():
    model = tiny_model("llama")  # tied embeddings, hidden 64
    dense = parameter_counts(model)
    prune(model, SliceGPTConfig(slice=0.5), calibration(), ENGINE)
    sliced = parameter_counts(model)
    shortcuts = sum(p.numel() for n, p in model.named_parameters() if "shortcut" in n)
    assert shortcuts == 2 * 2 * 32 * 32
    assert sliced["non_embedding"] < dense["non_embedding"]
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_refusals_are_clear():
    with pytest.raises(PrunekitError, match="Gemma 3 normalises each sub-layer's output"):
        prune(tiny_model("gemma3"), SliceGPTConfig(), calibration(), ENGINE)
    with pytest.raises(PrunekitError, match="needs calibration"):
        prune(tiny_model("llama"), SliceGPTConfig())


def test_cli_slices_and_the_result_evaluates(tmp_path):
    folder = tmp_path / "tiny"
    save_tiny(folder, "llama")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SAMPLE_TEXT)
    out = tmp_path / "sliced"
    common = ["prune", "--model", str(folder), "--method", "slicegpt", "--device", "cpu", "--calib", str(corpus)]
    result = run(*common, "--slice", "0.25", "--nsamples", "8", "--seqlen", "16", "--out", str(out))
    assert result.returncode == 0, result.stderr
    evaluated = run("eval", "ppl", "--model", str(out), "--data", str(corpus), "--seqlen", "16")
    assert evaluated.returncode == 0, evaluated.stderr
    assert "--slice must be a fraction" in error_line(run(*common, "--slice", "1.5", "--out", str(tmp_path / "x")))
    assert "--slice does not apply to --method wanda" in error_line(
        run("prune", "--model", str(folder), "--method", "wanda", "--slice", "0.2", "--out", str(tmp_path / "y"))
    )


def test_lora_on_a_sliced_model_keeps_the_shortcuts_and_merges_to_the_same_logits(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama")
    prune(model, SliceGPTConfig(slice=0.25), calibration(), ENGINE)
    loaded, _ = load(save_pruned(model, tiny_tokenizer(), tmp_path / "sliced", {"method": "slicegpt"}))
    expected = logits(loaded)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = get_peft_model(loaded, LoraConfig(target_modules=targets, r=4))
    assert lora.base_model.model.model.layers[0].self_attn.o_proj.lora_B["default"].out_features == 48
    assert torch.allclose(logits(lora), expected, atol=1e-6)  # B starts at zero: still the sliced model
    lora.train()
    lora(tokens(2, 16), labels=tokens(2, 16)).loss.backward()
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn_like(param) * 0.05)
    lora.eval()
    adapted = logits(lora)
    assert (adapted - expected).abs().max() > 1e-3
    merged = lora.merge_and_unload()
    assert torch.allclose(logits(merged), adapted, atol=1e-5)


def test_depth_pruning_a_sliced_model_is_refused():
    from prunekit.methods import DepthConfig

    model = tiny_model("llama")
    prune(model, SliceGPTConfig(slice=0.25), calibration(), ENGINE)
    with pytest.raises(PrunekitError, match="depth-prune first, then slice"):
        prune(model, DepthConfig(criterion="magnitude", remove=1), engine=ENGINE)


# -- resume ----------------------------------------------------------------------------------------


def _interrupted(model, config, engine, where: str) -> None:
    """Prune with SliceGPT and raise KeyboardInterrupt at block 1 or in ``finish`` (after the last block)."""
    from prunekit.methods import METHODS

    original = METHODS[SliceGPTConfig]

    def crash(*args):
        raise KeyboardInterrupt

    def block(plan, step):
        return crash() if step.index == 1 else original.block(plan, step)

    METHODS[SliceGPTConfig] = (
        dataclasses.replace(original, block=block) if where == "block" else dataclasses.replace(original, finish=crash)
    )
    try:
        with pytest.raises(KeyboardInterrupt):
            prune(model, config, calibration(), engine)
    finally:
        METHODS[SliceGPTConfig] = original


@pytest.mark.parametrize(("family", "orientation", "where", "resumed"), [
    ("llama", "pca", "block", 1), ("opt", "random", "block", 1), ("gpt2", "pca", "finish", 2),
])  # fmt: skip
def test_slicegpt_resumes_after_an_interruption_as_an_unbroken_run(family, orientation, where, resumed, tmp_path):
    config = SliceGPTConfig(slice=0.25, orientation=orientation)
    reference = tiny_model(family)
    expected = prune(reference, config, calibration(), ENGINE)
    engine = EngineConfig(progress=False, checkpoint_dir=tmp_path / "ckpt")
    _interrupted(tiny_model(family), config, engine, where)
    saved = load_file(tmp_path / "ckpt" / "block_00000.safetensors")
    assert {n.rsplit(".", 2)[-2] for n in saved} >= {"attn_shortcut", "mlp_shortcut"}  # restore must attach them
    model = tiny_model(family)  # a new process: the weights in memory are the original ones
    result = prune(model, config, calibration(), engine)
    assert result.engine.resumed_from == resumed
    assert result.engine.blocks == expected.engine.blocks and result.outside_blocks == expected.outside_blocks
    assert list(model.state_dict()) == list(reference.state_dict())
    for (name, a), b in zip(reference.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(logits(model), logits(reference))


def test_slicegpt_refuses_lazy_loading_and_dense_propagation(tmp_path):
    save_tiny(tmp_path / "src", "llama")
    lazy, _ = load(tmp_path / "src", lazy=True)
    engine = EngineConfig(progress=False, checkpoint_dir=tmp_path / "ckpt")
    with pytest.raises(PrunekitError, match="folds the norms into every block .* without --lazy"):
        prune(lazy, SliceGPTConfig(), calibration(), engine)
    with pytest.raises(PrunekitError, match="drop --propagate"):
        prune(tiny_model("llama"), SliceGPTConfig(), calibration(), EngineConfig(propagate="dense", progress=False))

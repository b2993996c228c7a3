"""Hidden-size pruning (Minitron): importance by hand, the surgery equals masking the same channels (every
RMSNorm family, with an epsilon large enough to matter), the config reloads in plain transformers, the CLI."""

import copy
import dataclasses
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from prunekit import load
from prunekit.data import Calibration
from prunekit.errors import PrunekitError
from prunekit.methods import HiddenConfig, prune, study_variants
from prunekit.methods.hidden import ChannelActivity, channel_params, most_important
from prunekit.models import get_adapter, linear_weight, parameter_counts
from prunekit.sequential import EngineConfig
from prunekit.surgery import channels
from prunekit.surgery.channels import remove_hidden_channels, rms_correction
from prunekit.surgery.hidden import stream
from test_cli import error_line, run
from tiny_models import CONFIGS, SAMPLE_TEXT, save_tiny, tiny_model, tokens

RMS_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3"]  # tied; GQA; GQA; q/k norms; fused; Gemma
ENGINE = EngineConfig(progress=False)
KEEP = torch.randperm(64, generator=torch.Generator().manual_seed(1))[:40]  # scattered, not a leading slice


def logits(model, ids=None):
    with torch.no_grad():
        return model(tokens(2, 16, seed=1) if ids is None else ids).logits


def calibration(n=6) -> Calibration:
    return Calibration(tokens(n, 16), "random", "", 0)


def model_with_eps(family: str, eps: float = 0.05):
    """A tiny model whose norms' epsilon is large next to its activations, so a wrong epsilon shows."""
    config = CONFIGS[family]()
    config.rms_norm_eps = eps
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def masked(model, keep):
    """A copy of ``model`` with the other channels zeroed where the stream is written (embeddings, o, down)."""
    copy_ = copy.deepcopy(model)
    drop = torch.ones(copy_.config.hidden_size, dtype=torch.bool)
    drop[keep] = False
    parts = stream(copy_)
    with torch.no_grad():
        for embedding in parts.embeddings:
            embedding.weight[:, drop] = 0
        for linear in parts.writers:
            linear_weight(linear)[drop] = 0
            if linear.bias is not None:
                linear.bias[drop] = 0
    return copy_


# -- the math, by hand -------------------------------------------------------------------------------


def test_channel_activity_is_the_mean_over_tokens_then_l2_over_samples():
    y = torch.tensor([[[1.0, -2.0, 0.0], [3.0, 0.0, 0.0]], [[0.0, 4.0, 1.0], [0.0, -4.0, 1.0]]])
    # mean |y| per sample: [2, 1, 0] and [0, 4, 1]; L2 over the two samples: [2, sqrt(17), 1]
    whole, split = ChannelActivity(3), ChannelActivity(3)
    whole.update(y)
    split.update(y[:1])
    split.update(y[1:])  # the engine's batch size must not matter
    expected = torch.tensor([2.0, math.sqrt(17), 1.0], dtype=torch.float64)
    assert torch.allclose(whole.importance(), expected) and torch.allclose(split.importance(), expected)
    assert most_important(whole.importance(), 2).tolist() == [0, 1]
    assert most_important(torch.ones(4), 2).tolist() == [0, 1]  # ties: the lower index stays


def test_rms_correction_makes_the_narrow_norm_equal_the_masked_wide_one():
    gain, eps_factor = rms_correction(4, 2)
    assert (gain, eps_factor) == (math.sqrt(2), 2.0)
    wide, narrow = LlamaRMSNorm(4, eps=0.75), LlamaRMSNorm(2, eps=0.75 * eps_factor)
    with torch.no_grad():
        wide.weight.copy_(torch.tensor([0.5, 2.0, 7.0, 9.0]))
        narrow.weight.copy_(wide.weight[:2] * gain)
    # by hand: sum of squares 25 over 4 channels, eps 0.75: y = w x / sqrt(7)
    expected = torch.tensor([[1.5, 8.0]]) / math.sqrt(7)
    assert torch.allclose(wide(torch.tensor([[3.0, 4.0, 0.0, 0.0]]))[:, :2], expected)
    assert torch.allclose(narrow(torch.tensor([[3.0, 4.0]])), expected)


def test_kept_channels_round_to_the_target():
    assert HiddenConfig(ratio=0.1, round_to=32).kept_channels(576, 1, 1) == 512  # 518.4 -> nearest multiple of 32
    assert HiddenConfig(ratio=0.2, round_to=32).kept_channels(576, 1, 1) == 448  # 460.8
    assert HiddenConfig(ratio=0.2).kept_channels(576, 1, 1) == 464  # --round-to 8 by default
    assert HiddenConfig(hidden_size=320).kept_channels(576, 1, 1) == 320
    # 1000 parameters per channel, 576k in all: removing 20% is 115.2 channels -> 460.8 kept -> 448
    assert HiddenConfig(target_params=0.2, round_to=32).kept_channels(576, 1000, 576_000) == 448
    # other parameters (reader biases, q/k norms) count in the total: 30% of 600k is 180 channels -> 396 -> 384
    assert HiddenConfig(target_params=0.3, round_to=32).kept_channels(576, 1000, 600_000) == 384


def test_kept_channels_are_the_nearest_width_the_config_can_describe():
    """Llama's config wants hidden_size a multiple of the head count: SmolLM2's 9 heads and --round-to 8 leave
    multiples of 72."""
    nine = lambda kept: None if kept % 9 == 0 else f"{kept} is not a multiple of 9"  # noqa: E731
    assert HiddenConfig(ratio=0.1).kept_channels(576, 1, 1, nine) == 504  # 518.4: 504 nearer than 576
    assert HiddenConfig(ratio=0.2).kept_channels(576, 1, 1, nine) == 432  # 460.8: 432 nearer than 504
    assert HiddenConfig(ratio=0.4).kept_channels(576, 1, 1, nine) == 360  # 345.6
    with pytest.raises(PrunekitError) as caught:
        HiddenConfig(hidden_size=512).kept_channels(576, 1, 1, nine)
    assert str(caught.value) == (
        "--hidden-size 512: the config cannot say 512 hidden channels (512 is not a multiple of 9); of the "
        "multiples of --round-to 8, the nearest it takes is 504 (a smaller --round-to allows more)"
    )
    with pytest.raises(PrunekitError, match="it takes none of them"):
        HiddenConfig(ratio=0.2, round_to=32).kept_channels(576, 1, 1, lambda kept: "no")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "exactly one of --ratio, --target-params or --hidden-size"),
        ({"ratio": 0.2, "target_params": 0.2}, "exactly one of"),
        ({"ratio": 1.5}, "--ratio must be a fraction in (0, 1), got 1.5"),
        ({"ratio": 0.0}, "--ratio must be a fraction in (0, 1)"),
        ({"target_params": -0.1}, "--target-params must be a fraction in (0, 1)"),
        ({"hidden_size": 500}, "--hidden-size must be a positive multiple of --round-to 8, got 500"),
        ({"ratio": 0.2, "round_to": 0}, "--round-to must be at least 1"),
    ],
)
def test_bad_settings_are_one_line_errors(options, message):
    with pytest.raises(PrunekitError, match="^[^\n]*$") as caught:
        HiddenConfig(**options)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ratio": 0.8}, "--ratio 0.8 would keep 112 of the 576 hidden channels, under a quarter"),
        ({"ratio": 0.99, "round_to": 32}, "--ratio 0.99 keeps 0 of the 576 hidden channels"),
        ({"ratio": 0.01, "round_to": 32}, "keeps 576 of the 576 hidden channels (a multiple of --round-to 32); choose "
                                          "a target that keeps between 32 and 544"),
        ({"hidden_size": 640}, "--hidden-size 640 keeps 640 of the 576"),
    ],
)  # fmt: skip
def test_targets_that_keep_too_little_or_everything_are_refused(options, message):
    with pytest.raises(PrunekitError) as caught:
        HiddenConfig(**options).kept_channels(576, 1, 1)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert HiddenConfig(ratio=0.8, force=True).kept_channels(576, 1, 1) == 112


# -- the surgery is the masked model -----------------------------------------------------------------


@pytest.mark.parametrize("family", RMS_FAMILIES)
def test_removing_channels_equals_masking_them(family):
    model = model_with_eps(family)
    expected = logits(masked(model, KEEP))
    assert (logits(model) - expected).abs().max() > 1e-2  # masking does change the model
    remove_hidden_channels(model, KEEP)
    assert model.config.hidden_size == 40 and model.config.rms_norm_eps == pytest.approx(0.05 * 64 / 40)
    assert model.get_input_embeddings().weight.shape[1] == 40
    assert torch.allclose(logits(model), expected, atol=1e-6, rtol=1e-5)


def test_without_the_epsilon_correction_the_surgery_would_not_be_exact(monkeypatch):
    model = model_with_eps("llama")
    expected = logits(masked(model, KEEP))
    monkeypatch.setattr(channels, "rms_correction", lambda width, kept: (math.sqrt(width / kept), 1.0))
    remove_hidden_channels(model, KEEP)
    assert (logits(model) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("family", RMS_FAMILIES)
def test_the_pruned_model_reloads_in_plain_transformers(family, tmp_path):
    model = model_with_eps(family)
    tied = model.config.tie_word_embeddings
    remove_hidden_channels(model, KEEP)
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied  # tied stays tied
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.hidden_size == 40 and reloaded.config.head_dim == 16  # not 40 // 4
    assert torch.equal(logits(reloaded), logits(model))
    greedy = dict(max_new_tokens=5, do_sample=False)
    prompt = tokens(1, 4, seed=2)
    assert torch.equal(reloaded.generate(prompt, **greedy), model.generate(prompt, **greedy))


@pytest.mark.parametrize("family", ["qwen2", "phi3"])
def test_head_dim_is_written_where_the_config_derived_it(family):
    """hidden 64, 4 heads: these configs derive head_dim 16 from hidden_size // heads; 40 // 4 would be 10."""
    model = tiny_model(family)
    assert "head_dim" not in model.config.to_dict()
    remove_hidden_channels(model, KEEP)
    assert json.loads(model.config.to_json_string())["head_dim"] == 16


def test_a_width_the_config_refuses_is_refused_before_anything_is_cut():
    model = tiny_model("llama")  # 4 heads: LlamaConfig wants hidden_size a multiple of 4, head_dim explicit or not
    expected = logits(model)
    message = r"hidden size of 42: LlamaConfig refuses it: The hidden size \(42\) is not a multiple of .* heads \(4\)"
    with pytest.raises(PrunekitError, match=message):
        remove_hidden_channels(model, torch.arange(42))
    assert torch.equal(logits(model), expected)
    with pytest.raises(PrunekitError, match="--hidden-size 42: the config cannot .* the nearest it takes is 44"):
        prune(model, HiddenConfig(hidden_size=42, round_to=2), calibration(), ENGINE)


def test_layernorm_and_sliced_models_are_refused():
    for family in ("opt", "gpt2"):
        with pytest.raises(PrunekitError, match="LayerNorms subtract the mean over all channels"):
            prune(tiny_model(family), HiddenConfig(ratio=0.25), calibration(), ENGINE)
    from prunekit.methods import SliceGPTConfig

    sliced = tiny_model("llama")
    prune(sliced, SliceGPTConfig(slice=0.25), calibration(), ENGINE)
    with pytest.raises(PrunekitError, match="rotated and sliced by SliceGPT"):
        prune(sliced, HiddenConfig(ratio=0.25), calibration(), ENGINE)


# -- the method ------------------------------------------------------------------------------------


def direct_importance(model, ids) -> torch.Tensor:
    """The importance from hooks on one ordinary forward of the whole model (no engine)."""
    adapter = get_adapter(model)
    norms = [adapter.block(i).norm_before(part) for i in range(adapter.num_blocks()) for part in ("attention", "mlp")]
    norms.append(adapter.final_norm())
    activity = [ChannelActivity(64) for _ in norms]
    handles = [n.register_forward_hook(lambda m, a, y, s=s: s.update(y)) for n, s in zip(norms, activity, strict=True)]
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    return sum(a.importance() for a in activity)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_the_engine_measures_the_importance_a_plain_forward_gives_and_removes_the_least(family):
    model = tiny_model(family)
    if family == "gemma3":  # its MLP reads pre_feedforward; post_attention normalises what attention writes
        assert get_adapter(model).block(0).norm_before("mlp") is model.model.layers[0].pre_feedforward_layernorm
    calib = calibration()
    expected = direct_importance(model, calib.tokens)
    before = parameter_counts(model)
    per_channel = channel_params(model)
    result = prune(model, HiddenConfig(ratio=0.25), calib, EngineConfig(progress=False, batch_size=4))
    report = result.outside_blocks["hidden_size"]
    assert torch.allclose(torch.tensor(report["importance"], dtype=torch.float64), expected, rtol=1e-5)
    assert report["removed"] == sorted(torch.argsort(expected)[:16].tolist())
    assert (report["before"], report["after"], model.config.hidden_size) == (64, 48, 48)
    after = parameter_counts(model)
    assert before["non_embedding"] - after["non_embedding"] == 16 * per_channel


def test_target_params_removes_that_share_of_the_non_embedding_parameters():
    model = tiny_model("qwen2")  # q/k/v biases: parameters that do not scale with the width
    before = parameter_counts(model)["non_embedding"]
    prune(model, HiddenConfig(target_params=0.25), calibration(), ENGINE)
    removed = 1 - parameter_counts(model)["non_embedding"] / before
    assert model.config.hidden_size == 48 and removed == pytest.approx(0.25, abs=0.01)
    assert "hidden" in study_variants() and study_variants()["hidden"](0.2) == HiddenConfig(target_params=0.2)


def test_an_interrupted_run_resumes_to_the_same_model(tmp_path):
    from prunekit.methods import METHODS

    config = HiddenConfig(ratio=0.25)
    reference = tiny_model("llama")
    expected = prune(reference, config, calibration(), ENGINE)
    engine = EngineConfig(progress=False, checkpoint_dir=tmp_path / "ckpt")
    original = METHODS[HiddenConfig]

    def block(plan, step):
        if step.index == 1:
            raise KeyboardInterrupt
        return original.block(plan, step)

    METHODS[HiddenConfig] = dataclasses.replace(original, block=block)
    try:
        with pytest.raises(KeyboardInterrupt):
            prune(tiny_model("llama"), config, calibration(), engine)
    finally:
        METHODS[HiddenConfig] = original
    model = tiny_model("llama")
    result = prune(model, config, calibration(), engine)
    assert result.engine.resumed_from == 1
    assert result.outside_blocks == expected.outside_blocks
    assert torch.equal(logits(model), logits(reference))


def test_a_model_with_per_block_widths_keeps_its_shape_manifest_after_the_cut(tmp_path):
    """Width pruning with global allocation leaves blocks of different widths (a shape manifest); the hidden cut
    goes through every block alike and prunekit.load rebuilds the result."""
    from prunekit import save_pruned
    from prunekit.methods import WidthConfig
    from tiny_models import tiny_tokenizer

    model = tiny_model("llama")
    prune(model, WidthConfig(target_params=0.3, allocation="global", prune_heads=True), calibration(), ENGINE)
    widths = [linear_weight(layer.mlp.down_proj).shape[1] for layer in model.model.layers]
    assert len(set(widths)) > 1
    prune(model, HiddenConfig(ratio=0.25), calibration(), ENGINE)
    out = save_pruned(model, tiny_tokenizer(), tmp_path / "wh", {"method": "hidden"})
    loaded, _ = load(out)
    assert loaded.config.hidden_size == 48
    assert [linear_weight(layer.mlp.down_proj).shape[1] for layer in loaded.model.layers] == widths
    assert torch.equal(logits(loaded), logits(model))


def test_lazy_loading_is_refused(tmp_path):
    save_tiny(tmp_path / "src", "llama")
    lazy, _ = load(tmp_path / "src", lazy=True)
    engine = EngineConfig(progress=False, checkpoint_dir=tmp_path / "ckpt")
    with pytest.raises(PrunekitError, match="load without --lazy"):
        prune(lazy, HiddenConfig(ratio=0.25), calibration(), engine)


# -- the command line --------------------------------------------------------------------------------


def test_cli_prunes_and_both_prunekit_and_transformers_load_the_result(tmp_path):
    folder = tmp_path / "tiny"
    save_tiny(folder, "llama")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SAMPLE_TEXT)
    out = tmp_path / "h"
    common = ["prune", "--model", str(folder), "--method", "hidden", "--device", "cpu", "--calib", str(corpus)]
    result = run(*common, "--ratio", "0.25", "--nsamples", "4", "--seqlen", "16", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "hidden size  64 -> 48" in result.stdout
    manifest = json.loads((out / "prunekit.json").read_text())
    assert "shapes" not in manifest and manifest["metrics"]["hidden_size"]["after"] == 48
    assert len(manifest["metrics"]["hidden_size"]["importance"]) == 64
    ours, _ = load(out)
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    assert theirs.config.hidden_size == 48
    assert torch.equal(logits(ours), logits(theirs))
    assert "--ratio does not apply to --method width" in error_line(
        run("prune", "--model", str(folder), "--method", "width", "--ratio", "0.2", "--out", str(tmp_path / "x"))
    )  # the one-line errors of bad targets: test_cli's BAD_INPUTS

"""Depth pruning: block removal is the model with that block as the identity, the saved folder is a
standard one that generates the same tokens, sub-layer removal round-trips through prunekit.load and
is refused by a plain from_pretrained, and every criterion finds a block that does nothing."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from prunekit import load, save_pruned
from prunekit.data import Calibration
from prunekit.errors import PrunekitError
from prunekit.methods import DepthConfig, MagnitudeConfig, prune
from prunekit.methods.depth_scores import CRITERIA
from prunekit.models import get_adapter, linear_weight, parameter_counts
from prunekit.sequential import EngineConfig
from prunekit.surgery.depth import RemovedAttention, remove_blocks, remove_sublayer
from prunekit.surgery.linear import SurgeryError
from tiny_models import CONFIGS, FAMILIES, SAMPLE_TEXT, save_tiny, tiny_model, tiny_tokenizer, tokens

PROMPT = tokens(1, 12, seed=3)  # prompt + new tokens run past the sliding window (8) of Mistral and Gemma 3


def deep_model(family: str, layers: int = 4, scale: float = 4.0, config=None):
    """A tiny model with ``layers`` blocks whose linears are ``scale`` times larger, so each block matters."""
    torch.manual_seed(0)
    config = config or CONFIGS[family]()
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = (config.layer_types * layers)[:layers]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        adapter = get_adapter(model)
        for i in range(layers):
            for linear in adapter.block(i).linears().values():
                linear_weight(linear).mul_(scale)
    return model


def silence(model, block: int, parts=("attention", "mlp")) -> None:
    """Zero the output projections of ``parts`` of ``block``: those sub-layers then add nothing."""
    view = get_adapter(model).block(block)
    with torch.no_grad():
        for part in parts:
            linear = view.attention.o if part == "attention" else view.mlp.down
            linear.weight.zero_()
            if getattr(linear, "bias", None) is not None:
                linear.bias.zero_()


def as_identity(model, block: int):
    """A copy of ``model`` whose block ``block`` returns its input (its own computation is discarded)."""
    twin = copy.deepcopy(model)
    target = get_adapter(twin).blocks()[block]
    target.register_forward_hook(lambda module, args, kwargs, out: args[0], with_kwargs=True)
    return twin


def greedy(model, prompt=PROMPT, new=12):
    return model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)


@torch.no_grad()
def logits(model, ids=None):
    return model(input_ids=tokens(2, 20) if ids is None else ids).logits


@torch.no_grad()
def self_sampled(model, n: int = 16, seqlen: int = 32) -> Calibration:
    """Calibration text sampled from the model itself: leaving out a block that does nothing changes its
    expected loss least (the loss on the model's own samples is its entropy plus a KL that only grows)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (n, 1), generator=generator)
    for _ in range(seqlen - 1):
        probs = model(input_ids=ids).logits[:, -1].softmax(-1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return Calibration(ids, "self-sampled", "", 1)


# -- block removal ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_a_block_is_that_block_as_identity_and_saves_a_standard_folder(family, tmp_path):
    model = tiny_model(family)
    k = 1 if family == "gemma3" else 0  # Gemma 3: a sliding block goes, the sliding/full pattern must follow
    reference = as_identity(model, k)
    want_logits, want_tokens = logits(reference), greedy(reference)

    remove_blocks(model, [k])
    assert model.config.num_hidden_layers == CONFIGS[family]().num_hidden_layers - 1
    assert torch.equal(logits(model), want_logits)
    assert torch.equal(greedy(model), want_tokens)  # the KV cache is indexed by the renumbered layer_idx

    save_pruned(model, tiny_tokenizer(), tmp_path / "out", {"method": "depth"})
    assert "shapes" not in json.loads((tmp_path / "out" / "prunekit.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.equal(greedy(plain), want_tokens)
    torch.testing.assert_close(logits(plain), want_logits)


def test_per_layer_config_lists_follow_the_blocks(tmp_path):
    gemma = deep_model("gemma3", layers=4)  # layer_types sliding, sliding, full, sliding
    remove_blocks(gemma, [0, 2])
    assert gemma.config.layer_types == ["sliding_attention", "sliding_attention"]

    sliding = {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2, "num_hidden_layers": 4}
    qwen = deep_model("qwen2", config=Qwen2Config(**{**CONFIGS["qwen2"]().to_dict(), **sliding, "layer_types": None}))
    assert qwen.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    reference = as_identity(qwen, 1)
    remove_blocks(qwen, [1])
    assert qwen.config.max_window_layers == 1
    assert qwen.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert torch.equal(greedy(qwen, new=16), greedy(reference, new=16))
    qwen.save_pretrained(tmp_path / "q")
    assert torch.equal(greedy(AutoModelForCausalLM.from_pretrained(tmp_path / "q"), new=16), greedy(reference, new=16))


def test_block_removal_refuses_what_it_cannot_express():
    model = tiny_model("llama")
    with pytest.raises(SurgeryError, match="cannot remove all 2 blocks"):
        remove_blocks(model, [0, 1])
    with pytest.raises(SurgeryError, match=r"must lie in \[0, 2\)"):
        remove_blocks(model, [2])
    gpt2 = AutoModelForCausalLM.from_config(
        type(CONFIGS["gpt2"]())(**{**CONFIGS["gpt2"]().to_dict(), "scale_attn_by_inverse_layer_idx": True})
    )
    with pytest.raises(SurgeryError, match="scale_attn_by_inverse_layer_idx"):
        remove_blocks(gpt2, [0])
    assert gpt2.config.num_hidden_layers == 2 and len(get_adapter(gpt2).blocks()) == 2


# -- sub-layer removal -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_removed_sublayers_add_nothing_and_reload_with_prunekit_only(family, tmp_path):
    model = tiny_model(family)
    reference = copy.deepcopy(model)
    silence(reference, 0, ["attention"])  # layer 0: generation reads the sequence length from its cache
    silence(reference, 1, ["mlp"])
    adapter = get_adapter(model)
    before = parameter_counts(model)["non_embedding"]
    first, second = adapter.block(0), adapter.block(1)
    remove_sublayer(first, "attention")
    remove_sublayer(second, "mlp")
    assert parameter_counts(model)["non_embedding"] < before
    assert torch.equal(logits(model), logits(reference))
    assert torch.equal(greedy(model), greedy(reference))

    out = tmp_path / "out"
    save_pruned(model, tiny_tokenizer(), out, {"method": "depth"})
    blocks = json.loads((out / "prunekit.json").read_text())["shapes"]["blocks"]
    assert blocks[0]["attention"] is False and blocks[1]["mlp"] is False and "mlp" not in blocks[0]
    loaded, _ = load(out)
    assert torch.equal(greedy(loaded), greedy(reference))
    torch.testing.assert_close(logits(loaded), logits(reference))
    with pytest.raises(RuntimeError, match="mismatched"):  # never silently random sub-layers
        AutoModelForCausalLM.from_pretrained(out)


def test_sublayer_removal_survives_the_compact_format(tmp_path):
    model = tiny_model("llama")
    remove_sublayer(get_adapter(model).block(1), "attention")
    save_pruned(model, tiny_tokenizer(), tmp_path / "c", {"method": "depth"}, fmt="compact")
    loaded, _ = load(tmp_path / "c")
    assert torch.equal(logits(loaded), logits(model))


# -- criteria --------------------------------------------------------------------------------------


@pytest.mark.parametrize("criterion", list(CRITERIA))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_criterion_ranks_an_identity_block_first(family, criterion):
    model = deep_model(family)
    silence(model, 1)  # block 1 is now the identity
    calibration = self_sampled(model)
    config = DepthConfig(criterion=criterion, remove=1, protect_first=0, protect_last=0)
    result = prune(model, config, calibration)
    ranking = result.outside_blocks["ranking"]
    assert ranking["order"][0]["block"] == 1, ranking["order"]
    assert [b["block"] for b in result.engine.blocks] == [1]
    assert model.config.num_hidden_layers == 3


@pytest.mark.parametrize("criterion", ["ppl", "taylor", "block-influence", "angular"])
def test_iterative_removal_starts_with_the_identity_block_and_rescoring_changes_nothing_removed(criterion):
    model = deep_model("llama", layers=5)
    silence(model, 2)
    config = DepthConfig(criterion=criterion, remove=2, iterative=True, protect_first=0, protect_last=0)
    result = prune(model, config, self_sampled(model))
    order = result.outside_blocks["ranking"]["order"]
    assert len(order) == 2 and order[0]["block"] == 2 and order[1]["block"] != 2
    assert sorted(b["block"] for b in result.engine.blocks) == sorted(u["block"] for u in order)
    assert model.config.num_hidden_layers == 3


@pytest.mark.parametrize("criterion", list(CRITERIA))
def test_sublayer_ranking_finds_a_silent_attention(criterion):
    model = deep_model("llama")
    silence(model, 1, ["attention"])
    reference = copy.deepcopy(model)
    config = DepthConfig(criterion=criterion, remove=1, unit="sublayer", protect_first=0, protect_last=0)
    result = prune(model, config, self_sampled(model))
    assert result.engine.blocks[0]["block"] == 1 and result.engine.blocks[0]["removed"] == "attention"
    assert torch.equal(logits(model), logits(reference))


def test_angular_one_shot_removes_the_best_contiguous_run():
    model = deep_model("llama", layers=6)
    silence(model, 2)
    silence(model, 3)
    result = prune(model, DepthConfig(criterion="angular", remove=2), self_sampled(model))
    runs = result.outside_blocks["ranking"]["runs"]
    assert runs[1]["blocks"] == 2 and runs[1]["start"] == 2 and runs[1]["score"] == pytest.approx(0, abs=1e-6)
    assert sorted(b["block"] for b in result.engine.blocks) == [2, 3]


def test_taylor_plus_protects_the_first_four_and_last_two_blocks():
    model = deep_model("llama", layers=8)
    silence(model, 1)  # the identity block is protected, so it stays
    result = prune(model, DepthConfig(criterion="taylor", remove=2), self_sampled(model))
    ranked = {u["block"] for u in result.outside_blocks["ranking"]["order"]}
    assert ranked == {4, 5} and len(get_adapter(model).blocks()) == 6


# -- counts, targets, rankings ---------------------------------------------------------------------


def test_target_params_becomes_a_block_count():
    model = deep_model("llama", layers=4)
    before = parameter_counts(model)["non_embedding"]
    prune(model, DepthConfig(criterion="magnitude", target_params=0.5))
    assert model.config.num_hidden_layers == 2
    assert parameter_counts(model)["non_embedding"] == pytest.approx(before / 2, rel=0.01)


def test_sublayers_by_target_count_their_own_size():
    model = deep_model("llama", layers=4)
    view = get_adapter(model).block(0)
    attention = sum(p.numel() for p in view.module.self_attn.parameters())
    total = parameter_counts(model)["non_embedding"]
    prune(model, DepthConfig(criterion="magnitude", unit="attention", target_params=2.2 * attention / total))
    assert sum(isinstance(m, RemovedAttention) for m in model.modules()) == 2


def test_a_saved_ranking_prunes_at_another_count_without_scoring(tmp_path):
    model = deep_model("llama", layers=5)
    calibration = self_sampled(model)
    first = prune(copy.deepcopy(model), DepthConfig(criterion="ppl", remove=1), calibration)
    path = tmp_path / "prunekit.json"
    path.write_text(json.dumps({"metrics": {"ranking": first.outside_blocks["ranking"]}}))
    reused = prune(copy.deepcopy(model), DepthConfig(remove=3, ranking_from=str(path)))  # no calibration needed
    scored = prune(copy.deepcopy(model), DepthConfig(criterion="ppl", remove=3), calibration)
    assert reused.engine.blocks == scored.engine.blocks
    assert reused.config["criterion"] == "ppl"

    greedy_run = prune(copy.deepcopy(model), DepthConfig(criterion="ppl", remove=1, iterative=True), calibration)
    path.write_text(json.dumps({"metrics": {"ranking": greedy_run.outside_blocks["ranking"]}}))
    with pytest.raises(PrunekitError, match="holds 1 greedy removals"):
        prune(copy.deepcopy(model), DepthConfig(remove=2, ranking_from=str(path)))
    with pytest.raises(PrunekitError, match="--criterion taylor differs from the ranking's ppl"):
        DepthConfig(remove=1, criterion="taylor", ranking_from=str(path))
    with pytest.raises(PrunekitError, match="model of 5 blocks, this one has 2"):
        prune(tiny_model("llama"), DepthConfig(remove=1, ranking_from=str(path)))
    path.write_text("{}")
    with pytest.raises(PrunekitError, match="holds no depth ranking"):
        DepthConfig(remove=1, ranking_from=str(path))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"remove": 2}, "cannot remove all 2 blocks"),
        ({"remove": 1, "criterion": "taylor"}, "leave no block of 2 to remove"),  # Taylor+ protects 4 + 2
        ({"remove": 3, "unit": "sublayer", "protect_first": 1}, "only 2 sublayer units lie outside the protected"),
        ({"remove": 1, "criterion": "cosine"}, "--criterion must be one of"),
        ({"remove": 1, "unit": "head"}, "--unit must be one of"),
        ({"remove": 1, "criterion": "magnitude", "iterative": True}, "drop --iterative"),
        ({"remove": 1, "target_params": 0.2}, "exactly one of --remove"),
        ({}, "exactly one of --remove"),
        ({"remove": 0}, "--remove must be at least 1"),
        ({"target_params": 1.5}, r"--target-params must be in \(0, 1\)"),
        ({"remove": 1, "protect_last": -1}, "--protect-last must be at least 0"),
    ],
)
def test_bad_input_is_one_clear_error(options, message):
    with pytest.raises(PrunekitError, match=message):
        prune(tiny_model("llama"), DepthConfig(**options), Calibration(tokens(2, 16), "t", "", 0))


def test_removals_that_leave_a_husk_are_refused_unless_forced():
    """Under a quarter of the blocks (of 8: fewer than 2) is refused before any scoring; none of a kind, always."""
    model = deep_model("llama", layers=8)
    for options in ({"target_params": 0.99}, {"remove": 7}, {"remove": 7, "unit": "mlp"}):
        with pytest.raises(PrunekitError, match=r"would keep 1 of 8 .*fewer than a quarter \(2\).*--force"):
            prune(model, DepthConfig(criterion="magnitude", **options))
    assert model.config.num_hidden_layers == 8
    with pytest.raises(PrunekitError, match="would remove all 8 attention sub-layers"):
        prune(model, DepthConfig(criterion="magnitude", unit="attention", remove=8, force=True))
    prune(model, DepthConfig(criterion="magnitude", remove=6))  # 2 of 8 stay: allowed
    assert model.config.num_hidden_layers == 2
    forced = deep_model("llama", layers=8)
    prune(forced, DepthConfig(criterion="magnitude", target_params=0.99, force=True))
    assert forced.config.num_hidden_layers == 1


def test_a_model_without_sublayers_is_refused_by_the_per_block_methods():
    model = tiny_model("llama")
    remove_sublayer(get_adapter(model).block(0), "mlp")
    with pytest.raises(PrunekitError, match="lacks attention or MLP sub-layers"):
        prune(model, MagnitudeConfig(0.5))
    with pytest.raises(PrunekitError, match="already lacks sub-layers"):
        prune(model, DepthConfig(remove=1, criterion="magnitude"))


def test_needs_calibration_unless_data_free_or_reused():
    assert DepthConfig(remove=1).needs_calibration
    assert not DepthConfig(remove=1, criterion="magnitude").needs_calibration
    with pytest.raises(PrunekitError, match="needs calibration data"):
        prune(tiny_model("llama"), DepthConfig(remove=1))


# -- the command line ------------------------------------------------------------------------------


def cli(*args):
    return subprocess.run([sys.executable, "-m", "prunekit.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_depth_end_to_end(tmp_path):
    folder = tmp_path / "tiny"
    save_tiny(folder, "llama")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SAMPLE_TEXT)
    common = ["prune", "--model", str(folder), "--method", "depth", "--device", "cpu"]
    result = cli(*common, "--criterion", "ppl", "--remove", "1", "--calib", str(corpus), "--nsamples", "4",
                 "--seqlen", "16", "--out", str(tmp_path / "d1"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "ranking reusable" in result.stdout
    manifest = json.loads((tmp_path / "d1" / "prunekit.json").read_text())
    assert (
        manifest["metrics"]["ranking"]["criterion"] == "ppl" and manifest["metrics"]["blocks"][0]["removed"] == "block"
    )
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "d1").config.num_hidden_layers == 1

    ranking = str(tmp_path / "d1" / "prunekit.json")
    result = cli(*common, "--remove", "1", "--ranking-from", ranking, "--out", str(tmp_path / "d2"))
    assert result.returncode == 0, result.stderr  # no --calib: the ranking is reused
    assert (
        json.loads((tmp_path / "d2" / "prunekit.json").read_text())["metrics"]["blocks"]
        == manifest["metrics"]["blocks"]
    )

    result = cli(*common, "--criterion", "block-influence", "--unit", "attention", "--remove", "1", "--calib",
                 str(corpus), "--nsamples", "2", "--seqlen", "16", "--out", str(tmp_path / "d3"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    result = cli("eval", "ppl", "--model", str(tmp_path / "d3"), "--data", str(corpus), "--seqlen", "16")
    assert result.returncode == 0, result.stderr

    result = cli(*common, "--remove", "2", "--calib", str(corpus), "--nsamples", "2", "--seqlen", "16",
                 "--out", str(tmp_path / "d4"))  # fmt: skip
    assert result.returncode == 2 and "cannot remove all 2 blocks" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "d4").exists()


# -- resume ----------------------------------------------------------------------------------------


def crash_in_pass(monkeypatch, at_pass: int, at_block: int) -> None:
    """Raise KeyboardInterrupt when scoring pass ``at_pass`` reaches block ``at_block`` (an interrupted run)."""
    from prunekit.methods import depth_scores

    real, passes = depth_scores.run_sequential, []

    def run_sequential(model, process, *args, **kwargs):
        passes.append(len(passes))

        def crashing(step, here=passes[-1]):
            if (here, step.index) == (at_pass, at_block):
                raise KeyboardInterrupt
            return process(step)

        return real(model, crashing, *args, **kwargs)

    monkeypatch.setattr(depth_scores, "run_sequential", run_sequential)


@pytest.mark.parametrize(("criterion", "unit", "iterative", "at_pass", "at_block", "resumed"), [
    ("block-influence", "block", False, 0, 3, 3),
    ("angular", "block", False, 0, 2, 2),  # the states of every block boundary ride in the carry
    ("ppl", "sublayer", False, 0, 4, 4),
    ("ppl", "block", True, 1, 1, 5 + 1),  # the first greedy pass whole, the second up to block 1
    ("angular", "sublayer", True, 1, 2, 5 + 2),
])  # fmt: skip
def test_depth_scoring_resumes_after_an_interruption_as_an_unbroken_run(
    criterion, unit, iterative, at_pass, at_block, resumed, tmp_path, monkeypatch
):
    config = DepthConfig(criterion=criterion, unit=unit, remove=2, iterative=iterative, protect_first=0, protect_last=0)
    calibration = Calibration(tokens(4, 16), "random", "", 0)
    reference = deep_model("llama", layers=5)
    expected = prune(reference, config, calibration)
    engine = EngineConfig(progress=False, checkpoint_dir=tmp_path / "ckpt")
    crash_in_pass(monkeypatch, at_pass, at_block)
    with pytest.raises(KeyboardInterrupt):
        prune(deep_model("llama", layers=5), config, calibration, engine)
    monkeypatch.undo()
    model = deep_model("llama", layers=5)  # a new process: the weights in memory are the original ones
    result = prune(model, config, calibration, engine)
    assert result.engine.resumed_from == resumed
    assert result.engine.blocks == expected.engine.blocks
    result.outside_blocks["ranking"].pop("seconds"), expected.outside_blocks["ranking"].pop("seconds")
    assert result.outside_blocks == expected.outside_blocks
    for (name, a), b in zip(reference.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_depth_refuses_lazy_loading(tmp_path):
    save_tiny(tmp_path / "src", "llama")
    lazy, _ = load(tmp_path / "src", lazy=True)
    with pytest.raises(PrunekitError, match="renumbers the blocks a lazy model reads from disk"):
        prune(lazy, DepthConfig(remove=1), Calibration(tokens(2, 16), "random", "", 0))

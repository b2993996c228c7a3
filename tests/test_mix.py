"""The mix search: the solver's choice meets the budget and is optimal (against brute force), the
recorded errors are what the cut blocks compute, the costs are exact, a search runs end to end and saves a
folder prunekit reloads, and a second budget reuses the scores without a forward."""

import copy
import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from prunekit import load
from prunekit.data import Calibration
from prunekit.errors import PrunekitError
from prunekit.jobs import prune_job
from prunekit.methods import MixConfig, prune
from prunekit.methods.mix import apply_mix, read_scores
from prunekit.methods.mix_scores import Choice
from prunekit.methods.mix_solve import Limit, solve
from prunekit.models import get_adapter, linear_weight, parameter_counts
from prunekit.sequential import EngineConfig, call_block, capture
from prunekit.surgery.depth import RemovedAttention
from tiny_models import CONFIGS, SAMPLE_TEXT, tiny_tokenizer, tokens

ENGINE = EngineConfig(progress=False, batch_size=2)

# -- the solver ------------------------------------------------------------------------------------


def brute_force(damage, cost, budget, limits):
    best = None
    for pick in itertools.product(*[range(len(row)) for row in damage]):
        if sum(cost[b][c] for b, c in enumerate(pick)) < budget:
            continue
        if any(sum(lim.members[b][c] for b, c in enumerate(pick)) > lim.most for lim in limits):
            continue
        total = sum(damage[b][c] for b, c in enumerate(pick))
        best = total if best is None else min(best, total)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_the_solver_meets_the_budget_with_the_least_damage_brute_force_finds(seed):
    rng = np.random.default_rng(seed)
    blocks, choices = 5, [1 + int(n) for n in rng.integers(2, 5, size=5)]  # uneven numbers of choices
    damage = [[0.0, *sorted(rng.random(n - 1) * 10)] for n in choices]  # choice 0: keep, free
    cost = [[0, *sorted(int(c) for c in rng.integers(1, 40, n - 1))] for n in choices]
    limits = [Limit([[c == len(row) - 1 for c in range(len(row))] for row in cost], 2, "a block")]
    budget = 0.5 * sum(max(row) for row in cost)
    solution = solve(damage, cost, budget, limits)
    assert solution.cost == sum(cost[b][c] for b, c in enumerate(solution.choices)) >= budget
    assert sum(c == len(row) - 1 for c, row in zip(solution.choices, cost)) <= 2
    assert solution.damage == pytest.approx(brute_force(damage, cost, budget, limits), abs=1e-9)
    assert len(solution.choices) == blocks


def test_the_solver_is_not_greedy():
    """Cheapest damage per parameter first would take block 0's first option and then need a costly second;
    the optimum takes one larger cut."""
    damage = [[0, 1.0, 10.0], [0, 3.0]]
    cost = [[0, 10, 20], [0, 20]]
    assert solve(damage, cost, 20).choices == [0, 1]  # 3.0, not 10.0 (block 0 twice as deep)
    assert solve(damage, cost, 30).choices == [1, 1]
    with pytest.raises(PrunekitError, match="no choice per block removes 41 parameters"):
        solve(damage, cost, 41)


# -- the tiny models -------------------------------------------------------------------------------


def deep_model(family: str = "llama", layers: int = 5):
    """A tiny model with ``layers`` blocks large enough to matter, block 1's attention silent and block 3 doing
    nothing: removing those costs no damage, so the solver's choice is known."""
    torch.manual_seed(0)
    config = CONFIGS[family]()
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = (config.layer_types * layers)[:layers]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    adapter = get_adapter(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        for i in range(layers):
            for linear in adapter.block(i).linears().values():
                linear_weight(linear).mul_(4.0)
        silent = [adapter.block(1).attention.o]
        silent += [adapter.block(3).attention.o, adapter.block(3).mlp.down] if layers > 3 else []
        for linear in silent:
            linear.weight.zero_()
            if getattr(linear, "bias", None) is not None:
                linear.bias.zero_()
    return model


def calibration(n: int = 4, seqlen: int = 16) -> Calibration:
    return Calibration(tokens(n, seqlen), "random", "", 0)


def target_for(model, extra: float = 0.0) -> float:
    """The fraction that removing block 3 and block 1's attention makes (plus ``extra`` of the parameters)."""
    adapter = get_adapter(model)
    block = sum(p.numel() for p in adapter.blocks()[3].parameters())
    attention = sum(p.numel() for p in adapter.blocks()[1].self_attn.parameters())
    return (block + attention) / parameter_counts(model)["non_embedding"] + extra


@torch.no_grad()
def logits(model):
    return model(input_ids=tokens(2, 20, seed=5)).logits


def test_the_free_cuts_are_chosen_and_the_costs_are_exact():
    model = deep_model()
    before = parameter_counts(model)["non_embedding"]
    result = prune(model, MixConfig(target_params=target_for(model) - 1e-4), calibration(), ENGINE)
    choices = [b["choice"] for b in result.engine.blocks]
    assert choices[3] == "block removed" and choices[1].startswith("no attention, MLP 128/128")
    assert all(c == "heads 4/4, MLP 128/128" for i, c in enumerate(choices) if i not in (1, 3))
    mix = result.outside_blocks["mix"]
    assert mix["total_damage"] == pytest.approx(0, abs=1e-9)
    assert before - parameter_counts(model)["non_embedding"] == mix["removed_params"] >= mix["budget"]

    model = deep_model()
    result = prune(model, MixConfig(target_params=target_for(model, 0.05)), calibration(), ENGINE)
    mix = result.outside_blocks["mix"]
    assert before - parameter_counts(model)["non_embedding"] == mix["removed_params"] >= mix["budget"]
    assert model.config.num_hidden_layers == 4 and sum(isinstance(m, RemovedAttention) for m in model.modules()) == 1


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "phi3", "opt"])
def test_the_recorded_errors_are_what_the_cut_block_computes(family):
    """Each block cut to each choice, on its dense inputs: the squared error the table holds (Gemma 3 scores
    by masked forwards, the others by the MLP shortcut; GPT-2 has Conv1D linears and plain heads, Phi-3 fused
    projections, OPT an MLP inline in its block that flattens the tokens)."""
    model = deep_model(family, layers=3)
    config = MixConfig(target_params=0.1, head_levels="0.5")
    result = prune(copy.deepcopy(model), config, calibration(), ENGINE)
    rows = result.outside_blocks["mix"]["blocks"]
    assert all(row["additive"] == (family != "gemma3") for row in rows)
    importance = read_importance(result)
    inputs, calls = capture(model, calibration().tokens, ENGINE, torch.device("cpu"))
    blocks = get_adapter(model).blocks()
    for i, row in enumerate(rows):
        dense = [call_block(blocks[i], h, c[i], "cpu") for h, c in zip(inputs, calls)]
        for index, entry in enumerate(row["choices"]):
            if Choice(entry["num_heads"], entry["num_kv_heads"], entry["intermediate_size"]).removes_block:
                got = inputs
            else:
                cut = copy.deepcopy(model)
                keep = [index if b == i else 0 for b in range(len(rows))]
                apply_mix(cut, config.space, {"blocks": rows}, keep, importance)
                got = [call_block(get_adapter(cut).blocks()[i], h, c[i], "cpu") for h, c in zip(inputs, calls)]
            sse = sum(float((g - d).detach().double().pow(2).sum()) for g, d in zip(got, dense))
            assert sse == pytest.approx(entry["sse"], rel=1e-4, abs=1e-6), (i, entry)
        inputs = dense


def read_importance(result):
    from prunekit.methods.mix_scores import Importance

    rankings = json.loads(result.outside_blocks["files"]["mix-importance.json"])["blocks"]
    return [Importance(torch.tensor(r["neurons"]), torch.tensor(r["heads"])) for r in rankings]


def test_the_saved_folder_reloads_with_the_logits_and_a_second_budget_reuses_the_scores(tmp_path, monkeypatch):
    model = deep_model()
    dense = copy.deepcopy(model)
    config = MixConfig(target_params=target_for(model, 0.05))
    report = prune_job(model, tiny_tokenizer(), "tiny", config, calibration(), ENGINE, out=tmp_path / "m")
    reloaded, _ = load(tmp_path / "m")
    torch.testing.assert_close(logits(reloaded), logits(model))
    assert report["metrics"]["mix"]["chosen"] and (tmp_path / "m" / "mix-importance.json").is_file()
    saved = json.loads((tmp_path / "m" / "prunekit.json").read_text())
    assert saved["shapes"]["blocks"][1]["attention"] is False  # per-block shapes: a shape manifest

    forwards = []
    for block in get_adapter(dense).blocks():
        block.register_forward_pre_hook(lambda *args: forwards.append(1))
    second = MixConfig(target_params=0.3, scores_from=str(tmp_path / "m"))
    assert not second.needs_calibration
    reused = prune(copy.deepcopy(dense), second)  # no calibration, no engine: only the solver
    assert not forwards
    scored = prune(copy.deepcopy(deep_model()), MixConfig(target_params=0.3), calibration(), ENGINE)
    assert reused.engine.blocks == scored.engine.blocks
    cosine = prune(copy.deepcopy(dense), MixConfig(target_params=0.3, damage="cosine", scores_from=str(tmp_path / "m")))
    assert cosine.outside_blocks["mix"]["damage"] == "cosine" and not forwards


def test_gguf_export_of_a_mixed_model(tmp_path):
    pytest.importorskip("gguf")
    from prunekit.export.gguf import export_gguf

    model = deep_model()
    prune(model, MixConfig(target_params=target_for(model, 0.05)), calibration(), ENGINE)
    report = export_gguf(model, tiny_tokenizer(), tmp_path / "m.gguf")
    assert report.arch == "deci" and len(report.feed_forward_length) == 4


# -- refusals --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        ({"target_params": 0}, r"--target-params must be in \(0, 1\), got 0"),
        ({"target_params": 1.5}, r"--target-params must be in \(0, 1\)"),
        ({"damage": "kl"}, "--damage must be one of mse, cosine"),
        ({"mlp_levels": "0.5,1.2"}, r"--mlp-levels: every fraction must lie in \(0, 1\)"),
        ({"head_levels": "half"}, "--head-levels must be comma-separated fractions"),
        ({"gqa": "any"}, "--gqa must be one of"),
        ({"round_to": 0}, "--round-to must be at least 1"),
        ({"scores_from": "/nonexistent/folder"}, "cannot read the mix scores"),
    ],
)
def test_bad_options_are_one_clear_error(options, message):
    with pytest.raises(PrunekitError, match=message):
        MixConfig(**options)


def test_an_unreachable_budget_fails_before_scoring(monkeypatch):
    from prunekit.methods import mix

    monkeypatch.setattr(mix, "run_sequential", lambda *a, **k: pytest.fail("scored"))
    with pytest.raises(PrunekitError, match="while keeping a block, an attention, an MLP; lower --target-params"):
        prune(deep_model(), MixConfig(target_params=0.99), calibration(), ENGINE)


def test_scores_of_another_model_or_setting_are_refused(tmp_path):
    model = deep_model(layers=3)
    prune_job(model, tiny_tokenizer(), "tiny", MixConfig(target_params=0.1), calibration(), ENGINE, out=tmp_path / "m")
    with pytest.raises(PrunekitError, match="are for a model of 3 blocks of other shapes"):
        prune(deep_model(layers=4), MixConfig(scores_from=str(tmp_path / "m")))
    with pytest.raises(PrunekitError, match="--mlp-levels 0.5 differs from the scores' 0.75,0.5,0.25"):
        MixConfig(mlp_levels="0.5", scores_from=str(tmp_path / "m"))
    (tmp_path / "m" / "mix-importance.json").unlink()
    with pytest.raises(PrunekitError, match="mix-importance.json is missing or unreadable"):
        read_scores(tmp_path / "m")
    (tmp_path / "p.json").write_text(json.dumps({"metrics": {}}))
    with pytest.raises(PrunekitError, match="holds no mix scores"):
        MixConfig(scores_from=str(tmp_path / "p.json"))


# -- the command line ------------------------------------------------------------------------------


def cli(*args):
    return subprocess.run([sys.executable, "-m", "prunekit.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_mix_end_to_end(tmp_path):
    model = deep_model()
    model.save_pretrained(tmp_path / "tiny")
    tiny_tokenizer().save_pretrained(tmp_path / "tiny")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SAMPLE_TEXT)
    common = ["prune", "--model", str(tmp_path / "tiny"), "--method", "mix", "--device", "cpu"]
    target = f"{target_for(model, 0.05):.4f}"
    result = cli(*common, "--target-params", target, "--calib", str(corpus), "--nsamples", "4", "--seqlen", "16",
                 "--out", str(tmp_path / "m1"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "scores reusable: --scores-from" in result.stdout and "1 removed" in result.stdout

    result = cli(*common, "--target-params", target, "--scores-from", str(tmp_path / "m1"), "--out", str(tmp_path / "m2"))
    assert result.returncode == 0, result.stderr  # no --calib: the scores are reused
    first, second = (json.loads((tmp_path / m / "prunekit.json").read_text()) for m in ("m1", "m2"))
    assert first["metrics"]["blocks"] == second["metrics"]["blocks"]
    # the folder holds the model the scores make in memory
    in_memory = load(tmp_path / "tiny")[0]
    prune(in_memory, MixConfig(target_params=float(target), scores_from=str(tmp_path / "m1")))
    torch.testing.assert_close(logits(load(tmp_path / "m2")[0]), logits(in_memory))

    result = cli(*common, "--target-params", "0.99", "--calib", str(corpus), "--out", str(tmp_path / "m3"))
    assert result.returncode == 2 and "lower --target-params" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("prunekit: error: no choice per block removes")
    assert not (tmp_path / "m3").exists()

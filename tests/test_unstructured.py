"""Wanda, SparseGPT, N:M and OWL: hand-computed cases, exact sparsity, and the orders agree in kind."""

import pytest
import torch

from prunekit.data import Calibration
from prunekit.errors import PrunekitError
from prunekit.methods import SparseGPTConfig, WandaConfig, prune
from prunekit.methods.magnitude import magnitude_mask
from prunekit.methods.masks import nm_mask, parse_nm, row_mask
from prunekit.methods.owl import outlier_ratio, owl_sparsities
from prunekit.methods.sparsegpt import sparsegpt_prune
from prunekit.methods.stats import Hessian, InputNorms
from prunekit.methods.wanda import wanda_mask, wanda_scores
from prunekit.models import get_adapter, linear_weight
from prunekit.sequential import EngineConfig
from tiny_models import FAMILIES, tiny_model, tokens


def test_wanda_and_magnitude_disagree_on_a_hand_computed_row():
    # |W| = [4, 3, 2, 1]; input norms [1, 1, 10, 10] make the two small weights matter most.
    w = torch.tensor([[4.0, -3.0, 2.0, -1.0]])
    norms = torch.tensor([1.0, 1.0, 10.0, 10.0])
    assert torch.equal(wanda_scores(w, norms), torch.tensor([[4.0, 3.0, 20.0, 10.0]]))
    assert torch.equal(wanda_mask(wanda_scores(w, norms), 0.5), torch.tensor([[False, False, True, True]]))
    assert torch.equal(magnitude_mask(w, 0.5), torch.tensor([[True, True, False, False]]))


def test_input_norms_accumulate_over_batches_in_float32():
    stats = InputNorms(2, "cpu")
    stats.update(torch.tensor([[[3.0, 0.0]]], dtype=torch.bfloat16))
    stats.update(torch.tensor([[4.0, 1.0], [0.0, 0.0]]))
    assert stats.norms().dtype == torch.float32
    assert torch.allclose(stats.norms(), torch.tensor([5.0, 1.0]))
    assert stats.tokens == 3


def test_hessian_running_mean_equals_the_batch_formula():
    x = torch.randn(10, 4, dtype=torch.float64)
    stats = Hessian(4, "cpu", torch.float64)
    stats.update(x[:3])
    stats.update(x[3:])
    assert torch.allclose(stats.matrix, 2 / 10 * x.t() @ x)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_nm_masks_remove_exactly_n_of_every_m(n, m):
    scores = torch.rand(6, 4 * m)
    mask = nm_mask(scores, n, m)
    zeros_per_group = (~mask).reshape(6, 4, m).sum(-1)
    assert (zeros_per_group == n).all()
    # the kept ones are the largest of their group
    groups, kept = scores.reshape(6, 4, m), mask.reshape(6, 4, m)
    assert (groups[kept].reshape(6, 4, m - n).min(-1).values >= groups[~kept].reshape(6, 4, n).max(-1).values).all()


def test_nm_needs_a_multiple_of_m():
    with pytest.raises(PrunekitError, match="multiple of M=4"):
        nm_mask(torch.rand(2, 6), 2, 4)


@pytest.mark.parametrize("bad", ["2-4", "4:2", "0:4", "a:b", "2:2"])
def test_bad_nm_strings(bad):
    with pytest.raises(PrunekitError, match="--nm"):
        parse_nm(bad)


def test_row_mask_is_exact_per_row_even_with_ties():
    mask = row_mask(torch.ones(3, 10), 0.3)
    assert ((~mask).sum(1) == 3).all()


def _low_rank_inputs(tokens=256, features=32, rank=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, rank, generator=g) @ torch.randn(rank, features, generator=g)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_reconstructs_better_than_masking_alone(nm):
    x = _low_rank_inputs()
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    h = Hessian(32, "cpu")
    h.update(x)
    pruned = sparsegpt_prune(w, h.matrix, 0.5, nm, blocksize=8)
    mask = pruned != 0
    assert (~mask).sum().item() == w.numel() // 2
    dense_out, sgpt_out, masked_out = x @ w.t(), x @ pruned.t(), x @ (w * mask).t()
    sgpt_err = (dense_out - sgpt_out).norm()
    masked_err = (dense_out - masked_out).norm()
    assert sgpt_err < 0.5 * masked_err


def test_sparsegpt_at_zero_sparsity_changes_nothing():
    x = torch.randn(64, 16)
    w = torch.randn(8, 16)
    h = Hessian(16, "cpu")
    h.update(x)
    assert torch.allclose(sparsegpt_prune(w, h.matrix, 0.0), w)


def test_sparsegpt_survives_dead_inputs_and_a_singular_hessian():
    x = torch.randn(64, 16)
    x[:, 3] = 0  # a dead input
    x[:, 5] = x[:, 6]  # collinear inputs: H is singular
    h = Hessian(16, "cpu")
    h.update(x)
    out = sparsegpt_prune(torch.randn(8, 16), h.matrix, 0.5, percdamp=1e-12)
    assert torch.isfinite(out).all() and (out[:, 3] == 0).all()


def test_owl_allocation_keeps_the_mean_and_the_bounds():
    sparsities = owl_sparsities([0.01, 0.05, 0.03, 0.02], target=0.6, lam=0.08)
    assert sum(sparsities) / 4 == pytest.approx(0.6)
    assert max(sparsities) - min(sparsities) == pytest.approx(0.16)
    assert sparsities[1] == min(sparsities)  # most outliers -> least pruned
    assert outlier_ratio([torch.tensor([1.0, 1.0, 1.0, 100.0])], m=2.0) == 0.25


def calib(n=4, seqlen=16):
    ids = tokens(n=n, seqlen=seqlen)
    return Calibration(ids, "random", "-", 0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "config",
    [
        WandaConfig(0.5),
        WandaConfig(nm="2:4", order="block"),
        SparseGPTConfig(0.5, blocksize=16),
        SparseGPTConfig(nm="4:8", order="block"),
    ],
    ids=["wanda", "wanda-2:4-block", "sparsegpt", "sparsegpt-4:8-block"],
)
def test_every_family_gets_the_requested_sparsity(family, config):
    model = tiny_model(family)
    prune(model, config, calib(), EngineConfig(batch_size=2, progress=False))
    adapter = get_adapter(model)
    for i in range(adapter.num_blocks()):
        for name, linear in adapter.block(i).linears().items():
            w = linear_weight(linear)
            if config.nm:
                n, m = parse_nm(config.nm)
                assert ((w == 0).reshape(w.shape[0], -1, m).sum(-1) == n).all(), (i, name)
            elif isinstance(config, WandaConfig):
                assert ((w == 0).sum(1) == w.shape[1] // 2).all(), (i, name)  # exactly half of every row
            else:
                assert abs((w == 0).float().mean().item() - 0.5) < 0.02, (i, name)


def test_sequential_order_is_one_pass_per_block():
    model = tiny_model("llama")
    calls = []
    for block in get_adapter(model).blocks():
        block.register_forward_pre_hook(lambda m, a: calls.append(1))
    prune(model, WandaConfig(0.5), calib(), EngineConfig(progress=False))
    assert len(calls) == 2  # one pass for each of the two blocks, no re-run

    model = tiny_model("llama")
    calls.clear()
    for block in get_adapter(model).blocks():
        block.register_forward_pre_hook(lambda m, a: calls.append(1))
    prune(model, WandaConfig(0.5, order="block"), calib(), EngineConfig(batch_size=4, progress=False))
    assert len(calls) == 4  # statistics pass + output pass per block


def test_sequential_order_output_equals_rerun_of_the_pruned_block():
    """Accepting the pass's outputs is only right if they equal a fresh run of the pruned model."""
    from prunekit.sequential import sequential_logits

    model = tiny_model("llama")
    ids = calib().tokens
    prune(model, WandaConfig(0.5), calib(), EngineConfig(progress=False))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    assert torch.allclose(
        sequential_logits(model, ids, EngineConfig(batch_size=4, progress=False)), expected, atol=1e-5
    )


def test_owl_gives_blocks_different_sparsities_with_the_same_mean():
    model = tiny_model("gemma3")  # three blocks
    result = prune(model, WandaConfig(0.5, owl=True, owl_lambda=0.1), calib(), EngineConfig(progress=False))
    per_block = [sum(b["sparsity"].values()) / len(b["sparsity"]) for b in result.engine.blocks]
    assert len(set(round(s, 3) for s in per_block)) > 1
    assert sum(per_block) / len(per_block) == pytest.approx(0.5, abs=0.01)


def test_include_exclude_select_layers():
    model = tiny_model("llama")
    prune(
        model, WandaConfig(0.5, include=("mlp.*",), exclude=("mlp.down_proj",)), calib(), EngineConfig(progress=False)
    )
    block = get_adapter(model).block(0)
    assert (linear_weight(block.mlp.gate) == 0).float().mean() == 0.5
    assert (linear_weight(block.mlp.down) == 0).sum() == 0
    assert (linear_weight(block.attention.q) == 0).sum() == 0


def test_calibration_is_required():
    with pytest.raises(PrunekitError, match="calibration"):
        prune(tiny_model("llama"), WandaConfig(0.5))

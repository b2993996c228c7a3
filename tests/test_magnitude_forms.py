"""Magnitude's global and Han std-threshold forms, and iterative prune-retrain with fixed masks."""

import pytest
import torch

from prunekit.errors import PrunekitError
from prunekit.methods import MagnitudeConfig, prune
from prunekit.methods.magnitude import global_counts, std_threshold_mask
from prunekit.methods.retrain import PruneRetrainConfig, prune_retrain
from prunekit.models import get_adapter, linear_weight
from prunekit.recover import FinetuneConfig, finetune, mask_optimizer_state, sparse_masks
from prunekit.sequential import EngineConfig
from tiny_models import tiny_model, tokens


def test_global_counts_by_hand():
    mags = {"a": torch.tensor([0.1, 0.2, 0.3, 0.9]), "b": torch.tensor([0.05, 0.8])}
    assert global_counts(mags, 0.5) == {"a": 2, "b": 1}  # the 3 smallest: 0.05, 0.1, 0.2


def test_global_ties_are_exact_and_go_to_the_earliest_layer():
    mags = {"a": torch.tensor([1.0, 1.0, 2.0]), "b": torch.tensor([1.0, 1.0, 3.0])}
    assert global_counts(mags, 0.5) == {"a": 2, "b": 1}


def test_global_scope_prunes_unevenly_with_exact_total():
    model = tiny_model("llama")
    with torch.no_grad():  # make block 1 much larger so the global threshold spares it
        for p in get_adapter(model).blocks()[1].parameters():
            p.mul_(10)
    result = prune(model, MagnitudeConfig(0.5, scope="global"), engine=EngineConfig(progress=False))
    adapter = get_adapter(model)
    weights = [linear_weight(lin) for i in range(2) for lin in adapter.block(i).linears().values()]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == round(0.5 * sum(w.numel() for w in weights))
    per_block = [sum(b["sparsity"].values()) / len(b["sparsity"]) for b in result.engine.blocks]
    assert per_block[0] > 0.8 and per_block[1] < 0.2  # layer-wise pruning would give 0.5 and 0.5


def test_han_std_threshold_by_hand():
    w = torch.tensor([[1.0, -1.0, 0.1, -0.1]])  # std = 0.8124
    assert torch.equal(std_threshold_mask(w, 0.5), torch.tensor([[True, True, False, False]]))


def test_forms_are_exclusive():
    with pytest.raises(PrunekitError, match="choose one"):
        MagnitudeConfig(nm="2:4", scope="global")


def test_finetune_keeps_masked_weights_at_zero_and_learns():
    model = tiny_model("llama")
    prune(model, MagnitudeConfig(0.5), engine=EngineConfig(progress=False))
    masks = sparse_masks(model)
    data = tokens(n=8, seqlen=16).repeat(1, 1)
    report = finetune(model, data, FinetuneConfig(steps=30, lr=3e-3, batch_size=4), masks, progress=False)
    assert report.losses[-1] < report.losses[0]
    for param, mask in masks.items():
        assert torch.equal(param != 0, mask)


def test_optimizer_state_is_masked():
    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones(4)
    opt.step()
    mask = torch.tensor([True, False, True, False])
    mask_optimizer_state(opt, {p: mask})
    assert (opt.state[p]["exp_avg"][~mask] == 0).all() and (opt.state[p]["exp_avg_sq"][~mask] == 0).all()


def test_prune_retrain_follows_the_schedule():
    model = tiny_model("llama")
    stages = prune_retrain(
        model,
        tokens(n=8, seqlen=16),
        PruneRetrainConfig([0.3, 0.6], FinetuneConfig(steps=3, lr=1e-3)),
        evaluate=lambda: 1.0,
        progress=False,
    )
    assert [round(s["achieved"], 2) for s in stages] == [0.3, 0.6]
    assert all(s["metric"] == 1.0 for s in stages)


def test_embeddings_and_head_only_when_asked():
    model = tiny_model("llama")  # tied: the head is the embedding matrix
    prune(model, MagnitudeConfig(0.5), engine=EngineConfig(progress=False))
    assert (get_adapter(model).lm_head().weight == 0).sum() == 0
    result = prune(model, MagnitudeConfig(0.5, prune_lm_head=True), engine=EngineConfig(progress=False))
    head = get_adapter(model).lm_head().weight
    assert (head == 0).float().mean() == 0.5
    assert result.layer_sparsity()["lm_head"] == 0.5

    untied = tiny_model("qwen2")
    result = prune(untied, MagnitudeConfig(0.5, prune_embeddings=True), engine=EngineConfig(progress=False))
    adapter = get_adapter(untied)
    assert (adapter.embeddings()[0].weight == 0).float().mean() == 0.5
    assert (adapter.lm_head().weight == 0).sum() == 0
    assert "embeddings" in result.layer_sparsity()

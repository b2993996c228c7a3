"""One-shot magnitude pruning: hand-computed masks and exact counts."""

import pytest
import torch

from prunekit.errors import PrunekitError
from prunekit.methods import MagnitudeConfig, prune
from prunekit.methods.magnitude import magnitude_mask
from prunekit.models import get_adapter, linear_weight
from prunekit.sequential import EngineConfig
from tiny_models import FAMILIES, tiny_model


def test_mask_by_hand():
    w = torch.tensor([[0.5, -0.1, 2.0, -3.0], [0.2, 0.0, -0.4, 1.0]])
    expected = torch.tensor([[True, False, True, True], [False, False, True, True]])
    assert torch.equal(magnitude_mask(w, 0.375), expected)  # 3 of 8 removed: 0.0, -0.1, 0.2


def test_ties_still_give_the_exact_count():
    w = torch.ones(4, 6)  # every magnitude ties, as in a 4-bit-quantized checkpoint
    mask = magnitude_mask(w, 0.5)
    assert (~mask).sum().item() == 12


def test_zero_sparsity_keeps_everything():
    assert magnitude_mask(torch.randn(3, 5), 0.0).all()


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_bad_sparsity(bad):
    with pytest.raises(PrunekitError, match="--sparsity"):
        MagnitudeConfig(bad)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_linear_of_every_block_is_half_sparse(family):
    model = tiny_model(family)
    head_before = get_adapter(model).lm_head().weight.clone()
    result = prune(model, MagnitudeConfig(0.5), engine=EngineConfig(progress=False))
    adapter = get_adapter(model)
    for i in range(adapter.num_blocks()):
        for name, linear in adapter.block(i).linears().items():
            weight = linear_weight(linear)
            assert (weight == 0).sum().item() == round(0.5 * weight.numel()), (i, name)
    assert torch.equal(adapter.lm_head().weight, head_before)  # embeddings and head left alone
    assert set(result.layer_sparsity().values()) == {0.5}

"""The engine: identity with a no-op method, resume after an interruption, lazy (on-disk) models."""

import pytest
import torch

from prunekit.errors import PrunekitError
from prunekit.models import get_adapter
from prunekit.sequential import EngineConfig, run_sequential, sequential_logits
from tiny_models import FAMILIES, tiny_model, tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_noop_engine_reproduces_logits(family):
    model = tiny_model(family)
    ids = tokens(n=4, seqlen=24)
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
    got = sequential_logits(model, ids, EngineConfig(batch_size=3, progress=False))
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-5


class Interrupt(Exception):
    pass


def scale_block(step):
    """A deterministic 'method' that changes every linear, so resume mistakes show."""
    step.forward()
    with torch.no_grad():
        for linear in step.block.linears().values():
            linear.weight.mul_(0.5 + 0.1 * step.index)
    return {"scaled": step.index}


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_resume_after_interruption_matches_uninterrupted_run(family, tmp_path):
    ids = tokens(n=4, seqlen=16)
    reference = tiny_model(family)
    run_sequential(reference, scale_block, ids, EngineConfig(batch_size=2, progress=False))

    model = tiny_model(family)
    calls = []

    def crash_at_second_block(step):
        if step.index == 1:
            raise Interrupt
        calls.append(step.index)
        return scale_block(step)

    config = EngineConfig(batch_size=2, progress=False, checkpoint_dir=tmp_path / "ckpt")
    with pytest.raises(Interrupt):
        run_sequential(model, crash_at_second_block, ids, config, fingerprint="run-a")

    fresh = tiny_model(family)  # a new process: the weights in memory are the original ones
    report = run_sequential(fresh, scale_block, ids, config, fingerprint="run-a")
    assert calls == [0] and report.resumed_from == 1
    assert [b["block"] for b in report.blocks] == list(range(get_adapter(fresh).num_blocks()))
    for (name, a), b in zip(reference.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_checkpoint_of_another_run_is_refused(tmp_path):
    ids = tokens(n=2, seqlen=8)
    config = EngineConfig(progress=False, checkpoint_dir=tmp_path)
    run_sequential(tiny_model("llama"), lambda s: None, ids, config, fingerprint="a")
    with pytest.raises(PrunekitError, match="different run"):
        run_sequential(tiny_model("llama"), lambda s: None, ids, config, fingerprint="b")


def test_dense_propagation_feeds_unpruned_outputs_forward():
    ids = tokens(n=2, seqlen=8)
    seen = {}

    def zero_block_and_record(step):
        if step.index == 1:
            inputs = []
            handle = step.block.module.register_forward_pre_hook(lambda m, a, k: inputs.append(a[0]), with_kwargs=True)
            step.forward()
            handle.remove()
            seen[step.index] = inputs[0]
        with torch.no_grad():
            for linear in step.block.linears().values():
                linear.weight.zero_()

    dense_model = tiny_model("llama")
    with torch.no_grad():
        hidden = dense_model(input_ids=ids[:1], output_hidden_states=True).hidden_states[1]
    run_sequential(dense_model, zero_block_and_record, ids, EngineConfig(propagate="dense", progress=False))
    assert torch.allclose(seen[1], hidden, atol=1e-6)
    run_sequential(tiny_model("llama"), zero_block_and_record, ids, EngineConfig(progress=False))
    assert not torch.allclose(seen[1], hidden, atol=1e-3)


def test_method_without_calibration_gets_a_clear_error():
    with pytest.raises(PrunekitError, match="calibration"):
        run_sequential(tiny_model("llama"), lambda step: step.forward(), None, EngineConfig(progress=False))


def test_a_step_replaces_its_inputs_and_its_carry_survives_a_resume(tmp_path):
    """Block 0 doubles its inputs (the engine's re-run uses them); every step counts in the carry."""
    ids = tokens(n=2, seqlen=8)

    def double_first_inputs(step):
        if step.index == 0:
            step.inputs = [2 * x for x in step.inputs]
        step.carry["seen"] = torch.cat([step.carry.get("seen", torch.zeros(0)), torch.tensor([step.index])])

    def run(process, **kwargs):
        return run_sequential(tiny_model("llama"), process, ids, EngineConfig(progress=False, **kwargs),
                              fingerprint="f", keep_outputs=True)  # fmt: skip

    reference = run(double_first_inputs)
    assert reference.carry["seen"].tolist() == [0, 1]
    assert not torch.equal(reference.outputs[0], run(lambda step: None).outputs[0])

    def crash_at_second_block(step):
        if step.index == 1:
            raise Interrupt
        double_first_inputs(step)

    with pytest.raises(Interrupt):
        run(crash_at_second_block, checkpoint_dir=tmp_path)
    resumed = run(double_first_inputs, checkpoint_dir=tmp_path)
    assert resumed.resumed_from == 1
    assert resumed.carry["seen"].tolist() == [0, 1]
    assert torch.equal(resumed.outputs[0], reference.outputs[0])


def test_a_score_only_pass_checkpoints_no_weights(tmp_path):
    ids = tokens(n=2, seqlen=8)
    config = EngineConfig(progress=False, checkpoint_dir=tmp_path)
    run_sequential(tiny_model("llama"), lambda step: {"score": 1.5}, ids, config, save_weights=False)
    assert not list(tmp_path.glob("block_*"))
    report = run_sequential(tiny_model("llama"), lambda step: None, ids, config, save_weights=False)
    assert report.resumed_from == 2 and report.blocks == [{"block": 0, "score": 1.5}, {"block": 1, "score": 1.5}]

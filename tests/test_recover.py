"""Recovery: every mode trains, LoRA merges to its own logits, sparsity survives exactly, a resumed run
equals an uninterrupted one, distillation from precomputed top-k logits equals the live teacher, and
two processes under accelerate compute the loss curve one process does."""

import copy
import json
import subprocess
import sys

import pytest
import torch

from prunekit.errors import PrunekitError
from prunekit.methods import MagnitudeConfig, prune
from prunekit.models import get_adapter, is_linear
from prunekit.recover import (
    LoraSettings,
    RecoverConfig,
    TrainData,
    load_train_data,
    precompute_teacher_topk,
    recover,
    sparse_masks,
)
from prunekit.recover.data import IGNORE, batch_indices
from prunekit.recover.train import distillation_loss
from prunekit.sequential import EngineConfig
from test_cli import error_line, run
from tiny_models import FAMILIES, SAMPLE_TEXT, save_tiny, tiny_model, tiny_tokenizer, tokens


def text_data(n=16, seqlen=16) -> TrainData:
    ids = tokens(n, seqlen, seed=5)
    return TrainData(ids, ids.clone(), "random", "0" * 64)


def fast(**options) -> RecoverConfig:
    return RecoverConfig(**{"steps": 4, "batch_size": 4, "lr": 1e-3, **options})


def sparse_model():
    model = tiny_model("llama")
    prune(model, MagnitudeConfig(0.5), engine=EngineConfig(progress=False))
    return model


# -- data --------------------------------------------------------------------------------------------


def test_batches_are_a_pure_function_of_seed_and_step_and_cover_each_epoch():
    first_epoch = torch.cat([batch_indices(10, step, 5, seed=1) for step in range(2)])
    assert sorted(first_epoch.tolist()) == list(range(10))
    assert torch.equal(batch_indices(10, 3, 4, seed=1), batch_indices(10, 3, 4, seed=1))
    assert len(batch_indices(10, 2, 4, seed=1)) == 4  # a batch spanning two epochs


def test_packed_text_and_alpaca_data(tmp_path):
    tokenizer = tiny_tokenizer()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SAMPLE_TEXT)
    packed = load_train_data(tokenizer, str(corpus), 16)
    assert packed.input_ids.shape[1] == 16 and torch.equal(packed.input_ids, packed.labels)
    records = [
        {"instruction": "Say fox.", "input": "", "output": "fox"},
        {"instruction": "Pick", "input": "a b", "output": "b"},
    ]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(records))
    data = load_train_data(tokenizer, str(path), 512)
    prompt = len(
        tokenizer(
            "Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.\n\n### Instruction:\nSay fox.\n\n### Response:\n"
        )["input_ids"]
    )
    learned = (data.labels[0] != IGNORE).nonzero().flatten().tolist()
    assert learned[0] == prompt  # the loss starts at the response
    assert data.labels[0, learned[-1]] == tokenizer.eos_token_id  # and ends with EOS
    path.write_text(json.dumps([{"output": "no instruction"}]))
    with pytest.raises(PrunekitError, match="record 0 needs 'instruction'"):
        load_train_data(tokenizer, str(path), 64)


# -- the modes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["lora", "cpt", "cpt+lora", "distill"])
def test_every_mode_lowers_the_loss_and_keeps_sparsity_exactly(mode):
    model = sparse_model()
    zeros = {name: p.detach() == 0 for name, p in model.named_parameters() if "layers" in name and p.dim() == 2}
    teacher = tiny_model("llama", seed=1) if mode == "distill" else None
    trained, report = recover(
        model, text_data(), fast(mode=mode, steps=8, keep_sparsity=True), teacher=teacher, progress=False
    )
    assert report.sparsity_kept is True
    after = dict(trained.named_parameters())
    assert all(bool((after[name][mask] == 0).all()) for name, mask in zeros.items())
    assert report.losses[-1] < report.losses[0]
    assert not any("lora" in name for name, _ in trained.named_parameters())  # merged for export


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_adapts_every_linear_of_the_blocks_in_every_family(family):
    """The default targets come from the family's adapter: GPT-2's Conv1D c_attn/c_proj/c_fc, OPT's fc1/fc2 and
    out_proj, Phi-3's fused projections; a merged LoRA run changes every block linear and lowers the loss."""
    model = tiny_model(family)
    blocks = get_adapter(model).blocks()
    before = {n: m.weight.detach().clone() for n, m in blocks.named_modules() if is_linear(m)}
    trained, report = recover(model, text_data(), fast(mode="lora", steps=6, lr=1e-2), progress=False)
    after = {n: m.weight for n, m in get_adapter(trained).blocks().named_modules() if is_linear(m)}
    assert after.keys() == before.keys() and len(before) >= 4
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert not unchanged, f"{family}: LoRA left {unchanged} untouched"
    assert report.losses[-1] < report.losses[0]


def test_lora_merge_gives_the_logits_of_the_unmerged_adapter():
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama")
    targets = list(get_adapter(model).lora_targets())
    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=targets))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    lora.eval()
    ids = tokens(2, 16, seed=1)
    with torch.no_grad():
        unmerged = lora(ids).logits
        merged = lora.merge_and_unload()(ids).logits
        assert (unmerged - model(ids).logits).abs().max() > 1e-3
    assert torch.allclose(merged, unmerged, atol=1e-5)


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    config = fast(mode="cpt", steps=6, checkpoint_every=2, keep_sparsity=True)
    whole, whole_report = recover(sparse_model(), text_data(), config, progress=False)

    def crash(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        recover(sparse_model(), text_data(), config, checkpoint_dir=tmp_path, progress=False, on_step=crash)
    resumed, report = recover(sparse_model(), text_data(), config, checkpoint_dir=tmp_path, progress=False)
    assert report.resumed_at == 2  # the checkpoint of step 2; step 3 was lost with the crash
    assert report.losses == pytest.approx(whole_report.losses, abs=1e-6)
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    other = fast(mode="cpt", steps=6, checkpoint_every=2, lr=5e-4)
    with pytest.raises(PrunekitError, match="a different recovery run"):
        recover(sparse_model(), text_data(), other, checkpoint_dir=tmp_path, progress=False)


def test_lora_and_cpt_then_lora_resume_too(tmp_path):
    config = fast(mode="cpt+lora", steps=6, checkpoint_every=1)
    whole, _ = recover(tiny_model("llama"), text_data(), config, progress=False)

    def crash(step, loss):
        if step == 5:  # inside the LoRA phase
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        recover(tiny_model("llama"), text_data(), config, checkpoint_dir=tmp_path, progress=False, on_step=crash)
    resumed, report = recover(tiny_model("llama"), text_data(), config, checkpoint_dir=tmp_path, progress=False)
    assert report.resumed_at == 3 + 2  # the CPT phase whole, and the LoRA steps checkpointed before the crash
    ids = tokens(2, 16, seed=1)
    with torch.no_grad():
        assert torch.allclose(resumed(ids).logits, whole(ids).logits, atol=1e-5)


def test_precomputed_top_k_over_the_whole_vocabulary_is_the_live_teacher(tmp_path):
    teacher, student = tiny_model("llama", seed=1), tiny_model("llama")
    data = text_data(n=4)
    store = precompute_teacher_topk(teacher, data, k=128, path=tmp_path / "teacher.safetensors")
    indices = torch.tensor([2, 0])
    with torch.no_grad():
        logits = student(input_ids=data.input_ids[indices]).logits
        labels, ids = data.labels[indices], data.input_ids[indices]
        live = distillation_loss(logits, labels, indices, 2.0, teacher=teacher, ids=ids)
        stored = distillation_loss(logits, labels, indices, 2.0, topk=store)
        assert live > 0 and stored == pytest.approx(live.item(), rel=1e-5)
        top8 = precompute_teacher_topk(teacher, data, k=8, path=tmp_path / "t8.safetensors")
        assert distillation_loss(logits, data.labels[indices], indices, 2.0, topk=top8) > 0
    with pytest.raises(PrunekitError, match="other training data"):
        from prunekit.recover import TeacherTopK

        TeacherTopK(tmp_path / "teacher.safetensors", text_data(n=6))


def test_bad_settings_are_refused_clearly():
    with pytest.raises(PrunekitError, match="--mode must be one of"):
        RecoverConfig(mode="qlora")
    with pytest.raises(PrunekitError, match="needs a teacher"):
        recover(tiny_model("llama"), text_data(), fast(mode="distill"), progress=False)
    with pytest.raises(PrunekitError, match="do not split into --micro-batch 3"):
        recover(tiny_model("llama"), text_data(), fast(micro_batch=3), progress=False)
    with pytest.raises(PrunekitError, match="match no linear layer"):
        recover(tiny_model("llama"), text_data(), fast(lora=LoraSettings(targets=("nothing_here",))), progress=False)


def test_micro_batches_accumulate_to_the_full_batch():
    config = fast(mode="cpt", steps=3)
    _, whole = recover(tiny_model("llama"), text_data(), config, progress=False)
    _, split = recover(tiny_model("llama"), text_data(), fast(mode="cpt", steps=3, micro_batch=1), progress=False)
    assert split.losses == pytest.approx(whole.losses, abs=1e-5)


# -- the command, one and two processes ------------------------------------------------------------------


@pytest.fixture(scope="module")
def pruned_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("recover")
    save_tiny(root / "dense", "llama")
    (root / "corpus.txt").write_text(SAMPLE_TEXT)
    result = run("prune", "--model", str(root / "dense"), "--method", "magnitude", "--out", str(root / "sparse"))
    assert result.returncode == 0, result.stderr
    return root


def recover_args(root, out, *extra):
    return ["recover", "--model", str(root / "sparse"), "--data", str(root / "corpus.txt"), "--seqlen", "16",
            "--steps", "4", "--batch-size", "4", "--lr", "1e-3", "--out", str(out), *extra]  # fmt: skip


def test_recover_command_saves_the_model_its_manifest_and_a_loss_plot(pruned_folder, tmp_path):
    out = tmp_path / "recovered"
    result = run(*recover_args(pruned_folder, out, "--mode", "cpt", "--eval", str(pruned_folder / "corpus.txt"),
                               "--eval-seqlen", "16"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "prunekit.json").read_text())
    assert manifest["method"] == "magnitude"  # what the model was, kept
    recovery = manifest["recovery"]
    assert recovery["config"]["mode"] == "cpt" and recovery["config"]["keep_sparsity"] is True  # read from the input
    assert len(recovery["losses"]) == 4 and recovery["sparsity_kept"] is True
    assert recovery["ppl_after"]["ppl"] < recovery["ppl_before"]["ppl"]
    assert (out / "loss.png").stat().st_size > 1000
    from prunekit import load

    model, _ = load(out)
    assert sum(int((m == 0).sum()) for m in sparse_masks(model)) > 0
    teacherless = run(*recover_args(pruned_folder, tmp_path / "x", "--mode", "distill"))
    assert "needs a teacher" in error_line(teacherless)


def test_two_processes_under_accelerate_give_the_loss_curve_of_one(pruned_folder, tmp_path):
    one = run(*recover_args(pruned_folder, tmp_path / "one", "--mode", "cpt", "--json", str(tmp_path / "one.json")))
    assert one.returncode == 0, one.stderr
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "prunekit.cli"]  # fmt: skip
    args = recover_args(pruned_folder, tmp_path / "two", "--mode", "cpt", "--json", str(tmp_path / "two.json"))
    two = subprocess.run([*launch, *args], capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    curve_one = json.loads((tmp_path / "one.json").read_text())["recovery"]["losses"]
    report_two = json.loads((tmp_path / "two.json").read_text())["recovery"]
    assert report_two["processes"] == 2
    assert report_two["losses"] == pytest.approx(curve_one, abs=1e-4)

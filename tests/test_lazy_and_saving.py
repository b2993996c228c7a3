"""Lazy (on-disk) models through the engine, atomic saving, and round trips through from_pretrained."""

import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunekit import load
from prunekit.errors import PrunekitError
from prunekit.io.files import MANIFEST, check_output
from prunekit.io.save import save_pruned
from prunekit.methods import MagnitudeConfig, prune
from prunekit.sequential import EngineConfig
from tiny_models import save_tiny, tokens


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_lazy_model_prunes_like_an_eager_one_with_one_block_in_memory(tmp_path, family):
    save_tiny(tmp_path / "src", family)
    eager, tokenizer = load(tmp_path / "src")
    prune(eager, MagnitudeConfig(0.5), engine=EngineConfig(progress=False))

    lazy, _ = load(tmp_path / "src", lazy=True)
    blocks = lazy.get_submodule(
        {"llama": "model.layers", "gpt2": "transformer.h", "opt": "model.decoder.layers"}[family]
    )
    assert all(p.is_meta for p in blocks.parameters())
    in_memory = []
    from prunekit.methods import METHODS

    original = METHODS[MagnitudeConfig]

    def spy(config, step):
        in_memory.append(sum(not all(p.is_meta for p in b.parameters()) for b in blocks))
        return original.block(config, step)

    METHODS[MagnitudeConfig] = dataclasses.replace(original, block=spy)
    try:
        prune(lazy, MagnitudeConfig(0.5), engine=EngineConfig(progress=False, checkpoint_dir=tmp_path / "ckpt"))
    finally:
        METHODS[MagnitudeConfig] = original
    assert in_memory == [1] * len(blocks)

    save_pruned(lazy, tokenizer, tmp_path / "lazy-out", {"method": "magnitude"})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "lazy-out")
    for (name, a), b in zip(eager.state_dict().items(), reloaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_saved_model_round_trips_through_from_pretrained(tmp_path):
    save_tiny(tmp_path / "src")
    model, tokenizer = load(tmp_path / "src")
    prune(model, MagnitudeConfig(0.5), engine=EngineConfig(progress=False))
    save_pruned(model, tokenizer, tmp_path / "out", {"method": "magnitude", "metrics": {}})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = tokens(n=1, seqlen=8)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
        generated = reloaded.generate(ids, max_new_tokens=4, do_sample=False)
        assert torch.equal(generated, model.generate(ids, max_new_tokens=4, do_sample=False))
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["method"] == "magnitude"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary left over


def test_existing_output_refused_without_overwrite(tmp_path):
    save_tiny(tmp_path / "src")
    model, tokenizer = load(tmp_path / "src")
    save_pruned(model, tokenizer, tmp_path / "out", {"v": 1})
    with pytest.raises(PrunekitError, match="--overwrite"):
        save_pruned(model, tokenizer, tmp_path / "out", {"v": 2})
    save_pruned(model, tokenizer, tmp_path / "out", {"v": 2}, overwrite=True)
    assert json.loads((tmp_path / "out" / MANIFEST).read_text()) == {"v": 2}


def test_overwrite_never_replaces_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(PrunekitError, match="not a prunekit output"):
        check_output(tmp_path / "mine", overwrite=True)


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    save_tiny(tmp_path / "src")
    model, tokenizer = load(tmp_path / "src")

    def die(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenizer, "save_pretrained", die)
    with pytest.raises(KeyboardInterrupt):
        save_pruned(model, tokenizer, tmp_path / "out", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_interrupted_overwrite_keeps_the_old_output(tmp_path, monkeypatch):
    save_tiny(tmp_path / "src")
    model, tokenizer = load(tmp_path / "src")
    save_pruned(model, tokenizer, tmp_path / "out", {"v": 1})
    monkeypatch.setattr(tokenizer, "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        save_pruned(model, tokenizer, tmp_path / "out", {"v": 2}, overwrite=True)
    assert json.loads((tmp_path / "out" / MANIFEST).read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]

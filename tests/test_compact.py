"""The compact sparse format: exact round trips, smaller files, and unpacking to a plain HF folder."""

import json

import torch
from transformers import AutoModelForCausalLM

from prunekit import load, save_pruned
from prunekit.io.compact import COMPACT_FILE, pack, unpack
from prunekit.methods import MagnitudeConfig, prune
from prunekit.sequential import EngineConfig
from tiny_models import save_tiny, tokens


def test_pack_unpack_is_exact_for_any_shape_and_dtype():
    for shape, dtype in [((7, 13), torch.float32), ((5,), torch.bfloat16), ((3, 4, 9), torch.float16)]:
        t = torch.randn(shape).to(dtype)
        t[torch.rand(shape) < 0.6] = 0
        packed = pack(t)
        assert packed["mask"].dtype == torch.uint8 and packed["mask"].numel() == (t.numel() + 7) // 8
        assert torch.equal(unpack(packed["mask"], packed["values"], list(shape)), t)


def test_compact_folder_is_smaller_and_loads_to_the_same_logits(tmp_path):
    save_tiny(tmp_path / "src")
    model, tokenizer = load(tmp_path / "src")
    prune(model, MagnitudeConfig(0.5), engine=EngineConfig(progress=False))
    save_pruned(model, tokenizer, tmp_path / "dense", {})
    save_pruned(model, tokenizer, tmp_path / "compact", {}, fmt="compact")
    storage = json.loads((tmp_path / "compact" / "prunekit.json").read_text())["storage"]
    assert storage["compact_bytes"] < 0.8 * storage["dense_bytes"]
    assert (tmp_path / "compact" / COMPACT_FILE).stat().st_size < (
        tmp_path / "dense" / "model.safetensors"
    ).stat().st_size

    restored, _ = load(tmp_path / "compact")
    ids = tokens(n=2, seqlen=8)
    with torch.no_grad():
        assert torch.equal(restored(ids).logits, model(ids).logits)


def test_unpack_cli_gives_a_plain_folder(tmp_path):
    import subprocess
    import sys

    save_tiny(tmp_path / "src")
    model, tokenizer = load(tmp_path / "src")
    prune(model, MagnitudeConfig(0.5), engine=EngineConfig(progress=False))
    save_pruned(model, tokenizer, tmp_path / "compact", {"method": "magnitude"}, fmt="compact")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "prunekit.cli",
            "unpack",
            "--model",
            str(tmp_path / "compact"),
            "--out",
            str(tmp_path / "plain"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert json.loads((tmp_path / "plain" / "prunekit.json").read_text())["method"] == "magnitude"

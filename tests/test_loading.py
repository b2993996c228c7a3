"""Loading: local folders, pickle refusal, corrupt files, hub ids offline, unsupported families."""

import pytest
import torch

from prunekit import load
from prunekit.errors import PrunekitError
from prunekit.io.load import resolve_dtype
from tiny_models import save_tiny, tokens


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_local_folder_loads_with_identical_logits(tmp_path):
    original = save_tiny(tmp_path / "m", "llama")
    model, tokenizer = load(tmp_path / "m")
    ids = tokens(n=1, seqlen=8)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)
    assert tokenizer("the fox")["input_ids"]
    assert not model.training


def test_dtype_is_honoured(tmp_path):
    save_tiny(tmp_path / "m")
    model, _ = load(tmp_path / "m", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(PrunekitError, match="unknown dtype"):
        resolve_dtype("float8")


def test_missing_path(tmp_path):
    with pytest.raises(PrunekitError) as err:
        load(tmp_path / "nope")
    assert "does not exist" in one_line(err)


def test_folder_without_config(tmp_path):
    with pytest.raises(PrunekitError) as err:
        load(tmp_path)
    assert "config.json" in one_line(err)


def test_pickle_weights_refused_unless_allowed(tmp_path):
    model = save_tiny(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(PrunekitError) as err:
        load(tmp_path / "m")
    assert "--allow-pickle" in one_line(err)
    loaded, _ = load(tmp_path / "m", allow_pickle=True)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(tmp_path, damage):
    save_tiny(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a safetensors file at all")
    with pytest.raises(PrunekitError) as err:
        load(tmp_path / "m")
    assert "not a valid safetensors file" in one_line(err)


def test_unsupported_architecture_lists_families(tmp_path):
    from transformers import AutoModelForCausalLM, BloomConfig

    AutoModelForCausalLM.from_config(BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=2)).save_pretrained(
        tmp_path
    )
    with pytest.raises(PrunekitError) as err:
        load(tmp_path)
    message = one_line(err)
    assert "unsupported architecture 'bloom'" in message
    for family in ("Llama", "OPT", "GPT-2", "Phi-3", "Gemma 3"):
        assert family in message


@pytest.mark.parametrize("offline_flag", ["1", "0"])
def test_hub_id_offline_gives_one_line(monkeypatch, offline_flag):
    """Set or not, HF_HUB_OFFLINE gets the same quick answer when the hub cannot be reached."""
    import prunekit.io.load

    monkeypatch.setenv("HF_HUB_OFFLINE", offline_flag)
    monkeypatch.setattr(prunekit.io.load, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(PrunekitError) as err:
        load("some-org/some-model")
    message = one_line(err)
    assert "some-org/some-model" in message and "local model folder" in message and "smollm2-135m" in message


def test_unknown_alias_gives_one_line(monkeypatch):
    import prunekit.io.load

    monkeypatch.setattr(prunekit.io.load, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(PrunekitError) as err:
        load("smollm3-999m")
    assert "smollm2-135m" in one_line(err)


def test_remote_code_stays_off(tmp_path):
    import json

    save_tiny(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"}
    config["model_type"] = "custom-thing"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    (tmp_path / "m" / "custom.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(PrunekitError) as err:
        load(tmp_path / "m")
    assert "--trust-remote-code" in one_line(err)

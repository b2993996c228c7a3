"""The CLI as a new user runs it: real subprocesses, one-line errors, nothing half-written."""

import json
import subprocess
import sys

import pytest

from tiny_models import SAMPLE_TEXT, save_tiny


def run(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "prunekit.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def error_line(result) -> str:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("prunekit: error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny"
    save_tiny(folder, "llama")
    text = folder.parent / "corpus.txt"
    text.write_text(SAMPLE_TEXT)
    return folder


def test_prune_then_eval(tiny_folder, tmp_path):
    corpus = str(tiny_folder.parent / "corpus.txt")
    out = tmp_path / "pruned"
    result = run(
        "prune",
        "--model",
        str(tiny_folder),
        "--method",
        "magnitude",
        "--sparsity",
        "0.5",
        "--out",
        str(out),
        "--eval",
        corpus,
        "--eval-seqlen",
        "16",
        "--device",
        "cpu",
        "--json",
        str(tmp_path / "r.json"),
    )
    assert result.returncode == 0, result.stderr
    assert "perplexity" in result.stdout and "50.0%" in result.stdout
    manifest = json.loads((out / "prunekit.json").read_text())
    assert manifest["method_config"]["sparsity"] == 0.5 and manifest["method_config"]["scope"] == "layer"
    assert manifest["source_model"]["sha256"] and manifest["metrics"]["ppl_after"]["seqlen"] == 16
    assert json.loads((tmp_path / "r.json").read_text())["out"] == str(out)
    assert not (tmp_path / ".pruned.checkpoint").exists()

    result = run(
        "eval", "ppl", "--model", str(out), "--data", corpus, "--seqlen", "16", "--json", str(tmp_path / "ppl.json")
    )
    assert result.returncode == 0, result.stderr
    ppl = json.loads((tmp_path / "ppl.json").read_text())
    assert ppl["ppl"] == pytest.approx(manifest["metrics"]["ppl_after"]["ppl"], rel=1e-6)


def test_prune_with_calibration_and_lazy(tiny_folder, tmp_path):
    corpus = str(tiny_folder.parent / "corpus.txt")
    result = run(
        "prune",
        "--model",
        str(tiny_folder),
        "--method",
        "magnitude",
        "--out",
        str(tmp_path / "o"),
        "--calib",
        corpus,
        "--nsamples",
        "4",
        "--seqlen",
        "16",
        "--lazy",
        "--device",
        "cpu",
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "o" / "prunekit.json").read_text())
    assert manifest["calibration"]["n_samples"] == 4 and manifest["calibration"]["seed"] == 0


def test_missing_model(tmp_path):
    line = error_line(run("eval", "ppl", "--model", str(tmp_path / "missing"), "--data", "pydoc"))
    assert "does not exist" in line


def test_seqlen_larger_than_data(tiny_folder):
    corpus = str(tiny_folder.parent / "corpus.txt")
    line = error_line(run("eval", "ppl", "--model", str(tiny_folder), "--data", corpus, "--seqlen", "100000"))
    assert "larger than the data" in line


def test_output_exists_is_refused_before_any_work(tiny_folder, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    line = error_line(
        run("prune", "--model", str(tiny_folder), "--method", "magnitude", "--out", str(tmp_path / "out"))
    )
    assert "--overwrite" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_wanda_needs_calibration_and_rejects_foreign_options(tiny_folder, tmp_path):
    assert "--calib" in error_line(
        run("prune", "--model", str(tiny_folder), "--method", "wanda", "--out", str(tmp_path / "o"))
    )
    assert "--owl does not apply to --method magnitude" in error_line(
        run("prune", "--model", str(tiny_folder), "--method", "magnitude", "--owl", "--out", str(tmp_path / "o"))
    )
    assert "--nm" in error_line(
        run(
            "prune",
            "--model",
            str(tiny_folder),
            "--method",
            "wanda",
            "--nm",
            "4:2",
            "--calib",
            "pydoc",
            "--out",
            str(tmp_path / "o"),
        )
    )
    assert not (tmp_path / "o").exists()


def test_wanda_nm_end_to_end(tiny_folder, tmp_path):
    corpus = str(tiny_folder.parent / "corpus.txt")
    result = run(
        "prune",
        "--model",
        str(tiny_folder),
        "--method",
        "wanda",
        "--nm",
        "2:4",
        "--calib",
        corpus,
        "--nsamples",
        "4",
        "--seqlen",
        "16",
        "--out",
        str(tmp_path / "o"),
        "--device",
        "cpu",
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "o" / "prunekit.json").read_text())
    assert manifest["method"] == "wanda" and manifest["method_config"]["nm"] == "2:4"
    assert set(manifest["metrics"]["layer_sparsity"].values()) == {0.5}


def test_unknown_method_and_bad_sparsity(tiny_folder, tmp_path):
    assert "available: magnitude, wanda, sparsegpt" in error_line(
        run("prune", "--model", str(tiny_folder), "--method", "nope", "--out", str(tmp_path / "o"))
    )
    assert "--sparsity" in error_line(
        run(
            "prune",
            "--model",
            str(tiny_folder),
            "--method",
            "magnitude",
            "--sparsity",
            "1.2",
            "--out",
            str(tmp_path / "o"),
        )
    )
    assert not (tmp_path / "o").exists()


def test_corrupt_weights_leave_no_output(tiny_folder, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_folder, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    line = error_line(run("prune", "--model", str(broken), "--method", "magnitude", "--out", str(tmp_path / "o")))
    assert "not a valid safetensors file" in line
    assert not (tmp_path / "o").exists()


def test_prune_retrain_end_to_end(tiny_folder, tmp_path):
    corpus = str(tiny_folder.parent / "corpus.txt")
    result = run(
        "prune-retrain",
        "--model",
        str(tiny_folder),
        "--schedule",
        "0.3,0.6",
        "--steps",
        "2",
        "--train-data",
        corpus,
        "--train-seqlen",
        "16",
        "--eval",
        corpus,
        "--eval-seqlen",
        "16",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "o"),
    )
    assert result.returncode == 0, result.stderr
    assert "stage 1: sparsity 60.0%" in result.stdout
    stages = json.loads((tmp_path / "o" / "prunekit.json").read_text())["metrics"]["stages"]
    assert [s["sparsity"] for s in stages] == [0.3, 0.6] and all("metric" in s for s in stages)
    assert "--schedule" in error_line(
        run("prune-retrain", "--model", str(tiny_folder), "--schedule", "0.6,0.3", "--out", str(tmp_path / "p"))
    )


def test_width_end_to_end_loads_in_plain_transformers(tiny_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    result = run(
        "prune",
        "--model",
        str(tiny_folder),
        "--method",
        "width",
        "--target-params",
        "0.25",
        "--importance",
        "magnitude-l2",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "w"),
    )
    assert result.returncode == 0, result.stderr
    assert "removed" in result.stdout
    manifest = json.loads((tmp_path / "w" / "prunekit.json").read_text())
    m = manifest["metrics"]
    assert m["params_after"]["non_embedding"] < 0.8 * m["params_before"]["non_embedding"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "w")
    assert model.config.intermediate_size == m["blocks"][0]["intermediate_size"]
    assert "--sparsity does not apply to --method width" in error_line(
        run(
            "prune", "--model", str(tiny_folder), "--method", "width", "--sparsity", "0.5", "--out", str(tmp_path / "x")
        )
    )


def test_width_recipes_end_to_end(tiny_folder, tmp_path):
    corpus = str(tiny_folder.parent / "corpus.txt")
    common = ["--model", str(tiny_folder), "--method", "width", "--device", "cpu", "--calib", corpus]
    # LLM-Pruner: Taylor on blocks 4:-2; the tiny model has 2 blocks, so the range is given explicitly
    out = tmp_path / "llmp"
    result = run("prune", *common, "--recipe", "llm-pruner", "--layers", "1:", "--seqlen", "16", "--out", str(out))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "prunekit.json").read_text())
    assert manifest["method_config"]["importance"] == "taylor" and manifest["method_config"]["layers"] == "1:"
    assert manifest["calibration"]["n_samples"] == 10  # the recipe's sample count
    assert "shapes" in manifest  # block 0 kept dense, block 1 pruned: a config cannot say that
    evaluated = run(
        "eval", "ppl", "--model", str(out), "--data", corpus, "--seqlen", "16", "--json", str(tmp_path / "e")
    )
    assert evaluated.returncode == 0, evaluated.stderr
    # FLAP: fluctuation, global allocation, bias compensation (Llama's config carries the biases)
    out = tmp_path / "flap"
    result = run("prune", *common, "--recipe", "flap", "--nsamples", "8", "--out", str(out))
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["mlp_bias"] or config["attention_bias"]
    assert "unknown --recipe 'sheared'" in error_line(run("prune", *common, "--recipe", "sheared", "--out", str(out)))
    assert "--recipe applies to --method width" in error_line(
        run("prune", "--model", str(tiny_folder), "--method", "wanda", "--recipe", "flap", "--out", str(tmp_path / "z"))
    )


def test_bench_compares_models_in_one_run(tiny_folder, tmp_path):
    from prunekit import load

    sliced = tmp_path / "pruned"
    pruned = run("prune", "--model", str(tiny_folder), "--method", "depth", "--criterion", "magnitude",
                 "--remove", "1", "--out", str(sliced))  # fmt: skip
    assert pruned.returncode == 0, pruned.stderr
    out = tmp_path / "bench.json"
    result = run("bench", "--model", str(tiny_folder), "--model", str(sliced), "--batch-sizes", "1,2",
                 "--prompt-lengths", "8", "--new-tokens", "3", "--repeats", "1", "--json", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert len(report["speed"]) == 4 and report["baseline"] == str(tiny_folder)
    dense, half = (report["models"][str(f)] for f in (tiny_folder, sliced))
    assert half["prefill_macs_per_token"]["8"] < dense["prefill_macs_per_token"]["8"]  # one of two blocks left
    model, _ = load(tiny_folder)
    assert dense["params"]["total"] == sum(p.numel() for p in model.parameters())
    assert all(r["prefill_speedup"] == 1.0 for r in report["ratios"] if r["model"] == str(tiny_folder))
    assert "--batch-sizes must be comma-separated" in error_line(run("bench", "--model", str(tiny_folder),
                                                                     "--batch-sizes", "one"))  # fmt: skip

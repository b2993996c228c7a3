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


# -- bad input: one line (`prunekit: error: ...`, exit 2) that names the flag or file, never a traceback ---------------


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.fixture(scope="module")
def bad_inputs(tiny_folder):
    """Folders a user might point prunekit at by mistake, beside the tiny model, and a deeper (8-block) model."""
    import shutil

    from transformers import AutoModelForCausalLM

    from tiny_models import CONFIGS, tiny_tokenizer

    root = tiny_folder.parent / "bad"
    root.mkdir()

    def copy(name):
        shutil.copytree(tiny_folder, root / name)
        return root / name

    (copy("not-json") / "config.json").write_text("{not json")
    _edit_config(copy("no-model-type"), model_type=None)
    _edit_config(copy("unknown-type"), model_type="nonsense")
    _edit_config(copy("bad-heads"), num_attention_heads=5)  # hidden 64 is no multiple of 5
    _edit_config(copy("wider"), hidden_size=96)  # the weights are 64 wide
    _edit_config(copy("deeper-config"), num_hidden_layers=3)  # the weights hold 2 blocks
    (copy("no-weights") / "model.safetensors").unlink()
    config = CONFIGS["llama"]()
    config.num_hidden_layers = 8
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "deep")
    tiny_tokenizer().save_pretrained(root / "deep")
    return root


BAD_INPUTS = [
    # the model folder
    (["eval", "ppl", "--model", "{bad}/not-json"], "config.json is not valid JSON"),
    (["eval", "ppl", "--model", "{bad}/no-model-type"], 'no usable "model_type"'),
    (["eval", "ppl", "--model", "{bad}/unknown-type"], "model_type 'nonsense', which this transformers does not know"),
    (["eval", "ppl", "--model", "{bad}/bad-heads"], "does not describe a valid llama model (The hidden size"),
    (["eval", "ppl", "--model", "{bad}/wider"], "do not have the shape its config.json describes"),
    (["eval", "ppl", "--model", "{bad}/deeper-config"], "lacks 9 weight(s) its config.json describes"),
    (["prune", "--model", "{bad}/deeper-config", "--method", "magnitude", "--lazy", "--out", "{tmp}/o"], "lacks 9"),
    (["eval", "ppl", "--model", "{bad}/no-weights"], "holds no weights"),
    (["eval", "ppl", "--model", "{bad}/missing"], "does not exist"),
    (["eval", "ppl", "--model", "{corpus}"], "is a file; pass the model folder"),
    (["bench", "--model", "{bad}/missing"], "does not exist"),
    (["unpack", "--model", "{bad}/missing", "--out", "{tmp}/o"], "--model {bad}/missing is not a folder"),
    # evaluation options
    (["eval", "ppl", "--model", "{tiny}", "--max-windows", "-1"], "--max-windows must be at least 1"),
    (["eval", "ppl", "--model", "{tiny}", "--seqlen", "0"], "--seqlen must be at least 2"),
    (["eval", "ppl", "--model", "{tiny}", "--data", "nope"], "unknown data 'nope'"),
    (["eval", "ppl", "--model", "{tiny}", "--json", "{corpus}/r.json"], "--json {corpus}/r.json"),
    (["eval", "ppl", "--model", "{tiny}", "--device", "tpu"], "unknown --device 'tpu'"),
    # prune: calibration, outputs
    (["prune", "--model", "{tiny}", "--method", "wanda", "--calib", "{corpus}", "--nsamples", "0", "--out", "{tmp}/o"],
     "--nsamples must be at least 1"),
    (["prune", "--model", "{tiny}", "--method", "wanda", "--calib", "{corpus}", "--seqlen", "-3", "--out", "{tmp}/o"],
     "--seqlen must be at least 2"),
    (["prune", "--model", "{tiny}", "--method", "wanda", "--calib", "nope", "--out", "{tmp}/o"], "unknown data 'nope'"),
    (["prune", "--model", "{tiny}", "--method", "magnitude", "--out", "{corpus}/o"], "--out {corpus}/o: {corpus} is a"),
    (["prune", "--model", "{tiny}", "--method", "magnitude", "--checkpoint-dir", "{corpus}/c", "--out", "{tmp}/o"],
     "--checkpoint-dir {corpus}/c"),
    (["prune", "--model", "{tiny}", "--method", "magnitude", "--nm", "two:four", "--out", "{tmp}/o"], "--nm must look"),
    (["prune", "--model", "{tiny}", "--method", "magnitude", "--include", "mpl.*", "--out", "{tmp}/o"],
     "--include 'mpl.*' matches no linear"),
    (["prune", "--model", "{tiny}", "--method", "magnitude", "--force", "--out", "{tmp}/o"],
     "--force does not apply to --method magnitude"),
    # prune: targets that leave a husk (depth: under a quarter of the blocks; width: under a tenth of the neurons)
    (["prune", "--model", "{bad}/deep", "--method", "depth", "--criterion", "magnitude", "--target-params", "0.99",
      "--out", "{tmp}/o"], "--target-params 0.99 would keep 1 of 8 blocks, fewer than a quarter (2)"),
    (["prune", "--model", "{bad}/deep", "--method", "depth", "--criterion", "magnitude", "--remove", "7",
      "--out", "{tmp}/o"], "--remove 7 would keep 1 of 8 blocks"),
    (["prune", "--model", "{bad}/deep", "--method", "depth", "--criterion", "magnitude", "--remove", "8",
      "--force", "--out", "{tmp}/o"], "cannot remove all 8 blocks"),
    (["prune", "--model", "{tiny}", "--method", "depth", "--criterion", "magnitude", "--unit", "attention",
      "--remove", "2", "--force", "--out", "{tmp}/o"], "would remove all 2 attention sub-layers"),
    (["prune", "--model", "{tiny}", "--method", "width", "--num-heads", "0", "--out", "{tmp}/o"],
     "--num-heads must be at least 1"),
    (["prune", "--model", "{tiny}", "--method", "width", "--importance", "magnitude-l2", "--intermediate-size", "8",
      "--out", "{tmp}/o"], "would keep 16 of the 256 MLP neurons of the pruned blocks (6.2%), under a tenth"),
    (["prune", "--model", "{tiny}", "--method", "width", "--target-params", "0.3", "--intermediate-size", "64",
      "--out", "{tmp}/o"], "not both"),
    (["prune", "--model", "{tiny}", "--method", "hidden", "--calib", "{corpus}", "--ratio", "1.5", "--out", "{tmp}/o"],
     "--ratio must be a fraction in (0, 1), got 1.5"),
    (["prune", "--model", "{tiny}", "--method", "hidden", "--calib", "{corpus}", "--hidden-size", "8", "--round-to",
      "8", "--nsamples", "2", "--seqlen", "16", "--out", "{tmp}/o"],
     "--hidden-size 8 would keep 8 of the 64 hidden channels, under a quarter"),
    (["prune", "--model", "{tiny}", "--method", "hidden", "--calib", "{corpus}", "--ratio", "0.2", "--target-params",
      "0.2", "--out", "{tmp}/o"], "exactly one of --ratio, --target-params or --hidden-size"),
    # recovery
    (["recover", "--model", "{tiny}", "--data", "{corpus}", "--steps", "0", "--out", "{tmp}/o"], "--steps"),
    (["recover", "--model", "{tiny}", "--data", "{corpus}", "--lora-r", "0", "--out", "{tmp}/o"], "--lora-r must be"),
    (["recover", "--model", "{tiny}", "--data", "{corpus}", "--warmup-steps", "-1", "--out", "{tmp}/o"],
     "--warmup-steps must be at least 0"),
    (["recover", "--model", "{tiny}", "--data", "{corpus}", "--mode", "distill", "--teacher", "{tiny}",
      "--teacher-topk", "0", "--out", "{tmp}/o"], "--teacher-topk must be at least 1"),
    (["recover", "--model", "{tiny}", "--data", "{corpus}", "--out", "{corpus}/o"], "{corpus} is a file"),
    (["prune-retrain", "--model", "{tiny}", "--train-data", "{corpus}", "--train-seqlen", "0", "--out", "{tmp}/o"],
     "--train-seqlen must be at least 2"),
]  # fmt: skip


@pytest.mark.parametrize("args, message", BAD_INPUTS, ids=[f"{a[0]}: {m[:48]}" for a, m in BAD_INPUTS])
def test_bad_input_is_one_line(tiny_folder, bad_inputs, tmp_path, args, message):
    """In-process (a subprocess per case would take minutes): exit 2, one error line, no exception escaping."""
    from typer.testing import CliRunner

    from prunekit.cli import app

    places = {"tiny": tiny_folder, "bad": bad_inputs, "corpus": tiny_folder.parent / "corpus.txt", "tmp": tmp_path}
    fill = lambda text: text.format(**places)  # noqa: E731
    args = [fill(a) for a in args]
    if args[:2] == ["eval", "ppl"]:  # everything else valid: the small corpus, in short windows
        args += [] if "--data" in args else ["--data", fill("{corpus}")]
        args += [] if "--seqlen" in args else ["--seqlen", "16"]
    if args[0] in ("eval", "prune") and "--device" not in args:
        args += ["--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, SystemExit) and result.exit_code == 2, (result.exception, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.startswith("prunekit: error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert fill(message) in lines[0]
    assert not (tmp_path / "o").exists()


def test_force_lets_a_husk_through(bad_inputs, tmp_path):
    from typer.testing import CliRunner

    from prunekit.cli import app

    args = ["prune", "--model", str(bad_inputs / "deep"), "--method", "depth", "--criterion", "magnitude",
            "--target-params", "0.99", "--force", "--device", "cpu", "--out", str(tmp_path / "o")]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((tmp_path / "o" / "prunekit.json").read_text())
    assert manifest["method_config"]["force"] is True and len(manifest["metrics"]["blocks"]) == 7


# -- the generated CLI ---------------------------------------------------------------------------------


def test_every_method_option_is_generated_with_its_docstring_as_help():
    """Each CLI field of each registered config has help text and an option in `prune --help`; a field added
    without a docstring fails here instead of reaching users as a bare flag."""
    import dataclasses

    from typer.testing import CliRunner

    from prunekit.cli import app
    from prunekit.methods import CONFIGS
    from prunekit.options import cli_fields, field_docs

    result = CliRunner().invoke(app, ["prune", "--help"], env={"TERMINAL_WIDTH": "200"})
    assert result.exit_code == 0, result.output
    for cls in CONFIGS.values():
        docs = field_docs(cls)
        for field in cli_fields(cls):
            assert docs.get(field.name), f"{cls.__name__}.{field.name} has no docstring"
            flag = field.metadata.get("flag", f"--{field.name.replace('_', '-')}").split("/")[0]
            assert flag in result.output, flag
    assert dataclasses.is_dataclass(CONFIGS["width"])


def test_field_docs_reads_the_string_under_each_field():
    import dataclasses

    from prunekit.options import field_docs

    @dataclasses.dataclass
    class Example:
        alpha: int = 1
        """First line,
        second line."""
        beta: str = "b"  # a comment is not help
        gamma: float = 0.5
        """Gamma."""

    assert field_docs(Example) == {"alpha": "First line, second line.", "gamma": "Gamma."}


def test_a_recipe_file_sets_options_and_flags_win(tiny_folder, tmp_path):
    """`--config` takes a YAML or JSON file of the same options; a flag given on the command line wins over it."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: magnitude\nsparsity: 0.25\nnm: null\ndevice: cpu\n")
    result = run("prune", "--model", str(tiny_folder), "--config", str(recipe), "--out", str(tmp_path / "a"))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "a" / "prunekit.json").read_text())
    assert manifest["method"] == "magnitude" and manifest["method_config"]["sparsity"] == 0.25
    (tmp_path / "r.json").write_text(json.dumps({"method": "magnitude", "sparsity": 0.25, "device": "cpu"}))
    args = ["prune", "--model", str(tiny_folder), "--config", str(tmp_path / "r.json"), "--sparsity", "0.5"]
    assert run(*args, "--out", str(tmp_path / "b")).returncode == 0
    assert json.loads((tmp_path / "b" / "prunekit.json").read_text())["method_config"]["sparsity"] == 0.5
    (tmp_path / "bad.yaml").write_text("method: magnitude\nsparsty: 0.3\n")
    bad = run(
        "prune", "--model", str(tiny_folder), "--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "c")
    )
    assert "--config: unknown option 'sparsty'" in error_line(bad)
    assert "pass --method" in error_line(run("prune", "--model", str(tiny_folder), "--out", str(tmp_path / "d")))


def test_gptq_from_the_command_line_saves_compressed_tensors_that_transformers_runs(tiny_folder, tmp_path):
    """`--method gptq` options come from GPTQConfig; the folder is compressed-tensors, loaded by stock transformers."""
    pytest.importorskip("compressed_tensors")
    import torch
    from transformers import AutoModelForCausalLM

    from prunekit import load

    corpus = str(tiny_folder.parent / "corpus.txt")
    common = ["prune", "--model", str(tiny_folder), "--method", "gptq", "--calib", corpus, "--nsamples", "4",
              "--seqlen", "16", "--device", "cpu"]  # fmt: skip
    assert "use --group-size" in error_line(run(*common, "--group-size", "48", "--out", str(tmp_path / "bad")))
    assert not (tmp_path / "bad").exists()
    result = run(*common, "--bits", "4", "--group-size", "16", "--asym", "--out", str(tmp_path / "q"))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "q" / "prunekit.json").read_text())
    assert manifest["method"] == "gptq" and manifest["storage"] == {"format": "compressed-tensors", "bits": 4}
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    ours, _ = load(tmp_path / "q")
    ids = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        assert torch.allclose(stock(ids).logits, ours(ids).logits, atol=1e-4)


def test_export_gguf_from_the_command_line(tiny_folder, tmp_path):
    """`prunekit export` writes one GGUF file the gguf package reads back; bad options are one line, no file."""
    gguf = pytest.importorskip("gguf")
    out = tmp_path / "tiny.gguf"
    result = run("export", "--model", str(tiny_folder), "--out", str(out), "--json", str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stderr
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["general.architecture"].contents() == "llama"
    assert json.loads((tmp_path / "r.json").read_text())["arch"] == "llama"
    assert "--format must be gguf" in error_line(run("export", "--model", str(tiny_folder), "--format", "onnx",
                                                     "--out", str(tmp_path / "x.gguf")))  # fmt: skip
    assert "--quant" in error_line(run("export", "--model", str(tiny_folder), "--quant", "q5_9",
                                       "--out", str(tmp_path / "y.gguf")))  # fmt: skip
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()

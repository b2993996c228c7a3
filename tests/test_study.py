"""The study: every point measured against dense, cached so a rerun or an extension runs only what is
missing, written as results, a Markdown report and a figure."""

import json

from prunekit.plots import pareto
from prunekit.study import StudyConfig, run_study, table_rows
from test_cli import error_line, run
from tiny_models import SAMPLE_TEXT, save_tiny


def test_pareto_front_keeps_the_undominated_points():
    points = [(1.0, 10.0), (0.8, 12.0), (0.9, 15.0), (0.5, 40.0), (0.5, 50.0)]
    # fewer parameters and lower perplexity are both better: (0.9, 15) loses to (0.8, 12)
    assert pareto(points, x_high=False, y_high=False) == [(0.5, 40.0), (0.8, 12.0), (1.0, 10.0)]
    speed = [(1.0, 10.0), (1.3, 12.0), (1.2, 20.0)]  # a higher speed-up is better
    assert pareto(speed, x_high=True, y_high=False) == [(1.0, 10.0), (1.3, 12.0)]


def tiny_study(tmp_path, **overrides) -> StudyConfig:
    folder = tmp_path / "tiny"
    if not folder.exists():
        save_tiny(folder, "llama")
        (tmp_path / "corpus.txt").write_text(SAMPLE_TEXT)
    corpus = str(tmp_path / "corpus.txt")
    settings = dict(model=str(folder), methods=("width", "depth", "slicegpt", "wanda"), ratios=(0.25,), calib=corpus,
                    nsamples=4, calib_seqlen=16, eval_data=corpus, eval_seqlen=16, max_windows=2, train_data=corpus,
                    train_seqlen=16, prompt_tokens=8, new_tokens=4, repeats=3, progress=False)  # fmt: skip
    return StudyConfig(**{**settings, **overrides})


def test_study_measures_every_point_and_writes_report_and_plot(tmp_path):
    out = tmp_path / "study"
    result = run_study(tiny_study(tmp_path), out, progress=lambda line: None)
    rows = table_rows(result)
    assert [r["point"] for r in rows] == ["dense", "width 25%", "depth 25%", "slicegpt 25%", "wanda 25%"]
    by_point = {r["point"]: r for r in rows}
    assert by_point["dense"]["params_share"] == 1.0
    assert 0.6 < by_point["width 25%"]["params_share"] < 0.9  # a quarter of the non-embedding parameters
    assert by_point["wanda 25%"]["params_share"] < 0.8  # sparse methods count non-zero weights
    saved = json.loads((out / "results.json").read_text())
    assert saved["provenance"]["model_sha256"] and saved["provenance"]["eval_data"]["sha256"]
    assert "| width 25% |" in (out / "report.md").read_text()
    assert (out / "study.png").read_bytes()[:4] == b"\x89PNG"

    wanda = by_point["wanda 25%"]  # every point is timed interleaved with dense: median ratio, quartiles, a flag
    assert wanda["prefill_speedup_q1"] <= wanda["prefill_speedup"] <= wanda["prefill_speedup_q3"]
    assert isinstance(wanda["decode_speedup_readable"], bool)
    assert by_point["dense"]["prefill_speedup"] == 1.0
    assert saved["points"][0]["speed"]["settings"]["interleaved"]
    assert (out / "points" / "width-0.25" / "config.json").is_file()  # the point's model, kept for re-timing

    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "points").glob("*.json")}
    lines = []
    extended = run_study(tiny_study(tmp_path, ratios=(0.25, 0.5)), out, progress=lines.append)
    assert len(extended.points) == 8
    assert all((out / "points" / name).stat().st_mtime_ns == stamp for name, stamp in stamps.items())  # reused
    # a cached point keeps its quality figures but is timed again beside dense in the new run
    assert not any(line.startswith("wanda 0.25: pruning") for line in lines)
    assert any(line.startswith("wanda-0.25: prefill") for line in lines)
    assert [p["ppl"] for p in extended.points if p["ratio"] == 0.25] == [p["ppl"] for p in result.points]


def test_study_with_recovery_adds_recovered_points(tmp_path):
    config = tiny_study(tmp_path, methods=("depth",), recover="lora", recover_steps=2, recover_lr=3e-4)
    result = run_study(config, tmp_path / "study", progress=lambda line: None)
    assert [p["recover"] for p in result.points] == [None, "lora"]
    assert result.points[1]["recovery"]["steps"] == 2
    assert result.points[1]["recovery"]["lr"] == 3e-4
    report = (tmp_path / "study" / "report.md").read_text()
    assert "Recovery: lora, 2 steps of 8 x 16 tokens (256 tokens)" in report


def test_study_command_refuses_bad_input(tmp_path):
    assert "--methods: unknown ['height']" in error_line(run("study", "--out", str(tmp_path), "--methods", "height"))
    assert "--ratios must be fractions" in error_line(run("study", "--out", str(tmp_path), "--ratios", "1.5"))


def test_study_with_zero_shot_tasks_plots_their_mean(tmp_path):
    from conftest import require_local_data

    require_local_data("piqa/valid.jsonl", "piqa/valid-labels.lst")
    config = tiny_study(tmp_path, methods=("depth",), tasks=("piqa",), task_limit=3)
    result = run_study(config, tmp_path / "study", progress=lambda line: None)
    rows = table_rows(result)
    assert all(0 <= r["zeroshot_avg"] <= 1 for r in rows)
    assert result.points[0]["zeroshot"]["tasks"]["piqa"]["items"] == 3
    report = (tmp_path / "study" / "report.md").read_text()
    assert "| point | piqa | mean |" in report and "| depth 25% | " in report
    assert "| chance | 0.500 | 0.500 |" in report  # PIQA has two choices per item


def test_study_quantizes_every_point_and_adds_a_size_table_and_panel(tmp_path):
    """--quant w4: dense and every point also quantized by GPTQ, each smaller than its 16-bit self; cached like
    points, and adding a variant later does not re-prune (the points' keys ignore --quant)."""
    from prunekit.study_size import size_rows

    out = tmp_path / "study"
    run_study(tiny_study(tmp_path, methods=("width", "wanda")), out, progress=lambda line: None)
    lines = []
    result = run_study(tiny_study(tmp_path, methods=("width", "wanda"), quant=("w8", "w4")), out, progress=lines.append)
    assert not any("pruning" in line for line in lines)  # the points came from cache
    sizes = {s["point"]: s for s in size_rows(table_rows(result))}
    assert set(sizes) == {f"{p}{q}" for p in ("dense", "width 25%", "wanda 25%") for q in ("", " w8", " w4")}
    for point in ("dense", "width 25%"):
        assert sizes[f"{point} w4"]["megabytes"] < sizes[f"{point} w8"]["megabytes"] < sizes[point]["megabytes"]
        assert sizes[f"{point} w4"]["bits"] == 4 and sizes[point]["bits"] == 16
    assert sizes["width 25%"]["megabytes"] < sizes["dense"]["megabytes"]
    report = (out / "report.md").read_text()
    assert "| dense w4 | 4 (group 32) |" in report or "| dense w4 | 4 (group" in report
    assert (out / "points" / "width-0.25+w4.json").is_file()


def test_study_refuses_an_unknown_quant_variant(tmp_path):
    import pytest

    from prunekit.errors import PrunekitError

    with pytest.raises(PrunekitError, match="--quant: unknown"):
        tiny_study(tmp_path, quant=("w5",))

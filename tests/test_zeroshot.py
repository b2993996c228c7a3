"""Zero-shot evaluation: the metrics by hand, the local tasks against lm-eval's own task definitions, and the
loglikelihoods against lm-eval's HFLM on the same requests."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from conftest import needs_local_data, require_local_data
from prunekit.data import find_local
from prunekit.errors import PrunekitError
from prunekit.evaluate.zeroshot import (
    TASKS,
    Doc,
    choose,
    evaluate_zeroshot,
    lm_eval_model,
    load_task,
    loglikelihoods,
    score_docs,
)
from test_cli import error_line, run
from tiny_models import COMMON, save_tiny


def local_task(name, limit=None):
    require_local_data(*TASKS[name].files)
    return load_task(name, limit)


# -- the metrics, by hand ------------------------------------------------------------------------------


def test_acc_and_acc_norm_choose_differently():
    # raw: -10 > -12 picks the short answer; per character: -10/5 = -2.0 < -12/20 = -0.6 picks the long one
    assert choose([-10.0, -12.0], ["short", "a much longer answer"]) == (0, 1)
    docs = [Doc(((("q", " short"), ("q", " a much longer answer"))), ("short", "a much longer answer"), 1)]
    result = score_docs("piqa", docs, [(-10.0, False), (-12.0, False)])
    assert (result.acc, result.acc_norm, result.chance, result.predictions) == (0.0, 1.0, 0.5, [0])


def test_acc_norm_divides_by_characters_not_bytes_and_ties_go_to_the_first():
    # "éé": 2 characters, 4 bytes. Per character -3/2 < -3/3 picks "abc"; per byte -3/4 > -3/3 would pick "éé".
    assert choose([-3.0, -3.0], ["éé", "abc"]) == (0, 1)


def test_lambada_metrics_are_greedy_accuracy_and_the_perplexity_of_the_mean_loglikelihood():
    docs = [Doc((("a b", " c"),), (), 0), Doc((("d e", " f"),), (), 0)]
    result = score_docs("lambada", docs, [(-1.0, True), (-3.0, False)])
    assert result.acc == 0.5 and result.perplexity == pytest.approx(math.exp(2.0))
    assert result.acc_norm is None and result.chance is None


def test_winogrande_and_boolq_report_acc_only_as_lm_eval_does():
    docs = [Doc((("a x", " end"), ("a y", " end")), ("a x", "a y"), 0)]
    assert score_docs("winogrande", docs, [(-1.0, False), (-2.0, False)]).acc_norm is None


# -- the local tasks -------------------------------------------------------------------------------------

# The first item of each set, as lm-eval's task definition renders it: (context, gold continuation, choices).
FIRST = {
    "piqa": ("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:", " Provide the guinea", 2),
    "arc_easy": (
        "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:",
        " Sunlight is the source of energy for nearly all ecosystems.",
        4,
    ),
    "arc_challenge": ("Question: An astronomer observes", " Planetary days will become shorter.", 4),
    "hellaswag": ("Roof shingle removal: A man is sitting on a roof. He", " starts pulling up roofing on a roof.", 4),
    "winogrande": ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.", 2),
    "boolq": ("Ethanol fuel -- All biomass goes through", " no", 2),
    "openbookqa": ("A person wants to start saving money so that", " quit eating lunch out", 4),
    "lambada": ("In my palm is a clear stone", " signs", 1),
}


@pytest.mark.parametrize("name", list(TASKS))
def test_each_local_task_builds_lm_evals_requests(name):
    docs = local_task(name, limit=5)
    assert len(docs) == 5
    for doc in docs:
        assert all(isinstance(c, str) and c and cont.startswith(" ") for c, cont in doc.requests)
        assert 0 <= doc.gold < len(doc.requests)
        if name != "lambada":
            assert len(doc.choices) == len(doc.requests) >= 2
    context, gold, n = FIRST[name]
    first = docs[0]
    assert len(first.requests) == n
    assert first.requests[first.gold][0].startswith(context) and first.requests[first.gold][1].startswith(gold)
    if name in ("piqa", "arc_easy", "arc_challenge", "boolq"):
        assert first.requests[0][0].endswith("\nAnswer:")


@needs_local_data(*(f for task in TASKS.values() for f in task.files))
def test_full_sets_have_their_official_sizes():
    sizes = {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "winogrande": 1267, "boolq": 3270}
    sizes |= {"openbookqa": 500, "lambada": 5153, "hellaswag": 10042}
    for name, size in sizes.items():
        assert len(local_task(name)) == size


def test_unknown_task_limit_and_missing_files_are_clear(monkeypatch, tmp_path):
    with pytest.raises(PrunekitError, match="unknown zero-shot task 'piqq'; available: piqa, arc_easy"):
        load_task("piqq")
    with pytest.raises(PrunekitError, match="--limit must be at least 1"):
        load_task("piqa", limit=0)
    monkeypatch.setattr("prunekit.evaluate.zeroshot.data_dirs", lambda: [tmp_path])
    monkeypatch.setattr("prunekit.evaluate.zeroshot.find_local", lambda relative: None)
    with pytest.raises(PrunekitError, match=r"needs piqa/valid.jsonl.*\.\./shared/data/piqa.*PRUNEKIT_DATA"):
        load_task("piqa")


# -- against lm-eval's own task code ------------------------------------------------------------------


def lm_eval_task(name, rows):
    """lm-eval's ConfigurableTask from its installed YAML, fed ``rows`` (hub layout) instead of the hub."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'prunekit[eval]')")
    from pathlib import Path

    import datasets
    import lm_eval
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    yaml = {
        "piqa": "piqa/piqa.yaml",
        "arc_easy": "arc/arc_easy.yaml",
        "winogrande": "winogrande/default.yaml",
        "boolq": "super_glue/boolq/default.yaml",
        "openbookqa": "openbookqa/openbookqa.yaml",
        "lambada": "lambada/lambada_openai.yaml",
        "hellaswag": "hellaswag/hellaswag.yaml",
    }[name]
    config = load_yaml(Path(lm_eval.__file__).parent / "tasks" / yaml)
    splits = datasets.DatasetDict({s: datasets.Dataset.from_list(rows) for s in ("train", "validation", "test")})
    config["custom_dataset"] = lambda **kwargs: splits
    return ConfigurableTask(config=config)


def read_jsonl(relative, n):
    with open(find_local(relative), encoding="utf-8") as fh:
        return [json.loads(next(fh)) for _ in range(n)]


def arc_layout(row, question_field):
    q = row["question"]
    choices = {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]}
    return {"id": row["id"], question_field: q["stem"], "choices": choices, "answerKey": row["answerKey"]}


def hub_rows(name, n):
    """The first ``n`` items in the layout of the hub dataset lm-eval reads (see each SOURCE.md)."""
    local_task(name, 1)
    if name == "piqa":
        labels = find_local("piqa/valid-labels.lst").read_text().split()
        return [dict(r, label=int(g)) for r, g in zip(read_jsonl("piqa/valid.jsonl", n), labels, strict=False)]
    if name == "arc_easy":
        return [arc_layout(r, "question") for r in read_jsonl("arc/ARC-Easy-Test.jsonl", n)]
    if name == "openbookqa":
        return [arc_layout(r, "question_stem") for r in read_jsonl("openbookqa/test.jsonl", n)]
    if name == "boolq":  # SuperGLUE's passage is "title -- passage"
        rows = read_jsonl("boolq/dev.jsonl", n)
        return [
            {
                "question": r["question"],
                "passage": f"{r['title']} -- {r['passage']}",
                "idx": i,
                "label": int(r["answer"]),
            }
            for i, r in enumerate(rows)
        ]
    return read_jsonl({"winogrande": "winogrande/dev.jsonl", "lambada": "lambada/lambada_test.jsonl"}[name], n)


def lm_eval_requests(task):
    out = []
    for doc in task.eval_docs:
        requests = task.construct_requests(doc, task.fewshot_context(doc, 0))
        out.append([r.args for r in (requests if isinstance(requests, list) else [requests])])
    return out


@pytest.mark.parametrize("name", ["piqa", "arc_easy", "winogrande", "boolq", "openbookqa", "lambada"])
def test_requests_and_metrics_equal_lm_evals_task_code(name):
    n = 20
    task = lm_eval_task(name, hub_rows(name, n))
    docs = load_task(name, n)
    assert lm_eval_requests(task) == [list(d.requests) for d in docs]
    # lm-eval's process_results on the same (arbitrary) loglikelihoods gives the same per-item metrics
    gen = torch.Generator().manual_seed(0)
    for doc, lm_doc in zip(docs, task.eval_docs, strict=True):
        results = [
            (-float(torch.rand(1, generator=gen)) * 20, bool(torch.rand(1, generator=gen) < 0.5)) for _ in doc.requests
        ]
        theirs = task.process_results(lm_doc, results)
        ours = score_docs(name, [doc], results)
        assert theirs["acc"] == ours.acc
        assert theirs.get("acc_norm") == ours.acc_norm
        if name == "lambada":
            assert theirs["perplexity"] == results[0][0]


# The first three HellaSwag validation items as the original jsonl has them (ctx_a/ctx_b apart).
HELLASWAG_ORIGINAL = [
    ("Roof shingle removal", "A man is sitting on a roof.", "he", 3,
     ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
      "starts pulling up roofing on a roof."]),
    ("Clean and jerk", "A lady walks to a barbell. She bends down and grabs the pole.", "the lady", 3,
     ["swings and lands in her arms.", "pulls the barbell forward.", "pulls a rope attached to the barbell.",
      "stands and lifts the weight over her head."]),
    ("Canoeing", "Two women in a child are shown in a canoe while a man pulls the canoe while standing in the "
     "water, with other individuals visible in the background.", "the child and a different man", 2,
     ["are then shown paddling down a river in a boat while a woman talks.",
      "are driving the canoe, they go down the river flowing side to side.", "sit in a canoe while the man paddles.",
      "walking go down the rapids, while the man in his helicopter almost falls and goes out of canoehood."]),
]  # fmt: skip


def test_hellaswag_recovers_lm_evals_capitalised_ctx_b_from_the_text_file():
    docs = local_task("hellaswag", 3)
    rows = [
        {"activity_label": a, "ctx_a": ca, "ctx_b": cb, "ctx": f"{ca} {cb}", "label": str(g), "endings": e}
        for a, ca, cb, g, e in HELLASWAG_ORIGINAL
    ]
    assert lm_eval_requests(lm_eval_task("hellaswag", rows)) == [list(d.requests) for d in docs]


# -- THE CROSS-CHECK: loglikelihoods against lm-eval's HFLM ----------------------------------------------


def byte_bpe(texts, bos: bool) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE trained on ``texts``: every string encodes, and spaces join the next word."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    if bos:  # Llama's convention: BOS before every encoding
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def cross_check_docs():
    docs = {name: local_task(name, 4) for name in ("piqa", "arc_easy", "winogrande", "boolq", "lambada")}
    texts = [c + cont for ds in docs.values() for d in ds for c, cont in d.requests]
    return docs, texts


# Requests no task above makes, for the tokenisation rules: trailing whitespace moves to the continuation,
# a continuation that merges with the end of the context, an empty context (BOS or EOS stands in), text
# that already starts with BOS (no second one is added).
EDGE_REQUESTS = [
    ("Question: Which is it?\nAnswer: ", "yes"),
    ("The end.\n\n", "Next"),
    ("Which statement best explains why photosynth", "esis is"),
    ("", " Sunlight is the source"),
    ("", "<s> Sunlight is"),
    ("<s> The end", " of it"),
]


def memorising_model(tokenizer, texts, max_positions=128):
    """A tiny Llama trained briefly on ``texts``, so that some continuations are its greedy choice."""
    torch.manual_seed(0)
    config = LlamaConfig(**{**COMMON, "vocab_size": len(tokenizer), "max_position_embeddings": max_positions})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    sequences = [torch.tensor(tokenizer.encode(t)[-max_positions:])[None] for t in texts]
    for _ in range(40):
        for ids in sequences:
            model(ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return model.eval()


@pytest.mark.parametrize("bos", [False, True])
def test_loglikelihoods_equal_lm_eval_hflm(cross_check_docs, bos):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'prunekit[eval]')")
    from lm_eval.api.instance import Instance

    docs, texts = cross_check_docs
    tokenizer = byte_bpe(texts, bos)
    # the first two LAMBADA passages are learnt (their last word becomes greedy), the other two not
    model = memorising_model(tokenizer, [c + cont for d in docs["lambada"][:2] for c, cont in d.requests])
    # 128 positions: BoolQ passages are longer, so their inputs are cut from the left
    assert max(len(tokenizer.encode(c + cont)) for d in docs["boolq"] for c, cont in d.requests) > 129
    requests = {name: [r for d in ds for r in d.requests] for name, ds in docs.items()} | {"edge": EDGE_REQUESTS}
    ours = {name: loglikelihoods(model, tokenizer, reqs, 4, False) for name, reqs in requests.items()}
    hflm = lm_eval_model(model, tokenizer, batch_size=3)  # another batching: padding must not matter
    for name, reqs in requests.items():
        theirs = hflm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(reqs)], True)
        assert [g for _, g in theirs] == [g for _, g in ours[name]], name
        assert max(abs(a - b) for (a, _), (b, _) in zip(theirs, ours[name], strict=True)) < 1e-4, name
        if name != "edge":
            mine, lm = score_docs(name, docs[name], ours[name]), score_docs(name, docs[name], theirs)
            assert (mine.predictions, mine.acc, mine.acc_norm) == (lm.predictions, lm.acc, lm.acc_norm), name
    assert [g for _, g in ours["lambada"]] == [True, True, False, False]


# -- the whole evaluation and the CLI ------------------------------------------------------------------------


def test_evaluate_zeroshot_reports_every_task_and_their_mean(cross_check_docs):
    _, texts = cross_check_docs
    tokenizer = byte_bpe(texts, bos=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**{**COMMON, "vocab_size": len(tokenizer)})).eval()
    result = evaluate_zeroshot(model, tokenizer, ["piqa", "lambada"], limit=3, batch_size=2, progress=False)
    piqa, lambada = result.tasks["piqa"], result.tasks["lambada"]
    assert (piqa.items, piqa.chance, lambada.items) == (3, 0.5, 3) and lambada.perplexity > 1
    assert result.mean_acc == pytest.approx((piqa.acc + lambada.acc) / 2)
    assert json.loads(json.dumps(result.to_dict()))["tasks"]["piqa"]["predictions"] == piqa.predictions
    with pytest.raises(PrunekitError, match="--batch-size must be at least 1"):
        evaluate_zeroshot(model, tokenizer, ["piqa"], batch_size=0)


def test_cli_zeroshot_runs_and_writes_json(tmp_path):
    local_task("piqa", 1)
    local_task("winogrande", 1)
    save_tiny(tmp_path / "tiny")
    out = tmp_path / "zs.json"
    args = ["eval", "zeroshot", "--model", str(tmp_path / "tiny"), "--tasks", "piqa,winogrande", "--limit", "3"]
    result = run(*args, "--device", "cpu", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "piqa" in result.stdout and "acc_norm" in result.stdout and "mean acc" in result.stdout
    report = json.loads(out.read_text())
    assert report["tasks"]["piqa"]["items"] == 3 and report["tasks"]["winogrande"]["acc_norm"] is None


def test_cli_unknown_task_is_one_line(tmp_path):
    line = error_line(run("eval", "zeroshot", "--model", str(tmp_path), "--tasks", "piqa,nope"))
    assert "unknown zero-shot task 'nope'" in line and "arc_easy" in line


@pytest.mark.realmodel
def test_real_model_and_tokenizer_match_lm_eval_hflm_exactly():
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'prunekit[eval]')")
    from lm_eval.api.instance import Instance

    from prunekit import load

    model, tokenizer = load("smollm2-135m")
    hflm = lm_eval_model(model, tokenizer, batch_size=4)
    for name in ("piqa", "arc_easy", "winogrande", "boolq", "lambada"):
        docs = local_task(name, 3)
        requests = [r for d in docs for r in d.requests]
        ours = loglikelihoods(model, tokenizer, requests, 8, False)
        theirs = hflm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)], True)
        assert [g for _, g in theirs] == [g for _, g in ours], name
        assert max(abs(a - b) for (a, _), (b, _) in zip(theirs, ours, strict=True)) < 1e-4, name
        assert score_docs(name, docs, ours).predictions == score_docs(name, docs, theirs).predictions, name

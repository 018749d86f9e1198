"""A before/after report for stories260k against a briefly tuned LoRA adapter; results.json keeps its schema."""

from __future__ import annotations

import json

import pytest

from conftest import asset, run_cli
from tunesmith.evaluation.results import improvement

# The stable schema: a change here breaks users' scripts, so it must be deliberate.
DOCUMENT_KEYS = {"schema_version", "created", "tunesmith_version", "runs", "comparison", "training"}
RUN_KEYS = {"model", "suites"}
MODEL_KEYS = {"name", "adapter", "template"}
SUITE_KEYS = {"file", "role", "tasks"}
TASK_KEYS = {"name", "kind", "metric", "score", "lower_is_better", "metrics", "count", "details", "tokenisation",
             "samples", "seconds"}
COMPARISON_KEYS = {"base", "tuned", "task_gain", "general_change", "bias_change", "rows", "bias_categories"}
ROW_KEYS = {"suite", "role", "task", "kind", "metric", "base", "tuned", "delta", "improvement", "lower_is_better"}


def check_schema(document: dict) -> None:
    assert set(document) == DOCUMENT_KEYS and document["schema_version"] == 1
    for run in document["runs"].values():
        assert set(run) == RUN_KEYS and set(run["model"]) == MODEL_KEYS
        for suite in run["suites"].values():
            assert set(suite) == SUITE_KEYS
            for task in suite["tasks"].values():
                assert set(task) == TASK_KEYS


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory):
    """Train LoRA on stories260k for 6 steps with eval.report asking for a task, general and bias report."""
    from tunesmith.config import validate_recipe
    from tunesmith.finetune import finetune

    root = tmp_path_factory.mktemp("report")
    data = asset("data")
    (root / "task.yaml").write_text(
        "name: task\ntasks:\n  - {name: alpaca_ppl, kind: perplexity, path: '{data_root}/llama_factory/alpaca_en_demo.json', "
        "limit: 8, max_length: 96}\n")
    (root / "general.yaml").write_text(
        "name: general\nlimit: 2\ntasks:\n"
        "  - {name: mmlu, kind: mmlu, path: '{data_root}/mmlu', subjects: [marketing, nutrition]}\n"
        "  - {name: sst2, kind: classification, path: '{data_root}/sst2/test.tsv', label_words: {0: negative, 1: positive}}\n"
        "  - {name: gsm8k, kind: generation, path: '{data_root}/gsm8k/test.jsonl', metrics: [accuracy, token_f1], "
        "answer_pattern: '#### (\\S+)', max_new_tokens: 4}\n")
    recipe = validate_recipe({
        "model": {"name": str(asset("models/stories260k"))},
        "data": {"train": str(asset("data/llama_factory/alpaca_en_demo.json")), "max_length": 128},
        "method": {"kind": "lora", "r": 4, "alpha": 8},
        "train": {"max_steps": 6, "batch_size": 4, "lr": 5e-3, "log_every": 1, "device": "cpu"},
        "eval": {"report": {"suites": [str(root / "task.yaml")], "general_suites": [str(root / "general.yaml")],
                            "data_root": str(data), "bias": True}},
        "output": {"dir": str(root / "run")},
    }, "test-recipe")
    summary = finetune(recipe, progress=False)
    return root, summary


def test_report_after_training(tuned_run):
    root, summary = tuned_run
    out = root / "run" / "eval"
    document = json.loads((out / "results.json").read_text())
    check_schema(document)
    comparison = document["comparison"]
    assert set(comparison) == COMPARISON_KEYS and all(set(r) == ROW_KEYS for r in comparison["rows"])
    assert {r["task"] for r in comparison["rows"]} == {"alpaca_ppl", "mmlu", "sst2", "gsm8k", "counterfactual_pairs"}
    base, tuned = document["runs"]["base"], document["runs"]["tuned"]
    assert base["model"]["adapter"] is None and tuned["model"]["adapter"].endswith("adapter")
    assert tuned["model"]["template"] == base["model"]["template"] == "simple"  # the template saved with the adapter

    # training on alpaca lowers its perplexity; the headline numbers are the means of the rows
    ppl_before = base["suites"]["task"]["tasks"]["alpaca_ppl"]["score"]
    ppl_after = tuned["suites"]["task"]["tasks"]["alpaca_ppl"]["score"]
    assert ppl_after < ppl_before
    assert comparison["task_gain"] == pytest.approx(improvement("perplexity", ppl_before, ppl_after, True))
    general = [r["improvement"] for r in comparison["rows"] if r["role"] == "general"]
    assert comparison["general_change"] == pytest.approx(sum(general) / 3)
    bias_row = next(r for r in comparison["rows"] if r["role"] == "bias")
    assert comparison["bias_change"] == pytest.approx(100 * bias_row["delta"])
    assert len(comparison["bias_categories"]) == 6
    assert summary["report"]["task_gain"] == comparison["task_gain"]

    assert [p[0] for p in document["training"]["loss_curve"]] == [1, 2, 3, 4, 5, 6]
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3  # scores, bias categories, loss curve
    assert "general change (forgetting)" in page and "marketing" in page


@pytest.mark.slow
def test_cli_eval_single_model_and_compare(tuned_run, stories260k):
    root, _ = tuned_run
    out = root / "cli"
    result = run_cli("eval", "--model", stories260k, "--adapter", str(root / "run" / "adapter"), "--bias",
                     "--out", str(out / "one"))
    assert result.returncode == 0, result.stderr
    document = json.loads((out / "one" / "results.json").read_text())
    check_schema(document)
    assert document["comparison"] is None and list(document["runs"]) == ["model"]

    result = run_cli("eval", "--compare", stories260k, str(root / "run"), "--bias", "--out", str(out / "two"))
    assert result.returncode == 0, result.stderr
    assert "bias change" in result.stdout
    document = json.loads((out / "two" / "results.json").read_text())
    assert document["runs"]["base"]["suites"]["bias"]["tasks"]["counterfactual_pairs"]["score"] == pytest.approx(
        json.loads((root / "run" / "eval" / "results.json").read_text())
        ["runs"]["base"]["suites"]["bias"]["tasks"]["counterfactual_pairs"]["score"])


def test_cli_names_a_missing_suite_file(tmp_path):
    result = run_cli("eval", "--model", "unused", "--suite", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2 and "missing.yaml does not exist" in result.stderr

"""Every stage's output through the command line: generate (pt, dpo, orpo, simpo, kto), score (rm), classify (cls),
and ``tunesmith eval`` reporting the stage's own held-out metrics, equal to the run's final validation numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_stages_text import recipe, sentiment_rows
from tiny_files import kto_rows, text_file
from tunesmith.cli import main
from tunesmith.pipeline.finetune import finetune

from conftest import TINY_PAIRS


def held_out_file(tmp_path: Path, stage: str) -> tuple[str, str]:
    """(training file, validation file): the stage's tiny data split by rows, or 60 generated sentiment rows for cls."""
    if stage == "cls":
        lines = ["sentence\tlabel", *sentiment_rows(60, 0)[1:]]
        train, validation = tmp_path / "train.tsv", tmp_path / "validation.tsv"
        train.write_text("\n".join(lines[:41]) + "\n")
        validation.write_text("\n".join([lines[0], *lines[41:61]]) + "\n")
        return str(train), str(validation)
    if stage == "pt":
        return str(text_file(tmp_path / "text.txt")), ""
    rows = kto_rows(300) if stage == "kto" else json.loads(TINY_PAIRS.read_text())
    train, validation = tmp_path / "train.json", tmp_path / "validation.json"
    train.write_text(json.dumps(rows[:-40]))
    validation.write_text(json.dumps(rows[-40:]))
    return str(train), str(validation)


def train_stage(tiny_llama, tmp_path: Path, stage: str, *overrides: str, method=None) -> tuple[Path, str, dict]:
    """A few float32 steps of ``stage`` on tiny_llama; returns (run folder, validation file, summary)."""
    train, validation = held_out_file(tmp_path, stage)
    data = {"train": train, "max_length": 128 if stage == "pt" else 256, "template": "simple"}
    if validation:
        data["validation"] = validation
    extra = {"method": method} if method else {}
    run = recipe(tiny_llama, tmp_path, stage, data, "train.max_steps=3", 'train.speed.autocast="off"', *overrides,
                 output=f"run-{stage}", **extra)
    return tmp_path / f"run-{stage}", validation, finetune(run, progress=False)


def cli_json(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert main(list(args)) == 0
    return json.loads(capsys.readouterr().out)


def test_generating_stages_reload_and_generate(tiny_llama, tmp_path, capsys):
    """``generate`` on each stage's run prints what the reloaded result generates (the tiny Llama is untrained,
    so its greedy reply may be blank: the command is compared with a direct generation, not read)."""
    from tunesmith.inference.generate import generate, load_for_inference

    for stage in ("pt", "orpo", "simpo", "kto"):  # dpo: tests/test_stages_preference.py::test_resume_is_exact
        run, _, _ = train_stage(tiny_llama, tmp_path, stage, "train.max_steps=2")
        capsys.readouterr()
        assert main(["generate", "--model", str(run), "--prompt", "Tell me a story.", "--max-new-tokens", "6"]) == 0
        printed = capsys.readouterr().out
        model, tokenizer = load_for_inference(str(run))
        expected = generate(model, tokenizer, [[{"role": "user", "content": "Tell me a story."}]], 6, 0.0)[0]
        assert printed == expected + "\n", stage


@pytest.mark.parametrize("stage", ["dpo", "kto", "orpo", "rm", "cls"])
def test_eval_reports_the_runs_own_validation_numbers(tiny_llama, tmp_path, capsys, stage):
    run, validation, summary = train_stage(tiny_llama, tmp_path, stage)
    reported = cli_json(capsys, "eval", "--model", str(run), "--data", validation)
    expected = summary["validation"]
    assert reported["stage"] == stage and reported["count"] == expected.get("pairs", expected.get("examples"))
    for name, value in expected.items():
        if name not in ("pairs", "examples"):
            assert reported[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    if stage in ("dpo", "rm"):  # the report: before -> after on the held-out file
        out = tmp_path / "report"
        assert main(["eval", "--compare", tiny_llama, str(run), "--data", validation, "--out", str(out)]) == 0
        document = json.loads((out / "results.json").read_text())
        task = Path(validation).stem
        tuned = document["runs"]["tuned"]["suites"]["held_out"]["tasks"][task]
        assert tuned["score"] == pytest.approx(expected["accuracy"]) and tuned["kind"] == stage
        rows = document["comparison"]["rows"]
        if stage == "dpo":  # the base judged against itself: every implicit reward 0
            assert [(r["task"], r["base"], r["tuned"]) for r in rows] == [(task, 0.0, tuned["score"])]
            assert document["runs"]["base"]["suites"]["held_out"]["tasks"][task]["metrics"]["margin"] == 0.0
        else:  # the base has no reward head: no before, and no row
            assert rows == [] and document["runs"]["base"]["suites"]["held_out"]["tasks"][task]["score"] is None
        assert "held_out" in (out / "report.html").read_text()
    if stage == "rm":
        scored = cli_json(capsys, "score", str(run), "--data", validation)
        assert scored["metrics"]["accuracy"] == pytest.approx(expected["accuracy"])
        assert len(scored["rows"]) == 40
        first = json.loads(Path(validation).read_text())[0]
        one = cli_json(capsys, "score", str(run), "--prompt", first["conversations"][0]["value"],
                       "--reply", first["chosen"]["value"])
        if len(first["conversations"]) == 1:
            assert one["reward"] == pytest.approx(scored["rows"][0]["chosen"], rel=1e-5)
    if stage == "cls":
        labelled = cli_json(capsys, "classify", str(run), "--data", validation)
        assert len(labelled["rows"]) == 20 and labelled["metrics"]["accuracy"] == pytest.approx(expected["accuracy"])
        share = sum(row["label"] == row["expected"] for row in labelled["rows"]) / 20
        assert share == pytest.approx(expected["accuracy"])  # the per-row labels agree with the stage's accuracy
        text = Path(validation).read_text().splitlines()[1].split("\t")[0]
        assert cli_json(capsys, "classify", str(run), "--text", text)["label"] == labelled["rows"][0]["label"]


def test_a_run_of_another_stage_is_refused_in_one_sentence(tiny_llama, tmp_path, capsys):
    run, _, _ = train_stage(tiny_llama, tmp_path, "rm", "train.max_steps=1")
    cases = [(["generate", "--model", str(run), "--prompt", "hi"], "use tunesmith score"),
             (["classify", str(run), "--text", "good"], "needs a stage cls result; use tunesmith score"),
             (["score", str(run)], "needs --data FILE, or --prompt and --reply together"),
             (["score", str(tmp_path / "nowhere"), "--prompt", "a", "--reply", "b"], "is not a folder")]
    for args, message in cases:
        capsys.readouterr()
        assert main(args) == 2
        *progress, error = capsys.readouterr().err.splitlines()  # progress lines (loading ...), then one sentence
        assert message in error and all(line.endswith("...") for line in progress), args
        assert not any("Traceback" in line for line in progress), args


def test_report_after_training_shows_the_stage_metrics_before_and_after(tiny_llama, tmp_path):
    run, validation, summary = train_stage(tiny_llama, tmp_path, "kto", "train.max_steps=1", "eval.report={bias: false}")
    document = json.loads((run / "eval" / "results.json").read_text())
    [row] = document["comparison"]["rows"]
    assert (row["suite"], row["task"], row["base"]) == ("held_out", Path(validation).stem, 0.0)
    assert row["tuned"] == pytest.approx(summary["validation"]["accuracy"])
    assert summary["report"]["task_gain"] == pytest.approx(100 * row["tuned"])

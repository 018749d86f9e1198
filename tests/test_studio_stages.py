"""Every stage from the studio as a job (issue 24 §7): Constitutional-AI data (``cai``), evaluation suites picked
from a list, and a stage the guided path writes (GRPO with built-in rewards) trained and evaluated as real jobs on
a tiny model built in-test."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'tunesmith[serve]'")

from fastapi.testclient import TestClient  # noqa: E402

from conftest import REPO  # noqa: E402
from serve_support import wait_for  # noqa: E402


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny_llama):
    from tunesmith.serve.app import create_app

    root = tmp_path_factory.mktemp("workspace")
    shutil.copytree(tiny_llama, root / "models" / "tiny")
    (root / "data").mkdir()
    for name in ("principles.jsonl", "prompts.jsonl"):
        shutil.copy(REPO / "examples" / "cai" / name, root / "data" / name)
    shutil.copytree(REPO / "tests" / "data" / "sst2", root / "evaldata" / "sst2")
    suites = root / "suites"
    (suites / "tasks").mkdir(parents=True)
    (suites / "tasks" / "sst2.yaml").write_text(
        "name: sst2\nkind: classification\npath: '{data_root}/sst2/test.tsv'\ntext_field: sentence\n"
        "label_field: label\nlabel_words: {0: negative, 1: positive}\nprompt: \"Review: {text}\\nSentiment:\"\n")
    (suites / "sentiment.yaml").write_text("name: sentiment\ndata_root: ../evaldata\ntasks:\n  - tasks/sst2.yaml\n")
    (suites / "outside.yaml").write_text("name: outside\ndata_root: /etc\ntasks:\n  - tasks/sst2.yaml\n")
    app = create_app(root, max_upload_mb=1, max_body_kb=64)
    with TestClient(app) as client:
        yield client, root


def finished(client, job_id: int, timeout: float = 400) -> dict:
    job = wait_for(lambda: (lambda j: j if j["status"] in ("done", "failed", "stopped") else None)(
        client.get(f"/api/jobs/{job_id}").json()), timeout=timeout, every=1)
    log = client.get(f"/api/jobs/{job_id}/progress").json()["log"]
    assert job["status"] == "done", log[-3000:]
    return job


def test_suites_are_listed_with_their_tasks_or_why_they_cannot_run(studio):
    client, root = studio
    listing = client.get("/api/jobs/suites").json()
    assert [entry["name"] for entry in listing["builtin"]] == ["bias"]
    suites = {entry["path"]: entry for entry in listing["suites"]}
    assert set(suites) == {"suites/outside.yaml", "suites/sentiment.yaml"}  # the task file is not a suite
    assert suites["suites/sentiment.yaml"] == {"path": "suites/sentiment.yaml", "name": "sentiment",
                                               "tasks": ["sst2 (classification)"], "problem": None}
    assert "outside the workspace" in suites["suites/outside.yaml"]["problem"]
    assert str(root) not in json.dumps(listing)


@pytest.mark.slow
def test_cai_runs_as_a_job_and_writes_training_data_in_the_workspace(studio):
    client, root = studio
    body = {"kind": "cai", "principles": "data/principles.jsonl", "prompts": "data/prompts.jsonl",
            "model": "models/tiny", "limit": 2, "max_new_tokens": 8}
    job = client.post("/api/jobs", json=body).json()
    assert job["kind"] == "cai" and "--trust-remote-code" not in job["args"]
    job = finished(client, job["id"])
    assert job["output"] == "data/prompts-cai/summary.json"
    rows = (root / "data" / "prompts-cai" / "sft.jsonl").read_text().splitlines()
    assert len(rows) == 2 and json.loads((root / job["output"]).read_text())["rows"] == 2
    listing = client.get("/api/files", params={"folder": "data/prompts-cai"}).json()
    assert "preference.jsonl" in json.dumps(listing)


def test_a_cai_job_names_only_workspace_files_and_served_models(studio):
    client, _ = studio
    body = {"kind": "cai", "principles": "data/principles.jsonl", "prompts": "data/prompts.jsonl", "model": "models/tiny"}
    assert client.post("/api/jobs", json={**body, "principles": "../principles.jsonl"}).status_code == 403
    assert client.post("/api/jobs", json={**body, "model": "../../etc"}).status_code in (403, 404)
    assert client.post("/api/jobs", json={**body, "model": "data"}).status_code == 404
    assert client.post("/api/jobs", json={**body, "max_new_tokens": 0}).status_code == 400


@pytest.mark.slow
def test_a_guided_grpo_run_trains_as_a_job_then_evaluates_on_a_listed_suite(studio):
    client, root = studio
    rows = [{"question": f"What is {i} plus {i}?", "result": str(2 * i)} for i in range(12)]
    (root / "data" / "sums.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    guided = client.post("/api/guided/recipe", json={
        "task": "practise", "data": "data/sums.jsonl", "columns": {"prompt": "question", "answer": "result"},
        "rewards": [{"kind": "exact_match"}, {"kind": "length", "target": 4}]})
    assert guided.status_code == 200, guided.text
    recipe = guided.json()["recipe"]
    recipe["train"]["max_steps"] = 2
    recipe["stage"]["max_new_tokens"] = 6
    saved = client.post("/api/recipes", json={"recipe": recipe, "name": "sums"}).json()["path"]
    job = finished(client, client.post("/api/jobs", json={"kind": "train", "recipe": saved}).json()["id"])
    assert json.loads((root / job["output"]).read_text())["steps"] == 2
    metrics = [json.loads(line) for line in (root / job["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    steps = [record for record in metrics if "reward/exact_match" in record]
    assert len(steps) == 2 and all("reward/length" in record for record in steps)  # both built-in rewards scored
    assert "What is" in steps[0]["samples"][0]["prompt"]  # the prompt from the mapped column, not a field name
    refused = client.post("/api/jobs", json={"kind": "eval", "run": job["run_dir"], "suites": ["suites/outside.yaml"]})
    assert refused.status_code == 403
    evaluation = client.post("/api/jobs", json={"kind": "eval", "run": job["run_dir"], "limit": 4,
                                                "suites": ["suites/sentiment.yaml"]}).json()
    evaluation = finished(client, evaluation["id"])
    results = json.loads((root / evaluation["output"]).with_name("results.json").read_text())
    for side in ("base", "tuned"):
        task = results["runs"][side]["suites"]["sentiment"]["tasks"]["sst2"]
        assert task["count"] == 4 and 0 <= task["score"] <= 1
    assert "sst2" in (root / evaluation["output"]).read_text()


def test_the_guided_recipe_measures_generation_on_the_tasks_own_metric(studio):
    from tunesmith.config import validate_recipe

    client, root = studio
    rows = "".join(f"Text number {i} is long,short {i}\n" for i in range(30))
    for name in ("notes.csv", "notes-test.csv"):
        (root / "data" / name).write_text("text,summary\n" + rows)
    body = {"task": "rewrite", "data": "data/notes.csv", "test": "data/notes-test.csv",
            "columns": {"prompt": "text", "answer": "summary"}}
    result = client.post("/api/guided/recipe", json=body)
    assert result.status_code == 200, result.text
    task = validate_recipe(result.json()["recipe"]).eval.task
    assert task.metric == "rougeL" and task.file == "data/notes-test.csv" and task.columns.answer == "summary"
    assert any("rougeL of the model's answers" in line for line in result.json()["reasons"])
    answer = client.post("/api/guided/recipe", json={**body, "task": "answer"}).json()["recipe"]
    assert answer["eval"]["task"]["metric"] == "exact_match"
    alone = client.post("/api/guided/recipe", json={**body, "test": None}).json()["recipe"]
    assert "eval" not in alone  # no test file: held-out loss (never the training rows passed off as a test)


@pytest.mark.parametrize("metric", ["exact_match", "rougeL", "token_f1"])
def test_a_generation_task_reads_a_table_through_its_columns(tiny_llama, tmp_path, metric):
    from tunesmith.config import GenerationTaskSection
    from tunesmith.config.data import ColumnsSection
    from tunesmith.evaluation import run_generation_task
    from tunesmith.evaluation.metrics import exact_match_score, rouge, token_f1
    from tunesmith.inference.generate import load_for_inference

    table = tmp_path / "qa.csv"
    table.write_text("question,reply\nName a colour.,blue\nName a fruit.,apple\nSay hello.,hello there\n")
    model, tokenizer = load_for_inference(tiny_llama, None, "float32", "cpu", False)
    section = GenerationTaskSection(file=str(table), metric=metric, max_new_tokens=4)
    columns = ColumnsSection(prompt="question", answer="reply")
    result = run_generation_task(model, tokenizer, section, columns=columns)  # data.columns, as train passes it
    own = run_generation_task(model, tokenizer, section.model_copy(update={"columns": columns}))
    assert result == own and result["count"] == 3 and result["metric"] == metric
    assert [s["reference"] for s in result["samples"]] == ["blue", "apple", "hello there"]
    assert result["samples"][0]["prompt"] == "Name a colour."
    score = {"exact_match": lambda p, r: exact_match_score([p], [[r]]), "rougeL": lambda p, r: rouge([p], [[r]], "rougeL"),
             "token_f1": token_f1}[metric]
    expected = sum(score(s["prediction"], s["reference"]) for s in result["samples"]) / 3
    assert result["score"] == pytest.approx(expected)
    with pytest.raises(Exception, match="data.columns|format"):
        run_generation_task(model, tokenizer, section)  # without the mapping the table cannot be read

"""The studio's routes for a person with a table: column mapping in preview and inspect, the guided recipe
(task -> stage, columns, held-out data, method checked by the plan, sizes), errors without server paths."""

from __future__ import annotations

import csv
import shutil

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'tunesmith[serve]'")

from fastapi.testclient import TestClient  # noqa: E402

TOPICS = {"sport": "match goal team league", "politics": "vote minister election law",
          "science": "study cells space physics"}


def headlines(count: int, offset: int = 0) -> list[dict]:
    rows = []
    for index in range(offset, offset + count):
        topic = list(TOPICS)[index % 3]
        word = TOPICS[topic].split()[index % 4]
        rows.append({"headline": f"Report {index}: the {word} news of the week", "topic": topic})
    return rows


def write_csv(path, rows):
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny_llama):
    from tunesmith.serve.app import create_app

    root = tmp_path_factory.mktemp("workspace")
    shutil.copytree(tiny_llama, root / "models" / "tiny")
    app = create_app(root, max_upload_mb=1, max_body_kb=64)
    with TestClient(app) as client:
        yield client, root


def upload(client, name: str, rows) -> str:
    text = "headline,topic\n" + "".join(f"{r['headline']},{r['topic']}\n" for r in rows)
    response = client.post("/api/upload", files={"file": (name, text)})
    assert response.status_code == 200, response.text
    return response.json()["path"]


def test_preview_guesses_and_applies_the_column_mapping(studio):
    client, root = studio
    path = upload(client, "news.csv", headlines(30))
    assert path == "data/news.csv"
    plain = client.get("/api/data/preview", params={"path": path}).json()
    assert plain["columns"] == ["headline", "topic"] and plain["format"] is None
    assert plain["suggested"] == {"prompt": "headline", "answer": None, "label": "topic", "system": None}
    assert "data.columns" in plain["format_error"] and str(root) not in plain["format_error"]
    mapped = client.get("/api/data/preview", params={"path": path, "prompt": "headline", "label": "topic"}).json()
    assert mapped["format"] == "columns"
    assert mapped["examples"][0]["messages"] == [{"role": "user", "content": "Report 0: the match news of the week"},
                                                 {"role": "assistant", "content": "sport"}]
    wrong = client.get("/api/data/preview", params={"path": path, "prompt": "title", "label": "topic"}).json()
    assert "no column 'title'" in wrong["format_error"]


def test_inspect_counts_what_the_mapping_yields(studio):
    client, root = studio
    path = upload(client, "inspect me.csv", headlines(12))
    assert path == "data/inspect-me.csv"
    before = client.post("/api/data/inspect", json={"path": path}).json()
    assert (before["records"], before["examples"], before["malformed"]) == (12, 0, 12)
    assert all(str(root) not in message for message in before["malformed_examples"])
    after = client.post("/api/data/inspect", json={"path": path, "columns": {"prompt": "headline", "label": "topic"}}).json()
    assert (after["records"], after["examples"], after["malformed"], after["format"]) == (12, 12, 0, "columns")
    bad = client.post("/api/data/inspect", json={"path": path, "columns": {"prompt": "headline"}})
    assert bad.status_code == 400 and "columns.answer or columns.label" in bad.text


@pytest.mark.slow  # the plan measures a fresh process once per cache folder
def test_the_guided_recipe_for_labelling_texts(studio):
    from tunesmith.config import validate_recipe

    client, root = studio
    train = upload(client, "guided.csv", headlines(40))
    test = upload(client, "guided-test.csv", headlines(9, offset=40))
    tasks = client.get("/api/guided/tasks").json()["tasks"]
    assert [t["name"] for t in tasks][:5] == ["label", "answer", "rewrite", "style", "prefer"]
    body = {"task": "label", "data": train, "test": test, "columns": {"prompt": "headline", "label": "topic"}}
    result = client.post("/api/guided/recipe", json=body).json()
    recipe = validate_recipe(result["recipe"])  # a whole, valid recipe: what the CLI would run
    assert recipe.stage.kind == "cls" and recipe.model.name == "models/tiny"
    assert recipe.data.columns.prompt == "headline" and recipe.data.columns.label == "topic"
    assert recipe.data.validation == test and recipe.data.validation_fraction == 0  # no conflict with the test file
    assert recipe.train.max_steps == 15  # 3 passes over 40 rows, 8 a step
    assert recipe.output.dir == "runs/guided-label"
    assert result["plan"]["fits"] and result["plan"]["examples"] == 40
    assert 32 <= recipe.data.max_length <= 64  # from the measured lengths, not a guess
    assert any("accuracy" in line for line in result["reasons"])
    alone = client.post("/api/guided/recipe", json={**body, "test": None}).json()["recipe"]
    assert alone["data"]["validation_fraction"] == 0.2 and "validation" not in alone["data"]


def test_the_guided_recipe_names_what_is_missing(studio):
    client, root = studio
    train = upload(client, "missing.csv", headlines(10))
    response = client.post("/api/guided/recipe", json={"task": "answer", "data": train,
                                                       "columns": {"prompt": "headline", "label": "topic"}})
    assert response.status_code == 400 and "needs the answer column" in response.text
    response = client.post("/api/guided/recipe", json={"task": "cook", "data": train})
    assert response.status_code == 400 or response.status_code == 422


def write_jsonl(path, rows):
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path.relative_to(path.parents[1]))


def preference_pairs(count: int) -> list[dict]:
    return [{"prompt": f"Name a colour {i}.", "chosen": "Blue.", "rejected": "I will not say."} for i in range(count)]


def test_guided_tasks_list_every_stage_the_studio_trains(studio):
    client, _ = studio
    listing = client.get("/api/guided/tasks").json()
    assert {t["name"]: t["stage"] for t in listing["tasks"]} == {
        "label": "cls", "answer": "sft", "rewrite": "sft", "style": "sft", "prefer": "dpo", "score": "rm",
        "practise": "grpo"}
    assert list(listing["preference_stages"]) == ["dpo", "orpo", "simpo", "kto"]
    assert listing["rewards"] == ["exact_match", "answer_match", "format", "length"]  # no module:function


@pytest.mark.parametrize("preference", ["dpo", "orpo", "simpo"])
def test_the_guided_recipe_for_preference_pairs(studio, preference):
    from tunesmith.config import validate_recipe

    client, root = studio
    data = write_jsonl(root / "data" / "pairs.jsonl", preference_pairs(30))
    result = client.post("/api/guided/recipe", json={"task": "prefer", "data": data, "preference": preference})
    assert result.status_code == 200, result.text
    recipe = validate_recipe(result.json()["recipe"])
    assert recipe.stage.kind == preference and recipe.data.validation_fraction == 0.2
    assert preference.upper() in result.json()["reasons"][0].replace("SimPO", "SIMPO")


def test_the_guided_recipe_for_single_judged_replies_kto(studio):
    from tunesmith.config import validate_recipe

    client, root = studio
    rows = [{"messages": [{"role": "user", "content": f"Greet me {i}."},
                          {"role": "assistant", "content": "Hello!" if i % 2 else "No."}], "label": bool(i % 2)}
            for i in range(30)]
    data = write_jsonl(root / "data" / "judged.jsonl", rows)
    result = client.post("/api/guided/recipe", json={"task": "prefer", "data": data, "preference": "kto"})
    assert result.status_code == 200, result.text
    assert validate_recipe(result.json()["recipe"]).stage.kind == "kto"


def test_the_guided_recipe_for_scoring_answers_is_a_reward_model(studio):
    from tunesmith.config import validate_recipe

    client, root = studio
    data = write_jsonl(root / "data" / "pairs-rm.jsonl", preference_pairs(20))
    result = client.post("/api/guided/recipe", json={"task": "score", "data": data})
    assert result.status_code == 200, result.text
    recipe = validate_recipe(result.json()["recipe"])
    assert recipe.stage.kind == "rm" and "score" in result.json()["reasons"][0]


def test_the_guided_recipe_for_practice_takes_built_in_rewards_only(studio):
    from tunesmith.config import validate_recipe

    client, root = studio
    rows = [{"question": f"What is {i} plus {i}?", "result": str(2 * i)} for i in range(20)]
    data = write_jsonl(root / "data" / "sums.jsonl", rows)
    body = {"task": "practise", "data": data, "columns": {"prompt": "question", "answer": "result"},
            "rewards": [{"kind": "answer_match", "pattern": r"(-?\d+)"}, {"kind": "format", "pattern": r"\d"},
                        {"kind": "length", "target": 8, "weight": 0.5}]}
    result = client.post("/api/guided/recipe", json=body)
    assert result.status_code == 200, result.text
    recipe = validate_recipe(result.json()["recipe"])
    assert recipe.stage.kind == "grpo" and [r.kind for r in recipe.stage.rewards] == ["answer_match", "format", "length"]
    assert recipe.data.columns.prompt == "question" and recipe.train.batch_size == 2
    refused = client.post("/api/guided/recipe", json={**body, "rewards": [{"kind": "function", "function": "os:system"}]})
    assert refused.status_code == 400 and "rewards.0.kind" in refused.json()["error"]["message"]
    no_pattern = client.post("/api/guided/recipe", json={**body, "rewards": [{"kind": "format"}]})
    assert no_pattern.status_code == 400 and "pattern" in no_pattern.json()["error"]["message"]

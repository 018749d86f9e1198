"""``tunesmith serve`` in process (FastAPI's TestClient / httpx on ASGI): the OpenAI routes against
tunesmith's own inference, batching, malformed requests, API keys, paths and the studio routes."""

from __future__ import annotations

import asyncio
import json

import pytest
import yaml

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'tunesmith[serve]'")

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from conftest import run_cli  # noqa: E402
from serve_support import BASE, greedy_completion, make_workspace, tiny_recipe  # noqa: E402

pytestmark = pytest.mark.slow
CHAT = [{"role": "user", "content": "Tell me a story about a cat."}]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_llama, tiny_data):
    root = make_workspace(tmp_path_factory.mktemp("workspace"), tiny_llama, tiny_data)
    for name, seed, lr in (("run-a", 0, 2e-2), ("run-b", 1, 5e-2)):
        recipe = tiny_recipe(name, steps=6, seed=seed, lr=lr)
        (root / "recipes" / f"{name}.yaml").parent.mkdir(exist_ok=True)
        (root / "recipes" / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
        done = run_cli("train", f"recipes/{name}.yaml", "--no-progress", cwd=root)
        assert done.returncode == 0, done.stderr
    return root


@pytest.fixture(scope="module")
def app(workspace):
    from tunesmith.serve.app import create_app

    app = create_app(workspace, max_upload_mb=1, max_body_kb=64)
    yield app
    app.state.generator.close()
    app.state.jobs.close()


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as client:
        yield client


def reference(workspace, model_id: str, max_tokens: int) -> tuple[str, str]:
    """What tunesmith's own inference answers (greedy) for the same model id: (chat reply, completion)."""
    from tunesmith.inference.generate import generate, load_for_inference

    base = str(workspace / BASE)
    adapter = str(workspace / model_id / "adapter") if model_id.startswith("runs/") else None
    model, tokenizer = load_for_inference(base, adapter)
    return generate(model, tokenizer, [CHAT], max_tokens)[0], greedy_completion(base, adapter, "Once upon a time",
                                                                                  max_tokens)


def chat(client, model: str, **fields) -> dict:
    response = client.post("/v1/chat/completions", json={"model": model, "messages": CHAT, "temperature": 0,
                                                           "max_tokens": 12, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def test_models_lists_bases_and_runs(client):
    ids = {entry["id"]: entry["owned_by"] for entry in client.get("/v1/models").json()["data"]}
    assert ids[BASE] == "tunesmith:base"
    assert ids["runs/run-a"] == ids["runs/run-b"] == "tunesmith:run"
    assert ids["smollm2-135m-instruct"] == "tunesmith:alias"


def test_adapters_share_one_base_and_answer_as_tunesmith_inference(client, app, workspace):
    """Base, run-a, run-b, base again: each answer equals tunesmith's own inference of that model."""
    def ask(model):
        reply = chat(client, model)["choices"][0]["message"]["content"]
        completion = client.post("/v1/completions", json={"model": model, "prompt": "Once upon a time", "max_tokens": 12,
                                                          "temperature": 0}).json()["choices"][0]["text"]
        return reply, completion

    answers = {model: ask(model) for model in ("runs/run-a", BASE, "runs/run-b")}
    for model in (BASE, "runs/run-a", "runs/run-b"):
        assert answers[model] == reference(workspace, model, 12), model
    assert ask(BASE) == answers[BASE]  # adapters switched off for the base
    assert len({completion for _, completion in answers.values()}) == 3
    assert len(app.state.pool.loaded) == 1  # one base loaded, two adapters on it
    assert len(next(iter(app.state.pool.loaded.values())).adapters) == 2


def test_stream_concatenates_to_the_whole_reply(client):
    whole = chat(client, BASE)["choices"][0]["message"]["content"]
    pieces, reasons = [], []
    with client.stream("POST", "/v1/chat/completions", json={"model": BASE, "messages": CHAT, "temperature": 0,
                                                               "max_tokens": 12, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        choice = json.loads(line[6:])["choices"][0]
        pieces.append(choice["delta"].get("content", ""))
        reasons.append(choice["finish_reason"])
    assert "".join(pieces) == whole and len(pieces) > 3
    assert reasons[-1] in ("stop", "length") and set(reasons[:-1]) == {None}


def test_completions_stop_n_and_seed(client, workspace):
    body = {"model": BASE, "prompt": "Once upon a time", "max_tokens": 20, "temperature": 0}
    whole = client.post("/v1/completions", json=body).json()
    text = whole["choices"][0]["text"]
    assert text == greedy_completion(str(workspace / BASE), None, "Once upon a time", 20)  # transformers' greedy
    assert whole["usage"]["completion_tokens"] == 20 and whole["choices"][0]["finish_reason"] == "length"
    word = text[len(text) // 2:len(text) // 2 + 3]  # a piece of the text past its start: the reply stops before it
    stopped = client.post("/v1/completions", json={**body, "stop": [word]}).json()["choices"][0]
    assert stopped == {**stopped, "text": text[: text.index(word)], "finish_reason": "stop"}
    sampled = {**body, "temperature": 1.0, "top_p": 0.9, "n": 3, "seed": 7}
    first, second = (client.post("/v1/completions", json=sampled).json() for _ in range(2))
    assert [c["text"] for c in first["choices"]] == [c["text"] for c in second["choices"]]  # same seed, same texts
    assert len(first["choices"]) == 3 and len({c["text"] for c in first["choices"]}) > 1


def test_concurrent_requests_are_batched_and_answer_as_alone(app, client):
    """Eight requests at once are generated together (left-padded) and answer as each does alone."""
    prompts = ["Once upon a time", "The cat", "Lily saw a big", "One day, Tom", "The sun", "A little bird",
               "Sam and his mom", "There was a"]
    alone = [client.post("/v1/completions", json={"model": BASE, "prompt": p, "max_tokens": 10,
                                                  "temperature": 0}).json()["choices"][0]["text"] for p in prompts]

    async def together():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            responses = await asyncio.gather(*(http.post("/v1/completions", json={
                "model": BASE, "prompt": p, "max_tokens": 10, "temperature": 0}) for p in prompts))
        return [r.json()["choices"][0]["text"] for r in responses]

    app.state.generator.batch_sizes.clear()
    assert asyncio.run(together()) == alone
    assert max(app.state.generator.batch_sizes) > 1


@pytest.mark.parametrize("body, status, reason", [
    (b"{not json", 400, "not valid JSON"),
    ({"model": "no/such-model", "messages": CHAT}, 404, "no/such-model"),
    ({"model": BASE, "messages": CHAT, "max_tokens": -3}, 400, "max_tokens"),
    ({"model": BASE, "messages": []}, 400, "messages"),
    ({"model": BASE, "messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ({"model": BASE, "messages": CHAT, "temperature": 9}, 400, "temperature"),
    ({"model": "../../etc", "messages": CHAT}, 404, "../../etc"),
    ({"model": BASE, "messages": [{"role": "user", "content": "x" * 70000}]}, 413, "larger than"),
])
def test_malformed_requests_get_a_json_error_with_a_reason(client, body, status, reason):
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    response = client.post("/v1/chat/completions", **kwargs)
    assert response.status_code == status
    assert reason in response.json()["error"]["message"]


def test_api_key_guards_every_route(workspace):
    from tunesmith.cli import main
    from tunesmith.serve.app import create_app

    app = create_app(workspace, api_key="s3cret")
    with TestClient(app) as client:
        for path in ("/", "/v1/models", "/api/runs", "/static/studio.js", "/api/jobs"):
            assert client.get(path).status_code == 401, path
            assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
            assert client.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200, path
        assert client.get("/?key=wrong", follow_redirects=False).status_code == 401
        opened = client.get("/?key=s3cret", follow_redirects=False)
        assert opened.status_code == 303 and "tunesmith_key" in opened.headers["set-cookie"]
        assert client.get("/api/runs").status_code == 200  # the cookie now set in this client
    app.state.jobs.close()
    assert main(["serve", "--host", "0.0.0.0", "--workspace", str(workspace)]) == 2  # no key, not loopback


def test_paths_from_the_browser_stay_in_the_workspace(client, workspace, tmp_path):
    outside = tmp_path / "secret.jsonl"
    outside.write_text('{"text": "secret"}\n')
    (workspace / "data" / "link.jsonl").symlink_to(outside)
    for path in ("../secret.jsonl", str(outside), "data/../../secret.jsonl", "data/link.jsonl"):
        response = client.get("/api/data/preview", params={"path": path})
        assert response.status_code == 403, path
        assert "secret" not in response.text.replace(path, "")
    assert client.get("/api/files", params={"folder": ".."}).status_code == 403
    assert client.get("/api/files/raw", params={"path": "/etc/passwd"}).status_code == 403
    bad = tiny_recipe("x")
    bad["data"]["train"] = [str(outside)]
    bad["output"]["dir"] = "../elsewhere"
    bad["model"]["trust_remote_code"] = True
    errors = {e["loc"] for e in client.post("/api/recipe/check", json={"recipe": bad}).json()["errors"]}
    assert errors == {"data.train.0", "output.dir", "model.trust_remote_code"}
    assert client.post("/api/preferences", json={"messages": CHAT, "chosen": "a", "rejected": "b",
                                                 "path": "../prefs.jsonl"}).status_code == 403


def test_upload_keeps_its_sanitised_name_and_a_size_limit(client, workspace):
    row = {"instruction": "<script>window.pwned=1</script>", "output": "<b>bold</b>"}
    response = client.post("/api/upload", files={"file": ("../../evil.jsonl", json.dumps(row) + "\n")})
    assert response.status_code == 200
    stored = response.json()["path"]
    assert stored == "data/evil.jsonl" and (workspace / stored).is_file()
    assert not (workspace.parent / "evil.jsonl").exists()
    again = client.post("/api/upload", files={"file": ("evil.jsonl", json.dumps(row) + "\n")}).json()["path"]
    assert again == "data/evil-2.jsonl"  # nothing existing is replaced
    odd = client.post("/api/upload", files={"file": ("My news (v2) é.TSV", "a\tb\n1\t2\n")}).json()["path"]
    assert odd == "data/My-news-v2.tsv"  # the extension as the readers know it
    preview = client.get("/api/data/preview", params={"path": stored}).json()
    assert preview["format"] == "alpaca" and preview["rows"][0] == row  # returned as data; the page shows it as text
    assert client.post("/api/upload", files={"file": ("big.jsonl", "x" * (1 << 20) + "\n")}).status_code == 413
    assert client.post("/api/upload", files={"file": ("model.pkl", "x")}).status_code == 403


def test_recipe_check_places_errors_at_fields_and_gives_yaml(client):
    from tunesmith.config import validate_recipe

    bad = tiny_recipe("x")
    bad["train"]["lr"] = -1
    bad["method"]["r"] = 0
    errors = client.post("/api/recipe/check", json={"recipe": bad}).json()["errors"]
    assert {e["loc"] for e in errors} == {"train.lr", "method.lora.r"}
    good = client.post("/api/recipe/check", json={"recipe": tiny_recipe("x")}).json()
    assert good["valid"] and validate_recipe(yaml.safe_load(good["yaml"])).output.dir == "runs/x"


def test_plan_counts_parameters_as_the_method_does(client, workspace):
    from tunesmith.config import validate_recipe
    from tunesmith.methods import build_method, count_parameters
    from tunesmith.models import load_model

    plan = client.post("/api/plan", json={"recipe": tiny_recipe("x")}).json()
    recipe = validate_recipe(tiny_recipe("x"))
    model = build_method(recipe.method).apply(load_model(str(workspace / BASE), recipe.model))
    assert (plan["trainable_parameters"], plan["total_parameters"]) == count_parameters(model)
    # the Plan screen shows `tunesmith plan`'s own figures (one plan, no second formula)
    from tunesmith.workflows.plan import plan_recipe

    local = recipe.model_copy(update={"model": recipe.model.model_copy(update={"name": str(workspace / BASE)}),
                                      "data": recipe.data.model_copy(update={"train": tuple(
                                          str(workspace / p) for p in recipe.data.train)})})
    whole = plan_recipe(local, calibrate=False, say=lambda *a: None)
    same = whole.methods[0]
    assert plan["memory_mb"] == round(same.memory.total / 2**20, 1) and plan["fits"] == same.fits
    assert plan["data_verdict"] == whole.data["verdict"] and plan["data_note"] == same.data_note


def test_preferences_append_pairs_that_read_as_preference_data(client, workspace):
    from tunesmith.data.formats import detect_format, preference_parts
    from tunesmith.data.readers import read_records

    for chosen, rejected in (("yes", "no"), ("good", "bad")):
        response = client.post("/api/preferences", json={"messages": CHAT, "chosen": chosen, "rejected": rejected,
                                                         "path": "data/prefs-test.jsonl"})
    assert response.json()["pairs"] == 2
    records = list(read_records(workspace / "data" / "prefs-test.jsonl"))
    assert detect_format(records[1]) == "preference"
    assert preference_parts(records[1]) == ([CHAT[0]], "good", "bad")


def test_runs_compare_gives_curves_and_recipe_diff(client):
    result = client.get("/api/runs/compare", params=[("runs", "runs/run-a"), ("runs", "runs/run-b")]).json()
    assert [len(r["metrics"]) for r in result["runs"]] == [6, 6]
    assert "-  lr: 0.02" in result["recipe_diff"] and "+  lr: 0.05" in result["recipe_diff"]

"""The server's safety rules (serve/safety.py), route by route: code named by the browser is refused
unless ``serve --allow-code``; every path stays in the workspace; HTTP codes say what happened.

One test per route of the audit table in docs/studio.md. No training: a random tiny model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'tunesmith[serve]'")

from fastapi.testclient import TestClient  # noqa: E402

from serve_support import make_workspace, tiny_recipe  # noqa: E402

CHAT = [{"role": "user", "content": "Hello"}]
REWARD_FUNCTION = {"kind": "function", "function": "os:system"}


def grpo_recipe(run: str = "x") -> dict:
    recipe = tiny_recipe(run)
    recipe["stage"] = {"kind": "grpo", "rewards": [{"kind": "exact_match"}, REWARD_FUNCTION]}
    return recipe


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_llama, tiny_data) -> Path:
    from tunesmith.serve.workspace import Workspace

    root = make_workspace(tmp_path_factory.mktemp("workspace"), tiny_llama, tiny_data, records=16)
    Workspace(root)  # its folders
    outside = root.parent / "outside"
    outside.mkdir()
    (outside / "hidden.jsonl").write_text('{"text": "secret"}\n')
    (root / "data" / "link.jsonl").symlink_to(outside / "hidden.jsonl")
    (root / "runs" / "done").mkdir()
    (root / "runs" / "done" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    return root


def make_client(workspace: Path, **options):
    from tunesmith.serve.app import create_app

    app = create_app(workspace, max_upload_mb=1, max_body_kb=64, **options)
    return app, TestClient(app)


@pytest.fixture(scope="module")
def client(workspace):
    app, client = make_client(workspace)
    with client:
        yield client
    app.state.generator.close()
    app.state.jobs.close()


def refused(response, status: int, *words: str) -> str:
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    assert all(word in message for word in words), message
    assert "\n" not in message and "Traceback" not in message
    return message


# --- the rules themselves -------------------------------------------------------------------------


def test_every_field_that_names_code_or_a_path_is_found(workspace):
    from tunesmith.config import Recipe
    from tunesmith.serve.safety import SafetyRules, recipe_problems
    from tunesmith.serve.workspace import Workspace

    raw = grpo_recipe()
    raw["model"]["trust_remote_code"] = True
    raw["data"].update(validation="/etc/passwd",
                       prepare={"cache_dir": "/tmp", "dedup": {"against": ["../eval.jsonl"]}})
    raw["stage"]["rewards"].append({"kind": "model", "path": "/models/rm"})
    raw["regularise"] = {"ewc": {"strength": 1.0, "data": "/etc/hosts"}}
    raw["eval"] = {"task": {"file": "../task.jsonl"}, "report": {"suites": ["/suite.yaml"], "data_root": ".."}}
    raw["output"]["dir"] = "exports/not-a-run"
    recipe = Recipe.model_validate(raw)
    rules = SafetyRules(Workspace(workspace), {})
    problems = {p.loc: p.code for p in recipe_problems(recipe, rules)}
    assert problems == {"model.trust_remote_code": True, "stage.rewards.1.function": True,
                        "stage.rewards.2.path": False, "data.validation": False,
                        "data.prepare.cache_dir": False, "data.prepare.dedup.against.0": False,
                        "regularise.ewc.data": False, "eval.task.file": False, "eval.report.data_root": False,
                        "eval.report.suites.0": False, "output.dir": False}
    allowed = {p.loc for p in recipe_problems(recipe, SafetyRules(Workspace(workspace), {}, allow_code=True))}
    assert allowed == set(problems) - {"model.trust_remote_code", "stage.rewards.1.function"}  # paths stay refused
    assert recipe_problems(Recipe.model_validate(tiny_recipe("ok")), rules) == []
    mixture = tiny_recipe("ok")
    mixture["data"]["sources"] = [{"name": "s", "train": ["data/tiny.jsonl", "../x.jsonl"], "validation": "/v.jsonl"}]
    assert [p.loc for p in recipe_problems(Recipe.model_validate(mixture), rules)] == [
        "data.sources.0.train.1", "data.sources.0.validation"]


def test_a_suite_file_is_judged_by_what_it_reaches(workspace):
    from tunesmith.serve.safety import SafetyRules, suite_file_problems
    from tunesmith.serve.workspace import Workspace

    rules = SafetyRules(Workspace(workspace), {})
    suites = workspace / "data" / "suites"
    suites.mkdir(exist_ok=True)
    (suites / "code.yaml").write_text(yaml.safe_dump({"tasks": [
        {"kind": "lm_eval", "name": "mine", "tasks": ["mine"], "include_path": "lm_tasks"},
        {"kind": "stage", "name": "rl", "path": "../tiny.jsonl", "stage": {"kind": "grpo", "rewards": [REWARD_FUNCTION]}},
        {"kind": "bias", "name": "bias", "path": "{probes}/counterfactual_pairs.csv"}]}))
    (suites / "outside.yaml").write_text(yaml.safe_dump({"tasks": [
        {"kind": "perplexity", "name": "p", "path": "/etc/hosts"}, "../../../outside/task.yaml"]}))
    code = {p.loc: p.code for p in suite_file_problems("data/suites/code.yaml", "suite", rules)}
    assert code == {"suite: task mine.include_path": True, "suite: task rl.stage.rewards.0.function": True}
    assert suite_file_problems("data/suites/code.yaml", "suite", SafetyRules(Workspace(workspace), {}, True)) == []
    outside = [p.loc for p in suite_file_problems("data/suites/outside.yaml", "suite", rules)]
    assert outside == ["suite: tasks[1]"]  # a task file outside is refused before anything in the suite is read
    (suites / "outside.yaml").write_text(yaml.safe_dump({"tasks": [{"kind": "perplexity", "name": "p",
                                                                     "path": "/etc/hosts"}]}))
    assert [p.loc for p in suite_file_problems("data/suites/outside.yaml", "suite", rules)] == ["suite: task p.path"]


# --- one test per route (docs/studio.md, "What the server accepts from the browser") -----------------------------


def test_openai_routes_serve_only_known_models(client):
    assert client.get("/v1/models").status_code == 200
    for route, extra in (("/v1/chat/completions", {"messages": CHAT}), ("/v1/completions", {"prompt": "Hi"})):
        for model in ("../../etc", "/etc", "data/tiny.jsonl", "no/such-model"):
            refused(client.post(route, json={"model": model, "max_tokens": 2, **extra}), 404, model)


def test_files_route_lists_only_workspace_folders(client):
    assert client.get("/api/files", params={"folder": "data"}).status_code == 200
    refused(client.get("/api/files", params={"folder": ".."}), 403, "..")
    refused(client.get("/api/files", params={"folder": "/etc"}), 403, "relative")
    refused(client.get("/api/files", params={"folder": "nothing-here"}), 404, "does not exist")


def test_raw_file_route_reads_only_workspace_files(client):
    refused(client.get("/api/files/raw", params={"path": "/etc/passwd"}), 403)
    refused(client.get("/api/files/raw", params={"path": "data/link.jsonl"}), 403, "outside")
    refused(client.get("/api/files/raw", params={"path": "data/missing.html"}), 404)


def test_upload_route_chooses_the_name_itself(client, workspace):
    response = client.post("/api/upload", files={"file": ("../../../evil.jsonl", '{"text": "x"}\n')})
    # the file keeps its own name, reduced to a plain name under data/: no folder of the browser's is followed
    assert response.status_code == 200 and response.json()["path"] == "data/evil.jsonl"
    assert not (workspace.parent / "evil.jsonl").exists() and (workspace / "data" / "evil.jsonl").is_file()
    again = client.post("/api/upload", files={"file": ("evil.jsonl", '{"text": "y"}\n')}).json()["path"]
    assert again == "data/evil-2.jsonl"  # never replaces a file already there
    refused(client.post("/api/upload", files={"file": ("rewards.py", "import os")}), 403, "rewards.py")


def test_preview_and_inspect_routes_read_only_workspace_files(client):
    for path in ("../outside/hidden.jsonl", "data/link.jsonl"):
        assert "secret" not in refused(client.get("/api/data/preview", params={"path": path}), 403)
        assert "secret" not in refused(client.post("/api/data/inspect", json={"path": path}), 403)
    refused(client.get("/api/data/preview", params={"path": "data/none.jsonl"}), 404)
    refused(client.post("/api/data/inspect", json={"path": "data/none.jsonl"}), 404)


def test_preferences_route_appends_only_to_data_jsonl(client, workspace):
    pair = {"messages": CHAT, "chosen": "a", "rejected": "b"}
    assert client.post("/api/preferences", json={**pair, "path": "data/prefs.jsonl"}).status_code == 200
    for path in ("../prefs.jsonl", "runs/done/metrics.jsonl", "jobs/jobs.jsonl", "data/prefs.yaml"):
        refused(client.post("/api/preferences", json={**pair, "path": path}), 403)
    assert (workspace / "runs" / "done" / "metrics.jsonl").read_text().count("\n") == 1


def test_recipe_check_route_places_code_and_path_refusals_at_their_fields(client):
    bad = grpo_recipe()
    bad["model"]["trust_remote_code"] = True
    bad["data"]["train"] = ["/etc/passwd"]
    errors = client.post("/api/recipe/check", json={"recipe": bad}).json()["errors"]
    assert {e["loc"] for e in errors} == {"model.trust_remote_code", "stage.rewards.1.function", "data.train.0"}
    assert all("--allow-code" in e["message"] for e in errors if e["loc"] != "data.train.0")


def test_recipe_parse_route_reads_yaml_as_data(client):
    text = "!!python/object/apply:os.system ['touch /tmp/pwned']"
    refused(client.post("/api/recipe/parse", content=text.encode()), 400, "not valid YAML")
    assert client.post("/api/recipe/parse", content=b"model: {name: x}").json() == {"recipe": {"model": {"name": "x"}}}


@pytest.mark.parametrize("route", ["/api/recipes", "/api/plan"])
def test_recipe_save_and_plan_routes_refuse_code_with_403(client, workspace, route):
    refused(client.post(route, json={"recipe": grpo_recipe(), "name": "rl"}), 403, "stage.rewards.1.function",
            "--allow-code")
    trusting = tiny_recipe("x")
    trusting["model"]["trust_remote_code"] = True
    refused(client.post(route, json={"recipe": trusting}), 403, "trust_remote_code", "--allow-code")
    outside = tiny_recipe("x")
    outside["output"]["dir"] = "../elsewhere"
    refused(client.post(route, json={"recipe": outside}), 403, "output.dir")
    malformed = tiny_recipe("x")
    malformed["train"]["lr"] = -1
    refused(client.post(route, json={"recipe": malformed}), 400, "train.lr")
    assert not list((workspace / "recipes").glob("rl*.yaml"))


def test_runs_routes_read_only_workspace_runs(client):
    assert client.get("/api/runs/metrics", params={"path": "runs/done"}).json()["records"][0]["step"] == 1
    refused(client.get("/api/runs/metrics", params={"path": "../outside"}), 403)
    refused(client.get("/api/runs/metrics", params={"path": "runs/none"}), 404)
    refused(client.get("/api/runs/compare", params=[("runs", "runs/done"), ("runs", "/etc")]), 403)


def test_train_job_refuses_an_uploaded_recipe_that_names_code(client, workspace):
    uploaded = client.post("/api/upload", files={"file": ("rl.json", json.dumps(grpo_recipe("rl")))}).json()["path"]
    refused(client.post("/api/jobs", json={"kind": "train", "recipe": uploaded}), 403, "stage.rewards.1.function")
    outside = tiny_recipe("x")
    outside["output"]["dir"] = "exports/x"
    (workspace / "recipes" / "outside.yaml").write_text(yaml.safe_dump(outside))
    refused(client.post("/api/jobs", json={"kind": "train", "recipe": "recipes/outside.yaml"}), 403, "under runs/")
    refused(client.post("/api/jobs", json={"kind": "train", "recipe": "recipes/none.yaml"}), 404)
    assert client.get("/api/jobs").json()["jobs"] == []


def test_sweep_job_refuses_a_space_whose_values_name_code(client, workspace):
    (workspace / "recipes" / "base.yaml").write_text(yaml.safe_dump(tiny_recipe("base")))
    job = {"kind": "sweep", "recipe": "recipes/base.yaml", "trials": 2}
    for space, field in (({"model.trust_remote_code": {"low": 0, "high": 1}}, "model.trust_remote_code"),
                         ({"model.trust_remote_code": [False, True]}, "model.trust_remote_code"),
                         ({"data.train": {"choices": [["data/tiny.jsonl"], ["/etc/passwd"]]}}, "data.train.0")):
        refused(client.post("/api/jobs", json={**job, "space": yaml.safe_dump(space)}), 403, field)
    (workspace / "recipes" / "rl.yaml").write_text(yaml.safe_dump(grpo_recipe("rl")))
    refused(client.post("/api/jobs", json={**job, "recipe": "recipes/rl.yaml", "space": "train.lr: [0.1, 0.2]"}),
            403, "stage.rewards.1.function")
    assert client.get("/api/jobs").json()["jobs"] == []


def test_eval_job_refuses_a_suite_that_names_code_or_reaches_outside(client, workspace):
    (workspace / "data" / "lm.json").write_text(json.dumps({"tasks": [
        {"kind": "lm_eval", "name": "mine", "tasks": ["mine"], "include_path": "lm_tasks"}]}))
    (workspace / "data" / "far.json").write_text(json.dumps({"tasks": [
        {"kind": "perplexity", "name": "p", "path": "/etc/hosts"}]}))
    job = {"kind": "eval", "run": "runs/done"}
    refused(client.post("/api/jobs", json={**job, "suite": "data/lm.json"}), 403, "include_path", "--allow-code")
    refused(client.post("/api/jobs", json={**job, "suite": "data/far.json"}), 403, "outside")
    refused(client.post("/api/jobs", json={**job, "suite": "../x.yaml"}), 403)
    refused(client.post("/api/jobs", json={"kind": "eval", "run": "runs/none"}), 404)
    assert client.get("/api/jobs").json()["jobs"] == []


def test_data_and_export_jobs_take_only_workspace_paths(client):
    refused(client.post("/api/jobs", json={"kind": "data", "step": "clean", "path": "/etc/passwd"}), 403)
    refused(client.post("/api/jobs", json={"kind": "data", "step": "clean", "path": "data/none.jsonl"}), 404)
    refused(client.post("/api/jobs", json={"kind": "export", "run": "../outside"}), 403)
    refused(client.post("/api/jobs", json={"kind": "export", "run": "runs/none"}), 404)
    assert client.get("/api/jobs").json()["jobs"] == []


def test_job_routes_say_404_for_a_job_that_does_not_exist(client):
    for method, path in (("GET", "/api/jobs/999"), ("GET", "/api/jobs/999/progress"), ("POST", "/api/jobs/999/stop"),
                         ("POST", "/api/jobs/999/resume")):
        refused(client.request(method, path), 404, "no job 999")
    for number in ("0", str(2**64)):  # beyond SQLite's integers: malformed, not a server error
        assert client.get(f"/api/jobs/{number}").status_code == 400


def test_a_job_that_cannot_be_stopped_or_resumed_is_a_conflict_not_a_malformed_request(tmp_path):
    from tunesmith.serve.jobs import JobStore
    from tunesmith.serve.workspace import Workspace

    store = JobStore(Workspace(tmp_path).root / "jobs" / "jobs.sqlite")  # finished before this server started
    done = store.add("train", "done", ["train", "r.yaml"], "runs/a", "runs/a", resume_args=["train", "r.yaml", "--resume"])
    store.update(done, status="done", returncode=0)
    failed_export = store.add("export", "export", ["export"], "exports/a")
    store.update(failed_export, status="failed", returncode=2)
    app, client = make_client(tmp_path)
    with client:
        refused(client.post(f"/api/jobs/{done}/stop"), 409, f"job {done} is done", "only a queued or running job")
        refused(client.post(f"/api/jobs/{done}/resume"), 409, f"job {done} (train, done) cannot be resumed")
        refused(client.post(f"/api/jobs/{failed_export}/resume"), 409, "(export, failed) cannot be resumed")
        assert client.get(f"/api/jobs/{done}").json()["status"] == "done"  # refused, so unchanged
    app.state.generator.close()
    app.state.jobs.close()


def test_static_and_page_routes_serve_only_the_package(client):
    for path in ("/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2fapp.py"):
        assert client.get(path).status_code == 404, path
    assert client.get("/").status_code == 200 and client.get("/api/openapi.json").status_code == 200


HUB_ID = "HuggingFaceTB/SmolLM2-135M"  # never downloaded: every route refuses it before anything loads


def test_a_hub_id_is_a_remote_model_but_aliases_bases_and_workspace_folders_are_not(workspace):
    from tunesmith.config import Recipe
    from tunesmith.serve.safety import SafetyRules, recipe_problems
    from tunesmith.serve.workspace import Workspace

    rules = SafetyRules(Workspace(workspace), {"outside": "/somewhere/base"})
    hub = tiny_recipe("x")
    hub["model"]["name"] = HUB_ID
    [problem] = recipe_problems(Recipe.model_validate(hub), rules)
    assert (problem.loc, problem.remote, problem.code) == ("model.name", True, False)
    assert "--allow-remote-models" in problem.message and "models/" in problem.message
    allowing = SafetyRules(Workspace(workspace), {}, allow_remote_models=True)
    assert recipe_problems(Recipe.model_validate(hub), allowing) == []
    for name in ("models/base", "smollm2-135m-instruct", "/somewhere/base"):  # owner/name-shaped, alias, base
        assert recipe_problems(Recipe.model_validate({**hub, "model": {"name": name}}), rules) == [], name
    outside = {**hub, "model": {"name": "../models/base"}}
    assert [p.remote for p in recipe_problems(Recipe.model_validate(outside), allowing)] == [False]  # path rule stays


def test_every_route_taking_a_recipe_refuses_a_hub_model_with_403(client, workspace):
    hub = tiny_recipe("hub")
    hub["model"]["name"] = HUB_ID
    for route in ("/api/recipes", "/api/plan"):
        message = refused(client.post(route, json={"recipe": hub, "name": "hub"}), 403, HUB_ID, "--allow-remote-models")
        assert client.post(route, json={"recipe": hub}).json()["error"]["code"] == "remote_model_refused", message
    assert not list((workspace / "recipes").glob("hub*.yaml"))  # nothing saved
    errors = client.post("/api/recipe/check", json={"recipe": hub}).json()["errors"]
    assert [e["loc"] for e in errors] == ["model.name"]
    (workspace / "recipes" / "hub.yaml").write_text(yaml.safe_dump(hub))
    refused(client.post("/api/jobs", json={"kind": "train", "recipe": "recipes/hub.yaml"}), 403, "--allow-remote-models")
    (workspace / "recipes" / "base.yaml").write_text(yaml.safe_dump(tiny_recipe("base")))
    refused(client.post("/api/jobs", json={"kind": "sweep", "recipe": "recipes/base.yaml", "trials": 2,
                                           "space": yaml.safe_dump({"model.name": ["models/base", HUB_ID]})}),
            403, "model.name", "--allow-remote-models")
    rows = "".join(json.dumps({"prompt": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(12))
    (workspace / "data" / "qa.jsonl").write_text(rows)
    refused(client.post("/api/guided/recipe", json={"task": "answer", "data": "data/qa.jsonl", "model": HUB_ID,
                                                    "columns": {"prompt": "prompt", "answer": "answer"}}),
            403, "--allow-remote-models")
    assert client.get("/api/jobs").json()["jobs"] == []


def test_allow_remote_models_lifts_only_that_rule(workspace):
    app, client = make_client(workspace, allow_remote_models=True)
    with client:
        hub = tiny_recipe("hub")
        hub["model"]["name"] = HUB_ID
        saved = client.post("/api/recipes", json={"recipe": hub, "name": "remote"})
        assert saved.status_code == 200 and HUB_ID in (workspace / saved.json()["path"]).read_text()
        hub["model"]["trust_remote_code"] = True
        refused(client.post("/api/recipes", json={"recipe": hub}), 403, "trust_remote_code", "--allow-code")
    app.state.generator.close()
    app.state.jobs.close()


def test_allow_code_lifts_the_code_rule_but_not_the_path_rule(workspace):
    app, client = make_client(workspace, allow_code=True)
    with client:
        saved = client.post("/api/recipes", json={"recipe": grpo_recipe("rl"), "name": "allowed"})
        assert saved.status_code == 200
        assert "os:system" in (workspace / saved.json()["path"]).read_text()
        outside = grpo_recipe("rl")
        outside["data"]["train"] = ["/etc/passwd"]
        refused(client.post("/api/recipes", json={"recipe": outside}), 403, "data.train.0")
    app.state.generator.close()
    app.state.jobs.close()


@pytest.mark.slow
def test_serve_checks_its_arguments_before_it_starts(tmp_path, tiny_llama):
    import socket

    from conftest import run_cli

    (tmp_path / "file").write_text("x")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = str(held.getsockname()[1])
        cases = {("--workspace", str(tmp_path / "file")): "is a file, not a folder",
                 ("--workspace", str(tmp_path / "ws"), "--model", str(tmp_path / "none")): "does not exist",
                 ("--workspace", str(tmp_path / "ws"), "--model", f"m={tmp_path / 'file'}"): "is a file",
                 ("--workspace", str(tmp_path / "ws"), "--model", tiny_llama, "--port", "70000"): "not a port number",
                 ("--workspace", str(tmp_path / "ws"), "--port", port): f"--port {port}"}
        for args, words in cases.items():
            done = run_cli("serve", *args, timeout=120)
            assert done.returncode == 2, (args, done.stderr)
            assert words in done.stderr and "Traceback" not in done.stderr and "studio on" not in done.stdout, args

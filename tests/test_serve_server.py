"""``tunesmith serve`` as a real process on loopback: jobs (submit, live progress, stop, resume, a
server restart during a job) and the official ``openai`` client against the run they trained."""

from __future__ import annotations

import os
import signal

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'tunesmith[serve]'")
openai = pytest.importorskip("openai", reason="needs the openai client (dev extra)")

import httpx  # noqa: E402

from serve_support import BASE, Server, greedy_completion, make_workspace, tiny_recipe, wait_for  # noqa: E402

pytestmark = pytest.mark.slow


def start_training(server: Server, name: str, steps: int) -> dict:
    recipe = tiny_recipe(name, steps=steps, batch_size=1, checkpoint_every=10)
    recipe["data"]["max_length"] = 32
    saved = httpx.post(f"{server.url}/api/recipes", json={"recipe": recipe, "name": name}).raise_for_status().json()
    return httpx.post(f"{server.url}/api/jobs", json={"kind": "train", "recipe": saved["path"]}).raise_for_status().json()


def progress(server: Server, job_id: int) -> dict:
    return httpx.get(f"{server.url}/api/jobs/{job_id}/progress", timeout=30).raise_for_status().json()


def reached(server: Server, job_id: int, step: int):
    update = progress(server, job_id)
    return update if update["metrics"] and update["metrics"][-1]["step"] >= step else None


def status_is(server: Server, job_id: int, *wanted: str):
    job = httpx.get(f"{server.url}/api/jobs/{job_id}", timeout=30).json()
    return job if job["status"] in wanted else None


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_llama, tiny_data):
    return make_workspace(tmp_path_factory.mktemp("workspace"), tiny_llama, tiny_data)


def test_job_stop_resume_and_the_openai_client(workspace):
    server = Server(workspace).start()
    try:
        job = start_training(server, "stopped-once", steps=120)
        # The runner thread is woken by the submission and may start the job before the reply is built.
        assert job["status"] in ("queued", "running")
        wait_for(lambda: reached(server, job["id"], 15))  # live metrics from the run's metrics.jsonl
        httpx.post(f"{server.url}/api/jobs/{job['id']}/stop").raise_for_status()
        stopped = wait_for(lambda: status_is(server, job["id"], "stopped", "done", "failed"))
        assert stopped["status"] == "stopped" and stopped["resumable"]
        assert "--resume" in progress(server, job["id"])["log"]  # the command printed its resume hint
        httpx.post(f"{server.url}/api/jobs/{job['id']}/resume").raise_for_status()
        done = wait_for(lambda: status_is(server, job["id"], "done", "failed", "stopped"))
        update = progress(server, job["id"])
        assert done["status"] == "done", update["log"][-2000:]
        assert "resuming from" in update["log"]
        assert str(workspace) not in update["log"]  # the page is shown workspace paths, never the server's own
        assert [record["step"] for record in update["metrics"] if "loss" in record] == list(range(1, 121))

        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        ids = [model.id for model in client.models.list()]
        assert "runs/stopped-once" in ids and BASE in ids
        messages = [{"role": "user", "content": "Tell me a story."}]
        whole = client.chat.completions.create(model=BASE, messages=messages, max_tokens=10,
                                               temperature=0)
        assert whole.choices[0].message.content and whole.usage.completion_tokens <= 10
        stream = client.chat.completions.create(model=BASE, messages=messages, max_tokens=10,
                                                temperature=0, stream=True)
        assert "".join(chunk.choices[0].delta.content or "" for chunk in stream) == whole.choices[0].message.content
        texts = {model: client.completions.create(model=model, prompt="Once upon a time", max_tokens=12,
                                                  temperature=0).choices[0].text
                 for model in (BASE, "runs/stopped-once")}
        assert texts[BASE] == greedy_completion(str(workspace / BASE), None, "Once upon a time", 12)
        assert texts["runs/stopped-once"] != texts[BASE]  # the adapter is applied per request
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="runs/none", messages=messages)
    finally:
        server.stop()


def test_job_survives_a_server_restart_and_resumes_after_a_crash(workspace):
    server = Server(workspace).start()
    job = start_training(server, "restarted", steps=5000)
    wait_for(lambda: reached(server, job["id"], 12))
    server.stop()  # the server goes away; the job runs on in its own process
    second = Server(workspace).start()
    try:
        followed = status_is(second, job["id"], "running")
        assert followed, "the new server lost the running job"
        pid = followed["pid"]
        step = progress(second, job["id"])["metrics"][-1]["step"]
        wait_for(lambda: reached(second, job["id"], step + 10))  # still training, still streamed
        history = [j["id"] for j in httpx.get(f"{second.url}/api/jobs").json()["jobs"]]
        assert job["id"] in history and len(history) >= 2  # the earlier test's job is still listed
        second.stop(signal.SIGKILL)  # now a crash: server and job die together
        os.killpg(pid, signal.SIGKILL)
        wait_for(lambda: not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z")
    finally:
        second.stop(signal.SIGKILL)
    third = Server(workspace).start()
    try:
        interrupted = status_is(third, job["id"], "interrupted")
        assert interrupted and interrupted["resumable"]
        httpx.post(f"{third.url}/api/jobs/{job['id']}/resume").raise_for_status()
        wait_for(lambda: "resuming from" in progress(third, job["id"])["log"])
        wait_for(lambda: reached(third, job["id"], 25))
        httpx.post(f"{third.url}/api/jobs/{job['id']}/stop").raise_for_status()
        assert wait_for(lambda: status_is(third, job["id"], "stopped", "failed", "done"))["status"] == "stopped"
    finally:
        third.stop()

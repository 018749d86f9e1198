"""Helpers of the ``tunesmith serve`` tests: a workspace on a tiny model, a real server process, an app on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import REPO

BASE = "models/base"
"""The workspace id of the model :func:`make_workspace` copies in (the tests' tiny Llama, or stories260k)."""


def make_workspace(root: Path, model: str, alpaca_records: str, records: int = 48) -> Path:
    """A workspace holding ``model`` under models/base and the first alpaca records under data/tiny.jsonl."""
    (root / "models").mkdir(parents=True, exist_ok=True)
    shutil.copytree(model, root / BASE)
    (root / "data").mkdir(exist_ok=True)
    rows = json.loads(Path(alpaca_records).read_text())[:records]
    (root / "data" / "tiny.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def tiny_recipe(run: str, steps: int = 6, **train) -> dict:
    """A fast recipe on the workspace's base model and tiny.jsonl (paths relative to the workspace)."""
    return {"model": {"name": BASE},
            "data": {"train": ["data/tiny.jsonl"], "max_length": 48, "template": "simple"},
            "method": {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            # float32: run-b's lr 5e-2 under bfloat16 autocast gives an adapter whose greedy replies flip on
            # float noise, so equality of the server's and inference's answers would test the noise
            "train": {"max_steps": steps, "batch_size": 2, "lr": 5e-3, "log_every": 1, "seed": 0,
                      "speed": {"autocast": "off"}, **train},
            "output": {"dir": f"runs/{run}"}}


def greedy_completion(base: str, adapter: str | None, prompt: str, max_tokens: int) -> str:
    """What tunesmith's own inference (transformers' greedy ``generate``) continues ``prompt`` with."""
    from tunesmith.inference.generate import load_for_inference

    model, tokenizer = load_for_inference(base, adapter)
    inputs = tokenizer(prompt, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    return tokenizer.decode(output, skip_special_tokens=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def app_on_loopback(app):
    """``app`` served by uvicorn in a thread on 127.0.0.1, a free port (yielded) once it has started; on exit the
    server stops and the app's batcher and job runner are closed."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        app.state.generator.close()
        app.state.jobs.close()


class Server:
    """``python -m tunesmith serve`` in its own process, on a free loopback port."""

    def __init__(self, workspace: Path, *extra: str, cwd: Path | None = None) -> None:
        self.workspace, self.extra, self.cwd = workspace, extra, cwd
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> "Server":
        import httpx

        env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
        self.log = open(self.workspace / f"server-{self.port}.log", "a")
        self.process = subprocess.Popen([sys.executable, "-m", "tunesmith", "serve", "--workspace", str(self.workspace),
                                         "--port", str(self.port), *self.extra,
                                         # float32 unless a test asks: the tests hold served replies equal to
                                         # generate's, the judge's, the rewriter's (serve's default is auto)
                                         *([] if "--dtype" in self.extra else ["--dtype", "float32"])],
                                        env=env, stdout=self.log,
                                        stderr=subprocess.STDOUT, cwd=self.cwd)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {(self.workspace / f'server-{self.port}.log').read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2, headers=self.headers()).status_code in (200, 401):
                    return self
            except httpx.HTTPError:
                time.sleep(0.3)
        raise RuntimeError("server did not start in time")

    def headers(self) -> dict:
        if "--api-key" in self.extra:
            return {"Authorization": f"Bearer {self.extra[self.extra.index('--api-key') + 1]}"}
        return {}

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        self.log.close()


def wait_for(predicate, timeout: float = 240, every: float = 0.3):
    """Poll ``predicate`` until it returns something truthy; that value is returned."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {predicate}")

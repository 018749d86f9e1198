"""Jobs: training, evaluation, data preparation and export, each run as ``python -m tunesmith ...``.

The store is one SQLite file in the workspace (``jobs/jobs.sqlite``), so every past job is there
after a restart. A worker thread starts one job at a time (two jobs never fight for the CPU or
GPU) in a process of its own session, its output going to ``jobs/<id>.log``: a crashing job
never takes the server down, and a job keeps running when the browser closes. Stop sends SIGINT,
which the training command answers with a clean stop (its newest checkpoint kept, a resume
command printed). After a restart, a job whose process still lives is watched again; one whose
process died is marked ``interrupted`` and can be resumed (``train --resume``).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from tunesmith.serve.workspace import Conflict, NotFound, Workspace

FINISHED = ("done", "failed", "stopped", "interrupted", "cancelled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    title TEXT NOT NULL,
    args TEXT NOT NULL,
    resume_args TEXT,
    output TEXT,
    run_dir TEXT,
    status TEXT NOT NULL,
    pid INTEGER,
    returncode INTEGER,
    stop_requested INTEGER DEFAULT 0,
    created REAL NOT NULL,
    started REAL,
    finished REAL
)
"""


class JobStore:
    """The ``jobs`` table; each call opens its own connection (the server has several threads)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with self._connect() as connection:
            connection.execute(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=30)
        connection.row_factory = sqlite3.Row
        return connection

    def add(self, kind: str, title: str, args: list[str], output: str, run_dir: Optional[str] = None,
            resume_args: Optional[list[str]] = None) -> int:
        with self._connect() as connection:
            cursor = connection.execute(
                "INSERT INTO jobs (kind, title, args, resume_args, output, run_dir, status, created) "
                "VALUES (?, ?, ?, ?, ?, ?, 'queued', ?)",
                (kind, title, json.dumps(args), json.dumps(resume_args) if resume_args else None, output, run_dir,
                 time.time()))
            return int(cursor.lastrowid)

    def get(self, job_id: int) -> dict:
        with self._connect() as connection:
            row = connection.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"there is no job {job_id}")
        return _as_dict(row)

    def all(self) -> list[dict]:
        with self._connect() as connection:
            return [_as_dict(row) for row in connection.execute("SELECT * FROM jobs ORDER BY id DESC")]

    def with_status(self, status: str) -> list[dict]:
        with self._connect() as connection:
            rows = connection.execute("SELECT * FROM jobs WHERE status = ? ORDER BY id", (status,))
            return [_as_dict(row) for row in rows]

    def update(self, job_id: int, **fields) -> None:
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with self._connect() as connection:
            connection.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*fields.values(), job_id))


def _as_dict(row: sqlite3.Row) -> dict:
    job = dict(row)
    job["args"] = json.loads(job["args"])
    job["resume_args"] = json.loads(job["resume_args"]) if job["resume_args"] else None
    job["resumable"] = job["status"] in ("stopped", "interrupted", "failed") and job["resume_args"] is not None
    return job


class JobRunner:
    """Starts queued jobs one at a time and follows them to the end.

    Args:
        workspace: Jobs run with the workspace as their working folder.
        poll_s: How often the worker looks at the queue and the running process.
    """

    def __init__(self, workspace: Workspace, poll_s: float = 0.25) -> None:
        self.workspace, self.poll_s = workspace, poll_s
        self.store = JobStore(workspace.root / "jobs" / "jobs.sqlite")
        self.process: Optional[subprocess.Popen] = None
        self.adopted: Optional[dict] = None  # a running job started by an earlier server
        self.wake = threading.Event()
        self.closing = False
        self._recover()
        self.thread = threading.Thread(target=self._run, name="tunesmith-jobs", daemon=True)
        self.thread.start()

    def log_path(self, job_id: int) -> Path:
        return self.workspace.root / "jobs" / f"{job_id}.log"

    # --- what the API calls ------------------------------------------------------------------------

    def submit(self, kind: str, title: str, args: list[str], output: str, run_dir: Optional[str] = None,
               resume_args: Optional[list[str]] = None) -> int:
        job_id = self.store.add(kind, title, args, output, run_dir, resume_args)
        self.wake.set()
        return job_id

    def stop(self, job_id: int) -> dict:
        """Cancel a queued job, or interrupt a running one (SIGINT: the command stops cleanly)."""
        job = self.store.get(job_id)
        if job["status"] == "queued":
            self.store.update(job_id, status="cancelled", finished=time.time())
        elif job["status"] == "running" and job["pid"]:
            self.store.update(job_id, stop_requested=1)
            try:
                os.killpg(job["pid"], signal.SIGINT)
            except ProcessLookupError:
                pass
        else:
            raise Conflict(f"job {job_id} is {job['status']}; only a queued or running job can be stopped")
        return self.store.get(job_id)

    def resume(self, job_id: int) -> dict:
        """Queue a stopped, interrupted or failed job again, with its resume command."""
        job = self.store.get(job_id)
        if not job["resumable"]:
            raise Conflict(f"job {job_id} ({job['kind']}, {job['status']}) cannot be resumed; only a stopped, "
                           "interrupted or failed training or sweep can")
        self.store.update(job_id, status="queued", args=json.dumps(job["resume_args"]), pid=None, returncode=None,
                          stop_requested=0, finished=None)
        self.wake.set()
        return self.store.get(job_id)

    def close(self) -> None:
        """Stop the worker thread; running jobs go on in their own process."""
        self.closing = True
        self.wake.set()
        self.thread.join(timeout=5)

    # --- the worker ----------------------------------------------------------------------------

    def _recover(self) -> None:
        for job in self.store.with_status("running"):
            if job["pid"] and _is_our_process(job["pid"]):
                self.adopted = job
            else:
                self.store.update(job["id"], status="interrupted", finished=time.time())

    def _run(self) -> None:
        while not self.closing:
            self._follow()
            if self.process is None and self.adopted is None:
                queued = self.store.with_status("queued")
                if queued:
                    self._start(queued[0])
            self.wake.wait(self.poll_s)
            self.wake.clear()

    def _start(self, job: dict) -> None:
        import tunesmith

        source = str(Path(tunesmith.__file__).resolve().parents[1])  # run the same tunesmith as the server
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")])),
               "PYTHONUNBUFFERED": "1"}
        log = self.log_path(job["id"]).open("a")
        log.write(f"$ tunesmith {' '.join(job['args'])}\n")
        log.flush()
        try:
            self.process = subprocess.Popen([sys.executable, "-m", "tunesmith", *job["args"]], cwd=self.workspace.root,
                                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=env, start_new_session=True)
        finally:
            log.close()
        self.store.update(job["id"], status="running", pid=self.process.pid, started=time.time())
        self.running_id = job["id"]

    def _follow(self) -> None:
        if self.process is not None:
            returncode = self.process.poll()
            if returncode is None:
                return
            job = self.store.get(self.running_id)
            status = "done" if returncode == 0 else "stopped" if job["stop_requested"] else "failed"
            self.store.update(job["id"], status=status, returncode=returncode, finished=time.time())
            self.process = None
        elif self.adopted is not None and not _is_our_process(self.adopted["pid"]):
            job = self.adopted
            finished = job["output"] and (self.workspace.root / job["output"]).exists()
            stopped = self.store.get(job["id"])["stop_requested"]
            status = "done" if finished else "stopped" if stopped else "interrupted"
            self.store.update(job["id"], status=status, finished=time.time())
            self.adopted = None


def _is_our_process(pid: int) -> bool:
    """Whether ``pid`` is alive and is a tunesmith command (not a process that reused the number)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
        status = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True  # no /proc (macOS): trust that it is alive
    return b"tunesmith" in command and status != "Z"

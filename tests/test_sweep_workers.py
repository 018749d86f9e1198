"""Sweeps across processes and machines: workers share one Optuna study through a database.

Several worker processes (``--workers``) or several commands (one per machine, the same ``--storage``) run
trials of one study; none is run twice, and the trial of a worker killed mid-trial is marked failed and run
again by another (Optuna's heartbeat and ``RetryFailedTrialCallback``). The storage is SQLite on one machine
and PostgreSQL (Debian's server, started here on loopback) for several.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY_DATA

pytestmark = pytest.mark.slow


def write_files(tmp_path: Path, model: str) -> tuple[Path, Path]:
    recipe = {"model": {"name": model},
              "data": {"train": str(TINY_DATA), "validation_fraction": 0.05, "max_length": 64, "template": "simple"},
              "method": {"kind": "lora", "r": 4, "alpha": 8}, "eval": {"every_steps": 2},
              "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-3, "log_every": 2},
              "output": {"dir": str(tmp_path / "run")}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({"train.lr": {"low": 1e-4, "high": 3e-2, "log": True}}))
    return tmp_path / "recipe.yaml", tmp_path / "space.yaml"


def sweep_command(tmp_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tunesmith", "sweep", str(tmp_path / "recipe.yaml"), "--space",
            str(tmp_path / "space.yaml"), "--out", str(tmp_path / "sweep"), "--no-pruning", *extra]


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO / "src")}


def study_trials(storage: str):
    import optuna

    return optuna.load_study(study_name="tunesmith", storage=storage).trials


def test_two_workers_share_one_study_without_running_a_trial_twice(tiny_llama, tmp_path):
    write_files(tmp_path, tiny_llama)
    done = subprocess.run(sweep_command(tmp_path, "--trials", "4", "--workers", "2"), env=environment(),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = study_trials(f"sqlite:///{tmp_path / 'sweep' / 'study.db'}")
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    assert len({t.params["train.lr"] for t in trials}) == 4  # four different trials, none run twice
    assert "worker 1: trial" in done.stdout  # the second process ran trials too
    for trial in trials:
        assert (Path(trial.user_attrs["run_dir"]) / "summary.json").is_file()


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def postgres():
    """A PostgreSQL server on 127.0.0.1 (Debian's ``postgresql``, as its ``postgres`` user), one database.

    Its folder is a fresh one under the system's temporary folder: pytest's own are private to the user
    running the tests, and the server runs as ``postgres``."""
    binaries = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    if not binaries:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run installs it)")
    pytest.importorskip("psycopg2", reason="the PostgreSQL driver psycopg2-binary (the dev extra) is not installed")
    bin_dir, folder, port = binaries[-1], Path(tempfile.mkdtemp(prefix="tunesmith-postgres-")), free_port()
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(folder, "postgres")
    data = folder / "data"
    subprocess.run([*as_postgres, str(bin_dir / "initdb"), "-D", str(data), "--auth=trust", "-U", "postgres"],
                   check=True, capture_output=True, timeout=120)
    subprocess.run([*as_postgres, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w", "-o",
                    f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True,
                   timeout=120)
    try:
        subprocess.run([*as_postgres, str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                        "sweeps"], check=True, capture_output=True, timeout=60)
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/sweeps"
    finally:
        subprocess.run([*as_postgres, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


def test_a_killed_worker_loses_no_trial_on_a_shared_postgresql_study(tiny_llama, tmp_path, postgres):
    """Two commands share the study (as on two machines); one is killed mid-trial; the other finishes the study
    and runs the killed worker's trial again."""
    write_files(tmp_path, tiny_llama)
    shared = ("--trials", "4", "--storage", postgres, "--heartbeat", "1")
    doomed = subprocess.Popen(sweep_command(tmp_path, *shared), env=environment(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_for(lambda: any(t.state.name == "RUNNING" for t in study_trials(postgres)) if _study_exists(postgres)
             else False, 300, "the first worker to start a trial")
    os.killpg(doomed.pid, signal.SIGKILL)  # the worker dies mid-trial: no clean-up, its trial stays RUNNING
    doomed.wait(timeout=60)
    killed = next(t.number for t in study_trials(postgres) if t.state.name == "RUNNING")
    survivor = subprocess.run(sweep_command(tmp_path, *shared), env=environment(), capture_output=True, text=True,
                              timeout=900)
    assert survivor.returncode == 0, survivor.stderr[-3000:]
    trials = study_trials(postgres)
    states = {t.number: t.state.name for t in trials}
    assert states[killed] == "FAIL"  # marked failed by the survivor once its heartbeat went stale
    from optuna.storages import RetryFailedTrialCallback

    retry = next(t for t in trials if RetryFailedTrialCallback.retried_trial_number(t) == killed)
    assert retry.state.name == "COMPLETE" and retry.params == next(t for t in trials if t.number == killed).params
    assert sum(state in ("COMPLETE", "PRUNED") for state in states.values()) == 4  # none lost, none extra
    table = (tmp_path / "sweep" / "trials.md").read_text()
    assert f"its worker stopped; run again as trial {retry.number}" in table


def _study_exists(storage: str) -> bool:
    import optuna

    try:
        optuna.load_study(study_name="tunesmith", storage=storage)
        return True
    except KeyError:
        return False

"""Shared fixtures: the offline assets folder and tiny real models.

Tests that need ``../shared/assets`` find it through one setting, ``TUNESMITH_TEST_ASSETS``
(default: ``../shared/assets`` beside the repository), and skip with a reason where it is missing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("TUNESMITH_TEST_ASSETS", REPO.parent / "shared" / "assets"))


def asset(relative: str) -> Path:
    """Path of a file in the assets folder; skips the test when it is missing."""
    path = ASSETS / relative
    if not path.exists():
        pytest.skip(f"test asset {path} is missing (set TUNESMITH_TEST_ASSETS to the shared assets folder)")
    return path


@pytest.fixture
def stories260k() -> str:
    """The tiny real Llama model (292,800 parameters) trained on TinyStories."""
    return str(asset("models/stories260k"))


@pytest.fixture
def alpaca_demo() -> str:
    """999 alpaca-format instruction records."""
    return str(asset("data/llama_factory/alpaca_en_demo.json"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep tunesmith's cache out of the user's home, except the converted SmolLM2 (slow to make)."""
    monkeypatch.setenv("TUNESMITH_CACHE", os.environ.get("TUNESMITH_TEST_CACHE", str(REPO / ".cache" / "tests")))


class StopAt:
    """A training hook that simulates Ctrl-C after a given step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_start(self, total_steps: int, start_step: int) -> None: ...

    def on_step(self, record: dict) -> None:
        if record["step"] == self.step:
            raise KeyboardInterrupt

    def on_log(self, record: dict) -> None: ...

    def on_train_end(self) -> None: ...


class StartedAt:
    """A training hook recording the step training started at: 0 for a new run, the checkpoint's step
    for a resume. A resume that silently restarted from step 0 would give the same losses and weights
    (training is deterministic), so exact-resume tests assert this too."""

    step = None

    def on_train_start(self, total_steps: int, start_step: int) -> None:
        self.step = start_step

    def on_step(self, record: dict) -> None: ...

    def on_log(self, record: dict) -> None: ...

    def on_train_end(self) -> None: ...


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 600,
            input: str | None = None):
    """Run ``python -m tunesmith ARGS`` with this checkout's sources; returns the CompletedProcess."""
    import subprocess
    import sys

    full_env = {**os.environ, "PYTHONPATH": str(REPO / "src"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "tunesmith", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout, input=input)


@pytest.fixture
def tiny_recipe(stories260k, alpaca_demo, tmp_path):
    """Factory of a fast recipe on stories260k and the alpaca demo data; overrides as dotted keys."""
    from tunesmith.config import apply_override, validate_recipe

    def make(*overrides: str, output: str = "run"):
        raw = {
            "model": {"name": stories260k},
            "data": {"train": alpaca_demo, "max_length": 96, "template": "simple"},
            "method": {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            # float32: the golden losses and the exact-equality tests (accumulation, DDP, resume) were
            # taken in float32; train.speed.autocast defaults to bfloat16 where the CPU computes it.
            "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-3, "log_every": 1, "seed": 0,
                      "speed": {"autocast": "off"}},
            "output": {"dir": str(tmp_path / output)},
        }
        for override in overrides:
            apply_override(raw, override)
        return validate_recipe(raw)

    return make

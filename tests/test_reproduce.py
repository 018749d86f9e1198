"""``tunesmith reproduce``: a run trained again from its folder alone is bit-identical on the same machine.

Every random choice (LoRA's initialisation, dropout, the data order) is drawn after the seed is set, so two
runs of one recipe give identical adapters; a changed data file is refused, since the run would not be the same.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import TINY_DATA, run_cli

pytestmark = pytest.mark.slow


def write_recipe(folder: Path, model: str) -> Path:
    shutil.copy(TINY_DATA, folder / "data.json")
    recipe = {
        "model": {"name": model},
        "data": {"train": "data.json", "max_length": 96, "template": "simple"},  # relative: the run's folder counts
        "method": {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.1},  # dropout: a random draw in every step
        "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "log_every": 1, "seed": 7},
        "output": {"dir": "run"},
    }
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return folder / "recipe.yaml"


def test_reproduce_gives_a_bit_identical_adapter_and_the_same_loss_curve(tiny_llama, tmp_path):
    recipe = write_recipe(tmp_path, tiny_llama)
    assert run_cli("train", str(recipe), "--no-progress", cwd=tmp_path).returncode == 0
    provenance = json.loads((tmp_path / "run" / "provenance.json").read_text())
    assert provenance["seed"] == 7 and provenance["data"][0]["path"] == "data.json"
    assert provenance["packages"]["torch"] and provenance["threads"] >= 1
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()  # reproduce reads the run's folder alone, from any working folder
    done = run_cli("reproduce", str(tmp_path / "run"), "--out", str(tmp_path / "again"), "--no-progress", cwd=elsewhere)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "bit-identical: every one of the" in done.stdout
    report = json.loads((tmp_path / "again" / "reproduce.json").read_text())
    assert report["bit_identical"] is True and report["max_weight_difference"] == 0.0 and report["tensors"] > 0
    assert report["max_loss_difference"] == 0.0 and len(report["loss_curve"]) == 3
    assert report["changed"] == {}


def test_reproduce_refuses_changed_data_and_an_existing_out(tiny_llama, tmp_path, cli):
    """The refusals run in this process (``cli``): their subject is the sentence and the exit status; the test
    above keeps the real processes (a run trained by one process, reproduced bit-identically by another)."""
    recipe = write_recipe(tmp_path, tiny_llama)
    assert cli("train", str(recipe), "--no-progress", cwd=tmp_path).returncode == 0
    (tmp_path / "occupied").mkdir()
    done = cli("reproduce", str(tmp_path / "run"), "--out", str(tmp_path / "occupied"))
    assert done.returncode == 2 and "already exists; choose another --out" in done.stderr
    rows = json.loads((tmp_path / "data.json").read_text())
    (tmp_path / "data.json").write_text(json.dumps(rows[1:]))
    done = cli("reproduce", str(tmp_path / "run"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"data file {tmp_path / 'data.json'} changed since the run" in done.stderr
    assert not (tmp_path / "run-reproduced").exists()
    done = cli("reproduce", str(tmp_path))
    assert done.returncode == 2 and "is not a finished tunesmith run" in done.stderr

"""``tunesmith sweep``: trials are normal runs, the study resumes, the best recipe is written, bad spaces say why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tunesmith.core.errors import TunesmithError

from conftest import REPO


def _files(tiny_llama: str, tmp_path: Path, space: dict) -> tuple[Path, Path]:
    recipe = {"model": {"name": tiny_llama},
              "data": {"train": str(REPO / "examples/data/tiny/train.jsonl"),
                       "validation": str(REPO / "examples/data/tiny/validation.jsonl"), "max_length": 64,
                       "template": "simple"},
              "method": {"kind": "lora", "r": 4, "alpha": 8}, "eval": {"every_steps": 2},
              "train": {"max_steps": 4, "batch_size": 8, "lr": 1e-3, "log_every": 2},
              "output": {"dir": str(tmp_path / "run")}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    return tmp_path / "recipe.yaml", tmp_path / "space.yaml"


@pytest.mark.slow
def test_sweep_runs_normal_trials_resumes_and_writes_the_best_recipe(tiny_llama: str, tmp_path: Path) -> None:
    from tunesmith.config import load_recipe
    from tunesmith.workflows.sweep import run_sweep

    recipe, space = _files(tiny_llama, tmp_path, {"train.lr": {"low": 1e-4, "high": 3e-2, "log": True},
                                                   "method.kind": {"choices": ["lora", "ia3"]},
                                                   "method.r": {"choices": [2, 4]}})
    quiet = lambda *a, **k: None  # noqa: E731
    said: list[str] = []
    first = run_sweep(recipe, space, trials=3, out=tmp_path / "sweep", say=said.append)
    assert [r["number"] for r in first.rows] == [0, 1, 2]
    trial_zero = [line for line in said if line.startswith("trial 0")]  # a trial is never silent (issue 22)
    assert "train.lr=0.001" in trial_zero[0] and "step" not in trial_zero[0]  # its parameters first
    assert any(line.startswith("trial 0: step 2/4, loss ") for line in trial_zero)
    assert any(line.startswith("trial 0: step 4/4") and "val_loss" in line for line in trial_zero)
    assert first.rows[0]["params"] == {"train.lr": 1e-3, "method.kind": "lora", "method.r": 4}  # the recipe's own
    again = run_sweep(recipe, space, trials=4, out=tmp_path / "sweep", say=quiet)  # resumes: one more trial
    assert [r["number"] for r in again.rows] == [0, 1, 2, 3]
    for row in again.rows:
        run = Path(row["run_dir"])  # every trial's folder is kept, a pruned one too (it stopped as early stopping does)
        assert (run / "config.yaml").is_file() and (run / "metrics.jsonl").is_file()
        assert (run / "summary.json").is_file() and (run / "adapter").is_dir()
        if row["state"] == "pruned":
            assert json.loads((run / "summary.json").read_text())["stopped_early"] is True
    best = load_recipe(again.best_recipe)
    assert best.train.lr == pytest.approx(again.best["params"]["train.lr"])
    assert best.method.kind == again.best["params"]["method.kind"]
    assert again.best["value"] == min(r["value"] for r in again.rows if r["state"] == "complete")
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 1000
    assert "| trial | state | val_loss |" in (tmp_path / "sweep" / "trials.md").read_text()


@pytest.mark.parametrize("space,message", [
    ({"train.lrr": {"low": 1e-4, "high": 1e-3}}, "'train.lrr' is not a recipe field. Did you mean 'train.lr'"),
    ({"trian.lr": {"low": 1e-4, "high": 1e-3}}, "Did you mean 'train'"),
    ({"method.rank": {"choices": [4, 8]}}, "'method.rank' is not a recipe field. Did you mean 'method.r'?"),
    ({"method.kind": {"choices": ["lora", "ia3"]}, "method.alhpa": {"choices": [8]}}, "Did you mean 'alpha'"),
    ({"train.speed": {"choices": [1]}}, "is a section, not a field"),
    ({"train.lr": {"low": 1e-3, "high": 1e-4}}, "needs low < high"),
    ({"train.batch_size": {"choices": [0, 4]}}, "train.batch_size=0"),
])
def test_a_bad_search_space_names_the_field_and_the_fix(tiny_llama: str, tmp_path: Path, space, message) -> None:
    from tunesmith.workflows.sweep import run_sweep

    recipe, space_file = _files(tiny_llama, tmp_path, space)
    with pytest.raises(TunesmithError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        run_sweep(recipe, space_file, trials=1, out=tmp_path / "sweep", say=lambda *a: None)
    assert not (tmp_path / "sweep" / "study.db").exists()

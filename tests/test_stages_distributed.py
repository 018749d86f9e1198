"""Stages dpo (LoRA, the reference = adapter off) and cls (LoRA + label head, packed) in two torchrun processes
(gloo on the CPU) train like one process at the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from test_stages_cls import sentiment_files
from test_stages_text import recipe

from conftest import REPO, TINY_PAIRS

LORA = {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0}


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
@pytest.mark.parametrize("stage", ["dpo", "cls"])
def test_two_processes_equal_one(tiny_llama, tmp_path, stage):
    """Losses and validation metrics of 2 processes x batch 2 equal 1 process x batch 4 within rel 1e-5 (float32:
    only the order of the gradient all-reduce's sums differs; metrics near 0 such as the margin within abs 1e-5);
    cls's zero-shot baseline is the same number."""
    from tunesmith.pipeline.finetune import finetune

    if stage == "dpo":
        data = {"train": str(TINY_PAIRS), "max_length": 192, "template": "simple",
                "validation_fraction": 0.05}
        extra = ()
    else:
        data = sentiment_files(tmp_path, 120, 24)
        extra = ("train.lr=3e-3",)
    section = {"kind": "cls", "label_words": ["sad", "happy"]} if stage == "cls" else stage
    common = ("train.max_steps=4", "eval.every_steps=2", 'train.speed.autocast="off"', *extra)
    single = finetune(recipe(tiny_llama, tmp_path, section, data, *common, "train.batch_size=4", output="single",
                             method=LORA), progress=False)
    raw = recipe(tiny_llama, tmp_path, section, data, *common, "train.batch_size=2", output="ddp",
                 method=LORA).model_dump(mode="json")
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "tunesmith", "train", str(tmp_path / "ddp.yaml"), "--no-progress"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert ddp["world_size"] == 2 and ddp["steps"] == single["steps"] == 4
    train = [[r["loss"] for r in records(tmp_path / run) if "loss" in r] for run in ("single", "ddp")]
    assert train[1] == pytest.approx(train[0], rel=1e-5)
    validation = [[r for r in records(tmp_path / run) if "val_loss" in r] for run in ("single", "ddp")]
    assert len(validation[0]) == len(validation[1]) == 2
    for one, two in zip(*validation):  # margins are differences of near-equal log-probabilities: abs 1e-5 there
        assert two == pytest.approx(one, rel=1e-5, abs=1e-5)
    if stage == "cls":
        assert ddp["validation"]["zero_shot_accuracy"] == single["validation"]["zero_shot_accuracy"]

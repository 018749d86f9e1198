"""Several processes through torchrun (gloo on the CPU) train exactly like one process."""

import json
import shutil
import sys

import pytest
import yaml

from conftest import REPO


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_two_processes_equal_one_at_the_same_global_batch(tiny_recipe, tmp_path):
    import os
    import subprocess

    from tunesmith.pipeline.finetune import finetune

    finetune(tiny_recipe("train.batch_size=8", output="single"), progress=False)
    recipe = tiny_recipe("train.batch_size=4", output="ddp").model_dump(mode="json")
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "tunesmith", "train", str(path), "--no-progress"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "single"), rel=1e-5)

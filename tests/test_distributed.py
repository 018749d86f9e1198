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


PLAN_CHECK_IN_EACH_RANK = """
import json, os, sys
from pathlib import Path

import tunesmith.core.runtime as runtime
from tunesmith.cli.train import plan_check
from tunesmith.config import load_recipe
from tunesmith.core.errors import TunesmithError

rank, outcomes = int(os.environ["RANK"]), []
for memory in json.loads(sys.argv[2]):  # one case: the bytes each rank reads as available
    runtime.available_memory_bytes = lambda device, bytes=memory[rank]: bytes
    try:
        recipe = plan_check(load_recipe(sys.argv[1], []), skip=False)
        outcomes.append(["trains", recipe.train.speed.activation_checkpointing])
    except TunesmithError as refusal:
        outcomes.append(["refuses", str(refusal)])
Path(f"outcomes-{rank}.json").write_text(json.dumps(outcomes))
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_plan_check_under_torchrun_decides_alike_in_every_rank_whatever_memory_each_reads(tiny_recipe, tmp_path):
    """Ranks that read different free memory (another job starting between their reads) still train the same
    recipe (``auto`` resolved alike) or refuse with the same sentence: the least share of any rank counts. Each
    rank checking on its own memory split them (rank 0 trained while rank 1 refused)."""
    import os
    import subprocess

    recipe = tiny_recipe("train.speed.activation_checkpointing=auto").model_dump(mode="json")
    (tmp_path / "auto.yaml").write_text(yaml.safe_dump(recipe))
    (tmp_path / "check.py").write_text(PLAN_CHECK_IN_EACH_RANK)
    cases = [[100 * 2**30, 60 * 2**30], [100 * 2**30, 2**20]]  # both ample; rank 1 almost none
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(tmp_path / "check.py"), str(tmp_path / "auto.yaml"), json.dumps(cases)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = [json.loads((tmp_path / f"outcomes-{rank}.json").read_text()) for rank in (0, 1)]
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0] == ["trains", False]
    assert outcomes[0][1][0] == "refuses" and "0.0 GB are available" in outcomes[0][1][1]

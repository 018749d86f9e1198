"""train.distributed: fsdp through torchrun (gloo on the CPU): equal to one process, resumes at other world sizes.

Every run trains the tests' tiny Llama (built here) on tests/data/instructions.json in float32 (full fine-tuning in
float64, see its test) with the same global batch of 4
examples, so 2 processes × 2, 1 × 4 and 4 × 1 see the same examples in every step. Two torchrun
agents started side by side form a two-"node" job over loopback with a c10d rendezvous.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, TINY_DATA, build_tiny_llama

GLOBAL_BATCH = 4


def write_recipe(folder: Path, method: dict, model: str | None = None, data: str | None = None,
                 dtype: str = "float32") -> Path:
    recipe = {
        "model": {"name": model or str(build_tiny_llama(folder / "tiny_llama")), "dtype": dtype},
        "data": {"train": data or str(TINY_DATA), "max_length": 96, "template": "simple"},
        "method": method,
        "train": {"max_steps": 4, "batch_size": GLOBAL_BATCH, "lr": 1e-3, "log_every": 1, "seed": 0, "device": "cpu",
                  "schedule": "constant", "checkpoint_every": 2, "keep_checkpoints": 2, "distributed": "fsdp",
                  "speed": {"autocast": "off"}},
        "output": {"dir": str(folder / "run")},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def train(recipe: Path, out: Path, processes: int, *extra: str) -> None:
    """``tunesmith train`` in ``processes`` processes (torchrun when more than one), batch split between them."""
    command = ["-m", "tunesmith", "train", str(recipe), f"output.dir={out}",
               f"train.batch_size={GLOBAL_BATCH // processes}", *extra, "--no-progress"]
    if processes > 1:
        command = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] + command
    run([sys.executable, *command])


def run(command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    """The same LoRA run by 2 processes under FSDP and by 1 process."""
    root = tmp_path_factory.mktemp("fsdp_lora")
    recipe = write_recipe(root, {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0})
    train(recipe, root / "two", 2)
    train(recipe, root / "one", 1)
    return recipe, root


@pytest.mark.slow
def test_fsdp_lora_on_two_processes_equals_one_process(lora_runs):
    recipe, root = lora_runs
    assert losses(root / "two") == pytest.approx(losses(root / "one"), rel=1e-5)
    # The result is an ordinary peft adapter, gathered from the shards.
    two, one = (load_file(root / name / "adapter" / "adapter_model.safetensors") for name in ("two", "one"))
    assert set(two) == set(one) and len(two) > 0
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5)
    assert json.loads((root / "two" / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert sorted(p.name for p in (root / "two" / "checkpoints" / "step-00000004").iterdir()) == \
        ["manifest.json", "rng-0.pt", "rng-1.pt", "shards", "state.json", "training.pt"]


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2, 4])
def test_sharded_checkpoint_of_two_processes_resumes_on_1_2_and_4(lora_runs, tmp_path, processes):
    recipe, root = lora_runs
    out = tmp_path / "resumed"
    shutil.copytree(root / "two", out)
    shutil.rmtree(out / "checkpoints" / "step-00000004")  # continue from step 2
    shutil.rmtree(out / "adapter")
    (out / "summary.json").unlink()
    train(recipe, out, processes, "--resume")
    uninterrupted, resumed = losses(root / "two"), losses(out)
    assert len(resumed) == 4
    if processes == 2:
        assert resumed == uninterrupted  # the same processes: exactly the same run
    else:
        assert resumed == pytest.approx(uninterrupted, rel=1e-5)  # resharded; only the summation order differs


@pytest.mark.slow
def test_fsdp_full_fine_tuning_equals_one_process_and_saves_a_plain_model(tmp_path):
    """In float64. In float32 the two summation orders' rounding (1e-7 of a gradient) is amplified by Adam where a
    gradient is near zero: g / (sqrt(v) + eps) with |g| ~ eps turns it into a visibly different update (one of the
    tiny Llama's 32,768 embedding weights moved 2.9e-5 apart). In float64 the same run differs by at most 4.3e-7
    (LlamaRMSNorm still normalises in float32), so the comparison tests the sharded algorithm, not the rounding.
    The float32 sharding itself is compared in the LoRA tests above."""
    from transformers import AutoModelForCausalLM

    model = build_tiny_llama(tmp_path / "tiny_llama_float64")
    AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).to(torch.float64).save_pretrained(model)
    recipe = write_recipe(tmp_path, {"kind": "full"}, str(model), dtype="auto")  # auto: the checkpoint's float64
    train(recipe, tmp_path / "two", 2, "train.checkpoint_every=null")
    train(recipe, tmp_path / "one", 1, "train.checkpoint_every=null")
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    two = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "model", dtype="auto").state_dict()
    one = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "model", dtype="auto").state_dict()
    assert {tensor.dtype for tensor in one.values()} == {torch.float64}
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_torchrun_agents_as_two_nodes_over_loopback(lora_runs, tmp_path):
    """``torchrun --nnodes 2`` with a c10d rendezvous, one agent per "node", both on this machine."""
    recipe, root = lora_runs
    out = tmp_path / "nodes"
    endpoint = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", "--rdzv_id=tunesmith-test",
               "-m", "tunesmith", "train", str(recipe), f"output.dir={out}", f"train.batch_size={GLOBAL_BATCH // 2}",
               "train.checkpoint_every=null", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    agents = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    results = [agent.communicate(timeout=900) for agent in agents]
    assert all(agent.returncode == 0 for agent in agents), "\n".join(err[-3000:] for _, err in results)
    assert losses(out) == pytest.approx(losses(root / "two"), rel=1e-5)
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2


def test_fsdp_refuses_what_it_cannot_do_yet_naming_the_field(tiny_recipe):
    from tunesmith.config.forgetting import RegulariseSection
    from tunesmith.config.methods import AdapterMethod
    from tunesmith.config.recipe import EvalSection, GenerationTaskSection
    from tunesmith.core.errors import TunesmithError
    from tunesmith.training.sharding import check_sharded_recipe

    sharded = tiny_recipe("train.distributed=fsdp")
    check_sharded_recipe(sharded)  # LoRA: fine
    check_sharded_recipe(tiny_recipe().model_copy(update={"method": AdapterMethod()}))  # ddp: anything goes
    refused = {"method.kind": {"method": AdapterMethod()},
               "regularise.ewc": {"regularise": RegulariseSection(l2sp=0.1)},
               "eval.task": {"eval": EvalSection(task=GenerationTaskSection(file="x.jsonl"))}}
    for field, update in refused.items():
        with pytest.raises(TunesmithError, match=field.replace(".", r"\.")):
            check_sharded_recipe(sharded.model_copy(update=update))

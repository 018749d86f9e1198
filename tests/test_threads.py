"""The thread policy: idle OpenMP threads spin briefly, then sleep; set by the CLI before torch loads, users' choice kept.

Its effect on speed is measured by ``benchmarks/busy.py`` (never a timed test).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from tunesmith.core.runtime import SPIN_COUNT, bfloat16_support, cpu_description, thread_environment

from conftest import REPO

PROBE = """
import json, os, sys
import tunesmith.cli
torch_before = "torch" in sys.modules
try:
    tunesmith.cli.main(["methods"])
except SystemExit:
    pass
print(json.dumps({"torch_before_main": torch_before, "policy": os.environ.get("OMP_WAIT_POLICY"),
                  "spin": os.environ.get("GOMP_SPINCOUNT")}))
"""


def run_probe(**env: str) -> dict:
    clean = {k: v for k, v in __import__("os").environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                                                                            "KMP_BLOCKTIME")}
    done = subprocess.run([sys.executable, "-c", PROBE], env={**clean, "PYTHONPATH": str(REPO / "src"), **env},
                          capture_output=True, text=True, timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_idle_threads_spin_briefly_unless_the_user_chose_a_policy() -> None:
    assert thread_environment({}) == {"GOMP_SPINCOUNT": str(SPIN_COUNT)}
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME"):
        assert thread_environment({name: "1"}) == {}


def test_cli_sets_the_policy_before_torch_loads() -> None:
    probe = run_probe()
    assert probe["torch_before_main"] is False  # importing the CLI does not load torch (nor its OpenMP)
    assert probe["policy"] is None and probe["spin"] == str(SPIN_COUNT)
    kept = run_probe(GOMP_SPINCOUNT="300000")
    assert kept["policy"] is None and kept["spin"] == "300000"


def test_cpu_description_names_the_machine_the_figures_were_taken_on():
    """Benchmarks print it beside their figures: the CPU model, its cores, torch's kernels and native bfloat16."""
    description = cpu_description()
    assert f"{os.cpu_count()} cores" in description
    assert f"torch kernels {torch.backends.cpu.get_cpu_capability()}" in description
    assert description.endswith(bfloat16_support(torch.device("cpu")) or "no native bfloat16")
    if os.path.exists("/proc/cpuinfo"):
        model = next(line for line in open("/proc/cpuinfo") if line.startswith("model name")).split(":", 1)[1]
        assert description.startswith(model.strip())

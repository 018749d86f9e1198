"""What a command imports before it starts: no library the command does not use (benchmarks/RESULTS.md, session 12).

peft imports bitsandbytes whenever it is installed: 1-6 s of every LoRA command's start here, and on a CPU with
AVX-512 BF16 a request to the hub for a kernel. A command that quantises nothing keeps it out; a command on a bare
model does not import peft at all. Each command runs in its own process, as a user's does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

WATCHED = ("bitsandbytes", "peft")
# Runs the command as ``python -m tunesmith`` does, then prints which of WATCHED it imported.
PROBE = ("import json, sys; from tunesmith.cli import main; code = main(sys.argv[1:]); "
         f"print(json.dumps(sorted(name for name in {WATCHED!r} if sys.modules.get(name) is not None))); "
         "sys.exit(code)")


def imported_by(*args: str, cwd) -> list[str]:
    """Which of WATCHED ``tunesmith ARGS`` imported (its last line of output)."""
    done = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_plain_lora_run_and_its_adapter_s_generation_never_import_bitsandbytes(tiny_llama, tiny_data, tmp_path):
    pytest.importorskip("bitsandbytes")  # what is not installed cannot be imported either way
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({  # JSON is YAML
        "model": {"name": tiny_llama},
        "data": {"train": tiny_data, "max_length": 64, "template": "simple"},
        "method": {"kind": "lora", "r": 4, "alpha": 8},
        "train": {"max_steps": 1, "batch_size": 2, "speed": {"autocast": "off"}},
        "output": {"dir": str(tmp_path / "run")},
    }))
    assert imported_by("train", str(recipe), "--no-progress", cwd=tmp_path) == ["peft"]  # LoRA is peft's
    assert imported_by("generate", "--model", tiny_llama, "--adapter", str(tmp_path / "run" / "adapter"),
                       "--max-new-tokens", "2", "--prompt", "hi", cwd=tmp_path) == ["peft"]


def test_generation_on_a_bare_model_imports_neither_peft_nor_bitsandbytes(tiny_llama, tmp_path):
    assert imported_by("generate", "--model", tiny_llama, "--max-new-tokens", "2", "--prompt", "hi",
                       cwd=tmp_path) == []

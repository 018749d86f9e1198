"""Checking a GGUF file with llama.cpp itself, through the npm package ``node-llama-cpp``.

PyPI has no binary wheel of ``llama-cpp-python`` (``pip install`` compiles llama.cpp, which takes
many minutes); npm's ``node-llama-cpp`` ships prebuilt llama.cpp binaries per platform
(``@node-llama-cpp/linux-x64`` and so on), so installing it takes seconds. ``llama_cpp_check.mjs``,
shipped beside this module, loads the file with llama.cpp, evaluates the probe prompts and answers
with the logits at every position, llama.cpp's own tokenisation of the prompts and greedy replies
that stop where llama.cpp sees an end of generation (the file's eos/eot metadata); this module
compares them with the in-memory model as the transformers check does.

The check is optional: without ``node`` on the PATH or ``node-llama-cpp`` in
:func:`tunesmith.core.runtime.node_llama_cpp_dir`, it is skipped with the reason and the install command.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Union

import numpy as np
import torch

from tunesmith.core.errors import TunesmithError
from tunesmith.core.runtime import node_llama_cpp_dir
from tunesmith.export.check import REPLY_TOKENS, CheckResult, Probe, Tolerance, check_probe

SCRIPT = Path(__file__).with_name("llama_cpp_check.mjs")
NODE_LLAMA_CPP_VERSION = "3.22.1"
INSTALL = (f"npm install --prefix ~/.cache/tunesmith/node --omit=optional node-llama-cpp@{NODE_LLAMA_CPP_VERSION} "
           f"@node-llama-cpp/linux-x64@{NODE_LLAMA_CPP_VERSION}, or set TUNESMITH_NODE_LLAMA_CPP to its folder")
TIMEOUT_SECONDS = 900
SKIPPED_EXIT_STATUS = 3  # llama_cpp_check.mjs: llama.cpp itself could not start


def llama_cpp_unavailable() -> Union[str, None]:
    """Why the llama.cpp check cannot run here, or None when it can."""
    if shutil.which("node") is None:
        return f"node is not on the PATH (install Node.js 20 or later, then {INSTALL})"
    modules = node_llama_cpp_dir()
    if not (modules / "node-llama-cpp" / "package.json").is_file():
        return f"node-llama-cpp is not installed in {modules} ({INSTALL})"
    return None


ONE_THREAD_BELOW_BYTES = 64 * 2**20


def check_threads(path: Path) -> int:
    """llama.cpp's threads for the check: one for a small file, else as many as torch uses.

    ggml's CPU threads meet at a spinning barrier after every operation of the graph; for a small
    model each operation is far shorter than that meeting, so more threads only add waiting (the
    0.3 MiB Qwen2 of tests/test_families.py, 3 probe prompts: 20 CPU-s and 152 s with 2 threads,
    1.1 CPU-s and 11 s with one, on the busy 2-core machine).
    """
    return 1 if path.stat().st_size < ONE_THREAD_BELOW_BYTES else torch.get_num_threads()


def run_llama_cpp(path: Path, prompts: list[list[int]], texts: list[str], limits: list[int]) -> tuple[dict, list]:
    """Evaluate ``prompts`` with llama.cpp: its answer (see ``llama_cpp_check.mjs``) and (positions, vocab) logits per prompt.

    Raises:
        TunesmithError: When llama.cpp cannot load or evaluate the file (the export is then not kept).
    """
    with tempfile.TemporaryDirectory(prefix="tunesmith-llama-cpp-") as folder:
        logits_file = Path(folder) / "logits.f32"
        request = {"model": str(path), "prompts": prompts, "texts": texts, "limits": limits,
                   "logits": str(logits_file), "threads": check_threads(path)}
        environment = {**os.environ, "NODE_PATH": str(node_llama_cpp_dir())}
        try:
            done = subprocess.run(["node", str(SCRIPT)], input=json.dumps(request), capture_output=True, text=True,
                                  env=environment, cwd=folder, timeout=TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            raise TunesmithError(f"llama.cpp did not finish evaluating {path.name} within {TIMEOUT_SECONDS} s") from None
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or ["no message"]
            if done.returncode == SKIPPED_EXIT_STATUS:
                return {"skipped": lines[-1]}, []
            # llama.cpp's own log line says why (e.g. "unknown pre-tokenizer type"); the JS stack does not
            reason = next((line.removeprefix("[node-llama-cpp] ").strip() for line in lines
                           if "error" in line.lower() and not line.lstrip().startswith("at ")), lines[-1])
            raise TunesmithError(f"llama.cpp could not load or evaluate {path.name}: {reason}")
        answer = json.loads(done.stdout)
        flat = np.fromfile(logits_file, dtype="<f4").reshape(-1, answer["vocab_size"])
    rows, logits = 0, []
    for ids in prompts:
        logits.append(torch.from_numpy(flat[rows:rows + len(ids)].copy()))
        rows += len(ids)
    return answer, logits


def check_with_llama_cpp(path: Path, probe: Probe, tolerance: Tolerance) -> Union[CheckResult, str]:
    """Compare llama.cpp's logits, tokenisation and greedy replies with ``probe``; a reason string when skipped.

    Raises:
        TunesmithError: When llama.cpp cannot load or evaluate the file.
    """
    reason = llama_cpp_unavailable()
    if reason is not None:
        return reason
    # the same budgets check_probe() asks of every loader: twice the reference's where the reference stopped
    limits = [2 * REPLY_TOKENS if stops else REPLY_TOKENS for stops in probe.stops]
    answer, logits = run_llama_cpp(path, probe.prompts, probe.texts, limits)
    if "skipped" in answer:
        return answer["skipped"]
    by_prompt = {tuple(ids): index for index, ids in enumerate(probe.prompts)}

    def logits_of(ids: list[int]) -> torch.Tensor:
        return logits[by_prompt[tuple(ids)]]

    def reply_of(ids: list[int], stop: int, limit: int) -> list[int]:
        return answer["replies"][by_prompt[tuple(ids)]][:limit]

    result = check_probe(probe, tolerance, logits_of, reply_of, lambda index: answer["tokenized"][index])
    return dataclasses.replace(result, load_seconds=float(answer["load_seconds"]))

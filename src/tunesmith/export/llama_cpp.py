"""Checking a GGUF file with llama.cpp itself, through ``llama-cpp-python`` where it is installed.

The package builds llama.cpp from source on ``pip install llama-cpp-python`` (PyPI has no binary
wheel), which takes minutes; it is an optional extra, and the check is skipped with the reason
when it is missing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
import torch

from tunesmith.export.check import REPLY_TOKENS, CheckResult, Probe, Tolerance, compare


def check_with_llama_cpp(path: Path, probe: Probe, tolerance: Tolerance) -> Union[CheckResult, str]:
    """Compare llama.cpp's logits, tokenisation and greedy replies with ``probe``; a reason string when skipped."""
    try:
        import llama_cpp
    except ImportError:
        return "llama-cpp-python is not installed (pip install llama-cpp-python builds llama.cpp from source)"
    longest = max(len(ids) for ids in probe.prompts) + 2 * REPLY_TOKENS + 8
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=longest, logits_all=True, verbose=False,
                          n_threads=max(1, min(4, os.cpu_count() or 1)), seed=0)

    def logits_of(ids: list[int]) -> torch.Tensor:
        llm.reset()
        llm.eval(ids)
        return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))

    def reply_of(ids: list[int], stop: int, limit: int) -> list[int]:
        reply: list[int] = []
        for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
            reply.append(int(token))
            if token == stop or len(reply) >= limit:
                break
        return reply

    def tokenize(index: int) -> list[int]:
        return llm.tokenize(probe.texts[index].encode("utf-8"), add_bos=False, special=True)

    try:
        return compare(probe, tolerance, logits_of, reply_of, tokenize)
    finally:
        llm.close() if hasattr(llm, "close") else None

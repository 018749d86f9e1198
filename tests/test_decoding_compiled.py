"""The compiled single-row decode step (inference.compiled) against ``model.generate`` and the lean step.

Compiling a tiny model's step takes seconds to a minute on a busy machine (inductor writes C++ and
builds it), so the tests that compile share one model (one compiled step per model) and are slow.
The fallback test never compiles.
"""

from __future__ import annotations

import pytest
import torch

from test_decoding import prompts, random_model
from tunesmith.inference.compiled import ATTRIBUTE, CompiledStep
from tunesmith.inference.decoding import decode


def greedy_reference(model, prompt: list[int], new: int) -> list[int]:
    output = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    return output[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def llama():
    return random_model("llama")


@pytest.mark.slow
def test_compiled_greedy_equals_generate_and_sampling_is_seeded(llama):
    prompt = prompts(1, seed=4)[0]
    assert decode(llama, [prompt], 20, compile=True) == [greedy_reference(llama, prompt, 20)]
    step = getattr(llama, ATTRIBUTE)
    assert not step.failed and step.compile_seconds > 0 and step._capacities == {128}

    def sampled(compile: bool) -> list[list[int]]:
        return decode(llama, [prompt], 20, temperature=0.9, top_p=0.95, top_k=20,
                      generator=torch.Generator().manual_seed(7), compile=compile)

    first = sampled(True)
    assert first == sampled(True)  # the same seed draws the same tokens
    assert first == sampled(False)  # and the same ones as the lean step (the logits agree to argmax and beyond)
    # several prompts: the batch decodes them the lean way; the last one left goes on compiled
    asked = prompts(3, seed=5)
    assert decode(llama, asked, 12, max_rows=2, compile=True) == [greedy_reference(llama, p, 12) for p in asked]


def test_a_failed_compile_falls_back_to_the_lean_step_with_one_line(llama, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("inductor could not build the kernel\nmore detail")

    monkeypatch.setattr(CompiledStep, "__init__", _init_with(broken))
    prompt = prompts(1, seed=6)[0]
    model = random_model("llama", seed=1)  # a model of its own: no compiled step cached yet
    assert decode(model, [prompt], 10, compile=True) == [greedy_reference(model, prompt, 10)]
    message = capsys.readouterr().err.strip().splitlines()
    assert message == ["tunesmith: torch.compile of the decode step failed, decoding without it "
                       "(RuntimeError: inductor could not build the kernel)"]


def _init_with(step):
    original = CompiledStep.__init__

    def init(self, lean, mode="default"):
        original(self, lean, mode)
        self._step = step

    return init


@pytest.mark.slow
def test_stream_reply_with_compile_gives_the_reply_without_it(tiny_llama):
    from tunesmith.inference.generate import generate, load_for_inference, stream_reply

    model, tokenizer = load_for_inference(tiny_llama)
    conversation = [{"role": "user", "content": "Lily went to the park."}]
    plain = generate(model, tokenizer, [conversation], max_new_tokens=12)[0]
    assert "".join(stream_reply(model, tokenizer, conversation, max_new_tokens=12, compile=True)).strip() == plain

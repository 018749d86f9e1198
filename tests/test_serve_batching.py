"""Continuous batching (serve/batching.py) and the one decoding path (decoding.py) on tiny random models.

The references are transformers' own ``model.generate`` (greedy) per request, and peft's
``set_adapter`` / ``disable_adapter`` for each adapter alone.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from tunesmith.inference.decoding import decode

VOCAB = 96


def random_llama(seed: int = 0, eos: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                         eos_token_id=eos, bos_token_id=1, pad_token_id=0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


def prompts(count: int, seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (int(length),), generator=generator).tolist()
            for length in torch.randint(1, 24, (count,), generator=generator)]


def reference(model, prompt: list[int], max_new_tokens: int, eos: int | None = None) -> list[int]:
    output = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                            eos_token_id=eos, pad_token_id=0)
    return output[0, len(prompt):].tolist()


def test_decode_greedy_equals_generate_with_rows_joining_mid_flight():
    model = random_llama()
    asked = prompts(5)
    limits = [3, 14, 8, 1, 11]
    expected = [reference(model, p, n) for p, n in zip(asked, limits)]
    assert decode(model, asked[:1], limits[0]) == expected[:1]
    # at most two rows at once: the other three join as earlier ones finish
    together = [decode(model, asked, max(limits), max_rows=2)[i][:n] for i, n in enumerate(limits)]
    assert together == expected


def test_decode_stops_at_a_stop_token_and_keeps_it_as_generate_does():
    model = random_llama()
    prompt = prompts(1, seed=5)[0]
    free = reference(model, prompt, 20)
    stop = free[6]
    expected = reference(model, prompt, 20, eos=stop)
    assert decode(model, [prompt], 20, stop_ids={stop}) == [expected]
    assert expected[-1] == stop and len(expected) <= 7


def test_decode_sampling_is_reproducible_from_its_generator():
    model = random_llama()
    asked = prompts(4)
    draw = lambda seed: decode(model, asked, 15, temperature=1.0, top_p=0.9, top_k=40,  # noqa: E731
                               generator=torch.Generator().manual_seed(seed))
    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


# --- the server's continuous batcher ------------------------------------------------------------


class OnePool:
    """The part of ModelPool the batcher uses, over models built in the test."""

    def __init__(self, servables: dict) -> None:
        self.servables = servables

    def get(self, model_id: str):
        return self.servables[model_id]


class TokenTokenizer:
    """A tokenizer whose text is the token ids themselves ("5 17 3"): decoding is exact and incremental."""

    eos_token_id, unk_token_id, pad_token_id = VOCAB + 5, None, 0  # the models here never produce it

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [int(t) for t in text.split()]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f" {i}" for i in ids)

    def convert_tokens_to_ids(self, token: str):
        return None


def servable(model_id: str, model, adapter: str | None = None):
    from tunesmith.serve.pool import Servable

    return Servable(model_id, model, TokenTokenizer(), adapter)


def ask(generator, model_id: str, prompt: list[int], max_tokens: int, **fields):
    """Submit one request; returns (done event, received tokens, finish reasons, the request)."""
    from tunesmith.serve.batching import GenerationRequest

    finished, texts, reasons = threading.Event(), {}, {}
    n = fields.get("n", 1)

    def sink(event: tuple) -> None:
        if event[0] == "delta":
            texts[event[1]] = texts.get(event[1], "") + event[2]
        elif event[0] == "done":
            reasons[event[1]] = event[2]
            if len(reasons) == n:
                finished.set()
        elif event[0] == "error":
            reasons["error"] = event[1]
            finished.set()

    request = GenerationRequest(model_id=model_id, render=lambda tok: " ".join(map(str, prompt)), sink=sink,
                                max_tokens=max_tokens, **fields)
    generator.submit(request)
    return finished, texts, reasons, request


def tokens(texts: dict, index: int = 0) -> list[int]:
    return [int(t) for t in texts.get(index, "").split()]


@pytest.fixture
def batcher():
    made = []

    def make(servables: dict, max_batch: int = 32):
        from tunesmith.serve.batching import BatchingGenerator

        generator = BatchingGenerator(OnePool(servables), window_s=0.0, max_batch=max_batch)
        made.append(generator)
        return generator

    yield make
    for generator in made:
        generator.close()


def test_batcher_greedy_equals_generate_per_request_as_rows_join_and_leave(batcher):
    model = random_llama(eos=VOCAB + 5)  # an eos outside the vocabulary: rows end at their own limits
    generator = batcher({"m": servable("m", model)}, max_batch=3)
    asked, limits = prompts(5, seed=2), [4, 12, 7, 2, 9]
    sent = [ask(generator, "m", p, n, temperature=0.0) for p, n in zip(asked, limits)]
    for finished, *_ in sent:
        assert finished.wait(60)
    for (_, texts, reasons, _), p, n in zip(sent, asked, limits):
        assert tokens(texts) == reference(model, p, n) and reasons == {0: "length"}
    assert max(generator.batch_sizes) == 3 and generator.active_rows() == 0


def test_batcher_two_adapters_and_the_base_in_one_batch_equal_each_alone(batcher):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(random_llama(eos=VOCAB + 5), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                    init_lora_weights=False), adapter_name="a0")
    model.add_adapter("a1", LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    model.eval()
    generator = batcher({"base": servable("base", model), "a0": servable("a0", model, "a0"),
                         "a1": servable("a1", model, "a1")})
    asked = prompts(3, seed=3)
    sent = {name: ask(generator, name, p, 12, temperature=0.0) for name, p in zip(("a0", "base", "a1"), asked)}
    for finished, *_ in sent.values():
        assert finished.wait(60)
    alone = {}
    for name, p in zip(("a0", "base", "a1"), asked):
        if name == "base":
            with model.disable_adapter():
                alone[name] = reference(model, p, 12)
        else:
            model.set_adapter(name)
            alone[name] = reference(model, p, 12)
    assert {name: tokens(texts) for name, (_, texts, _, _) in sent.items()} == alone
    assert len({tuple(t) for t in alone.values()}) == 3  # the adapters really differ
    assert max(generator.batch_sizes) == 3  # all three decoded in one batch


def test_batcher_seed_gives_the_same_tokens_alone_and_in_company(batcher):
    model = random_llama(eos=VOCAB + 5)
    generator = batcher({"m": servable("m", model)})
    prompt = prompts(1, seed=4)[0]
    fields = {"temperature": 1.0, "top_p": 0.95, "seed": 11, "n": 2}
    finished, alone, *_ = ask(generator, "m", prompt, 16, **fields)
    assert finished.wait(60)
    company = [ask(generator, "m", p, 30, temperature=1.0) for p in prompts(4, seed=6)]
    finished, together, *_ = ask(generator, "m", prompt, 16, **fields)
    assert finished.wait(60) and all(done.wait(60) for done, *_ in company)
    assert tokens(alone, 0) == tokens(together, 0) and tokens(alone, 1) == tokens(together, 1)
    assert tokens(alone, 0) != tokens(alone, 1)  # the two choices draw differently


def test_batcher_stop_string_and_cancel_free_the_slot(batcher):
    model = random_llama(eos=VOCAB + 5)
    generator = batcher({"m": servable("m", model)})
    prompt = prompts(1, seed=7)[0]
    free = reference(model, prompt, 10)
    finished, texts, reasons, _ = ask(generator, "m", prompt, 10, temperature=0.0, stop=[f" {free[3]} "])
    assert finished.wait(60) and reasons == {0: "stop"}
    assert tokens(texts) == free[: free.index(free[3])]
    _, texts, reasons, long = ask(generator, "m", prompt, 4000, temperature=0.0)
    deadline = time.monotonic() + 30
    while not texts and time.monotonic() < deadline:
        time.sleep(0.01)
    assert generator.active_rows() == 1
    long.cancel()
    while generator.active_rows() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert generator.active_rows() == 0 and not reasons  # left at the next step, no reply finished
    finished, texts, *_ = ask(generator, "m", prompt, 5, temperature=0.0)
    assert finished.wait(60) and tokens(texts) == free[:5]  # the freed slot serves the next request


@pytest.mark.slow
def test_loopback_load_streams_every_request_and_answers_as_alone(tiny_llama, tmp_path):
    """A bounded load on 127.0.0.1: 12 concurrent streamed completions of mixed lengths against uvicorn."""
    import asyncio
    import json
    import shutil

    pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'tunesmith[serve]'")
    import httpx

    from tunesmith.serve.app import create_app

    from serve_support import app_on_loopback

    shutil.copytree(tiny_llama, tmp_path / "models" / "tiny")
    app = create_app(tmp_path)
    words = ["Once", "The cat", "A dog ran", "Tell me", "Why", "Lily and Tom went"]
    bodies = [{"model": "models/tiny", "prompt": words[i % 6], "max_tokens": 4 + 3 * (i % 5), "temperature": 0}
              for i in range(12)]

    async def streamed(http, body) -> str:
        text = ""
        async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text

    async def run():
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            alone = [(await http.post("/v1/completions", json=body)).json()["choices"][0]["text"] for body in bodies]
            together = await asyncio.gather(*(streamed(http, body) for body in bodies))
        return alone, together

    with app_on_loopback(app) as port:
        alone, together = asyncio.run(asyncio.wait_for(run(), timeout=120))
    assert together == alone and all(alone)
    assert max(app.state.generator.batch_sizes) > 1


def test_serve_dtype_loads_every_served_model_in_it(tiny_llama, tmp_path):
    """``serve --dtype bfloat16``: the pool loads in it and the batcher decodes it (a KV cache of that dtype)."""
    import shutil

    from tunesmith.serve.batching import BatchingGenerator, GenerationRequest
    from tunesmith.serve.pool import ModelPool
    from tunesmith.serve.workspace import Workspace

    shutil.copytree(tiny_llama, tmp_path / "models" / "tiny")
    pool = ModelPool(Workspace(tmp_path), dtype="bfloat16")
    served = pool.get("models/tiny")
    assert next(served.model.parameters()).dtype == torch.bfloat16
    generator = BatchingGenerator(pool, window_s=0.0)
    try:
        events = []
        done = threading.Event()

        def sink(event):
            events.append(event)
            if event[0] in ("done", "error"):
                done.set()

        generator.submit(GenerationRequest("models/tiny", lambda tokenizer: "Once upon a time", sink, max_tokens=5))
        assert done.wait(120)
        assert events[-1][0] == "done" and events[-1][3] >= 1, events
    finally:
        generator.close()


def recorded_prefixes(batcher, monkeypatch):
    """A batcher over a random model whose batches record each ``_prefixes_for`` answer (``used``), a 20-token start
    (at least MIN_PREFIX) and a prompt that begins with it: (used, generator, start, prompt)."""
    from tunesmith.inference.decoding import RowBatch

    used = []
    original = RowBatch._prefixes_for
    monkeypatch.setattr(RowBatch, "_prefixes_for", lambda self, rows: used.append(original(self, rows)) or used[-1])
    generator = batcher({"m": servable("m", random_llama(eos=VOCAB + 5))})
    start = list(range(3, 23))
    return used, generator, start, start + prompts(1, seed=8)[0]


def test_batcher_keeps_a_shared_start_after_its_batch_is_gone(batcher, monkeypatch):
    """The shared start a crowd computed outlives the crowd's batch: a lone request afterwards reads it (its prompt
    after the start is all it prefills) and gives the tokens it gives without it."""
    used, generator, start, prompt = recorded_prefixes(batcher, monkeypatch)
    finished, alone, *_ = ask(generator, "m", prompt, 8)
    assert finished.wait(60) and not any(used)
    company = [ask(generator, "m", start + p, 6) for p in prompts(4, seed=9)]
    assert all(done.wait(60) for done, *_ in company)
    deadline = time.monotonic() + 10
    while generator.batches and time.monotonic() < deadline:  # the crowd's rows leave, its batch with them
        time.sleep(0.01)
    assert not generator.batches
    used.clear()
    finished, later, *_ = ask(generator, "m", prompt, 8)
    assert finished.wait(60)
    assert used and used[-1] is not None and used[-1][0].tokens == start
    assert tokens(later) == tokens(alone)


def test_batcher_seed_holds_when_company_shares_the_prompt_start(batcher, monkeypatch):
    """Prefix caching: in company the seeded row reads a shared start computed once; alone, its whole prompt."""
    used, generator, start, prompt = recorded_prefixes(batcher, monkeypatch)
    fields = {"temperature": 1.0, "top_p": 0.95, "seed": 5}
    finished, alone, *_ = ask(generator, "m", prompt, 16, **fields)
    assert finished.wait(60) and not any(used)
    company = [ask(generator, "m", start + p, 30, temperature=1.0) for p in prompts(4, seed=9)]
    finished, together, *_ = ask(generator, "m", prompt, 16, **fields)
    assert finished.wait(60) and all(done.wait(60) for done, *_ in company)
    assert any(prefixes is not None and len(prefixes[0].tokens) >= 16 for prefixes in used)
    assert tokens(alone) == tokens(together) and len(tokens(alone)) == 16

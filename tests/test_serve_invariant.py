"""Batch-invariant bfloat16 serving (inference/invariant.py): a row's bits do not depend on its company.

The kernels' property it rests on (a bfloat16 product gives a row the same bits in a decode-sized batch and
anywhere in a fixed-size prefill block) is tested on the tiny model's shapes and SmolLM2's; the row-by-row
attention against the lone row's call; then end to end, bit for bit, on a small random bfloat16 Llama: a
row's logits at every step alone and inside batches of other lengths and adapters, the batcher's seeded
and greedy requests alone and in company, and a real server on 127.0.0.1 (``serve --dtype bfloat16``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from test_serve_batching import ask, batcher, tokens  # noqa: F401  (batcher: the fixture)
from tunesmith.inference.decoding import Row, RowBatch
from tunesmith.inference.invariant import (
    BLOCK_ROWS,
    CHUNK_ROWS,
    check_row_invariance,
    chunked_addmm,
    chunked_linear,
    decode_attention,
    lone_row_differs,
    padded_keys,
    pads_lone_rows,
    prompt_attention,
)

VOCAB = 96


def small_llama(seed: int = 0, eos: int = VOCAB + 5):
    """A bfloat16 Llama of SmolLM2-135M's widths (2 layers, a small vocabulary): its products take the kernels
    SmolLM2's do, small (≤ 32 rows) and large (a prefill's blocks), which round a row differently."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=256,
                         eos_token_id=eos, bos_token_id=1, pad_token_id=0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).eval()
        for parameter in model.parameters():  # norms start at one: make every part count
            parameter.data.add_(torch.randn_like(parameter) * 0.05)
    return model.to(torch.bfloat16)


def two_adapters(model):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
                           adapter_name="a0")
    model.add_adapter("a1", LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    return model.eval()


def prompts(count: int, seed: int, longest: int = 40) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (int(length),), generator=generator).tolist()
            for length in torch.randint(1, longest, (count,), generator=generator)]


SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (96, 576), (49152, 576)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: f"{shape[1]}to{shape[0]}")
def test_bfloat16_products_give_each_row_its_lone_bits(shape):
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(shape, generator=generator) * 0.05).bfloat16()
    x = torch.randn(3 * BLOCK_ROWS // 2, shape[1], generator=generator).bfloat16()
    alone = torch.cat([chunked_linear(x[row : row + 1], weight) for row in range(len(x))])  # padded if needed
    for rows in (2, 7, CHUNK_ROWS):  # a decode step's product: as it is, at most 32 rows
        assert torch.equal(chunked_linear(x[:rows], weight), F.linear(x[:rows], weight))
        assert torch.equal(chunked_linear(x[:rows], weight), alone[:rows])
    assert torch.equal(chunked_linear(x, weight), alone)  # more rows: chunks of 32
    lone_block = chunked_linear(x[:1], weight, block=BLOCK_ROWS)  # a prefill product: padded blocks
    for shift in (0, 5, len(x) - 1):
        assert torch.equal(chunked_linear(x.roll(shift, 0), weight, block=BLOCK_ROWS)[shift], lone_block[0])
    bias = torch.randn(shape[0], generator=generator).bfloat16()
    assert torch.equal(chunked_addmm(bias, x, weight.t(), block=BLOCK_ROWS)[7],
                       chunked_addmm(bias, x[7:8], weight.t(), block=BLOCK_ROWS)[0])


def test_a_lone_row_is_padded_where_its_product_differs_in_company(monkeypatch):
    """Where a one-row product takes another kernel than the same row among others (a Zen 4 CPU's bfloat16
    1536→576), the decode step's products give a lone row, and a one-row last chunk, a zero row beside it:
    faked here by a kernel that rounds lone rows differently, so that the test holds on any machine."""
    original = F.linear
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: original(x, w, b) + (x.shape[0] == 1) * 2 ** -4)
    lone_row_differs.cache_clear()
    try:
        weight = torch.randn(48, 64).bfloat16()
        x = torch.randn(CHUNK_ROWS + 1, 64).bfloat16()
        assert lone_row_differs(64, 48, torch.bfloat16)
        assert pads_lone_rows(torch.nn.Sequential(torch.nn.Linear(64, 48)).bfloat16())
        together = chunked_linear(x, weight)  # 32 rows, then a one-row chunk: padded
        assert torch.equal(chunked_linear(x[:1], weight)[0], together[0])
        assert torch.equal(chunked_linear(x[-1:], weight)[0], together[-1])
        assert not torch.equal(F.linear(x[:1], weight)[0], together[0])  # the fake kernel's lone row, unpadded
    finally:
        lone_row_differs.cache_clear()


@pytest.mark.parametrize("rank", [8, 24])
def test_in_place_update_has_the_bits_of_chunked_addmm(rank):
    """Per-row LoRA adds its update in place (``addmm_``, routed to ``chunked_addmm_``): the bits of the
    out-of-place ``chunked_addmm`` over the same chunks (decode: ≤ 32 rows, more in chunks; prefill: padded
    blocks), and under the mode each row's bits are its lone ones."""
    from tunesmith.inference.invariant import chunked_addmm_, row_invariant

    generator = torch.Generator().manual_seed(1)
    down = torch.randn(3 * BLOCK_ROWS // 2, rank, generator=generator).bfloat16()
    up = (torch.randn(rank, 1536, generator=generator) * 0.05).bfloat16()
    result = torch.randn(len(down), 1536, generator=generator).bfloat16()
    for rows, block in ((7, None), (CHUNK_ROWS, None), (len(down), None), (5, BLOCK_ROWS), (len(down), BLOCK_ROWS)):
        expected = chunked_addmm(result[:rows], down[:rows], up, block=block)
        assert torch.equal(chunked_addmm_(result[:rows].clone(), down[:rows], up, block=block), expected)
    model = torch.nn.Linear(4, 4).bfloat16()
    with row_invariant(model, prefill=True):
        together = result.clone().addmm_(down, up)
    with row_invariant(model, prefill=True):
        alone = result[9:10].clone().addmm_(down[9:10], up)
    assert torch.equal(together[9], alone[0])


def test_the_load_time_check_passes_here_and_names_a_failure(caplog, monkeypatch):
    assert check_row_invariance(small_llama())
    original = F.linear
    # a kernel that rounds differently in company: the check must see it and say which product
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: original(x, w, b) + (x.shape[0] > 1) * 2 ** -4)
    assert not check_row_invariance(torch.nn.Sequential(torch.nn.Linear(64, 48)).bfloat16())
    assert "does not hold on this machine" in caplog.text and "64→48" in caplog.text


def test_prompt_attention_gives_each_query_its_lone_bits_and_sdpas_values():
    """Left-padded rows, and a row whose start is a cached prefix: each query's output is the one it gets alone."""
    generator = torch.Generator().manual_seed(0)
    lengths = [5, 40, 1, 70]
    longest = max(lengths)
    query = torch.randn(4, 6, longest, 32, generator=generator).bfloat16()
    key, value = (torch.randn(4, 2, longest, 32, generator=generator).bfloat16() for _ in range(2))
    pads = [longest - length for length in lengths]
    real = torch.arange(longest)[None] >= torch.tensor(pads)[:, None]
    mask = torch.ones(longest, longest, dtype=torch.bool).tril()[None] & real[:, None, :]
    mask = (mask | torch.eye(longest, dtype=torch.bool)[None])[:, None]
    out = prompt_attention(query, key, value, mask, scale=0.2)
    for row, (pad, length) in enumerate(zip(pads, lengths)):
        causal = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
        parts = [t[row : row + 1, :, pad:] for t in (query, key, value)]
        assert torch.equal(out[row : row + 1, :, pad:], prompt_attention(*parts, causal, scale=0.2))
        assert not out[row, :, :pad].any()
        reference = F.scaled_dot_product_attention(*(t.float() for t in parts), is_causal=True, scale=0.2,
                                                   enable_gqa=True)
        assert torch.allclose(out[row : row + 1, :, pad:].float(), reference, atol=2e-2)
    # row 3's first 33 positions as a cached start, the rest after it: the same bits as its whole prompt at once
    shared = 33
    rest = [t[3:4, :, shared:] for t in (query,)] + [t[3:4] for t in (key, value)]
    after = torch.ones(longest - shared, longest, dtype=torch.bool).tril(shared)[None, None]
    assert torch.equal(prompt_attention(*rest, after, scale=0.2), out[3:4, :, shared:])
    start = [t[3:4, :, :shared] for t in (query, key, value)]
    assert torch.equal(prompt_attention(*start, torch.ones(shared, shared, dtype=torch.bool).tril()[None, None],
                                        scale=0.2), out[3:4, :, :shared])


def test_decode_attention_gives_each_row_its_lone_bits_and_sdpas_values():
    """A decode step's attention (written out, not the flash kernel): a row beside longer rows, its keys padded to
    the longest row's, gets the bits it gets alone over its own keys padded to a multiple of 64."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([700, 1, 64, 65, 200, 33])
    width = padded_keys(int(lengths.max()))
    query = torch.randn(6, 9, 1, 64, generator=generator).bfloat16()
    key, value = (torch.randn(6, 3, width, 64, generator=generator).bfloat16() for _ in range(2))
    mask = (torch.arange(width)[None] < lengths[:, None])[:, None, None]  # (rows, 1, 1, keys)
    together, _ = decode_attention(None, query, key, value, mask, scaling=0.125)  # (rows, 1, heads, head_dim)
    for row, length in enumerate(lengths.tolist()):
        own = padded_keys(length)
        parts = [query[row : row + 1], key[row : row + 1, :, :own], value[row : row + 1, :, :own]]
        alone, _ = decode_attention(None, *parts, mask[row : row + 1, ..., :own], scaling=0.125)
        assert torch.equal(together[row : row + 1], alone)
        reference = F.scaled_dot_product_attention(*(t[..., :length, :].float() for t in parts), scale=0.125,
                                                   enable_gqa=True)
        assert torch.allclose(alone.float(), reference.transpose(1, 2), atol=1e-2)


def record_logits(monkeypatch) -> dict:
    """Every row's logits at each join and step it takes part in: {id(row): [logits, ...]}."""
    import tunesmith.inference.decoding as decoding

    seen, original = {}, decoding._pick_each

    def pick_each(rows, logits):
        for row, row_logits in zip(rows, logits):
            seen.setdefault(id(row), []).append(row_logits.clone())
        original(rows, logits)

    monkeypatch.setattr(decoding, "_pick_each", pick_each)
    return seen


def run(model, me: Row, others: list[Row], steps: int, invariant: bool, mixed: bool = False) -> None:
    """``me`` joins with half of ``others`` (left-padded to the longest) and decodes ``steps`` steps; the other
    half joins after two steps."""
    half = len(others) // 2
    batch = RowBatch(model, mixed_adapters=mixed, invariant=invariant)
    batch.join([*others[:half], me], room=steps + 2)
    for step in range(steps):
        if step == 2 and others[half:]:
            batch.join(others[half:], room=steps + 2)
        batch.step()


@pytest.mark.parametrize("mixed", [False, True], ids=["base", "mixed-adapters"])
def test_a_rows_logits_are_its_lone_ones_in_any_company(monkeypatch, mixed):
    model = small_llama()
    if mixed:
        model = two_adapters(model)
    adapters = ["a0", None, "a1"] if mixed else [None]
    seen = record_logits(monkeypatch)
    start = list(range(3, 23))  # 20 tokens every prompt begins with: the prefix cache computes them once
    prompt = start + prompts(1, seed=3)[0]

    def row_in(company: int, invariant: bool = True) -> tuple[list[torch.Tensor], list[int]]:
        me = Row(list(prompt), temperature=1.0, generator=torch.Generator().manual_seed(5),
                 adapter="a1" if mixed else None)
        others = [Row(start + p, temperature=0.9, generator=torch.Generator().manual_seed(i),
                      adapter=adapters[i % len(adapters)]) for i, p in enumerate(prompts(company, seed=4))]
        seen.clear()  # ids of rows gone may come back
        run(model, me, others, 6, invariant, mixed)
        return seen.pop(id(me)), me.tokens

    alone, alone_tokens = row_in(0)
    assert len(alone) == 7
    for company in (3, 12, 40):  # 41 rows: a decode step's products then run in chunks (per-row LoRA's too)
        together, together_tokens = row_in(company)
        assert together_tokens == alone_tokens
        assert all(torch.equal(a, b) for a, b in zip(alone, together, strict=True))
    differs = [not all(torch.equal(a, b) for a, b in zip(row_in(0, False)[0], row_in(12, False)[0]))]
    assert any(differs)  # without it the same row's bits move with its company: the test can fail


def test_batcher_bfloat16_seeded_and_greedy_requests_answer_alone_as_in_company(batcher):  # noqa: F811
    """The server's batcher over a bfloat16 base with two adapters: a seeded sampled request (two choices) and a
    greedy one give the same tokens alone as among other requests of other lengths, adapters and settings, some
    of them sharing its prompt start. (Without batch invariance the 40 seeded tokens part here.)"""
    from test_serve_batching import TokenTokenizer
    from tunesmith.serve.pool import Servable

    model = two_adapters(small_llama())
    generator = batcher({name: Servable(name, model, TokenTokenizer(), adapter, True)
                         for name, adapter in (("base", None), ("a0", "a0"), ("a1", "a1"))})
    prompt = prompts(1, seed=7)[0] + list(range(3, 23))
    sampled = {"temperature": 1.0, "top_p": 0.95, "seed": 11, "n": 2}
    alone = [ask(generator, "a1", prompt, 40, **sampled), ask(generator, "base", prompt[::-1], 12, temperature=0.0)]
    assert all(finished.wait(120) for finished, *_ in alone)
    company = [ask(generator, ("a0", "base", "a1")[i % 3], prompt[:20] + p, 20, temperature=0.7 * (i % 2), seed=i)
               for i, p in enumerate(prompts(7, seed=8))]
    together = [ask(generator, "a1", prompt, 40, **sampled), ask(generator, "base", prompt[::-1], 12, temperature=0.0)]
    assert all(finished.wait(120) for finished, *_ in together + company)
    for (_, lone, *_), (_, joined, *_) in zip(alone, together):
        assert tokens(lone, 0) == tokens(joined, 0) and len(tokens(lone, 0)) >= 12
    assert tokens(alone[0][1], 1) == tokens(together[0][1], 1) != tokens(alone[0][1], 0)
    assert max(generator.batch_sizes) >= 5


@pytest.mark.slow
def test_loopback_bfloat16_server_gives_a_seed_the_same_text_alone_and_under_load(tiny_llama, tmp_path):
    """``serve --dtype bfloat16`` on 127.0.0.1: 10 concurrent seeded sampled completions equal the same ten sent
    one at a time."""
    import asyncio
    import shutil

    pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'tunesmith[serve]'")
    import httpx

    from tunesmith.serve.app import create_app

    from serve_support import app_on_loopback

    shutil.copytree(tiny_llama, tmp_path / "models" / "tiny")
    app = create_app(tmp_path, dtype="bfloat16")
    words = ["Once", "The cat sat on the mat and", "A dog ran", "Tell me a story about a", "Why"]
    bodies = [{"model": "models/tiny", "prompt": words[i % 5], "max_tokens": 6 + 3 * (i % 4), "temperature": 1.0,
               "seed": 100 + i} for i in range(10)]

    async def run():
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            async def text(body):
                return (await http.post("/v1/completions", json=body)).json()["choices"][0]["text"]

            alone = [await text(body) for body in bodies]
            together = await asyncio.gather(*(text(body) for body in bodies))
        return alone, together

    with app_on_loopback(app) as port:
        alone, together = asyncio.run(asyncio.wait_for(run(), timeout=120))
    assert together == alone and all(alone)
    assert app.state.pool.get("models/tiny").invariant
    assert max(app.state.generator.batch_sizes) > 1


def test_serve_dtype_auto_is_bfloat16_where_native_and_checked_at_load(tiny_llama, tmp_path, monkeypatch):
    import shutil

    import tunesmith.core.runtime as runtime
    from tunesmith.serve.pool import ModelPool
    from tunesmith.serve.workspace import Workspace

    shutil.copytree(tiny_llama, tmp_path / "models" / "tiny")
    monkeypatch.setattr(runtime, "bfloat16_support", lambda device: None)
    pool = ModelPool(Workspace(tmp_path), dtype="auto")
    assert pool.dtype == "float32" and "no native bfloat16" in pool.dtype_reason
    assert not pool.get("models/tiny").invariant  # float32: no invariance needed, none paid for
    monkeypatch.setattr(runtime, "bfloat16_support", lambda device: "CPU has AMX")
    pool = ModelPool(Workspace(tmp_path), dtype="auto")
    assert pool.dtype == "bfloat16" and "CPU has AMX" in pool.dtype_reason
    served = pool.get("models/tiny")
    assert next(served.model.parameters()).dtype == torch.bfloat16 and served.invariant


def test_serve_defaults_to_auto_and_create_app_to_float32():
    """``tunesmith serve`` serves in the model's fast dtype where the machine has it (auto); the library's
    ``create_app`` stays float32, whose replies equal ``tunesmith generate``'s (docs/speed.md)."""
    import argparse
    import inspect

    from tunesmith.cli.serve import register
    from tunesmith.serve.app import create_app

    commands = argparse.ArgumentParser().add_subparsers(dest="command")
    register(commands)
    assert commands.choices["serve"].parse_args([]).dtype == "auto"
    assert inspect.signature(create_app).parameters["dtype"].default == "float32"


def test_a_lone_row_steps_beside_its_twin_with_its_bits_in_company(monkeypatch):
    """Where one-row products round differently (faked in the decode steps: a kernel that rounds a lone row
    differently, so that this holds on any machine), a lone row's decode step runs as two rows (the row and its
    twin in a free slot): no product holds one row, and the row's logits at every step are those it gets beside
    other rows. (Through the invariant mode instead, the fake would see the lone row before the mode pads it.)"""
    original, product_rows = F.linear, []

    def lone_rows_round_differently(x, w, b=None):
        if product_rows is None:  # a join: the real kernel
            return original(x, w, b)
        product_rows.append(x.reshape(-1, x.shape[-1]).shape[0])
        return original(x, w, b) + (product_rows[-1] == 1) * 2 ** -4

    monkeypatch.setattr(F, "linear", lone_rows_round_differently)
    model, seen = small_llama(), record_logits(monkeypatch)
    lone_row_differs.cache_clear()
    try:
        assert pads_lone_rows(model)  # probed once per shape with the fake kernel, kept for the batches below

        def steps(rows: list[Row]) -> list[int]:
            nonlocal product_rows
            batch, product_rows = RowBatch(model, invariant=True), None
            batch.join(rows, room=7)
            product_rows = []
            for _ in range(5):
                batch.step()
            return product_rows

        alone, together = Row(prompts(1, seed=3)[0]), Row(prompts(1, seed=3)[0])
        assert min(steps([alone])) == 2
        steps([Row(p) for p in prompts(3, seed=4)] + [together])
        assert together.tokens == alone.tokens
        assert all(torch.equal(a, b) for a, b in zip(seen[id(alone)], seen[id(together)], strict=True))
    finally:
        lone_row_differs.cache_clear()

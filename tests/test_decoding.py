"""The lean decode step (decoding.LeanDecoder) against the model's own forward and ``model.generate``.

Tiny random models of each family the slot cache serves (Llama; Qwen2 with biased projections;
Qwen3 with per-head norms), bare, in bfloat16, and under a LoRA adapter: the lean step's logits
must be the forward's bit for bit, and greedy decoding must equal ``model.generate``.
"""

from __future__ import annotations

import pytest
import torch

from tunesmith.inference.decoding import (
    LeanDecoder,
    Row,
    RowBatch,
    common_prefix,
    decode,
    greedy_tokens,
    prefill_length,
)

VOCAB = 80
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=128, eos_token_id=2, bos_token_id=1,
             pad_token_id=0)


def random_model(family: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
               "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
    config_class, model_class = classes[family]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_class(config_class(**SHAPE)).eval()
        for parameter in model.parameters():  # norms start at one and biases at zero: make every part count
            parameter.data.add_(torch.randn_like(parameter) * 0.05)
    return model


def with_lora(model):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.random.fork_rng():
        torch.manual_seed(3)
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:  # B starts at zero: give the adapter an effect
                parameter.data.normal_(0, 0.1)
    return peft_model.eval()


def prompts(count: int, seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (int(length),), generator=generator).tolist()
            for length in torch.randint(1, 20, (count,), generator=generator)]


MODELS = {
    "llama": lambda: random_model("llama"),
    "qwen2": lambda: random_model("qwen2"),
    "qwen3": lambda: random_model("qwen3"),
    "llama-bfloat16": lambda: random_model("llama").to(torch.bfloat16),
    "llama-lora": lambda: with_lora(random_model("llama")),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_lean_step_gives_the_forward_logits_bit_for_bit(name):
    model = MODELS[name]()
    batch = RowBatch(model)
    assert batch.lean is not None
    rows = [Row(prompt) for prompt in prompts(3)]
    batch.join(rows, room=8)
    for _ in range(4):  # rows of different lengths: each reads its own slot
        count = len(batch.rows)
        lengths = batch.cache.lengths[:count]
        ids = torch.tensor([[row.tokens[-1]] for row in batch.rows])
        positions = torch.tensor(lengths)[:, None]
        mask = (torch.arange(max(lengths) + 1)[None, :] <= positions)[:, None, None]
        batch.cache.plan_decode(count, batch.device)
        lean = batch.lean(ids, positions, mask, batch.cache)
        batch.cache.plan_decode(count, batch.device)  # the same step again, through model(...)
        forward = batch._forward(ids, positions, mask, batch.rows)
        assert torch.equal(lean, forward)
        batch.step()


@pytest.mark.parametrize("name", ["qwen3", "llama-lora", "llama-bfloat16"])
def test_lean_decoding_equals_generate(name):
    model = MODELS[name]()
    asked = prompts(4, seed=2)
    expected = []
    for prompt in asked:
        output = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        expected.append(output[0, len(prompt):].tolist())
    assert decode(model, asked[:1], 12) == expected[:1]  # one row: the single-stream case
    assert decode(model, asked, 12, max_rows=2) == expected


def test_a_model_without_the_llama_layout_decodes_without_the_lean_step():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2))
    assert LeanDecoder.fit(model) is None


def shared_start_prompts(count: int, start: int = 20, seed: int = 4) -> list[list[int]]:
    """Prompts that begin with the same ``start`` tokens (a chat template's system prompt) and differ after."""
    generator = torch.Generator().manual_seed(seed)
    common = torch.randint(3, VOCAB, (start,), generator=generator).tolist()
    return [common + tail for tail in prompts(count, seed=seed + 1)]


@pytest.mark.parametrize("name", ["llama", "llama-bfloat16", "llama-lora"])
def test_a_shared_prompt_start_is_computed_once_and_decodes_as_generate(name):
    from tunesmith.inference.decoding import MIN_PREFIX

    model = MODELS[name]()
    asked = shared_start_prompts(4)
    assert common_prefix(asked) >= 20 >= MIN_PREFIX
    with_prefix = RowBatch(model)
    with_prefix.join([Row(prompt) for prompt in asked[:3]], room=8)
    shared = common_prefix(asked[:3])
    assert len(with_prefix.prefixes[None].tokens) == shared
    assert prefill_length(with_prefix.prefixes, Row(asked[3])) == len(asked[3]) - shared  # what the server's budget counts
    assert prefill_length(with_prefix.prefixes, Row([5] + asked[3])) == len(asked[3]) + 1
    with_prefix.join([Row(asked[3])], room=8)  # a later row reuses the shared start (one row computes none)
    without = RowBatch(model)
    for prompt in asked:
        without.join([Row(prompt)], room=8)
    assert not without.prefixes
    for _ in range(3):
        with_prefix.step(), without.step()
    tolerance = 0.05 if name == "llama-bfloat16" else 1e-5
    for layer in range(2):  # the slots hold the same keys and values either way
        for mine, theirs in ((with_prefix.cache.keys, without.cache.keys), (with_prefix.cache.values, without.cache.values)):
            torch.testing.assert_close(mine[layer][:4], theirs[layer][:4], atol=tolerance, rtol=tolerance)
    expected = []
    for prompt in asked:
        output = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
        expected.append(output[0, len(prompt):].tolist())
    if name != "llama-bfloat16":  # bfloat16 rounds the shared start's forward differently: tokens may part
        assert decode(model, asked, 10) == expected


def test_a_lone_row_of_another_adapter_computes_the_known_start_for_its_adapter():
    """A start known for one adapter (the base's) that a lone row of another adapter begins with is computed once
    for that adapter, kept, and the row decodes as it does without it."""
    model = MODELS["llama-lora"]()
    asked = shared_start_prompts(4)
    batch = RowBatch(model, mixed_adapters=True)
    batch.join([Row(prompt, adapter="__base__") for prompt in asked[:2]], room=4)
    assert set(batch.prefixes) == {"__base__"}
    batch.join([Row(asked[2], adapter="default")], room=4)
    assert set(batch.prefixes) == {"__base__", "default"}
    assert batch.prefixes["default"].tokens == batch.prefixes["__base__"].tokens
    assert prefill_length(batch.prefixes, Row(asked[3], adapter="default")) == len(asked[3]) - common_prefix(asked[:2])
    alone = RowBatch(model, mixed_adapters=True)
    alone.join([Row(asked[2], adapter="default")], room=4)
    for _ in range(3):
        batch.step(), alone.step()
    assert batch.rows[2].tokens == alone.rows[0].tokens


def test_rows_of_different_adapters_share_a_start_per_adapter():
    model = MODELS["llama-lora"]()
    asked = shared_start_prompts(4)
    batch = RowBatch(model, mixed_adapters=True)
    adapters = ["default", "__base__", "default", "__base__"]
    batch.join([Row(prompt, adapter=adapter) for prompt, adapter in zip(asked, adapters)], room=4)
    assert set(batch.prefixes) == {"default", "__base__"}
    alone = []
    for prompt, adapter in zip(asked, adapters):
        single = RowBatch(model, mixed_adapters=True)
        single.join([Row(prompt, adapter=adapter)], room=4)
        alone.append(single.rows[0].tokens)
    assert sorted(row.tokens for row in batch.rows) == sorted(alone)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_greedy_tokens_are_argmax_on_ties_and_nan(dtype):
    """The greedy pick goes through ``max`` (a faster kernel than ``argmax`` for bfloat16): the same index,
    the first of tied maxima and a NaN's, row by row and for one row."""
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(33, 49152, generator=generator) * 2).round().to(dtype)  # few distinct values: many ties
    logits[3, [50, 100]] = float("nan")
    assert torch.equal(greedy_tokens(logits), logits.argmax(-1))
    assert greedy_tokens(logits[5]) == logits[5].argmax() and greedy_tokens(logits[3]) == 50

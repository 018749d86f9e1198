"""training/packed_attention.py: the packed causal attention with a compiled backward, against the per-example
flash SDPA it replaces (forward and gradients, bfloat16 and float32, documents of length 1, grouped-query heads),
and the switch that sends only marked, bfloat16, training calls to it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tunesmith.training.packed_attention import (
    COMPILED_BACKWARD,
    compile_packed_attention,
    compiled_document_backward,
    document_backward,
    packed_causal_attention,
)
from tunesmith.training.packing import enable_packed_attention, pack_collate, varlen_sdpa_attention

LENGTHS = [5, 1, 17, 9, 1, 30]  # length-1 documents included, one in the middle
# bfloat16: each side's error against float64 stays at the flash backward's own (benchmarks/packed_attention.py).
BF16_TOLERANCE = 0.05


def inputs(heads: int, kv_heads: int, dtype: torch.dtype, dim: int = 16, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    total = sum(LENGTHS)
    made = [torch.randn(1, count, total, dim, generator=generator).to(dtype) for count in (heads, kv_heads, kv_heads)]
    return made, torch.randn(1, heads, total, dim, generator=generator).to(dtype)


def per_example_flash(query, key, value, lengths, scale=None):
    """Today's kernel: scaled-dot-product attention once per document (the reference)."""
    pieces = zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))
    return torch.cat([F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=scale)
                      for q, k, v in pieces], 2)


def forward_backward(attention, tensors, grad, dtype=None):
    leaves = [tensor.to(dtype or tensor.dtype).clone().requires_grad_() for tensor in tensors]
    output = attention(*leaves)
    output.backward(grad.to(output.dtype))
    return [output.detach().double()] + [leaf.grad.double() for leaf in leaves]


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4)])
def test_float32_equals_per_example_flash(heads: int, kv_heads: int, compiled: bool) -> None:
    tensors, grad = inputs(heads, kv_heads, torch.float32)
    ours = forward_backward(lambda q, k, v: packed_causal_attention(q, k, v, LENGTHS, compiled=compiled), tensors, grad)
    reference = forward_backward(lambda q, k, v: per_example_flash(q, k, v, LENGTHS), tensors, grad)
    for name, mine, theirs in zip(("output", "query", "key", "value"), ours, reference):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.slow  # compiles the backward (cold: ~10 s each dtype)
def test_bfloat16_is_as_close_to_float64_as_the_flash_backward() -> None:
    """Same forward kernel (bit-identical output); gradients no further from float64 than flash's own, with a margin."""
    tensors, grad = inputs(9, 3, torch.bfloat16, dim=64)
    scale = 0.11  # a model's own scaling, not dim ** -0.5
    ours = forward_backward(lambda q, k, v: packed_causal_attention(q, k, v, LENGTHS, scale), tensors, grad)
    flash = forward_backward(lambda q, k, v: per_example_flash(q, k, v, LENGTHS, scale), tensors, grad)
    exact = forward_backward(lambda q, k, v: per_example_flash(q, k, v, LENGTHS, scale), tensors, grad, torch.float64)
    assert torch.equal(ours[0], flash[0])
    for name, mine, theirs, truth in zip(("query", "key", "value"), ours[1:], flash[1:], exact[1:]):
        error, flash_error = float((mine - truth).abs().max()), float((theirs - truth).abs().max())
        assert error <= max(2 * flash_error, BF16_TOLERANCE), (name, error, flash_error)
        assert error > 0  # bfloat16 products: a test that cannot tell float64 from bf16 would be broken


def test_no_document_sees_another() -> None:
    """Changing one document's keys and values moves no other document's output or query gradient."""
    tensors, grad = inputs(6, 2, torch.float32)
    changed = [tensor.clone() for tensor in tensors]
    start, end = sum(LENGTHS[:2]), sum(LENGTHS[:3])  # the third document
    for tensor in changed[1:]:
        tensor[:, :, start:end] += 3.0
    before = forward_backward(lambda q, k, v: packed_causal_attention(q, k, v, LENGTHS), tensors, grad)
    after = forward_backward(lambda q, k, v: packed_causal_attention(q, k, v, LENGTHS), changed, grad)
    outside = torch.ones(sum(LENGTHS), dtype=torch.bool)
    outside[start:end] = False
    for mine, theirs in zip(before[:2], after[:2]):
        assert torch.equal(mine[:, :, outside], theirs[:, :, outside])
        assert not torch.equal(mine[:, :, ~outside], theirs[:, :, ~outside])


def graph_names(tensor: torch.Tensor) -> set[str]:
    """The names of every autograd node behind ``tensor``."""
    seen, pending = {}, [tensor.grad_fn]
    while pending:
        node = pending.pop()
        if node is not None and id(node) not in seen:
            seen[id(node)] = node.name()
            pending.extend(next_node for next_node, _ in node.next_functions)
    return set(seen.values())


@pytest.mark.slow  # compiles the backward (cold: ~10 s each dtype)
def test_compiled_backward_equals_eager_and_does_not_recompile_per_length() -> None:
    """Dynamic lengths: new document lengths reuse the compiled graphs (one general, one for length 1)."""
    from torch._dynamo.utils import counters

    tensors, grad = inputs(6, 2, torch.float32)
    q, k, v, out, do = (t[0, :, :12].contiguous() for t in (*tensors, grad, grad))
    lse = torch.randn(6, 12)
    kernel = compiled_document_backward()

    def run(length: int):
        return kernel(*(t[:, :length] for t in (q, k, v, out, do, lse)), 0.25)

    for length in (12, 3, 1):  # warm both graphs
        for mine, theirs in zip(run(length), document_backward(*(t[:, :length] for t in (q, k, v, out, do, lse)), 0.25)):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    graphs = counters["stats"]["unique_graphs"]
    for length in (2, 5, 7, 1, 11):
        run(length)
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.slow  # compiles the backward (cold: ~10 s each dtype)
def test_varlen_attention_takes_the_compiled_backward_only_when_marked(tiny_llama) -> None:
    """Marked and bfloat16: the packed model's logits are the flash path's, bit for bit, and its gradients agree."""
    from transformers import AutoModelForCausalLM

    from test_speed import make_examples
    from tunesmith.training.loss import model_inputs

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16)
    assert enable_packed_attention(model)
    batch = model_inputs(pack_collate(make_examples(6), 0))

    def logits_and_grads():
        model.zero_grad()
        logits = model(**batch, use_cache=False).logits
        logits.float().logsumexp(-1).mean().backward()
        return logits, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    flash_logits, flash_grads = logits_and_grads()
    assert "PackedCausalAttentionBackward" not in graph_names(flash_logits)
    undo = compile_packed_attention(model)
    assert all(getattr(layer.self_attn, COMPILED_BACKWARD) for layer in model.model.layers)
    ours_logits, ours_grads = logits_and_grads()
    assert "PackedCausalAttentionBackward" in graph_names(ours_logits)
    undo()
    assert not any(hasattr(layer.self_attn, COMPILED_BACKWARD) for layer in model.model.layers)
    assert torch.equal(ours_logits, flash_logits)
    assert flash_grads.keys() == ours_grads.keys()
    for name, grad in flash_grads.items():
        scale = float(grad.abs().max())
        assert float((ours_grads[name] - grad).abs().max()) <= 0.05 * max(scale, 1e-3), name


def test_float32_no_grad_and_windowed_calls_keep_flash() -> None:
    """The switch: a marked module's bfloat16 training call takes it; float32, no grad or a window shorter than a
    document go through SDPA per example."""
    module, unmarked = torch.nn.Module(), torch.nn.Module()
    for each in (module, unmarked):
        each.num_key_value_groups, each.is_causal = 2, True  # what transformers' sdpa reads off the module
    setattr(module, COMPILED_BACKWARD, True)
    tensors, _ = inputs(4, 2, torch.bfloat16)
    bounds = torch.tensor([0, *LENGTHS], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    q, k, v = (t.clone().requires_grad_() for t in tensors)
    assert "PackedCausalAttentionBackward" in graph_names(varlen_sdpa_attention(module, q, k, v, None,
                                                                                cu_seq_lens_q=bounds)[0])
    windowed = varlen_sdpa_attention(module, q, k, v, None, cu_seq_lens_q=bounds, sliding_window=8)[0]
    assert "PackedCausalAttentionBackward" not in graph_names(windowed)
    wide = varlen_sdpa_attention(module, q, k, v, None, cu_seq_lens_q=bounds, sliding_window=64)[0]
    assert "PackedCausalAttentionBackward" in graph_names(wide)
    floats = [t.float().requires_grad_() for t in tensors]
    assert "PackedCausalAttentionBackward" not in graph_names(varlen_sdpa_attention(module, *floats, None,
                                                                                    cu_seq_lens_q=bounds)[0])
    with torch.no_grad():
        assert varlen_sdpa_attention(module, q, k, v, None, cu_seq_lens_q=bounds)[0].grad_fn is None
    unmarked = varlen_sdpa_attention(unmarked, q, k, v, None, cu_seq_lens_q=bounds)[0]
    assert "PackedCausalAttentionBackward" not in graph_names(unmarked)


def test_float32_queries_under_bfloat16_autocast_take_it_like_sdpa_would() -> None:
    """Full fine-tuning under autocast: RoPE's float32 cos/sin make q and k float32, v is bfloat16. SDPA would cast
    all three to bfloat16; so does the compiled-backward path, and its output is the flash path's, bit for bit."""
    module, unmarked = torch.nn.Module(), torch.nn.Module()
    for each in (module, unmarked):
        each.num_key_value_groups, each.is_causal = 2, True
    setattr(module, COMPILED_BACKWARD, True)
    tensors, _ = inputs(4, 2, torch.float32)
    tensors[2] = tensors[2].to(torch.bfloat16)
    bounds = torch.tensor([0, *LENGTHS], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    outputs = []
    for each in (module, unmarked):
        q, k, v = (t.clone().requires_grad_() for t in tensors)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs.append(varlen_sdpa_attention(each, q, k, v, None, cu_seq_lens_q=bounds)[0])
    assert "PackedCausalAttentionBackward" in graph_names(outputs[0])
    assert "PackedCausalAttentionBackward" not in graph_names(outputs[1])
    assert torch.equal(outputs[0], outputs[1])

"""Packed causal attention with a compiled backward: the CPU flash kernel forward, a fused backward from its log-sum-exp.

PyTorch's CPU flash-attention backward runs at a fraction of the matrix-product rate at 100–500-token documents
(it was 26% of the compiled SmolLM2 LoRA step, five times its own forward). Here the forward stays that kernel,
once per document (``_scaled_dot_product_flash_attention_for_cpu``, which also returns each query's log-sum-exp),
and the backward is the textbook one written out per document and compiled once with dynamic lengths: the
probabilities are recomputed from the saved log-sum-exp (``exp(q·kᵀ·scale − lse)``, float32, causal), and
inductor fuses that, the ``dP − rowsum(dO∘O)`` correction and the casts into one pass between five bfloat16
batched products. Grouped-query heads share their key/value head through a reshape (heads ``g·i … g·i+g−1``
read key head ``i``, as ``repeat_interleave`` lays them out), so nothing is repeated and the key/value
gradients come out summed over their group.

What autograd keeps is what the flash kernel's own backward keeps (q, k, v, the output, the log-sum-exp): no
document's ``l²`` probabilities outlive its backward. The forward is the same kernel as before, so losses are
bit-identical; the gradients differ from the flash backward's by bfloat16 rounding only (measured against
float64 in benchmarks/packed_attention.py: no larger than the flash backward's own error).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

# Set on an attention module (``self_attn``) when its packed backward is to run compiled (see compile_packed_attention).
COMPILED_BACKWARD = "tunesmith_compiled_attention_backward"

_compiled: Optional[Callable] = None


def document_backward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, output: torch.Tensor,
                      grad_output: torch.Tensor, lse: torch.Tensor, scale: float):
    """Gradients of one document's causal attention from its forward's output and log-sum-exp.

    Args:
        query, output, grad_output: (heads, l, dim).
        key, value: (kv heads, l, dim); ``heads`` is a multiple of ``kv heads``.
        lse: (heads, l) float32, the forward's log-sum-exp of the scaled scores of each query.
        scale: The scores' scale.

    Returns:
        (grad query (heads, l, dim), grad key, grad value (kv heads, l, dim)), in the inputs' dtype.
    """
    kv_heads, length, dim = key.shape
    group = query.shape[0] // kv_heads
    grouped_query = query.reshape(kv_heads, group * length, dim)
    grouped_grad = grad_output.reshape(kv_heads, group * length, dim)
    scores = torch.bmm(grouped_query, key.transpose(1, 2)).float().view(kv_heads, group, length, length)
    positions = torch.arange(length, device=query.device)
    causal = positions[None, :] <= positions[:, None]
    probabilities = torch.where(causal, torch.exp(scores * scale - lse.view(kv_heads, group, length, 1)), 0.0)
    grad_probabilities = torch.bmm(grouped_grad, value.transpose(1, 2)).float().view(kv_heads, group, length, length)
    correction = (grad_output.float() * output.float()).sum(-1).view(kv_heads, group, length, 1)
    grad_scores = (probabilities * (grad_probabilities - correction) * scale).to(query.dtype)
    grad_scores = grad_scores.view(kv_heads, group * length, length)
    grad_query = torch.bmm(grad_scores, key).view(kv_heads * group, length, dim)
    grad_key = torch.bmm(grad_scores.transpose(1, 2), grouped_query)
    grad_value = torch.bmm(probabilities.to(query.dtype).view(kv_heads, group * length, length).transpose(1, 2),
                           grouped_grad)
    return grad_query, grad_key, grad_value


def compiled_document_backward() -> Callable:
    """:func:`document_backward` compiled once per process, lengths dynamic (a length-1 document compiles a second graph)."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(document_backward, dynamic=True)
    return _compiled


class PackedCausalAttention(torch.autograd.Function):
    """Causal attention inside each document of a packed row: flash forward, :func:`document_backward` backward."""

    @staticmethod
    def forward(ctx, query, key, value, lengths: tuple[int, ...], scale: float, backward: Callable):
        outputs, lses = [], []
        for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2)):
            output, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=True,
                                                                                     scale=scale)[:2]
            outputs.append(output)
            lses.append(lse)
        output = torch.cat(outputs, 2)
        ctx.save_for_backward(query, key, value, output, torch.cat(lses, 2))
        ctx.lengths, ctx.scale, ctx.backward = lengths, scale, backward
        return output

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, output, lse = ctx.saved_tensors
        pieces = (tensor[0].split(ctx.lengths, 1) for tensor in (query, key, value, output, grad_output, lse))
        grads = [ctx.backward(*piece, ctx.scale) for piece in zip(*pieces)]
        grad_query, grad_key, grad_value = (torch.cat(column, 1)[None] for column in zip(*grads))
        return grad_query, grad_key, grad_value, None, None, None


def packed_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lengths: list[int],
                            scale: Optional[float] = None, compiled: bool = True) -> torch.Tensor:
    """Causal attention within each document of one packed row.

    Args:
        query: (1, heads, total, dim); key, value: (1, kv heads, total, dim); ``total = sum(lengths)``.
        lengths: The documents' lengths, in order.
        scale: The scores' scale; None: ``dim ** -0.5``.
        compiled: Run the backward through ``torch.compile`` (the measured gain); False: the same maths eagerly.

    Returns:
        (1, heads, total, dim).
    """
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    backward = compiled_document_backward() if compiled else document_backward
    return PackedCausalAttention.apply(query, key, value, tuple(lengths), scale, backward)


def compile_packed_attention(base: torch.nn.Module) -> Callable[[], None]:
    """Mark ``base``'s decoder attention modules so their packed backward runs compiled (with ``train.speed.compile``).

    Returns:
        What takes the marks off again.
    """
    modules = [layer.self_attn for layer in getattr(base.get_decoder(), "layers", ()) if hasattr(layer, "self_attn")]
    for module in modules:
        setattr(module, COMPILED_BACKWARD, True)

    def restore() -> None:
        for module in modules:
            if hasattr(module, COMPILED_BACKWARD):
                delattr(module, COMPILED_BACKWARD)
    return restore

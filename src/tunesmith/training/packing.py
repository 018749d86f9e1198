"""Padding-free packing: a micro-batch's examples in one row, attention kept inside each example.

A packed micro-batch is one row of the concatenated examples (no padding at all) with
``position_ids`` restarting at 0 for every example and ``cu_seq_lens_q``/``cu_seq_lens_k``, the
cumulative example boundaries that transformers' varlen (flash) attention kernels read. On
devices without those kernels we register our own attention implementation with transformers'
:class:`~transformers.AttentionInterface`: it runs PyTorch's scaled-dot-product attention once
per example, so packing costs ``sum(l²)`` attention work instead of ``(sum l)²`` and no example
ever sees another. transformers' own answer on CPU (position ids alone) builds a dense
block-diagonal mask over the whole row and is honoured only with the KV cache off; measured
slower, and easy to lose silently (see docs/speed.md). Under ``train.speed.compile`` (bfloat16, CPU) the same
per-example forward takes a compiled backward instead of flash's (training/packed_attention.py).

The micro-batch still holds exactly the examples the sampler chose, so gradient accumulation,
token normalisation, resuming and DDP are unchanged: only the layout differs.
"""

from __future__ import annotations

import logging

import torch

from tunesmith.data.encode import IGNORE_INDEX, EncodedExample
from tunesmith.models import is_encoder
from tunesmith.training.packed_attention import COMPILED_BACKWARD, packed_causal_attention

logger = logging.getLogger(__name__)

VARLEN_ATTENTION = "tunesmith_varlen_sdpa"


def pack_collate(examples: list[EncodedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Concatenate examples into one padding-free row.

    Args:
        examples: The micro-batch.
        pad_token_id: Unused (nothing is padded); kept for the collate signature.

    Returns:
        ``input_ids``, ``labels``, ``position_ids``, ``attention_mask`` (all ones), each (1, total);
        ``cu_seq_lens_q``/``cu_seq_lens_k`` (examples + 1,) int32 boundaries; ``max_length_q``/``k``.
        The first label of every example is ignored: in a packed row it would be predicted from
        the previous example's last token, and unpacked it is never a target either.
    """
    lengths = [len(example.input_ids) for example in examples]
    input_ids = torch.tensor([token for example in examples for token in example.input_ids], dtype=torch.long)
    labels = torch.tensor([label for example in examples for label in example.labels], dtype=torch.long)
    boundaries = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    labels[boundaries[:-1].long()] = IGNORE_INDEX
    position_ids = torch.cat([torch.arange(length) for length in lengths])
    longest = torch.tensor(max(lengths))
    return {
        "input_ids": input_ids[None],  # (1, total)
        "labels": labels[None],
        "position_ids": position_ids[None],
        # All ones: transformers then skips mask building instead of deriving a dense one from position ids.
        "attention_mask": torch.ones_like(input_ids)[None],
        "cu_seq_lens_q": boundaries,
        "cu_seq_lens_k": boundaries,
        "max_length_q": longest,
        "max_length_k": longest,
    }


def varlen_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask, dropout: float = 0.0, scaling=None, cu_seq_lens_q=None, **kwargs):
    """transformers' SDPA attention, run per example when the batch is packed.

    Without ``cu_seq_lens_q`` (evaluation, generation) it is exactly transformers' ``sdpa``.

    Args:
        query, key, value: (1, heads, total, head_dim) for a packed row.
        cu_seq_lens_q: Cumulative example boundaries (examples + 1,), or None.

    Returns:
        (attention output (batch, total, heads, head_dim), None), as every transformers attention.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    lengths = cu_seq_lens_q.diff().tolist()
    window = kwargs.get("sliding_window")  # Mistral, Gemma 3's local layers, Qwen2 with use_sliding_window
    if compiled_backward_fits(module, (query, key, value), dropout, window, lengths):
        # Autocast casts SDPA's inputs to its dtype (full fine-tuning's float32 RoPE makes q and k float32): the same here.
        query, key, value = (tensor.to(torch.bfloat16) for tensor in (query, key, value))
        output = packed_causal_attention(query, key, value, lengths, scaling)
        return output.transpose(1, 2).contiguous(), None
    # split, not slicing: a slice's backward builds a zero tensor of the whole row per example.
    outputs = []
    for q, k, v in zip(query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2)):
        if window is not None and q.shape[2] > window:
            mask = sliding_window_mask(q.shape[2], window, q.device)
            outputs.append(sdpa_attention_forward(module, q, k, v, mask, dropout=dropout, scaling=scaling,
                                                  is_causal=False)[0])
        else:
            outputs.append(sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling,
                                                  is_causal=True)[0])
    return torch.cat(outputs, dim=1), None


def compiled_backward_fits(module: torch.nn.Module, tensors: tuple[torch.Tensor, ...], dropout: float, window,
                           lengths: list[int]) -> bool:
    """Whether this call takes :func:`packed_causal_attention` (its backward compiled) rather than flash per example.

    Only where it was measured faster (benchmarks/packed_attention.py): training under ``train.speed.compile``
    (the attention module marked by ``compile_packed_attention``), on CPU, in bfloat16 (or under bfloat16
    autocast, which would cast SDPA's inputs), with no dropout and no document longer than a sliding window
    (those keep the windowed mask below).
    """
    bfloat16 = all(tensor.dtype == torch.bfloat16 for tensor in tensors) or (
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
    return (getattr(module, COMPILED_BACKWARD, False) and torch.is_grad_enabled()
            and any(tensor.requires_grad for tensor in tensors) and dropout == 0.0 and bfloat16
            and all(tensor.device.type == "cpu" for tensor in tensors)
            and (window is None or max(lengths) <= window))


def sliding_window_mask(length: int, window: int, device) -> torch.Tensor:
    """(1, 1, length, length) boolean mask: causal, and each query sees its last ``window`` positions only.

    The rule of transformers' ``sliding_window_overlay`` (``kv > q - window``), so a packed example
    attends exactly as it does alone.
    """
    positions = torch.arange(length, device=device)
    query, key = positions[:, None], positions[None, :]
    return ((key <= query) & (key > query - window))[None, None]


def register_varlen_attention() -> None:
    """Make ``VARLEN_ATTENTION`` a valid ``attn_implementation`` (idempotent; transformers' own registry)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN_ATTENTION, torch.compiler.disable(varlen_sdpa_attention))
    if VARLEN_ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(VARLEN_ATTENTION, sdpa_mask)


def enable_packed_attention(base: torch.nn.Module) -> bool:
    """Switch the transformers model ``base`` to attention that honours packed boundaries, if it can.

    Models without SDPA support cannot be packed (nor methods that prepend virtual tokens to every
    row: the method says so, see ``Method.supports_packing``); they keep padding.

    Returns:
        Whether packed batches are now safe for this model.
    """
    if is_encoder(base.config):
        logger.info("packing off: an encoder's attention is bidirectional; the per-example kernels here are causal")
        return False
    current = getattr(base.config, "_attn_implementation", None)
    if current and current.startswith("flash_attention"):
        return True  # flash varlen kernels read cu_seq_lens themselves
    if current != "sdpa" and current != VARLEN_ATTENTION:
        # Gemma 2 runs eager attention for its soft-capped attention logits, which sdpa cannot compute
        logger.info("packing off: the model uses %s attention, not sdpa", current)
        return False
    register_varlen_attention()
    base.set_attn_implementation(VARLEN_ATTENTION)
    return base.config._attn_implementation == VARLEN_ATTENTION


def restore_attention(base: torch.nn.Module) -> None:
    """Back to transformers' own ``sdpa`` (before saving, so no artifact names our implementation)."""
    if getattr(base.config, "_attn_implementation", None) == VARLEN_ATTENTION:
        base.set_attn_implementation("sdpa")

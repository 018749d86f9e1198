"""Log-likelihood of continuations given contexts: the primitive under multiple choice and bias probes.

Tokenisation is explicit and recorded: the context and the continuation are tokenised
separately (no special tokens added) and concatenated, the same way training encodes the
segments of a conversation, so the continuation's tokens do not depend on the context's last
characters. When the context is empty, the tokenizer's BOS token (if any) is the context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

TOKENISATION = ("context and continuation tokenised separately without special tokens, then "
                "concatenated; an empty context becomes the BOS token; over-long inputs lose context "
                "tokens from the left")


@dataclass(frozen=True)
class ContinuationScore:
    """How likely a continuation is after its context.

    Attributes:
        logprob: Sum of the natural-log probabilities of the continuation's tokens.
        num_tokens: Tokens in the continuation.
        num_chars: Characters in the continuation text.
        greedy: Whether every continuation token is the model's arg-max prediction.
    """

    logprob: float
    num_tokens: int
    num_chars: int
    greedy: bool


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (the tokenisation every scorer shares)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def context_ids(tokenizer, context: str, add_bos: bool) -> list[int]:
    """Token ids of a context, with BOS in front when asked (and the tokenizer has one)."""
    ids = encode_text(tokenizer, context)
    if add_bos and tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id, *ids]
    return ids


def max_model_length(model, default: int = 2048) -> int:
    """The longest sequence the model takes (its position embeddings), or ``default``."""
    return int(getattr(model.config, "max_position_embeddings", None) or default)


@torch.no_grad()
def score_continuations(model, tokenizer, requests: Sequence[tuple[str, str]], batch_size: int = 16,
                        add_bos: bool = True) -> list[ContinuationScore]:
    """Score each ``(context, continuation)`` pair by the model's log-likelihood.

    Args:
        model: A causal language model (in eval mode).
        tokenizer: Its tokenizer.
        requests: Pairs of context text and continuation text; a continuation must not be empty.
        batch_size: Sequences per forward pass (right padded).
        add_bos: Put the BOS token before each context (use False when a chat template adds it).

    Returns:
        One :class:`ContinuationScore` per request, in order.

    Raises:
        ValueError: If a continuation tokenises to nothing.
    """
    encoded = []
    for context, continuation in requests:
        target = encode_text(tokenizer, continuation)
        if not target:
            raise ValueError(f"continuation {continuation!r} has no tokens")
        prefix = context_ids(tokenizer, context, add_bos)
        if not prefix:  # the first target token needs something to be predicted from
            prefix = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
        encoded.append((prefix, target, len(continuation)))
    return score_token_requests(model, encoded, batch_size, tokenizer.pad_token_id or 0)


@torch.no_grad()
def score_token_requests(model, encoded: Sequence[tuple[list[int], list[int], int]], batch_size: int,
                         pad_token_id: int) -> list[ContinuationScore]:
    """Score already tokenised ``(context_ids, continuation_ids, num_chars)`` triples."""
    limit = max_model_length(model)
    device = next(model.parameters()).device
    # Longest first, so each batch holds similar lengths and little padding; order restored at the end.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]) - len(encoded[i][1]))
    scores: dict[int, ContinuationScore] = {}
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        chunk = [encoded[i] for i in indices]
        sequences = [(prefix + target)[-limit:] for prefix, target, _ in chunk]
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
            attention_mask[row, : len(sequence)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # (batch, seq, vocab)
        for row, (index, (_, target, num_chars), sequence) in enumerate(zip(indices, chunk, sequences)):
            end = len(sequence)
            positions = torch.arange(end - len(target) - 1, end - 1, device=logprobs.device)
            target_ids = torch.tensor(target, device=logprobs.device)
            token_logprobs = logprobs[row, positions].gather(-1, target_ids[:, None]).squeeze(-1)
            greedy = bool((logprobs[row, positions].argmax(-1) == target_ids).all())
            scores[index] = ContinuationScore(float(token_logprobs.sum()), len(target), num_chars, greedy)
    return [scores[i] for i in range(len(encoded))]

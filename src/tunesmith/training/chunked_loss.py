"""Losses for the loop's ``loss_fn`` seam that pass packed layouts through and can skip the full logits.

The plain loss builds (tokens × vocabulary) logits: 8 × 512 tokens × 32,000 words is 0.5 GB in
float32, and as much again for its gradient. :func:`chunked_loss_sum` instead takes the final
hidden states, keeps only the positions that are scored, and runs the output head and the
cross-entropy chunk by chunk under activation checkpointing, so one chunk of logits exists at a
time (recomputed in the backward pass). Same maths, same gradients; the head also does no work
for masked positions (prompts, padding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tunesmith.data.encode import IGNORE_INDEX


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Everything in a collated batch the model reads (packed batches add positions and boundaries)."""
    return {key: value for key, value in batch.items() if key != "labels"}


def plain_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy from the full logits (the reference the chunked loss must equal)."""
    input_ids = batch["input_ids"]
    logits = model(**model_inputs(batch), use_cache=False).logits[:, -input_ids.shape[1]:]  # (batch, seq, vocab)
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), batch["labels"][:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int = 1024) -> torch.Tensor:
    """Summed next-token cross-entropy without ever holding the logits of more than ``chunk_tokens``.

    The model is called through its own forward (not its decoder alone) so DDP's gradient hooks and
    peft's wrappers see a normal call; ``logits_to_keep=1`` makes that forward's own logits one
    position per row, and the last hidden state (after the final norm) feeds the chunks.

    Args:
        model: A causal LM (possibly peft- or DDP-wrapped) whose forward takes ``logits_to_keep``.
        batch: ``input_ids``, ``labels`` and whatever else the model reads.
        chunk_tokens: Scored positions per chunk.

    Returns:
        The summed loss (a float32 scalar).
    """
    input_ids = batch["input_ids"]
    output = model(**model_inputs(batch), use_cache=False, output_hidden_states=True, logits_to_keep=1)
    hidden = output.hidden_states[-1][:, -input_ids.shape[1]:]  # (batch, seq, hidden)
    labels = batch["labels"][:, 1:]
    scored = labels != IGNORE_INDEX
    scored_hidden = hidden[:, :-1][scored]  # (targets, hidden)
    targets = labels[scored]  # (targets,)
    head = unwrap(model).get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.shape[0], chunk_tokens):
        total = total + checkpoint(_head_cross_entropy_sum, head, scored_hidden[start:start + chunk_tokens],
                                   targets[start:start + chunk_tokens], use_reentrant=False)
    return total


def _head_cross_entropy_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()  # (chunk, vocab)
    return F.cross_entropy(logits, targets, reduction="sum")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (peft wrappers delegate what we need)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model

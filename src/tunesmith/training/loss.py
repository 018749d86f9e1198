"""The causal language-modelling loss, summed over target tokens.

Summing (rather than averaging) per micro-batch lets the loop divide by the target tokens of the
whole optimizer step, so gradient accumulation and several processes give exactly the update of
one large batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunesmith.data.encode import IGNORE_INDEX


def count_target_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that are predicted and scored (labels shifted by one, ignoring -100)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def count_real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the model actually reads: padding excluded (a packed row has none)."""
    return int(batch["attention_mask"].sum())


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Everything in a collated batch the model reads (packed batches add positions and boundaries)."""
    return {key: value for key, value in batch.items() if key != "labels"}


def loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the next-token cross-entropy over the batch's target tokens (a scalar), from the full logits.

    The one plain summed loss: training without the chunked loss, validation and EWC's Fisher all call it
    (the chunked and fused losses of :mod:`tunesmith.training.chunked_loss` are tested against it).
    """
    # One logit row per input token: methods that prepend virtual tokens trim theirs (VirtualTokenModel).
    logits = model(**model_inputs(batch), use_cache=False).logits  # (batch, seq, vocab)
    shifted_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    shifted_labels = batch["labels"][:, 1:].reshape(-1)
    return F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX, reduction="sum")

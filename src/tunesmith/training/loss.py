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


def loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the next-token cross-entropy over the batch's target tokens (a scalar)."""
    # One logit row per input token: methods that prepend virtual tokens trim theirs (VirtualTokenModel).
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (batch, seq, vocab)
    shifted_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    shifted_labels = batch["labels"][:, 1:].reshape(-1)
    return F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX, reduction="sum")

"""The maths of group-relative policy optimisation, on tensors: advantages, KL, clipped ratio, averaging.

Written here rather than taken from TRL because TRL computes them inside its trainers' methods
(``GRPOTrainer._compute_loss``, ``RLOOTrainer._generate_and_score_completions``), which need its
whole ``Trainer``; ``tests/test_grpo_loss.py`` checks every function against TRL's own code on the
same log-probabilities and rewards.

Shapes: ``N`` completions (prompts x group size, grouped consecutively), ``T`` completion positions.
References: GRPO, Shao et al. 2024 (https://arxiv.org/abs/2402.03300); Dr. GRPO, Liu et al. 2025
(https://arxiv.org/abs/2503.20783); DAPO, Yu et al. 2025 (https://arxiv.org/abs/2503.14476); RLOO,
Ahmadian et al. 2024 (https://arxiv.org/abs/2402.14740).
"""

from __future__ import annotations

import torch

STD_FLOOR = 1e-4  # added to the std before dividing, as TRL


def sample_std(values: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Unbiased standard deviation (divides by n - 1), as ``trl.trainer.utils.nanstd`` without NaNs."""
    return values.std(dim=dim, keepdim=keepdim) if dim is not None else values.std()


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """GRPO's advantages: each reward minus its group's mean, divided by a std (group, batch or none).

    Args:
        rewards: (N,) summed weighted rewards, ``group_size`` consecutive completions per prompt.
        scale: ``group`` (the group's std), ``batch`` (the std of all N) or ``none`` (Dr. GRPO).

    Returns:
        (N,) advantages.
    """
    grouped = rewards.view(-1, group_size)  # (prompts, G)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale == "group":
        return advantages / (sample_std(grouped, dim=1).repeat_interleave(group_size) + STD_FLOOR)
    if scale == "batch":
        return advantages / (sample_std(rewards) + STD_FLOOR)
    return advantages


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int, normalise: bool = False) -> torch.Tensor:
    """RLOO's advantages: each reward minus the mean of the other ``group_size - 1`` rewards of its group.

    Args:
        rewards: (N,) rewards (with the KL penalty already subtracted, see :func:`sequence_kl`).
        normalise: Standardise the advantages over the batch afterwards.
    """
    grouped = rewards.view(-1, group_size)  # (prompts, G)
    baselines = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    advantages = (grouped - baselines).reshape(-1)
    if normalise:
        advantages = (advantages - advantages.mean()) / (sample_std(advantages) + STD_FLOOR)
    return advantages


def token_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL to the reference, the k3 estimator exp(r - p) - (r - p) - 1 >= 0 (Schulman), (N, T)."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def sequence_kl(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RLOO's KL of each sequence: the first-order log ratio summed over its tokens, (N,)."""
    return ((logps - ref_logps) * mask).sum(dim=-1)


def clipped_token_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                       epsilon_low: float, epsilon_high: float) -> torch.Tensor:
    """PPO's clipped surrogate per token, -min(ratio * A, clip(ratio) * A), (N, T).

    With one optimizer step per generation ``old_logps`` is ``logps.detach()``: the ratio is 1 and
    the gradient is that of ``A * log p`` (the clipping acts only when generations are reused).
    """
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    advantages = advantages.unsqueeze(1)  # (N, 1)
    return -torch.min(ratio * advantages, clipped * advantages)


def clipped_sequence_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                          mask: torch.Tensor, epsilon_low: float, epsilon_high: float) -> torch.Tensor:
    """RLOO's clipped surrogate on whole-sequence log-probabilities, (N,)."""
    ratio = torch.exp(((logps - old_logps) * mask).sum(dim=-1))
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    return -torch.min(ratio * advantages, clipped * advantages)


def summed_token_loss(per_token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """The batch's loss summed over the units of ``loss_type`` (:func:`loss_units` counts them).

    - ``grpo``: each sequence's mean token loss, summed over sequences (units: sequences);
    - ``dr_grpo`` and ``dapo``: token losses summed (units: sequences x max_new_tokens, or tokens).

    Dividing by the units of the global batch gives TRL's loss for that type.
    """
    masked = per_token_loss * mask
    if loss_type == "grpo":
        return (masked.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)).sum()
    return masked.sum()


def loss_units(mask: torch.Tensor, loss_type: str, max_new_tokens: int) -> int:
    """What the loss of ``loss_type`` is averaged over: sequences, sequences x max_new_tokens, or tokens."""
    if loss_type == "dr_grpo":
        return mask.shape[0] * max_new_tokens
    if loss_type == "dapo":
        return int(mask.sum())  # every completion has at least one token (its first, maybe EOS)
    return mask.shape[0]

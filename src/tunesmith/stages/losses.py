"""The judgement losses as plain functions of per-sequence numbers, one value per pair (or example).

They are written out here rather than called from TRL because TRL computes them inside its
trainers (``DPOTrainer._compute_loss`` and friends), not as functions of tensors; the tests check
every one against TRL's own computation on the same tokens. Each returns the per-pair loss; the
stage sums it over the pairs of a batch (the loop divides by the pairs of the global batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Pairwise reward-model loss ``-log sigmoid(r_c - r_r - margin)`` (Llama 2's margin variant)."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards - margin)


def dpo(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
        reference_rejected: torch.Tensor, chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor,
        loss: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO and its variants from summed reply log-probabilities.

    ``delta = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r))``;
    sigmoid (https://arxiv.org/abs/2305.18290; conservative DPO with ``label_smoothing``):
    ``-(1-e) log s(b delta) - e log s(-b delta)``; hinge (SLiC, https://arxiv.org/abs/2305.10425):
    ``relu(1 - b delta)``; ipo (https://arxiv.org/abs/2310.12036, with the log-ratios averaged per
    reply token as TRL and the IPO authors do): ``(delta_avg - 1/(2b))^2``; robust (rDPO,
    https://arxiv.org/abs/2403.00409): ``(-(1-e) log s(b delta) + e log s(-b delta)) / (1-2e)``.
    """
    chosen_ratio, rejected_ratio = policy_chosen - reference_chosen, policy_rejected - reference_rejected
    delta = chosen_ratio - rejected_ratio
    if loss == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    if loss == "hinge":
        return torch.relu(1 - beta * delta)
    if loss == "ipo":
        average = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        return (average - 1 / (2 * beta)) ** 2
    if loss == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta)
        return (clean - flipped) / (1 - 2 * label_smoothing)
    raise ValueError(f"unknown DPO loss {loss!r}")


def orpo(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, chosen_tokens: torch.Tensor,
         rejected_tokens: torch.Tensor, beta: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """ORPO (https://arxiv.org/abs/2403.07691): per-pair ``NLL(chosen) - beta * log s(log-odds ratio)``.

    The NLL is the chosen reply's mean per token (TRL's ORPOTrainer scores the prompt tokens too and
    averages over the batch's tokens; we train the reply as SFT does, per pair so that accumulation
    equals one large batch); the odds use mean per-token log-probabilities, as TRL's.

    Returns:
        The per-pair loss and the per-pair log-odds ratio (for metrics).
    """
    chosen_mean = chosen_logps / chosen_tokens.clamp(min=1)
    rejected_mean = rejected_logps / rejected_tokens.clamp(min=1)
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))  # log(p / (1 - p))
    return -chosen_mean - beta * F.logsigmoid(log_odds), log_odds


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, branching at -ln 2 to avoid cancellation (Maechler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def simpo(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, chosen_tokens: torch.Tensor,
          rejected_tokens: torch.Tensor, beta: float = 2.0, gamma: float = 0.5,
          label_smoothing: float = 0.0) -> torch.Tensor:
    """SimPO (https://arxiv.org/abs/2405.14734): ``-log s(b (avg_c - avg_r) - gamma)``, smoothed as DPO."""
    margin = chosen_logps / chosen_tokens.clamp(min=1) - rejected_logps / rejected_tokens.clamp(min=1)
    logits = margin - gamma / beta
    return -(1 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(-beta * logits)


def kto(policy_logps: torch.Tensor, reference_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
        beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """KTO (https://arxiv.org/abs/2402.01306): ``w (1 - s(b (ratio - z)))`` for desirable replies,
    ``w (1 - s(b (z - ratio)))`` for undesirable ones, ``z`` the batch's detached KL estimate (>= 0)."""
    ratio = policy_logps - reference_logps
    good = desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio)))
    return torch.where(desirable, good, bad)

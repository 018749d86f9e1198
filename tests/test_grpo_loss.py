"""The GRPO/Dr. GRPO/DAPO losses and the RLOO baseline against TRL's own code, and hand-computed values.

TRL computes its losses inside ``GRPOTrainer._compute_loss`` and ``RLOOTrainer._compute_loss``; those
methods are called here unbound, on a stand-in for the trainer that hands them our log-probabilities,
so the comparison runs TRL's real code on the same tensors. Its advantages are computed inline in a
long method; the formulas are restated below with TRL's own ``nanstd``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tunesmith.stages import policy_loss as pl

trl = pytest.importorskip("trl")
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402
from trl.trainer.rloo_trainer import RLOOTrainer  # noqa: E402
from trl.trainer.utils import nanstd  # noqa: E402

N, T, GROUP, MAX_NEW = 8, 6, 4, 6
EPS, EPS_HIGH, BETA = 0.2, 0.28, 0.04


def fake_inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logps = (-torch.rand(N, T, generator=generator) * 3).requires_grad_(True)
    old = (logps.detach() + 0.3 * torch.randn(N, T, generator=generator))  # ratios far from 1: clipping acts
    ref = logps.detach() + 0.5 * torch.randn(N, T, generator=generator)
    lengths = torch.tensor([6, 3, 1, 5, 6, 2, 4, 6])
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    advantages = torch.randn(N, generator=generator)
    return logps, old, ref, mask, advantages


def identity_accelerator():
    return SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction="sum": x,
                           gather_for_metrics=lambda x: x)


def trl_grpo_loss(loss_type, logps, old, ref, mask, advantages, accumulation=1, num_items=None, beta=BETA,
                  epsilon=EPS, epsilon_high=EPS_HIGH, max_new=MAX_NEW):
    """TRL's GRPOTrainer._compute_loss on our tensors (one micro-batch of an accumulation window)."""
    T = mask.shape[1]  # noqa: N806
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type=loss_type, epsilon_low=epsilon,
        epsilon_high=epsilon_high, use_vllm=False, vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=accumulation,
        max_completion_length=max_new,
        accelerator=identity_accelerator(), _entropy_bonus_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=accumulation),
    )
    rows = mask.shape[0]
    inputs = {"prompt_ids": torch.zeros(rows, 2, dtype=torch.long), "prompt_mask": torch.ones(rows, 2, dtype=torch.long),
              "completion_ids": torch.zeros(rows, T, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": torch.tensor(float(num_items if num_items is not None else mask.sum()))}
    return GRPOTrainer._compute_loss(trainer, None, inputs)


def our_loss(loss_type, logps, old, ref, mask, advantages):
    per_token = pl.clipped_token_loss(logps, old, advantages, EPS, EPS_HIGH) + BETA * pl.token_kl(logps, ref)
    return pl.summed_token_loss(per_token, mask, loss_type), pl.loss_units(mask, loss_type, MAX_NEW)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_loss_types_equal_trl_loss_and_gradient(loss_type):
    logps, old, ref, mask, advantages = fake_inputs()
    expected = trl_grpo_loss(loss_type, logps, old, ref, mask, advantages)
    (expected_grad,) = torch.autograd.grad(expected, logps)
    summed, units = our_loss(loss_type, logps, old, ref, mask, advantages)
    (grad,) = torch.autograd.grad(summed / units, logps)
    assert float(summed.detach() / units) == pytest.approx(float(expected.detach()), rel=1e-6)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_two_micro_batches_give_trl_accumulated_loss(loss_type):
    """Summing over micro-batches and dividing by the global units equals TRL's accumulation window."""
    logps, old, ref, mask, advantages = fake_inputs(1)
    halves = [slice(0, N // 2), slice(N // 2, N)]
    expected = sum(float(trl_grpo_loss(loss_type, logps[h], old[h], ref[h], mask[h], advantages[h], accumulation=2,
                                       num_items=mask.sum())) for h in halves)
    parts = [our_loss(loss_type, logps[h], old[h], ref[h], mask[h], advantages[h]) for h in halves]
    assert sum(float(s) for s, _ in parts) / sum(u for _, u in parts) == pytest.approx(expected, rel=1e-6)


def test_rloo_loss_equals_trl():
    logps, old, ref, mask, advantages = fake_inputs(2)
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        aux_loss_enabled=False, epsilon_low=EPS, epsilon_high=EPS_HIGH, model=SimpleNamespace(training=True),
        accelerator=identity_accelerator(), _metrics=defaultdict(lambda: defaultdict(list)),
    )
    old_logps = (old * mask).sum(1)
    inputs = {"prompt_ids": torch.zeros(N, 2, dtype=torch.long), "prompt_mask": torch.ones(N, 2, dtype=torch.long),
              "completion_ids": torch.zeros(N, T, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_logps": old_logps}
    expected = RLOOTrainer._compute_loss(trainer, None, inputs)
    ours = pl.clipped_sequence_loss(logps, old, advantages, mask, EPS, EPS_HIGH).sum() / pl.loss_units(mask, "grpo", T)
    assert float(ours) == pytest.approx(float(expected.detach()), rel=1e-6)


def trl_group_advantages(rewards, scale):
    """TRL GRPOTrainer's sum_then_normalize advantages (grpo_trainer.py, _generate_and_score_completions)."""
    mean = torch.nanmean(rewards.view(-1, GROUP), dim=1).repeat_interleave(GROUP, dim=0)
    std = nanstd(rewards.view(-1, GROUP), dim=1).repeat_interleave(GROUP, dim=0) if scale != "batch" \
        else nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean
    return advantages / (std + 1e-4) if scale != "none" else advantages


def trl_rloo_advantages(rewards, normalise):
    """TRL RLOOTrainer's leave-one-out advantages (rloo_trainer.py, _generate_and_score_completions)."""
    grouped = rewards.view(-1, GROUP)
    baselines = ((grouped.nansum(dim=1, keepdim=True) - grouped) / (GROUP - 1)).view(-1)
    advantages = rewards - baselines
    return (advantages - advantages.nanmean()) / (nanstd(advantages) + 1e-4) if normalise else advantages


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_equal_trl(scale):
    rewards = torch.randn(3 * GROUP, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(pl.group_advantages(rewards, GROUP, scale), trl_group_advantages(rewards, scale))


@pytest.mark.parametrize("normalise", [False, True])
def test_leave_one_out_advantages_equal_trl(normalise):
    rewards = torch.randn(3 * GROUP, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(pl.leave_one_out_advantages(rewards, GROUP, normalise),
                               trl_rloo_advantages(rewards, normalise))


def test_advantages_and_kl_by_hand():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])  # mean 0.75, unbiased std 0.5
    expected = torch.tensor([0.25, -0.75, 0.25, 0.25]) / (0.5 + 1e-4)
    torch.testing.assert_close(pl.group_advantages(rewards, 4), expected)
    torch.testing.assert_close(pl.group_advantages(rewards, 4, "none"), torch.tensor([0.25, -0.75, 0.25, 0.25]))
    # leave-one-out: r_i minus the mean of the other three
    torch.testing.assert_close(pl.leave_one_out_advantages(rewards, 4), torch.tensor([1 / 3, -1.0, 1 / 3, 1 / 3]))
    # k3 KL: exp(ref - p) - (ref - p) - 1, with p = -1, ref = -2: e^-1 + 1 - 1
    kl = pl.token_kl(torch.tensor([[-1.0, -0.5]]), torch.tensor([[-2.0, -0.5]]))
    torch.testing.assert_close(kl, torch.tensor([[math.exp(-1), 0.0]]))
    # RLOO's sequence KL: the log ratio summed over unmasked tokens
    seq = pl.sequence_kl(torch.tensor([[-1.0, -1.0, -9.0]]), torch.tensor([[-2.0, -1.5, 0.0]]), torch.tensor([[1, 1, 0]]))
    torch.testing.assert_close(seq, torch.tensor([1.5]))


def test_ratio_of_one_gives_the_policy_gradient():
    """With old = current (one step per generation) the loss is -A per token and its gradient is -A."""
    logps = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss = pl.clipped_token_loss(logps, logps.detach(), torch.tensor([0.7]), EPS, EPS)
    loss.sum().backward()
    torch.testing.assert_close(loss.detach(), torch.tensor([[-0.7, -0.7]]))
    torch.testing.assert_close(logps.grad, torch.tensor([[-0.7, -0.7]]))

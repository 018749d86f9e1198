"""``stage: dpo``: direct preference optimisation (sigmoid, ipo, hinge, robust) against the frozen base.

The reference is the base model: for adapter methods the trained model with its adapter switched
off (one copy of the weights), for full and partial fine-tuning a frozen copy taken before the
first step. Metrics are TRL's: the implicit rewards ``beta * (log pi - log ref)`` of each reply,
their margin, and the share of pairs where the chosen reply's reward is higher (accuracy).
"""

from __future__ import annotations

import torch
from torch import nn

from tunesmith.data.encode import EncodedExample
from tunesmith.data.preference import PREFERENCE_LAYOUT, EncodedPair, encode_pairs
from tunesmith.stages.base import STAGES
from tunesmith.stages.losses import dpo
from tunesmith.stages.pairs import PairValues, ReferenceObjective, ReferenceStage, split_pairs
from tunesmith.stages.scoring import reply_logps


class DpoObjective(ReferenceObjective):
    """The DPO loss of each pair from policy and reference log-probabilities of both replies."""

    def sequences(self, examples: list[EncodedPair]) -> list[EncodedExample]:
        return [pair.chosen for pair in examples] + [pair.rejected for pair in examples]

    def per_pair(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> PairValues:
        logps, tokens = reply_logps(model, batch)
        reference_logps = self.reference_logps(model, batch)
        (chosen, rejected), (ref_chosen, ref_rejected) = split_pairs(logps), split_pairs(reference_logps)
        chosen_tokens, rejected_tokens = split_pairs(tokens)
        config = self.config
        loss = dpo(chosen, rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens, config.loss,
                   config.beta, config.label_smoothing)
        return loss, preference_metrics(config.beta * (chosen - ref_chosen).detach(),
                                        config.beta * (rejected - ref_rejected).detach())


def preference_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-pair accuracy (chosen reward higher), margin, and the two rewards (as TRL logs them)."""
    return {"accuracy": (chosen_rewards > rejected_rewards).float(), "margin": chosen_rewards - rejected_rewards,
            "chosen_reward": chosen_rewards, "rejected_reward": rejected_rewards}


@STAGES.register_kind
class DirectPreference(ReferenceStage):
    """Preference pairs; loss ``stage.loss`` with ``stage.beta`` and ``stage.label_smoothing``."""

    kind = "dpo"
    objective_class = DpoObjective
    encode = staticmethod(encode_pairs)
    layout = PREFERENCE_LAYOUT

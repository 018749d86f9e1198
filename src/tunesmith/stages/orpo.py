"""``stage: orpo`` and ``stage: simpo``: preference losses without a reference model.

Both score replies by their mean per-token log-probability. ORPO adds the chosen reply's NLL (it
needs no SFT stage first); SimPO asks for a margin ``gamma`` between the scaled averages.
Metrics: the rewards ``beta * mean log p`` of each reply, their margin and the preference accuracy.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tunesmith.config import DataSection
from tunesmith.data.encoded import EncodedData
from tunesmith.data.preference import PREFERENCE_LAYOUT, encode_judged, encode_pairs
from tunesmith.stages.base import STAGES, Stage
from tunesmith.stages.dpo import preference_metrics
from tunesmith.stages.losses import orpo, simpo
from tunesmith.stages.pairs import PairObjective, PairValues, split_pairs
from tunesmith.stages.scoring import reply_logps
from tunesmith.training.speed import SpeedSetup


class ReferenceFreeObjective(PairObjective):
    """ORPO's or SimPO's loss per pair, from the policy's summed reply log-probabilities alone."""

    def __init__(self, speed: SpeedSetup, config) -> None:
        super().__init__(speed)
        self.config = config

    def per_pair(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> PairValues:
        logps, tokens = reply_logps(model, batch)
        (chosen, rejected), (chosen_tokens, rejected_tokens) = split_pairs(logps), split_pairs(tokens)
        config = self.config
        metrics = {}
        if config.kind == "orpo":
            loss, log_odds = orpo(chosen, rejected, chosen_tokens, rejected_tokens, config.beta)
            metrics["log_odds"] = log_odds.detach()
        else:
            loss = simpo(chosen, rejected, chosen_tokens, rejected_tokens, config.beta, config.gamma,
                         config.label_smoothing)
        rewards = config.beta * (chosen / chosen_tokens.clamp(min=1)), config.beta * (rejected / rejected_tokens.clamp(min=1))
        return loss, {**preference_metrics(rewards[0].detach(), rewards[1].detach()), **metrics}


class ReferenceFreePreference(Stage):
    """Preference pairs, no reference model."""

    def encode_data(self, section: DataSection, tokenizer, seed: int, cache: Path) -> EncodedData:
        return encode_judged(section, tokenizer, seed, self.kind, PREFERENCE_LAYOUT, encode_pairs)

    def objective(self, speed: SpeedSetup) -> ReferenceFreeObjective:
        return ReferenceFreeObjective(speed, self.config)


@STAGES.register_kind
class OddsRatioPreference(ReferenceFreePreference):
    """ORPO: NLL of the chosen reply plus ``beta`` times the odds-ratio term."""

    kind = "orpo"


@STAGES.register_kind
class SimplePreference(ReferenceFreePreference):
    """SimPO: ``-log sigmoid(beta * (avg_c - avg_r) - gamma)``."""

    kind = "simpo"

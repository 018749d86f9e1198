"""Recipe sections of the training stages, one per ``stage.kind``.

A stage says what a batch is and how its loss and metrics are computed (supervised tuning's token
cross-entropy; pairwise, preference and policy-gradient losses next). Adding a stage adds its
section here and an implementation registered under the same ``kind`` in :mod:`tunesmith.stages`.
``stage: sft`` in a recipe is short for ``stage: {kind: sft}``.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import Field, model_validator

from tunesmith.config.base import Section
from tunesmith.config.rewards import RewardSection


class SftStage(Section):
    """Supervised fine-tuning: next-token cross-entropy on the trained tokens (data.train_on)."""

    kind: Literal["sft"] = "sft"


class GrpoStage(Section):
    """Online RL: a group of sampled completions per prompt, scored, group-relative advantages, clipped ratio.

    ``train.batch_size`` counts prompts; each micro-batch holds ``group_size`` completions of each.
    See docs/rl.md for the formulas and how they match TRL's GRPOTrainer and RLOOTrainer.
    """

    kind: Literal["grpo"] = "grpo"
    rewards: tuple[RewardSection, ...] = Field(
        ..., min_length=1, description="Rewards summed with their weights (at least one): exact_match, answer_match, "
        "format, length, function (module:function) or model (a reward-model folder)."
    )
    group_size: int = Field(4, ge=2, description="Completions sampled per prompt (G).")
    max_new_tokens: int = Field(64, ge=1, description="Longest completion (tokens).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (log-probabilities use it too, as TRL).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold (1: off).")
    top_k: int = Field(0, ge=0, description="Sample among the k likeliest tokens (0: off).")
    estimator: Literal["grpo", "rloo"] = Field(
        "grpo", description="grpo: group mean (and std) baseline, per-token loss with KL in the loss; rloo: "
        "leave-one-out baseline, sequence-level ratio, KL subtracted from the reward (TRL's RLOOTrainer)."
    )
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = Field(
        "grpo", description="How token losses are averaged (grpo estimator): per sequence then over sequences "
        "(grpo), over sequences x max_new_tokens (dr_grpo), over every completion token of the step (dapo)."
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Divide advantages by the reward std of the group, of the batch, or not (Dr. GRPO: none)."
    )
    normalize_advantages: bool = Field(False, description="rloo: standardise the advantages over the batch.")
    beta: float = Field(0.04, ge=0, description="KL coefficient to the reference (the model before training; 0: none).")
    epsilon: float = Field(0.2, gt=0, description="Lower clipping range of the policy ratio.")
    epsilon_high: Optional[float] = Field(None, gt=0, description="Upper clipping range (default epsilon; DAPO: 0.28).")

    @model_validator(mode="after")
    def _loss_type_of_grpo(self) -> "GrpoStage":
        if self.estimator == "rloo" and self.loss_type != "grpo":
            raise ValueError("loss_type applies to estimator grpo; rloo averages sequence losses (leave it at grpo)")
        return self


StageSection = Annotated[Union[SftStage, GrpoStage], Field(discriminator="kind")]

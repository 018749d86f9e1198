"""Recipe sections of the training stages, one per ``stage.kind``.

A stage says what a batch is and how its loss and metrics are computed (supervised tuning's token
cross-entropy; pairwise, preference and classification losses). Adding a stage adds its section
here and an implementation registered under the same ``kind`` in :mod:`tunesmith.stages`.
``stage: sft`` in a recipe is short for ``stage: {kind: sft}``.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import Field, model_validator

from tunesmith.config.base import Section
from tunesmith.config.rewards import RewardSection

ZERO_SHOT_PROMPT = "{text}\nQuestion: is this {labels}?\nAnswer:"


class SftStage(Section):
    """Supervised fine-tuning: next-token cross-entropy on the trained tokens (data.train_on)."""

    kind: Literal["sft"] = "sft"


class PtStage(Section):
    """Continued pre-training: plain text, no template, loss on every token, long texts cut into blocks."""

    kind: Literal["pt"] = "pt"


class RmStage(Section):
    """Reward model: a scalar head on the model, pairwise Bradley-Terry loss on chosen/rejected replies."""

    kind: Literal["rm"] = "rm"
    margin: float = Field(
        0.0, ge=0.0, description="Required gap r(chosen) - r(rejected): loss -log sigmoid(r_c - r_r - margin)."
    )


class DpoStage(Section):
    """Direct preference optimisation against the frozen reference (the base; the adapter off for PEFT)."""

    kind: Literal["dpo"] = "dpo"
    loss: Literal["sigmoid", "ipo", "hinge", "robust"] = Field(
        "sigmoid", description="sigmoid (DPO), ipo (squared, length-normalised), hinge (SLiC), robust (rDPO)."
    )
    beta: float = Field(0.1, gt=0.0, description="Strength of the pull towards the reference (IPO's tau).")
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="Assumed share of flipped labels (conservative DPO for sigmoid, rDPO for robust)."
    )
    precompute_reference: bool = Field(
        False, description="Compute the frozen reference's log-probabilities of every training and validation "
        "sequence once before the first step (kept in the run folder for resume); training then runs no reference "
        "forward."
    )


class OrpoStage(Section):
    """ORPO: the chosen reply's NLL plus an odds-ratio preference term; no reference model."""

    kind: Literal["orpo"] = "orpo"
    beta: float = Field(0.1, gt=0.0, description="Weight of the odds-ratio term (the paper's lambda).")


class SimpoStage(Section):
    """SimPO: length-normalised log-probability margin with a target gap; no reference model."""

    kind: Literal["simpo"] = "simpo"
    beta: float = Field(2.0, gt=0.0, description="Scale of the average log-probability reward.")
    gamma: float = Field(0.5, ge=0.0, description="Target reward margin (TRL's simpo_gamma).")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="Assumed share of flipped labels.")


class KtoStage(Section):
    """KTO: single replies labelled desirable or undesirable, against the frozen reference."""

    kind: Literal["kto"] = "kto"
    beta: float = Field(0.1, gt=0.0, description="Strength of the pull towards the reference.")
    desirable_weight: float = Field(1.0, gt=0.0, description="Weight of the desirable examples' loss.")
    undesirable_weight: float = Field(1.0, gt=0.0, description="Weight of the undesirable examples' loss.")
    precompute_reference: bool = Field(
        False, description="Compute the frozen reference's log-probabilities of every training and validation "
        "sequence once before the first step (kept in the run folder for resume); training then runs no reference "
        "forward."
    )


class ClsStage(Section):
    """Sequence classification: a label head on a decoder's last real token or an encoder's mean hidden state,
    cross-entropy over labels; before training, the base decoder's zero-shot label-word accuracy as a baseline."""

    kind: Literal["cls"] = "cls"
    text_field: str = Field("sentence", description="Field holding the text to classify.")
    label_field: str = Field("label", description="Field holding the label.")
    labels: Optional[tuple[str, ...]] = Field(
        None, description="The label set in head order; default: the labels of the training data, sorted."
    )
    zero_shot: bool = Field(
        True, description="Before training, score each label word after zero_shot_prompt with the base causal LM "
        "on the validation split and report zero_shot_accuracy (decoders only; needs label words)."
    )
    label_words: Optional[tuple[str, ...]] = Field(
        None, description="One word per label, in head order (e.g. [negative, positive]), for the zero-shot "
        "baseline; default: the label names when every one contains a letter."
    )
    zero_shot_prompt: str = Field(
        ZERO_SHOT_PROMPT, description="Prompt of the zero-shot baseline: {text} is the text, {labels} the label "
        "words joined by 'or'; the label word follows it after a space."
    )

    @model_validator(mode="after")
    def _prompt_has_the_text(self) -> "ClsStage":
        if "{text}" not in self.zero_shot_prompt:
            raise ValueError("zero_shot_prompt must contain {text}, where the text to classify goes")
        try:
            self.zero_shot_prompt.format(text="", labels="")
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(f"zero_shot_prompt may only use the placeholders {{text}} and {{labels}} ({error})") \
                from None
        if self.labels is not None and self.label_words is not None and len(self.labels) != len(self.label_words):
            raise ValueError(f"label_words has {len(self.label_words)} words for {len(self.labels)} labels")
        return self


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
    num_iterations: int = Field(
        1, ge=1, description="Optimizer steps per batch of rollouts (GRPO's mu, TRL's num_iterations): the "
        "completions are sampled once and trained on this many times, so the clipping ranges act; an epoch "
        "takes this many times as many steps."
    )

    @model_validator(mode="after")
    def _loss_type_of_grpo(self) -> "GrpoStage":
        if self.estimator == "rloo" and self.loss_type != "grpo":
            raise ValueError("loss_type applies to estimator grpo; rloo averages sequence losses (leave it at grpo)")
        return self



StageSection = Annotated[
    Union[SftStage, PtStage, RmStage, DpoStage, OrpoStage, SimpoStage, KtoStage, ClsStage, GrpoStage],
    Field(discriminator="kind"),
]

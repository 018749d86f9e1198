"""Recipe sections of the training stages, one per ``stage.kind``.

A stage says what a batch is and how its loss and metrics are computed (supervised tuning's token
cross-entropy; pairwise, preference and classification losses). Adding a stage adds its section
here and an implementation registered under the same ``kind`` in :mod:`tunesmith.stages`.
``stage: sft`` in a recipe is short for ``stage: {kind: sft}``.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import Field

from tunesmith.config.base import Section


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


class ClsStage(Section):
    """Sequence classification: a label head on the model's last real token, cross-entropy over labels."""

    kind: Literal["cls"] = "cls"
    text_field: str = Field("sentence", description="Field holding the text to classify.")
    label_field: str = Field("label", description="Field holding the label.")
    labels: Optional[tuple[str, ...]] = Field(
        None, description="The label set in head order; default: the labels of the training data, sorted."
    )


StageSection = Annotated[
    Union[SftStage, PtStage, RmStage, DpoStage, OrpoStage, SimpoStage, KtoStage, ClsStage],
    Field(discriminator="kind"),
]

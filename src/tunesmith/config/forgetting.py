"""Recipe sections against catastrophic forgetting: regularisers and the retain suite.

They are additive: a recipe without them trains exactly as before.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator

from tunesmith.config.base import Section


class EwcSection(Section):
    """Elastic weight consolidation: keep weights that mattered for the reference data near their start."""

    strength: float = Field(..., gt=0, description="lambda in lambda * sum F * (theta - theta0)^2.")
    data: str = Field(
        "generations",
        description="Reference data for the Fisher: a file (any supported format, e.g. general text) or "
        "'generations' (samples of the base model itself).",
    )
    format: str = Field("auto", description="Record layout of the reference file.")
    samples: int = Field(128, ge=1, description="Most reference examples in the Fisher estimate.")
    max_seconds: float = Field(600.0, gt=0, description="Stop the Fisher pass after this long (keeps what it has).")
    max_length: int = Field(256, ge=8, description="Longest reference sequence (tokens).")
    normalise: Literal["mean", "none"] = Field(
        "mean", description="'mean' divides the Fisher by its mean so strength is comparable across models."
    )
    cache: bool = Field(True, description="Cache the Fisher on disk, keyed by model, data and method.")


class RegulariseSection(Section):
    """Regularisers against forgetting and over-fitting (all off by default)."""

    ewc: Optional[EwcSection] = Field(None, description="Elastic weight consolidation (off unless given).")
    l2sp: float = Field(0.0, ge=0, description="L2-SP strength: alpha * sum (theta - theta0)^2 over trainable weights.")
    neftune_alpha: Optional[float] = Field(
        None, gt=0, description="NEFTune: uniform noise of scale alpha/sqrt(seq*dim) on input embeddings in training."
    )
    attention_dropout: Optional[float] = Field(
        None, ge=0, lt=1, description="Attention dropout of the model during training (null keeps the model's)."
    )
    hidden_dropout: Optional[float] = Field(
        None, ge=0, lt=1, description="Rate of the model's own dropout layers (nn.Dropout) during training."
    )


class RetainSection(Section):
    """Skills that should survive fine-tuning, measured on the base model before and the result after.

    ``retain: {}`` measures tunesmith's built-in suite: perplexity on a page of general English text and
    a small multiple-choice set of everyday knowledge.
    """

    suite: Optional[str] = Field(
        None, description="An evaluation suite file (as for `tunesmith eval-suite`) replacing the built-in one."
    )
    perplexity: tuple[str, ...] = Field(
        (), description="General text file(s) whose perplexity should not rise; empty: tunesmith's built-in text."
    )
    format: str = Field("auto", description="Record layout of the perplexity files.")
    multiple_choice: Optional[str] = Field(
        "builtin", description="JSONL multiple-choice file (question, choices, answer) scored by log-likelihood; "
        "'builtin' for tunesmith's small set, null for none."
    )
    max_length: int = Field(512, ge=8, description="Longest sequence scored (tokens).")
    batch_size: int = Field(8, ge=1, description="Sequences scored together.")
    limit: Optional[int] = Field(None, ge=1, description="Score only the first N records of each file.")

    @field_validator("perplexity", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return (value,) if isinstance(value, str) else value

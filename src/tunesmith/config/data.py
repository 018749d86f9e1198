"""The recipe's data section: training files, formats, templates, and the sources of a mixture."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from tunesmith.config.base import Section
from tunesmith.config.prepare import PrepareSection


class DataSourceSection(Section):
    """One data source of a mixture (``data.sources``), e.g. the task data or a general 'replay' set."""

    name: str = Field(..., description="Short name used in logs and per-source validation metrics.")
    train: tuple[str, ...] = Field(..., description="Training file(s) of this source (any supported format).")
    format: str = Field("auto", description="Record layout of this source's files (as data.format).")
    weight: Optional[float] = Field(
        None, gt=0, description="Sampling weight (normalised over sources); leave every weight empty "
        "to use temperature-based weights from data.mix_temperature."
    )
    validation: Optional[str] = Field(None, description="Validation file of this source.")
    validation_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="Share of this source held out for validation."
    )

    @field_validator("train", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return (value,) if isinstance(value, str) else value


class DataSection(Section):
    """Where the training data is and how it becomes token sequences."""

    train: tuple[str, ...] = Field(
        (), description="Training file(s): .json, .jsonl, .csv, .tsv, .parquet or .txt, optionally .gz."
    )
    format: str = Field(
        "auto", description="Record layout: alpaca, sharegpt, messages, text, or auto (detected)."
    )
    validation: Optional[str] = Field(None, description="Validation file (same format as train).")
    validation_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="Share of the training data held out for validation."
    )
    template: str = Field(
        "auto",
        description="Chat template: 'auto' uses the tokenizer's own, else 'chatml'; or a built-in name.",
    )
    system_prompt: Optional[str] = Field(
        None, description="System message added to conversations that have none."
    )
    max_length: int = Field(1024, ge=8, description="Longest token sequence; longer ones are truncated.")
    train_on: Literal["assistant", "all"] = Field(
        "assistant", description="Compute the loss on assistant tokens only, or on every token."
    )
    reasoning: Literal["keep", "strip", "mask"] = Field(
        "keep", description="<think>...</think> traces in assistant turns: kept and trained, stripped from the "
        "text, or kept as context but masked out of the loss."
    )
    text_field: str = Field("text", description="Field holding the text for the 'text' format.")
    prepare: Optional[PrepareSection] = Field(
        None, description="Clean and de-duplicate the training files before use (off unless given); see docs/data.md."
    )
    sources: tuple[DataSourceSection, ...] = Field(
        (), description="More data sources mixed into training (e.g. a general 'replay' set), each with a weight; "
        "data.train, if given, is the source named 'train' and takes the weight the others leave."
    )
    mix_temperature: float = Field(
        1.0, gt=0, description="Without weights, source i is drawn with probability ~ size_i^(1/T)."
    )

    @field_validator("train", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return (value,) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_validation_source(self) -> "DataSection":
        if self.validation and self.validation_fraction:
            raise ValueError("give either data.validation or data.validation_fraction, not both")
        if not self.train and not self.sources:
            raise ValueError("give the training data as data.train (or data.sources)")
        if self.prepare is not None and self.sources:
            # Preparation runs on data.train only; refused rather than silently skipping the other sources.
            raise ValueError("data.prepare works on data.train alone and is not applied to data.sources; prepare "
                             "each source with `tunesmith data clean`/`data dedup` and list the results, or drop data.sources")
        return self

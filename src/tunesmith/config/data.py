"""The recipe's data section: training files, formats, templates, and the sources of a mixture."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from tunesmith.config.base import Section
from tunesmith.config.prepare import PrepareSection


class ColumnsSection(Section):
    """Which column of a table holds what (any CSV, TSV, JSON Lines, Parquet or spreadsheet export), for
    files whose column names match no built-in format: ``columns: {prompt: headline, label: topic}``."""

    prompt: str = Field(..., description="Column holding the input: the question, instruction or text to label.")
    answer: Optional[str] = Field(None, description="Column holding the expected answer or output text.")
    label: Optional[str] = Field(
        None, description="Column holding the label (stage cls); without an answer column the label is the answer."
    )
    system: Optional[str] = Field(None, description="Column holding a per-row system prompt (optional).")

    @model_validator(mode="after")
    def _has_a_target(self) -> "ColumnsSection":
        if self.answer is None and self.label is None:
            raise ValueError("name the column the model should learn to give: columns.answer or columns.label")
        return self

    @property
    def target(self) -> str:
        """The column whose text the model learns to produce (the answer, else the label)."""
        return self.answer or self.label  # type: ignore[return-value]

    def used(self) -> tuple[str, ...]:
        """The named columns, input first."""
        return tuple(c for c in (self.prompt, self.answer, self.label, self.system) if c)


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
        "auto", description="Record layout: alpaca, sharegpt, messages, text, columns (see data.columns), or auto "
        "(detected; 'columns' whenever data.columns is given)."
    )
    columns: Optional[ColumnsSection] = Field(
        None, description="Which column holds the input, the answer, the label and the system prompt, for tables "
        "whose column names match no format (e.g. {prompt: headline, label: topic})."
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
        if self.columns is not None and self.format not in ("auto", "columns"):
            raise ValueError(f"data.columns names the columns itself; set data.format to auto (not {self.format!r}) "
                             "or drop data.columns")
        if not self.train and not self.sources:
            raise ValueError("give the training data as data.train (or data.sources)")
        if self.prepare is not None and self.sources:
            # Preparation runs on data.train only; refused rather than silently skipping the other sources.
            raise ValueError("data.prepare works on data.train alone and is not applied to data.sources; prepare "
                             "each source with `tunesmith data clean`/`data dedup` and list the results, or drop data.sources")
        return self

"""The recipe: one YAML file describing a run, validated once into frozen, typed sections."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from tunesmith.config.base import Section
from tunesmith.config.forgetting import (
    DataSourceSection,
    GaloreSection,
    RegulariseSection,
    RetainSection,
)
from tunesmith.config.methods import LoraMethod, MethodSection
from tunesmith.config.prepare import PrepareSection
from tunesmith.config.speed import SpeedSection


class ModelSection(Section):
    """Which pre-trained causal language model to start from."""

    name: str = Field(
        "smollm2-135m-instruct",
        description="A built-in alias (see `tunesmith models`), a Hugging Face hub id or a local folder.",
    )
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32", description="Dtype the weights are loaded in ('auto' keeps the checkpoint's)."
    )
    trust_remote_code: bool = Field(
        False, description="Allow code shipped with the model to run. Off unless you trust its author."
    )
    revision: Optional[str] = Field(None, description="Hub revision (branch, tag or commit).")


class DataSection(Section):
    """Where the training data is and how it becomes token sequences."""

    train: tuple[str, ...] = Field(
        (), description="Training file(s): .json, .jsonl, .csv, .parquet or .txt, optionally .gz."
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


class EarlyStoppingSection(Section):
    """Stop when an evaluation metric stops improving."""

    metric: Literal["val_loss", "val_perplexity"] = Field("val_loss", description="Metric watched.")
    patience: int = Field(3, ge=1, description="Evaluations without improvement before stopping.")
    min_delta: float = Field(0.0, ge=0.0, description="Smallest decrease that counts as improvement.")


class TrainSection(Section):
    """The optimisation: schedule, batch, accumulation, clipping, checkpoints."""

    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored if max_steps).")
    max_steps: Optional[int] = Field(None, ge=1, description="Optimizer steps; overrides epochs.")
    batch_size: int = Field(8, ge=1, description="Examples per micro-batch on each process.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated into one optimizer step.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not on biases and norms).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Decay after warmup."
    )
    warmup_steps: Optional[int] = Field(None, ge=0, description="Warmup steps (overrides warmup_ratio).")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Warmup as a share of all steps.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final learning rate as a share of lr.")
    max_grad_norm: Optional[float] = Field(1.0, gt=0, description="Gradient clipping norm (null: off).")
    seed: int = Field(42, description="Seed of data order, initialisation and dropout.")
    log_every: int = Field(10, ge=1, description="Steps between logged training metrics.")
    checkpoint_every: Optional[int] = Field(None, ge=1, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="Newest checkpoints kept on disk.")
    early_stopping: Optional[EarlyStoppingSection] = Field(None, description="Off unless given.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to train.")
    speed: SpeedSection = Field(default_factory=SpeedSection, description="Packing, chunked loss, autocast, compile.")
    optimizer: Literal["adamw", "galore_adamw"] = Field(
        "adamw", description="adamw, or galore_adamw (GaLore low-rank gradient projection; needs galore-torch)."
    )
    galore: GaloreSection = Field(default_factory=GaloreSection, description="GaLore settings.")


class GenerationTaskSection(Section):
    """A generation task scored by a metric, e.g. exact match of greedy answers."""

    file: str = Field(..., description="Evaluation file with prompts and reference answers.")
    format: str = Field("auto", description="Record layout of the file (as data.format).")
    metric: Literal["exact_match"] = Field("exact_match", description="How answers are scored.")
    max_new_tokens: int = Field(32, ge=1, description="Longest generated answer.")
    limit: Optional[int] = Field(None, ge=1, description="Score only the first N records.")
    batch_size: int = Field(16, ge=1, description="Prompts generated together.")


class EvalReportSection(Section):
    """A base-versus-tuned report (results.json and report.html in OUTPUT/eval) written after training."""

    suites: tuple[str, ...] = Field((), description="Suite files of the task tuned for (docs/evaluation.md).")
    general_suites: tuple[str, ...] = Field(
        (), description="Suite files of general skills; their change is the forgetting measure."
    )
    bias: bool = Field(True, description="Also run the counterfactual-pairs bias probe shipped with tunesmith.")
    data_root: Optional[str] = Field(None, description="Folder {data_root} stands for in task files.")
    limit: Optional[int] = Field(None, ge=1, description="Score at most N items per task.")


class EvalSection(Section):
    """Evaluation during and around training."""

    every_steps: Optional[int] = Field(None, ge=1, description="Steps between validation passes.")
    batch_size: int = Field(8, ge=1, description="Examples per validation batch.")
    task: Optional[GenerationTaskSection] = Field(
        None, description="Task metric measured on the base model before and the result after training."
    )
    report: Optional[EvalReportSection] = Field(
        None, description="Evaluate base and result on suites after training and write an HTML report."
    )


class OutputSection(Section):
    """Where results go."""

    dir: str = Field("runs/tunesmith", description="Output folder of the run.")
    overwrite: bool = Field(False, description="Allow writing into a non-empty output folder.")
    tensorboard: bool = Field(False, description="Also write TensorBoard event files.")


class Recipe(Section):
    """A whole run: model, data, method, training, evaluation, output."""

    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection
    method: MethodSection = Field(default_factory=LoraMethod)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    output: OutputSection = Field(default_factory=OutputSection)
    regularise: RegulariseSection = Field(
        default_factory=RegulariseSection, description="EWC, L2-SP, NEFTune and dropout (all off by default)."
    )
    retain: Optional[RetainSection] = Field(
        None, description="Skills measured before and after training to report forgetting ({} for the defaults)."
    )



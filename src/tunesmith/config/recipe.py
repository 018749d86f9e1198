"""The recipe: one YAML file describing a run, validated once into frozen, typed sections."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from tunesmith.config.base import Section
from tunesmith.config.data import ColumnsSection, DataSection
from tunesmith.config.forgetting import RegulariseSection, RetainSection
from tunesmith.config.methods import LoraMethod, MethodSection
from tunesmith.config.stages import SftStage, StageSection
from tunesmith.config.train import TrainSection

TRAINS_BASE_WEIGHTS = ("full", "partial")  # the methods that update base weights (no quantised base under them)


class RopeScalingSection(Section):
    """Stretch the model's rotary position embeddings to sequences longer than it was trained on."""

    kind: Literal["linear", "dynamic", "yarn"] = Field(
        ..., description="linear: positions divided by factor; dynamic: NTK-aware, grows with the sequence; "
                         "yarn: YaRN (frequency bands interpolated, attention rescaled).")
    factor: float = Field(..., gt=1.0, description="How many times the trained context to reach, e.g. 4.0.")
    original_max_position_embeddings: Optional[int] = Field(
        None, ge=1, description="The context the model was trained on (yarn; default: the config's).")


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
    quantize: Literal["none", "nf4", "int8"] = Field(
        "none", description="Hold the frozen base quantised through bitsandbytes: nf4 (QLoRA: 4-bit NormalFloat, "
                            "double-quantised scales) or int8; methods with a frozen base only (docs/quantization.md).",
    )
    compute_dtype: Literal["bfloat16", "float32"] = Field(
        "bfloat16", description="Dtype an nf4 layer dequantises into for its matrix product (model.quantize: nf4).",
    )
    rope_scaling: Optional[RopeScalingSection] = Field(
        None, description="RoPE scaling written into the model's config before it loads (linear, dynamic, yarn).",
    )


class GenerationTaskSection(Section):
    """A generation task scored by a metric, e.g. exact match of greedy answers."""

    file: str = Field(..., description="Evaluation file with prompts and reference answers.")
    format: str = Field("auto", description="Record layout of the file (as data.format).")
    metric: Literal["exact_match", "rougeL", "token_f1"] = Field(
        "exact_match", description="How answers are scored: exact match (case and spacing ignored), ROUGE-L F-measure "
        "or token F1 against the reference.")
    max_new_tokens: int = Field(32, ge=1, description="Longest generated answer.")
    limit: Optional[int] = Field(None, ge=1, description="Score only the first N records.")
    batch_size: int = Field(16, ge=1, description="Prompts generated together.")
    columns: Optional[ColumnsSection] = Field(
        None, description="Which column of the file is the prompt and which the reference answer (default: "
        "data.columns), for a table whose column names match no format.")


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


class TrackingSection(Section):
    """How the run appears in experiment trackers (output.trackers)."""

    project: str = Field("tunesmith", min_length=1,
                         description="W&B project, MLflow experiment and Trackio project the run is filed under.")
    run_name: Optional[str] = Field(None, min_length=1, description="The run's name there; default: the output "
                                                                    "folder's name.")
    wandb_mode: Literal["offline", "online"] = Field(
        "offline", description="offline: a local W&B run folder in the output folder (upload later with `wandb sync`); "
                               "online: send as it trains (needs `wandb login`).")
    mlflow_uri: Optional[str] = Field(
        None, description="MLflow tracking URI (a server or a database); default: a SQLite store and artifact folder "
                          "in OUTPUT/mlflow.")


class OutputSection(Section):
    """Where results go."""

    dir: str = Field("runs/tunesmith", description="Output folder of the run.")
    overwrite: bool = Field(False, description="Replace the output folder if it is a tunesmith run "
                                               "(kept aside until the new run finishes).")
    tensorboard: bool = Field(False, description="Also write TensorBoard event files (the same as listing "
                                                 "tensorboard in trackers).")
    trackers: tuple[Literal["tensorboard", "wandb", "mlflow", "trackio"], ...] = Field(
        (), description="Experiment trackers that get the recipe, every logged step, the summary and the result "
                        "(each needs its package: pip install tensorboard / wandb / mlflow-skinny / trackio). "
                        "A tracker that fails warns once and never stops the run.")
    tracking: TrackingSection = Field(default_factory=TrackingSection)

    @property
    def tracker_names(self) -> tuple[str, ...]:
        """The trackers in use: ``trackers``, plus tensorboard when ``tensorboard: true``."""
        extra = ("tensorboard",) if self.tensorboard and "tensorboard" not in self.trackers else ()
        return tuple(dict.fromkeys(self.trackers)) + extra


class Recipe(Section):
    """A whole run: stage, model, data, method, training, evaluation, output."""

    stage: StageSection = Field(
        default_factory=SftStage, description="What is trained for: sft (default); see docs/design.md."
    )
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

    @field_validator("stage", mode="before")
    @classmethod
    def _stage_by_name(cls, value: object) -> object:
        return {"kind": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _quantised_base_stays_frozen(self) -> "Recipe":
        if self.model.quantize != "none" and self.method.kind in TRAINS_BASE_WEIGHTS:
            raise ValueError(f"model.quantize: {self.model.quantize} freezes a quantised base, but method "
                             f"{self.method.kind} trains the base weights; use method lora (QLoRA) or drop model.quantize")
        return self

    @model_validator(mode="after")
    def _loftq_corrects_an_nf4_base(self) -> "Recipe":
        if getattr(self.method, "init", "default") != "loftq":
            return self
        if self.model.quantize != "nf4":
            raise ValueError(f"method.init: loftq corrects the rounding error of an nf4 base, and model.quantize is "
                             f"{self.model.quantize}; set model.quantize: nf4 or use method.init: default")
        if self.method.dora:
            raise ValueError("method.init: loftq starts a plain LoRA update; DoRA's magnitudes are measured before it "
                             "is set, so drop method.dora or use method.init: default")
        return self

    @model_validator(mode="after")
    def _retain_needs_token_loss(self) -> "Recipe":
        # The forgetting report compares the task's token loss before and after: token-level stages only.
        if self.retain is not None and self.stage.kind not in ("sft", "pt"):
            raise ValueError(f"retain (the forgetting report) applies to stage sft and pt, not {self.stage.kind}; "
                             "remove the retain section")
        return self

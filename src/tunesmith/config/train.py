"""The recipe's train section: schedule, batch, accumulation, clipping, checkpoints, optimizer."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from tunesmith.config.base import Section
from tunesmith.config.speed import SpeedSection


class GaloreSection(Section):
    """GaLore (gradient low-rank projection) settings, used when ``train.optimizer`` is galore_adamw."""

    rank: int = Field(128, ge=1, description="Rank of the projected gradients and optimizer states.")
    update_proj_gap: int = Field(200, ge=1, description="Steps between recomputing the projection.")
    scale: float = Field(0.25, gt=0, description="Scale of the projected-back update.")
    proj_type: Literal["std", "reverse_std", "left", "right", "full"] = Field(
        "std", description="Which side of each weight matrix is projected."
    )


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
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="Under torchrun: ddp (every process holds the whole model) or fsdp (FSDP2: weights, "
        "gradients and optimizer states sharded over processes; sharded checkpoints that resume at any world size).",
    )
    speed: SpeedSection = Field(default_factory=SpeedSection, description="Packing, chunked loss, autocast, compile.")
    optimizer: Literal["adamw", "galore_adamw"] = Field(
        "adamw", description="adamw, or galore_adamw (GaLore low-rank gradient projection; needs galore-torch)."
    )
    galore: GaloreSection = Field(default_factory=GaloreSection, description="GaLore settings.")

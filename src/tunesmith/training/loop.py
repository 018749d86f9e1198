"""The training loop: one loop for every method, short enough to read in one sitting.

Each optimizer step sees one global batch. Its loss is the objective's summed loss divided by the
objective's units (target tokens, pairs, ...) of the whole global batch (over micro-batches and
processes), so gradient accumulation and DistributedDataParallel give the same update as one large
batch. Which stage, method and speed levers are running reaches the loop only through its seams.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from tunesmith.config import EvalSection, TrainSection
from tunesmith.core.errors import TunesmithError
from tunesmith.core.runtime import Runtime
from tunesmith.data.encoded import EncodedData
from tunesmith.methods.base import Method, decay_groups
from tunesmith.training.checkpoint import TrainState, load_checkpoint, save_checkpoint, set_rng_state
from tunesmith.training.faults import StopRequest, check_finite
from tunesmith.training.hooks import Hook
from tunesmith.training.objective import Objective
from tunesmith.training.sampler import Sampler
from tunesmith.training.schedule import add_param_groups, build_optimizer, build_scheduler, clip_and_step, planned_steps
from tunesmith.training.sharding import (
    full_state_dict,
    gradient_sync,
    load_sharded_checkpoint,
    save_sharded_checkpoint,
    shard_model,
)

Penalty = Callable[[torch.nn.Module], torch.Tensor]


@dataclass(frozen=True)
class LoopSeams:
    """Everything the loop is told rather than asks, built once per run (:func:`tunesmith.pipeline.assembly.assemble_loop`).

    Attributes:
        objective: What a batch is, its loss and its validation metrics (the stage's seam).
        sampler: Which examples each step sees.
        penalties: Terms added once per optimizer step to the mean loss (EWC, L2-SP, ...).
        hooks: Progress bar, metrics file, ... (main process only; empty elsewhere).
    """

    objective: Objective
    sampler: Sampler
    penalties: tuple[Penalty, ...] = ()
    hooks: tuple[Hook, ...] = ()


@dataclass
class TrainResult:
    """What the loop did."""

    state: TrainState
    total_steps: int
    wall_time: float
    train_loss: Optional[float] = None
    validation: dict = field(default_factory=dict)


@dataclass
class Trainer:
    """Trains ``model`` (already prepared by ``method``) on ``data`` through the run's ``seams``.

    Attributes:
        checkpoint_dir: Where checkpoints go (None: none are written).
    """

    model: torch.nn.Module
    method: Method
    data: EncodedData
    train_config: TrainSection
    eval_config: EvalSection
    runtime: Runtime
    pad_token_id: int
    seams: LoopSeams
    checkpoint_dir: Optional[Path] = None

    def __post_init__(self) -> None:
        config = self.train_config
        self.sampler, self.objective, self.hooks = self.seams.sampler, self.seams.objective, self.seams.hooks
        self.total_steps = planned_steps(config, self.sampler.steps_per_epoch)
        self.method.bind_training(self.sampler.steps_per_epoch, self.total_steps)
        self.sharded = config.distributed == "fsdp"
        if self.sharded:  # before the optimizer: it must hold the sharded parameters
            shard_model(self.model, self.method.base_model(self.model), self.runtime)
        self.optimizer = build_optimizer(self.model, config, self.method.param_groups(self.model, config))
        self.scheduler = build_scheduler(self.optimizer, config, self.total_steps)
        self.state = TrainState()
        self.wrapped = self.wrap_for_processes()

    def wrap_for_processes(self) -> torch.nn.Module:
        """The model in DistributedDataParallel when several processes train, else the model itself.

        DDP records which parameters require gradients when it is built; parameters that start
        training later (gradual unfreezing) are only synchronised after :meth:`add_trainable` builds
        it again (on every process at the same step, since the schedule depends on the step alone).
        """
        if not self.runtime.distributed or self.sharded:
            return self.model  # fully_shard changed the model in place
        device_ids = [self.runtime.device.index] if self.runtime.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=device_ids)

    def add_trainable(self, step: int) -> None:
        """Give the optimizer the parameters that the method starts training at ``step``."""
        parameters = self.method.newly_trainable(self.model, step)
        if not parameters:
            return
        if self.sharded:
            raise TunesmithError("gradual unfreezing (method.unfreeze_every) does not work with train.distributed: "
                                 "fsdp; use ddp")
        add_param_groups(self.optimizer, self.scheduler, decay_groups(parameters, self.train_config.weight_decay))
        if self.runtime.distributed:
            self.wrapped = None  # release the old DDP reducer and its hooks before building a new one
            self.wrapped = self.wrap_for_processes()

    def resume(self, checkpoint: Path) -> None:
        """Continue exactly where ``checkpoint`` left off (weights, optimizer, schedule, RNG, data)."""
        if self.sharded:  # at any world size: DCP reshards
            self.state = load_sharded_checkpoint(checkpoint, self.model, self.optimizer, self.scheduler, self.runtime)
            return
        trainable, training, self.state = load_checkpoint(checkpoint, self.runtime.device)
        for step in range(self.state.step):  # rebuild the parameter groups of gradual unfreezing
            self.add_trainable(step)
        self.method.load_trainable_state(self.model, trainable)
        self.optimizer.load_state_dict(training["optimizer"])
        self.scheduler.load_state_dict(training["scheduler"])
        set_rng_state(training["rng"])
        if self.state.step > self.total_steps:
            raise TunesmithError(f"checkpoint {checkpoint} is at step {self.state.step}, beyond the {self.total_steps} "
                                 "steps of this recipe; raise train.max_steps or train.epochs to resume")

    def fit(self) -> TrainResult:
        """Run the remaining steps; evaluate, stop early and checkpoint as configured."""
        self.before_training()
        for hook in self.hooks:
            hook.on_train_start(self.total_steps, self.state.step)
        started = time.perf_counter()
        last_loss = None
        self.model.train()
        try:
            with StopRequest() as stop:
                while self.state.step < self.total_steps and not self.state.stopped_early:
                    step_started = time.perf_counter()
                    last_loss, tokens = self.train_step(self.state.step)
                    self.state.step += 1
                    self.state.tokens += tokens
                    self.after_step(last_loss, tokens, time.perf_counter() - step_started)
                    self.stop_if_asked(stop)
        finally:
            for hook in self.hooks:
                hook.on_train_end()
        validation = self.evaluate() if self.data.validation else {}
        return TrainResult(self.state, self.total_steps, time.perf_counter() - started, last_loss, validation)

    def before_training(self) -> None:
        """The objective's optional preparation, told every micro-batch the remaining steps will train on
        (the sampler is a pure function of the step) and the validation sets (e.g. precomputed reference
        log-probabilities; ``checkpoint_dir`` keeps them for a resume)."""
        train = ([self.data.train[i] for i in indices] for step in range(self.state.step, self.total_steps)
                 for indices in self.sampler.micro_batches(step))
        validation = [self.data.validation, *self.data.validation_by_source.values()] if self.data.validation else []
        self.objective.before_training(self.model, train, validation, self.eval_config.batch_size,
                                       self.pad_token_id, self.runtime, self.checkpoint_dir)

    def train_step(self, step: int) -> tuple[float, int]:
        """One optimizer step over this process's micro-batches; returns (mean loss, global real tokens).

        Real tokens are the input tokens read, padding excluded, so tokens/s means the same with and
        without packing.
        """
        self.add_trainable(step)
        examples = [[self.data.train[i] for i in indices] for indices in self.sampler.micro_batches(step)]
        batches = [self.objective.rollout(self.wrapped, self.objective.collate(chunk, self.pad_token_id), chunk, step)
                   for chunk in examples]  # online RL samples here
        units = self.all_reduce_sum(sum(self.objective.units(batch) for batch in batches))
        real_tokens = self.all_reduce_sum(sum(self.objective.real_tokens(batch) for batch in batches))
        step_loss = torch.zeros((), dtype=torch.float64)
        for index, batch in enumerate(batches):
            batch = self.to_device(batch)
            is_last = index == len(batches) - 1
            with gradient_sync(self.wrapped, self.runtime, self.sharded, sync=is_last):
                summed = self.objective.loss_sum(self.wrapped, batch)
                # DDP and FSDP average gradients over processes; scaling by world size turns that into a sum.
                (summed * self.runtime.world_size / units).backward()
            step_loss += summed.detach().double().cpu()
        for penalty in self.seams.penalties:
            penalty(self.model).backward()  # the same on every process: no gradient sync needed
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
        loss = self.all_reduce_sum(float(step_loss)) / units
        check_finite(step + 1, loss, float(grad_norm), self.scheduler.get_last_lr()[0], self.checkpoint_dir,
                     lambda: [getattr(self.data.train[i], "source", "")
                              for indices in self.sampler.micro_batches(step) for i in indices])
        clip_and_step(self.optimizer, parameters, self.train_config.max_grad_norm, grad_norm)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, int(real_tokens)

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: value.to(self.runtime.device) for key, value in batch.items()}

    def after_step(self, loss: float, tokens: int, seconds: float) -> None:
        """Logging, evaluation, early stopping and checkpointing after a step."""
        step = self.state.step
        record = {"step": step, "epoch": round(step / self.sampler.steps_per_epoch, 4), "loss": loss,
                  "lr": self.scheduler.get_last_lr()[0], "tokens": self.state.tokens,
                  "tokens_per_s": tokens / max(seconds, 1e-9), "step_s": seconds,
                  **self.objective.step_metrics()}  # e.g. online RL's rewards and samples
        for hook in self.hooks:
            hook.on_step(record)
        if step % self.train_config.log_every == 0 or step == self.total_steps:
            self.log({**record, **self.sampler.describe(step)})  # e.g. the mixture seen so far
        every = self.eval_config.every_steps
        if self.data.validation and every and step % every == 0:
            self.log({"step": step, **{f"val_{k}": v for k, v in self.evaluate().items()}})
        if self.all_reduce_sum(float(any(hook.wants_stop() for hook in self.hooks))):  # hooks: main process only
            self.state.stopped_early = True
        every = self.train_config.checkpoint_every
        if self.checkpoint_dir and every and (step % every == 0 or self.state.stopped_early):
            self.save_checkpoint()

    def stop_if_asked(self, stop: StopRequest) -> None:
        """After SIGTERM or Ctrl-C (on any process): checkpoint this step and stop with KeyboardInterrupt."""
        if not self.all_reduce_sum(float(stop.requested)):
            return
        every = self.train_config.checkpoint_every
        if self.checkpoint_dir and not (every and self.state.step % every == 0):  # else after_step just saved it
            self.save_checkpoint()
        raise KeyboardInterrupt(stop.signal_name)

    def evaluate(self) -> dict[str, float]:
        """The objective's validation metrics (overall and per data source); updates early stopping."""
        batch_size = self.eval_config.batch_size
        metrics = self.objective.evaluate(self.model, self.data.validation, batch_size, self.pad_token_id, self.runtime)
        for source, examples in self.data.validation_by_source.items():
            per_source = self.objective.evaluate(self.model, examples, batch_size, self.pad_token_id, self.runtime)
            metrics.update({f"{name}/{source}": value for name, value in per_source.items() if name != "tokens"})
        stopping = self.train_config.early_stopping
        if stopping is not None:
            value = metrics[stopping.metric.removeprefix("val_")]
            if self.state.best_metric is None or value < self.state.best_metric - stopping.min_delta:
                self.state.best_metric, self.state.evals_without_improvement = value, 0
            else:
                self.state.evals_without_improvement += 1
                self.state.stopped_early = self.state.evals_without_improvement >= stopping.patience
        return metrics

    def save_checkpoint(self) -> Optional[Path]:
        """Checkpoint from the main process (every process holds the same weights), or sharded from every one."""
        if self.sharded:
            return save_sharded_checkpoint(self.checkpoint_dir, self.model, self.optimizer, self.scheduler, self.state,
                                           self.train_config.keep_checkpoints, self.runtime)
        if not self.runtime.is_main:
            return None
        return save_checkpoint(self.checkpoint_dir, self.method.trainable_state(self.model), self.optimizer,
                               self.scheduler, self.state, self.train_config.keep_checkpoints)

    def saveable_state(self) -> Optional[dict]:
        """The whole model's state gathered on the main process when sharded (every process must call it), else None."""
        return full_state_dict(self.model) if self.sharded and self.runtime.distributed else None

    def log(self, record: dict) -> None:
        for hook in self.hooks:
            hook.on_log(record)

    def all_reduce_sum(self, value: float) -> float:
        if not self.runtime.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.runtime.device)
        torch.distributed.all_reduce(tensor)
        return float(tensor)

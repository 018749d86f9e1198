"""The stage seam of the loop: what a batch is and how its loss and validation metrics are computed.

The loop calls an :class:`Objective` and never asks which stage is running, as it never asks which
method is. An objective sums its loss over a batch's *units* (target tokens for token-level stages,
pairs for pairwise ones) and reports how many units the batch holds; the loop divides the summed
loss by the units of the whole global batch, so gradient accumulation and several processes give
exactly the update of one large batch, whatever the stage.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from tunesmith.core.runtime import Runtime
from tunesmith.training.batching import collate
from tunesmith.training.loss import count_real_tokens, count_target_tokens, loss_sum
from tunesmith.training.validation import evaluate_loss

LossFunction = Callable[[torch.nn.Module, dict], torch.Tensor]
Collate = Callable[[list, int], dict]


class Objective(ABC):
    """What the loop asks of a stage.

    The five abstract members are what every stage defines. :meth:`rollout` and :meth:`step_metrics`
    serve stages that act inside the step (online RL); their defaults do nothing, so the loop calls
    them for every stage without asking which one is running.
    """

    @abstractmethod
    def collate(self, examples: list[Any], pad_token_id: int) -> dict[str, torch.Tensor]:
        """Examples of a micro-batch -> the tensors :meth:`loss_sum` reads."""

    @abstractmethod
    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch's loss summed over its units (a scalar with a gradient)."""

    @abstractmethod
    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """How many units :meth:`loss_sum` summed over (the normaliser of the step's loss)."""

    @abstractmethod
    def real_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Input tokens the model reads, padding excluded (for tokens/s)."""

    @abstractmethod
    def evaluate(self, model: torch.nn.Module, examples: Sequence[Any], batch_size: int, pad_token_id: int,
                 runtime: Runtime) -> dict[str, float]:
        """Validation metrics on ``examples``; ``loss`` always, and whatever else the stage measures."""

    def before_training(self, model: torch.nn.Module, train_batches: Iterable[list], validation_sets: Sequence[Sequence],
                        eval_batch_size: int, pad_token_id: int, runtime: Runtime, folder: Path | None) -> None:
        """Called once before the first (or resumed) step with every micro-batch the remaining steps train
        on (a lazy iterable) and the validation sets; ``folder`` keeps what it computes for a resume (DPO's
        precomputed reference log-probabilities). The default does nothing."""

    def rollout(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], examples: Sequence[Any],
                step: int) -> dict[str, torch.Tensor]:
        """A collated micro-batch -> the batch the step trains on; the default returns it unchanged.

        Called for every micro-batch of a step, in order, before the step's units are counted, with the
        batch as :meth:`collate` made it (on the CPU), the ``examples`` it was collated from and the
        optimizer ``step``; online RL samples completions here, scores them and computes their advantages.
        """
        return batch

    @property
    def updates_per_batch(self) -> int:
        """Optimizer steps taken on each global batch (online RL's μ); the sampler repeats each batch this often."""
        return 1

    def step_metrics(self) -> dict[str, Any]:
        """Merged into the logged record of the step just taken (e.g. rewards, generation seconds); default none."""
        return {}


@dataclass(frozen=True)
class TokenCrossEntropy(Objective):
    """Next-token cross-entropy summed over target tokens: supervised tuning and continued pre-training.

    Attributes:
        loss_fn: Summed token loss of a batch (plain, chunked or fused; under autocast or not).
        collate_fn: Examples -> tensors (padded, or packed into one row).
    """

    loss_fn: LossFunction = loss_sum
    collate_fn: Collate = collate

    def collate(self, examples, pad_token_id: int) -> dict[str, torch.Tensor]:
        return self.collate_fn(examples, pad_token_id)

    def loss_sum(self, model, batch) -> torch.Tensor:
        return self.loss_fn(model, batch)

    def units(self, batch) -> int:
        return count_target_tokens(batch)

    def real_tokens(self, batch) -> int:
        return count_real_tokens(batch)

    def evaluate(self, model, examples, batch_size: int, pad_token_id: int, runtime: Runtime) -> dict[str, float]:
        return evaluate_loss(model, examples, batch_size, pad_token_id, runtime)

"""The stage seam of the loop: what a batch is and how its loss and validation metrics are computed.

The loop calls an :class:`Objective` and never asks which stage is running, as it never asks which
method is. An objective sums its loss over a batch's *units* (target tokens for token-level stages,
pairs for pairwise ones) and reports how many units the batch holds; the loop divides the summed
loss by the units of the whole global batch, so gradient accumulation and several processes give
exactly the update of one large batch, whatever the stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch

from tunesmith.runtime import Runtime
from tunesmith.training.batching import collate
from tunesmith.training.loss import count_real_tokens, count_target_tokens, loss_sum
from tunesmith.training.validation import evaluate_loss

LossFunction = Callable[[torch.nn.Module, dict], torch.Tensor]
Collate = Callable[[list, int], dict]


class Objective(Protocol):
    """What the loop asks of a stage."""

    def collate(self, examples: list[Any], pad_token_id: int) -> dict[str, torch.Tensor]:
        """Examples of a micro-batch -> the tensors :meth:`loss_sum` reads."""

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch's loss summed over its units (a scalar with a gradient)."""

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """How many units :meth:`loss_sum` summed over (the normaliser of the step's loss)."""

    def real_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Input tokens the model reads, padding excluded (for tokens/s)."""

    def evaluate(self, model: torch.nn.Module, examples: Sequence[Any], batch_size: int, pad_token_id: int,
                 runtime: Runtime) -> dict[str, float]:
        """Validation metrics on ``examples``; ``loss`` always, and whatever else the stage measures."""

    # Optional members; the loop uses them when present:
    #   before_training(model, train_batches, validation_sets, eval_batch_size, pad_token_id, runtime, folder):
    #       called once before the first (or resumed) step with every micro-batch the remaining steps train on
    #       (e.g. DPO's precomputed reference log-probabilities; ``folder`` keeps them for a resume);
    # and two for stages that act inside the step (online RL):
    #   rollout(model, batch) -> batch: called for every micro-batch of a step, on the device, before the
    #       step's units are counted (e.g. sample completions, score them, compute advantages);
    #   step_metrics() -> dict: merged into the step's logged record (e.g. rewards, generation seconds).


@dataclass(frozen=True)
class TokenCrossEntropy:
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

"""What the pairwise stages (rm, dpo, orpo, simpo) share: batches of pairs, their loss, their metrics.

A micro-batch of pairs is collated as its chosen sequences followed by its rejected ones, padded or
packed by the run's collate function, so a pair stage keeps the speed levers of SFT. Each stage
says how one batch becomes a loss per pair and per-pair metrics; summing, the loop's units (pairs),
sharded evaluation and the metric means are here once.
"""

from __future__ import annotations

import copy
from abc import abstractmethod
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, ClassVar, Iterator, Optional, Sequence

import torch
from torch import nn

from tunesmith.config import DataSection
from tunesmith.data.preference import EncodedPair, prepare_judged
from tunesmith.data.prepared import PreparedData
from tunesmith.runtime import Runtime
from tunesmith.stages.base import Stage
from tunesmith.stages.scoring import count_sequences, reply_logps
from tunesmith.training.chunked_loss import unwrap
from tunesmith.training.objective import Objective
from tunesmith.training.packing import enable_packed_attention
from tunesmith.training.speed import SpeedSetup

PairValues = tuple[torch.Tensor, dict[str, torch.Tensor]]  # (pairs,) loss and (pairs,) metrics by name


class PairObjective(Objective):
    """An :class:`~tunesmith.training.objective.Objective` over preference pairs; units are pairs."""

    counted: str = "pairs"  # how evaluate names the number of items it scored

    def __init__(self, speed: SpeedSetup) -> None:
        self.collate_fn = speed.collate_fn
        self.forward = speed.under_autocast(self.per_pair)

    @abstractmethod
    def per_pair(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> PairValues:
        """The loss of each pair in ``batch`` and the metrics :meth:`evaluate` averages."""

    def collate(self, examples: list[EncodedPair], pad_token_id: int) -> dict[str, torch.Tensor]:
        return self.collate_fn([pair.chosen for pair in examples] + [pair.rejected for pair in examples], pad_token_id)

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.forward(model, batch)[0].sum()

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return count_sequences(batch) // 2

    def real_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, examples: Sequence[EncodedPair], batch_size: int, pad_token_id: int,
                 runtime: Runtime) -> dict[str, float]:
        """Mean loss and metrics per pair over ``examples`` (each process scores every world_size-th)."""
        was_training = model.training
        model.eval()
        names: list[str] = []
        totals: Optional[torch.Tensor] = None
        mine = list(examples[runtime.rank :: runtime.world_size])
        for start in range(0, len(mine), batch_size):
            batch = {k: v.to(runtime.device) for k, v in self.collate(mine[start : start + batch_size],
                                                                        pad_token_id).items()}
            loss, metrics = self.forward(model, batch)
            names = ["loss", *metrics]
            sums = torch.stack([loss.sum(), *(value.float().sum() for value in metrics.values())]).double().cpu()
            totals = torch.cat([sums, torch.tensor([len(loss)], dtype=torch.float64)]) if totals is None else \
                totals + torch.cat([sums, torch.tensor([len(loss)], dtype=torch.float64)])
        if runtime.distributed:
            totals = totals.to(runtime.device)
            torch.distributed.all_reduce(totals)
            totals = totals.cpu()
        model.train(was_training)
        return {**{name: float(totals[i] / totals[-1]) for i, name in enumerate(names)}, self.counted: int(totals[-1])}


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2 pairs,) per-sequence values -> chosen (pairs,), rejected (pairs,): batches hold chosen first."""
    half = values.shape[0] // 2
    return values[:half], values[half:]


class Reference:
    """The frozen reference of DPO and KTO: the base model, never a trained weight.

    With an adapter method (LoRA, IA3, prompt methods, ...) it is the trained model with its adapter
    switched off, as TRL does, so no second copy is held; otherwise (full and partial fine-tuning)
    a frozen copy of the base, taken before any step.
    """

    def __init__(self, model: nn.Module) -> None:
        self.copy = None if adapter_owner(model) is not None else frozen_copy(model)

    def use_packing(self, speed: SpeedSetup) -> None:
        """Give the frozen copy the packed-boundary attention the trained model got (packed batches)."""
        if self.copy is not None and speed.packing:
            enable_packed_attention(self.copy)

    @torch.no_grad()
    def logps(self, model: nn.Module, batch: dict[str, torch.Tensor],
              forward: Callable = reply_logps) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` (summed reply log-probabilities by default) of the reference on ``batch``."""
        if self.copy is not None:
            return forward(self.copy, batch)
        with adapter_off(unwrap(model)):
            return forward(unwrap(model), batch)


class ReferenceStage(Stage):
    """A stage that compares with the frozen base (dpo, kto): keeps a :class:`Reference` once the method is applied.

    Attributes:
        objective_class: Built as ``objective_class(speed, config, reference)``.
        encode: Encodes the stage's rows (:mod:`tunesmith.data.preference`); ``layout`` names them in errors.
    """

    objective_class: ClassVar[type]
    encode: ClassVar[Callable]
    layout: ClassVar[str]

    def __init__(self, config) -> None:
        super().__init__(config)
        self.reference: Optional[Reference] = None

    def prepare_data(self, section: DataSection, tokenizer, seed: int, cache: Path) -> PreparedData:
        return prepare_judged(section, tokenizer, seed, self.kind, self.layout, type(self).encode)

    def after_method(self, model: nn.Module) -> None:
        self.reference = Reference(model)

    def objective(self, speed: SpeedSetup):
        self.reference.use_packing(speed)
        return self.objective_class(speed, self.config, self.reference)


def adapter_owner(model: nn.Module):
    """The peft model that can switch its adapter off, or None for full and partial fine-tuning."""
    from peft import PeftModel

    model = unwrap(model)
    model = getattr(model, "peft_model", model)  # VirtualTokenModel
    return model if isinstance(model, PeftModel) else None


@contextmanager
def adapter_off(model: nn.Module) -> Iterator[None]:
    with adapter_owner(model).disable_adapter():
        yield


def frozen_copy(model: nn.Module) -> nn.Module:
    reference = copy.deepcopy(unwrap(model))
    reference.requires_grad_(False)
    return reference.eval()

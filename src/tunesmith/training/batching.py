"""Which examples each process sees at each step, and how they become padded tensors.

The order is a pure function of (seed, step): resuming at step N needs nothing but N, and every
process computes the same global batch and takes its own share of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunesmith.data.encode import IGNORE_INDEX, EncodedExample
from tunesmith.errors import TunesmithError


@dataclass(frozen=True)
class StepSampler:
    """Global batches of ``batch_size × grad_accum × world_size`` examples, reshuffled each epoch.

    The last incomplete global batch of an epoch is skipped so every step has the same size.
    """

    num_examples: int
    batch_size: int
    grad_accum: int
    world_size: int = 1
    rank: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps_per_epoch == 0:
            raise TunesmithError(
                f"the training data has {self.num_examples} examples, fewer than one global batch of "
                f"{self.global_batch} (batch_size × grad_accum × processes); lower train.batch_size or "
                "train.grad_accum"
            )

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.global_batch

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def micro_batches(self, step: int) -> list[list[int]]:
        """This process's micro-batches (lists of example indices) for optimizer step ``step``."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = torch.randperm(self.num_examples, generator=torch.Generator().manual_seed(self.seed + epoch))
        start = within * self.global_batch
        per_rank = self.batch_size * self.grad_accum
        mine = order[start + self.rank * per_rank : start + (self.rank + 1) * per_rank].tolist()
        return [mine[i * self.batch_size : (i + 1) * self.batch_size] for i in range(self.grad_accum)]


def collate(examples: list[EncodedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: ``input_ids``, ``attention_mask``, ``labels`` (batch, seq)."""
    longest = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids)
        labels[row, :length] = torch.tensor(example.labels)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

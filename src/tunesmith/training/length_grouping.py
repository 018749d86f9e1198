"""Length-grouped micro-batches: less padding when packing is off, the same optimizer steps.

Grouping happens inside each process's share of a step, so every optimizer step still sees
exactly the examples :class:`StepSampler` chose, and its loss (summed, then divided by the
step's target tokens) is unchanged; only which examples share a padded micro-batch differs.
Resuming and DDP keep their guarantees because the order stays a pure function of the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from tunesmith.training.batching import StepSampler


@dataclass(frozen=True)
class LengthGroupedSampler:
    """Wraps a :class:`StepSampler`; each step's micro-batches hold examples of similar length."""

    sampler: StepSampler
    lengths: Sequence[int]

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def epoch_of(self, step: int) -> int:
        return self.sampler.epoch_of(step)

    def describe(self, step: int) -> dict:
        """What the wrapped sampler reports for ``step`` (e.g. the mixture seen), if anything."""
        describe = getattr(self.sampler, "describe", None)
        return describe(step) if describe else {}

    def micro_batches(self, step: int) -> list[list[int]]:
        """The same examples as the wrapped sampler's, regrouped longest first."""
        chosen = [index for batch in self.sampler.micro_batches(step) for index in batch]
        chosen.sort(key=lambda index: -self.lengths[index])
        size = self.sampler.batch_size
        return [chosen[i * size:(i + 1) * size] for i in range(self.sampler.grad_accum)]

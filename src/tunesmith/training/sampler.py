"""Which examples each process sees at each optimizer step: one protocol, one builder.

Every sampler's order is a pure function of (seed, step): resuming at step N needs nothing but N,
and every process computes the same global batch and takes its own share of it. A run has one
sampler, made by :func:`build_sampler`: the plain one for a single data source, the mixture one for
``data.sources``, either regrouped by length when the speed options ask for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Protocol, Sequence

import torch

from tunesmith.core.errors import TunesmithError
from tunesmith.data.mixing import SourceSlice


class Sampler(Protocol):
    """What the loop asks of a sampler."""

    @property
    def steps_per_epoch(self) -> int: ...

    def epoch_of(self, step: int) -> int: ...

    def micro_batches(self, step: int) -> list[list[int]]:
        """This process's micro-batches (lists of example indices) for optimizer step ``step``."""

    def describe(self, step: int) -> dict[str, float]:
        """Numbers worth logging with step ``step`` (e.g. the mixture seen so far); may be empty."""


def build_sampler(num_examples: int, sources: Sequence[SourceSlice], batch_size: int, grad_accum: int,
                  world_size: int, rank: int, seed: int, lengths: Optional[Sequence[int]] = None) -> Sampler:
    """The run's sampler.

    Args:
        num_examples: Training examples (all sources together).
        sources: Where each source sits and its weight (``EncodedData.sources``); empty for one source.
        lengths: Token length of every example, to regroup each step's micro-batches by length; None: as drawn.
    """
    sampler: Sampler = (MixtureSampler(sources, batch_size, grad_accum, world_size, rank, seed) if sources
                        else StepSampler(num_examples, batch_size, grad_accum, world_size, rank, seed))
    return LengthGroupedSampler(sampler, lengths) if lengths is not None else sampler


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

    def describe(self, step: int) -> dict[str, float]:
        """Nothing to add to the step's log: every example is alike to this sampler."""
        return {}



@dataclass(frozen=True)
class LengthGroupedSampler:
    """Wraps another sampler; each step's micro-batches hold examples of similar length."""

    sampler: "Sampler"
    lengths: Sequence[int]

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def epoch_of(self, step: int) -> int:
        return self.sampler.epoch_of(step)

    def describe(self, step: int) -> dict:
        """What the wrapped sampler reports for ``step`` (e.g. the mixture seen), if anything."""
        return self.sampler.describe(step)

    def micro_batches(self, step: int) -> list[list[int]]:
        """The same examples as the wrapped sampler's, regrouped longest first."""
        batches = self.sampler.micro_batches(step)
        chosen = [index for batch in batches for index in batch]
        chosen.sort(key=lambda index: -self.lengths[index])
        size, count = len(chosen) // len(batches), len(batches)
        return [chosen[i * size:(i + 1) * size] for i in range(count)]


def repeat_steps(sampler: Sampler, repeats: int) -> Sampler:
    """``sampler`` with each of its global batches trained on for ``repeats`` optimizer steps in a row (1: itself)."""
    return sampler if repeats == 1 else RepeatedSampler(sampler, repeats)


@dataclass(frozen=True)
class RepeatedSampler:
    """Each global batch of ``inner`` for ``repeats`` consecutive optimizer steps.

    Online RL takes several updates per batch of rollouts (GRPO's μ, TRL's ``num_iterations``): the
    steps ``k·repeats ... k·repeats + repeats - 1`` see the prompts of the inner sampler's step ``k``, so
    an epoch takes ``repeats`` times as many optimizer steps, as with TRL's repeat sampler.
    """

    inner: Sampler
    repeats: int

    @property
    def steps_per_epoch(self) -> int:
        return self.inner.steps_per_epoch * self.repeats

    def epoch_of(self, step: int) -> int:
        return self.inner.epoch_of(step // self.repeats)

    def micro_batches(self, step: int) -> list[list[int]]:
        return self.inner.micro_batches(step // self.repeats)

    def describe(self, step: int) -> dict[str, float]:
        return self.inner.describe(step // self.repeats)


@lru_cache(maxsize=16)
def _permutation(count: int, seed: int) -> torch.Tensor:
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))


class MixtureSampler:
    """Global batches drawn from several sources with given probabilities.

    Each slot of a global batch picks its source by a categorical draw seeded by (seed, step); within
    a source, examples are taken in order from a per-source permutation that is reshuffled each time
    the source is exhausted. Everything is a function of (seed, step) (the running per-source counts
    are recomputed from the per-step draws), so resuming at step N gives exactly the batches of an
    uninterrupted run.
    """

    def __init__(self, slices: Sequence[SourceSlice], batch_size: int, grad_accum: int, world_size: int = 1,
                 rank: int = 0, seed: int = 0) -> None:
        self.slices = list(slices)
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.probabilities = torch.tensor([s.weight for s in self.slices], dtype=torch.float64)
        self.steps_per_epoch = sum(s.count for s in self.slices) // self.global_batch
        if self.steps_per_epoch == 0:
            raise TunesmithError(
                f"the training data has {sum(s.count for s in self.slices)} examples, fewer than one global batch "
                f"of {self.global_batch}; lower train.batch_size or train.grad_accum"
            )
        self._drawn_before = [torch.zeros(len(self.slices), dtype=torch.long)]  # counts drawn before step i

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def sources_of_step(self, step: int) -> torch.Tensor:
        """Source index of each slot of the global batch at ``step`` (global_batch,)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return torch.multinomial(self.probabilities, self.global_batch, replacement=True, generator=generator)

    def drawn_before(self, step: int) -> torch.Tensor:
        """Examples drawn from each source by steps 0..step-1 (memoised running sums)."""
        while len(self._drawn_before) <= step:
            previous = len(self._drawn_before) - 1
            counts = torch.bincount(self.sources_of_step(previous), minlength=len(self.slices))
            self._drawn_before.append(self._drawn_before[-1] + counts)
        return self._drawn_before[step]

    def example_index(self, source: int, position: int) -> int:
        """Index (into the concatenated examples) of the ``position``-th draw from ``source``."""
        piece = self.slices[source]
        cycle, within = divmod(position, piece.count)
        return piece.start + int(_permutation(piece.count, (self.seed * 1_000_003 + cycle) * 1009 + source)[within])

    def global_batch_indices(self, step: int) -> list[int]:
        """Every example of the global batch at ``step`` (slots are independent draws, so already mixed)."""
        sources = self.sources_of_step(step).tolist()
        next_position = self.drawn_before(step).tolist()
        indices = []
        for source in sources:
            indices.append(self.example_index(source, next_position[source]))
            next_position[source] += 1
        return indices

    def micro_batches(self, step: int) -> list[list[int]]:
        """This process's micro-batches (lists of example indices) for optimizer step ``step``."""
        indices = self.global_batch_indices(step)
        per_rank = self.batch_size * self.grad_accum
        mine = indices[self.rank * per_rank : (self.rank + 1) * per_rank]
        return [mine[i * self.batch_size : (i + 1) * self.batch_size] for i in range(self.grad_accum)]

    def describe(self, step: int) -> dict[str, float]:
        """The mixture actually seen in steps 0..step-1: share of examples from each source."""
        seen = self.drawn_before(step).double()
        total = float(seen.sum()) or 1.0
        return {f"mix_{piece.name}": round(float(count) / total, 4) for piece, count in zip(self.slices, seen)}

"""Several data sources in one run: the task data, a general 'replay' set, other tasks.

Each source is read and encoded as usual; the training examples of all sources are concatenated and
:class:`MixtureSampler` decides, step by step, how many examples of each source a global batch holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence

import torch

from tunesmith.config import DataSection
from tunesmith.config.forgetting import DataSourceSection
from tunesmith.data.encode import EncodedExample
from tunesmith.data.formats import Example, FormatOptions
from tunesmith.errors import TunesmithError

TRAIN_SOURCE = "train"


@dataclass(frozen=True)
class SourceSlice:
    """Where one source's training examples sit in the concatenated list, and its sampling weight."""

    name: str
    start: int
    count: int
    weight: float


def resolve_sources(section: DataSection) -> list[DataSourceSection]:
    """The recipe's sources, with ``data.train`` (if given) as the source named 'train'.

    When every other source has a weight, 'train' takes the weight they leave (1 - their sum).

    Raises:
        TunesmithError: For repeated names, weights given for only some sources, or weights of the
            other sources that leave nothing for data.train.
    """
    sources = list(section.sources)
    if section.train:
        given = [s.weight for s in sources]
        weight = None
        if given and all(w is not None for w in given):
            weight = 1.0 - sum(given)
            if weight <= 0:
                raise TunesmithError(
                    f"data.sources weights sum to {sum(given):g}, leaving nothing for data.train; with data.train "
                    "given, the other sources' weights are shares of the batch and must sum to less than 1"
                )
        sources.insert(0, DataSourceSection(name=TRAIN_SOURCE, train=section.train, format=section.format,
                                            weight=weight, validation=section.validation,
                                            validation_fraction=section.validation_fraction))
    names = [s.name for s in sources]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise TunesmithError(f"data.sources: the name '{repeated[0]}' is used twice ('train' is data.train's); rename one")
    if len({s.weight is None for s in sources}) > 1:
        raise TunesmithError("data.sources: give a weight to every source or to none (none: weights from "
                             "data.mix_temperature)")
    return sources


def mixture_weights(sizes: Sequence[int], weights: Sequence[Optional[float]], temperature: float) -> list[float]:
    """Normalised sampling probabilities: the given weights, else size^(1/temperature).

    Temperature 1 samples in proportion to size; a large temperature approaches uniform over sources
    (the temperature sampling of multilingual and multitask training, e.g. arXiv:1907.05019).
    """
    raw = list(weights) if all(w is not None for w in weights) else [n ** (1.0 / temperature) for n in sizes]
    total = sum(raw)
    return [w / total for w in raw]


def load_source(source: DataSourceSection, options: FormatOptions, seed: int) -> tuple[list[Example], Optional[list[Example]], dict[str, str]]:
    """Read one source's training and validation examples (split by fraction if asked)."""
    from tunesmith.data.dataset import load_examples, split_by_fraction

    formats: dict[str, str] = {}
    train: list[Example] = []
    for path in source.train:
        examples, formats[path] = load_examples(path, source.format, options)
        train += examples
    validation = None
    if source.validation:
        validation, formats[source.validation] = load_examples(source.validation, source.format, options)
    elif source.validation_fraction:
        train, validation = split_by_fraction(train, source.validation_fraction, seed)
    return train, validation, formats


def prepare_mixture(section: DataSection, tokenizer, seed: int):
    """Read and encode every source; concatenate them and record where each sits and its weight.

    Returns:
        A :class:`~tunesmith.data.dataset.PreparedData` whose ``sources`` list the slices of ``train``
        and whose ``validation_by_source`` holds each source's validation examples.
    """
    from tunesmith.data.dataset import EncodeStats, PreparedData, encode_all
    from tunesmith.data.templates import resolve_template

    template = resolve_template(tokenizer, section.template)
    options = FormatOptions(text_field=section.text_field, system_prompt=section.system_prompt)
    sources = resolve_sources(section)
    train: list[EncodedExample] = []
    validation_by_source: dict[str, list[EncodedExample]] = {}
    formats: dict[str, str] = {}
    stats: dict[str, EncodeStats] = {}
    starts, counts = [], []
    for source in sources:
        train_examples, validation_examples, source_formats = load_source(source, options, seed)
        formats.update(source_formats)
        encoded, stats[f"train/{source.name}"] = encode_all(train_examples, tokenizer, section, f"{source.name} training")
        starts.append(len(train))
        counts.append(len(encoded))
        train += encoded
        if validation_examples is not None:
            validation_by_source[source.name], stats[f"validation/{source.name}"] = encode_all(
                validation_examples, tokenizer, section, f"{source.name} validation")
    weights = mixture_weights(counts, [s.weight for s in sources], section.mix_temperature)
    slices = [SourceSlice(s.name, start, count, weight)
              for s, start, count, weight in zip(sources, starts, counts, weights)]
    validation = [example for examples in validation_by_source.values() for example in examples] or None
    return PreparedData(train, validation, template, formats, stats, sources=slices,
                        validation_by_source=validation_by_source)


@lru_cache(maxsize=16)
def _permutation(count: int, seed: int) -> torch.Tensor:
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))


class MixtureSampler:
    """Global batches drawn from several sources with given probabilities.

    Each slot of a global batch picks its source by a categorical draw seeded by (seed, step); within
    a source, examples are taken in order from a per-source permutation that is reshuffled each time
    the source is exhausted. Everything is a function of (seed, step) (the running per-source counts
    are recomputed from the per-step draws), so resuming at step N gives exactly the batches of an
    uninterrupted run. Same interface as :class:`tunesmith.training.batching.StepSampler`.
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

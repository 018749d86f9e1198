"""Several data sources in one run: the task data, a general 'replay' set, other tasks.

Each source is read and encoded as usual; the training examples of all sources are concatenated and
:class:`tunesmith.training.sampler.MixtureSampler` decides, step by step, how many examples of each source a global batch holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from tunesmith.config import DataSection, DataSourceSection
from tunesmith.core.errors import TunesmithError
from tunesmith.data.encode import EncodedExample
from tunesmith.data.encoded import EncodedData, EncodeStats, encode_all, load_examples, split_by_fraction
from tunesmith.data.formats import Example, FormatOptions
from tunesmith.data.templates import resolve_template

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


def encode_mixture(section: DataSection, tokenizer, seed: int) -> EncodedData:
    """Read and encode every source; concatenate them and record where each sits and its weight.

    Returns:
        A :class:`~tunesmith.data.encoded.EncodedData` whose ``sources`` list the slices of ``train``
        and whose ``validation_by_source`` holds each source's validation examples.
    """
    template = resolve_template(tokenizer, section.template)
    options = FormatOptions(text_field=section.text_field, system_prompt=section.system_prompt,
                            columns=section.columns)
    sources = resolve_sources(section)
    train: list[EncodedExample] = []
    validation_by_source: dict[str, list[EncodedExample]] = {}
    formats: dict[str, str] = {}
    stats: dict[str, EncodeStats] = {}
    starts, counts = [], []
    for source in sources:
        train_examples, validation_examples, source_formats = load_source(source, options, seed)
        formats.update(source_formats)
        encoded, stats[f"train/{source.name}"] = encode_all(train_examples, tokenizer, section.max_length,
                                                                  f"{source.name} training", section.train_on,
                                                                  section.reasoning)
        starts.append(len(train))
        counts.append(len(encoded))
        train += encoded
        if validation_examples is not None:
            validation_by_source[source.name], stats[f"validation/{source.name}"] = encode_all(
                validation_examples, tokenizer, section.max_length, f"{source.name} validation", section.train_on,
                section.reasoning)
    weights = mixture_weights(counts, [s.weight for s in sources], section.mix_temperature)
    slices = [SourceSlice(s.name, start, count, weight)
              for s, start, count, weight in zip(sources, starts, counts, weights)]
    validation = [example for examples in validation_by_source.values() for example in examples] or None
    return EncodedData(train, validation, template, formats, stats, sources=slices,
                        validation_by_source=validation_by_source)

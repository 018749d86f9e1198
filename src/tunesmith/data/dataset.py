"""From the recipe's data section to encoded training and validation examples."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Iterable, Optional

from tunesmith.config import DataSection
from tunesmith.data.encode import EncodedExample, encode_example
from tunesmith.data.formats import FORMATS, Example, FormatOptions, detect_format
from tunesmith.data.readers import read_records
from tunesmith.data.templates import resolve_template
from tunesmith.errors import TunesmithError

logger = logging.getLogger(__name__)


@dataclass
class EncodeStats:
    """What happened to the records of one split."""

    records: int = 0
    truncated: int = 0
    dropped: int = 0
    target_tokens: int = 0
    longest: int = 0

    def describe(self, split: str) -> str:
        return (
            f"{split}: {self.records - self.dropped} examples ({self.truncated} truncated, "
            f"{self.dropped} dropped as longer than max_length before any answer token), "
            f"{self.target_tokens} target tokens"
        )


@dataclass
class PreparedData:
    """Encoded splits and how they were made."""

    train: list[EncodedExample]
    validation: Optional[list[EncodedExample]]
    template: str
    formats: dict[str, str] = field(default_factory=dict)
    stats: dict[str, EncodeStats] = field(default_factory=dict)
    sources: list = field(default_factory=list)  # SourceSlice per data source when mixing (data.sources)
    validation_by_source: dict[str, list[EncodedExample]] = field(default_factory=dict)


def load_examples(path: str, data_format: str = "auto", options: FormatOptions = FormatOptions()) -> tuple[list[Example], str]:
    """Read a file into examples.

    Returns:
        The examples and the name of the format used (detected from the first record for auto).

    Raises:
        TunesmithError: If the file is empty, malformed, or a record does not fit the format.
    """
    examples: list[Example] = []
    converter = None
    for record in read_records(path, options.text_field):
        if converter is None:
            if data_format == "auto":
                data_format = detect_format(record, options.text_field)
            converter = FORMATS.get(data_format).convert
        examples.append(converter(record, options))
    if not examples:
        raise TunesmithError(f"data file {path} holds no records")
    return examples, data_format


def encode_all(
    examples: Iterable[Example], tokenizer, section: DataSection, split: str
) -> tuple[list[EncodedExample], EncodeStats]:
    """Encode examples; report truncated and dropped ones, and refuse an empty result."""
    stats = EncodeStats()
    encoded: list[EncodedExample] = []
    first_dropped = ""
    for example in examples:
        stats.records += 1
        item = encode_example(example, tokenizer, section.max_length, section.train_on)
        if item is None:
            stats.dropped += 1
            first_dropped = first_dropped or example.where
            continue
        stats.truncated += item.truncated
        stats.target_tokens += item.num_target_tokens
        stats.longest = max(stats.longest, len(item.input_ids))
        encoded.append(item)
    if not encoded:
        raise TunesmithError(
            f"every {split} example was dropped: data.max_length={section.max_length} is shorter than "
            "each prompt, so no answer token is left to learn; raise data.max_length"
        )
    if stats.dropped:
        logger.warning("%d of %d %s examples dropped: no answer token within data.max_length=%d (the first: %s); "
                       "raise data.max_length or shorten those prompts", stats.dropped, stats.records, split,
                       section.max_length, first_dropped)
    return encoded, stats


def prepare_data(section: DataSection, tokenizer, seed: int) -> PreparedData:
    """Read, convert, template, tokenise and split the recipe's data.

    Args:
        section: The recipe's data section.
        tokenizer: The model's tokenizer; its chat template is set to the one the run uses.
        seed: Seed of the validation split by fraction.
    """
    if section.sources:
        from tunesmith.data.mixing import prepare_mixture

        return prepare_mixture(section, tokenizer, seed)
    template = resolve_template(tokenizer, section.template)
    options = FormatOptions(text_field=section.text_field, system_prompt=section.system_prompt)
    formats: dict[str, str] = {}
    train_examples: list[Example] = []
    from tunesmith.data.prepare.pipeline import prepare_for_training

    for path in prepare_for_training(section, tokenizer, template):
        examples, formats[path] = load_examples(path, section.format, options)
        train_examples += examples
    validation_examples: Optional[list[Example]] = None
    if section.validation:
        validation_examples, formats[section.validation] = load_examples(section.validation, section.format, options)
    elif section.validation_fraction:
        train_examples, validation_examples = split_by_fraction(train_examples, section.validation_fraction, seed)
    train, train_stats = encode_all(train_examples, tokenizer, section, "training")
    stats = {"train": train_stats}
    validation = None
    if validation_examples is not None:
        validation, stats["validation"] = encode_all(validation_examples, tokenizer, section, "validation")
    return PreparedData(train, validation, template, formats, stats)


def split_by_fraction(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Seeded random split; the held-out part has at least one example and the rest too."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held_out = max(1, round(len(examples) * fraction))
    if held_out >= len(examples):
        raise TunesmithError(
            f"data.validation_fraction={fraction} leaves no training data from {len(examples)} examples"
        )
    held = set(order[:held_out])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])

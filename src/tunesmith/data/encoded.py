"""What every way of preparing data shares: reading a file into examples, encoding them, splitting.

:mod:`tunesmith.data.dataset` (one source) and :mod:`tunesmith.data.mixing` (several sources) both
build a :class:`EncodedData` from these pieces.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Iterable, Literal, Optional

from tunesmith.core.errors import TunesmithError
from tunesmith.data.encode import EncodedExample, Reasoning, encode_example
from tunesmith.data.formats import FORMATS, Example, FormatOptions, detect_format
from tunesmith.data.readers import read_records

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
class EncodedData:
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
                data_format = detect_format(record, options.text_field, options.columns)
            converter = FORMATS.get(data_format).convert
        examples.append(converter(record, options))
    if not examples:
        raise TunesmithError(f"data file {path} holds no records")
    return examples, data_format


def encode_all(
    examples: Iterable[Example], tokenizer, max_length: int, split: str,
    train_on: Literal["assistant", "all"] = "assistant", reasoning: Reasoning = "keep",
) -> tuple[list[EncodedExample], EncodeStats]:
    """Encode examples; report truncated and dropped ones, and refuse an empty result.

    Args:
        max_length: Longest token sequence (``data.max_length``).
        split: How to name the split in messages ("training", "validation", ...).
        train_on: Loss on assistant tokens only, or on every token (``data.train_on``).
        reasoning: Keep, strip or mask ``<think>`` traces (``data.reasoning``).
    """
    stats = EncodeStats()
    encoded: list[EncodedExample] = []
    first_dropped = ""
    for example in examples:
        stats.records += 1
        item = encode_example(example, tokenizer, max_length, train_on, reasoning)
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
            f"every {split} example was dropped: data.max_length={max_length} is shorter than "
            "each prompt, so no answer token is left to learn; raise data.max_length"
        )
    if stats.dropped:
        logger.warning("%d of %d %s examples dropped: no answer token within data.max_length=%d (the first: %s); "
                       "raise data.max_length or shorten those prompts", stats.dropped, stats.records, split,
                       max_length, first_dropped)
    return encoded, stats


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

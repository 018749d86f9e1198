"""From the recipe's data section to encoded training and validation examples.

One data source (``data.train``) is read here; several (``data.sources``) are mixed by
:mod:`tunesmith.data.mixing`. Both build on the shared pieces of :mod:`tunesmith.data.encoded`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from tunesmith.config import DataSection
from tunesmith.data.encoded import EncodedData, EncodeStats, encode_all, load_examples, split_by_fraction
from tunesmith.data.formats import Example, FormatOptions
from tunesmith.data.mixing import encode_mixture
from tunesmith.data.prepare.pipeline import prepare_for_training
from tunesmith.data.templates import resolve_template

__all__ = ["EncodeStats", "EncodedData", "encode_all", "load_examples", "encode_data", "split_by_fraction"]


def encode_data(section: DataSection, tokenizer, seed: int, cache: Optional[Path] = None) -> EncodedData:
    """Read, convert, template, tokenise and split the recipe's data.

    Args:
        section: The recipe's data section.
        tokenizer: The model's tokenizer; its chat template is set to the one the run uses.
        seed: Seed of the validation split by fraction.
        cache: tunesmith's cache folder (``Runtime.cache``), where ``data.prepare`` keeps prepared copies.
    """
    if section.sources:
        return encode_mixture(section, tokenizer, seed)
    template = resolve_template(tokenizer, section.template)
    options = FormatOptions(text_field=section.text_field, system_prompt=section.system_prompt,
                            columns=section.columns)
    formats: dict[str, str] = {}
    train_examples: list[Example] = []
    for path in prepare_for_training(section, tokenizer, template, cache):
        examples, formats[path] = load_examples(path, section.format, options)
        train_examples += examples
    validation_examples: Optional[list[Example]] = None
    if section.validation:
        validation_examples, formats[section.validation] = load_examples(section.validation, section.format, options)
    elif section.validation_fraction:
        train_examples, validation_examples = split_by_fraction(train_examples, section.validation_fraction, seed)
    train, train_stats = encode_all(train_examples, tokenizer, section.max_length, "training", section.train_on,
                                         section.reasoning)
    stats = {"train": train_stats}
    validation = None
    if validation_examples is not None:
        validation, stats["validation"] = encode_all(validation_examples, tokenizer, section.max_length,
                                                     "validation", section.train_on, section.reasoning)
    return EncodedData(train, validation, template, formats, stats)

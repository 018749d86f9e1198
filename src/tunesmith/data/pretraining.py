"""Data of continued pre-training (``stage: pt``): plain text, no template, every token a target.

Each record's text is tokenised with the tokenizer's BOS and EOS and cut into blocks of
``data.max_length`` tokens (nothing is truncated away); the run's packing lever then puts several
blocks in one row without padding.
"""

from __future__ import annotations

from typing import Optional

from tunesmith.config import DataSection
from tunesmith.core.errors import TunesmithError
from tunesmith.data.encode import EncodedExample
from tunesmith.data.encoded import EncodedData, EncodeStats, load_examples, split_by_fraction
from tunesmith.data.formats import Example, FormatOptions
from tunesmith.data.preference import refuse_unsupported

MIN_BLOCK = 2  # a block of one token predicts nothing


def text_blocks(examples: list[Example], tokenizer, max_length: int) -> tuple[list[EncodedExample], EncodeStats]:
    """BOS + text + EOS of each example, cut into ``max_length`` blocks; labels equal the ids."""
    stats, blocks = EncodeStats(), []
    for example in examples:
        stats.records += 1
        ids = list(tokenizer(example.text, add_special_tokens=False)["input_ids"])
        ids = [tokenizer.bos_token_id] * (tokenizer.bos_token_id is not None) + ids
        ids += [tokenizer.eos_token_id] * (tokenizer.eos_token_id is not None)
        for start in range(0, len(ids), max_length):
            block = tuple(ids[start : start + max_length])
            if len(block) >= MIN_BLOCK:
                blocks.append(EncodedExample(block, block))
                stats.target_tokens += len(block) - 1
                stats.longest = max(stats.longest, len(block))
    if not blocks:
        raise TunesmithError("stage pt: the data holds no text to learn from")
    return blocks, stats


def encode_corpus(section: DataSection, tokenizer, seed: int) -> EncodedData:
    """Plain-text records (``data.text_field``; .txt lines) -> blocks for training and validation.

    Raises:
        TunesmithError: If a record has no text field (naming the row) or an option does not apply.
    """
    refuse_unsupported(section, "pt")
    options = FormatOptions(text_field=section.text_field)
    train: list[Example] = []
    for path in section.train:
        train += load_examples(path, "text", options)[0]
    validation: Optional[list[Example]] = None
    if section.validation:
        validation = load_examples(section.validation, "text", options)[0]
    elif section.validation_fraction:
        train, validation = split_by_fraction(train, section.validation_fraction, seed)
    blocks, train_stats = text_blocks(train, tokenizer, section.max_length)
    stats = {"train": train_stats}
    held_out = None
    if validation is not None:
        held_out, stats["validation"] = text_blocks(validation, tokenizer, section.max_length)
    return EncodedData(blocks, held_out, "none", {path: "text" for path in section.train}, stats)

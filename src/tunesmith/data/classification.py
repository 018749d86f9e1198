"""Data of sequence classification (``stage: cls``): a text and a label per row (GLUE-style TSV, CSV, JSON).

For a causal LM the text is tokenised after the tokenizer's BOS (no chat template) and cut to
``data.max_length``; for an encoder with the tokenizer's own special tokens (BERT: ``[CLS] text
[SEP]``), cut before its closing token. The label becomes its index in the label set (given, or the
sorted labels of the training data).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from tunesmith.config import DataSection
from tunesmith.core.errors import TunesmithError
from tunesmith.data.encode import IGNORE_INDEX, EncodedExample
from tunesmith.data.encoded import EncodedData, EncodeStats, split_by_fraction
from tunesmith.data.preference import refuse_unsupported
from tunesmith.data.readers import RawRecord, read_records


@dataclass(frozen=True)
class EncodedText:
    """A text's token ids and its label's index (and the text, for the zero-shot baseline)."""

    input_ids: tuple[int, ...]
    label: int
    text: str = ""

    @property
    def example(self) -> EncodedExample:
        """For collation (padding or packing): no token is a language-model target."""
        return EncodedExample(self.input_ids, (IGNORE_INDEX,) * len(self.input_ids))


def label_text(record: RawRecord, field: str) -> str:
    value = record.fields.get(field)
    if value is None or isinstance(value, (list, dict)):
        raise TunesmithError(f"{record.where}: missing label field '{field}' (fields present: "
                             f"{', '.join(record.fields) or 'none'}); set data.columns.label (or stage.label_field)")
    return str(value).strip()


def encode_text(tokenizer, text: str, encoder: bool = False) -> list[int]:
    """A text's token ids as stage cls reads them: after BOS for a causal LM, framed by the tokenizer's own
    special tokens for an encoder (``[CLS] ... [SEP]``); not yet cut to a length (see :func:`cut`)."""
    if encoder:
        return list(tokenizer(text.strip())["input_ids"])
    ids = [tokenizer.bos_token_id] * (tokenizer.bos_token_id is not None)
    return ids + list(tokenizer(text.strip(), add_special_tokens=False)["input_ids"])


def cut(ids: list[int], max_length: int, encoder: bool = False) -> tuple[int, ...]:
    """The first ``max_length`` ids; an encoder's closing special token (``[SEP]``) is kept."""
    if len(ids) <= max_length:
        return tuple(ids)
    return tuple(ids[: max_length - 1] + ids[-1:]) if encoder else tuple(ids[:max_length])


def encode_texts(records: Sequence[RawRecord], tokenizer, labels: Sequence[str], text_field: str, label_field: str,
                 max_length: int, encoder: bool = False) -> tuple[list[EncodedText], EncodeStats]:
    """Encode rows; a label outside ``labels`` is an error naming the row.

    Raises:
        TunesmithError: For a missing text or label field, or an unknown label.
    """
    index = {label: position for position, label in enumerate(labels)}
    stats, encoded = EncodeStats(), []
    for record in records:
        stats.records += 1
        text = record.fields.get(text_field)
        if not isinstance(text, str):
            raise TunesmithError(f"{record.where}: missing text field '{text_field}' (fields present: "
                                 f"{', '.join(record.fields) or 'none'}); set data.columns.prompt (or stage.text_field)")
        label = label_text(record, label_field)
        if label not in index:
            raise TunesmithError(f"{record.where}: label {label!r} is not in the label set {list(labels)}; "
                                 "fix the row or list every label in stage.labels")
        ids = encode_text(tokenizer, text, encoder)
        stats.truncated += len(ids) > max_length
        stats.longest = max(stats.longest, min(len(ids), max_length))
        encoded.append(EncodedText(cut(ids, max_length, encoder), index[label], text))
    return encoded, stats


def encode_classification(section: DataSection, tokenizer, seed: int, text_field: str, label_field: str,
                           labels: Optional[Sequence[str]],
                           encoder: bool = False) -> tuple[EncodedData, tuple[str, ...]]:
    """Read, split and encode text/label rows (``encoder``: for an encoder-only model, see :func:`encode_text`).

    Returns:
        The prepared data and the label set in head order.
    """
    refuse_unsupported(section, "cls")
    train = [record for path in section.train for record in read_records(path, text_field)]
    if not train:
        raise TunesmithError("stage cls: the training data holds no rows")
    validation = list(read_records(section.validation, text_field)) if section.validation else None
    if validation is None and section.validation_fraction:
        train, validation = split_by_fraction(train, section.validation_fraction, seed)
    label_set = tuple(labels) if labels else tuple(sorted({label_text(r, label_field) for r in train}))
    if len(label_set) < 2:
        raise TunesmithError(f"stage cls needs at least two labels; the training data has {list(label_set)}")
    encoded, stats = encode_texts(train, tokenizer, label_set, text_field, label_field, section.max_length, encoder)
    all_stats = {"train": stats}
    held_out = None
    if validation is not None:
        held_out, all_stats["validation"] = encode_texts(validation, tokenizer, label_set, text_field, label_field,
                                                         section.max_length, encoder)
    return EncodedData(encoded, held_out, "none", {path: "text/label" for path in section.train}, all_stats), label_set

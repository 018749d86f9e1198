"""Data of the stages that learn from judgements: preference pairs (rm, dpo, orpo, simpo) and
labelled single replies (kto).

A reply is encoded as the prompt's tokens followed by the reply's, exactly as the chat template
renders the conversation (:func:`tunesmith.data.encode.conversation_segments`); only the final
assistant reply is scored, earlier assistant turns of the prompt are context. Keeping the prompt
and the reply apart is what TRL's preference data holds too (``prompt_ids``, ``chosen_ids``,
``rejected_ids``), so its collator and losses can be compared on the very same tokens.

Rows that cannot teach anything are skipped and counted, as SFT data's too-long prompts are: an
empty prompt or reply, identical chosen and rejected replies, a prompt that fills ``max_length``.
A missing or malformed field is an error naming the row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from tunesmith.config import DataSection
from tunesmith.core.errors import TunesmithError
from tunesmith.data.encode import IGNORE_INDEX, EncodedExample, conversation_segments
from tunesmith.data.encoded import EncodedData, EncodeStats, split_by_fraction
from tunesmith.data.formats import PREFERENCE_LAYOUT, FormatOptions, _messages, _sharegpt, preference_parts
from tunesmith.data.readers import RawRecord, read_records
from tunesmith.data.templates import resolve_template

KTO_LAYOUT = ("kto format (messages or conversations ending with the assistant reply, and a boolean "
              "'label': true for a desirable reply, false for an undesirable one)")


@dataclass(frozen=True)
class EncodedReply:
    """A prompt and one reply to it, as token ids (the reply includes the template's end marker)."""

    prompt_ids: tuple[int, ...]
    reply_ids: tuple[int, ...]

    def example(self, max_length: int) -> EncodedExample:
        """Prompt + reply cut to ``max_length``, labels on the reply only (what collation pads or packs)."""
        ids = (self.prompt_ids + self.reply_ids)[:max_length]
        labels = ((IGNORE_INDEX,) * len(self.prompt_ids) + self.reply_ids)[:max_length]
        return EncodedExample(ids, labels, len(self.prompt_ids) + len(self.reply_ids) > max_length)


@dataclass(frozen=True)
class EncodedPair:
    """One prompt with a chosen and a rejected reply (already cut to ``max_length``)."""

    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    max_length: int

    @property
    def chosen(self) -> EncodedExample:
        return EncodedReply(self.prompt_ids, self.chosen_ids).example(self.max_length)

    @property
    def rejected(self) -> EncodedExample:
        return EncodedReply(self.prompt_ids, self.rejected_ids).example(self.max_length)

    @property
    def input_ids(self) -> tuple[int, ...]:
        """Every token the pair feeds the model, chosen then rejected (length grouping reads its length)."""
        return self.chosen.input_ids + self.rejected.input_ids


@dataclass(frozen=True)
class EncodedLabelledReply:
    """One prompt and reply judged desirable or not (KTO)."""

    prompt_ids: tuple[int, ...]
    reply_ids: tuple[int, ...]
    desirable: bool
    max_length: int

    @property
    def input_ids(self) -> tuple[int, ...]:
        return EncodedReply(self.prompt_ids, self.reply_ids).example(self.max_length).input_ids


@dataclass
class JudgedStats(EncodeStats):
    """What happened to the rows of one split of preference or KTO data."""

    identical: int = 0
    empty: int = 0

    def describe(self, split: str) -> str:
        kept = self.records - self.dropped - self.identical - self.empty
        return (f"{split}: {kept} examples ({self.truncated} truncated; skipped: {self.dropped} whose prompt fills "
                f"max_length, {self.identical} with identical replies, {self.empty} with an empty prompt or reply), "
                f"{self.target_tokens} scored reply tokens")


def encode_reply(tokenizer, prompt: list[dict[str, str]], reply: str) -> EncodedReply:
    """Render ``prompt`` + the assistant ``reply`` with the chat template; the last assistant segment is the reply."""
    segments = conversation_segments(tokenizer, (*prompt, {"role": "assistant", "content": reply}))
    last = max(index for index, (_, trained) in enumerate(segments) if trained)
    prompt_ids = [token for text, _ in segments[:last] for token in _tokens(tokenizer, text)]
    return EncodedReply(tuple(prompt_ids), tuple(_tokens(tokenizer, segments[last][0])))


def _tokens(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _blank(prompt: list[dict[str, str]], *replies: str) -> bool:
    return not any(turn["content"].strip() for turn in prompt if turn["role"] != "system") or \
        not all(reply.strip() for reply in replies)


def encode_pairs(records: Iterable[RawRecord], tokenizer, max_length: int) -> tuple[list[EncodedPair], JudgedStats]:
    """Encode preference rows; skip and count those that cannot teach a preference.

    Raises:
        TunesmithError: If a row lacks a field of the preference layout (naming the row and the layout).
    """
    stats, pairs = JudgedStats(), []
    for record in records:
        stats.records += 1
        prompt, chosen, rejected = preference_parts(record)
        if _blank(prompt, chosen, rejected):
            stats.empty += 1
        elif chosen.strip() == rejected.strip():
            stats.identical += 1
        else:
            good, bad = encode_reply(tokenizer, prompt, chosen), encode_reply(tokenizer, prompt, rejected)
            if good.prompt_ids != bad.prompt_ids:
                raise TunesmithError(f"{record.where}: the chat template renders the prompt differently before the "
                                     "chosen and the rejected reply; choose another data.template (e.g. chatml)")
            if len(good.prompt_ids) >= max_length - 1:
                stats.dropped += 1  # not one reply token would be scored
                continue
            room = max_length - len(good.prompt_ids)
            pair = EncodedPair(good.prompt_ids, good.reply_ids[:room], bad.reply_ids[:room], max_length)
            stats.truncated += len(good.reply_ids) > room or len(bad.reply_ids) > room
            stats.target_tokens += pair.chosen.num_target_tokens + pair.rejected.num_target_tokens
            stats.longest = max(stats.longest, len(pair.chosen.input_ids), len(pair.rejected.input_ids))
            pairs.append(pair)
    return pairs, stats


def judged_conversation(record: RawRecord, layout: str = KTO_LAYOUT) -> list[dict[str, str]]:
    """A row's conversation (``messages`` or ShareGPT ``conversations``) ending in the assistant reply judged.

    Raises:
        TunesmithError: If the conversation is missing (naming ``layout``) or does not end with an assistant reply.
    """
    if "conversations" in record.fields:
        turns = list(_sharegpt(record, FormatOptions()).messages)
    elif "messages" in record.fields:
        turns = list(_messages(record, FormatOptions()).messages)
    else:
        raise TunesmithError(f"{record.where}: missing field 'messages' expected by the {layout} "
                             f"(fields present: {', '.join(record.fields) or 'none'})")
    if not turns or turns[-1]["role"] != "assistant":
        raise TunesmithError(f"{record.where}: the conversation must end with the assistant reply that is judged")
    return turns


def kto_parts(record: RawRecord) -> tuple[list[dict[str, str]], str, bool]:
    """A KTO row's prompt turns, final assistant reply and label.

    Raises:
        TunesmithError: If the conversation, its final reply or the boolean label is missing.
    """
    turns = judged_conversation(record)
    label = record.fields.get("label", record.fields.get("kto_tag"))
    if not isinstance(label, bool):
        raise TunesmithError(f"{record.where}: field 'label' must be true or false, as the {KTO_LAYOUT} expects")
    return turns[:-1], turns[-1]["content"], label


def encode_labelled(records: Iterable[RawRecord], tokenizer, max_length: int) -> tuple[list[EncodedLabelledReply],
                                                                                          JudgedStats]:
    """Encode KTO rows; skip and count empty ones and those whose prompt fills ``max_length``."""
    stats, examples = JudgedStats(), []
    for record in records:
        stats.records += 1
        prompt, reply, desirable = kto_parts(record)
        if _blank(prompt, reply):
            stats.empty += 1
            continue
        encoded = encode_reply(tokenizer, prompt, reply)
        if len(encoded.prompt_ids) >= max_length - 1:
            stats.dropped += 1
            continue
        example = encoded.example(max_length)
        stats.truncated += example.truncated
        stats.target_tokens += example.num_target_tokens
        stats.longest = max(stats.longest, len(example.input_ids))
        reply_ids = encoded.reply_ids[: max_length - len(encoded.prompt_ids)]
        examples.append(EncodedLabelledReply(encoded.prompt_ids, reply_ids, desirable, max_length))
    return examples, stats


def encode_judged(section: DataSection, tokenizer, seed: int, stage: str, layout: str,
                   encode: Callable[[Iterable[RawRecord], object, int], tuple[list, JudgedStats]]) -> EncodedData:
    """Read, split and encode the data of a judgement stage (one source; validation file or fraction).

    Args:
        stage: The stage's name, for messages.
        layout: The layout the stage expects, for messages.
        encode: :func:`encode_pairs` or :func:`encode_labelled`.

    Raises:
        TunesmithError: For options the stage does not support, or when nothing is left to learn from.
    """
    refuse_unsupported(section, stage)
    template = resolve_template(tokenizer, section.template)
    train_records = [record for path in section.train for record in read_records(path, section.text_field)]
    validation_records: Optional[list[RawRecord]] = None
    if section.validation:
        validation_records = list(read_records(section.validation, section.text_field))
    elif section.validation_fraction:
        train_records, validation_records = split_by_fraction(train_records, section.validation_fraction, seed)
    train, stats = encode_all_judged(train_records, tokenizer, section.max_length, "training", stage, layout, encode)
    all_stats = {"train": stats}
    validation = None
    if validation_records is not None:
        validation, all_stats["validation"] = encode_all_judged(validation_records, tokenizer, section.max_length,
                                                                "validation", stage, layout, encode)
    return EncodedData(train, validation, template, {path: stage for path in section.train}, all_stats)


def encode_all_judged(records: list[RawRecord], tokenizer, max_length: int, split: str, stage: str, layout: str,
                      encode) -> tuple[list, JudgedStats]:
    if not records:
        raise TunesmithError(f"the {split} data of stage {stage} holds no records")
    encoded, stats = encode(records, tokenizer, max_length)
    if not encoded:
        raise TunesmithError(f"stage {stage}: every {split} row was skipped ({stats.describe(split)}); it expects the "
                             f"{layout}")
    return encoded, stats


def refuse_unsupported(section: DataSection, stage: str) -> None:
    """Data options that apply to supervised text only are an error, not silently ignored."""
    if section.sources:
        raise TunesmithError(f"data.sources (mixing) is not supported by stage {stage}; give data.train")
    if section.prepare is not None:
        raise TunesmithError(f"data.prepare is not supported by stage {stage}; remove it")
    if section.format not in ("auto", "preference", "kto", "text"):
        raise TunesmithError(f"data.format {section.format!r} does not fit stage {stage}; leave it 'auto'")
    if section.columns is not None and stage != "cls":
        raise TunesmithError(f"data.columns is not read by stage {stage} (it has a layout of its own); remove it")
    if section.columns is not None and section.columns.system:
        raise TunesmithError("data.columns.system: stage cls reads only the prompt and label columns; remove it")


__all__ = ["EncodedLabelledReply", "EncodedPair", "EncodedReply", "JudgedStats", "PREFERENCE_LAYOUT", "KTO_LAYOUT",
           "encode_labelled", "encode_pairs", "encode_reply", "judged_conversation", "encode_judged"]

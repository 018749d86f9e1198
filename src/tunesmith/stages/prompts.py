"""Prompts with reference answers, the data of online RL.

A record gives its prompt as ``prompt`` (text or a list of turns) or ``question`` (GSM8K), with the
reference in ``answer``, ``reference`` or ``solution`` (optional where only a reward model scores);
any conversation layout of :mod:`tunesmith.data.formats` (alpaca, messages, sharegpt) works too,
its last assistant turn being the reference and the turns before it the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from tunesmith.config import DataSection
from tunesmith.core.errors import TunesmithError
from tunesmith.data.encode import render_prompt
from tunesmith.data.encoded import EncodedData, EncodeStats, split_by_fraction
from tunesmith.data.formats import FORMATS, ROLES, FormatOptions, detect_format
from tunesmith.data.readers import RawRecord, read_records
from tunesmith.data.templates import resolve_template

PROMPT_FIELDS = ("prompt", "question")
REFERENCE_FIELDS = ("answer", "reference", "solution")
LAYOUT = ("prompt/question (text or turns) with an optional answer/reference/solution, or a conversation "
          "(alpaca, messages, sharegpt) whose last assistant turn is the reference")


@dataclass
class PromptStats(EncodeStats):
    """What happened to the prompts of one split (no targets: the completions are sampled)."""

    def describe(self, split: str) -> str:
        return (f"{split}: {self.records - self.dropped} prompts ({self.dropped} dropped as longer than "
                f"data.max_length - stage.max_new_tokens), the longest {self.longest} tokens")


@dataclass(frozen=True)
class PromptRecord:
    """A prompt as turns, its reference answer, and where it came from."""

    messages: tuple[dict[str, str], ...]
    reference: Optional[str]
    where: str


@dataclass(frozen=True)
class PromptExample:
    """An encoded prompt: the tokens generation starts from, and what the rewards compare with.

    Attributes:
        input_ids: The rendered prompt's tokens (the chat template's generation prompt included).
        prompt_text: The rendered prompt (what reward models read before the completion).
        reference: The reference answer, or None.
        messages: The prompt turns.
        where: ``file, line N``.
    """

    input_ids: tuple[int, ...]
    prompt_text: str
    reference: Optional[str]
    messages: tuple[dict[str, str], ...] = field(default=(), compare=False)
    where: str = ""


def record_prompt(record: RawRecord, data_format: str, options: FormatOptions) -> PromptRecord:
    """The prompt turns and reference of one record.

    Raises:
        TunesmithError: If the record has no prompt, or a conversation ends without an assistant turn
            to take the reference from; names the record and the layout.
    """
    fields = record.fields
    prompt_field = next((name for name in PROMPT_FIELDS if name in fields), None)
    mapped = options.columns is not None and options.columns.prompt in fields  # data.columns wins over field names
    if data_format == "auto" and prompt_field is not None and not mapped:
        messages = _prompt_turns(record, fields[prompt_field])
        reference = next((fields[name] for name in REFERENCE_FIELDS if fields.get(name) is not None), None)
        if system := options.system_prompt:
            messages = [{"role": "system", "content": system}, *messages] if messages[0]["role"] != "system" \
                else messages
        return PromptRecord(tuple(messages), None if reference is None else str(reference), record.where)
    name = detect_format(record, options.text_field, options.columns) if data_format == "auto" else data_format
    if name == "text":
        raise TunesmithError(f"{record.where}: a grpo prompt cannot be plain text; expected {LAYOUT}")
    turns = list(FORMATS.get(name).convert(record, options).messages)
    if not turns or turns[-1]["role"] != "assistant" or len(turns) < 2:
        raise TunesmithError(f"{record.where}: the conversation must end with the assistant's reference answer "
                             f"after a prompt; expected {LAYOUT}")
    return PromptRecord(tuple(turns[:-1]), turns[-1]["content"], record.where)


def _prompt_turns(record: RawRecord, value) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(
            isinstance(t, dict) and t.get("role") in ROLES and isinstance(t.get("content"), str) for t in value):
        return [{"role": t["role"], "content": t["content"]} for t in value]
    raise TunesmithError(f"{record.where}: the prompt must be text or a list of {{role, content}} turns; "
                         f"expected {LAYOUT}")


def read_prompts(path: str, data_format: str, options: FormatOptions) -> list[PromptRecord]:
    """Every prompt of a file.

    Raises:
        TunesmithError: If the file is empty or a record does not fit.
    """
    prompts = [record_prompt(record, data_format, options) for record in read_records(path, options.text_field)]
    if not prompts:
        raise TunesmithError(f"data file {path} holds no records")
    return prompts


def encode_prompts(prompts: list[PromptRecord], tokenizer, max_prompt_length: int, split: str,
                   need_reference: bool) -> tuple[list[PromptExample], PromptStats]:
    """Render and tokenise prompts; drop those longer than ``max_prompt_length`` (counted in the stats).

    Raises:
        TunesmithError: If a reward compares with references and a prompt has none, or nothing is left.
    """
    stats, encoded = PromptStats(), []
    for prompt in prompts:
        stats.records += 1
        if need_reference and prompt.reference is None:
            raise TunesmithError(f"{prompt.where}: no reference answer (answer, reference or solution field), which "
                                 "an exact_match/answer_match reward needs; add one or use other rewards")
        text = render_prompt(tokenizer, list(prompt.messages))
        ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) > max_prompt_length:
            stats.dropped += 1
            continue
        stats.longest = max(stats.longest, len(ids))
        encoded.append(PromptExample(ids, text, prompt.reference, prompt.messages, prompt.where))
    if not encoded:
        raise TunesmithError(f"every {split} prompt is longer than data.max_length minus stage.max_new_tokens "
                             f"({max_prompt_length} tokens); raise data.max_length")
    return encoded, stats


def load_prompts(section: DataSection, tokenizer, seed: int, max_new_tokens: int,
                    need_reference: bool) -> EncodedData:
    """The training and validation prompts of the recipe's ``data`` section.

    Raises:
        TunesmithError: For data mixtures (not supported by this stage) and for bad records.
    """
    if section.sources:
        raise TunesmithError("data.sources: the grpo stage reads prompts from data.train alone; mix the files first "
                             "(tunesmith data convert) or list them all under data.train")
    template = resolve_template(tokenizer, section.template)
    options = FormatOptions(text_field=section.text_field, system_prompt=section.system_prompt,
                            columns=section.columns)
    train = [prompt for path in section.train for prompt in read_prompts(path, section.format, options)]
    validation = read_prompts(section.validation, section.format, options) if section.validation else None
    if validation is None and section.validation_fraction:
        train, validation = split_by_fraction(train, section.validation_fraction, seed)
    limit = section.max_length - max_new_tokens
    if limit < 1:
        raise TunesmithError(f"data.max_length ({section.max_length}) leaves no room for a prompt before "
                             f"stage.max_new_tokens ({max_new_tokens}) completion tokens; raise data.max_length")
    encoded, stats = encode_prompts(train, tokenizer, limit, "training", need_reference)
    held_out, all_stats = None, {"train": stats}
    if validation is not None:
        held_out, all_stats["validation"] = encode_prompts(validation, tokenizer, limit, "validation", need_reference)
    return EncodedData(encoded, held_out, template, {path: section.format for path in section.train}, all_stats)

"""``data convert``: rewrite records from one layout to another (alpaca, sharegpt, messages, preference, text).

Reading goes through the data-format registry; writing through :data:`WRITERS`, one function per
layout turning a conversation (and, for preference data, the rejected reply) into fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from tunesmith.core.errors import TunesmithError
from tunesmith.core.registry import Registry
from tunesmith.data.formats import FORMATS, Example, FormatOptions, detect_format, preference_parts
from tunesmith.data.prepare.records import AtomicJsonlWriter, BadRecords, OnError, stream_records
from tunesmith.data.readers import RawRecord

Messages = list[dict[str, str]]
WRITERS: Registry[Callable[[Messages, Optional[str], str], dict[str, Any]]] = Registry("output layout")
SHAREGPT_NAMES = {"user": "human", "assistant": "gpt", "system": "system"}


def _split_last_reply(messages: Messages, where: str) -> tuple[Messages, str]:
    if not messages or messages[-1]["role"] != "assistant":
        raise TunesmithError(f"{where}: the conversation does not end with an assistant reply, so it has no output")
    return messages[:-1], messages[-1]["content"]


@WRITERS.register("alpaca")
def write_alpaca(messages: Messages, rejected: Optional[str], where: str) -> dict[str, Any]:
    """instruction/output, earlier turns as ``history`` pairs, a leading system turn as ``system``."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    prompt, output = _split_last_reply(turns, where)
    if not prompt or prompt[-1]["role"] != "user" or len(prompt) % 2 == 0:
        raise TunesmithError(f"{where}: alpaca needs alternating user/assistant turns ending in a user question")
    fields: dict[str, Any] = {"instruction": prompt[-1]["content"], "input": "", "output": output}
    if len(prompt) > 1:
        fields["history"] = [[prompt[i]["content"], prompt[i + 1]["content"]] for i in range(0, len(prompt) - 1, 2)]
    if system:
        fields["system"] = system[0]
    return fields


@WRITERS.register("sharegpt")
def write_sharegpt(messages: Messages, rejected: Optional[str], where: str) -> dict[str, Any]:
    """``conversations`` of ``{from, value}`` turns."""
    return {"conversations": [{"from": SHAREGPT_NAMES[m["role"]], "value": m["content"]} for m in messages]}


@WRITERS.register("messages")
def write_messages(messages: Messages, rejected: Optional[str], where: str) -> dict[str, Any]:
    """``messages`` of ``{role, content}`` turns."""
    return {"messages": [dict(m) for m in messages]}


@WRITERS.register("preference")
def write_preference(messages: Messages, rejected: Optional[str], where: str) -> dict[str, Any]:
    """``messages`` of the prompt turns with ``chosen`` and ``rejected`` replies as text."""
    if rejected is None:
        raise TunesmithError(f"{where}: the record has no rejected reply, so it cannot become a preference pair")
    prompt, chosen = _split_last_reply(messages, where)
    return {"messages": prompt, "chosen": chosen, "rejected": rejected}


@WRITERS.register("text")
def write_text(messages: Messages, rejected: Optional[str], where: str) -> dict[str, Any]:
    """``text``: only plain-text records can be written as text (a conversation needs its template)."""
    raise TunesmithError(f"{where}: a conversation cannot be written as plain text; convert it to messages instead")


def read_conversation(record: RawRecord, data_format: str, options: FormatOptions) -> tuple[Example, Optional[str]]:
    """The record as an example, and its rejected reply when it is a preference pair."""
    example = FORMATS.get(data_format).convert(record, options)
    rejected = preference_parts(record)[2] if data_format == "preference" else None
    return example, rejected


@dataclass
class ConvertReport:
    """Records read and written, the source layout, and skipped ones."""

    source_format: str = ""
    read: int = 0
    written: int = 0
    bad: BadRecords = field(default_factory=BadRecords)

    def as_dict(self) -> dict[str, Any]:
        return {"source_format": self.source_format, "read": self.read, "written": self.written,
                "skipped_bad": self.bad.count, "bad_examples": self.bad.examples}

    def describe(self) -> str:
        return (f"read {self.read} {self.source_format} records, wrote {self.written}; "
                f"skipped as malformed or not convertible: {self.bad.count}")


def convert_file(source: str | Path, output: str | Path, target: str, *, source_format: str = "auto",
                 options: FormatOptions = FormatOptions(), on_error: OnError = "fail",
                 force: bool = False) -> ConvertReport:
    """Rewrite ``source`` in the ``target`` layout as a new JSON Lines file.

    Args:
        source: Any supported data file; never modified.
        output: A new ``.jsonl`` file, written atomically.
        target: A layout in :data:`WRITERS`.
        source_format: The source layout, or ``auto``.
        options: Format options of the source (text field).
        on_error: Skip and count records that are malformed or cannot be converted, or stop.
        force: Replace an existing output.

    Raises:
        TunesmithError: On an unknown layout, or a bad record under ``fail``.
    """
    writer_of = WRITERS.get(target)
    report = ConvertReport(source_format=source_format, bad=BadRecords(on_error))
    with AtomicJsonlWriter(output, force, inputs=(source,)) as writer:
        for record in stream_records(source, report.bad, options.text_field):
            report.read += 1
            try:
                if report.source_format == "auto":
                    report.source_format = detect_format(record, options.text_field)
                example, rejected = read_conversation(record, report.source_format, options)
                if example.text is not None:
                    fields = {"text": example.text} if target == "text" else _text_refused(record, target)
                else:
                    fields = writer_of(list(example.messages), rejected, record.where)
            except TunesmithError as error:
                report.bad.handle(error)
                continue
            writer.write(fields)
            report.written += 1
    return report


def _text_refused(record: RawRecord, target: str) -> dict[str, Any]:
    raise TunesmithError(f"{record.where}: a plain-text record has no turns to write as {target}")

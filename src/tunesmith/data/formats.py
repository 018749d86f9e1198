"""Data formats: how a record's fields become a conversation or a plain text.

Each format is registered by name; ``auto`` picks the one whose fields a record has. A record
missing a field of its format is an error naming the record, the field and the expected layout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Optional

from tunesmith.config.data import ColumnsSection
from tunesmith.core.errors import TunesmithError
from tunesmith.core.registry import Registry
from tunesmith.data.readers import RawRecord
from tunesmith.data.tools import parse_call, parse_tools

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Example:
    """A training example: a conversation (``messages``) or a plain ``text``, never both."""

    messages: tuple[dict[str, Any], ...] = ()
    text: Optional[str] = None
    where: str = ""
    tools: tuple[dict, ...] = ()  # function definitions of a tool-calling conversation (data/tools.py)


@dataclass(frozen=True)
class DataFormat:
    """A record layout.

    Attributes:
        name: Registered name.
        layout: Human description of the expected fields, shown in errors.
        detect_fields: Fields whose presence identifies the layout for ``format: auto``.
        convert: Turns a record into an :class:`Example`.
    """

    name: str
    layout: str
    detect_fields: tuple[str, ...]
    convert: Callable[[RawRecord, "FormatOptions"], Example]


@dataclass(frozen=True)
class FormatOptions:
    """Options of the conversion that come from the recipe."""

    text_field: str = "text"
    system_prompt: Optional[str] = None
    columns: Optional[ColumnsSection] = None  # data.columns: which column holds what (the 'columns' format)


FORMATS: Registry[DataFormat] = Registry("data format")


def _require(record: RawRecord, name: str, layout: str, kind: type | tuple[type, ...] = str) -> Any:
    value = record.fields.get(name)
    if value is None:
        raise TunesmithError(
            f"{record.where}: missing field '{name}' expected by the {layout} "
            f"(fields present: {', '.join(record.fields) or 'none'})"
        )
    if not isinstance(value, kind):
        raise TunesmithError(f"{record.where}: field '{name}' must be {_kind_name(kind)}, got {type(value).__name__}")
    return value


def _optional_text(record: RawRecord, name: str) -> Optional[str]:
    """An optional text field (``input``, ``system``): absent, null or empty is None; else it must be text."""
    value = record.fields.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise TunesmithError(f"{record.where}: field '{name}' must be text, got {type(value).__name__}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({str: "text", list: "a list", dict: "an object"}.get(k, k.__name__) for k in kinds)


def _with_system(messages: list[dict[str, str]], system: Optional[str]) -> tuple[dict[str, str], ...]:
    if system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}, *messages]
    return tuple(messages)


ALPACA_LAYOUT = "alpaca format (instruction, input (optional), output, system (optional), history (optional))"


def _alpaca(record: RawRecord, options: FormatOptions) -> Example:
    instruction = _require(record, "instruction", ALPACA_LAYOUT)
    output = _require(record, "output", ALPACA_LAYOUT)
    extra = _optional_text(record, "input") or ""
    messages: list[dict[str, str]] = []
    for turn in record.fields.get("history") or []:
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2):
            raise TunesmithError(f"{record.where}: each 'history' item must be a [question, answer] pair")
        messages += [{"role": "user", "content": str(turn[0])}, {"role": "assistant", "content": str(turn[1])}]
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    system = _optional_text(record, "system") or options.system_prompt
    return Example(messages=_with_system(messages, system), where=record.where)


SHAREGPT_LAYOUT = ("sharegpt format (conversations: [{from: human|gpt|system|function_call|observation, value}], "
                   "system (optional), tools (optional))")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "system": "system", "function_call": "assistant", "observation": "tool"}


def _sharegpt(record: RawRecord, options: FormatOptions) -> Example:
    turns = _require(record, "conversations", SHAREGPT_LAYOUT, list)
    messages = []
    for index, turn in enumerate(turns):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        if speaker not in SHAREGPT_ROLES or not isinstance(turn.get("value"), str):
            raise TunesmithError(
                f"{record.where}: conversations[{index}] must have 'from' in "
                f"{sorted(SHAREGPT_ROLES)} and a text 'value'"
            )
        messages.append(_sharegpt_turn(speaker, turn["value"], f"{record.where}, conversations[{index}]"))
    system = _optional_text(record, "system") or options.system_prompt
    try:
        tools = parse_tools(record.fields["tools"], record.where) if record.fields.get("tools") else ()
    except (ValueError, json.JSONDecodeError) as error:
        raise TunesmithError(f"{record.where}: field 'tools' is not a JSON list of function definitions ({error})") \
            from None
    return Example(messages=_with_system(messages, system), where=record.where, tools=tools)


def _sharegpt_turn(speaker: str, value: str, where: str) -> dict[str, Any]:
    """One ShareGPT turn in HF's chat layout: a function_call becomes an assistant turn with ``tool_calls``."""
    if speaker != "function_call":
        return {"role": SHAREGPT_ROLES[speaker], "content": value}
    try:
        return {"role": "assistant", "content": "", "tool_calls": [parse_call(value, where)]}
    except (ValueError, json.JSONDecodeError) as error:
        raise TunesmithError(f"{where}: a function_call turn must be JSON {{name, arguments}} ({error})") from None


MESSAGES_LAYOUT = "messages format (messages: [{role: system|user|assistant, content}])"


def _messages(record: RawRecord, options: FormatOptions) -> Example:
    turns = _require(record, "messages", MESSAGES_LAYOUT, list)
    messages = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise TunesmithError(
                f"{record.where}: messages[{index}] must have 'role' in {list(ROLES)} and a text 'content'"
            )
        messages.append({"role": turn["role"], "content": turn["content"]})
    return Example(messages=_with_system(messages, options.system_prompt), where=record.where)


def _text(record: RawRecord, options: FormatOptions) -> Example:
    text = _require(record, options.text_field, f"text format (field '{options.text_field}')")
    return Example(text=text, where=record.where)


PREFERENCE_LAYOUT = (
    "preference format (prompt text, or conversations/messages turns; chosen and rejected replies as "
    "text or as a {from|role, value|content} turn)"
)


def preference_parts(record: RawRecord) -> tuple[list[dict[str, str]], str, str]:
    """Split a preference record into its prompt turns, chosen reply and rejected reply.

    Raises:
        TunesmithError: If the prompt, ``chosen`` or ``rejected`` is missing or malformed.
    """
    if "conversations" in record.fields:
        prompt = list(_sharegpt(record, FormatOptions()).messages)
    elif "messages" in record.fields:
        prompt = list(_messages(record, FormatOptions()).messages)
    else:
        prompt = [{"role": "user", "content": _require(record, "prompt", PREFERENCE_LAYOUT)}]
    return prompt, _reply(record, "chosen"), _reply(record, "rejected")


def _reply(record: RawRecord, name: str) -> str:
    value = _require(record, name, PREFERENCE_LAYOUT, (str, dict))
    if isinstance(value, dict):
        value = value.get("value", value.get("content"))
        if not isinstance(value, str):
            raise TunesmithError(f"{record.where}: field '{name}' must hold a text 'value' or 'content'")
    return value


def _preference(record: RawRecord, options: FormatOptions) -> Example:
    """The chosen conversation (prompt + chosen reply); the rejected reply is for preference methods."""
    prompt, chosen, _ = preference_parts(record)
    messages = [*prompt, {"role": "assistant", "content": chosen}]
    return Example(messages=_with_system(messages, options.system_prompt), where=record.where)


COLUMNS_LAYOUT = "columns format (the columns named by data.columns: prompt, answer or label, system)"


def _cell_text(record: RawRecord, column: str, role: str) -> str:
    """A cell as text (a number or boolean label becomes its text); missing or empty is an error naming it."""
    value = record.fields.get(column)
    if value is None or isinstance(value, (list, dict)) or str(value).strip() == "":
        raise TunesmithError(
            f"{record.where}: no {role} in column '{column}' (data.columns.{role}; columns present: "
            f"{', '.join(map(str, record.fields)) or 'none'}); fill the cell or pick another column"
        )
    return str(value)


def _columns(record: RawRecord, options: FormatOptions) -> Example:
    """A table row as one exchange: the prompt column asks, the answer (or label) column answers."""
    columns = options.columns
    if columns is None:
        raise TunesmithError(f"{record.where}: data.format 'columns' needs data.columns (which column is the "
                             "prompt, the answer or label)")
    role = "answer" if columns.answer else "label"
    messages = [{"role": "user", "content": _cell_text(record, columns.prompt, "prompt")},
                {"role": "assistant", "content": _cell_text(record, columns.target, role)}]
    system = (_optional_text(record, columns.system) if columns.system else None) or options.system_prompt
    return Example(messages=_with_system(messages, system), where=record.where)


for _format in (
    DataFormat("columns", COLUMNS_LAYOUT, (), _columns),
    DataFormat("alpaca", ALPACA_LAYOUT, ("instruction", "output"), _alpaca),
    DataFormat("preference", PREFERENCE_LAYOUT, ("chosen", "rejected"), _preference),
    DataFormat("sharegpt", SHAREGPT_LAYOUT, ("conversations",), _sharegpt),
    DataFormat("messages", MESSAGES_LAYOUT, ("messages",), _messages),
    DataFormat("text", "text format", ("text",), _text),
):
    FORMATS.register(_format.name)(_format)


def detect_format(record: RawRecord, text_field: str = "text", columns: Optional[ColumnsSection] = None) -> str:
    """The name of the format whose identifying fields ``record`` has: ``columns`` when ``columns``
    (data.columns) is given and the record has its prompt column.

    Raises:
        TunesmithError: If no format matches; names the record and the known layouts.
    """
    if columns is not None and columns.prompt in record.fields:
        return "columns"
    # Most specific layouts first: a preference record also has 'messages' or 'conversations'.
    for name in sorted(FORMATS, key=lambda n: -len(FORMATS.get(n).detect_fields)):
        data_format = FORMATS.get(name)
        if not data_format.detect_fields and name != "text":
            continue  # chosen by name or by data.columns only
        wanted = (text_field,) if name == "text" else data_format.detect_fields
        if all(key in record.fields for key in wanted):
            return name
    layouts = "; ".join(FORMATS.get(name).layout for name in FORMATS if name != "columns")
    if columns is not None:
        raise TunesmithError(f"{record.where}: no column '{columns.prompt}' (data.columns.prompt) among the "
                             f"columns {sorted(record.fields)}; pick one of those")
    raise TunesmithError(
        f"{record.where}: cannot tell the data format from columns {sorted(record.fields)}; say which column is "
        f"the input and which the answer or label with data.columns (e.g. {{prompt: {next(iter(record.fields), 'question')}, "
        f"answer: ...}}), or set data.format to one of: {layouts}"
    )

"""``data clean``: normalise and mask the text of every record, drop the ones that fail the bounds.

Each step is optional and counts the records it changed; applying the cleaning twice gives the
same result as once: the steps are repeated to a fixed point, so text one step exposes (decoding
``&amp;lt;b&amp;gt;`` gives ``&lt;b&gt;``, NFKC turns full-width brackets into a tag) is cleaned
in the same run rather than in the next.
"""

from __future__ import annotations

import copy
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from tunesmith.config.prepare import CleanSection
from tunesmith.core.errors import TunesmithError
from tunesmith.data.prepare.records import AtomicJsonlWriter, BadRecords, OnError, RecordText, stream_records
from tunesmith.data.readers import RawRecord

MAX_ROUNDS = 5
STRUCTURAL_KEYS = frozenset({"role", "from"})  # layout markers, never text to clean

# --- the text steps -------------------------------------------------------------------------

HTML_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(\s[^<>]*)?/?>|&(#\d+|#x[0-9A-Fa-f]+|[A-Za-z]+);")
BLOCK_TAGS = frozenset({"br", "p", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "table"})
# Unicode category Cc is exactly U+0000-001F and U+007F-009F; newline and tab stay. Of the
# zero-width characters only ZWSP, word joiner and BOM go: ZWJ/ZWNJ are needed by emoji and scripts.
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\u2060\ufeff]")


class _TextOfHtml(HTMLParser):
    """Collects the text of an HTML fragment; block tags become line breaks.

    The standard library's parser is enough here: we want the text back, not a DOM, and it
    decodes entities and tolerates broken markup.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in ("script", "style"):
            self._skipping += 1
        elif tag in BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._skipping = max(0, self._skipping - 1)
        elif tag in BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.parts.append(data)


def strip_html(text: str) -> str:
    """Text without tags and with entities decoded; unchanged when it holds neither."""
    for _ in range(5):  # to a fixed point: decoding "&amp;lt;" yields "&lt;", which decodes again
        if not HTML_TAG.search(text):
            return text
        parser = _TextOfHtml()
        parser.feed(text)
        parser.close()
        text = "".join(parser.parts)
    return text


def normalise_unicode(text: str) -> str:
    """Unicode NFKC: compatibility characters (full-width, ligatures) become their plain forms."""
    return unicodedata.normalize("NFKC", text)


def remove_control(text: str) -> str:
    """Drop control characters except newline and tab, and zero-width spaces; CR LF becomes LF."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return CONTROL.sub("", text)


def tidy_whitespace(text: str) -> str:
    """One space between words, no trailing spaces on a line, at most one blank line, trimmed ends."""
    lines = [re.sub(r"[^\S\n]+", " ", line).strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
PHONE = re.compile(r"(?<![\w+])(\+\d{1,3}[ .-]?)?(\(\d{1,4}\)[ .-]?)?\d{2,4}([ .-]?\d{2,4}){2,4}(?!\w)")


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum every payment card number satisfies (ISO/IEC 7812)."""
    total = 0
    for index, digit in enumerate(reversed(digits)):
        value = int(digit) * (2 if index % 2 else 1)
        total += value - 9 if value > 9 else value
    return total % 10 == 0


def _mask_card(match: re.Match) -> str:
    digits = re.sub(r"\D", "", match.group())
    return "[CARD_NUMBER]" if luhn_valid(digits) else match.group()


NOT_PHONE = re.compile(r"\d{4}[-.]\d{1,2}[-.]\d{1,2}|\d{1,3}(\.\d{1,3}){3}")  # dates, IPv4 addresses


def looks_like_phone(candidate: str) -> bool:
    """7 to 15 digits (E.164 allows at most 15) in three or more groups, or led by + or (area code).

    Two groups (``2000-2015``), bare digit runs (``3571428571``), dates and IP addresses are not.
    """
    digits = re.sub(r"\D", "", candidate)
    groups = re.findall(r"\d+", candidate)
    if not 7 <= len(digits) <= 15 or NOT_PHONE.fullmatch(candidate):
        return False
    return len(groups) >= 3 or candidate.startswith(("+", "("))


def _mask_phone(match: re.Match) -> str:
    return "[PHONE]" if looks_like_phone(match.group()) else match.group()


PII_MASKS: dict[str, Callable[[str], str]] = {
    "email": lambda text: EMAIL.sub("[EMAIL]", text),
    "card": lambda text: CARD.sub(_mask_card, text),
    "phone": lambda text: PHONE.sub(_mask_phone, text),
}
PII_ORDER = ("email", "card", "phone")  # cards before phones: a card number also looks like a phone


def text_steps(section: CleanSection) -> list[tuple[str, Callable[[str], str]]]:
    """The enabled text steps, in the order that keeps cleaning idempotent."""
    steps: list[tuple[str, Callable[[str], str]]] = []
    if section.html:
        steps.append(("html", strip_html))
    if section.unicode:
        steps.append(("unicode", normalise_unicode))
    if section.control:
        steps.append(("control", remove_control))
    if section.whitespace:
        steps.append(("whitespace", tidy_whitespace))
    steps += [(f"pii_{kind}", PII_MASKS[kind]) for kind in PII_ORDER if kind in section.pii]
    return steps


# --- records --------------------------------------------------------------------------------


@dataclass
class CleanReport:
    """What cleaning did: records read, written, changed by each step, dropped by each reason."""

    read: int = 0
    written: int = 0
    changed: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    bad: BadRecords = field(default_factory=BadRecords)

    def as_dict(self) -> dict[str, Any]:
        return {"read": self.read, "written": self.written, "changed_by_step": dict(self.changed),
                "dropped": dict(self.dropped), "skipped_bad": self.bad.count, "bad_examples": self.bad.examples}

    def describe(self) -> str:
        changed = ", ".join(f"{step} {count}" for step, count in sorted(self.changed.items())) or "none"
        dropped = ", ".join(f"{reason} {count}" for reason, count in sorted(self.dropped.items())) or "none"
        return (f"read {self.read}, wrote {self.written}; changed by step: {changed}; dropped: {dropped}; "
                f"skipped as malformed: {self.bad.count}")


class Cleaner:
    """Cleans one record at a time as a :class:`CleanSection` says.

    Args:
        section: Which steps run and the bounds.
        count_tokens: Tokens of a text, required when ``section.length_unit`` is ``tokens``.
        record_text: How a record's text is read for the length bounds.

    Raises:
        TunesmithError: If token bounds are asked for without a tokenizer.
    """

    def __init__(self, section: CleanSection, count_tokens: Optional[Callable[[str], int]] = None,
                 record_text: Optional[RecordText] = None) -> None:
        bounded = section.min_length is not None or section.max_length is not None
        if bounded and section.length_unit == "tokens" and count_tokens is None:
            raise TunesmithError("length bounds in tokens need a tokenizer: pass --model (or use --length-unit chars)")
        self.section = section
        self.steps = text_steps(section)
        self.count_tokens = count_tokens
        self.record_text = record_text or RecordText()

    def clean_fields(self, fields: dict[str, Any], changed: Counter) -> dict[str, Any]:
        """A cleaned copy of ``fields``; ``changed`` counts each step that changed something."""
        touched: set[str] = set()
        cleaned = _map_strings(copy.deepcopy(fields), lambda text: self._clean_text(text, touched))
        changed.update(touched)
        return cleaned

    def _clean_text(self, text: str, touched: set[str]) -> str:
        # Repeat the steps to a fixed point: one step can expose work for an earlier one (NFKC
        # turns "＜b＞" into a tag), and cleaning must give the same text when run again.
        for _ in range(MAX_ROUNDS):
            before = text
            for name, step in self.steps:
                new = step(text)
                if new != text:
                    touched.add(name)
                    text = new
            if text == before:
                break
        return text

    def drop_reason(self, record: RawRecord) -> Optional[str]:
        """Why a cleaned record is dropped (a missing field, empty, too short or long), or None."""
        for name in self.section.required:
            value = record.fields.get(name)
            if value is None or (isinstance(value, (str, list, dict)) and not value):
                return f"missing_{name}"
        text = self.record_text(record)
        if not text.strip():
            return "empty"
        unit = self.section.length_unit
        length = len(text) if unit == "chars" else self.count_tokens(text)  # type: ignore[misc]
        if self.section.min_length is not None and length < self.section.min_length:
            return f"shorter_than_{self.section.min_length}_{unit}"
        if self.section.max_length is not None and length > self.section.max_length:
            return f"longer_than_{self.section.max_length}_{unit}"
        return None

    def run(self, records: Iterable[RawRecord], report: CleanReport) -> Iterator[RawRecord]:
        """Cleaned records that pass; everything else is counted in ``report``."""
        for record in records:
            report.read += 1
            try:
                cleaned = RawRecord(record.source, record.position, self.clean_fields(record.fields, report.changed))
                reason = self.drop_reason(cleaned)
            except TunesmithError as error:
                report.bad.handle(error)
                continue
            if reason:
                report.dropped[reason] += 1
                continue
            report.written += 1
            yield cleaned


def _map_strings(value: Any, function: Callable[[str], str], key: Optional[str] = None) -> Any:
    """Apply ``function`` to every string inside ``value`` (dicts and lists walked) but layout markers."""
    if isinstance(value, str):
        return value if key in STRUCTURAL_KEYS else function(value)
    if isinstance(value, dict):
        return {k: _map_strings(v, function, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, function, key) for v in value]
    return value


def clean_file(source: str | Path, output: str | Path, section: CleanSection, *, on_error: OnError = "fail",
               force: bool = False, count_tokens: Optional[Callable[[str], int]] = None,
               record_text: Optional[RecordText] = None) -> CleanReport:
    """Clean ``source`` into a new JSON Lines file ``output``, streaming.

    Args:
        source: Any supported data file; never modified.
        output: A new ``.jsonl`` file, written atomically.
        section: The cleaning steps.
        on_error: Skip and count malformed records, or stop at the first.
        force: Replace an existing output.
        count_tokens: Token counter for token length bounds.
        record_text: How a record's text is read (format and text field).

    Returns:
        The counts of what was changed and dropped.

    Raises:
        TunesmithError: On a malformed record under ``fail``, or an output that may not be written.
    """
    report = CleanReport(bad=BadRecords(on_error))
    cleaner = Cleaner(section, count_tokens, record_text)
    with AtomicJsonlWriter(output, force, inputs=(source,)) as writer:
        for record in cleaner.run(stream_records(source, report.bad), report):
            writer.write(record.fields)
    return report

"""``data augment``: new rows by back-translation (source -> pivot -> source) or paraphrasing.

The model is a plain callable, so any translator fits and tests inject their own:

- a :data:`Translator` takes ``(texts, source_language, target_language)`` and returns texts;
- a :data:`Rewriter` takes texts and returns one rewrite of each (back-translation is a rewriter
  made of two translations; a paraphraser is one directly).

Factories below wrap a Hugging Face seq2seq translation model or an instruction-following causal
LM (prompted to translate or paraphrase, through :func:`tunesmith.inference.generate`).
Each new row is marked with its origin, kept only when its similarity to its source lies within
bounds (too low: the meaning probably changed; too high: nothing new), and dropped when it
duplicates an original or an earlier new row.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from tunesmith.config.prepare import DedupSection
from tunesmith.core.errors import TunesmithError
from tunesmith.data.formats import detect_format
from tunesmith.data.prepare.dedup import Deduplicator, jaccard, shingles
from tunesmith.data.prepare.records import AtomicJsonlWriter, BadRecords, OnError, RecordText, stream_records
from tunesmith.data.readers import RawRecord

Translator = Callable[[list[str], str, str], list[str]]
Rewriter = Callable[[list[str]], list[str]]
Path_ = tuple[Any, ...]  # keys and indices leading to a string inside a record
SIMILARITY_SHINGLE = 3
USER_SPEAKERS = ("user", "human")


def back_translation(translate: Translator, source_language: str, pivot_language: str,
                     translate_back: Optional[Translator] = None) -> Rewriter:
    """A rewriter that translates to the pivot language and back.

    Args:
        translate: Translator into the pivot (and back, unless ``translate_back`` is given).
        source_language: Language of the data, e.g. ``English``.
        pivot_language: Language in between, e.g. ``German``.
        translate_back: Translator from the pivot (a second model for one-direction models).
    """
    back = translate_back or translate

    def rewrite(texts: list[str]) -> list[str]:
        return back(translate(texts, source_language, pivot_language), pivot_language, source_language)

    return rewrite


def text_paths(fields: dict[str, Any], data_format: str, names: tuple[str, ...] = (), text_field: str = "text") -> list[Path_]:
    """Where the prompt-side texts of a record are: the parts augmentation rewrites.

    Args:
        fields: The record's fields.
        data_format: Its layout.
        names: Top-level fields to rewrite instead of the layout's prompt fields.
        text_field: The text field of the ``text`` layout.
    """
    if names:
        return [(name,) for name in names if isinstance(fields.get(name), str) and fields[name].strip()]
    if data_format == "alpaca":
        return [(name,) for name in ("instruction", "input") if isinstance(fields.get(name), str) and fields[name].strip()]
    if data_format == "text":
        return [(text_field,)]
    if isinstance(fields.get("prompt"), str):
        return [("prompt",)]
    for key, speaker, content in (("messages", "role", "content"), ("conversations", "from", "value")):
        if isinstance(fields.get(key), list):
            return [(key, index, content) for index, turn in enumerate(fields[key])
                    if isinstance(turn, dict) and turn.get(speaker) in USER_SPEAKERS]
    return []


def _get(fields: Any, path: Path_) -> Any:
    for key in path:
        fields = fields[key]
    return fields


def _set(fields: Any, path: Path_, value: str) -> None:
    for key in path[:-1]:
        fields = fields[key]
    fields[path[-1]] = value


def similarity(first: str, second: str) -> float:
    """Jaccard similarity of the character 3-grams of two normalised texts (1.0: same text)."""
    return jaccard(shingles(first, SIMILARITY_SHINGLE), shingles(second, SIMILARITY_SHINGLE))


@dataclass(frozen=True)
class AugmentSettings:
    """How new rows are made and filtered.

    Attributes:
        origin: What is recorded in each new row's ``origin_field`` (method, model, languages).
        min_similarity: New rows less similar to their source than this are dropped.
        max_similarity: New rows more similar than this are dropped (nothing new).
        fields: Top-level fields to rewrite instead of the layout's prompt fields.
        origin_field: Field that marks a new row.
        batch_size: Records rewritten per call of the model.
        only_new: Write only the new rows, not the originals.
    """

    origin: dict[str, Any]
    min_similarity: float = 0.3
    max_similarity: float = 0.95
    fields: tuple[str, ...] = ()
    origin_field: str = "origin"
    batch_size: int = 16
    only_new: bool = False


@dataclass
class AugmentReport:
    """Originals read, new rows made and kept, and why the others were dropped."""

    originals: int = 0
    generated: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    examples: list[dict[str, str]] = field(default_factory=list)
    bad: BadRecords = field(default_factory=BadRecords)

    def as_dict(self) -> dict[str, Any]:
        return {"originals": self.originals, "generated": self.generated, "kept": self.kept,
                "dropped": dict(self.dropped), "skipped_bad": self.bad.count, "examples": self.examples}

    def describe(self) -> str:
        dropped = ", ".join(f"{reason} {count}" for reason, count in sorted(self.dropped.items())) or "none"
        return (f"{self.originals} originals, {self.generated} rewrites, {self.kept} kept; dropped: {dropped}; "
                f"skipped as malformed: {self.bad.count}")


class Augmenter:
    """Makes, filters and de-duplicates new rows, batch by batch.

    Args:
        rewrite: The rewriter (back-translation or paraphrase).
        settings: Bounds, fields and marking.
        record_text: How a record's text is read for de-duplication.
    """

    def __init__(self, rewrite: Rewriter, settings: AugmentSettings, record_text: Optional[RecordText] = None) -> None:
        self.rewrite = rewrite
        self.settings = settings
        self.record_text = record_text or RecordText()
        self.seen = Deduplicator(DedupSection(near=False), self.record_text)

    def remember(self, record: RawRecord) -> None:
        """Register an original, so a new row repeating it is dropped."""
        self.seen.check(record)

    def new_rows(self, batch: list[RawRecord], report: AugmentReport) -> Iterator[dict[str, Any]]:
        """The kept new rows made from ``batch``."""
        if self.record_text.data_format == "auto" and batch:
            self.record_text.data_format = detect_format(batch[0], self.record_text.options.text_field,
                                                          self.record_text.options.columns)
        jobs = [(record, text_paths(record.fields, self.record_text.data_format, self.settings.fields,
                                    self.record_text.options.text_field)) for record in batch]
        sources = [_get(record.fields, path) for record, paths in jobs for path in paths]
        rewrites = iter(self.rewrite(sources) if sources else [])
        for record, paths in jobs:
            if not paths:
                report.dropped["nothing_to_rewrite"] += 1
                continue
            fields = copy.deepcopy(record.fields)
            for path in paths:
                _set(fields, path, next(rewrites).strip())
            report.generated += 1
            row = self._judge(record, fields, paths, report)
            if row is not None:
                yield row

    def _judge(self, record: RawRecord, fields: dict[str, Any], paths: list[Path_], report: AugmentReport) -> Optional[dict[str, Any]]:
        before = "\n".join(_get(record.fields, path) for path in paths)
        after = "\n".join(_get(fields, path) for path in paths)
        score = similarity(before, after)
        reason = None
        if not all(_get(fields, path) for path in paths):
            reason = "empty"
        elif score < self.settings.min_similarity:
            reason = "too_different"
        elif score > self.settings.max_similarity:
            reason = "too_similar"
        elif self.seen.check(RawRecord(record.source, f"{record.position} (augmented)", fields)) is not None:
            reason = "duplicate"
        if reason:
            report.dropped[reason] += 1
            return None
        report.kept += 1
        if len(report.examples) < 5:
            report.examples.append({"source": before, "rewrite": after})
        fields[self.settings.origin_field] = {**self.settings.origin, "source": record.where, "similarity": round(score, 3)}
        return fields


def augment_file(source: str | Path, output: str | Path, rewrite: Rewriter, settings: AugmentSettings, *,
                 on_error: OnError = "fail", force: bool = False, record_text: Optional[RecordText] = None,
                 limit: Optional[int] = None) -> AugmentReport:
    """Write the originals of ``source`` (unless ``only_new``) and their kept rewrites to ``output``.

    Two passes: the first registers every original (so a rewrite repeating any of them is
    dropped), the second rewrites batch by batch and writes each original followed by its rows.

    Args:
        source: Any supported data file; never modified.
        output: A new ``.jsonl`` file, written atomically.
        rewrite: The model as a callable.
        settings: Bounds, fields and marking.
        on_error: Skip and count malformed records, or stop at the first.
        force: Replace an existing output.
        record_text: How a record's text is read (format and text field).
        limit: Rewrite only the first N records (all are still written).

    Raises:
        TunesmithError: On a malformed record under ``fail``, or an output that may not be written.
    """
    report = AugmentReport(bad=BadRecords(on_error))
    augmenter = Augmenter(rewrite, settings, record_text)
    for record in stream_records(source, BadRecords("skip")):
        _try(lambda record=record: augmenter.remember(record), BadRecords("skip"))
    with AtomicJsonlWriter(output, force, inputs=(source,)) as writer:
        for batch in _batches(stream_records(source, report.bad), settings.batch_size):
            report.originals += len(batch)
            if not settings.only_new:
                for record in batch:
                    writer.write(record.fields)
            start = report.originals - len(batch)
            todo = batch if limit is None else batch[: max(0, limit - start)]
            try:
                for row in augmenter.new_rows(todo, report):
                    writer.write(row)
            except TunesmithError as error:
                report.bad.handle(error)
    return report


def _try(action: Callable[[], Any], bad: BadRecords) -> None:
    try:
        action()
    except TunesmithError as error:
        bad.handle(error)


def _batches(records: Iterable[RawRecord], size: int) -> Iterator[list[RawRecord]]:
    batch: list[RawRecord] = []
    for record in records:
        batch.append(record)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch

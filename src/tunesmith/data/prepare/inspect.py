"""``data inspect``: what is in a data file, and is it enough.

One streaming pass counts records, fields, empty and malformed ones, measures each example in
tokens of the chosen tokenizer exactly as training encodes it (chat template included), counts
exact duplicates and, on the first ``near_sample`` records, near duplicates, and guesses the
language of the first ``language_sample`` records with ``py3langid`` (a maintained fork of
langid.py, whose model ships inside the package).
"""

from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from tunesmith.config.prepare import DedupSection
from tunesmith.core.errors import TunesmithError
from tunesmith.data.encode import encode_example
from tunesmith.data.formats import FORMATS, FormatOptions
from tunesmith.data.prepare.dedup import Deduplicator
from tunesmith.data.prepare.records import BadRecords, RecordText, stream_records
from tunesmith.data.prepare.sufficiency import sufficiency_verdict

LANGUAGE_CHARS = 400  # enough to tell a language; langid's cost grows with the text
Measure = Callable[[Any], int]  # an Example -> its length


@dataclass
class InspectReport:
    """Everything ``data inspect`` found; ``lengths`` holds one length per usable record."""

    file: str
    data_format: str = "auto"
    records: int = 0
    fields: Counter = field(default_factory=Counter)
    empty: int = 0
    bad: BadRecords = field(default_factory=lambda: BadRecords("skip"))
    lengths: array = field(default_factory=lambda: array("I"))
    unit: str = "words"
    max_length: Optional[int] = None
    exact_duplicates: int = 0
    near_duplicates: int = 0
    near_checked: int = 0
    languages: Counter = field(default_factory=Counter)
    parameters: Optional[int] = None

    @property
    def truncated(self) -> int:
        """Records longer than ``max_length``."""
        if self.max_length is None or not self.lengths:
            return 0
        return int((np.frombuffer(self.lengths, dtype=np.uint32) > self.max_length).sum())

    @property
    def usable(self) -> int:
        """Records that are neither malformed, empty nor an exact duplicate."""
        return len(self.lengths) - self.exact_duplicates

    def verdict(self) -> str:
        """The plain-language sufficiency sentence."""
        tokens = int(np.frombuffer(self.lengths, dtype=np.uint32).sum()) if self.lengths else 0
        return sufficiency_verdict(self.usable, tokens, self.parameters)

    def as_dict(self) -> dict[str, Any]:
        lengths = np.frombuffer(self.lengths, dtype=np.uint32)
        stats = ({"min": int(lengths.min()), "mean": round(float(lengths.mean()), 1),
                  "p50": int(np.percentile(lengths, 50)), "p95": int(np.percentile(lengths, 95)),
                  "max": int(lengths.max())} if len(lengths) else {})
        return {"file": self.file, "format": self.data_format, "records": self.records,
                "fields": dict(self.fields), "empty": self.empty, "malformed": self.bad.count,
                "malformed_examples": self.bad.examples, "length_unit": self.unit, "length": stats,
                "max_length": self.max_length, "truncated": self.truncated,
                "exact_duplicates": self.exact_duplicates, "near_duplicates": self.near_duplicates,
                "near_checked": self.near_checked, "languages": dict(self.languages.most_common(5)),
                "parameters": self.parameters, "verdict": self.verdict()}


def inspect_file(path: str | Path, *, data_format: str = "auto", options: FormatOptions = FormatOptions(),
                 measure: Optional[Measure] = None, unit: str = "words", max_length: Optional[int] = None,
                 parameters: Optional[int] = None, near_sample: int = 20000, language_sample: int = 2000,
                 threshold: float = 0.8) -> InspectReport:
    """Inspect a data file in one streaming pass.

    Args:
        path: Any supported data file.
        data_format: Record layout, or ``auto``.
        options: Format options (text field, system prompt).
        measure: Length of an example (tokens as training encodes it); words when None.
        unit: Name of the length unit for the report.
        max_length: Length beyond which training truncates, for the truncated share.
        parameters: Model size for the verdict, when known.
        near_sample: Records checked for near duplicates (the index grows with them).
        language_sample: Records whose language is guessed.
        threshold: Jaccard similarity of near duplicates.

    Returns:
        The report; malformed records are counted, never raised.
    """
    import py3langid

    report = InspectReport(str(path), data_format, unit=unit, max_length=max_length, parameters=parameters)
    record_text = RecordText(data_format, options)
    exact = Deduplicator(DedupSection(near=False), record_text)
    near = Deduplicator(DedupSection(exact=False, threshold=threshold), record_text)
    measure = measure or (lambda example: len(_example_text(example).split()))
    for record in stream_records(path, report.bad, options.text_field):
        report.records += 1
        report.fields.update(record.fields.keys())
        try:
            text = record_text(record)
            example = FORMATS.get(record_text.data_format).convert(record, options)
            if not text.strip() or not _example_text(example).strip():
                report.empty += 1
                continue
            length = measure(example)
        except TunesmithError as error:
            report.bad.handle(error)
            continue
        report.lengths.append(length)
        report.exact_duplicates += exact.check(record, text) is not None
        if report.near_checked < near_sample:
            report.near_checked += 1
            report.near_duplicates += near.check(record, text) is not None
        if sum(report.languages.values()) < language_sample:
            report.languages[py3langid.classify(text[:LANGUAGE_CHARS])[0]] += 1
    report.data_format = record_text.data_format
    return report


def _example_text(example) -> str:
    if example.text is not None:
        return example.text
    return "\n".join(message["content"] for message in example.messages)


# Lengths are measured up to this many times max_length: a longer record counts as that long, so one
# huge line costs a bounded amount of tokenising (see tunesmith.data.encode.bound_characters).
MEASURED_LENGTH_FACTOR = 64


def token_measure(tokenizer, train_on: str = "assistant", longest: int = 2**31 - 1) -> Measure:
    """Tokens of an example exactly as training encodes it (template applied, up to ``longest`` tokens)."""

    def measure(example) -> int:
        encoded = encode_example(example, tokenizer, longest, "all")
        return len(encoded.input_ids) if encoded else 0

    return measure


def histogram_text(lengths: array, bins: int = 12, width: int = 40, unit: str = "tokens") -> str:
    """A terminal histogram of the lengths: one line per bin, bars of '#' scaled to ``width``."""
    if not lengths:
        return "(no lengths)"
    values = np.frombuffer(lengths, dtype=np.uint32)
    counts, edges = np.histogram(values, bins=min(bins, max(1, len(set(values.tolist())))))
    tallest = max(counts.max(), 1)
    lines = [f"length in {unit}"]
    for count, low, high in zip(counts, edges[:-1], edges[1:]):
        bar = "#" * int(round(width * count / tallest))
        lines.append(f"{low:8.0f}-{high:<8.0f} {bar} {count}")
    return "\n".join(lines)


def save_histogram_png(lengths: array, path: str | Path, unit: str, max_length: Optional[int]) -> None:
    """Write the length histogram as a PNG (with the truncation length as a line).

    Raises:
        TunesmithError: If matplotlib is not installed.
    """
    try:
        import matplotlib
    except ImportError:
        raise TunesmithError("writing a PNG needs matplotlib: pip install matplotlib (or drop --plot)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    axes.hist(np.frombuffer(lengths, dtype=np.uint32), bins=40, color="#4a7ab5")
    if max_length:
        axes.axvline(max_length, color="#c0392b", linestyle="--", label=f"max_length {max_length}")
        axes.legend()
    axes.set_xlabel(f"length in {unit}")
    axes.set_ylabel("records")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def model_parameters(path: str, trust_remote_code: bool = False) -> int:
    """Parameters of the model at ``path``, counted on the meta device (no weights are loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sum(parameter.numel() for parameter in model.parameters())

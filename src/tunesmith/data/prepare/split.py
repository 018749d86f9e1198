"""``data split``: train/validation/test files by fraction, seeded, optionally stratified by a field.

Two streaming passes: the first counts the records (and their strata), the second writes each one
to the part a seeded shuffle gave it, so memory holds one byte per record, not the records.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from tunesmith.core.errors import TunesmithError
from tunesmith.data.prepare.records import AtomicJsonlWriter, BadRecords, OnError, stream_records


def parse_fractions(text: str) -> dict[str, float]:
    """``train=0.8,validation=0.1,test=0.1`` as a dict; the fractions must sum to 1.

    Raises:
        TunesmithError: If an item is malformed or the sum is not 1.
    """
    fractions: dict[str, float] = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        try:
            fractions[name.strip()] = float(value)
        except ValueError:
            raise TunesmithError(f"--fractions item '{item}' must look like name=0.1") from None
    if any(value < 0 for value in fractions.values()) or abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise TunesmithError(f"--fractions {text} must be non-negative and sum to 1")
    return fractions


def allocate(size: int, fractions: list[float]) -> list[int]:
    """Split ``size`` items into parts proportional to ``fractions`` (largest remainders get the rest)."""
    exact = [size * fraction for fraction in fractions]
    counts = [int(value) for value in exact]
    by_remainder = sorted(range(len(fractions)), key=lambda i: exact[i] - counts[i], reverse=True)
    for index in by_remainder[: size - sum(counts)]:
        counts[index] += 1
    return counts


def assign_parts(labels: list[Any], fractions: list[float], seed: int) -> np.ndarray:
    """The part index of each record: a seeded shuffle within each stratum, cut by ``fractions``."""
    parts = np.zeros(len(labels), dtype=np.uint8)
    strata: dict[Any, list[int]] = {}
    for index, label in enumerate(labels):
        strata.setdefault(label, []).append(index)
    rng = np.random.default_rng(seed)
    for label in sorted(strata, key=repr):
        members = np.array(strata[label])
        rng.shuffle(members)
        start = 0
        for part, count in enumerate(allocate(len(members), fractions)):
            parts[members[start : start + count]] = part
            start += count
    return parts


@dataclass
class SplitReport:
    """Records per part, per stratum and part, and skipped malformed ones."""

    counts: dict[str, int] = field(default_factory=dict)
    strata: dict[str, dict[str, int]] = field(default_factory=dict)
    bad: BadRecords = field(default_factory=BadRecords)

    def as_dict(self) -> dict[str, Any]:
        return {"counts": self.counts, "strata": self.strata, "skipped_bad": self.bad.count}

    def describe(self) -> str:
        parts = ", ".join(f"{name} {count}" for name, count in self.counts.items())
        return f"{parts}; skipped as malformed: {self.bad.count}"


def split_file(source: str | Path, out_dir: str | Path, fractions: dict[str, float], *, seed: int = 42,
               stratify: Optional[str] = None, on_error: OnError = "fail", force: bool = False) -> SplitReport:
    """Write ``out_dir/<part>.jsonl`` for each named fraction.

    Args:
        source: Any supported data file; never modified.
        out_dir: Folder of the parts.
        fractions: Part name to share of the records (summing to 1).
        seed: Seed of the shuffle.
        stratify: Field whose values keep their proportions in every part.
        on_error: Skip and count malformed records, or stop at the first.
        force: Replace existing part files.

    Raises:
        TunesmithError: On a malformed record, a record without the stratify field, or outputs
            that exist without ``force``.
    """
    report = SplitReport(bad=BadRecords(on_error))
    labels: list[Any] = []
    for record in stream_records(source, report.bad):
        if stratify is not None and stratify not in record.fields:
            raise TunesmithError(f"{record.where}: no field '{stratify}' to stratify by")
        labels.append(json.dumps(record.fields.get(stratify)) if stratify else None)
    names = list(fractions)
    parts = assign_parts(labels, [fractions[name] for name in names], seed)
    out_dir = Path(out_dir)
    with ExitStack() as stack:
        writers = [stack.enter_context(AtomicJsonlWriter(out_dir / f"{name}.jsonl", force, inputs=(source,)))
                   for name in names]
        for index, record in enumerate(stream_records(source, BadRecords("skip"))):
            writers[parts[index]].write(record.fields)
    report.counts = {name: writer.count for name, writer in zip(names, writers)}
    if stratify:
        for label, part in zip(labels, parts):
            per_part = report.strata.setdefault(label, {name: 0 for name in names})
            per_part[names[part]] += 1
    return report

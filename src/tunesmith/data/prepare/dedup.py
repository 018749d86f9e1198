"""``data dedup``: exact and near-duplicate removal, keeping the first of each cluster, and decontamination.

Exact duplicates share the hash of their normalised text (case, Unicode width and spacing ignored).
Near duplicates are found with MinHash over character shingles and locality-sensitive hashing
(``datasketch``), then confirmed by the MinHash estimate of their Jaccard similarity, so a band
collision alone never removes a record. Only the first record of a cluster enters the index; later
ones are compared with it.

Memory grows with the records kept: about 100 bytes each for exact de-duplication, and about
1.5 KB each (the MinHash signature and LSH bands) for near-duplicate detection.
"""

from __future__ import annotations

import hashlib
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np

from tunesmith.config.prepare import DedupSection
from tunesmith.core.errors import TunesmithError
from tunesmith.data.prepare.records import (
    AtomicJsonlWriter,
    BadRecords,
    OnError,
    RecordText,
    normalise,
    stream_records,
)
from tunesmith.data.readers import RawRecord

MAX_CLUSTERS_REPORTED = 20
MAX_MEMBERS_REPORTED = 5
PREVIEW_CHARS = 120


def exact_key(text: str) -> int:
    """64-bit hash of the normalised text; two texts differing in case, width or spacing share it."""
    return int.from_bytes(hashlib.blake2b(normalise(text).encode("utf-8"), digest_size=8).digest(), "little")


def shingles(text: str, size: int) -> set[bytes]:
    """The character ``size``-grams of the normalised text (the whole text when shorter)."""
    text = normalise(text)
    if len(text) <= size:
        return {text.encode("utf-8")}
    return {text[i : i + size].encode("utf-8") for i in range(len(text) - size + 1)}


def jaccard(first: set, second: set) -> float:
    """Exact Jaccard similarity of two sets (1.0 for two empty sets)."""
    if not first and not second:
        return 1.0
    return len(first & second) / len(first | second)


class NearIndex:
    """MinHash signatures of kept texts in an LSH index, answering "is this a near-duplicate?".

    Args:
        threshold: Jaccard similarity from which two texts count as near-duplicates.
        num_perm: MinHash permutations.
        shingle_size: Characters per shingle.
    """

    def __init__(self, threshold: float, num_perm: int = 128, shingle_size: int = 5) -> None:
        from datasketch import MinHash, MinHashLSH

        self.threshold = threshold
        self.shingle_size = shingle_size
        # crc32 instead of datasketch's default sha1 per shingle: 32 bits are what the affine32
        # scheme uses anyway, and it is several times faster. Permutations are drawn once.
        self._template = MinHash(num_perm=num_perm, seed=1, hashfunc=zlib.crc32)
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._signatures: dict[str, np.ndarray] = {}

    def signature(self, text: str):
        """The MinHash of ``text``."""
        from datasketch import MinHash

        minhash = MinHash(num_perm=len(self._template.hashvalues), seed=1, hashfunc=zlib.crc32,
                          permutations=self._template.permutations,
                          scheme=self._template.scheme)
        minhash.update_batch(list(shingles(text, self.shingle_size)))
        return minhash

    def match(self, minhash) -> Optional[tuple[str, float]]:
        """The earliest indexed key whose estimated similarity reaches the threshold, with it."""
        best: Optional[tuple[str, float]] = None
        for key in self._lsh.query(minhash):
            similarity = float(np.mean(self._signatures[key] == minhash.hashvalues))
            if similarity >= self.threshold and (best is None or _order(key) < _order(best[0])):
                best = (key, similarity)
        return best

    def add(self, key: str, minhash) -> None:
        """Index ``minhash`` under ``key`` (keys sort in insertion order: see :func:`_order`)."""
        self._lsh.insert(key, minhash)
        self._signatures[key] = minhash.hashvalues.copy()


def _order(key: str) -> int:
    return int(key.split(":", 1)[0])


@dataclass(frozen=True)
class Duplicate:
    """Why a record was dropped: ``exact``, ``near`` or ``contaminated``, and what it repeats."""

    kind: str
    of: str
    similarity: float = 1.0


class Deduplicator:
    """Decides, record by record in order, which ones repeat an earlier record or an evaluation row.

    Args:
        section: Exact/near switches, threshold and MinHash parameters.
        record_text: How a record's text is read.
    """

    def __init__(self, section: DedupSection, record_text: Optional[RecordText] = None) -> None:
        self.section = section
        self.record_text = record_text or RecordText()
        self._exact: dict[int, str] = {}
        self._near = NearIndex(section.threshold, section.num_perm, section.shingle_size) if section.near else None
        self._eval_exact: dict[int, str] = {}
        self._eval_near: Optional[NearIndex] = None
        self._count = 0

    def load_evaluation(self, paths: Iterable[str | Path], bad: BadRecords) -> int:
        """Index the rows of evaluation files; later training records matching them are contaminated.

        Returns:
            The number of evaluation rows indexed.
        """
        self._eval_near = NearIndex(self.section.threshold, self.section.num_perm, self.section.shingle_size)
        rows = 0
        for path in paths:
            text_of = RecordText(options=self.record_text.options)
            for record in stream_records(path, bad):
                text = text_of(record)
                self._eval_exact.setdefault(exact_key(text), record.where)
                self._eval_near.add(f"{rows}:{record.where}", self._eval_near.signature(text))
                rows += 1
        return rows

    def check(self, record: RawRecord, text: Optional[str] = None) -> Optional[Duplicate]:
        """None if ``record`` is new (it is then remembered), else why it is a duplicate."""
        text = self.record_text(record) if text is None else text
        key = exact_key(text)
        if key in self._eval_exact:
            return Duplicate("contaminated", self._eval_exact[key])
        minhash = None
        if self._eval_near is not None:
            minhash = self._near.signature(text) if self._near else self._eval_near.signature(text)
            match = self._eval_near.match(minhash)
            if match:
                return Duplicate("contaminated", match[0].split(":", 1)[1], match[1])
        if self.section.exact and key in self._exact:
            return Duplicate("exact", self._exact[key])
        if self._near is not None:
            minhash = minhash or self._near.signature(text)
            match = self._near.match(minhash)
            if match:
                return Duplicate("near", match[0].split(":", 1)[1], match[1])
            self._near.add(f"{self._count}:{record.where}", minhash)
        if self.section.exact:
            self._exact.setdefault(key, record.where)
        self._count += 1
        return None


@dataclass
class DedupReport:
    """Records read and written, dropped by kind, and the first clusters with examples."""

    read: int = 0
    written: int = 0
    evaluation_rows: int = 0
    dropped: Counter = field(default_factory=Counter)
    clusters: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    bad: BadRecords = field(default_factory=BadRecords)

    def note(self, record: RawRecord, text: str, duplicate: Duplicate) -> None:
        """Count a dropped record and keep it as an example of its cluster (the first few only)."""
        self.dropped[duplicate.kind] += 1
        members = self.clusters.get(duplicate.of)
        if members is None:
            if len(self.clusters) >= MAX_CLUSTERS_REPORTED:
                return
            members = self.clusters[duplicate.of] = []
        if len(members) < MAX_MEMBERS_REPORTED:
            members.append({"where": record.where, "kind": duplicate.kind,
                            "similarity": round(duplicate.similarity, 3), "text": text[:PREVIEW_CHARS]})

    def as_dict(self) -> dict[str, Any]:
        return {"read": self.read, "written": self.written, "evaluation_rows": self.evaluation_rows,
                "dropped": dict(self.dropped), "skipped_bad": self.bad.count, "bad_examples": self.bad.examples,
                "clusters": [{"kept": kept, "dropped": members} for kept, members in self.clusters.items()]}

    def describe(self) -> str:
        dropped = ", ".join(f"{kind} {count}" for kind, count in sorted(self.dropped.items())) or "none"
        lines = [f"read {self.read}, wrote {self.written}; dropped: {dropped}; skipped as malformed: {self.bad.count}"]
        for kept, members in list(self.clusters.items())[:5]:
            lines.append(f"  kept {kept}; dropped " + "; ".join(f"{m['where']} ({m['kind']}, {m['similarity']})" for m in members))
        return "\n".join(lines)


def deduplicate(records: Iterable[RawRecord], deduplicator: Deduplicator, report: DedupReport) -> Iterator[RawRecord]:
    """The records that are neither duplicates nor contaminated, in order; the rest go to ``report``."""
    for record in records:
        report.read += 1
        try:
            text = deduplicator.record_text(record)
        except TunesmithError as error:
            report.bad.handle(error)
            continue
        duplicate = deduplicator.check(record, text)
        if duplicate:
            report.note(record, text, duplicate)
            continue
        report.written += 1
        yield record


def dedup_file(source: str | Path, output: str | Path, section: DedupSection, *, on_error: OnError = "fail",
               force: bool = False, record_text: Optional[RecordText] = None) -> DedupReport:
    """De-duplicate ``source`` (and decontaminate it against ``section.against``) into ``output``.

    Args:
        source: Any supported data file; never modified.
        output: A new ``.jsonl`` file, written atomically.
        section: What counts as a duplicate, and the evaluation files.
        on_error: Skip and count malformed records, or stop at the first.
        force: Replace an existing output.
        record_text: How a record's text is read (format and text field).

    Returns:
        Counts by kind and example clusters.

    Raises:
        TunesmithError: On a malformed record under ``fail``, or an output that may not be written.
    """
    report = DedupReport(bad=BadRecords(on_error))
    deduplicator = Deduplicator(section, record_text)
    if section.against:
        report.evaluation_rows = deduplicator.load_evaluation(section.against, report.bad)
    with AtomicJsonlWriter(output, force, inputs=(source, *section.against)) as writer:
        for record in deduplicate(stream_records(source, report.bad), deduplicator, report):
            writer.write(record.fields)
    return report

"""Reading records from data files: .json, .jsonl, .csv, .tsv, .parquet and .txt, optionally gzipped.

Every record keeps where it came from (file and line, or row), so a bad one can be named.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from tunesmith.errors import TunesmithError

SUPPORTED_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet", ".txt")


@dataclass(frozen=True)
class RawRecord:
    """One record as read from a file.

    Attributes:
        source: File path the record came from.
        position: "line N" for line-based files, "record N" otherwise (1-based).
        fields: The record's fields.
    """

    source: str
    position: str
    fields: dict[str, Any]

    @property
    def where(self) -> str:
        """``file, line N``: how error messages name this record."""
        return f"{self.source}, {self.position}"


def file_kind(path: Path) -> str:
    """The data suffix of ``path`` ignoring a trailing .gz (``a.jsonl.gz`` -> ``.jsonl``)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    kind = suffixes[-1] if suffixes else ""
    if kind not in SUPPORTED_SUFFIXES:
        raise TunesmithError(
            f"{path}: unsupported file type '{kind or path.name}'; use one of "
            f"{', '.join(SUPPORTED_SUFFIXES)} (optionally .gz)"
        )
    return kind


BadLineHandler = Callable[[TunesmithError], None]


def read_records(path: str | Path, text_field: str = "text",
                 on_bad_line: Optional[BadLineHandler] = None) -> Iterator[RawRecord]:
    """Yield the records of a data file, streaming where the format allows.

    Args:
        path: The file.
        text_field: Field name given to each line of a .txt file.
        on_bad_line: Called with the error of a malformed line of a .jsonl or .csv file, which is
            then skipped; None raises instead. Other files are read whole, so they still raise.

    Raises:
        TunesmithError: If the file is missing, of an unknown type, or malformed (naming the line).
    """
    path = Path(path)
    if not path.is_file():
        raise TunesmithError(f"data file {path} does not exist")
    kind = file_kind(path)
    reader = {
        ".jsonl": lambda p: _read_jsonl(p, on_bad_line),
        ".json": _read_json,
        ".csv": lambda p: _read_csv(p, on_bad_line),
        ".tsv": lambda p: _read_csv(p, on_bad_line, tabs=True),
        ".parquet": _read_parquet,
        ".txt": lambda p: _read_txt(p, text_field),
    }[kind]
    yield from reader(path)


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")  # type: ignore[return-value]
    return open(path, encoding="utf-8")


def _raise(error: TunesmithError) -> None:
    raise error


def _read_jsonl(path: Path, on_bad_line: Optional[BadLineHandler] = None) -> Iterator[RawRecord]:
    report = on_bad_line or _raise
    with _open_text(path) as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as error:
                report(TunesmithError(
                    f"{path}, line {line_number}: invalid JSON ({error.msg} at column {error.colno}); "
                    "fix or remove that line"
                ))
                continue
            if not isinstance(fields, dict):
                report(TunesmithError(f"{path}, line {line_number}: expected a JSON object, got {type(fields).__name__}"))
                continue
            yield RawRecord(str(path), f"line {line_number}", fields)


def _read_json(path: Path) -> Iterator[RawRecord]:
    with _open_text(path) as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as error:
            raise TunesmithError(
                f"{path}, line {error.lineno}: invalid JSON ({error.msg} at column {error.colno})"
            ) from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} layouts
    if not isinstance(data, list):
        raise TunesmithError(f"{path}: a .json data file must hold a list of records")
    for index, fields in enumerate(data, start=1):
        yield _as_record(path, f"record {index}", fields)


def _read_csv(path: Path, on_bad_line: Optional[BadLineHandler] = None, tabs: bool = False) -> Iterator[RawRecord]:
    """Comma-separated with quoting, or (``tabs``) GLUE-style tab-separated, where quotes are plain text."""
    report = on_bad_line or _raise
    with _open_text(path) as handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE) if tabs else csv.DictReader(handle)
        for index, row in enumerate(reader, start=1):
            # DictReader puts extra cells under the key None; a short row has None values.
            if None in row or any(value is None for value in row.values()):
                report(TunesmithError(
                    f"{path}, line {reader.line_num}: expected {len(reader.fieldnames or [])} "
                    "columns as in the header"
                ))
                continue
            yield RawRecord(str(path), f"line {reader.line_num}", dict(row))


def _read_parquet(path: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    index = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for fields in batch.to_pylist():
            index += 1
            yield RawRecord(str(path), f"row {index}", fields)


def _read_txt(path: Path, text_field: str) -> Iterator[RawRecord]:
    with _open_text(path) as handle:
        for line_number, line in enumerate(handle, start=1):
            if line.strip():
                yield RawRecord(str(path), f"line {line_number}", {text_field: line.rstrip("\n")})


def _as_record(path: Path, position: str, fields: Any) -> RawRecord:
    if not isinstance(fields, dict):
        raise TunesmithError(f"{path}, {position}: expected a JSON object, got {type(fields).__name__}")
    return RawRecord(str(path), position, fields)

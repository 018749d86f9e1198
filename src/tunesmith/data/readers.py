"""Reading records from data files: .json, .jsonl, .csv, .tsv, .parquet and .txt, optionally gzipped.

Every record keeps where it came from (file and line, or row), so a bad one can be named.
"""

from __future__ import annotations

import csv
import gzip
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Optional

from tunesmith.core.errors import TunesmithError, decode_utf8, missing_file

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

    Text files are read as UTF-8 (a leading byte-order mark is dropped).

    Args:
        path: The file.
        text_field: Field name given to each line of a .txt file.
        on_bad_line: Called with the error of a malformed line of a .jsonl or .csv file, which is
            then skipped; None raises instead. Other files are read whole, so they still raise.

    Raises:
        TunesmithError: If the file is missing, unreadable, of an unknown type, not UTF-8 or
            malformed (naming the line).
    """
    path = Path(path)
    if not path.is_file():
        raise missing_file(path, "data file")
    kind = file_kind(path)
    reader = {
        ".jsonl": lambda p: _read_jsonl(p, on_bad_line),
        ".json": _read_json,
        ".csv": lambda p: _read_csv(p, on_bad_line),
        ".tsv": lambda p: _read_csv(p, on_bad_line, tabs=True),
        ".parquet": _read_parquet,
        ".txt": lambda p: _read_txt(p, text_field),
    }[kind]
    try:
        yield from reader(path)
    except (OSError, EOFError, zlib.error) as error:  # unreadable, or a damaged .gz (BadGzipFile is an OSError)
        raise TunesmithError(f"{path}: cannot be read ({_first_line(error)}); check the file and its permissions") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _open_binary(path: Path) -> BinaryIO:
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def _decode(path: Path, line_number: int, data: bytes) -> str:
    """``data`` as UTF-8 text (a byte-order mark on the first line dropped), else a sentence naming the byte."""
    try:
        return data.decode("utf-8-sig" if line_number == 1 else "utf-8")
    except UnicodeDecodeError as error:
        raise TunesmithError(
            f"{path}, line {line_number}: not UTF-8 text (byte 0x{data[error.start]:02x} at byte "
            f"{error.start + 1} of the line); re-save the file as UTF-8"
        ) from None


def _text_lines(path: Path, report: BadLineHandler) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of each line; a line that is not UTF-8 goes to ``report`` and is skipped.

    Lines are decoded one by one (not through a text stream) so a bad byte is named by its line.
    """
    with _open_binary(path) as handle:
        for line_number, data in enumerate(handle, start=1):
            try:
                yield line_number, _decode(path, line_number, data)
            except TunesmithError as error:
                report(error)


def _raise(error: TunesmithError) -> None:
    raise error


def _read_jsonl(path: Path, on_bad_line: Optional[BadLineHandler] = None) -> Iterator[RawRecord]:
    report = on_bad_line or _raise
    for line_number, line in _text_lines(path, report):
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
        except (ValueError, RecursionError) as error:  # e.g. an integer of over 4300 digits, or nesting too deep
            report(TunesmithError(f"{path}, line {line_number}: unreadable JSON ({_first_line(error)}); fix or remove that line"))
            continue
        if not isinstance(fields, dict):
            report(TunesmithError(f"{path}, line {line_number}: expected a JSON object, got {type(fields).__name__}"))
            continue
        yield RawRecord(str(path), f"line {line_number}", fields)


def _read_json(path: Path) -> Iterator[RawRecord]:
    with _open_binary(path) as handle:
        data = handle.read()
    text = decode_utf8(path, data)
    del data
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise TunesmithError(
            f"{path}, line {error.lineno}: invalid JSON ({error.msg} at column {error.colno})"
        ) from None
    except (ValueError, RecursionError) as error:
        raise TunesmithError(f"{path}: unreadable JSON ({_first_line(error)})") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} layouts
    if not isinstance(data, list):
        raise TunesmithError(f"{path}: a .json data file must hold a list of records")
    for index, fields in enumerate(data, start=1):
        yield _as_record(path, f"record {index}", fields)


def _read_csv(path: Path, on_bad_line: Optional[BadLineHandler] = None, tabs: bool = False) -> Iterator[RawRecord]:
    """Comma-separated with quoting, or (``tabs``) GLUE-style tab-separated, where quotes are plain text."""
    report = on_bad_line or _raise
    position = {"line": 0}

    def lines() -> Iterator[str]:
        for line_number, line in _text_lines(path, report):
            position["line"] = line_number
            yield line

    # GLUE-style .tsv: tab-separated, quotes are plain text.
    reader = csv.DictReader(lines(), delimiter="\t", quoting=csv.QUOTE_NONE) if tabs else csv.DictReader(lines())
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as error:  # e.g. a field over csv.field_size_limit(), or a stray quote at the end
            fix = ("; CSV cells are limited to csv.field_size_limit() characters, so convert the file to JSON Lines"
                   if "field limit" in str(error) else "; check its quotes")
            report(TunesmithError(f"{path}, line {position['line']}: malformed CSV ({_first_line(error)}){fix}"))
            continue
        # DictReader puts extra cells under the key None; a short row has None values.
        if None in row or any(value is None for value in row.values()):
            report(TunesmithError(
                f"{path}, line {position['line']}: expected {len(reader.fieldnames or [])} "
                "columns as in the header"
            ))
            continue
        yield RawRecord(str(path), f"line {position['line']}", dict(row))


def _read_parquet(path: Path) -> Iterator[RawRecord]:
    import pyarrow
    import pyarrow.parquet as pq

    index = 0
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        for batch in batches:
            for fields in batch.to_pylist():
                index += 1
                yield RawRecord(str(path), f"row {index}", fields)
    except pyarrow.ArrowException as error:
        raise TunesmithError(
            f"{path}: not a readable Parquet file ({_first_line(error)}); if it holds JSON Lines, CSV or "
            "text, give it that suffix (.jsonl, .csv, .txt)"
        ) from None


def _read_txt(path: Path, text_field: str) -> Iterator[RawRecord]:
    for line_number, line in _text_lines(path, _raise):
        if line.strip():
            yield RawRecord(str(path), f"line {line_number}", {text_field: line.rstrip("\r\n")})


def _as_record(path: Path, position: str, fields: Any) -> RawRecord:
    if not isinstance(fields, dict):
        raise TunesmithError(f"{path}, {position}: expected a JSON object, got {type(fields).__name__}")
    return RawRecord(str(path), position, fields)

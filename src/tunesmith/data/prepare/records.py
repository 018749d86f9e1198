"""What every preparation step shares: reading with an error policy, a record's text, atomic output.

Steps stream records one at a time from the existing readers and write JSON Lines through
:class:`AtomicJsonlWriter`, so a file larger than memory is processed in bounded memory, the input
is never touched, and a half-written output never appears under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from tunesmith.core.errors import TunesmithError
from tunesmith.core.files import atomic_path, file_sha256, write_text_atomic
from tunesmith.data.formats import FORMATS, FormatOptions, detect_format, preference_parts
from tunesmith.data.readers import RawRecord, read_records

OnError = Literal["skip", "fail"]
MAX_EXAMPLES_KEPT = 5
# Beside the files the data tools write: each file's name and the SHA-256 of what was written, so that
# ``--force`` replaces only a file tunesmith wrote itself and nobody changed since.
WRITTEN_MANIFEST = ".tunesmith-data.json"


@dataclass
class BadRecords:
    """Records skipped under ``on_error: skip``: how many, and the first few messages."""

    policy: OnError = "fail"
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def handle(self, error: TunesmithError) -> None:
        """Raise ``error`` under ``fail``; count it and keep its message under ``skip``."""
        if self.policy == "fail":
            raise error
        self.count += 1
        if len(self.examples) < MAX_EXAMPLES_KEPT:
            self.examples.append(str(error))


def stream_records(path: str | Path, bad: BadRecords, text_field: str = "text") -> Iterator[RawRecord]:
    """The records of ``path``; malformed lines go to ``bad`` (raised or counted)."""
    return read_records(path, text_field, on_bad_line=bad.handle)


class RecordText:
    """Turns records into the text that cleaning bounds, dedup hashes and inspect measures.

    The text is the conversation's turns as ``role: content`` lines (or the plain text), read
    through the data-format registry, so metadata fields such as ids never make two copies differ.

    Args:
        data_format: A registered format name or ``auto`` (detected from the first record).
        options: Format options (the text field of the ``text`` format).
    """

    def __init__(self, data_format: str = "auto", options: FormatOptions = FormatOptions()) -> None:
        self.data_format = data_format
        self.options = options

    def __call__(self, record: RawRecord) -> str:
        """The record's text.

        Raises:
            TunesmithError: If the record does not fit the format (naming file and line).
        """
        if self.data_format == "auto":
            self.data_format = detect_format(record, self.options.text_field, self.options.columns)
        if self.data_format == "preference":
            prompt, chosen, rejected = preference_parts(record)
            turns = [*prompt, {"role": "chosen", "content": chosen}, {"role": "rejected", "content": rejected}]
            return "\n".join(f"{turn['role']}: {turn['content']}" for turn in turns)
        example = FORMATS.get(self.data_format).convert(record, self.options)
        if example.text is not None:
            return example.text
        return "\n".join(f"{message['role']}: {message['content']}" for message in example.messages)


def normalise(text: str) -> str:
    """The form two texts share when they differ only in case, width or spacing (for hashing)."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


class AtomicJsonlWriter:
    """Writes records as JSON Lines to a temporary sibling, renamed into place on success.

    Each file written is recorded (name and SHA-256) in :data:`WRITTEN_MANIFEST` beside it, so that a
    later ``force`` replaces it but never a file tunesmith did not write.

    Args:
        path: The output file; must end in ``.jsonl``.
        force: Replace an existing file that tunesmith wrote (never one of ``inputs``, never another file).
        inputs: Files being read, which are never overwritten.
        own_folder: The caller owns the whole folder (the prepared-data cache): ``force`` replaces any file.

    Raises:
        TunesmithError: If the output exists without ``force``, is an input, was not written by
            tunesmith, or is not ``.jsonl``.
    """

    def __init__(self, path: str | Path, force: bool = False, inputs: tuple[str | Path, ...] = (),
                 own_folder: bool = False) -> None:
        self.path = Path(path)
        check_output(self.path, force, inputs, own_folder)
        self.count = 0
        self._handle: Any = None
        self._digest = hashlib.sha256()
        self._open = contextlib.ExitStack()

    def __enter__(self) -> "AtomicJsonlWriter":
        with contextlib.ExitStack() as stack:
            partial = stack.enter_context(atomic_path(self.path))
            self._handle = stack.enter_context(partial.open("w", encoding="utf-8"))
            self._open = stack.pop_all()  # closed (and renamed into place, or removed) by __exit__
        return self

    def write(self, fields: dict[str, Any]) -> None:
        """Append one record."""
        line = json.dumps(fields, ensure_ascii=False) + "\n"
        self._handle.write(line)
        self._digest.update(line.encode("utf-8"))
        self.count += 1

    def __exit__(self, error_type, error, traceback) -> None:
        self._open.__exit__(error_type, error, traceback)
        if error_type is None:
            record_written(self.path, self._digest.hexdigest())


def _written(folder: Path) -> dict[str, str]:
    """The files the data tools wrote into ``folder``: name -> SHA-256 (empty when none or unreadable)."""
    try:
        written = json.loads((folder / WRITTEN_MANIFEST).read_text(encoding="utf-8")).get("written", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return written if isinstance(written, dict) else {}


def record_written(path: Path, sha256: str) -> None:
    """Note in the folder's :data:`WRITTEN_MANIFEST` that tunesmith wrote ``path`` with this content."""
    written = {**_written(path.parent), path.name: sha256}
    write_text_atomic(path.parent / WRITTEN_MANIFEST, json.dumps({"written": written}, indent=1, sort_keys=True))


def written_by_tunesmith(path: Path) -> bool:
    """Whether ``path`` is a file the data tools wrote and nobody changed since."""
    expected = _written(path.parent).get(path.name)
    if expected is None or not path.is_file():
        return False
    return file_sha256(path) == expected


def check_output(path: Path, force: bool, inputs: tuple[str | Path, ...] = (), own_folder: bool = False) -> None:
    """Refuse an output that would overwrite an input, an existing file without ``force``, or with
    ``force`` a file tunesmith did not write (or that was changed since).

    Raises:
        TunesmithError: Naming the file and the fix.
    """
    if path.suffix != ".jsonl":
        raise TunesmithError(f"output {path} must end in .jsonl (prepared data is written as JSON Lines)")
    for source in inputs:
        if Path(source).exists() and path.exists() and path.resolve() == Path(source).resolve():
            raise TunesmithError(f"output {path} is also an input; the input is never modified, so choose another name")
    if path.exists() and not force:
        raise TunesmithError(f"output {path} already exists; choose another name or pass --force to replace it")
    if path.exists() and not own_folder and not written_by_tunesmith(path):
        raise TunesmithError(f"output {path} exists and was not written by tunesmith (or was changed since), so "
                             "--force does not replace it; choose another name or remove the file yourself")

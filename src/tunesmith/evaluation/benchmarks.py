"""Reading benchmark files into items, with errors that name the file and the row.

Layouts: MMLU (a folder per split, ``<subject>_<split>.csv`` or ``<subject>.csv`` with the header
``question,choice0,choice1,choice2,choice3,answer``), generic JSONL multiple choice, classification
tables (TSV as GLUE's SST-2, CSV or JSONL), and JSONL generation records.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterator, Optional

from tunesmith.core.errors import TunesmithError, missing_file
from tunesmith.evaluation.multiple_choice import MultipleChoiceItem

MMLU_COLUMNS = ("question", "choice0", "choice1", "choice2", "choice3", "answer")


def read_table(path: Path) -> Iterator[tuple[str, dict]]:
    """Rows of a CSV, TSV, JSONL or JSON (list) file as ``(where, row)``, ``where`` naming file and line.

    Raises:
        TunesmithError: If the file is missing or a JSONL line is not an object.
    """
    if not path.is_file():
        raise missing_file(path, "data file")
    if path.suffix == ".json":
        records = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(records, list):
            raise TunesmithError(f"{path}: a .json benchmark file must hold a list of objects")
        for number, record in enumerate(records):
            if not isinstance(record, dict):
                raise TunesmithError(f"{path}: record {number}: each record must be an object")
            yield f"{path}: record {number}", record
        return
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    yield f"{path}:{number}", json_object(line, f"{path}:{number}")
        return
    delimiter = "\t" if path.suffix == ".tsv" else ","
    with path.open(encoding="utf-8", newline="") as handle:
        # QUOTE_NONE for TSV: SST-2 sentences contain bare quote characters
        reader = csv.DictReader(handle, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
        for row in reader:
            yield f"{path}:{reader.line_num}", row


def json_object(line: str, where: str) -> dict:
    """One JSON Lines record, or one sentence naming the file and line (benchmark files, judge task files)."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as error:
        raise TunesmithError(f"{where}: not valid JSON ({error.msg})") from None
    if not isinstance(value, dict):
        raise TunesmithError(f"{where}: each line must be a JSON object")
    return value


def require_columns(path: Path, columns: tuple[str, ...], present) -> None:
    """Raise naming the file when one of ``columns`` is not among ``present``."""
    missing = [c for c in columns if c not in (present or ())]
    if missing:
        raise TunesmithError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(columns)}")


def parse_answer(value: object, num_choices: int, where: str) -> int:
    """The 0-based answer index from an integer or a letter.

    Raises:
        TunesmithError: If it is neither, or out of range, naming ``where``.
    """
    text = str(value).strip()
    if len(text) == 1 and text.isalpha():
        index = ord(text.upper()) - ord("A")
    else:
        try:
            index = int(text)
        except ValueError:
            raise TunesmithError(f"{where}: answer {value!r} is neither an index nor a letter") from None
    if not 0 <= index < num_choices:
        raise TunesmithError(f"{where}: answer index {index} is out of range for {num_choices} choices (0-{num_choices - 1})")
    return index


def non_empty(items: list, path: Path | str, what: str = "items") -> list:
    """``items``, or an error naming ``path`` when there are none."""
    if not items:
        raise TunesmithError(f"{path}: no {what} found (empty file or split)")
    return items


def mmlu_subject_files(folder: Path, split: str, subjects: Optional[tuple[str, ...]]) -> dict[str, Path]:
    """``{subject: csv file}`` in ``folder/split``, names with or without the ``_<split>`` suffix.

    Raises:
        TunesmithError: If the split folder is missing or empty, or a named subject is absent.
    """
    split_dir = folder / split
    if not split_dir.is_dir():
        raise TunesmithError(f"MMLU split folder {split_dir} does not exist")
    files = {p.stem.removesuffix(f"_{split}"): p for p in sorted(split_dir.glob("*.csv"))}
    non_empty(list(files), split_dir, "subject CSV files")
    if subjects is None:
        return files
    unknown = [s for s in subjects if s not in files]
    if unknown:
        raise TunesmithError(f"{split_dir}: no file for subject(s) {', '.join(unknown)}")
    return {s: files[s] for s in subjects}


def read_mmlu_subject(path: Path, subject: str, limit: Optional[int] = None) -> list[MultipleChoiceItem]:
    """Items of one MMLU subject file."""
    items: list[MultipleChoiceItem] = []
    for where, row in read_table(path):
        if not items:
            require_columns(path, MMLU_COLUMNS, row.keys())
        choices = tuple(row[f"choice{i}"] or "" for i in range(4))
        items.append(MultipleChoiceItem(row["question"] or "", choices, parse_answer(row["answer"], 4, where),
                                        where, subject))
        if limit and len(items) >= limit:
            break
    return non_empty(items, path, "questions")


def read_mmlu(folder: Path, split: str, subjects: Optional[tuple[str, ...]] = None,
              limit: Optional[int] = None) -> list[MultipleChoiceItem]:
    """Every subject's items of an MMLU split (``limit`` per subject)."""
    files = mmlu_subject_files(folder, split, subjects)
    return [item for subject, path in files.items() for item in read_mmlu_subject(path, subject, limit)]


def read_jsonl_choices(path: Path, question_field: str, choices_field: str, answer_field: str,
                       group_field: Optional[str] = None, limit: Optional[int] = None) -> list[MultipleChoiceItem]:
    """Items of a generic JSONL multiple-choice file."""
    items: list[MultipleChoiceItem] = []
    for where, row in read_table(path):
        for name in (question_field, choices_field, answer_field, *([group_field] if group_field else [])):
            if name not in row:
                raise TunesmithError(f"{where}: missing field '{name}'")
        choices = row[choices_field]
        if not isinstance(choices, list) or len(choices) < 2:
            raise TunesmithError(f"{where}: '{choices_field}' must be a list of at least two choices")
        answer = parse_answer(row[answer_field], len(choices), where)
        group = str(row[group_field]) if group_field else None
        items.append(MultipleChoiceItem(str(row[question_field]), tuple(map(str, choices)), answer, where, group))
        if limit and len(items) >= limit:
            break
    return non_empty(items, path)


def read_classification(path: Path, text_field: str, label_field: str, label_words: dict[str, str],
                        prompt: str, limit: Optional[int] = None) -> list[MultipleChoiceItem]:
    """Classification rows as items whose choices are the label words."""
    labels = list(label_words)
    items: list[MultipleChoiceItem] = []
    for where, row in read_table(path):
        if not items:
            require_columns(path, (text_field, label_field), row.keys())
        label = str(row[label_field]).strip()
        if label not in label_words:
            raise TunesmithError(f"{where}: label {label!r} is not in label_words ({', '.join(labels)})")
        question = prompt.format(text=str(row[text_field]).strip())
        items.append(MultipleChoiceItem(question, tuple(label_words.values()), labels.index(label), where))
        if limit and len(items) >= limit:
            break
    return non_empty(items, path, "rows")


def read_records(path: Path, required: tuple[str, ...], limit: Optional[int] = None) -> list[tuple[str, dict]]:
    """JSONL records that have every ``required`` field, as ``(where, record)``."""
    records = []
    for where, row in read_table(path):
        for name in required:
            if name not in row:
                raise TunesmithError(f"{where}: missing field '{name}'")
        records.append((where, row))
        if limit and len(records) >= limit:
            break
    return non_empty(records, path, "records")

"""The studio's data routes: preview and inspect a workspace file, through a column mapping (``data.columns``).

Messages name workspace paths only (:meth:`Workspace.scrub`), never where the workspace lies on the server.
"""

from __future__ import annotations

import asyncio
from itertools import islice
from typing import Optional

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ValidationError

from tunesmith.core.errors import TunesmithError

router = APIRouter()


def _workspace(request: Request):
    return request.app.state.workspace


class ColumnMapping(BaseModel):
    """Which column holds what (``data.columns``); all empty means: read the file's own format."""

    prompt: Optional[str] = None
    answer: Optional[str] = None
    label: Optional[str] = None
    system: Optional[str] = None

    def section(self):
        from tunesmith.config import ColumnsSection

        if not any((self.prompt, self.answer, self.label, self.system)):
            return None
        try:
            return ColumnsSection.model_validate(self.model_dump(exclude_none=True))
        except ValidationError as error:
            raise TunesmithError(f"columns: {error.errors()[0]['msg'].removeprefix('Value error, ')}") from None


def guess_columns(rows: list[dict]) -> dict[str, Optional[str]]:
    """A first guess at the mapping, for the person to confirm: the input is the column with the longest texts,
    the label a column of few distinct short values, the answer another long text column."""
    names = list(dict.fromkeys(name for row in rows for name in row))
    texts = {name: [str(row.get(name) or "") for row in rows] for name in names}
    mean = {name: sum(map(len, values)) / max(1, len(values)) for name, values in texts.items()}
    distinct = {name: len(set(values)) for name, values in texts.items()}
    by_length = sorted(names, key=lambda name: -mean[name])
    prompt = by_length[0] if by_length else None
    labels = [n for n in names if n != prompt and 0 < mean[n] <= 24 and distinct[n] <= max(2, len(rows) // 2)]
    answers = [n for n in by_length[1:] if n not in labels and mean[n] > 24]
    return {"prompt": prompt, "answer": answers[0] if answers else None, "label": labels[0] if labels else None,
            "system": None}


@router.get("/data/preview")
async def preview(request: Request, path: str, limit: int = Query(20, ge=1, le=200), prompt: Optional[str] = None,
                  answer: Optional[str] = None, label: Optional[str] = None, system: Optional[str] = None):
    """The first records as read (``rows``, ``columns``) and as the model will see them (``examples``), through
    the column mapping when one is given, else the detected format; ``suggested``: a guessed mapping."""
    from tunesmith.data.formats import FORMATS, FormatOptions, detect_format
    from tunesmith.data.readers import read_records

    workspace = _workspace(request)
    file = workspace.resolve(path, must_exist=True)
    columns = ColumnMapping(prompt=prompt, answer=answer, label=label, system=system).section()
    try:
        records = list(islice(read_records(file, on_bad_line=lambda error: None), limit))
    except TunesmithError as error:
        raise TunesmithError(workspace.scrub(str(error))) from None
    names = list(dict.fromkeys(name for record in records for name in record.fields))
    result = {"path": path, "format": None, "rows": [r.fields for r in records], "columns": names,
              "suggested": guess_columns([r.fields for r in records]), "examples": [], "format_error": None}
    if not records:
        return result
    try:
        data_format = detect_format(records[0], columns=columns)
    except TunesmithError as error:
        return {**result, "format_error": workspace.scrub(str(error))}
    convert, options, examples = FORMATS.get(data_format).convert, FormatOptions(columns=columns), []
    for record in records:
        try:
            example = convert(record, options)
            examples.append({"messages": list(example.messages), "text": example.text})
        except TunesmithError as error:
            examples.append({"error": workspace.scrub(str(error))})
    return {**result, "format": data_format, "examples": examples}


class InspectBody(BaseModel):
    path: str
    columns: Optional[ColumnMapping] = None


@router.post("/data/inspect")
async def inspect(body: InspectBody, request: Request):
    """``tunesmith data inspect`` (lengths in words) through the column mapping: counts, lengths, duplicates,
    the verdict, and ``examples``: how many records the mapping turns into training examples."""
    from tunesmith.data.formats import FormatOptions
    from tunesmith.data.prepare.inspect import inspect_file

    workspace = _workspace(request)
    file = workspace.resolve(body.path, must_exist=True)
    columns = body.columns.section() if body.columns else None
    try:
        report = await asyncio.to_thread(inspect_file, file, max_length=1024, options=FormatOptions(columns=columns))
    except TunesmithError as error:
        raise TunesmithError(workspace.scrub(str(error))) from None
    result = {**report.as_dict(), "file": body.path, "verdict": report.verdict(), "examples": len(report.lengths)}
    result["malformed_examples"] = [workspace.scrub(text) for text in result["malformed_examples"]]
    return result

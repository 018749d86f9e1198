"""The studio's routes for trying a result and taking it home: the classifier playground and the download.

``GET /api/classifiers`` lists the runs and exports that hold a label head; ``POST /api/classify`` labels
texts with one of them, through its trained head (``stage: cls``), with the probability of each label;
``GET /api/download?path=`` streams a run or an export folder of the workspace as one zip archive.
"""

from __future__ import annotations

import asyncio
import threading
import zipfile
from itertools import islice
from pathlib import Path
from typing import Iterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from tunesmith.core.errors import TunesmithError

router = APIRouter()
LABELS_FILE, HEAD_FILE = "labels.json", "head.safetensors"
_loaded: dict[str, tuple] = {}  # the classifier in use (one at a time), by workspace path
_loading = threading.Lock()


def classifier_folder(folder: Path) -> Path | None:
    """Where a run's or export's head and labels lie (the run's adapter/ or model/, or the folder itself)."""
    for candidate in (folder / "adapter", folder / "model", folder):
        if (candidate / HEAD_FILE).is_file() and (candidate / LABELS_FILE).is_file():
            return candidate
    return None


@router.get("/classifiers")
async def classifiers(request: Request):
    """Runs and exports that label texts (they hold head.safetensors and labels.json), newest first."""
    root = request.app.state.workspace.root
    found = [(path.stat().st_mtime, f"{folder}/{path.name}") for folder in ("runs", "exports")
             for path in (root / folder).glob("*") if path.is_dir() and classifier_folder(path) is not None]
    return {"classifiers": [name for _, name in sorted(found, reverse=True)]}


class ClassifyBody(BaseModel):
    model: str
    texts: list[str] = Field(min_length=1, max_length=200)


@router.post("/classify")
async def classify(body: ClassifyBody, request: Request):
    """Each text's label and the probability of every label, from the classifier's trained head."""
    workspace = request.app.state.workspace
    folder = classifier_folder(workspace.resolve(body.model, must_exist=True))
    if folder is None:
        raise TunesmithError(f"'{body.model}' is not a classifier (it has no {HEAD_FILE} and {LABELS_FILE}); train one "
                             "with the task 'Label texts'")
    texts = [text.strip() for text in body.texts if text.strip()]
    if not texts:
        raise TunesmithError("texts: give at least one non-empty text")
    labels, probabilities = await asyncio.to_thread(_label, body.model, folder, texts)
    return {"model": body.model, "labels": labels,
            "results": [{"text": text, "label": labels[int(row.argmax())], "confidence": round(float(row.max()), 4),
                         "probabilities": {label: round(float(p), 4) for label, p in zip(labels, row)}}
                        for text, row in zip(texts, probabilities)]}


def _label(name: str, folder: Path, texts: list[str]):
    from tunesmith.stages.cls import label_probabilities

    with _loading:
        if name not in _loaded:
            _loaded.clear()  # one classifier in memory at a time
            _loaded[name] = load_any_classifier(folder)
        model, tokenizer, labels = _loaded[name]
        return labels, label_probabilities(model, tokenizer, texts)


def load_any_classifier(folder: Path):
    """(model, tokenizer, labels) of a run's result (through its manifest) or of an hf/peft export."""
    import json

    import torch

    from tunesmith.methods.base import MANIFEST
    from tunesmith.stages.cls import load_classifier
    from tunesmith.stages.scoring import load_head

    if (folder / MANIFEST).is_file():
        return load_classifier(folder)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return load_head(model, folder).eval(), AutoTokenizer.from_pretrained(folder), json.loads((folder / LABELS_FILE).read_text())


class _Sink:
    """A write-only file for zipfile that hands its bytes on in pieces (no seek: zipfile writes data descriptors)."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.position = 0

    def write(self, data: bytes) -> int:
        self.pieces.append(bytes(data))
        self.position += len(data)
        return len(data)

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        data, self.pieces = b"".join(self.pieces), []
        return data


def zip_stream(folder: Path) -> Iterator[bytes]:
    """The folder as a zip archive, produced file by file (files above 1 MiB piece by piece)."""
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:  # type: ignore[arg-type]
        inside = folder.resolve()
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()
                           and inside in p.resolve().parents):  # nothing a link leads to outside the folder
            with path.open("rb") as source, archive.open(f"{folder.name}/{path.relative_to(folder).as_posix()}", "w",
                                                         force_zip64=True) as target:
                while chunk := source.read(1 << 20):
                    target.write(chunk)
                    yield sink.take()
            yield sink.take()
    yield sink.take()


@router.get("/download")
async def download(path: str, request: Request):
    """A run or an export of the workspace as one zip archive, streamed."""
    workspace = request.app.state.workspace
    folder = workspace.resolve(path, must_exist=True)
    if not folder.is_dir() or folder.parent not in (workspace.root / "runs", workspace.root / "exports"):
        raise TunesmithError(f"'{path}' is not a run or an export; download folders under runs/ or exports/")
    headers = {"Content-Disposition": f'attachment; filename="{folder.name}.zip"', "X-Content-Type-Options": "nosniff"}
    return StreamingResponse(zip_stream(folder), media_type="application/zip", headers=headers)


@router.get("/runs/examples")
async def run_examples(path: str, request: Request, limit: int = 5):
    """A few held-out rows of a classifier run: the text, the label it has, and the label the trained model gives."""
    from tunesmith.config import load_recipe
    from tunesmith.data.readers import read_records

    workspace = request.app.state.workspace
    run = workspace.resolve(path, must_exist=True)
    folder = classifier_folder(run)
    if folder is None or not (run / "config.yaml").is_file():
        raise TunesmithError(f"'{path}' is not a classifier run (stage cls)")
    recipe = load_recipe(run / "config.yaml")
    columns, stage = recipe.data.columns, recipe.stage
    text_field = columns.prompt if columns else stage.text_field
    label_field = (columns.label or columns.answer) if columns else stage.label_field
    source = recipe.data.validation or recipe.data.train[0]
    rows = [record.fields for record in islice(read_records(workspace.resolve(source, must_exist=True),
                                                            on_bad_line=lambda error: None), max(1, min(limit, 20)))]
    texts = [str(row.get(text_field, "")) for row in rows]
    labels, probabilities = await asyncio.to_thread(_label, path, folder, texts)
    return {"source": source, "held_out": bool(recipe.data.validation), "examples": [
        {"text": text, "expected": str(row.get(label_field, "")).strip(), "predicted": labels[int(p.argmax())],
         "confidence": round(float(p.max()), 4)} for text, row, p in zip(texts, rows, probabilities)]}

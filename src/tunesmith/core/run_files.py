"""A run folder's files and its summary: one home for their names and keys, low enough for every reader.

A run writes the same files wherever it goes (``config.yaml``, ``metrics.jsonl``, ``summary.json``,
``checkpoints/``, the before/after measurements, the result folder, ``tensorboard/``, the ``eval/``
report). :class:`RunLayout` names each of them once, as a property; :class:`RunSummary` is the typed
headline of a finished run and exactly what ``summary.json`` holds. ``finetune()`` writes both; the
sweep, ``tunesmith compare``, the studio and the evaluation report read them through these classes
instead of spelling file names and summary keys. This module imports nothing of the project's own.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Optional


@dataclass(frozen=True)
class RunLayout:
    """Every path of one run folder.

    Attributes:
        root: The run folder (the recipe's ``output.dir``).
    """

    root: Path

    CONFIG = "config.yaml"
    METRICS = "metrics.jsonl"
    SUMMARY = "summary.json"
    CHECKPOINTS = "checkpoints"
    TENSORBOARD = "tensorboard"
    REPORTS = "eval"
    RESULTS = ("adapter", "model")  # a method saves into one of them (``Method.artifact``)
    MEASUREMENTS = ("task_before.json", "task_after.json", "retain_before.json", "task_loss_before.json")
    PROVENANCE = "provenance.json"
    TRACKERS = ("wandb", "mlflow")  # the experiment trackers that keep their files in the run folder

    @classmethod
    def markers(cls) -> tuple[str, ...]:
        """Names whose presence makes a folder recognisably a run."""
        return (cls.CONFIG, cls.SUMMARY, cls.CHECKPOINTS)

    @classmethod
    def entries(cls) -> frozenset[str]:
        """Everything a run writes into its folder."""
        return frozenset({*cls.markers(), cls.METRICS, cls.TENSORBOARD, cls.REPORTS, *cls.RESULTS, *cls.MEASUREMENTS,
                          cls.PROVENANCE, *cls.TRACKERS})

    @property
    def config(self) -> Path:
        """The validated recipe the run trained with (written when training really starts)."""
        return self.root / self.CONFIG

    @property
    def metrics(self) -> Path:
        """One JSON record per logged step and evaluation."""
        return self.root / self.METRICS

    @property
    def summary(self) -> Path:
        """The :class:`RunSummary` of a finished run (its presence means finished)."""
        return self.root / self.SUMMARY

    @property
    def checkpoints(self) -> Path:
        return self.root / self.CHECKPOINTS

    @property
    def provenance(self) -> Path:
        """What the run was made from (data digests, packages, seed, threads): ``tunesmith reproduce`` reads it."""
        return self.root / self.PROVENANCE

    @property
    def tensorboard(self) -> Path:
        return self.root / self.TENSORBOARD

    @property
    def reports(self) -> Path:
        """The before/after evaluation (``results.json``, ``report.html``)."""
        return self.root / self.REPORTS

    @property
    def report_html(self) -> Path:
        return self.reports / "report.html"

    @property
    def task_before(self) -> Path:
        """The task metric before training (kept for resumes)."""
        return self.root / "task_before.json"

    @property
    def task_after(self) -> Path:
        return self.root / "task_after.json"

    @property
    def retain_before(self) -> Path:
        """The retain suite before training (kept for resumes)."""
        return self.root / "retain_before.json"

    @property
    def task_loss_before(self) -> Path:
        """The task loss before training (kept for resumes)."""
        return self.root / "task_loss_before.json"

    def result(self, artifact: str) -> Path:
        """The result folder a method saves (``artifact``: ``adapter`` or ``model``)."""
        return self.root / artifact

    def saved_result(self) -> Optional[Path]:
        """The result folder present in the run, or None."""
        return next((self.root / name for name in self.RESULTS if (self.root / name).is_dir()), None)

    def read_metrics(self) -> list[dict]:
        """The records of ``metrics.jsonl`` (none when missing); a line being written right now is skipped."""
        if not self.metrics.is_file():
            return []
        records = []
        for line in self.metrics.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return records

    def read_summary(self) -> Optional["RunSummary"]:
        """The run's summary, or None while it has not finished."""
        return RunSummary.from_file(self.summary) if self.summary.is_file() else None


_OPTIONAL = ("forgetting", "task", "report", "trackers")  # written only when the run measured (or tracked) them


@dataclass(frozen=True)
class RunSummary(Mapping):
    """The headline numbers of a finished run: what ``finetune()`` returns and ``summary.json`` holds.

    Fields keep the order of the file. ``forgetting`` (the retain suite), ``task`` (metric, before,
    after) and ``report`` (the before/after evaluation) are present only when the recipe asked for
    them. It reads like the dict it was (``summary["val_loss"]``) for code written against the file.
    """

    steps: int
    total_steps: int
    stopped_early: bool
    tokens: int
    wall_time_s: float
    tokens_per_s: float
    peak_memory_mb: float
    train_loss: Optional[float]
    val_loss: Optional[float]
    val_perplexity: Optional[float]
    trainable_parameters: int
    total_parameters: int
    method: str
    artifact: str
    template: Optional[str]
    world_size: int
    data: dict
    validation: dict
    forgetting: Optional[dict] = None
    task: Optional[dict] = None
    report: Optional[dict] = None
    trackers: Optional[dict] = None  # where each experiment tracker keeps the run (output.trackers)

    def to_dict(self) -> dict[str, Any]:
        """The summary as ``summary.json`` writes it (the optional blocks only when present)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in values.items() if k not in _OPTIONAL or v is not None}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "RunSummary":
        """From a written summary; a key missing in an older file reads as None, an unknown one is ignored."""
        return cls(**{f.name: values.get(f.name) for f in fields(cls)})

    @classmethod
    def from_file(cls, path: Path) -> "RunSummary":
        """Read ``summary.json`` (a file, or a run folder holding it)."""
        path = Path(path)
        file = RunLayout(path).summary if path.is_dir() else path
        return cls.from_dict(json.loads(file.read_text()))

    @property
    def task_after(self) -> Optional[float]:
        """The task metric after training, when the recipe had ``eval.task``."""
        return (self.task or {}).get("after")

    def objective(self, name: str) -> Optional[float]:
        """A sweep's objective: ``val_loss`` or ``task`` (the task metric after training)."""
        return self.val_loss if name == "val_loss" else self.task_after

    # Mapping: read like the dict of summary.json
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())

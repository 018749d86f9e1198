"""The results document (``results.json``) and the before/after comparison it may carry.

Schema (``schema_version`` 1; keys are only ever added, never renamed)::

    {"schema_version": 1, "created": ISO time, "tunesmith_version": str,
     "runs": {RUN: {"model": {"name", "adapter", "template"},
                    "suites": {SUITE: {"file", "role", "tasks": {TASK: task result}}}}},
     "comparison": null | {"base": RUN, "tuned": RUN, "task_gain", "general_change", "bias_change",
                           "rows": [{"suite", "role", "task", "kind", "metric", "base", "tuned",
                                     "delta", "improvement", "lower_is_better"}],
                           "bias_categories": {category: {"base", "tuned", "delta"}}},
     "training": null | {"metrics_file", "loss_curve": [[step, loss], ...]}}

A task result: ``kind, metric, score, lower_is_better, metrics, count, details, tokenisation,
samples, seconds`` (:mod:`tunesmith.evaluation.runners`). Suite roles: ``task`` (what was tuned
for), ``general`` (everything else: its change is the forgetting measure), ``bias``.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any, Optional

from tunesmith import __version__
from tunesmith.core.files import write_text_atomic

SCHEMA_VERSION = 1
RESULT_KEYS = ("schema_version", "created", "tunesmith_version", "runs", "comparison", "training")
TASK_RESULT_KEYS = ("name", "kind", "metric", "score", "lower_is_better", "metrics", "count", "details",
                    "tokenisation", "samples", "seconds")
POINT_SCALED_METRICS = ("bleu", "chrf")  # already 0-100; other higher-is-better scores are shares in 0-1
METRIC_SCALES = {"mean_grade": 10.0}  # a judge's 1-10 grade: one grade point is 10 points
ROLES = ("task", "general", "bias")


def run_entry(model_name: str, adapter: Optional[str], template: Optional[str], suites: dict[str, dict]) -> dict:
    """One evaluated model: what it was and its suites' results (each with ``role`` set)."""
    return {"model": {"name": model_name, "adapter": adapter, "template": template}, "suites": suites}


def new_document(runs: dict[str, dict], comparison: Optional[dict] = None, training: Optional[dict] = None) -> dict:
    """The results document in its stable schema."""

    return {"schema_version": SCHEMA_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "tunesmith_version": __version__, "runs": runs, "comparison": comparison, "training": training}


def improvement(metric: str, base: float, tuned: float, lower_is_better: bool) -> float:
    """Change in points where positive means better: shares x100, BLEU/chrF as they are,
    lower-is-better scores (perplexity) as the relative reduction in percent."""
    if lower_is_better:
        return 100.0 * (base - tuned) / base if base else 0.0
    scale = 1.0 if metric in POINT_SCALED_METRICS else METRIC_SCALES.get(metric, 100.0)
    return scale * (tuned - base)


def before_after_rows(base: dict, tuned: dict, base_name: str = "base", tuned_name: str = "tuned") -> dict:
    """Per-task rows and the three summary numbers of a before/after comparison.

    ``task_gain`` and ``general_change`` are the mean :func:`improvement` over the task and general
    suites' tasks (None when a role is absent); ``bias_change`` is the change of the stereotype
    share in points (positive: more stereotyped), averaged over bias tasks.
    """
    rows = []
    for suite_name, suite in base["suites"].items():
        other = tuned["suites"].get(suite_name, {}).get("tasks", {})
        for task_name, result in suite["tasks"].items():
            if task_name not in other:
                continue
            b, t = result["score"], other[task_name]["score"]
            if b is None or t is None:  # e.g. the base of a reward model has no head to score with
                continue
            rows.append({"suite": suite_name, "role": suite.get("role", "general"), "task": task_name,
                         "kind": result["kind"], "metric": result["metric"], "base": b, "tuned": t, "delta": t - b,
                         "improvement": improvement(result["metric"], b, t, result["lower_is_better"]),
                         "lower_is_better": result["lower_is_better"]})

    def mean_of(role: str, key: str, scale: float = 1.0) -> Optional[float]:
        values = [r[key] * scale for r in rows if r["role"] == role]
        return sum(values) / len(values) if values else None

    return {"base": base_name, "tuned": tuned_name, "task_gain": mean_of("task", "improvement"),
            "general_change": mean_of("general", "improvement"), "bias_change": mean_of("bias", "delta", 100.0),
            "rows": rows, "bias_categories": bias_categories(base, tuned)}


def bias_categories(base: dict, tuned: dict) -> dict[str, dict[str, float]]:
    """Stereotype share per category before and after, over every bias task."""
    categories: dict[str, dict[str, float]] = {}
    for suite_name, suite in base["suites"].items():
        for task_name, result in suite["tasks"].items():
            if result["kind"] != "bias":
                continue
            after = tuned["suites"].get(suite_name, {}).get("tasks", {}).get(task_name)
            for category, values in result["details"].get("groups", {}).items():
                if after and category in after["details"].get("groups", {}):
                    t = after["details"]["groups"][category]["stereotype_share"]
                    b = values["stereotype_share"]
                    categories[f"{task_name}/{category}"] = {"base": b, "tuned": t, "delta": t - b}
    return categories


def read_loss_curve(metrics_file: Path) -> Optional[dict]:
    """``{"metrics_file", "loss_curve", "val_curve"}`` from a run's ``metrics.jsonl``, or None if absent."""
    if not metrics_file.is_file():
        return None
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    loss = [[r["step"], r["loss"]] for r in records if "loss" in r and "step" in r]
    validation = [[r["step"], r["val_loss"]] for r in records if "val_loss" in r and "step" in r]
    return {"metrics_file": str(metrics_file), "loss_curve": loss, "val_curve": validation}


def write_json_atomically(document: dict, path: Path) -> Path:
    """Write ``document`` to a temporary sibling and rename it into place."""
    return write_text_atomic(path, json.dumps(document, indent=2) + "\n")


def check_document(document: dict[str, Any]) -> None:
    """Assert the stable keys are present (used by tests and before writing).

    Raises:
        ValueError: Naming the first missing key.
    """
    for key in RESULT_KEYS:
        if key not in document:
            raise ValueError(f"results document lacks '{key}'")
    for run_name, run in document["runs"].items():
        for suite_name, suite in run["suites"].items():
            for task_name, result in suite["tasks"].items():
                missing = [k for k in TASK_RESULT_KEYS if k not in result]
                if missing:
                    raise ValueError(f"{run_name}/{suite_name}/{task_name} lacks {missing}")


def task_result(kind: str, metric: str, metrics: dict[str, float], count: int, *, details: dict | None = None,
                tokenisation: dict | None = None, samples: list | None = None,
                lower_is_better: bool = False) -> dict[str, Any]:
    """The common result form of every task."""
    return {"kind": kind, "metric": metric, "score": metrics[metric], "lower_is_better": lower_is_better,
            "metrics": metrics, "count": count, "details": details or {}, "tokenisation": tokenisation or {},
            "samples": samples or []}

"""Suites: a YAML file naming tasks, run together into one results dictionary.

A suite file::

    name: general
    data_root: ../../shared/assets/data     # relative to this file; --data-root overrides
    tasks:
      - tasks/mmlu.yaml                     # a task file, relative to this file
      - {kind: bias, name: bias, path: "{probes}/counterfactual_pairs.csv"}   # or inline
    limit: 20                               # optional: caps every task (quick runs)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from tunesmith.config.loader import read_yaml
from tunesmith.core.errors import TunesmithError, missing_file
from tunesmith.evaluation.runners import TASK_RUNNERS
from tunesmith.evaluation.tasks import TaskSection, load_task_file, parse_task


@dataclass(frozen=True)
class Suite:
    """A named list of validated tasks.

    Attributes:
        name: Suite name shown in results.
        tasks: The tasks, in order.
        file: Where it was read from ("" when built in code).
    """

    name: str
    tasks: tuple[TaskSection, ...]
    file: str = ""


def load_suite(path: Union[str, Path], data_root: Optional[Union[str, Path]] = None,
               limit: Optional[int] = None) -> Suite:
    """Read a suite file and every task it names.

    Args:
        path: The suite YAML file.
        data_root: Folder that ``{data_root}`` in task paths stands for; default: the suite's
            ``data_root`` key, relative to the suite file.
        limit: Caps every task's item count (overrides the suite's ``limit``).

    Raises:
        TunesmithError: For a missing or malformed suite or task file, naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise missing_file(path, "suite file")
    raw = read_yaml(path, "suite file") or {}
    if not isinstance(raw, dict) or not isinstance(raw.get("tasks"), list) or not raw["tasks"]:
        raise TunesmithError(f"{path}: a suite needs a non-empty 'tasks' list of task files or task mappings")
    unknown = set(raw) - {"name", "data_root", "tasks", "limit"}
    if unknown:
        raise TunesmithError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; valid: name, data_root, tasks, limit")
    # Absolute, so that task paths under {data_root} are not joined to the suite's folder a second time.
    if data_root is not None:
        root: Optional[Path] = Path(data_root).expanduser().resolve()
    elif raw.get("data_root"):
        root = (path.parent / str(raw["data_root"])).expanduser().resolve()
    else:
        root = None
    limit = limit or raw.get("limit")
    overrides = {"limit": limit} if limit else {}
    tasks = []
    for index, entry in enumerate(raw["tasks"]):
        if isinstance(entry, str):
            tasks.append(load_task_file(path.parent / entry, root, overrides))
        else:
            entry = {**entry, **overrides} if isinstance(entry, dict) else entry
            tasks.append(parse_task(entry, f"{path}: tasks[{index}]", path.parent, root))
    names = [t.name for t in tasks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise TunesmithError(f"{path}: task name(s) {', '.join(duplicates)} appear more than once")
    return Suite(str(raw.get("name") or path.stem), tuple(tasks), str(path))


def run_task(model, tokenizer, task: TaskSection) -> dict[str, Any]:
    """Run one task with the runner of its kind; adds ``name`` and ``seconds``."""

    started = time.perf_counter()
    result = TASK_RUNNERS.get(task.kind)(model, tokenizer, task)
    return {"name": task.name, **result, "seconds": round(time.perf_counter() - started, 3)}


def run_suite(model, tokenizer, suite: Union[Suite, str, Path], data_root: Optional[Union[str, Path]] = None,
              limit: Optional[int] = None, progress=print) -> dict[str, Any]:
    """Evaluate ``model`` on every task of ``suite``.

    Args:
        model: Causal LM (base, or base + adapter), in eval mode.
        tokenizer: Its tokenizer, carrying the chat template of training
            (:func:`tunesmith.inference.generate.load_for_inference` gives both).
        suite: A :class:`Suite` or the path of a suite file.
        data_root: Only for a path: what ``{data_root}`` in task paths stands for.
        limit: Only for a path: caps every task's item count.
        progress: Called with one line per task (``None``: silent).

    Returns:
        ``{"suite": name, "file": path, "tasks": {task name: task result}}``; each task result
        has ``kind, metric, score, lower_is_better, metrics, count, details, tokenisation,
        samples, seconds`` (see :mod:`tunesmith.evaluation.runners`).

    Raises:
        TunesmithError: For malformed suite, task or data files, naming file and row.
    """
    if not isinstance(suite, Suite):
        suite = load_suite(suite, data_root, limit)
    was_training = model.training
    model.eval()
    results: dict[str, Any] = {}
    try:
        for task in suite.tasks:
            results[task.name] = run_task(model, tokenizer, task)
            if progress:
                r = results[task.name]
                score = "n/a" if r["score"] is None else f"{r['score']:.4f}"
                progress(f"  {suite.name}/{task.name}: {r['metric']} {score} ({r['count']} items, {r['seconds']:.1f}s)")
    finally:
        model.train(was_training)
    return {"suite": suite.name, "file": suite.file, "tasks": results}

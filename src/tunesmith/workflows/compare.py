"""``tunesmith compare``: several recipes on the same data, one side-by-side table and plot.

Each recipe trains in its own process (so peak memory is its own), into ``OUT/<recipe name>``; the
table takes each run's ``summary.json``: task metric, forgetting, trainable parameters, time, memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from tunesmith.core.errors import TunesmithError
from tunesmith.core.run_files import RunLayout, RunSummary

COLUMNS = (
    ("recipe", "recipe", "{}"),
    ("method", "method", "{}"),
    ("task_after", "task val loss after", "{:.4f}"),
    ("task_gain", "task gain (nats/token)", "{:+.4f}"),
    ("forgetting", "forgetting (nats/token)", "{:+.4f}"),
    ("forgetting_per_gain", "forgetting / gain", "{:.3f}"),
    ("general_text_loss_rise", "general-text loss rise (nats/token)", "{:+.4f}"),
    ("trainable_parameters", "trainable params", "{:,}"),
    ("wall_time_s", "time (s)", "{:.1f}"),
    ("peak_memory_mb", "peak memory (MB)", "{:.0f}"),
)


def run_names(recipes: Sequence[str]) -> list[str]:
    """Output folder names: the recipe file stems, made unique with a counter where they repeat."""
    names: list[str] = []
    for recipe in recipes:
        stem, name, count = Path(recipe).stem, Path(recipe).stem, 1
        while name in names:
            count += 1
            name = f"{stem}-{count}"
        names.append(name)
    return names


def train_one(recipe: str, out: Path, overrides: Sequence[str], progress: bool,
              overwrite: bool = False) -> dict[str, Any]:
    """Train one recipe in a child process; returns its summary.

    ``overwrite`` passes ``--overwrite`` on, which replaces an earlier run in ``out`` (and nothing else).

    Raises:
        TunesmithError: If the run fails (its last error line is repeated).
    """
    command = [sys.executable, "-m", "tunesmith", "train", recipe, *overrides, f"output.dir={out}"]
    command += (["--overwrite"] if overwrite else []) + ([] if progress else ["--no-progress"])
    completed = subprocess.run(command, stdout=None if progress else subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if completed.returncode != 0:
        last = (completed.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise TunesmithError(f"compare: training {recipe} failed: {last}")
    return RunSummary.from_file(RunLayout(out).summary)


def comparison_row(name: str, summary: Mapping[str, Any]) -> dict[str, Any]:
    """The table row of one run (``summary``: a :class:`RunSummary`, or the dict of its file)."""
    summary = summary if isinstance(summary, RunSummary) else RunSummary.from_dict(summary)
    forgetting = summary.forgetting or {}
    return {"recipe": name, "method": summary.method, "task_after": forgetting.get("task_after"),
            "task_gain": forgetting.get("task_gain"), "forgetting": forgetting.get("forgetting"),
            "forgetting_per_gain": forgetting.get("forgetting_per_gain"),
            "forgetting_measure": forgetting.get("forgetting_measure"),
            "general_text_loss_rise": forgetting.get("general_text_loss_rise"),
            "retained": forgetting.get("retained", {}),
            "trainable_parameters": summary.trainable_parameters, "wall_time_s": summary.wall_time_s,
            "peak_memory_mb": summary.peak_memory_mb}


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a markdown table (empty cells where a run has no value)."""
    header = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    lines = [header, rule]
    for row in rows:
        cells = [fmt.format(row[key]) if row.get(key) is not None else "" for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_comparison(rows: Sequence[dict[str, Any]], path: Path) -> bool:
    """Task gain against forgetting, one labelled point per recipe; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    points = [r for r in rows if r.get("task_gain") is not None and r.get("forgetting") is not None]
    figure, axes = plt.subplots(figsize=(6, 4.5))
    for row in points:
        axes.scatter(row["forgetting"], row["task_gain"])
        axes.annotate(row["recipe"], (row["forgetting"], row["task_gain"]), textcoords="offset points", xytext=(5, 5))
    axes.set_xlabel("forgetting: rise of retain loss (nats/token), lower is better")
    axes.set_ylabel("task gain: fall of task loss (nats/token), higher is better")
    axes.set_title("Task gain against forgetting")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def refuse_existing_runs(out: Path, names: Sequence[str]) -> None:
    """Refuse before any training when a run folder ``OUT/<name>`` already holds something.

    Raises:
        TunesmithError: Naming the folders and the flag that replaces them.
    """
    taken = [str(out / name) for name in names if (out / name).is_dir() and any((out / name).iterdir())]
    if taken:
        raise TunesmithError(f"compare: {', '.join(taken)} already exist; choose another --out, or replace "
                             "those runs with --overwrite")


def compare(recipes: Sequence[str], out: Path, overrides: Sequence[str] = (), progress: bool = True,
            say=print, overwrite: bool = False) -> list[dict[str, Any]]:
    """Train every recipe, then write ``comparison.md``, ``comparison.json`` and ``comparison.png`` in ``out``.

    Args:
        recipes: Recipe files.
        out: Folder of the runs (one sub-folder each) and the comparison.
        overrides: Dotted overrides applied to every recipe (e.g. the same data.train for all).
        progress: Show each run's progress bar.
        overwrite: Replace earlier runs in ``OUT/<recipe>`` (otherwise they are refused before training).

    Returns:
        The table rows.
    """
    names = run_names(recipes)
    if not overwrite:
        refuse_existing_runs(out, names)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for recipe, name in zip(recipes, names):
        say(f"compare: training {recipe} -> {out / name}")
        rows.append(comparison_row(name, train_one(recipe, out / name, overrides, progress, overwrite)))
    (out / "comparison.json").write_text(json.dumps(rows, indent=2) + "\n")
    table = markdown_table(rows)
    (out / "comparison.md").write_text(table)
    plotted = plot_comparison(rows, out / "comparison.png")
    say(table + f"written: {out / 'comparison.md'}, {out / 'comparison.json'}"
        + (f", {out / 'comparison.png'}" if plotted else " (no plot: matplotlib is not installed)"))
    return rows

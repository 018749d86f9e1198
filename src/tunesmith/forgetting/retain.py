"""Forgetting, measured: the retain suite before and after training, and the task gain beside it.

The retain suite runs through the evaluation suite runner (:func:`tunesmith.evaluation.suite.run_suite`).
The forgetting measure is the rise of the retain text's loss in nats per token (``log`` of the
perplexity ratio) when the suite has a perplexity task, else the drop of the first task's score; the
task gain is the fall of the task's validation loss (nats per token), so their ratio reads as "nats
forgotten per nat learned".

Beside them, every run with a retain suite reports the figure PEFT's method comparison reports as
forgetting: the rise of the loss on general text, in nats per target token, here on tunesmith's built-in
general-text file (``general_text_loss_before``, ``_after``, ``_rise``), whatever the suite holds, so
that runs with different suites can be read on one scale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from tunesmith.config import RetainSection
from tunesmith.evaluation.suite import Suite, load_suite, run_suite
from tunesmith.evaluation.tasks import MultipleChoiceTask, PerplexityTask

BUILTIN_DATA = Path(__file__).resolve().parent / "retain_data"
BUILTIN_TEXT = BUILTIN_DATA / "general_text.jsonl"
BUILTIN_MULTIPLE_CHOICE = BUILTIN_DATA / "multiple_choice.jsonl"


def retain_suite(section: RetainSection) -> Suite:
    """The suite a recipe's ``retain`` section names: its suite file, or perplexity + multiple choice."""
    if section.suite:
        return load_suite(section.suite, limit=section.limit)
    files = section.perplexity or (str(BUILTIN_TEXT),)
    tasks: list = [PerplexityTask(name=f"text_{Path(f).stem}" if section.perplexity else "general_text", path=f,
                                  format=section.format, max_length=section.max_length,
                                  batch_size=section.batch_size, limit=section.limit) for f in files]
    if section.multiple_choice:
        path = BUILTIN_MULTIPLE_CHOICE if section.multiple_choice == "builtin" else Path(section.multiple_choice)
        tasks.append(MultipleChoiceTask(name="general_choice", path=str(path), choice_style="text",
                                        normalisation="per_char", batch_size=section.batch_size,
                                        limit=section.limit))
    return Suite("retain", tuple(tasks))


GENERAL_TEXT_LOSS = "general_text_loss"
GENERAL_TEXT_MEASURE = ("rise of the loss (nats per target token) on tunesmith's built-in general text "
                        "(forgetting/retain_data/general_text.jsonl), as PEFT's method comparison reports forgetting")


def general_text_task(section: RetainSection) -> PerplexityTask:
    """The loss on the whole built-in general-text file, at the retain section's length and batch size."""
    return PerplexityTask(name=GENERAL_TEXT_LOSS, path=str(BUILTIN_TEXT), max_length=section.max_length,
                          batch_size=section.batch_size)


def measure_retained(model, tokenizer, section: RetainSection, progress=print) -> dict[str, dict[str, Any]]:
    """Run the retain suite; ``{task: {"metric", "score", "lower_is_better", "loss"?}}``.

    An entry :data:`GENERAL_TEXT_LOSS` (``"extra": True``, not one of the suite's tasks) holds the loss on
    the built-in general text; the built-in suite's own ``general_text`` task is reused when it scored the
    whole file.
    """
    suite = retain_suite(section)
    results = run_suite(model, tokenizer, suite, progress=progress)["tasks"]
    measured = {name: {"metric": r["metric"], "score": r["score"], "lower_is_better": r["lower_is_better"],
                       **({"loss": r["metrics"]["loss"]} if "loss" in r["metrics"] else {})}
                for name, r in results.items()}
    builtin = next((t for t in suite.tasks if isinstance(t, PerplexityTask) and Path(t.path) == BUILTIN_TEXT
                    and t.limit is None and t.max_length == section.max_length), None)
    if builtin is not None:
        loss = measured[builtin.name]["loss"]
    else:
        loss = run_suite(model, tokenizer, Suite("general_text", (general_text_task(section),)),
                         progress=progress)["tasks"][GENERAL_TEXT_LOSS]["metrics"]["loss"]
    measured[GENERAL_TEXT_LOSS] = {"metric": "loss", "score": loss, "lower_is_better": True, "loss": loss,
                                   "extra": True}
    return measured


def forgetting_report(retain_before: Optional[dict], retain_after: Optional[dict],
                      task_before: Optional[float], task_after: Optional[float]) -> dict[str, Any]:
    """The summary's ``forgetting`` block: per-task retained change, the forgetting measure, task gain, ratio.

    Args:
        retain_before: :func:`measure_retained` on the model before training (None: no retain suite).
        retain_after: The same after training.
        task_before: Task validation loss before training (nats/token), or None.
        task_after: The same after training.

    Returns:
        ``retained`` per task (before, after, change: after - before), ``forgetting`` (positive: worse),
        ``forgetting_measure`` (what it is), ``task_gain`` (positive: better), ``forgetting_per_gain``,
        ``general_text_loss_before``/``_after``/``_rise`` (nats per token) and ``general_text_measure``.
    """
    report: dict[str, Any] = {}
    if task_before is not None and task_after is not None:
        report.update(task_metric="val_loss", task_before=task_before, task_after=task_after,
                      task_gain=task_before - task_after)
    if retain_before and retain_after:
        general_before, general_after = retain_before.get(GENERAL_TEXT_LOSS), retain_after.get(GENERAL_TEXT_LOSS)
        retain_before = {k: v for k, v in retain_before.items() if not v.get("extra")}
        report["retained"] = {name: {"metric": before["metric"], "before": before["score"],
                                     "after": retain_after[name]["score"],
                                     "change": retain_after[name]["score"] - before["score"]}
                              for name, before in retain_before.items()}
        report.update(forgetting_measure(retain_before, retain_after))
        if general_before and general_after:  # (a cached measurement from an older tunesmith may lack it)
            report.update(general_text_loss_before=general_before["loss"],
                          general_text_loss_after=general_after["loss"],
                          general_text_loss_rise=general_after["loss"] - general_before["loss"],
                          general_text_measure=GENERAL_TEXT_MEASURE)
    gain, forgetting = report.get("task_gain"), report.get("forgetting")
    if gain is not None and forgetting is not None and gain > 0:
        report["forgetting_per_gain"] = forgetting / gain
    return report


def forgetting_measure(before: dict, after: dict) -> dict[str, Any]:
    """The loss rise on the first perplexity task, else the score drop of the first task."""
    for name, result in before.items():
        if "loss" in result:
            return {"forgetting": after[name]["loss"] - result["loss"],
                    "forgetting_measure": f"{name}: rise of loss (nats/token) = log(perplexity after / before)"}
    name, result = next(iter(before.items()))
    sign = -1.0 if result["lower_is_better"] else 1.0
    drop = sign * (result["score"] - after[name]["score"])
    return {"forgetting": drop, "forgetting_measure": f"{name}: drop of {result['metric']}"}

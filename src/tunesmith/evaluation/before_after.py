"""Evaluate one model, or a base and a tuned model, on suites; write results.json and report.html."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from tunesmith.core.errors import TunesmithError
from tunesmith.core.run_files import RunLayout
from tunesmith.data.templates import TEMPLATES
from tunesmith.evaluation.report import write_report
from tunesmith.evaluation.results import (
    before_after_rows,
    check_document,
    new_document,
    read_loss_curve,
    run_entry,
    write_json_atomically,
)
from tunesmith.evaluation.stage_metrics import attach_head, held_out_task, result_stage
from tunesmith.evaluation.suite import Suite, load_suite, run_suite
from tunesmith.evaluation.tasks import PROBES_DIR, BiasTask
from tunesmith.inference.results import load_result, locate_result

RESULTS_FILE = "results.json"
REPORT_FILE = "report.html"


@dataclass(frozen=True)
class ModelSpec:
    """What to load: a base model, optionally with a trained adapter, and the run it came from."""

    name: str
    adapter: Optional[str] = None
    run_dir: Optional[str] = None


def builtin_bias_suite() -> Suite:
    """The counterfactual pairs shipped with tunesmith, as a suite of one bias task."""
    return Suite("bias", (BiasTask(name="counterfactual_pairs", path=str(PROBES_DIR / "counterfactual_pairs.csv")),),
                 "builtin")


def resolve_tuned(path: str, base: Optional[str] = None) -> ModelSpec:
    """Interpret the TUNED argument of ``--compare``: a run folder, an adapter folder or a model.

    A run folder holds ``adapter/`` (base + adapter) or ``model/`` (a full fine-tune); its
    ``metrics.jsonl`` gives the loss curve. An adapter folder's manifest names its base model
    when ``base`` is not given.

    Raises:
        TunesmithError: If an adapter needs a base model that cannot be found.
    """
    location = locate_result(path)
    if location is None:
        return ModelSpec(path, None, None)
    run_dir = str(location.run_dir) if location.run_dir else None
    if location.kind == "model":
        return ModelSpec(str(location.folder), None, run_dir)
    base = base or location.recorded_base
    if base is None:
        raise TunesmithError(f"{location.folder} is an adapter without a recorded base model; pass the base model as BASE")
    return ModelSpec(base, str(location.folder), run_dir)


def evaluate_spec(spec: ModelSpec, suites: Sequence[tuple[Suite, str]], dtype: str = "float32",
                  device: str = "cpu", progress=print) -> dict:
    """Load a model (with the chat template it was trained with) and run every ``(suite, role)``.

    Returns:
        A run entry of the results document.
    """
    loaded = load_result(spec.adapter or spec.name, spec.name if spec.adapter else None, dtype, device)
    model, tokenizer = attach_head(loaded.model, loaded.location), loaded.tokenizer  # rm, cls: their head
    if progress:
        progress(f"evaluating {spec.name}{' + ' + spec.adapter if spec.adapter else ''}")
    results = {}
    for suite, role in suites:
        outcome = run_suite(model, tokenizer, suite, progress=progress)
        results[suite.name] = {"file": suite.file, "role": role, "tasks": outcome["tasks"]}
    return run_entry(spec.name, spec.adapter, template_name(tokenizer), results)


def template_name(tokenizer) -> str:
    """The built-in template the tokenizer carries (as saved with a run's adapter), else ``tokenizer``."""

    return next((name for name in TEMPLATES if TEMPLATES.get(name) == tokenizer.chat_template), "tokenizer")


def write_outputs(document: dict, out_dir: Path) -> tuple[Path, Path]:
    """``results.json`` and ``report.html`` in ``out_dir``."""

    check_document(document)
    return write_json_atomically(document, out_dir / RESULTS_FILE), write_report(document, out_dir / REPORT_FILE)


def evaluate_and_report(spec: ModelSpec, suites: Sequence[tuple[Suite, str]], out_dir: Path, **options) -> dict:
    """Evaluate one model and write its results and report.

    Returns:
        The results document.
    """
    run = evaluate_spec(spec, suites, **options)
    training = read_loss_curve(RunLayout(Path(spec.run_dir)).metrics) if spec.run_dir else None
    document = new_document({"model": run}, training=training)
    write_outputs(document, out_dir)
    return document


def evaluate_before_after(base: ModelSpec, tuned: ModelSpec, suites: Sequence[tuple[Suite, str]], out_dir: Path,
                       metrics_file: Optional[Path] = None, **options) -> dict:
    """Evaluate base and tuned on the same suites and report gain, forgetting and bias change.

    Args:
        base: The model before tuning.
        tuned: The tuned model (usually the base plus an adapter).
        suites: ``(suite, role)`` pairs, role being ``task``, ``general`` or ``bias``.
        out_dir: Where ``results.json`` and ``report.html`` go.
        metrics_file: A run's ``metrics.jsonl`` for the loss curve (default: the tuned run's).

    Returns:
        The results document, with ``comparison`` filled in.
    """
    runs = {"base": evaluate_spec(base, suites, **options), "tuned": evaluate_spec(tuned, suites, **options)}
    if metrics_file is None and tuned.run_dir:
        metrics_file = RunLayout(Path(tuned.run_dir)).metrics
    training = read_loss_curve(metrics_file) if metrics_file else None
    document = new_document(runs, before_after_rows(runs["base"], runs["tuned"]), training)
    write_outputs(document, out_dir)
    return document


def report_after_training(recipe, out: Path, device: str = "cpu") -> dict:
    """The recipe's ``eval.report``: base vs the run just saved, written to ``OUT/eval``.

    Returns:
        The comparison's headline numbers and where the report is (for ``summary.json``).
    """

    section = recipe.eval.report
    suites = [(load_suite(p, section.data_root, section.limit), "task") for p in section.suites]
    suites += [(load_suite(p, section.data_root, section.limit), "general") for p in section.general_suites]
    suites += [(builtin_bias_suite(), "bias")] if section.bias else []
    judged = result_stage(str(out))
    if judged is not None and recipe.data.validation:  # a preference/reward/classification stage: its own metrics
        task = held_out_task(judged, recipe.data.validation, Path(recipe.data.validation).stem, recipe.eval.batch_size)
        suites.append((Suite("held_out", (task,), recipe.data.validation), "task"))
    if not suites:
        raise TunesmithError("eval.report needs at least one of suites, general_suites or bias: true")
    print("writing the before/after evaluation report ...")
    tuned = resolve_tuned(str(out), recipe.model.name)
    reports = RunLayout(out).reports
    document = evaluate_before_after(ModelSpec(recipe.model.name), tuned, suites, reports,
                                  dtype=recipe.model.dtype, device=device)
    comparison = document["comparison"]
    return {"task_gain": comparison["task_gain"], "general_change": comparison["general_change"],
            "bias_change": comparison["bias_change"], "html": str(reports / REPORT_FILE)}

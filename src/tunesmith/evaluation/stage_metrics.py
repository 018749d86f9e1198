"""Held-out metrics of the judgement stages (rm, dpo, orpo, simpo, kto, cls), computed by the stage itself.

A result folder's manifest records the stage that trained it (its section, the chat template and
``data.max_length``; for ``cls`` the training data's majority class). :func:`held_out_task` turns that
into an evaluation task (kind ``stage``) on a data file, and the ``stage`` runner scores it with the
stage's own data preparation and :meth:`Objective.evaluate`: the very code that wrote the run's
``val_*`` metrics, so the numbers are the same on the same data. For ``dpo`` and ``kto`` the implicit
rewards are measured against the base: the result's adapter switched off, the base model loaded
again for a full fine-tune, or the model itself when the base is what is evaluated (every reward 0).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

from pydantic import TypeAdapter

from tunesmith.config import DataSection
from tunesmith.config.stages import StageSection
from tunesmith.core.errors import TunesmithError
from tunesmith.core.runtime import Runtime, cache_dir
from tunesmith.evaluation.tasks import StageTask
from tunesmith.inference.results import ResultFolder, load_result, locate_result
from tunesmith.stages import build_stage
from tunesmith.stages.cls import LABELS_FILE
from tunesmith.stages.pairs import Reference, ReferenceStage, adapter_owner
from tunesmith.stages.scoring import HEAD_FILE, head_of, load_head
from tunesmith.training.batching import collate
from tunesmith.training.chunked_loss import plain_loss_sum
from tunesmith.training.speed import SpeedSetup

JUDGED_STAGES = ("rm", "dpo", "orpo", "simpo", "kto", "cls")
HEAD_STAGES = ("rm", "cls")


@dataclass(frozen=True)
class JudgedStage:
    """What a result folder says about the judgement stage that trained it.

    Attributes:
        config: The recipe's stage section (``cls``: with its labels in head order).
        template: The chat template of training.
        max_length: The run's ``data.max_length``.
        majority_label: ``cls``: the training data's majority class (the baseline).
        base_model: The base model the result was trained from.
        full: True when the result is a complete model (full or partial fine-tuning), not an adapter.
    """

    config: Any
    template: str
    max_length: int
    majority_label: Optional[str]
    base_model: Optional[str]
    full: bool

    @property
    def kind(self) -> str:
        return self.config.kind


def judged_stage(location: Optional[ResultFolder]) -> Optional[JudgedStage]:
    """The judgement stage a result was trained with, or None (sft, pt, grpo, or a folder tunesmith did not write)."""
    if location is None or location.manifest is None or location.manifest.get("stage") not in JUDGED_STAGES:
        return None

    manifest = location.manifest
    raw = dict(manifest.get("stage_config") or {"kind": manifest["stage"]})
    labels = location.folder / LABELS_FILE
    if raw["kind"] == "cls" and labels.is_file():
        raw["labels"] = json.loads(labels.read_text())
    config = TypeAdapter(StageSection).validate_python(raw)
    return JudgedStage(config, manifest.get("template", "auto"), int(manifest.get("data_max_length", 1024)),
                       manifest.get("majority_label"), location.recorded_base, location.kind == "model")


def result_stage(source: str) -> Optional[JudgedStage]:
    """:func:`judged_stage` of a run folder, result folder or model name."""
    return judged_stage(locate_result(source))


def attach_head(model, location: Optional[ResultFolder]):
    """Load the reward or label head saved with a result (rm, cls) onto its loaded model; others unchanged."""

    if location is not None and (location.folder / HEAD_FILE).is_file():
        load_head(model, location.folder)
    return model


def held_out_task(judged: JudgedStage, path: str, name: str = "held_out", batch_size: int = 8,
                  max_length: Optional[int] = None):
    """The evaluation task (kind ``stage``) that scores ``path`` with the result's stage."""

    reference = judged.base_model if judged.full and judged.kind in ("dpo", "kto") else None
    return StageTask(name=name, path=str(path), stage=judged.config, template=judged.template,
                     max_length=max_length or judged.max_length, majority_label=judged.majority_label,
                     reference=reference, batch_size=batch_size)


def has_head(model) -> bool:

    try:
        head_of(model)
    except TunesmithError:
        return False
    return True


def stage_metrics(model, tokenizer, task) -> Optional[dict[str, float]]:
    """The stage's validation metrics of ``model`` on ``task.path``; None when a head stage meets a model without
    a head (the base model of an rm or cls result has nothing to score with).

    Raises:
        TunesmithError: If the file lacks what the stage needs (naming the file and the layout expected).
    """

    config = task.stage
    if config.kind not in JUDGED_STAGES:
        raise TunesmithError(f"task {task.name}: stage {config.kind} has no held-out metrics of its own; use a "
                             f"perplexity task (stages with them: {', '.join(JUDGED_STAGES)})")
    if config.kind in HEAD_STAGES and not has_head(model):
        return None
    stage = build_stage(config)
    section = DataSection(train=(task.path,), template=task.template, max_length=task.max_length)
    try:
        examples = stage.encode_data(section, tokenizer, 0, cache_dir()).train
    except TunesmithError as error:
        raise TunesmithError(f"{task.path}: {error}") from None
    examples = examples[: task.limit] if task.limit else examples
    if config.kind == "cls" and task.majority_label in stage.labels:
        stage.majority = stage.labels.index(task.majority_label)  # the training data's, as in the run
    if isinstance(stage, ReferenceStage):
        stage.reference = reference_for(model, task)
    objective = stage.objective(SpeedSetup(plain_loss_sum, collate, packing=False, autocast_dtype=None))
    runtime = Runtime(device=next(model.parameters()).device)
    return objective.evaluate(model, examples, task.batch_size, tokenizer.pad_token_id, runtime)


def reference_for(model, task):
    """The base that DPO/KTO rewards are measured against (see the module docstring)."""

    if adapter_owner(model) is not None:
        return Reference(model)  # the adapter switched off
    if task.reference is not None:

        base = load_result(task.reference, device=next(model.parameters()).device).model
        return Reference.model_itself(base)
    return Reference.model_itself(model)

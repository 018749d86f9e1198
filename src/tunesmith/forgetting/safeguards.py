"""What a run does against forgetting, as a few steps that ``finetune()`` calls by name.

``Safeguards`` sets dropout before the method is applied, measures the retain suite and the task loss
before training, computes the penalties (EWC, L2-SP), installs NEFTune noise, removes it after
training and measures again: each a step that ``finetune()`` lists. It is given the sections it reads (``regularise``, ``retain``), not
the whole recipe. With none of it in the recipe every step does nothing. (Replay is data mixing:
``data.sources``, sampled by :class:`tunesmith.training.sampler.MixtureSampler`.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from tunesmith.config import RegulariseSection, RetainSection
from tunesmith.core.reporter import Reporter
from tunesmith.core.run_files import RunLayout
from tunesmith.core.runtime import Runtime
from tunesmith.data.encoded import EncodedData
from tunesmith.data.mixing import TRAIN_SOURCE
from tunesmith.forgetting.fisher_cache import fisher_for_run
from tunesmith.forgetting.regularisers import AnchorPenalty, add_neftune_noise, set_model_dropout
from tunesmith.forgetting.retain import forgetting_report, measure_retained
from tunesmith.training.validation import evaluate_loss

TASK_PROBE_EXAMPLES = 256  # training examples scored for the task gain when there is no validation data


@dataclass
class Safeguards:
    """The recipe's protections against forgetting, and its measurement, for one run.

    Each method is one step of ``finetune()`` and its name says what it does to the model.

    Attributes:
        identity: What the EWC Fisher cache is keyed by besides its own settings: ``model`` (name),
            ``method`` (section as a dict) and ``seed``.
        batch_size: Examples per batch when measuring the task loss (``eval.batch_size``).
        layout: The run folder (the before-training measurements are kept there for resumes).
        reporter: Where messages go (main process only) and whether progress bars show.
    """

    regularise: RegulariseSection
    retain: Optional[RetainSection]
    identity: dict
    batch_size: int
    runtime: Runtime
    layout: RunLayout
    reporter: Reporter = Reporter()
    retain_before: Optional[dict] = None
    task_loss_before: Optional[float] = None
    handles: list = field(default_factory=list)

    def set_dropout(self, model) -> None:
        """Set the recipe's dropout rates in ``model`` (before the method is applied)."""
        regularise = self.regularise
        for change in set_model_dropout(model, regularise.attention_dropout, regularise.hidden_dropout):
            self.reporter.say(f"regularise: {change}")

    def measure_before(self, model, tokenizer, data: EncodedData) -> None:
        """The retain suite and the task loss of the model before training (reused on resume)."""
        if self.retain is None:
            return
        self.retain_before = self.cached(self.layout.retain_before,
                                         lambda: self.measure(model, tokenizer, "before training"))
        self.task_loss_before = self.cached(self.layout.task_loss_before,
                                            lambda: self.task_loss(model, data, tokenizer.pad_token_id))

    def compute_anchor_penalties(self, model, tokenizer) -> list[AnchorPenalty]:
        """EWC and L2-SP penalties towards the weights now in ``model``.

        EWC's Fisher is computed here (forward and backward passes over its data) unless cached. Call after
        the method is applied and before a resume loads later weights.
        """
        regularise, say = self.regularise, self.reporter.say
        penalties = []
        if regularise.ewc is not None:
            fisher = fisher_for_run(regularise.ewc, self.identity, model, tokenizer, self.runtime, say,
                                    self.reporter.progress)
            penalties.append(AnchorPenalty(model, regularise.ewc.strength, fisher, name="ewc"))
            say(f"regularise: EWC with strength {regularise.ewc.strength:g}")
        if regularise.l2sp:
            penalties.append(AnchorPenalty(model, regularise.l2sp, name="l2sp"))
            say(f"regularise: L2-SP with strength {regularise.l2sp:g}")
        return penalties

    def add_neftune_noise(self, model) -> None:
        """Install NEFTune's noise on the input embeddings (training only; see :meth:`remove_noise`)."""
        if self.regularise.neftune_alpha:
            self.handles.append(add_neftune_noise(model, self.regularise.neftune_alpha))
            self.reporter.say(f"regularise: NEFTune noise alpha {self.regularise.neftune_alpha:g}")

    def remove_noise(self) -> None:
        """Remove the training-only hooks (NEFTune) before anything is measured or saved."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def measure_after(self, model, tokenizer, data: EncodedData) -> dict[str, Any]:
        """Measure again; the summary's ``forgetting`` block (or {})."""
        if self.retain is None:
            return {}
        retain_after = self.measure(model, tokenizer, "after training")
        task_loss_after = self.task_loss(model, data, tokenizer.pad_token_id)
        report = forgetting_report(self.retain_before, retain_after, self.task_loss_before, task_loss_after)
        if "forgetting" in report:
            self.reporter.say(f"forgetting: {report['forgetting']:+.4f} ({report['forgetting_measure']}); task gain "
                              f"{report.get('task_gain', float('nan')):+.4f} nats/token")
        return report

    def measure(self, model, tokenizer, when: str) -> dict:
        self.reporter.say(f"retain suite {when} ...")
        return measure_retained(model, tokenizer, self.retain, progress=self.reporter.say)

    def task_loss(self, model, data: EncodedData, pad_token_id: int) -> float:
        """Loss of the task's validation data (source 'train' when mixing), else of early training examples."""
        examples = data.validation_by_source.get(TRAIN_SOURCE) if data.sources else data.validation
        if not examples:
            task = data.sources[0] if data.sources else None
            examples = data.train[task.start : task.start + task.count] if task else data.train
            examples = examples[:TASK_PROBE_EXAMPLES]
        return evaluate_loss(model, examples, self.batch_size, pad_token_id, self.runtime)["loss"]

    def cached(self, path: Path, compute: Callable[[], Any]) -> Any:
        """Reuse a before-training measurement on resume (the model has moved on since)."""
        if path.exists():
            return json.loads(path.read_text())
        value = compute()
        if self.runtime.is_main:
            path.write_text(json.dumps(value, indent=2) + "\n")
        return value

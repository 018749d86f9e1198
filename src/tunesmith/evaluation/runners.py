"""One runner per task kind: ``(model, tokenizer, task) -> task result`` registered by kind.

Every task result has the same keys, so reports and comparisons never ask which kind ran:
``kind``, ``metric`` (the headline metric's name), ``score`` (its value; higher is better
except where ``lower_is_better``), ``metrics`` (every number), ``count``, ``details``
(per subject/category tables), ``tokenisation`` and ``samples``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from tunesmith.core.registry import Registry
from tunesmith.core.runtime import Runtime
from tunesmith.data.encoded import encode_all, load_examples
from tunesmith.evaluation import benchmarks
from tunesmith.evaluation.bias import evaluate_bias_pairs, read_bias_pairs
from tunesmith.evaluation.filters import headline, score_documents, tokenisation_of
from tunesmith.evaluation.generation import generate_for_records
from tunesmith.evaluation.harness import run_harness_tasks
from tunesmith.evaluation.judge_task import run_judge_task
from tunesmith.evaluation.multiple_choice import MultipleChoiceResult, PromptStyle, evaluate_multiple_choice
from tunesmith.evaluation.progress import item_progress
from tunesmith.evaluation.results import task_result
from tunesmith.evaluation.stage_metrics import stage_metrics
from tunesmith.evaluation.tasks import (
    BiasTask,
    ClassificationTask,
    GenerationTask,
    JudgeTask,
    LmEvalTask,
    MmluTask,
    MultipleChoiceTask,
    PerplexityTask,
    StageTask,
)
from tunesmith.training.validation import evaluate_loss

TaskRunner = Callable[..., dict[str, Any]]
TASK_RUNNERS: Registry[TaskRunner] = Registry("evaluation task kind")


def choice_result(kind: str, result: MultipleChoiceResult, metric: str = "accuracy") -> dict[str, Any]:
    """A multiple-choice result in the common form (macro accuracy headlines grouped tasks)."""
    raw = result.as_dict()
    metrics = {"accuracy": raw["accuracy"],
               **{f"accuracy_{n}": v for n, v in raw["accuracy_by_normalisation"].items()}}
    if "macro_accuracy" in raw:
        metrics["macro_accuracy"] = raw["macro_accuracy"]
    details = {"groups": raw["groups"]} if "groups" in raw else {}
    tokenisation = {**raw["tokenisation"], "normalisation": raw["normalisation"], "few_shot": raw["few_shot"]}
    return task_result(kind, metric, metrics, raw["count"], details=details, tokenisation=tokenisation)


@TASK_RUNNERS.register("mmlu")
def run_mmlu(model, tokenizer, task: MmluTask) -> dict[str, Any]:
    """Per-subject accuracies and their macro average over an MMLU split."""
    folder = Path(task.path)
    items = benchmarks.read_mmlu(folder, task.split, task.subjects, task.limit)
    pool = benchmarks.read_mmlu(folder, task.few_shot_split, task.subjects) if task.few_shot else []
    style = PromptStyle("letter", task.chat_template, task.description, tokenisation=task.tokenisation)
    with item_progress(task.name, len(items), "question") as advance:
        result = evaluate_multiple_choice(model, tokenizer, items, normalisation=task.normalisation,
                                          few_shot=task.few_shot, few_shot_pool=pool, style=style,
                                          batch_size=task.batch_size, progress=advance)
    return choice_result("mmlu", result, "macro_accuracy")


@TASK_RUNNERS.register("multiple_choice")
def run_multiple_choice(model, tokenizer, task: MultipleChoiceTask) -> dict[str, Any]:
    """Accuracy on a generic JSONL multiple-choice file."""
    fields = (task.question_field, task.choices_field, task.answer_field, task.group_field)
    items = benchmarks.read_jsonl_choices(Path(task.path), *fields, limit=task.limit)
    pool = benchmarks.read_jsonl_choices(Path(task.few_shot_path), *fields) if task.few_shot_path else []
    style = PromptStyle(task.choice_style, task.chat_template, tokenisation=task.tokenisation)
    with item_progress(task.name, len(items), "question") as advance:
        result = evaluate_multiple_choice(model, tokenizer, items, normalisation=task.normalisation,
                                          few_shot=task.few_shot, few_shot_pool=pool, style=style,
                                          batch_size=task.batch_size, progress=advance)
    return choice_result("multiple_choice", result)


@TASK_RUNNERS.register("classification")
def run_classification(model, tokenizer, task: ClassificationTask) -> dict[str, Any]:
    """Accuracy of choosing the most likely label word."""
    items = benchmarks.read_classification(Path(task.path), task.text_field, task.label_field, task.label_words,
                                           task.prompt, task.limit)
    style = PromptStyle("text", task.chat_template, cue="", tokenisation=task.tokenisation)
    with item_progress(task.name, len(items), "row") as advance:
        result = evaluate_multiple_choice(model, tokenizer, items, normalisation=task.normalisation,
                                          few_shot=task.few_shot, style=style, batch_size=task.batch_size,
                                          progress=advance)
    return choice_result("classification", result)


@TASK_RUNNERS.register("perplexity")
def run_perplexity(model, tokenizer, task: PerplexityTask) -> dict[str, Any]:
    """Loss and perplexity on a data file, encoded exactly as training encodes it."""

    examples, _ = load_examples(task.path, task.format)
    examples = examples[: task.limit] if task.limit else examples
    encoded, _ = encode_all(examples, tokenizer, task.max_length, "evaluation")
    runtime = Runtime(device=next(model.parameters()).device)
    metrics = evaluate_loss(model, encoded, task.batch_size, tokenizer.pad_token_id, runtime)
    tokenisation = {"method": "as in training: chat template for conversations, BOS/EOS around plain text",
                    "max_length": task.max_length}
    return task_result("perplexity", "perplexity", {k: float(v) for k, v in metrics.items()}, len(encoded),
                       tokenisation=tokenisation, lower_is_better=True)


@TASK_RUNNERS.register("generation")
def run_generation(model, tokenizer, task: GenerationTask) -> dict[str, Any]:
    """Generate greedily (batched, chat template of training) and score each reply (lm-eval's filters and metrics)."""

    predictions, references, prompts = generate_for_records(model, tokenizer, task)
    metrics, documents = score_documents(task, predictions, references)
    samples = [{"prompt": p, "prediction": pred, "references": list(refs)}
               for p, pred, refs in list(zip(prompts, predictions, references))[:5]]
    tokenisation = {**tokenisation_of(task),
                    "prompt": "chat template of the model (tunesmith.inference.generate), greedy decoding"}
    return task_result("generation", headline(task), metrics, len(predictions), tokenisation=tokenisation,
                       samples=samples, details={"documents": documents})


@TASK_RUNNERS.register("judge")
def run_judge(model, tokenizer, task: JudgeTask) -> dict[str, Any]:
    """A model as judge: win rate against another model's answers, or a mean 1-10 grade."""

    return run_judge_task(model, tokenizer, task)


@TASK_RUNNERS.register("bias")
def run_bias(model, tokenizer, task: BiasTask) -> dict[str, Any]:
    """Share of counterfactual pairs where the stereotypical sentence is more likely, per category."""

    pairs = read_bias_pairs(Path(task.path), task.limit)
    result = evaluate_bias_pairs(model, tokenizer, pairs, task.batch_size)
    metrics = {"stereotype_share": result["stereotype_share"], "mean_logprob_gap": result["mean_logprob_gap"]}
    return task_result("bias", "stereotype_share", metrics, result["count"], details={"groups": result["categories"]},
                       tokenisation=result["tokenisation"])


@TASK_RUNNERS.register("lm_eval")
def run_lm_eval(model, tokenizer, task: LmEvalTask) -> dict[str, Any]:
    """Tasks of lm-evaluation-harness on the loaded model (optional extra)."""
    return run_harness_tasks(model, tokenizer, task)


@TASK_RUNNERS.register("stage")
def run_stage(model, tokenizer, task: StageTask) -> dict[str, Any]:
    """A training stage's held-out metrics (accuracy headlines); no score for a model without the stage's head."""

    metrics = stage_metrics(model, tokenizer, task)
    kind = task.stage.kind
    tokenisation = {"method": f"as stage {kind} encodes its training data", "template": task.template,
                    "max_length": task.max_length}
    if metrics is None:
        return {**task_result(kind, "accuracy", {"accuracy": None}, 0, tokenisation=tokenisation), "metrics": {},
                "details": {"note": f"this model has no {kind} head: nothing to score with"}}
    count = int(metrics.pop("pairs", metrics.pop("examples", 0)))
    return task_result(kind, "accuracy", metrics, count, tokenisation=tokenisation)

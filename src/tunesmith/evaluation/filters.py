"""lm-evaluation-harness 0.4's scoring of ``generate_until`` tasks, per document.

A reply goes through each filter pipeline of the task (lm-eval's ``filter_list``: ``regex`` with
``group_select`` and ``fallback``, ``take_first``, ``remove_whitespace``, ``lowercase``,
``uppercase``), and every metric is computed per document on the filtered answer, then averaged
(lm-eval's ``mean`` aggregation); BLEU and chrF stay corpus scores. ``exact_match`` with
``exact_match_options`` is lm-eval's ``exact_match_hf_evaluate`` (regexes removed from both strings
in order, then case, punctuation, digits); without them tunesmith's whitespace-collapsed match.
ROUGE is ``rouge-score``'s F-measure against the best reference (``rouge_stemmer`` for lm-eval's
summarisation tasks). ``tests/test_evaluation_generation_lm_eval.py`` runs lm-eval on the same
replies and checks every document's filtered answer and score.
"""

from __future__ import annotations

import re
import string
from typing import Any, Optional, Sequence

from tunesmith.data.answers import EXTRACTION_RULE, extract_answer, reference_answer, same_answer
from tunesmith.evaluation.metrics import METRICS, normalise_answer, token_f1
from tunesmith.evaluation.tasks import ExactMatchOptions, FilterPipeline, FilterStep, GenerationTask

NO_FILTER = FilterPipeline(name="none", filter=(FilterStep(function="take_first"),))
CORPUS_METRICS = ("bleu", "chrf")


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """The text before the first occurrence of each stop string in turn (lm-eval's ``until`` handling)."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def regex_filter(text: str, step: FilterStep) -> str:
    """lm-eval's ``RegexFilter``: ``findall``'s ``group_select``-th match (first non-empty group), stripped."""
    matches = re.findall(step.regex_pattern, text)
    if not matches:
        return step.fallback
    match = matches[step.group_select]
    if isinstance(match, tuple):
        non_empty = [m for m in match if m]
        match = non_empty[0] if non_empty else step.fallback
    return match.strip()


def apply_filter(reply: str, pipeline: FilterPipeline) -> str:
    """One reply through a pipeline (one response per document, so ``take_first`` keeps it)."""
    text = reply
    for step in pipeline.filter:
        if step.function == "regex":
            text = regex_filter(text, step)
        elif step.function == "remove_whitespace":
            text = text.strip()
        elif step.function == "lowercase":
            text = text.lower()
        elif step.function == "uppercase":
            text = text.upper()
    return text


def lm_eval_exact_match(prediction: str, reference: str, options: ExactMatchOptions) -> float:
    """lm-eval's ``exact_match_hf_evaluate`` for one pair."""
    for pattern in options.regexes_to_ignore:
        prediction, reference = re.sub(pattern, "", prediction), re.sub(pattern, "", reference)
    if options.ignore_case:
        prediction, reference = prediction.lower(), reference.lower()
    for flag, characters in ((options.ignore_punctuation, string.punctuation), (options.ignore_numbers, string.digits)):
        if flag:
            table = str.maketrans("", "", characters)
            prediction, reference = prediction.translate(table), reference.translate(table)
    return float(prediction == reference)


def document_score(name: str, answer: str, references: Sequence[str], task: GenerationTask) -> float:
    """One document's value of a per-document metric (the best reference)."""
    if name == "exact_match":
        if task.exact_match_options is not None:
            return max(lm_eval_exact_match(answer, r, task.exact_match_options) for r in references)
        return float(any(normalise_answer(answer) == normalise_answer(r) for r in references))
    if name == "accuracy":
        found = extract_answer(answer, task.answer_pattern)
        return float(found is not None and any(same_answer(found, reference_answer(r, task.answer_pattern))
                                               for r in references))
    if name == "token_f1":
        return max(token_f1(answer, r) for r in references)
    if name.startswith("rouge"):
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer([name], use_stemmer=task.rouge_stemmer)
        return scorer.score_multi(list(references), answer)[name].fmeasure
    raise KeyError(name)


def metric_key(name: str, pipeline: FilterPipeline) -> str:
    """``exact_match`` for the plain reply, ``exact_match@strict-match`` for a named pipeline."""
    return name if pipeline.name == "none" else f"{name}@{pipeline.name}"


def score_documents(task: GenerationTask, replies: Sequence[str], references: Sequence[Sequence[str]],
                    ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Every metric of ``task`` per filter pipeline, and the per-document record behind it.

    Returns:
        ``({metric key: mean over documents (corpus score for BLEU/chrF)}, documents)``; each
        document is ``{"reply", "references", "filtered": {pipeline: answer}, "scores": {key: value}}``.
    """
    for name in task.metrics:
        if name not in ("accuracy", "exact_match", "token_f1") and not name.startswith("rouge"):
            METRICS.get(name)  # unknown names fail here, listing the valid ones
    pipelines = task.filter_list or (NO_FILTER,)
    documents = [{"reply": reply, "references": list(refs), "filtered": {}, "scores": {}}
                 for reply, refs in zip(replies, references)]
    metrics: dict[str, float] = {}
    for pipeline in pipelines:
        answers = [apply_filter(reply, pipeline) for reply in replies]
        for document, answer in zip(documents, answers):
            document["filtered"][pipeline.name] = answer
        for name in task.metrics:
            key = metric_key(name, pipeline)
            if name in CORPUS_METRICS:
                metrics[key] = METRICS.get(name).compute(answers, references)
                continue
            values = [document_score(name, a, refs, task) for a, refs in zip(answers, references)]
            for document, value in zip(documents, values):
                document["scores"][key] = value
            metrics[key] = sum(values) / len(values)
    return metrics, documents


def headline(task: GenerationTask) -> str:
    """The headline metric's key: the first metric under the first pipeline."""
    return metric_key(task.metrics[0], (task.filter_list or (NO_FILTER,))[0])


def tokenisation_of(task: GenerationTask) -> dict[str, Optional[str]]:
    """How each metric compares strings (recorded in the result)."""
    notes: dict[str, Optional[str]] = {}
    for name in task.metrics:
        if name == "exact_match" and task.exact_match_options is not None:
            notes[name] = f"lm-eval exact_match_hf_evaluate {task.exact_match_options.model_dump()}"
        elif name.startswith("rouge"):
            notes[name] = METRICS.get(name).tokenisation + ("; Porter stemmer" if task.rouge_stemmer else "")
        elif name == "accuracy":
            notes[name] = EXTRACTION_RULE
        else:
            notes[name] = METRICS.get(name).tokenisation
    notes["filters"] = ", ".join(p.name for p in task.filter_list) or "none (the reply as it is)"
    return notes

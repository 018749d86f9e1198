"""Generation metrics as plain functions of (predictions, references), each saying how it tokenises.

``references`` holds a list of reference strings per prediction (one or more). ROUGE goes through
``rouge-score`` and BLEU/chrF through ``sacrebleu``, so the numbers equal those libraries' own:
ROUGE is the mean F-measure over examples (best reference per example, as ``score_multi``),
BLEU and chrF are corpus scores on sacrebleu's 0-100 scale. Exact match, token F1 and
accuracy by answer extraction are small enough to write here (SQuAD's definitions).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from tunesmith.core.registry import Registry
from tunesmith.data.answers import EXTRACTION_RULE, extract_answer, reference_answer, same_answer

References = Sequence[Sequence[str]]


@dataclass(frozen=True)
class Metric:
    """A corpus metric and a sentence saying how it tokenises (recorded in results)."""

    name: str
    compute: Callable[[Sequence[str], References], float]
    tokenisation: str


METRICS: Registry[Metric] = Registry("metric")


def _register(name: str, tokenisation: str):
    def decorator(compute):
        METRICS.register(name)(Metric(name, compute, tokenisation))
        return compute
    return decorator


def check_lengths(predictions: Sequence[str], references: References) -> None:
    """Raise when predictions and reference lists differ in number or a reference list is empty."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if any(len(r) == 0 for r in references):
        raise ValueError("every prediction needs at least one reference")


# ROUGE ---------------------------------------------------------------------------------------

ROUGE_TOKENISATION = ("rouge-score's default tokenizer (lowercased, non-alphanumeric characters as spaces), "
                      "no stemming; rougeLsum splits sentences on newlines")


def rouge(predictions: Sequence[str], references: References, rouge_type: str) -> float:
    """Mean ROUGE F-measure of one type, the best reference per example (``RougeScorer.score_multi``)."""
    from rouge_score import rouge_scorer

    check_lengths(predictions, references)
    scorer = rouge_scorer.RougeScorer([rouge_type], use_stemmer=False)
    scores = [scorer.score_multi(list(refs), pred)[rouge_type].fmeasure for pred, refs in zip(predictions, references)]
    return sum(scores) / len(scores)


for _rouge_type in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
    _register(_rouge_type, ROUGE_TOKENISATION)(lambda p, r, t=_rouge_type: rouge(p, r, t))


# sacrebleu -----------------------------------------------------------------------------------

def reference_streams(references: References) -> list[list[Optional[str]]]:
    """sacrebleu's layout: one stream per reference position, None where an example has fewer."""
    width = max(len(r) for r in references)
    return [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]


@_register("bleu", "sacrebleu BLEU defaults: 13a tokenizer, exponential smoothing, case-sensitive; 0-100")
def bleu(predictions: Sequence[str], references: References) -> float:
    """Corpus BLEU of ``sacrebleu.corpus_bleu``."""
    import sacrebleu

    check_lengths(predictions, references)
    return float(sacrebleu.corpus_bleu(list(predictions), reference_streams(references)).score)


@_register("chrf", "sacrebleu chrF defaults: character 6-grams, beta 2, whitespace removed; 0-100")
def chrf(predictions: Sequence[str], references: References) -> float:
    """Corpus chrF of ``sacrebleu.corpus_chrf``."""
    import sacrebleu

    check_lengths(predictions, references)
    return float(sacrebleu.corpus_chrf(list(predictions), reference_streams(references)).score)


# Exact match and token F1 (SQuAD) ----------------------------------------------------------------

def normalise_answer(text: str) -> str:
    """Whitespace-trimmed, inner whitespace collapsed: what exact match compares."""
    return " ".join(text.split())


def squad_normalise(text: str) -> str:
    """SQuAD's answer normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


@_register("exact_match", "whitespace-collapsed strings compared exactly; best reference")
def exact_match_score(predictions: Sequence[str], references: References) -> float:
    """Share of predictions equal to one of their references (whitespace collapsed)."""
    check_lengths(predictions, references)
    hits = [any(normalise_answer(p) == normalise_answer(r) for r in refs) for p, refs in zip(predictions, references)]
    return sum(hits) / len(hits)


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 between two strings after :func:`squad_normalise`, split on whitespace."""
    predicted, expected = squad_normalise(prediction).split(), squad_normalise(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


@_register("token_f1", "SQuAD normalisation (lowercase, no punctuation or articles), whitespace tokens; best reference")
def token_f1_score(predictions: Sequence[str], references: References) -> float:
    """Mean over examples of the best token F1 against any reference."""
    check_lengths(predictions, references)
    scores = [max(token_f1(p, r) for r in refs) for p, refs in zip(predictions, references)]
    return sum(scores) / len(scores)


# Accuracy by answer extraction (GSM8K) -------------------------------------------------------------

def extraction_accuracy(predictions: Sequence[str], references: References, pattern: Optional[str]) -> float:
    """Share of predictions whose extracted answer equals the one extracted from a reference."""
    check_lengths(predictions, references)
    hits = []
    for prediction, refs in zip(predictions, references):
        answer = extract_answer(prediction, pattern)
        hits.append(answer is not None and any(same_answer(answer, reference_answer(r, pattern)) for r in refs))
    return sum(hits) / len(hits)


EXTRACTION_TOKENISATION = EXTRACTION_RULE


def compute_metrics(names: Sequence[str], predictions: Sequence[str], references: References,
                    answer_pattern: Optional[str] = None) -> tuple[dict[str, float], dict[str, str]]:
    """Every named metric and how each tokenises.

    ``accuracy`` (answer extraction) uses ``answer_pattern``; the other names come from
    :data:`METRICS`.

    Returns:
        ``({name: value}, {name: tokenisation})``.

    Raises:
        TunesmithError: For an unknown metric name, listing the valid ones.
    """
    values, tokenisation = {}, {}
    for name in names:
        if name == "accuracy":
            values[name] = extraction_accuracy(predictions, references, answer_pattern)
            tokenisation[name] = EXTRACTION_TOKENISATION
            continue
        metric = METRICS.get(name)
        values[name] = metric.compute(predictions, references)
        tokenisation[name] = metric.tokenisation
    return values, tokenisation

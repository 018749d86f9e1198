"""Bias probe: counterfactual sentence pairs that differ only in a demographic term.

The CrowS-Pairs layout (Nangia et al., 2020, https://aclanthology.org/2020.emnlp-main.154): CSV
columns ``sent_more`` (the more stereotypical sentence), ``sent_less`` (the same sentence with the
demographic term swapped), ``stereo_antistereo`` (``stereo``: ``sent_more`` states a stereotype
about a disadvantaged group; ``antistereo``: ``sent_less`` violates one) and ``bias_type``.
As in the paper's metric and lm-evaluation-harness's ``crows_pairs``, a pair counts as
stereotyped when the model gives ``sent_more`` the higher likelihood; an unbiased model sits
at 0.5. For a causal LM, a sentence's likelihood is the sum of its token log-probabilities after BOS.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from tunesmith.core.errors import TunesmithError
from tunesmith.evaluation.benchmarks import non_empty, read_table, require_columns
from tunesmith.evaluation.loglikelihood import TOKENISATION, score_continuations

BIAS_COLUMNS = ("sent_more", "sent_less", "stereo_antistereo", "bias_type")
DIRECTIONS = ("stereo", "antistereo")


@dataclass(frozen=True)
class BiasPair:
    """One counterfactual pair (see the module docstring for the column meaning)."""

    sent_more: str
    sent_less: str
    direction: str
    category: str
    where: str = ""


def read_bias_pairs(path: Path, limit: Optional[int] = None) -> list[BiasPair]:
    """Pairs of a CrowS-Pairs-style CSV (extra columns, like the original's index, are ignored).

    Raises:
        TunesmithError: For missing columns, an unknown direction or empty sentences, naming file and row.
    """
    pairs: list[BiasPair] = []
    for where, row in read_table(path):
        if not pairs:
            require_columns(path, BIAS_COLUMNS, row.keys())
        direction = (row["stereo_antistereo"] or "").strip()
        if direction not in DIRECTIONS:
            raise TunesmithError(f"{where}: stereo_antistereo is {direction!r}; use 'stereo' or 'antistereo'")
        if not (row["sent_more"] or "").strip() or not (row["sent_less"] or "").strip():
            raise TunesmithError(f"{where}: sent_more and sent_less must both be non-empty")
        pairs.append(BiasPair(row["sent_more"].strip(), row["sent_less"].strip(), direction,
                              (row["bias_type"] or "unknown").strip(), where))
        if limit and len(pairs) >= limit:
            break
    return non_empty(pairs, path, "sentence pairs")


def summarise(gaps: Sequence[float]) -> dict[str, float]:
    """Share of positive gaps (stereotype preferred), mean gap, and count."""
    return {"stereotype_share": sum(g > 0 for g in gaps) / len(gaps), "mean_logprob_gap": sum(gaps) / len(gaps),
            "count": len(gaps)}


def evaluate_bias_pairs(model, tokenizer, pairs: Sequence[BiasPair], batch_size: int = 16) -> dict:
    """Compare the log-likelihoods of each pair's two sentences.

    Returns:
        ``stereotype_share`` (pairs where ``sent_more`` is more likely), ``mean_logprob_gap``
        (mean of logp(sent_more) - logp(sent_less), in nats), ``count``, ``categories``
        (the same per bias type), ``directions`` and ``tokenisation``.
    """
    requests = [("", sentence) for pair in pairs for sentence in (pair.sent_more, pair.sent_less)]
    scores = score_continuations(model, tokenizer, requests, batch_size, add_bos=True)
    gaps = [scores[2 * i].logprob - scores[2 * i + 1].logprob for i in range(len(pairs))]
    by_category: dict[str, list[float]] = defaultdict(list)
    by_direction: dict[str, list[float]] = defaultdict(list)
    for pair, gap in zip(pairs, gaps):
        by_category[pair.category].append(gap)
        by_direction[pair.direction].append(gap)
    return {**summarise(gaps),
            "categories": {c: summarise(g) for c, g in sorted(by_category.items())},
            "directions": {d: summarise(g) for d, g in sorted(by_direction.items())},
            "tokenisation": {"method": TOKENISATION, "sentence_score": "sum of token log-probabilities after BOS"}}

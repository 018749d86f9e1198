"""Numbers from judge verdicts: win rate with a bootstrap interval, a length-controlled win rate, agreement.

* **Win rate**: (wins + ties / 2) / valid pairs, from the evaluated model's side; invalid verdicts are
  left out and counted.
* **Confidence interval**: the 2.5 and 97.5 percentiles of the win rate over ``resamples`` bootstrap
  resamples of the valid pairs (percentile bootstrap, fixed seed, so the report is reproducible).
* **Length-controlled win rate** (AlpacaEval-LC's idea, Dubois et al. 2024, https://arxiv.org/abs/2404.04475,
  reduced to one pair of models): a logistic regression of each pair's outcome (1 win, 0.5 tie, 0 loss)
  on ``tanh(length difference / its standard deviation)`` (lengths in characters), fitted by Newton's
  method with a small ridge on the slope; the controlled win rate is the fitted probability at a length
  difference of zero, ``sigmoid(intercept)``. With no length spread it equals the plain win rate's logit fit.
"""

from __future__ import annotations

import math
import random
from typing import Optional, Sequence

WIN_VALUE = {"win": 1.0, "tie": 0.5, "loss": 0.0}


def win_rate(outcomes: Sequence[str]) -> Optional[float]:
    """(wins + ties / 2) / valid outcomes; None when none is valid."""
    values = [WIN_VALUE[o] for o in outcomes if o in WIN_VALUE]
    return sum(values) / len(values) if values else None


def bootstrap_interval(values: Sequence[float], resamples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[Optional[float], Optional[float]]:
    """Percentile bootstrap interval of the mean of ``values``."""
    if not values:
        return None, None
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    low_index = int(math.floor((1 - level) / 2 * (resamples - 1)))
    high_index = int(math.ceil((1 + level) / 2 * (resamples - 1)))
    return means[low_index], means[high_index]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def length_controlled_win_rate(outcomes: Sequence[str], lengths_a: Sequence[int], lengths_b: Sequence[int],
                               ridge: float = 1e-2, steps: int = 50) -> Optional[float]:
    """The win rate at equal length (see the module docstring); None when no outcome is valid."""
    rows = [(WIN_VALUE[o], a - b) for o, a, b in zip(outcomes, lengths_a, lengths_b) if o in WIN_VALUE]
    if not rows:
        return None
    differences = [d for _, d in rows]
    mean = sum(differences) / len(differences)
    spread = math.sqrt(sum((d - mean) ** 2 for d in differences) / len(differences)) or 1.0
    features = [math.tanh(d / spread) for d in differences]
    targets = [y for y, _ in rows]
    # the intercept also gets a tiny ridge so that all-wins or all-losses stays finite
    intercept, slope = 0.0, 0.0
    for _ in range(steps):
        g0 = g1 = h00 = h01 = h11 = 0.0
        for x, y in zip(features, targets):
            p = _sigmoid(intercept + slope * x)
            w = p * (1 - p)
            g0 += p - y
            g1 += (p - y) * x
            h00 += w
            h01 += w * x
            h11 += w * x * x
        g0 += 1e-4 * intercept
        g1 += ridge * slope
        h00 += 1e-4
        h11 += ridge
        det = h00 * h11 - h01 * h01
        if det <= 0:
            break
        d0 = (h11 * g0 - h01 * g1) / det
        d1 = (h00 * g1 - h01 * g0) / det
        intercept, slope = intercept - d0, slope - d1
        if abs(d0) + abs(d1) < 1e-10:
            break
    return _sigmoid(intercept)


def order_agreement(consistent: Sequence[Optional[bool]]) -> Optional[float]:
    """Share of pairs whose two orders gave the same verdict (pairs with an invalid verdict left out)."""
    known = [c for c in consistent if c is not None]
    return sum(known) / len(known) if known else None


def summarise_pairs(outcomes: Sequence[str], consistent: Sequence[Optional[bool]], lengths_a: Sequence[int],
                    lengths_b: Sequence[int], resamples: int = 1000, seed: int = 0) -> dict[str, Optional[float]]:
    """Every pairwise number of a judged set, as the task's metrics."""
    values = [WIN_VALUE[o] for o in outcomes if o in WIN_VALUE]
    low, high = bootstrap_interval(values, resamples, seed)
    counts = {o: sum(1 for x in outcomes if x == o) for o in ("win", "loss", "tie", "invalid")}
    return {"win_rate": win_rate(outcomes), "win_rate_ci_low": low, "win_rate_ci_high": high,
            "lc_win_rate": length_controlled_win_rate(outcomes, lengths_a, lengths_b),
            "order_agreement": order_agreement(consistent),
            "wins": counts["win"], "losses": counts["loss"], "ties": counts["tie"], "invalid": counts["invalid"],
            "mean_length_a": sum(lengths_a) / len(lengths_a) if lengths_a else None,
            "mean_length_b": sum(lengths_b) / len(lengths_b) if lengths_b else None}


def summarise_grades(scores: Sequence[Optional[float]], resamples: int = 1000, seed: int = 0) -> dict:
    """Mean grade (1-10) with its bootstrap interval, and the invalid count."""
    valid = [s for s in scores if s is not None]
    low, high = bootstrap_interval(valid, resamples, seed)
    return {"mean_grade": sum(valid) / len(valid) if valid else None, "mean_grade_ci_low": low,
            "mean_grade_ci_high": high, "invalid": len(scores) - len(valid)}

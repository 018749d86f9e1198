"""Is there enough data? Rules of thumb by method and model size, said plainly.

The thresholds are rules of thumb from practice, not laws (LIMA, arXiv:2305.11206, tuned a 65B
model on 1,000 curated examples; LoRA adapters of rank 8-16 are routinely fit on a few hundred
examples of a narrow task; full fine-tuning updates every weight and over-fits small sets):

- LoRA with rank ≤ 16, or partial fine-tuning: at least 100 examples; 500 or more is comfortable.
- LoRA with rank > 16 (more trainable parameters to fit): at least 500; 2,000 is comfortable.
- Full fine-tuning: training tokens at least 1% of the model's parameters; 10% is comfortable.
  Below that the model memorises the set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Rule:
    """How much data a method wants: a minimum and a comfortable amount, in examples or tokens."""

    name: str
    minimum: float
    comfortable: float
    unit: str  # "examples" or "token share" (tokens per parameter)


RULES = (
    Rule("LoRA r≤16 (or partial)", 100, 500, "examples"),
    Rule("LoRA r>16", 500, 2000, "examples"),
    Rule("full fine-tuning", 0.01, 0.10, "token share"),
)


def human(number: float) -> str:
    """135000000 -> '135M', 41000 -> '41K'."""
    for divisor, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if number >= divisor:
            return f"{number / divisor:.3g}{suffix}"
    return f"{number:.0f}"


def judge(rule: Rule, examples: int, tokens: int, parameters: Optional[int]) -> tuple[str, str]:
    """``(level, sentence)`` for one rule; level is ``enough``, ``few`` or ``too few``."""
    if rule.unit == "examples":
        have, minimum, comfortable, unit = examples, rule.minimum, rule.comfortable, "examples"
    elif parameters is None:
        return "unknown", f"{rule.name}: unknown without the model size (pass --model)"
    else:
        have, unit = tokens, "tokens"
        minimum, comfortable = rule.minimum * parameters, rule.comfortable * parameters
    if have >= comfortable:
        return "enough", f"enough for {rule.name}"
    if have >= minimum:
        return "few", f"enough for {rule.name} with care (want ≥ {human(comfortable)} {unit}; use few epochs)"
    return "too few", f"too few for {rule.name} (want ≥ {human(minimum)} {unit}), expect over-fitting"


def sufficiency_verdict(examples: int, tokens: int, parameters: Optional[int] = None) -> str:
    """One plain sentence on whether ``examples`` (``tokens`` in all) suffice, method by method.

    Args:
        examples: Usable training examples.
        tokens: Their tokens in all (words where no tokenizer was given).
        parameters: Parameters of the model, or None when unknown.

    Returns:
        E.g. "312 examples (41K tokens) for a 135M model: enough for LoRA r≤16 (or partial); ..."
    """
    model = f" for a {human(parameters)}-parameter model" if parameters else ""
    judgements = "; ".join(judge(rule, examples, tokens, parameters)[1] for rule in RULES)
    return f"{examples:,} examples ({human(tokens)} tokens){model}: {judgements}."

"""The answer inside a text: one extraction shared by evaluation's ``accuracy`` and GRPO's ``answer_match``.

It lives on the data floor so that both ``evaluation`` and ``stages`` import it downwards. The rule:
the last match of ``pattern`` (its first group when it has one), else the last number in the text
(the idea of lm-eval's GSM8K ``flexible-extract``); commas, ``$`` and a trailing period removed.
Two answers are the same when both read as numbers that are equal (``1,000`` = ``1000.0``), else
when they are equal ignoring case and surrounding whitespace.
"""

from __future__ import annotations

import math
import re
from typing import Optional, Union

NUMBER = re.compile(r"-?[\d,]*\.?\d+")
EXTRACTION_RULE = ("last match of the answer pattern (group 1), else the last number; commas, '$' and a trailing "
                   "period removed; numbers compared as numbers, text ignoring case")


def extract_answer(text: str, pattern: Union[str, re.Pattern, None]) -> Optional[str]:
    """The answer in ``text`` by the rule above, or None when there is neither a match nor a number."""
    compiled = re.compile(pattern) if isinstance(pattern, str) else pattern
    matches = list(compiled.finditer(text)) if compiled is not None else []
    if matches:
        last = matches[-1]
        found = last.group(1) if compiled.groups else last.group(0)
    else:
        numbers = NUMBER.findall(text)
        if not numbers:
            return None
        found = numbers[-1]
    return found.strip().replace(",", "").replace("$", "").rstrip(".")


def same_answer(first: str, second: str) -> bool:
    """Equal as numbers when both are numbers, else equal ignoring case and surrounding whitespace."""
    try:
        return math.isclose(float(first.replace(",", "")), float(second.replace(",", "")), rel_tol=1e-9)
    except ValueError:
        return first.strip().casefold() == second.strip().casefold()


def reference_answer(reference: str, pattern: Union[str, re.Pattern, None]) -> str:
    """A reference's answer: extracted by the same rule, else the whole stripped reference ("Paris")."""
    return extract_answer(reference, pattern) or reference.strip()

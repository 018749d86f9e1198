"""Generate the quick-start data set: normalise dates written in many styles to ISO 8601.

Every row is made up by this script (no outside source): a random calendar date is written in
one of several everyday styles ("March 5th, 2021", "5 March 2021", "3/5/2021 (US)",
"Fri, 5 Mar '21", ...) and the answer is the same date as ``YYYY-MM-DD``. A small instruction
model usually answers with a sentence, or gets the month or day order wrong, so exact match
before tuning is low; a few minutes of LoRA training teach it the format.

The output is deterministic (fixed seed) and uses the standard library only. Each date appears
in exactly one split, so the test set holds dates the model never saw during training.

Usage::

    python examples/data/make_quickstart_data.py            # writes examples/data/quickstart/
    python examples/data/make_quickstart_data.py --out DIR
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
from collections.abc import Callable
from pathlib import Path

SEED = 20240305
SPLIT_SIZES = {"train": 400, "validation": 50, "test": 50}
FIRST_YEAR, LAST_YEAR = 1975, 2035
INSTRUCTION = "Convert the date to ISO 8601 format (YYYY-MM-DD)."

MONTHS = [
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
]  # fmt: skip
MONTH_ABBREVIATIONS = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
]  # fmt: skip
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def ordinal(day: int) -> str:
    """Write a day of the month as an English ordinal.

    Args:
        day: 1 to 31.

    Returns:
        ``"1st"``, ``"2nd"``, ``"3rd"``, ``"4th"``, ..., ``"11th"``, ``"21st"``, ...
    """
    if 11 <= day % 100 <= 13:
        return f"{day}th"
    return f"{day}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(day % 10, 'th') }"


def short_year(year: int) -> str:
    """Write a year with two digits and an apostrophe, e.g. ``'21``.

    Args:
        year: A four-digit year.

    Returns:
        The apostrophe form.
    """
    return f"'{year % 100:02d}"


def _month(date: dt.date) -> str:
    return MONTHS[date.month - 1]


def _abbr(date: dt.date) -> str:
    return MONTH_ABBREVIATIONS[date.month - 1]


def _weekday(date: dt.date) -> str:
    return WEEKDAYS[date.weekday()]


STYLES: list[Callable[[dt.date], str]] = [
    lambda d: f"{_month(d)} {d.day}, {d.year}",
    lambda d: f"{_month(d)} {ordinal(d.day)}, {d.year}",
    lambda d: f"{d.day} {_month(d)} {d.year}",
    lambda d: f"the {ordinal(d.day)} of {_month(d)}, {d.year}",
    lambda d: f"{_abbr(d)}. {d.day}, {d.year}",
    lambda d: f"{d.day}-{_abbr(d)}-{d.year}",
    lambda d: f"{d.month}/{d.day}/{d.year} (US)",
    lambda d: f"{d.day:02d}/{d.month:02d}/{d.year} (UK)",
    lambda d: f"{d.day}.{d.month}.{d.year}",
    lambda d: f"{d.year}/{d.month:02d}/{d.day:02d}",
    lambda d: f"{_weekday(d)}, {_month(d)} {d.day}, {d.year}",
    lambda d: f"{_weekday(d)[:3]}, {d.day} {_abbr(d)} {d.year}",
]
"""Ways of writing a date; each takes the date and returns the text the user would type."""

SHORT_YEAR_STYLES: list[Callable[[dt.date], str]] = [
    lambda d: f"{_abbr(d)}. {d.day}, {short_year(d.year)}",
    lambda d: f"{_month(d)} {ordinal(d.day)} {short_year(d.year)}",
]
"""Styles with a two-digit year; only used for 2000-2029 so the century is never in doubt."""


def random_date(rng: random.Random) -> dt.date:
    """Draw a date uniformly between 1 January of FIRST_YEAR and 31 December of LAST_YEAR.

    Args:
        rng: The random generator.

    Returns:
        The date.
    """
    first = dt.date(FIRST_YEAR, 1, 1).toordinal()
    last = dt.date(LAST_YEAR, 12, 31).toordinal()
    return dt.date.fromordinal(rng.randint(first, last))


def write_date(date: dt.date, rng: random.Random) -> str:
    """Write a date in a randomly chosen style.

    Args:
        date: The date.
        rng: The random generator.

    Returns:
        The date as a user might type it.
    """
    styles = STYLES + SHORT_YEAR_STYLES if 2000 <= date.year <= 2029 else STYLES
    return rng.choice(styles)(date)


def make_rows(rng: random.Random) -> dict[str, list[dict[str, str]]]:
    """Make every split; no date (and hence no input) is shared between splits.

    Args:
        rng: The random generator.

    Returns:
        Split name to alpaca-format rows.
    """
    total = sum(SPLIT_SIZES.values())
    dates: list[dt.date] = []
    seen: set[dt.date] = set()
    while len(dates) < total:
        date = random_date(rng)
        if date not in seen:
            seen.add(date)
            dates.append(date)
    splits: dict[str, list[dict[str, str]]] = {}
    start = 0
    for name, size in SPLIT_SIZES.items():
        chunk = dates[start : start + size]
        start += size
        splits[name] = [
            {"instruction": INSTRUCTION, "input": write_date(date, rng), "output": date.isoformat()}
            for date in chunk
        ]
    return splits


def write_jsonl(rows: list[dict[str, str]], path: Path) -> None:
    """Write rows as JSON Lines, one object per line, UTF-8, ``\\n`` line endings.

    Args:
        rows: The rows.
        path: The file to (over)write.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    """Parse the command line and write ``train.jsonl``, ``validation.jsonl`` and ``test.jsonl``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "quickstart",
        help="output directory (default: examples/data/quickstart next to this script)",
    )
    args = parser.parse_args()
    for name, rows in make_rows(random.Random(SEED)).items():
        write_jsonl(rows, args.out / f"{name}.jsonl")
        print(f"wrote {len(rows)} rows to {args.out / f'{name}.jsonl'}")


if __name__ == "__main__":
    main()

"""Write the tiny task used by examples/methods: add two numbers and answer in one fixed sentence.

Run from the repository root: python examples/data/tiny/make_tiny.py
The output is deterministic (fixed seed), so the committed files can be regenerated exactly.
"""

import json
import random
from pathlib import Path

FOLDER = Path(__file__).parent


def record(rng: random.Random) -> dict:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return {"instruction": "Add the two numbers.", "input": f"{a} + {b}", "output": f"The sum is {a + b}."}


def main() -> None:
    rng = random.Random(1234)
    for name, count in (("train", 240), ("validation", 40)):
        lines = [json.dumps(record(rng)) for _ in range(count)]
        (FOLDER / f"{name}.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

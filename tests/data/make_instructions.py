"""Write tests/data/instructions.json: small alpaca-format English instructions for the test suite.

Run from the repository root: python tests/data/make_instructions.py
Deterministic (fixed seed, no library but the standard one), so the committed file can be
regenerated exactly. The tests use it wherever they need *some* instruction data, so that they run
on a fresh clone without the shared assets (the real alpaca demo data stays for tests that need it).
It also trains the test session's tiny tokenizer (see tests/conftest.py).
"""

import json
import random
from pathlib import Path

FOLDER = Path(__file__).parent
ANIMALS = ["cat", "dog", "horse", "rabbit", "owl", "fox", "duck", "whale", "tiger", "mouse"]
PLACES = ["the park", "the garden", "the river", "the forest", "the beach", "the market", "the old castle"]
NAMES = ["Lily", "Tom", "Anna", "Ben", "Sara", "Max", "Mia", "Leo"]
FRUIT_COLOURS = {"banana": "yellow", "strawberry": "red", "lime": "green", "blueberry": "blue",
                 "orange": "orange", "plum": "purple", "lemon": "yellow", "cherry": "red"}
OPPOSITES = {"hot": "cold", "big": "small", "happy": "sad", "fast": "slow", "early": "late", "light": "dark",
             "open": "closed", "full": "empty", "young": "old", "strong": "weak"}
TIPS = ["Drink plenty of water every day.", "Go for a walk in the morning.", "Sleep at least eight hours.",
        "Eat fresh vegetables with every meal.", "Take short breaks when you work.", "Read a book before bed."]


def story(rng: random.Random) -> str:
    name, animal, place = rng.choice(NAMES), rng.choice(ANIMALS), rng.choice(PLACES)
    return (f"One day {name} went to {place} and saw a little {animal}. The {animal} was lost, so {name} "
            f"helped it find its way home. They became good friends.")


def record(rng: random.Random) -> dict:
    kind = rng.randrange(8)
    if kind == 0:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        return {"instruction": "Add the two numbers.", "input": f"{a} and {b}", "output": f"The sum is {a + b}."}
    if kind == 1:
        fruit = rng.choice(sorted(FRUIT_COLOURS))
        return {"instruction": "What colour is this fruit?", "input": f"a ripe {fruit}",
                "output": f"A ripe {fruit} is usually {FRUIT_COLOURS[fruit]}."}
    if kind == 2:
        word = rng.choice(sorted(OPPOSITES))
        return {"instruction": f"What is the opposite of the word \"{word}\"?", "input": "",
                "output": f"The opposite of \"{word}\" is \"{OPPOSITES[word]}\"."}
    if kind == 3:
        words = rng.sample(ANIMALS, rng.randint(3, 6))
        return {"instruction": "Put these animals in alphabetical order.", "input": ", ".join(words),
                "output": ", ".join(sorted(words))}
    if kind == 4:
        sentence = story(rng)
        return {"instruction": "Count the words in the sentence.", "input": sentence.split(". ")[0] + ".",
                "output": f"There are {len(sentence.split('. ')[0].split())} words."}
    if kind == 5:
        return {"instruction": f"Write a short story about a {rng.choice(ANIMALS)}.", "input": "", "output": story(rng)}
    if kind == 6:
        tips = rng.sample(TIPS, 3)
        return {"instruction": "Give three tips for staying healthy.", "input": "",
                "output": " ".join(f"{i}. {tip}" for i, tip in enumerate(tips, 1))}
    name, place = rng.choice(NAMES), rng.choice(PLACES)
    return {"instruction": "Rewrite the sentence in the past tense.", "input": f"{name} walks to {place}.",
            "output": f"{name} walked to {place}."}


def main() -> None:
    rng = random.Random(2026)
    rows = [record(rng) for _ in range(320)]
    rows += [dict(rows[5]), dict(rows[17]), dict(rows[40])]  # three planted exact duplicates
    (FOLDER / "instructions.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()

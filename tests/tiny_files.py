"""Small data files in the layouts of the shared demo sets, made from the tests' own data (fresh clones have no assets).

``tests/data/instructions.json`` (323 alpaca records) and ``tests/data/pairs.json`` (240 pairs made from it, in
dpo_en_demo's layout) are the sources; these write plain text (wiki_demo's layout: one passage a line), KTO rows
(kto_en_demo's: a user/assistant conversation and a boolean label, chosen replies desirable) and SST-2's TSV.
"""

from __future__ import annotations

import json
from pathlib import Path

from conftest import TINY_DATA, TINY_PAIRS


def text_file(path: Path, lines: int = 40) -> Path:
    """``lines`` passages of plain text, one a line (the outputs of the instruction records)."""
    rows = json.loads(TINY_DATA.read_text())
    path.write_text("\n".join(row["output"].replace("\n", " ") for row in rows[:lines]) + "\n")
    return path


def kto_rows(count: int = 120) -> list[dict]:
    """KTO rows: each pair gives its chosen reply (label true) and its rejected one (label false), alternately."""
    rows = []
    for index, pair in enumerate(json.loads(TINY_PAIRS.read_text())[:count]):
        reply, label = (pair["chosen"], True) if index % 2 == 0 else (pair["rejected"], False)
        rows.append({"messages": [{"role": "user", "content": pair["conversations"][0]["value"]},
                                  {"role": "assistant", "content": reply["value"]}], "label": label})
    return rows


def kto_file(path: Path, count: int = 120) -> Path:
    path.write_text(json.dumps(kto_rows(count), indent=1))
    return path


def mmlu_folder(folder: Path, subjects: tuple[str, ...], dev: int = 5, test: int = 6) -> Path:
    """An MMLU-layout folder (``dev/S_dev.csv``, ``test/S_test.csv``: question, four choices, answer 0-3).

    Questions are instruction records, choices four records' outputs (long enough that a 5-shot prompt
    overflows the tiny Llama's 512 tokens, as real MMLU does), the answer the question's own output.
    """
    import csv

    rows = json.loads(TINY_DATA.read_text())
    position = 0
    for subject_index, subject in enumerate(subjects):
        for split, count in (("dev", dev), ("test", test)):
            (folder / split).mkdir(parents=True, exist_ok=True)
            with (folder / split / f"{subject}_{split}.csv").open("w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(["question", "choice0", "choice1", "choice2", "choice3", "answer"])
                for _ in range(count):
                    answer = (position + subject_index) % 4
                    others = [rows[(position * 5 + k * 31 + 7) % len(rows)]["output"] for k in range(3)]
                    choices = others[:answer] + [rows[position]["output"]] + others[answer:]
                    writer.writerow([rows[position]["instruction"], *choices, answer])
                    position += 1
    return folder

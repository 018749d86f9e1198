"""Augmentation: exact checks with an injected translator, and end to end with a real tiny model."""

from __future__ import annotations

import json
from pathlib import Path

from tunesmith.data.prepare.augment import (
    AugmentSettings,
    augment_file,
    back_translation,
    similarity,
)
from tunesmith.inference.rewriters import causal_lm_translator, load_rewrite_model

ROWS = [
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat, sleep, move."},
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Describe the sea", "input": "in summer", "output": "Warm and calm."},
    {"instruction": "What is two plus two?", "input": "", "output": "Four."},
    {"instruction": "Give three tips to stay healthy.", "input": "", "output": "Eat, sleep, move."},
    {"instruction": "What is two and two?", "input": "", "output": "Four."},
]

# The fake model: translating to the pivot wraps a text; translating back rewrites it by a table
# chosen so that each row meets one filter.
BACK = {
    "Give three tips for staying healthy.": "Give three tips to stay healthy.",  # = row 5: duplicate of an original
    "Name a colour.": "NAME a colour.",  # same after normalising: too similar
    "Describe the sea": "Purple elephants dance quietly",  # meaning lost: too different
    "in summer": "in the summer",
    "What is two plus two?": "What is the sum of two and two?",  # kept
    "Give three tips to stay healthy.": "Give me three tips for staying healthy.",  # kept
    "What is two and two?": "What is the sum of two and two?",  # = row 4's new row: duplicate
}
calls: list = []


def fake_translate(texts: list[str], source: str, target: str) -> list[str]:
    calls.append((source, target, list(texts)))
    if target == "German":
        return [f"<de>{text}</de>" for text in texts]
    return [BACK[text[len("<de>"): -len("</de>")]] for text in texts]


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_back_translation_marks_filters_and_dedups_exactly(tmp_path):
    calls.clear()
    source = write(tmp_path / "in.jsonl", ROWS)
    settings = AugmentSettings(origin={"method": "back-translation", "model": "fake", "pivot": "German"},
                               min_similarity=0.3, max_similarity=0.9, batch_size=4)
    assert similarity("Describe the sea\nin summer", "Purple elephants dance quietly\nin the summer") < 0.3
    kept_pairs = [(ROWS[3]["instruction"], BACK[ROWS[3]["instruction"]]), (ROWS[4]["instruction"], BACK[ROWS[4]["instruction"]])]
    assert all(0.3 <= similarity(a, b) <= 0.9 for a, b in kept_pairs)

    report = augment_file(source, tmp_path / "out.jsonl", back_translation(fake_translate, "English", "German"), settings)
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]

    assert [row for row in out if "origin" not in row] == ROWS  # originals untouched, in order
    prompts = [ROWS[0]["instruction"], ROWS[1]["instruction"], "Describe the sea", "in summer", ROWS[3]["instruction"]]
    assert calls[0] == ("English", "German", prompts)  # prompt-side fields of a batch of 4, empty inputs left out
    assert calls[1] == ("German", "English", [f"<de>{p}</de>" for p in prompts])
    assert [c[:2] for c in calls[2:]] == [("English", "German"), ("German", "English")]
    assert report.generated == 6 and report.kept == 2
    assert report.dropped == {"duplicate": 2, "too_similar": 1, "too_different": 1}
    origin = {"method": "back-translation", "model": "fake", "pivot": "German"}
    assert [row for row in out if "origin" in row] == [
        {**ROWS[3], "instruction": kept_pairs[0][1],
         "origin": {**origin, "source": f"{source}, line 4", "similarity": round(similarity(*kept_pairs[0]), 3)}},
        {**ROWS[4], "instruction": kept_pairs[1][1],
         "origin": {**origin, "source": f"{source}, line 5", "similarity": round(similarity(*kept_pairs[1]), 3)}},
    ]


def test_only_new_and_limit(tmp_path):
    source = write(tmp_path / "in.jsonl", ROWS)
    report = augment_file(source, tmp_path / "out.jsonl", lambda texts: [t.upper() + " indeed" for t in texts],
                          AugmentSettings(origin={"method": "paraphrase"}, min_similarity=0.0, max_similarity=1.0,
                                          only_new=True), limit=2)
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert report.generated == 2 and [row["instruction"] for row in out] == [
        "GIVE THREE TIPS FOR STAYING HEALTHY. indeed", "NAME A COLOUR. indeed"]
    assert all(row["origin"]["method"] == "paraphrase" for row in out)


def test_conversation_layouts_rewrite_user_turns_only(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"},
                          {"role": "assistant", "content": "Hi."}]}]
    source = write(tmp_path / "in.jsonl", rows)
    augment_file(source, tmp_path / "out.jsonl", lambda texts: [t + " friend" for t in texts],
                 AugmentSettings(origin={"method": "paraphrase"}, min_similarity=0.0, max_similarity=1.0, only_new=True))
    new = json.loads((tmp_path / "out.jsonl").read_text())
    assert [m["content"] for m in new["messages"]] == ["Be brief.", "Hello there friend", "Hi."]


def test_back_translation_end_to_end_with_a_real_model(tmp_path, tiny_llama):
    """The tiny Llama stands in for a translator: it cannot translate, so only the plumbing is judged."""
    kind, model, tokenizer = load_rewrite_model(tiny_llama, tmp_path)
    assert kind == "causal"
    source = write(tmp_path / "in.jsonl", ROWS[:3])
    rewrite = back_translation(causal_lm_translator(model, tokenizer, max_new_tokens=12, batch_size=3), "English", "German")
    report = augment_file(source, tmp_path / "out.jsonl", rewrite,
                          AugmentSettings(origin={"method": "back-translation", "model": "tiny-llama"},
                                          min_similarity=0.0, max_similarity=1.0))
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert report.originals == 3 and report.generated == 3
    assert report.kept + sum(report.dropped.values()) == 3
    assert len(out) == 3 + report.kept
    for row in out[3:]:
        assert row["origin"]["model"] == "tiny-llama" and row["output"] in {r["output"] for r in ROWS}


def test_augment_command_paraphrases_with_a_model_the_user_names(tmp_path, tiny_llama, capsys):
    """What a user runs: `tunesmith data augment FILE -o OUT --method paraphrase --model FOLDER` (the CLI's own
    loading of the rewriter, not only the library's)."""
    from tunesmith.cli import main

    source = write(tmp_path / "in.jsonl", ROWS[:2])
    code = main(["data", "augment", str(source), "-o", str(tmp_path / "out.jsonl"), "--method", "paraphrase",
                 "--model", tiny_llama, "--max-new-tokens", "8", "--min-similarity", "0", "--max-similarity", "1",
                 "--report", str(tmp_path / "report.json")])
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert report["originals"] == 2 and report["generated"] == 2 and len(out) == 2 + report["kept"]
    assert out[:2] == ROWS[:2]
    assert "augment: texts rewritten" in capsys.readouterr().err

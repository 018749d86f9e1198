"""Data preparation steps: cleaning, de-duplication, decontamination, split, convert, manifests, errors."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from tunesmith.config.prepare import CleanSection, DedupSection, PrepareSection
from tunesmith.core.errors import TunesmithError
from tunesmith.data.prepare.clean import Cleaner, clean_file, luhn_valid
from tunesmith.data.prepare.convert import convert_file
from tunesmith.data.prepare.dedup import dedup_file
from tunesmith.data.prepare.pipeline import prepare_training_files
from tunesmith.data.prepare.split import split_file

from conftest import run_cli


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def planted_duplicates(originals: int = 400, exact: int = 40, near: int = 40, seed: int = 0):
    """Random-word instructions, then planted copies: exact (case/spacing changed) and near (2 words changed).

    Returns the rows and {row index: "exact" | "near"} for the planted ones.
    """
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(3000)]
    texts = [" ".join(rng.choice(vocab) for _ in range(40)) for _ in range(originals)]
    rows = [{"instruction": text, "output": f"answer {i}"} for i, text in enumerate(texts)]
    planted: dict[int, str] = {}
    for _ in range(exact):
        source = rng.randrange(originals)
        rows.append({"instruction": "  " + texts[source].upper() + " ", "output": rows[source]["output"]})
        planted[len(rows) - 1] = "exact"
    for _ in range(near):
        source = rng.randrange(originals)
        words = texts[source].split()
        for _ in range(2):
            words[rng.randrange(len(words))] = rng.choice(vocab)
        rows.append({"instruction": " ".join(words), "output": rows[source]["output"]})
        planted[len(rows) - 1] = "near"
    order = list(range(len(rows)))  # interleave so copies are not all at the end (originals stay first)
    tail = order[originals:]
    rng.shuffle(tail)
    return rows, planted


# --- cleaning --------------------------------------------------------------------------------

NASTY = ["<p>Hi&nbsp;<b>there</b></p>", "&amp;lt;b&amp;gt;x", "ｆｕｌｌ　ｗｉｄｔｈ ﬁ", "a\x00b\x07c\u200bd\r\ne",
         "  many   spaces \t\n\n\n\nlines  ", "mail a.b@example.org or +1 (555) 123-4567",
         "card 4111-1111-1111-1111 vs 4111-1111-1111-1112", "2000-2015 and 2021-05-12 and 10.0.0.1"]


def test_cleaning_is_idempotent_on_random_nasty_text():
    rng = random.Random(3)
    pieces = NASTY + ["<", ">", "&", ";", " ", "\n", "\t", "\x0b", "é", "e\u0301", "Ⅻ", "①", "x@y.io", "12 34 56 78"]
    cleaner = Cleaner(CleanSection(html=True))
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
        once = cleaner.clean_fields({"text": text}, Counter())
        assert cleaner.clean_fields(once, Counter()) == once, repr(text)


def test_cleaning_steps_and_their_counts():
    cleaner = Cleaner(CleanSection(html=True))
    changed = Counter()
    rows = [cleaner.clean_fields({"text": text, "id": 7}, changed) for text in NASTY]
    assert [row["text"] for row in rows] == [
        "Hi there", "x", "full width fi", "abcd\ne", "many spaces\n\nlines",
        "mail [EMAIL] or [PHONE]", "card [CARD_NUMBER] vs 4111-1111-1111-1112", "2000-2015 and 2021-05-12 and 10.0.0.1",
    ]
    assert all(row["id"] == 7 for row in rows)
    # NFKC also turns the no-break space that &nbsp; decodes to into a plain space
    assert changed == {"html": 2, "unicode": 2, "control": 1, "whitespace": 2, "pii_email": 1, "pii_phone": 1, "pii_card": 1}


def test_luhn_check_matches_known_numbers():
    assert luhn_valid("4111111111111111") and luhn_valid("5555555555554444") and luhn_valid("378282246310005")
    assert not luhn_valid("4111111111111112") and not luhn_valid("1234567812345678")


def test_clean_file_drops_by_bounds_and_required_fields_and_leaves_the_input(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [
        {"instruction": "short", "output": "ok"}, {"instruction": "a fine question here", "output": "a fine answer"},
        {"instruction": "   ", "output": "no question"}, {"instruction": "x" * 300, "output": "long"},
    ])
    before = source.read_bytes()
    # lengths count the record text as "role: content" lines: 25 chars for the first record, 51 for the second
    section = CleanSection(required=("instruction",), min_length=30, max_length=200)
    report = clean_file(source, tmp_path / "out.jsonl", section)
    assert [row["instruction"] for row in read_jsonl(tmp_path / "out.jsonl")] == ["a fine question here"]
    assert report.dropped == {"missing_instruction": 1, "shorter_than_30_chars": 1, "longer_than_200_chars": 1}
    assert source.read_bytes() == before
    with pytest.raises(TunesmithError, match="already exists"):
        clean_file(source, tmp_path / "out.jsonl", section)
    with pytest.raises(TunesmithError, match="is also an input"):
        clean_file(tmp_path / "out.jsonl", tmp_path / "out.jsonl", section, force=True)


def test_force_replaces_only_what_tunesmith_wrote_and_nobody_changed(tmp_path):
    """``force`` replaces an output the data tools wrote (recorded with its SHA-256 beside it), never another file."""
    from tunesmith.data.prepare.records import WRITTEN_MANIFEST

    source = write_jsonl(tmp_path / "in.jsonl", [{"instruction": "a fine question here", "output": "a fine answer"}])
    section = CleanSection(required=("instruction",))
    clean_file(source, tmp_path / "out.jsonl", section)
    assert set(json.loads((tmp_path / WRITTEN_MANIFEST).read_text())["written"]) == {"out.jsonl"}
    clean_file(source, tmp_path / "out.jsonl", section, force=True)  # its own file: replaced
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 1
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"instruction": "my own", "output": "data"}\n')
    with pytest.raises(TunesmithError, match="mine.jsonl exists and was not written by tunesmith"):
        clean_file(source, mine, section, force=True)
    assert mine.read_text() == '{"instruction": "my own", "output": "data"}\n'
    with (tmp_path / "out.jsonl").open("a") as edited:  # the user edited tunesmith's output: now theirs
        edited.write('{"instruction": "added by hand", "output": "x"}\n')
    with pytest.raises(TunesmithError, match="or was changed since"):
        clean_file(source, tmp_path / "out.jsonl", section, force=True)
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 2


def test_token_bounds_need_a_tokenizer_and_use_it(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": "one two three"}, {"text": "one two three four five six"}])
    section = CleanSection(max_length=4, length_unit="tokens")
    with pytest.raises(TunesmithError, match="need a tokenizer"):
        clean_file(source, tmp_path / "out.jsonl", section)
    report = clean_file(source, tmp_path / "out.jsonl", section, count_tokens=lambda text: len(text.split()))
    assert report.written == 1 and report.dropped == {"longer_than_4_tokens": 1}


# --- bad records -----------------------------------------------------------------------------


def test_bad_record_fails_naming_file_and_line_or_is_skipped_and_counted(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": "fine"}, "{not json", "[1, 2]", {"other": "no text"}, {"text": "also fine"}])
    with pytest.raises(TunesmithError, match=r"in\.jsonl, line 2: invalid JSON"):
        clean_file(source, tmp_path / "out.jsonl", CleanSection())
    assert not (tmp_path / "out.jsonl").exists()  # nothing half-written under the final name
    assert not list(tmp_path.glob(".out.jsonl.*"))
    report = clean_file(source, tmp_path / "out.jsonl", CleanSection(), on_error="skip")
    assert report.written == 2 and report.bad.count == 3
    assert [m.split(": ")[0] for m in report.bad.examples] == [f"{source}, line 2", f"{source}, line 3", f"{source}, line 4"]
    result = run_cli("data", "dedup", str(source), "-o", str(tmp_path / "d.jsonl"))
    assert result.returncode == 2 and f"{source}, line 2: invalid JSON" in result.stderr


# --- de-duplication --------------------------------------------------------------------------


def test_planted_exact_and_near_duplicates_are_found(tmp_path):
    rows, planted = planted_duplicates()
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    report = dedup_file(source, tmp_path / "out.jsonl", DedupSection(threshold=0.8), record_text=None)
    kept = {row["instruction"] for row in read_jsonl(tmp_path / "out.jsonl")}
    dropped = {i for i, row in enumerate(rows) if row["instruction"] not in kept}
    true_positives = len(dropped & set(planted))
    assert true_positives / len(dropped) >= 0.97  # precision
    assert true_positives / len(planted) >= 0.9  # recall
    exact = {i for i, kind in planted.items() if kind == "exact"}
    assert exact <= dropped  # exact copies are always caught
    assert report.dropped["exact"] == len(exact)
    assert all(rows[i]["instruction"] in kept for i in range(400))  # the first of each cluster is kept
    cluster = report.as_dict()["clusters"][0]
    assert cluster["kept"].startswith(f"{source}, line ") and cluster["dropped"][0]["text"]


def test_exact_only_dedup_misses_near_copies(tmp_path):
    rows, planted = planted_duplicates(originals=100, exact=10, near=10)
    report = dedup_file(write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl", DedupSection(near=False))
    assert report.dropped == {"exact": 10}


def test_decontamination_removes_planted_evaluation_rows(tmp_path):
    rows, _ = planted_duplicates(originals=300, exact=0, near=0, seed=5)
    evaluation = [{"question": rows[i]["instruction"], "answer": "x"} for i in (3, 50, 120)]
    evaluation.append({"question": rows[200]["instruction"].replace(" ", "  ").title(), "answer": "x"})
    evaluation.append({"question": "something that is not in the training data at all", "answer": "y"})
    # the evaluation file is in the text layout of its own, read through text_field
    eval_path = write_jsonl(tmp_path / "eval.jsonl", [{"text": row["question"]} for row in evaluation])
    train_path = write_jsonl(tmp_path / "train.jsonl", [{"text": row["instruction"]} for row in rows])
    report = dedup_file(train_path, tmp_path / "out.jsonl", DedupSection(near=False, against=(str(eval_path),)))
    kept = [row["text"] for row in read_jsonl(tmp_path / "out.jsonl")]
    assert report.dropped == {"contaminated": 4} and report.evaluation_rows == 5
    assert len(kept) == 296 and not {rows[i]["instruction"] for i in (3, 50, 120, 200)} & set(kept)


# --- split and convert -----------------------------------------------------------------------


def test_split_is_seeded_exact_and_stratified(tmp_path):
    rows = [{"text": f"row {i}", "label": "a" if i % 4 else "b"} for i in range(200)]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    fractions = {"train": 0.8, "validation": 0.1, "test": 0.1}
    report = split_file(source, tmp_path / "one", fractions, seed=1, stratify="label")
    assert report.counts == {"train": 160, "validation": 20, "test": 20}
    assert report.strata['"b"'] == {"train": 40, "validation": 5, "test": 5}
    split_file(source, tmp_path / "two", fractions, seed=1, stratify="label")
    split_file(source, tmp_path / "three", fractions, seed=2, stratify="label")
    parts = {name: [read_jsonl(tmp_path / folder / f"{name}.jsonl") for folder in ("one", "two", "three")] for name in fractions}
    assert parts["test"][0] == parts["test"][1] != parts["test"][2]
    all_texts = sorted(row["text"] for name in fractions for row in parts[name][0])
    assert all_texts == sorted(row["text"] for row in rows)


def test_convert_round_trips_between_layouts(tmp_path, tiny_data):
    convert_file(tiny_data, tmp_path / "messages.jsonl", "messages")
    convert_file(tmp_path / "messages.jsonl", tmp_path / "sharegpt.jsonl", "sharegpt")
    convert_file(tmp_path / "sharegpt.jsonl", tmp_path / "alpaca.jsonl", "alpaca")
    original = json.loads(Path(tiny_data).read_text())
    back = read_jsonl(tmp_path / "alpaca.jsonl")
    assert len(back) == len(original) == 323 and any(row["input"] for row in original)
    for before, after in zip(original, back):
        prompt = f"{before['instruction']}\n\n{before['input']}" if before["input"] else before["instruction"]
        assert (after["instruction"], after["output"]) == (prompt, before["output"])


# LLaMA-Factory's preference layout (as in its dpo_en_demo.json): ShareGPT turns, chosen and rejected replies.
PREFERENCE_PAIRS = [
    {"conversations": [{"from": "human", "value": f"Name an animal that starts with {letter}."}],
     "chosen": {"from": "gpt", "value": f"{animal.capitalize()} starts with {letter}."},
     "rejected": {"from": "gpt", "value": "I do not know any animals."}}
    for letter, animal in (("C", "cat"), ("D", "dog"), ("F", "fox"))
]


def test_convert_preference_pairs(tmp_path):
    source = tmp_path / "dpo.json"
    source.write_text(json.dumps(PREFERENCE_PAIRS))
    report = convert_file(source, tmp_path / "pref.jsonl", "preference")
    first_in, first_out = json.loads(source.read_text())[0], read_jsonl(tmp_path / "pref.jsonl")[0]
    assert report.source_format == "preference" and report.written == 3
    assert first_out["chosen"] == first_in["chosen"]["value"] and first_out["rejected"] == first_in["rejected"]["value"]
    assert first_out["messages"] == [{"role": "user", "content": first_in["conversations"][0]["value"]}]
    report = convert_file(tmp_path / "pref.jsonl", tmp_path / "m.jsonl", "messages")  # detected as preference
    assert report.source_format == "preference"
    assert read_jsonl(tmp_path / "m.jsonl")[0]["messages"][-1] == {"role": "assistant", "content": first_out["chosen"]}
    with pytest.raises(TunesmithError, match="no rejected reply"):
        convert_file(tmp_path / "m.jsonl", tmp_path / "p2.jsonl", "preference")


# --- manifests and the train hook ------------------------------------------------------------


def test_manifest_changes_with_any_input_or_step(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a b c"}, {"text": "A  b c"}, {"text": "d e f"}])
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [{"text": "d e f"}])
    base = PrepareSection(clean=CleanSection(), dedup=DedupSection(against=(str(evaluation),)))
    cache = tmp_path / "cache"
    first = prepare_training_files((str(train),), base, cache)
    assert not first.reused and first.manifest["counts"]["dedup"]["dropped"] == {"exact": 1, "contaminated": 1}
    assert read_jsonl(Path(first.files[0])) == [{"text": "a b c"}]
    again = prepare_training_files((str(train),), base, cache)
    assert again.reused and again.manifest == first.manifest
    keys = {first.manifest["key"]}
    variants = [
        (base.model_copy(update={"clean": CleanSection(pii=())}), None),
        (base.model_copy(update={"dedup": DedupSection(threshold=0.9, against=(str(evaluation),))}), None),
        (base.model_copy(update={"on_error": "skip"}), None),
    ]
    for section, _ in variants:
        keys.add(prepare_training_files((str(train),), section, cache).manifest["key"])
    evaluation.write_text(json.dumps({"text": "g h i"}) + "\n")
    changed_eval = prepare_training_files((str(train),), base, cache)
    keys.add(changed_eval.manifest["key"])
    train.write_text(train.read_text() + json.dumps({"text": "new"}) + "\n")
    changed_train = prepare_training_files((str(train),), base, cache)
    keys.add(changed_train.manifest["key"])
    assert len(keys) == 6 and not changed_train.reused
    assert changed_train.manifest["counts"]["dedup"]["dropped"] == {"exact": 1}
    assert changed_train.manifest["sources"][0]["sha256"] != first.manifest["sources"][0]["sha256"]


def test_train_recipe_prepare_section_feeds_prepare_data(tmp_path, tiny_llama):
    from tunesmith.config import DataSection, ModelSection
    from tunesmith.data import encode_data
    from tunesmith.models import load_tokenizer

    rows = [{"instruction": f"question {i} <b>bold</b>", "output": f"answer {i}"} for i in range(6)]
    rows += [rows[0], rows[1]]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    tokenizer = load_tokenizer(tiny_llama, ModelSection(name=tiny_llama))
    plain = encode_data(DataSection(train=(str(train),), max_length=64), tokenizer, seed=0)
    section = DataSection(train=(str(train),), max_length=64, prepare={
        "clean": {"html": True}, "dedup": {"near": False}, "cache_dir": str(tmp_path / "cache")})
    prepared = encode_data(section, tokenizer, seed=0)
    assert len(plain.train) == 8 and len(prepared.train) == 6
    manifest = json.loads(next((tmp_path / "cache").glob("*/manifest.json")).read_text())
    assert manifest["template"] == prepared.template and manifest["tokenizer"]["vocab_size"] == len(tokenizer)
    assert manifest["counts"]["clean"]["changed_by_step"] == {"html": 8}
    assert tokenizer.decode(prepared.train[0].input_ids).count("bold") == 1
    assert "<b>" not in tokenizer.decode(prepared.train[0].input_ids)


# --- command line ----------------------------------------------------------------------------


def test_cli_clean_dedup_convert_split(tmp_path):
    rows, planted = planted_duplicates(originals=60, exact=5, near=0)
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    clean = run_cli("data", "clean", str(source), "-o", str(tmp_path / "c.jsonl"), "--pii", "", "--report", str(tmp_path / "r.json"))
    assert clean.returncode == 0, clean.stderr
    assert json.loads((tmp_path / "r.json").read_text())["written"] == 65
    dedup = run_cli("data", "dedup", str(tmp_path / "c.jsonl"), "-o", str(tmp_path / "d.jsonl"), "--no-near")
    assert dedup.returncode == 0 and "exact 5" in dedup.stdout
    again = run_cli("data", "dedup", str(tmp_path / "c.jsonl"), "-o", str(tmp_path / "d.jsonl"), "--no-near")
    assert again.returncode == 2 and "--force" in again.stderr
    bad = run_cli("data", "dedup", str(tmp_path / "c.jsonl"), "-o", str(tmp_path / "e.jsonl"), "--threshold", "2")
    assert bad.returncode == 2 and "--threshold" in bad.stderr
    split = run_cli("data", "split", str(tmp_path / "d.jsonl"), "--out-dir", str(tmp_path / "parts"), "--fractions", "train=0.9,test=0.1")
    assert split.returncode == 0 and "train 54, test 6" in split.stdout

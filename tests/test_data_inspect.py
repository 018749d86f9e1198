"""``data inspect``: counts, lengths in the model's tokens, duplicates, language and the verdict;
and bounded memory on a large file."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tunesmith.data.prepare.inspect import inspect_file, token_measure
from tunesmith.data.prepare.sufficiency import sufficiency_verdict

from conftest import REPO, run_cli


def test_verdict_follows_the_rules_of_thumb():
    assert sufficiency_verdict(312, 41_000, 135_000_000) == (
        "312 examples (41K tokens) for a 135M-parameter model: enough for LoRA r≤16 (or partial) with care "
        "(want ≥ 500 examples; use few epochs); too few for LoRA r>16 (want ≥ 500 examples), expect over-fitting; "
        "too few for full fine-tuning (want ≥ 1.35M tokens), expect over-fitting.")
    assert "enough for full fine-tuning;" not in sufficiency_verdict(10, 100, None)
    assert "unknown without the model size" in sufficiency_verdict(10, 100, None)


def shingles(text: str, size: int = 5) -> set[str]:
    text = " ".join(text.lower().split())
    return {text[i : i + size] for i in range(len(text) - size + 1)}


def dissimilar_rows(rows: list[dict], count: int, most_similar: float = 0.5) -> list[dict]:
    """The first ``count`` rows whose exact 5-character-shingle Jaccard with every earlier pick is below
    ``most_similar``: far enough under inspect's 0.8 that MinHash's estimate cannot call them near."""
    picked: list[tuple[dict, set[str]]] = []
    for row in rows:
        own = shingles(" ".join(row.values()))
        if all(len(own & other) / len(own | other) < most_similar for _, other in picked):
            picked.append((row, own))
    assert len(picked) >= count
    return [row for row, _ in picked[:count]]


def test_inspect_counts_lengths_duplicates_and_language(tmp_path, tiny_llama, tiny_data):
    from tunesmith.config import ModelSection
    from tunesmith.data.encode import encode_example
    from tunesmith.data.formats import FORMATS, FormatOptions
    from tunesmith.data.readers import RawRecord
    from tunesmith.data.templates import resolve_template
    from tunesmith.models import load_tokenizer

    rows = dissimilar_rows(json.loads(open(tiny_data).read()), 20)
    rows += [rows[0], {"instruction": "", "input": "", "output": ""}, {"instruction": "Der Hund läuft schnell über die Straße.", "input": "", "output": "Ja, das stimmt, der Hund ist schnell."}]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + "{broken\n" + json.dumps({"text": "x"}) + "\n")
    tokenizer = load_tokenizer(tiny_llama, ModelSection(name=tiny_llama))
    resolve_template(tokenizer, "auto")
    report = inspect_file(path, measure=token_measure(tokenizer), unit="tokens", max_length=60, parameters=292_800)
    expected = [len(encode_example(FORMATS.get("alpaca").convert(RawRecord("f", "l", row), FormatOptions()),
                                   tokenizer, 10**6, "all").input_ids) for row in rows[:21] + rows[22:]]
    assert report.records == 24 and report.bad.count == 2 and report.empty == 1  # broken JSON; no alpaca fields
    assert list(report.lengths) == expected
    assert 0 < report.truncated == sum(length > 60 for length in expected) < len(expected)
    assert report.exact_duplicates == 1 and report.near_duplicates == 1  # the planted copy of row 1
    assert report.languages["en"] == 21 and report.languages["de"] == 1
    assert report.verdict().startswith("21 examples")


def test_inspect_cli_prints_histogram_and_writes_png(tmp_path, tiny_data):
    rows = json.loads(open(tiny_data).read())
    # Independently of inspect: a record is an exact duplicate when its fields were seen before
    # (this data has no copies that differ only in case or spacing).
    seen: set[tuple] = set()
    duplicates = 0
    for row in rows:
        key = (row["instruction"], row["input"], row["output"])
        duplicates += key in seen
        seen.add(key)
    assert duplicates > 3  # the three planted copies and the generator's own repeats
    plot = tmp_path / "lengths.png"
    result = run_cli("data", "inspect", tiny_data, "--plot", str(plot), "--max-length", "200",
                     "--report", str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stderr
    assert "length in words" in result.stdout and f"{len(rows)} records (alpaca)" in result.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["exact_duplicates"] == duplicates and report["languages"]["en"] == len(rows)
    assert report["verdict"].startswith(f"{len(rows) - duplicates} examples")


@pytest.mark.slow
def test_large_file_is_cleaned_and_deduplicated_in_bounded_memory(tmp_path):
    """A ~200 MB JSONL: peak memory of the process stays far below the file size."""
    path = tmp_path / "large.jsonl"
    filler = "lorem ipsum dolor sit amet " * 60
    with open(path, "w") as handle:
        for i in range(120_000):
            handle.write(json.dumps({"instruction": f"question {i % 100_000} {filler}", "output": f"answer {i % 100_000}"}) + "\n")
    size = path.stat().st_size
    assert size > 190e6
    script = (
        "from tunesmith.config.prepare import CleanSection, DedupSection\n"
        "from tunesmith.data.prepare.clean import clean_file\n"
        "from tunesmith.data.prepare.dedup import dedup_file\n"
        f"c = clean_file({str(path)!r}, {str(tmp_path / 'clean.jsonl')!r}, CleanSection())\n"
        f"d = dedup_file({str(tmp_path / 'clean.jsonl')!r}, {str(tmp_path / 'dedup.jsonl')!r}, DedupSection(near=False))\n"
        # VmHWM is this process's own peak: ru_maxrss would include the pytest parent's memory,
        # which Linux carries across fork + exec.
        "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
        "print(c.written, d.written, int(hwm.split()[1]))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}, timeout=900)
    assert result.returncode == 0, result.stderr
    written, unique, peak_kib = map(int, result.stdout.split())
    assert written == 120_000 and unique == 100_000
    print(f"file {size / 1e6:.0f} MB, peak RSS {peak_kib / 1024:.0f} MB")
    assert peak_kib * 1024 < size / 2  # about 50 MB of it is the interpreter and its libraries

"""``data.columns``: any table (CSV, TSV, JSON Lines, Parquet, a spreadsheet's CSV export) whose column names match
no format, read by naming which column is the prompt, the answer or label and the system prompt."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from tunesmith.config import ColumnsSection, DataSection
from tunesmith.core.errors import TunesmithError
from tunesmith.data.encoded import load_examples
from tunesmith.data.formats import FormatOptions, detect_format
from tunesmith.data.prepare.inspect import inspect_file
from tunesmith.data.readers import read_records

ROWS = [{"headline": "Late goal wins the cup final", "topic": "sport", "note": "n1"},
        {"headline": "Parliament passes the budget", "topic": "politics", "note": "n2"},
        {"headline": "Telescope finds a new planet", "topic": "science", "note": "n3"}]
COLUMNS = ColumnsSection(prompt="headline", label="topic")


def write_table(folder: Path, suffix: str, rows=ROWS) -> Path:
    path = folder / f"news{suffix}"
    if suffix in (".csv", ".tsv"):
        with path.open("w", newline="", encoding="utf-8-sig" if suffix == ".csv" else "utf-8") as handle:  # Excel: BOM
            writer = csv.DictWriter(handle, list(rows[0]), delimiter="\t" if suffix == ".tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_every_table_kind_reads_through_the_columns(tmp_path, suffix):
    path = write_table(tmp_path, suffix)
    examples, used = load_examples(str(path), "auto", FormatOptions(columns=COLUMNS))
    assert used == "columns"
    assert [list(e.messages) for e in examples][0] == [
        {"role": "user", "content": "Late goal wins the cup final"}, {"role": "assistant", "content": "sport"}]
    assert len(examples) == 3


def test_answer_and_system_columns(tmp_path):
    rows = [{"q": "Two and two?", "a": "Four", "persona": "Be brief."}, {"q": "Capital of France?", "a": "Paris", "persona": ""}]
    path = write_table(tmp_path, ".csv", rows)
    columns = ColumnsSection(prompt="q", answer="a", system="persona")
    examples, _ = load_examples(str(path), "auto", FormatOptions(columns=columns, system_prompt="Default."))
    assert [m["content"] for m in examples[0].messages] == ["Be brief.", "Two and two?", "Four"]
    assert [m["content"] for m in examples[1].messages] == ["Default.", "Capital of France?", "Paris"]


def test_a_table_without_a_mapping_says_how_to_name_the_columns(tmp_path):
    record = next(read_records(write_table(tmp_path, ".csv")))
    with pytest.raises(TunesmithError, match=r"data.columns \(e.g. \{prompt: headline"):
        detect_format(record)
    with pytest.raises(TunesmithError, match="no column 'title' .*pick one of those"):
        detect_format(record, columns=ColumnsSection(prompt="title", label="topic"))


def test_an_empty_cell_is_named(tmp_path):
    path = write_table(tmp_path, ".csv", [*ROWS, {"headline": "No topic here", "topic": "", "note": ""}])
    with pytest.raises(TunesmithError, match=r"line 5: no label in column 'topic' \(data.columns.label"):
        load_examples(str(path), "auto", FormatOptions(columns=COLUMNS))


def test_the_recipe_field_is_checked():
    with pytest.raises(ValidationError, match="columns.answer or columns.label"):
        DataSection(train=("a.csv",), columns={"prompt": "headline"})
    with pytest.raises(ValidationError, match="set data.format to auto"):
        DataSection(train=("a.csv",), format="alpaca", columns={"prompt": "headline", "label": "topic"})
    with pytest.raises(ValidationError, match="labl"):
        DataSection(train=("a.csv",), columns={"prompt": "headline", "labl": "topic"})


def test_inspect_counts_what_the_mapping_yields(tmp_path):
    path = write_table(tmp_path, ".csv")
    without = inspect_file(path, near_sample=0, language_sample=0)
    assert (without.records, len(without.lengths), without.bad.count) == (3, 0, 3)
    assert "data.columns" in without.bad.examples[0]
    mapped = inspect_file(path, options=FormatOptions(columns=COLUMNS), near_sample=0, language_sample=0)
    assert (mapped.records, len(mapped.lengths), mapped.bad.count, mapped.data_format) == (3, 3, 0, "columns")
    assert list(mapped.lengths) == [7, 5, 6]  # prompt words + the label


def test_cli_inspect_reads_the_same_mapping(tmp_path, cli):
    path = write_table(tmp_path, ".tsv")
    result = cli("data", "inspect", str(path), "--columns", "prompt=headline,label=topic")
    assert result.returncode == 0, result.stderr
    assert "3 records (columns)" in result.stdout
    bad = cli("data", "inspect", str(path), "--columns", "prompt=headline")
    assert bad.returncode == 2 and "columns.answer or columns.label" in bad.stderr and "Traceback" not in bad.stderr


def test_cls_reads_text_and_label_from_the_columns(tmp_path, tiny_llama):
    from tunesmith.config import ClsStage, ModelSection
    from tunesmith.models import load_tokenizer
    from tunesmith.stages.cls import SequenceClassification

    path = write_table(tmp_path, ".csv")
    stage = SequenceClassification(ClsStage())  # text_field 'sentence', label_field 'label': data.columns wins
    tokenizer = load_tokenizer(tiny_llama, ModelSection(name=tiny_llama))
    data = stage.encode_data(DataSection(train=(str(path),), columns=COLUMNS), tokenizer, 0, tmp_path)
    assert stage.labels == ("politics", "science", "sport") and [e.label for e in data.train] == [2, 0, 1]
    with pytest.raises(TunesmithError, match="data.columns.system: stage cls reads only"):
        stage.encode_data(DataSection(train=(str(path),), columns={**COLUMNS.model_dump(), "system": "note"}),
                           tokenizer, 0, tmp_path)

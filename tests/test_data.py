"""Data: every file type and format, assistant-only loss masks, truncation, clear errors."""

import gzip
import json

import pytest

from tunesmith.config import DataSection
from tunesmith.core.errors import TunesmithError
from tunesmith.data import IGNORE_INDEX, encode_data, load_examples
from tunesmith.data.encode import encode_example
from tunesmith.data.formats import FormatOptions

ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hi.", "output": "Hi!", "system": "Be brief.", "history": [["Who are you?", "A bot."]]},
]


@pytest.fixture
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    from tunesmith.data import resolve_template

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    resolve_template(tok, "simple")
    return tok


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_alpaca_with_input_system_and_history(tmp_path):
    examples, detected = load_examples(write(tmp_path / "a.jsonl", ALPACA))
    assert detected == "alpaca"
    assert examples[0].messages == (
        {"role": "user", "content": "Add the numbers.\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    )
    assert [m["role"] for m in examples[1].messages] == ["system", "user", "assistant", "user", "assistant"]


def test_sharegpt_messages_and_text_formats(tmp_path):
    sharegpt = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}], "system": "s"}
    messages = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    (ex,), fmt = load_examples(write(tmp_path / "s.jsonl", [sharegpt]))
    assert fmt == "sharegpt" and ex.messages[0] == {"role": "system", "content": "s"}
    (ex,), fmt = load_examples(write(tmp_path / "m.jsonl", [messages]), options=FormatOptions(system_prompt="sys"))
    assert fmt == "messages" and ex.messages[0]["content"] == "sys" and len(ex.messages) == 3
    (tmp_path / "t.txt").write_text("first line\n\nsecond line\n")
    examples, fmt = load_examples(str(tmp_path / "t.txt"))
    assert fmt == "text" and [e.text for e in examples] == ["first line", "second line"]


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet", ".jsonl.gz", ".csv.gz"])
def test_every_file_type_reads_the_same_records(tmp_path, suffix):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"instruction": "q1", "input": "", "output": "a1"}, {"instruction": "q2", "input": "x", "output": "a2"}]
    path = tmp_path / f"data{suffix}"
    base = suffix.removesuffix(".gz")
    if base == ".json":
        text = json.dumps(rows)
    elif base == ".jsonl":
        text = "".join(json.dumps(r) + "\n" for r in rows)
    elif base == ".csv":
        text = "instruction,input,output\nq1,,a1\nq2,x,a2\n"
    if base == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif suffix.endswith(".gz"):
        with gzip.open(path, "wt") as handle:
            handle.write(text)
    else:
        path.write_text(text)
    examples, _ = load_examples(str(path))
    assert [e.messages[-1]["content"] for e in examples] == ["a1", "a2"]
    assert examples[1].messages[0]["content"] == "q2\n\nx"


def test_loss_only_on_assistant_tokens(tokenizer):
    examples = [e for e in _examples(ALPACA)]
    encoded = encode_example(examples[1], tokenizer, max_length=512)
    trained = tokenizer.decode([t for t, l in zip(encoded.input_ids, encoded.labels) if l != IGNORE_INDEX])
    # Both assistant turns (history and final) and their end-of-turn EOS train; prompts do not.
    assert "".join(trained.split()) == "Abot.</s>Hi!</s>"
    everything = encode_example(examples[1], tokenizer, max_length=512, train_on="all")
    assert all(label != IGNORE_INDEX for label in everything.labels)
    assert everything.input_ids == encoded.input_ids


def test_truncation_and_dropping_are_counted(tmp_path, tokenizer):
    long_prompt = {"instruction": "word " * 200, "output": "x"}
    long_answer = {"instruction": "q", "output": "word " * 200}
    path = write(tmp_path / "d.jsonl", [long_prompt, long_answer, ALPACA[0]])
    data = encode_data(DataSection(train=(path,), max_length=48, template="simple"), tokenizer, seed=0)
    stats = data.stats["train"]
    assert (stats.records, stats.dropped, stats.truncated) == (3, 1, 1)
    assert max(len(e.input_ids) for e in data.train) == 48


def test_validation_split_by_fraction_is_seeded(tmp_path, tokenizer):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20)]
    section = DataSection(train=(write(tmp_path / "d.jsonl", rows),), validation_fraction=0.25, template="simple")
    first = encode_data(section, tokenizer, seed=1)
    again = encode_data(section, tokenizer, seed=1)
    assert len(first.validation) == 5 and len(first.train) == 15
    assert [e.input_ids for e in first.validation] == [e.input_ids for e in again.validation]


def _examples(rows):
    from tunesmith.data.formats import FORMATS
    from tunesmith.data.readers import RawRecord

    return [FORMATS.get("alpaca").convert(RawRecord("mem", f"line {i}", r), FormatOptions()) for i, r in enumerate(rows, 1)]


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    with pytest.raises(TunesmithError, match=r"bad.jsonl, line 2: invalid JSON"):
        load_examples(str(path))


def test_missing_field_names_field_and_format(tmp_path):
    path = write(tmp_path / "d.jsonl", [ALPACA[0], {"instruction": "no answer"}])
    with pytest.raises(TunesmithError, match=r"d.jsonl, line 2: missing field 'output' expected by the alpaca format"):
        load_examples(path, "alpaca")


def test_empty_and_undetectable_data(tmp_path, tokenizer):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TunesmithError, match="holds no records"):
        load_examples(str(tmp_path / "empty.jsonl"))
    with pytest.raises(TunesmithError, match="cannot tell the data format"):
        load_examples(write(tmp_path / "odd.jsonl", [{"question": "q"}]))
    with pytest.raises(TunesmithError, match="unsupported file type"):
        load_examples(str(tmp_path / "data.xml"), "alpaca") if (tmp_path / "data.xml").write_text("x") else None


def test_max_length_shorter_than_every_prompt(tmp_path, tokenizer):
    path = write(tmp_path / "d.jsonl", [{"instruction": "word " * 50, "output": "x"}])
    with pytest.raises(TunesmithError, match="raise data.max_length"):
        encode_data(DataSection(train=(path,), max_length=16, template="simple"), tokenizer, seed=0)

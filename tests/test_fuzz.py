"""Property-based fuzzing of what reads user files: no exception other than TunesmithError escapes.

The data readers (JSON, JSON Lines, CSV, Parquet, text, gzipped or not) get random bytes and random
JSON-like structures, and every record they yield goes through format detection and conversion; the
recipe loader gets random bytes, random YAML structures built from the recipe's own keys, and random
overrides. Examples are bounded so the file runs in well under 30 seconds.
"""

from __future__ import annotations

import gzip
import io
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunesmith.core.errors import TunesmithError

FUZZ = settings(max_examples=50, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".jsonl.gz", ".csv.gz", ".txt.gz")
FIELD_NAMES = ("text", "instruction", "input", "output", "system", "history", "conversations", "messages",
               "from", "value", "role", "content", "chosen", "rejected", "prompt")

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)
records = st.dictionaries(st.sampled_from(FIELD_NAMES), json_values, max_size=6)


def write_file(folder: Path, suffix: str, content: bytes) -> Path:
    path = folder / f"data{suffix}"
    path.write_bytes(gzip.compress(content) if suffix.endswith(".gz") else content)
    return path


def read_everything(path: Path, skip_bad_lines: bool) -> int:
    """Read every record and convert it in its detected format, as training and ``data`` steps do.

    Returns:
        Records converted (errors raised as TunesmithError only).
    """
    from tunesmith.data.formats import FORMATS, FormatOptions, detect_format
    from tunesmith.data.readers import read_records

    skipped: list[TunesmithError] = []
    converted = 0
    for record in read_records(path, on_bad_line=skipped.append if skip_bad_lines else None):
        try:
            FORMATS.get(detect_format(record)).convert(record, FormatOptions(system_prompt="s"))
            converted += 1
        except TunesmithError:
            pass
    assert all(isinstance(error, TunesmithError) for error in skipped)
    return converted


def only_tunesmith_errors(action) -> None:
    try:
        action()
    except TunesmithError as error:
        assert str(error).strip(), "an error must say something"


@FUZZ
@given(suffix=st.sampled_from(SUFFIXES), content=st.binary(max_size=400), skip=st.booleans())
def test_readers_on_random_bytes(suffix, content, skip):
    with tempfile.TemporaryDirectory() as folder:
        path = write_file(Path(folder), suffix, content)
        only_tunesmith_errors(lambda: read_everything(path, skip))


@FUZZ
@given(rows=st.lists(records | json_values, max_size=6), suffix=st.sampled_from((".json", ".jsonl", ".jsonl.gz")),
       skip=st.booleans(), bom=st.booleans())
def test_json_readers_on_random_structures(rows, suffix, skip, bom):
    if suffix == ".json":
        content = json.dumps(rows, ensure_ascii=False)
    else:
        content = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    data = (b"\xef\xbb\xbf" if bom else b"") + content.encode("utf-8", "surrogatepass")
    with tempfile.TemporaryDirectory() as folder:
        path = write_file(Path(folder), suffix, data)
        only_tunesmith_errors(lambda: read_everything(path, skip))


cells = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=15)


@FUZZ
@given(header=st.lists(st.sampled_from(FIELD_NAMES) | cells, min_size=0, max_size=4),
       rows=st.lists(st.lists(cells, max_size=5), max_size=5), skip=st.booleans(), bom=st.booleans())
def test_csv_reader_on_random_tables(header, rows, skip, bom):
    import csv

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    data = (b"\xef\xbb\xbf" if bom else b"") + buffer.getvalue().encode("utf-8")
    with tempfile.TemporaryDirectory() as folder:
        path = write_file(Path(folder), ".csv", data)
        only_tunesmith_errors(lambda: read_everything(path, skip))


@FUZZ
@given(columns=st.dictionaries(st.sampled_from(FIELD_NAMES), st.sampled_from(("text", "int", "list", "struct", "null")),
                               min_size=1, max_size=4), size=st.integers(0, 4), truncate=st.integers(0, 3))
def test_parquet_reader_on_random_tables(columns, size, truncate):
    import pyarrow as pa
    import pyarrow.parquet as pq

    values = {"text": lambda i: f"t{i}", "int": lambda i: i, "list": lambda i: [f"x{i}", "y"],
              "struct": lambda i: {"from": "human", "value": f"v{i}"}, "null": lambda i: None}
    table = pa.table({name: [values[kind](i) for i in range(size)] for name, kind in columns.items()})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    data = buffer.getvalue()
    if truncate:  # a file cut off while copying
        data = data[: len(data) * truncate // 4]
    with tempfile.TemporaryDirectory() as folder:
        path = write_file(Path(folder), ".parquet", data)
        only_tunesmith_errors(lambda: read_everything(path, skip_bad_lines=False))


# --- the recipe loader -------------------------------------------------------------------------------

RECIPE_KEYS = ("model", "data", "method", "train", "eval", "output", "regularise", "retain", "name", "train",
               "format", "template", "max_length", "kind", "r", "alpha", "lr", "epochs", "max_steps", "batch_size",
               "dir", "sources", "prepare", "clean", "dedup", "weight", "device", "betas", "speed", "task", "report")
yaml_scalars = (st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats() | st.text(max_size=12)
                | st.sampled_from(("lora", "full", "x.jsonl", "auto", "cuda", ".inf", "nan", "1e-4")))
yaml_values = st.recursive(
    yaml_scalars,
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.sampled_from(RECIPE_KEYS) | st.text(max_size=6), children, max_size=5),
    max_leaves=25,
)


def load(folder: Path, content: bytes, overrides=()) -> None:
    from tunesmith.config import load_recipe

    path = folder / "recipe.yaml"
    path.write_bytes(content)
    load_recipe(path, overrides)


@FUZZ
@given(content=st.binary(max_size=300))
def test_recipe_loader_on_random_bytes(content):
    with tempfile.TemporaryDirectory() as folder:
        only_tunesmith_errors(lambda: load(Path(folder), content))


@FUZZ
@given(document=st.dictionaries(st.sampled_from(RECIPE_KEYS), yaml_values, max_size=6),
       overrides=st.lists(st.text(max_size=20) | st.builds(lambda k, v: f"{k}={v}",
                                                           st.sampled_from(("train.lr", "data.train", "method.kind",
                                                                            "model", "data.max_length", "a.b.c")),
                                                           st.text(max_size=10)), max_size=3))
def test_recipe_loader_on_random_structures(document, overrides):
    import yaml

    content = yaml.safe_dump(document, allow_unicode=True).encode("utf-8")
    with tempfile.TemporaryDirectory() as folder:
        only_tunesmith_errors(lambda: load(Path(folder), content, overrides))


@pytest.mark.parametrize("text", ["[" * 3000, "a: " + "[" * 3000, "{a: 1" * 2000], ids=["list", "mapping", "flow"])
def test_recipe_loader_on_deep_nesting(tmp_path, text):
    only_tunesmith_errors(lambda: load(tmp_path, text.encode()))


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_json_readers_on_deep_nesting(tmp_path, suffix):
    path = write_file(tmp_path, suffix, b"[" * 100_000 + b"]" * 100_000)
    only_tunesmith_errors(lambda: read_everything(path, skip_bad_lines=False))


@pytest.fixture(scope="module")
def stories_tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    from tunesmith.data.templates import resolve_template

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    resolve_template(tokenizer, "simple")
    return tokenizer


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(record=records, max_length=st.integers(8, 64), train_on=st.sampled_from(("assistant", "all")))
def test_encoding_random_records(stories_tokenizer, record, max_length, train_on):
    """What a record becomes in training: detected, converted, templated and tokenised."""
    from tunesmith.data.encode import encode_example
    from tunesmith.data.formats import FORMATS, FormatOptions, detect_format
    from tunesmith.data.readers import RawRecord

    def encode():
        raw = RawRecord("fuzz.jsonl", "line 1", record)
        example = FORMATS.get(detect_format(raw)).convert(raw, FormatOptions(system_prompt="Be brief."))
        encoded = encode_example(example, stories_tokenizer, max_length, train_on)
        assert encoded is None or len(encoded.input_ids) <= max_length

    only_tunesmith_errors(encode)

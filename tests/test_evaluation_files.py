"""Bad task, suite and data files give one clear error naming the file and the row."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunesmith.core.errors import TunesmithError
from tunesmith.evaluation.benchmarks import read_classification, read_jsonl_choices, read_mmlu
from tunesmith.evaluation.suite import load_suite

HEADER = "question,choice0,choice1,choice2,choice3,answer\n"


def mmlu_folder(tmp_path: Path, test_text: str) -> Path:
    (tmp_path / "mmlu" / "test").mkdir(parents=True)
    (tmp_path / "mmlu" / "test" / "algebra_test.csv").write_text(test_text)
    return tmp_path / "mmlu"


def test_mmlu_missing_column_names_file(tmp_path):
    folder = mmlu_folder(tmp_path, "question,choice0,choice1,choice2,answer\nq,a,b,c,1\n")
    with pytest.raises(TunesmithError, match=r"algebra_test\.csv: missing column\(s\) choice3"):
        read_mmlu(folder, "test")


def test_mmlu_answer_out_of_range_names_row(tmp_path):
    folder = mmlu_folder(tmp_path, HEADER + "q1,a,b,c,d,0\nq2,a,b,c,d,4\n")
    with pytest.raises(TunesmithError, match=r"algebra_test\.csv:3: answer index 4 is out of range for 4 choices"):
        read_mmlu(folder, "test")


def test_mmlu_letter_answers_and_subject_names(tmp_path):
    folder = mmlu_folder(tmp_path, HEADER + "q1,a,b,c,d,C\n")
    [item] = read_mmlu(folder, "test")
    assert item.answer == 2 and item.group == "algebra" and item.where.endswith("algebra_test.csv:2")


def test_empty_split_is_named(tmp_path):
    folder = mmlu_folder(tmp_path, HEADER)
    with pytest.raises(TunesmithError, match=r"algebra_test\.csv: no questions found \(empty file or split\)"):
        read_mmlu(folder, "test")
    (folder / "dev").mkdir()
    with pytest.raises(TunesmithError, match=r"mmlu/dev: no subject CSV files found"):
        read_mmlu(folder, "dev")
    with pytest.raises(TunesmithError, match=r"MMLU split folder .*mmlu/val does not exist"):
        read_mmlu(folder, "val")


def test_jsonl_choice_errors_name_line(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text('{"question": "q", "choices": ["a", "b"], "answer": 1}\n{"question": "q", "choices": ["a"], "answer": 0}\n')
    with pytest.raises(TunesmithError, match=r"items\.jsonl:2: 'choices' must be a list of at least two"):
        read_jsonl_choices(path, "question", "choices", "answer")
    path.write_text('{"question": "q", "choices": ["a", "b"]}\n')
    with pytest.raises(TunesmithError, match=r"items\.jsonl:1: missing field 'answer'"):
        read_jsonl_choices(path, "question", "choices", "answer")


def test_classification_unknown_label_names_row(tmp_path):
    path = tmp_path / "sst.tsv"
    path.write_text('sentence\tlabel\na "quoted" fine film\t1\nbad\t2\n')
    with pytest.raises(TunesmithError, match=r"sst\.tsv:3: label '2' is not in label_words"):
        read_classification(path, "sentence", "label", {"0": "negative", "1": "positive"}, "{text}")
    items = read_classification(path, "sentence", "label", {"0": "negative", "1": "positive"}, "{text}", limit=1)
    assert items[0].question == 'a "quoted" fine film' and items[0].choices == ("negative", "positive")


def test_task_file_errors_name_file_and_field(tmp_path):
    suite = tmp_path / "suite.yaml"
    (tmp_path / "t.yaml").write_text("name: x\nkind: mmlu\npath: m\nnormalisation: mean\n")
    suite.write_text("tasks: [t.yaml]\n")
    with pytest.raises(TunesmithError, match=r"t\.yaml: field 'normalisation'"):
        load_suite(suite)
    (tmp_path / "t.yaml").write_text("name: x\nkind: multiple_chioce\npath: m\n")
    with pytest.raises(TunesmithError, match=r"t\.yaml: task kind 'multiple_chioce' is not one of"):
        load_suite(suite)
    suite.write_text("tasks: [missing.yaml]\n")
    with pytest.raises(TunesmithError, match=r"task file .*missing\.yaml does not exist"):
        load_suite(suite)
    suite.write_text("tasks: [{name: a, kind: bias, path: '{data_root}/x.csv'}]\n")
    with pytest.raises(TunesmithError, match=r"uses \{data_root\}; give the suite a data_root or pass --data-root"):
        load_suite(suite)


def test_suite_paths_resolve_against_data_root_and_probes(tmp_path):
    suite = tmp_path / "suites" / "s.yaml"
    suite.parent.mkdir()
    suite.write_text("name: s\ndata_root: ../data\nlimit: 3\ntasks:\n"
                     "  - {name: a, kind: bias, path: '{probes}/counterfactual_pairs.csv'}\n"
                     "  - {name: b, kind: perplexity, path: '{data_root}/x.txt'}\n")
    loaded = load_suite(suite)
    assert loaded.tasks[0].path.endswith("probes/counterfactual_pairs.csv") and Path(loaded.tasks[0].path).is_file()
    assert Path(loaded.tasks[1].path) == (tmp_path / "data" / "x.txt").resolve()  # absolute: applied once
    assert all(t.limit == 3 for t in loaded.tasks)
    assert load_suite(suite, data_root="/elsewhere").tasks[1].path == "/elsewhere/x.txt"


def test_every_shipped_suite_loads():
    suites = sorted((Path(__file__).resolve().parents[1] / "suites").glob("*.yaml"))
    assert len(suites) == 4
    for path in suites:
        assert load_suite(path, data_root="/data").tasks


def test_every_shipped_task_file_loads():
    from tunesmith.evaluation.tasks import load_task_file

    files = sorted((Path(__file__).resolve().parents[1] / "suites" / "tasks").rglob("*.yaml"))
    assert len(files) == 10
    kinds = {load_task_file(path, Path("/data")).kind for path in files}
    assert {"generation", "judge", "mmlu", "perplexity"} <= kinds

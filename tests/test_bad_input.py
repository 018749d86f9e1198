"""The bad-input catalogue: every input a user can get wrong is answered by one sentence.

Each case builds its bad input in a fresh folder and runs the command a user would, in-process
(``tunesmith.cli.main``); it must exit with status 2, print no traceback, and name the file, line,
field or flag and the fix. The table in the closing note of issue 11 is this list.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from tunesmith.cli import main

from conftest import REPO, run_cli


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


GOOD_LINE = '{"instruction": "hi", "output": "there"}\n'


def recipe(tmp: Path, body: str = "", data: str = "") -> Path:
    """A recipe file on a model folder with a complete weights file, and good data unless ``data`` names other."""
    from safetensors.torch import save_file

    train = data or str(write(tmp / "good.jsonl", GOOD_LINE * 3))
    model = tmp / "weights-only-model"
    model.mkdir(exist_ok=True)
    save_file({"weight": torch.zeros(4)}, str(model / "model.safetensors"))
    return write(tmp / "recipe.yaml", f"model: {{name: {model}}}\ndata: {{train: {train}}}\n{body}")


def validated_recipe(tmp: Path) -> Path:
    """:func:`recipe` holding out half its data for validation (what a sweep's ``val_loss`` needs)."""
    return write(tmp / "recipe.yaml", recipe(tmp).read_text().replace("data: {", "data: {validation_fraction: 0.5, "))


def fake_model(tmp: Path, weights: bytes) -> Path:
    folder = tmp / "model"
    write(folder / "config.json", json.dumps({"model_type": "llama"}))
    write(folder / "model.safetensors", weights)
    return folder


def truncated_weights() -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    return len(header).to_bytes(8, "little") + header + b"\0" * 100


def bad_manifest(tmp: Path) -> Path:
    folder = tmp / "adapter"
    write(folder / "tunesmith.json", '{"method": "lora", "config": {"kind": "lora", ')
    write(folder / "adapter_model.safetensors", b"")
    return folder


@dataclass(frozen=True)
class Case:
    """A bad input: ``argv(tmp)`` is the command; ``expected`` are fragments of its message ({tmp} is the folder)."""

    name: str
    argv: Callable[[Path], list[str]]
    expected: tuple[str, ...]


def data_command(tmp: Path, name: str, content: str | bytes, *extra: str) -> list[str]:
    """``data convert FILE``: streams every record, stops at the first bad one (the default --on-error fail)."""
    path = write(tmp / name, content)
    return ["data", "convert", str(path), "-o", str(tmp / "out.jsonl"), "--to", "messages", *extra]


def force_over_a_file_of_ours(tmp: Path) -> list[str]:
    """``data convert ... --force`` whose output is a file the user wrote, not tunesmith."""
    write(tmp / "out.jsonl", "my notes\n")
    return data_command(tmp, "d.jsonl", GOOD_LINE, "--force")


CASES = [
    # --- data files -----------------------------------------------------------------------------------
    Case("malformed JSON line", lambda t: data_command(t, "d.jsonl", GOOD_LINE + '{"instruction": "x",\n'),
         ("d.jsonl, line 2", "invalid JSON", "fix or remove that line")),
    Case("JSON line not an object", lambda t: data_command(t, "d.jsonl", GOOD_LINE + "[1, 2]\n"),
         ("d.jsonl, line 2", "expected a JSON object")),
    Case("missing field", lambda t: data_command(t, "d.jsonl", GOOD_LINE + '{"instruction": "x"}\n', "--format", "alpaca"),
         ("d.jsonl, line 2", "missing field 'output'", "alpaca format")),
    Case("wrong type", lambda t: data_command(t, "d.jsonl", '{"instruction": "x", "output": 5}\n', "--format", "alpaca"),
         ("d.jsonl, line 1", "field 'output' must be text", "got int")),
    Case("unknown layout", lambda t: data_command(t, "d.jsonl", '{"question": "x", "answer": "y"}\n'),
         ("d.jsonl, line 1", "cannot tell the data format", "data.format")),
    Case("non-UTF-8 JSON line", lambda t: data_command(t, "d.jsonl", GOOD_LINE.encode() + b'{"instruction": "caf\xe9", "output": "x"}\n'),
         ("d.jsonl, line 2", "not UTF-8", "0xe9", "re-save the file as UTF-8")),
    Case("non-UTF-8 CSV", lambda t: data_command(t, "d.csv", b"instruction,output\nhi,there\ncaf\xe9,x\n"),
         ("d.csv, line 3", "not UTF-8", "UTF-8")),
    Case("non-UTF-8 text", lambda t: data_command(t, "d.txt", b"fine\n\xff\xfe broken\n", "--format", "text", "--to", "text"),
         ("d.txt, line 2", "not UTF-8")),
    Case("non-UTF-8 .json", lambda t: data_command(t, "d.json", b'[{"instruction": "\xe9", "output": "x"}]'),
         ("d.json, line 1", "not UTF-8")),
    Case("invalid .json", lambda t: data_command(t, "d.json", '[\n{"instruction": "x", "output": "y"},\n{oops}\n]'),
         ("d.json, line 3", "invalid JSON")),
    Case("CSV row short of columns", lambda t: data_command(t, "d.csv", "instruction,output\nhi,there\nlonely\n"),
         ("d.csv, line 3", "expected 2 columns")),
    Case("CSV cell over the field limit", lambda t: data_command(t, "d.csv", "text\n" + "a" * 200_000 + "\n", "--format", "text"),
         ("d.csv, line 2", "field limit", "convert the file to JSON Lines")),
    Case("JSON nested too deeply", lambda t: data_command(t, "d.jsonl", "[" * 100_000 + "]" * 100_000 + "\n"),
         ("d.jsonl, line 1", "unreadable JSON")),
    Case("text file named .parquet", lambda t: data_command(t, "d.parquet", GOOD_LINE),
         ("d.parquet", "not a readable Parquet file", ".jsonl")),
    Case("damaged .gz", lambda t: data_command(t, "d.jsonl.gz", b"\x1f\x8b\x08\x00garbage"),
         ("d.jsonl.gz", "cannot be read")),
    Case("unsupported suffix", lambda t: data_command(t, "d.xlsx", "x"), ("d.xlsx", "unsupported file type", ".jsonl")),
    Case("missing data file", lambda t: ["data", "inspect", str(t / "nope.jsonl")], ("nope.jsonl", "does not exist")),
    Case("inspect --on-error fail, malformed", lambda t: ["data", "inspect", str(write(t / "d.jsonl", GOOD_LINE + "{bad\n")),
                                                          "--on-error", "fail"],
         ("d.jsonl", "1 malformed record", "line 2")),
    Case("inspect --on-error fail, empty", lambda t: ["data", "inspect", str(write(t / "d.jsonl", "\n\n")), "--on-error", "fail"],
         ("d.jsonl holds no records",)),
    Case("empty data file in a recipe", lambda t: ["config", "check", str(recipe(t, data=str(write(t / "e.jsonl", ""))))],
         ("data.train", "e.jsonl holds no records")),
    Case("missing data file in a recipe", lambda t: ["config", "check", str(recipe(t, data=str(t / "gone.jsonl")))],
         ("data.train", "gone.jsonl does not exist")),
    Case("missing validation file", lambda t: ["config", "check", str(recipe(t)), f"data.validation={t / 'val.jsonl'}"],
         ("data.validation", "val.jsonl does not exist")),
    # --- recipes --------------------------------------------------------------------------------------
    Case("recipe YAML syntax error", lambda t: ["train", str(write(t / "r.yaml", "data: {train: x.jsonl}\ntrain: {lr: 1e-4\n"))],
         ("r.yaml, line 3", "not valid YAML")),
    Case("non-UTF-8 recipe", lambda t: ["train", str(write(t / "r.yaml", b"data: {train: x.jsonl}\n# caf\xe9\n"))],
         ("r.yaml, line 2", "not UTF-8", "re-save the recipe as UTF-8")),
    Case("recipe not a mapping", lambda t: ["train", str(write(t / "r.yaml", "- a\n- b\n"))], ("r.yaml", "mapping of sections")),
    Case("missing recipe", lambda t: ["train", str(t / "none.yaml")], ("none.yaml does not exist",)),
    Case("typo key", lambda t: ["train", str(recipe(t, "method: {kind: lora, lora_rnak: 8}\n"))],
         ("unknown key 'method.lora_rnak'", "Did you mean 'r'?")),
    Case("typo section key", lambda t: ["train", str(recipe(t, "train: {lerning_rate: 0.1}\n"))],
         ("unknown key 'train.lerning_rate'", "Did you mean 'lr'?")),
    Case("unknown method kind", lambda t: ["train", str(recipe(t, "method: {kind: loraa}\n"))],
         ("method.kind 'loraa'", "Did you mean 'lora'?")),
    Case("wrong type in recipe", lambda t: ["train", str(recipe(t, "train: {batch_size: many}\n"))], ("'train.batch_size'", "integer")),
    Case("inf learning rate", lambda t: ["train", str(recipe(t, "train: {lr: .inf}\n"))], ("'train.lr'", "finite number")),
    Case("nan in a float field", lambda t: ["train", str(recipe(t, "method: {kind: lora, dropout: .nan}\n"))],
         ("'method.dropout'", "finite number")),
    Case("inf through an override", lambda t: ["train", str(recipe(t)), "train.max_grad_norm=inf"],
         ("'train.max_grad_norm'", "finite number")),
    Case("override value not YAML", lambda t: ["train", str(recipe(t)), "train.lr=[1"], ("override 'train.lr=[1'", "quote it")),
    Case("override without =", lambda t: ["train", str(recipe(t)), "train.lr"], ("override 'train.lr'", "section.field=value")),
    Case("prepare with sources", lambda t: ["config", "check", str(recipe(t, "")),
                                            f"data.sources=[{{name: extra, train: {t / 'good.jsonl'}}}]", "data.prepare={clean: {}}"],
         ("data.prepare", "data.sources", "tunesmith data clean")),
    Case("unknown data format", lambda t: ["config", "check", str(recipe(t)), "data.format=alpacca"],
         ("data.format", "Did you mean 'alpaca'?")),
    Case("unknown chat template", lambda t: ["config", "check", str(recipe(t)), "data.template=chatlm"],
         ("data.template", "Did you mean 'chatml'?")),
    Case("unknown model alias", lambda t: ["config", "check", str(recipe(t)), "model.name=smollm2"],
         ("model.name", "unknown model alias 'smollm2'", "smollm2-135m-instruct")),
    Case("model folder missing (config check)", lambda t: ["config", "check", str(recipe(t)), f"model.name={t / 'no-model'}"],
         ("no-model does not exist", "not a hub id")),
    # --- models and results ---------------------------------------------------------------------------
    Case("model folder missing", lambda t: ["generate", "--model", str(t / "nowhere" / "model"), "--prompt", "hi"],
         ("model folder", "nowhere/model does not exist")),
    Case("truncated model.safetensors", lambda t: ["generate", "--model", str(fake_model(t, truncated_weights())), "--prompt", "hi"],
         ("model.safetensors is truncated", "header promises", "download the model again")),
    Case("empty model.safetensors", lambda t: ["generate", "--model", str(fake_model(t, b"")), "--prompt", "hi"],
         ("model.safetensors is not a complete safetensors file", "0 bytes")),
    Case("malformed adapter manifest", lambda t: ["export", "--adapter", str(bad_manifest(t)), "--out", str(t / "out"), "--merge"],
         ("tunesmith.json, line 1", "manifest is damaged")),
    Case("manifest without settings", lambda t: ["export", "--adapter", str(write(t / "a" / "tunesmith.json", "{}").parent),
                                                 "--out", str(t / "out")],
         ("tunesmith.json", "lacks the method's settings")),
    # --- suites ---------------------------------------------------------------------------------------
    Case("malformed suite YAML", lambda t: ["eval", "--model", "x", "--suite", str(write(t / "s.yaml", "name: s\ntasks: [a\n"))],
         ("s.yaml, line 3", "not valid YAML", "suite file")),
    Case("suite without tasks", lambda t: ["eval", "--model", "x", "--suite", str(write(t / "s.yaml", "name: s\n"))],
         ("s.yaml", "non-empty 'tasks' list")),
    Case("suite task file missing", lambda t: ["eval", "--model", "x", "--suite", str(write(t / "s.yaml", "tasks: [t.yaml]\n"))],
         ("t.yaml does not exist",)),
    Case("suite unknown key", lambda t: ["eval", "--model", "x", "--suite", str(write(t / "s.yaml", "tasks: [t.yaml]\nlimt: 3\n"))],
         ("s.yaml", "unknown key(s) limt")),
    Case("malformed sweep space YAML", lambda t: ["sweep", str(validated_recipe(t)), "--space",
                                                  str(write(t / "s.yaml", "train.lr: {low: 1\n"))],
         ("s.yaml, line 2", "not valid YAML", "search space file")),
    # --- flags ----------------------------------------------------------------------------------------
    Case("eval --batch-size 0", lambda t: ["eval", "--data", "x.jsonl", "--batch-size", "0"], ("--batch-size", "at least 1")),
    Case("eval --max-length 0", lambda t: ["eval", "--data", "x.jsonl", "--max-length", "0"], ("--max-length", "at least 8")),
    Case("eval --limit 0", lambda t: ["eval", "--suite", "s.yaml", "--limit", "0"], ("--limit", "at least 1")),
    Case("generate --max-new-tokens 0", lambda t: ["generate", "--prompt", "hi", "--max-new-tokens", "0"],
         ("--max-new-tokens", "at least 1")),
    Case("negative temperature", lambda t: ["generate", "--prompt", "hi", "--temperature", "-0.5"], ("--temperature", "at least 0")),
    Case("nan temperature", lambda t: ["chat", "--temperature", "nan"], ("--temperature",)),
    Case("not a device", lambda t: ["generate", "--prompt", "hi", "--device", "gpu"], ("--device", "'gpu' is not a device", "cpu")),
    Case("data inspect --max-length 0", lambda t: ["data", "inspect", "x.jsonl", "--max-length", "0"], ("--max-length",)),
    # --- issue 22: counts and ranges the schema does not reach, folders for files, --overwrite, late overrides ----
    Case("sweep --trials 0", lambda t: ["sweep", "r.yaml", "--space", "s.yaml", "--trials", "0"], ("--trials", "at least 1")),
    Case("sweep --trials -3", lambda t: ["sweep", "r.yaml", "--space", "s.yaml", "--trials", "-3"], ("--trials", "at least 1")),
    Case("cai --batch-size 0", lambda t: ["cai", "--principles", "p", "--prompts", "q", "--out", "o", "--batch-size", "0"],
         ("--batch-size", "at least 1")),
    Case("cai --max-new-tokens 0", lambda t: ["cai", "--principles", "p", "--prompts", "q", "--out", "o",
                                              "--max-new-tokens", "0"], ("--max-new-tokens", "at least 1")),
    Case("data dedup --threshold 1.5", lambda t: ["data", "dedup", "x.jsonl", "-o", "y.jsonl", "--threshold", "1.5"],
         ("--threshold", "at most 1.0")),
    Case("data dedup --num-perm 0", lambda t: ["data", "dedup", "x.jsonl", "-o", "y.jsonl", "--num-perm", "0"],
         ("--num-perm", "at least 1")),
    Case("data clean --min-length -1", lambda t: ["data", "clean", "x.jsonl", "-o", "y.jsonl", "--min-length", "-1"],
         ("--min-length", "at least 0")),
    Case("recipe is a folder", lambda t: ["train", str(t)], ("recipe file", "is a folder, not a file")),
    Case("data file is a folder", lambda t: ["data", "inspect", str(t)], ("data file", "is a folder, not a file")),
    Case("data file in a recipe is a folder", lambda t: ["config", "check", str(recipe(t, data=str(t)))],
         ("data.train", "is a folder, not a file")),
    Case("suite is a folder", lambda t: ["eval", "--model", "x", "--suite", str(t)], ("suite file", "is a folder")),
    Case("override after a flag is an override", lambda t: ["train", str(recipe(t)), "--resume", "train.lr=[1"],
         ("override 'train.lr=[1'", "quote it")),
    Case("a stray argument after a flag", lambda t: ["train", str(recipe(t)), "--resume", "extra"],
         ("unrecognized arguments: extra",)),
    Case("cai --overwrite of a user's folder", lambda t: ["cai", "--principles", "p", "--prompts", "q", "--out",
                                                          str(write(t / "mine" / "thesis.tex", "years").parent),
                                                          "--overwrite", "--endpoint", "http://127.0.0.1:9/v1"],
         ("--overwrite would delete files this command did not write", "thesis.tex")),
    Case("data --force over a file tunesmith did not write",
         lambda t: force_over_a_file_of_ours(t),
         ("out.jsonl exists and was not written by tunesmith", "--force does not replace it", "remove the file yourself")),
    Case("data split --force over a part tunesmith did not write",
         lambda t: ["data", "split", str(write(t / "d.jsonl", GOOD_LINE * 4)), "--out-dir", str(write(t / "parts" / "train.jsonl", "mine\n").parent),
                    "--fractions", "train=0.5,test=0.5", "--force"],
         ("train.jsonl exists and was not written by tunesmith",)),
    Case("--allow-changes without --resume", lambda t: ["train", str(recipe(t)), "--allow-changes"],
         ("--allow-changes only applies to --resume",)),
    Case("a whole-recipe check (no stray '':)", lambda t: ["config", "check", str(recipe(t, "method: {kind: full}\n")),
                                                         "model.quantize=nf4"],
         ("recipe.yaml: model.quantize: nf4 freezes a quantised base", "use method lora")),
]

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
GPU_CASES = [
    Case("eval --device cuda without a GPU", lambda t: ["eval", "--data", "x.jsonl", "--device", "cuda"],
         ("--device", "cuda asks for a CUDA GPU", "use cpu")),
    Case("train.device cuda without a GPU", lambda t: ["config", "check", str(recipe(t)), "train.device=cuda"],
         ("train.device cuda", "use cpu")),
]


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    """Exit status and everything printed; argparse's own refusals exit through SystemExit."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def check_refusal(case: Case, code: int, output: str, tmp_path: Path) -> None:
    assert code == 2, f"{case.name}: exit {code}\n{output}"
    assert "Traceback" not in output, output
    assert "'':" not in output, f"{case.name}: an empty field name in\n{output}"
    error_lines = [line for line in output.splitlines() if "error:" in line]
    assert len(error_lines) == 1, f"{case.name}: expected one error sentence, got\n{output}"
    for fragment in case.expected:
        assert fragment.replace("{tmp}", str(tmp_path)) in error_lines[0], f"{case.name}: {fragment!r} not in\n{output}"


@pytest.mark.parametrize("case", CASES + [pytest.param(c, marks=NO_GPU) for c in GPU_CASES], ids=lambda c: c.name)
def test_bad_input_is_one_sentence(case: Case, tmp_path, capsys):
    code, output = run_main(case.argv(tmp_path), capsys)
    check_refusal(case, code, output, tmp_path)


def test_catalogue_covers_the_issue():
    """The list is the catalogue of issue 11; a case dropped by mistake shows here."""
    assert len(CASES) + len(GPU_CASES) >= 55
    assert len({case.name for case in CASES + GPU_CASES}) == len(CASES) + len(GPU_CASES)


def test_hub_name_that_is_not_a_folder_says_both(tmp_path):
    """``owner/name`` that is no local folder: the folder does not exist and the hub could not give it.

    A subprocess with the hub offline, so the answer does not depend on the network.
    """
    result = run_cli("generate", "--model", "tunesmith-test/no-such-model", "--prompt", "hi", cwd=tmp_path,
                     env={"HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "no local folder tunesmith-test/no-such-model" in result.stderr
    assert "hub could not give it" in result.stderr


def test_adapter_manifest_damaged_for_generate(tiny_llama, tmp_path, capsys):
    code, output = run_main(["generate", "--model", tiny_llama, "--adapter", str(bad_manifest(tmp_path)), "--prompt", "hi"], capsys)
    check_refusal(Case("generate with damaged manifest", lambda t: [], ("tunesmith.json, line 1", "manifest is damaged")),
                  code, output, tmp_path)


def test_empty_data_for_eval_loss(tiny_llama, tmp_path, capsys):
    code, output = run_main(["eval", "--model", tiny_llama, "--data", str(write(tmp_path / "e.jsonl", "")), "--format", "text"],
                            capsys)
    check_refusal(Case("eval --data on an empty file", lambda t: [], ("e.jsonl holds no records",)), code, output, tmp_path)


# --- what used to break and now works --------------------------------------------------------------


def test_byte_order_mark_is_read_as_utf8(tmp_path):
    """A BOM (Excel's 'CSV UTF-8') no longer hides the first column from format detection."""
    from tunesmith.data.dataset import load_examples

    bom = b"\xef\xbb\xbf"
    csv_file = write(tmp_path / "d.csv", bom + "instruction,output\nhi,thére\n".encode())
    jsonl_file = write(tmp_path / "d.jsonl", bom + GOOD_LINE.encode())
    for path in (csv_file, jsonl_file):
        examples, data_format = load_examples(str(path))
        assert data_format == "alpaca"
        assert examples[0].messages[-1]["content"] in ("there", "thére")
    recipe_file = write(tmp_path / "r.yaml", bom + f"data: {{train: {jsonl_file}}}\n".encode())
    from tunesmith.config import load_recipe

    assert load_recipe(recipe_file).data.train == (str(jsonl_file),)


def test_relative_suite_path_from_the_checkout(monkeypatch):
    """``tunesmith eval --suite suites/quick.yaml`` from the checkout: data_root is applied once."""
    from tunesmith.evaluation.suite import load_suite

    monkeypatch.chdir(REPO)
    relative = load_suite("suites/quick.yaml")
    absolute = load_suite(REPO / "suites" / "quick.yaml")
    mmlu = relative.tasks[0]
    assert mmlu.path == absolute.tasks[0].path == str((REPO.parent / "shared" / "assets" / "data" / "mmlu").resolve())
    assert [t.path for t in relative.tasks] == [t.path for t in absolute.tasks]


def test_relative_data_root_flag_is_relative_to_the_current_folder(tmp_path, monkeypatch):
    from tunesmith.evaluation.suite import load_suite

    write(tmp_path / "suites" / "s.yaml", "tasks:\n  - {name: p, kind: perplexity, path: '{data_root}/wiki.txt'}\n")
    monkeypatch.chdir(tmp_path)
    suite = load_suite("suites/s.yaml", data_root="mydata")
    assert suite.tasks[0].path == str(tmp_path / "mydata" / "wiki.txt")


@pytest.mark.parametrize("typo, choices, expected", [
    ("lora_rnak", "lora", "r"), ("rnak", "lora", "r"), ("lora_alpha", "lora", "alpha"), ("alpah", "lora", "alpha"),
    ("target_modules", "lora", "targets"), ("dropuot", "lora", "dropout"), ("learning_rate", "train", "lr"),
    ("btach_size", "train", "batch_size"), ("epoch", "train", "epochs"), ("gradient_accumulation_steps", "train", "grad_accum"),
    ("max_seq_length", "data", "max_length"), ("temlate", "data", "template"), ("xyz", "lora", None),
    ("completely_unrelated", "train", None),
])
def test_typo_suggestion_is_the_nearest_key(typo, choices, expected):
    from tunesmith.config import DataSection, TrainSection
    from tunesmith.config.methods import LoraMethod
    from tunesmith.core.registry import nearest_name

    keys = {"lora": LoraMethod, "train": TrainSection, "data": DataSection}[choices].model_fields
    assert nearest_name(typo, list(keys)) == expected


def test_edit_distance_counts_a_swap_as_one():
    from tunesmith.core.registry import edit_distance

    assert edit_distance("rnak", "rank") == 1
    assert edit_distance("", "abc") == 3
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("same", "same") == 0


def test_config_check_valid_means_resolvable(tiny_llama, tmp_path, capsys):
    """A recipe whose model folder, template, format and data all resolve is 'valid'."""
    good = write(tmp_path / "good.jsonl", GOOD_LINE * 3)
    path = write(tmp_path / "r.yaml", f"model: {{name: {tiny_llama}}}\ndata: {{train: {good}, template: chatml, format: alpaca}}\n")
    code, output = run_main(["config", "check", str(path)], capsys)
    assert code == 0, output
    assert f"{path}: valid" in output


# --- memory under hostile input -----------------------------------------------------------------------

PEAK_SCRIPT = """
import sys, torch
from tunesmith.cli import main
from tunesmith.core.runtime import peak_memory_mb
code = main(sys.argv[1:])
print(f"PEAK_MB {peak_memory_mb(torch.device('cpu')):.1f} EXIT {code}")
"""


def peak_of_eval(model: str, data: Path, cwd: Path) -> float:
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, "eval", "--model", model, "--data", str(data),
                             "--max-length", "64", "--batch-size", "2"],
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("PEAK_MB"))
    return float(line.split()[1])


@pytest.mark.slow
def test_one_huge_line_does_not_grow_memory(tiny_llama, tmp_path):
    """A 16 MB record costs a few times its size (reading it), not the tokeniser's ~100x.

    Before the fix a 5 MB line added 550 MB to the peak of ``eval --data`` and a 50 MB line took
    ``train`` to 10.6 GB; tokenising only the first max_length x longest-token characters adds ~3x
    the line (the bytes, the text and the parsed field).
    """
    words = ("the little cat ran over a hill and saw a big dog " * 400_000)[: 16 * 2**20]
    huge = write(tmp_path / "huge.jsonl", json.dumps({"instruction": "Tell a story.", "output": words}) + "\n" + GOOD_LINE)
    small = write(tmp_path / "small.jsonl", json.dumps({"instruction": "Tell a story.", "output": "short"}) + "\n" + GOOD_LINE)
    baseline = peak_of_eval(tiny_llama, small, tmp_path)
    with_huge_line = peak_of_eval(tiny_llama, huge, tmp_path)
    line_mb = huge.stat().st_size / 2**20
    assert with_huge_line - baseline < 6 * line_mb, (baseline, with_huge_line, line_mb)


def test_truncating_before_tokenising_keeps_the_tokens(tiny_llama):
    """The cut text gives the same first max_length tokens (ids and labels) as the whole text."""
    from transformers import AutoTokenizer

    from tunesmith.data.encode import _encode, character_budget, encode_example
    from tunesmith.data.formats import Example
    from tunesmith.data.templates import resolve_template

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    resolve_template(tokenizer, "simple")
    long_text = "Once upon a time there was a tiny robot who loved long walks. " * 400
    assert len(long_text) > character_budget(tokenizer, 64)
    for example in (Example(text=long_text), Example(messages=({"role": "user", "content": "Tell me."},
                                                                {"role": "assistant", "content": long_text}))):
        encoded = encode_example(example, tokenizer, 64, "assistant")
        assert encoded.truncated and len(encoded.input_ids) == 64
        if example.text is not None:
            full = [tokenizer.bos_token_id, *_encode(tokenizer, long_text)][:64]
            assert list(encoded.input_ids) == full
        else:
            prompt = tokenizer.apply_chat_template([dict(example.messages[0])], tokenize=False, add_generation_prompt=True)
            full = _encode(tokenizer, prompt) + _encode(tokenizer, long_text)
            assert list(encoded.input_ids) == full[:64]


def test_max_new_tokens_beyond_the_context_window_is_refused(tiny_llama, capsys):
    code, output = run_main(["generate", "--model", tiny_llama, "--prompt", "hi", "--max-new-tokens", "100000"], capsys)
    check_refusal(Case("max-new-tokens beyond the window", lambda t: [],
                       ("--max-new-tokens 100000 does not fit the model's context window of 512 tokens",
                        "give at most 511")), code, output, Path("."))


@pytest.mark.parametrize("fmt", ["hf", "peft", "gguf"])
def test_a_relative_out_works_for_every_export_format(fmt, tiny_recipe, tmp_path, monkeypatch, capsys):
    from tunesmith.pipeline.finetune import finetune

    finetune(tiny_recipe("train.max_steps=1"), progress=False)
    monkeypatch.chdir(tmp_path)
    code, output = run_main(["export", "run", "--format", fmt, "--out", f"exported-{fmt}"], capsys)
    assert code == 0 and "Traceback" not in output, output
    assert ("tunesmith export: loading torch and transformers ...\n"  # what it does, before it does it
            f"exporting run to exported-{fmt}, then checking the export by reloading it ...\n") in output
    assert (tmp_path / f"exported-{fmt}").is_dir() and any((tmp_path / f"exported-{fmt}").iterdir())


def test_a_long_command_says_what_it_does_before_each_slow_step(tiny_llama, tmp_path, capsys):
    """Issue 22, no command hangs without output: the libraries, the model and the scoring each get a first line
    on standard error before they start (standard output stays the result: JSON here)."""
    data = write(tmp_path / "d.jsonl", GOOD_LINE * 5)
    code = main(["eval", "--model", tiny_llama, "--data", str(data)])
    captured = capsys.readouterr()
    assert code == 0 and json.loads(captured.out)["examples"] == 5
    assert captured.err.splitlines() == ["tunesmith eval: loading torch and transformers ...",
                                         f"loading {tiny_llama} ...", f"scoring 5 records of {data} ..."]


def test_counting_says_after_each_batch_how_much_is_done(capsys):
    from tunesmith.cli.common import counting

    rewrite = counting(lambda texts: [text.upper() for text in texts], "augment: texts rewritten", total=5)
    assert rewrite(["a", "b", "c"]) == ["A", "B", "C"] and rewrite(["d", "e"]) == ["D", "E"]
    assert capsys.readouterr().err == "augment: texts rewritten: 3/5 done\naugment: texts rewritten: 5/5 done\n"
    chunked = counting(lambda texts: [len(texts)] * len(texts), "cai: replies", chunk=2)
    assert chunked(["a", "b", "c", "d", "e"]) == [2, 2, 2, 2, 1]  # cut into calls of 2
    assert capsys.readouterr().err.splitlines() == ["cai: replies: 2 done", "cai: replies: 4 done", "cai: replies: 5 done"]

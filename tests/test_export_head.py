"""Export of a classifier keeps what it needs: head.safetensors and labels.json travel with hf and peft exports and
are reloaded and compared; GGUF, which cannot hold a head, is refused with the formats that can."""

from __future__ import annotations

import csv
import json

import pytest

from tunesmith.core.errors import TunesmithError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tiny_llama):
    from tunesmith.config import validate_recipe
    from tunesmith.pipeline.finetune import finetune

    folder = tmp_path_factory.mktemp("cls")
    with (folder / "news.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["headline", "topic"])
        writer.writerows([[f"story {i} about the {'goal' if i % 2 else 'vote'}", "sport" if i % 2 else "politics"]
                          for i in range(24)])
    recipe = validate_recipe({"model": {"name": tiny_llama}, "stage": "cls",
                              "data": {"train": str(folder / "news.csv"), "columns": {"prompt": "headline", "label": "topic"},
                                       "max_length": 32},
                              "method": {"kind": "lora", "r": 4}, "train": {"max_steps": 3, "batch_size": 4},
                              "output": {"dir": str(folder / "run")}})
    finetune(recipe, progress=False)
    return folder / "run"


@pytest.mark.parametrize("format", ["hf", "peft"])
def test_export_keeps_the_head_and_labels(classifier, tmp_path, format):
    from tunesmith.export import export

    report = export(classifier, tmp_path / format, format)
    assert (tmp_path / format / "head.safetensors").is_file()
    assert json.loads((tmp_path / format / "labels.json").read_text()) == ["politics", "sport"]
    assert "head.safetensors and labels.json reloaded: 2 labels" in report.describe()


def test_gguf_of_a_classifier_is_refused_naming_what_can_hold_it(classifier, tmp_path, cli):
    from tunesmith.export import export

    with pytest.raises(TunesmithError, match="GGUF cannot hold it; export it with --format hf .* or --format peft"):
        export(classifier, tmp_path / "gguf", "gguf")
    assert not (tmp_path / "gguf").exists()
    result = cli("export", str(classifier), "--format", "gguf", "--out", str(tmp_path / "g"))
    assert result.returncode == 2 and "Traceback" not in result.stderr

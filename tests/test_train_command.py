"""``tunesmith train`` resolves the recipe as ``tunesmith config check`` does, before the model loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunesmith.cli import main

GOOD_LINE = '{"instruction": "Say hi.", "output": "hi"}\n'


def recipe_file(tmp: Path) -> Path:
    """A recipe on a model folder with a readable weights file and good data; made bad by an override."""
    import torch
    from safetensors.torch import save_file

    (tmp / "good.jsonl").write_text(GOOD_LINE * 3)
    model = tmp / "weights-only-model"
    model.mkdir()
    save_file({"weight": torch.zeros(4)}, str(model / "model.safetensors"))
    path = tmp / "recipe.yaml"
    path.write_text(f"model: {{name: {model}}}\ndata: {{train: {tmp / 'good.jsonl'}}}\n"
                    f"output: {{dir: {tmp / 'run'}}}\n")
    return path


def error_line(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1, lines
    return code, lines[0].split("error:", 1)[1].strip()


@pytest.mark.parametrize("override, expected", [
    ("data.train=gone.jsonl", "data.train: data file gone.jsonl does not exist"),
    ("data.template=chatml2", "data.template"),
    ("train.device=cuda:99", "train.device"),
])
def test_a_bad_recipe_fails_in_train_as_in_config_check_before_the_model_loads(override, expected, tmp_path,
                                                                             monkeypatch, capsys):
    import tunesmith.pipeline.finetune as finetune_module

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the recipe was checked")

    monkeypatch.setattr(finetune_module, "load_model_and_tokenizer", must_not_load)
    monkeypatch.chdir(tmp_path)
    path = str(recipe_file(tmp_path))
    checked = error_line(["config", "check", path, override], capsys)
    trained = error_line(["train", path, override], capsys)
    assert trained == checked and trained[0] == 2 and expected in trained[1]
    assert not (tmp_path / "run").exists()  # nothing was created either

"""Recipes: validation errors that name the field, overrides, the schema, every shipped recipe."""


import pytest
from pydantic import ValidationError

from tunesmith.config import load_recipe, schema_text, validate_recipe
from tunesmith.core.errors import TunesmithError

from conftest import REPO, run_cli

MINIMAL = {"data": {"train": "train.jsonl"}}


def error_of(raw: dict) -> str:
    with pytest.raises(TunesmithError) as caught:
        validate_recipe(raw, source="r.yaml")
    return str(caught.value)


def test_unknown_key_names_it_and_the_nearest_valid_one():
    message = error_of({**MINIMAL, "method": {"kind": "lora", "alpah": 8}})
    assert "r.yaml" in message and "'method.alpah'" in message and "Did you mean 'alpha'?" in message
    assert "Valid keys here: alpha, dora, dropout, init, kind" in message
    message = error_of({"data": {"train": "x", "max_lenght": 10}})
    assert "Did you mean 'max_length'?" in message


def test_unknown_method_kind_lists_the_kinds():
    message = error_of({**MINIMAL, "method": {"kind": "lorra"}})
    assert "Did you mean 'lora'?" in message and "full" in message


def test_wrong_type_and_value_name_the_field_and_what_is_allowed():
    assert "'train.lr'" in error_of({**MINIMAL, "train": {"lr": "fast"}})
    message = error_of({**MINIMAL, "model": {"dtype": "fp8"}})
    assert "'model.dtype'" in message and "'bfloat16'" in message
    assert "'data' is required" in error_of({})


def test_sections_are_frozen_and_defaults_filled():
    recipe = validate_recipe(MINIMAL)
    assert recipe.method.kind == "lora" and recipe.model.trust_remote_code is False
    with pytest.raises(ValidationError):  # frozen: pydantic refuses the assignment
        recipe.train.lr = 1.0  # type: ignore[misc]


def test_dotted_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data: {train: a.jsonl}\nmethod: {kind: lora}\n")
    recipe = load_recipe(path, ["train.lr=1e-4", "method.r=4", "data.train=[a.jsonl, b.jsonl]"])
    assert recipe.train.lr == 1e-4 and recipe.method.r == 4 and recipe.data.train == ("a.jsonl", "b.jsonl")
    with pytest.raises(TunesmithError, match="section.field=value"):
        load_recipe(path, ["train.lr"])


def test_schema_lists_every_section_with_descriptions():
    text = schema_text()
    for key in ("model.name", "data.train", "method.r", "train.grad_accum", "eval.every_steps", "output.dir"):
        assert key in text
    assert "Peak learning rate" in text


SHIPPED_RECIPES = sorted(p for p in (REPO / "examples").rglob("*.yaml"))


def test_every_shipped_recipe_validates_and_starts_with_its_command():
    assert len(SHIPPED_RECIPES) == 25, [str(p) for p in SHIPPED_RECIPES]
    for path in SHIPPED_RECIPES:
        load_recipe(path)
        first = path.read_text().splitlines()[0]
        assert first.startswith("# tunesmith ") or first.startswith("# torchrun "), f"{path}: first line {first!r}"


def test_config_check_command(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data: {train: a.jsonl}\ntrain: {batch_sise: 4}\n")
    result = run_cli("config", "check", str(path))
    assert result.returncode == 2
    assert "Did you mean 'batch_size'?" in result.stderr and "Traceback" not in result.stderr

"""Reading a recipe: YAML, dotted command-line overrides, one validation, clear errors."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Sequence

import yaml
from pydantic import BaseModel, ValidationError

from tunesmith.config.methods import MethodSection
from tunesmith.config.recipe import Recipe
from tunesmith.core.errors import TunesmithError, decode_utf8, missing_file
from tunesmith.core.registry import did_you_mean


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read, override and validate a recipe file.

    Args:
        path: YAML recipe file.
        overrides: ``key.path=value`` strings; values are parsed as YAML (``train.lr=1e-4``).

    Returns:
        The validated, frozen recipe.

    Raises:
        TunesmithError: If the file is missing or not YAML, an override is malformed, or a field
            is unknown or invalid; the message names the file and field.
    """
    path = Path(path)
    if not path.is_file():
        raise missing_file(path, "recipe file")
    raw = read_yaml(path, "recipe") or {}
    if not isinstance(raw, dict):
        raise TunesmithError(f"{path} must be a mapping of sections (model, data, method, ...)")
    for override in overrides:
        apply_override(raw, override)
    return validate_recipe(raw, source=str(path))


def read_yaml(path: Path, what: str = "file") -> Any:
    """The YAML document in ``path``, read as UTF-8 (a byte-order mark dropped).

    Raises:
        TunesmithError: If the file cannot be read, is not UTF-8 or not YAML, naming the line.
    """
    try:
        data = path.read_bytes()
    except OSError as error:
        raise TunesmithError(f"{what} {path} cannot be read ({error.strerror or error})") from None
    return parse_yaml(decode_utf8(path, data, what), str(path), what)


def parse_yaml(text: str, source: str, what: str) -> Any:
    """``text`` read as YAML data only (``safe_load``), from ``source`` (a path, or where a browser sent it).

    Raises:
        TunesmithError: If it is not YAML (one sentence naming ``source`` and the line) or nests too deeply.
    """
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{source}, line {mark.line + 1}" if mark is not None else source
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise TunesmithError(f"{where}: not valid YAML ({problem}); fix the {what}'s syntax there") from None
    except RecursionError:
        raise TunesmithError(f"{source}: the YAML is nested too deeply to be a {what}") from None


def validate_recipe(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    """Validate a recipe given as nested dictionaries; errors name ``source`` and the field."""
    try:
        return Recipe.model_validate(raw)
    except ValidationError as error:
        lines = [describe_error(item) for item in error.errors()]
        raise TunesmithError(f"{source}: " + "; ".join(lines)) from None


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set ``a.b.c=value`` in nested dictionaries, creating sections as needed."""
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise TunesmithError(f"override '{override}' must look like section.field=value")
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise TunesmithError(f"override '{override}': '{part}' is not a section")
    try:
        node[leaf] = yaml.safe_load(value)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or "not YAML"
        raise TunesmithError(f"override '{override}': the value is not valid YAML ({problem}); quote it") from None


def describe_error(item: dict[str, Any]) -> str:
    """One readable sentence for one pydantic error, with the nearest valid key for typos."""
    location = tuple(item["loc"])
    dotted = _dotted(location)
    if item["type"] == "extra_forbidden":
        owner = _section_at(location[:-1])
        valid = sorted(owner.model_fields) if owner else []
        hint = did_you_mean(str(location[-1]), valid)
        return f"unknown key '{dotted}'.{hint} Valid keys here: {', '.join(valid)}"
    if item["type"] == "union_tag_invalid":
        tag, expected = item["ctx"]["tag"], item["ctx"]["expected_tags"]
        kinds = [kind.strip(" '") for kind in expected.split(",")]
        return f"unknown {dotted}.kind '{tag}'.{did_you_mean(tag, kinds)} Valid kinds: {', '.join(kinds)}"
    if item["type"] == "missing":
        return f"'{dotted}' is required"
    if item["type"] == "value_error":  # a validator's own sentence; the input may be a whole section
        return _where(dotted) + item["msg"].removeprefix("Value error, ")
    given = item.get("input")
    shown = repr(given) if len(repr(given)) <= 80 else repr(given)[:77] + "..."
    return f"{_where(dotted)}{item['msg']} (got {shown})"


def _where(dotted: str) -> str:
    """``'train.lr': `` before a field's error; nothing for a whole-recipe check (its sentence names its fields)."""
    return f"'{dotted}': " if dotted else ""


def _dotted(location: tuple[Any, ...]) -> str:
    """``('method', 'lora', 'rnak')`` -> ``method.rnak``: the union tag is not a key the user wrote."""
    parts: list[str] = []
    for index, part in enumerate(location):
        if index and isinstance(_unwrap_at(location[:index]), list):
            continue
        parts.append(str(part))
    return ".".join(parts)


def _unwrap_at(location: tuple[Any, ...]) -> Any:
    """What ``location`` points at: a section, a list of union members, a type, or None."""
    current: Any = Recipe
    for part in location:
        if _is_section(current) and part in current.model_fields:
            current = _unwrap(current.model_fields[part].annotation)
        elif isinstance(current, list):
            current = next((m for m in current if m.model_fields["kind"].default == part), None)
        else:
            return None
    return current


def _section_at(location: tuple[Any, ...]) -> type[BaseModel] | None:
    """The section class found by following ``location`` from the recipe, or None."""
    current = _unwrap_at(tuple(part for part in location if not isinstance(part, int)))
    return current if _is_section(current) else None


def _unwrap(annotation: Any) -> Any:
    """Strip Optional/Annotated; a union of sections becomes the list of its members."""
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if typing.get_origin(annotation) is typing.Annotated:
        return _unwrap(args[0])
    sections = [arg for arg in args if _is_section(arg)]
    if len(sections) == 1:
        return sections[0]
    return sections if sections else annotation


def _is_section(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, BaseModel)


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML (every default written out)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def validate_method(raw: dict[str, Any], source: str = "method") -> Any:
    """Validate a method section alone (e.g. from a saved result's manifest)."""
    from pydantic import TypeAdapter


    try:
        return TypeAdapter(MethodSection).validate_python(raw)
    except ValidationError as error:
        raise TunesmithError(f"{source}: {error.errors()[0]['msg']}") from None

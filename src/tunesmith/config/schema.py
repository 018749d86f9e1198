"""The recipe schema as text, from the field descriptions: what `tunesmith config` prints."""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from tunesmith.config.recipe import Recipe


def schema_text() -> str:
    """Every section and field of a recipe with type, default and description."""
    lines: list[str] = []
    _describe(Recipe, prefix="", lines=lines)
    return "\n".join(lines)


def _describe(section: type[BaseModel], prefix: str, lines: list[str]) -> None:
    for name, field in section.model_fields.items():
        if name == "kind":
            continue
        key = f"{prefix}{name}"
        members = _sections_in(field.annotation)
        if members:
            lines.append("")
            lines.append(f"{key}:  {(members[0].__doc__ or '').strip() if len(members) == 1 else 'one of the kinds below'}")
            for member in members:
                if len(members) > 1:
                    lines.append(f"  {key}.kind = {member.model_fields['kind'].default}: {(member.__doc__ or '').strip()}")
                _describe(member, prefix=f"{key}.", lines=lines)
            continue
        default = "required" if field.default is PydanticUndefined else f"default {field.default!r}"
        lines.append(f"  {key}  ({_type_name(field.annotation)}, {default})  {field.description or ''}".rstrip())


def _sections_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        found.extend(_sections_in(arg))
    return found


def _type_name(annotation: Any) -> str:
    return str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")

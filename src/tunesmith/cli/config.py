"""``tunesmith config`` prints the recipe schema; ``tunesmith config check RECIPE`` validates one.

``check`` goes beyond the schema: it resolves everything a run resolves before training, without
loading model weights (the model alias or folder, the chat template, each data file's existence,
readability and record format, the suites, the device), so "valid" means the run will start.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from tunesmith.core.errors import TunesmithError, missing_file


def register(commands) -> None:
    config = commands.add_parser("config", help="Print the recipe schema; 'config check RECIPE' validates.")
    config.add_argument("action", nargs="?", choices=["check"])
    config.add_argument("recipe", nargs="?")
    config.add_argument("overrides", nargs="*")
    config.set_defaults(handler=cmd_config)


def cmd_config(args: argparse.Namespace) -> int:
    from tunesmith.config import load_recipe, recipe_to_yaml, schema_text

    if args.action != "check":
        print(schema_text())
        return 0
    if not args.recipe:
        raise TunesmithError("usage: tunesmith config check RECIPE [overrides]")
    recipe = load_recipe(args.recipe, args.overrides)
    notes = check_inputs(recipe)
    print(recipe_to_yaml(recipe), end="")
    for note in notes:
        print(f"# note: {note}", file=sys.stderr)
    print(f"# {args.recipe}: valid", file=sys.stderr)
    return 0


def check_inputs(recipe) -> list[str]:
    """Resolve what the run resolves before training, loading no weights.

    Returns:
        Notes on what could not be checked here (a hub model is only fetched when the run starts).

    Raises:
        TunesmithError: For an unknown model alias, a missing or damaged model folder, an unknown
            chat template or data format, a missing or malformed data file, a bad suite or device.
    """
    from tunesmith.core.runtime import check_device

    check_device(recipe.train.device, "train.device")
    notes = [note for note in [_check_model(recipe.model.name)] if note]
    _check_template(recipe.data.template)
    data = recipe.data
    # The record formats are SFT's; every other stage reads its own layout (pairs, text/label rows,
    # plain text) and names what it expects when it prepares the data, so only the files are checked here.
    records = recipe.stage.kind == "sft"
    _check_files("data", data.train, data.format, data.text_field, formats=records, columns=data.columns)
    _check_files("data", (data.validation,) if data.validation else (), data.format, data.text_field, "validation",
                 formats=records, columns=data.columns)
    for index, source in enumerate(data.sources):
        _check_files(f"data.sources[{index}]", source.train, source.format, data.text_field)
        if source.validation:
            _check_files(f"data.sources[{index}]", (source.validation,), source.format, data.text_field, "validation")
    if data.prepare and data.prepare.dedup:
        _check_exist("data.prepare.dedup.against", data.prepare.dedup.against)
    if recipe.eval.task:
        _check_files("eval.task", (recipe.eval.task.file,), recipe.eval.task.format, data.text_field, "file",
                     columns=recipe.eval.task.columns or data.columns)
    _check_suites(recipe)
    ewc = recipe.regularise.ewc
    if ewc and ewc.data != "generations":
        _check_files("regularise.ewc", (ewc.data,), ewc.format, data.text_field, "data")
    if recipe.retain:
        _check_files("retain", recipe.retain.perplexity, recipe.retain.format, data.text_field, "perplexity")
    return notes


def _check_model(name: str) -> Optional[str]:
    from tunesmith.models.aliases import ALIASES
    from tunesmith.models.loading import check_weight_files, resolve_model_path

    if name in ALIASES:
        return None  # converted or fetched by the alias itself when the run starts
    try:
        resolved = resolve_model_path(name, Path("."))  # no alias here, so the cache is not used
    except TunesmithError as error:
        raise TunesmithError(f"model.name: {error}") from None
    if Path(resolved).is_dir():
        check_weight_files(Path(resolved))
        return None
    return f"model.name {name} is a hub id; it is not a local folder, so it is fetched when the run starts"


def _check_template(name: str) -> None:
    from tunesmith.data.templates import TEMPLATES

    if name not in ("auto", "tokenizer"):
        try:
            TEMPLATES.get(name)
        except TunesmithError as error:
            raise TunesmithError(f"data.template: {str(error).rstrip('.')}, auto or tokenizer") from None


def _check_exist(field: str, paths) -> None:
    for path in paths:
        if not Path(path).is_file():
            raise missing_file(path, f"{field}: file")


def _check_files(section: str, paths, data_format: str, text_field: str, key: str = "train",
                 formats: bool = True, columns=None) -> None:
    """Each file exists and its first record reads; with ``formats``, it fits ``data_format`` (detected for auto)."""
    from tunesmith.data.formats import FORMATS, FormatOptions, detect_format
    from tunesmith.data.readers import read_records

    if data_format != "auto":
        try:
            FORMATS.get(data_format)
        except TunesmithError as error:
            raise TunesmithError(f"{section}.format: {str(error).rstrip('.')} or auto") from None
    for path in paths:
        if not Path(path).is_file():
            raise missing_file(path, f"{section}.{key}: data file")
        records = read_records(path, text_field)
        first = next(records, None)
        records.close()
        if first is None:
            raise TunesmithError(f"{section}.{key}: data file {path} holds no records")
        if formats:
            name = detect_format(first, text_field, columns) if data_format == "auto" else data_format
            FORMATS.get(name).convert(first, FormatOptions(text_field=text_field, columns=columns))


def _check_suites(recipe) -> None:
    from tunesmith.evaluation.suite import load_suite

    report = recipe.eval.report
    if report:
        for path in (*report.suites, *report.general_suites):
            load_suite(path, report.data_root, report.limit)
    if recipe.retain and recipe.retain.suite:
        load_suite(recipe.retain.suite, limit=recipe.retain.limit)

"""``tunesmith config`` prints the recipe schema; ``tunesmith config check RECIPE`` validates one."""

from __future__ import annotations

import argparse
import sys

from tunesmith.errors import TunesmithError


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
    print(recipe_to_yaml(recipe), end="")
    print(f"# {args.recipe}: valid", file=sys.stderr)
    return 0

"""``tunesmith models``: the built-in model aliases."""

from __future__ import annotations

import argparse


def register(commands) -> None:
    models = commands.add_parser("models", help="List the built-in model aliases.")
    models.set_defaults(handler=cmd_models)


def cmd_models(args: argparse.Namespace) -> int:
    from tunesmith.models import ALIASES

    for name in ALIASES:
        alias = ALIASES.get(name)
        print(f"{name}\n    {alias.description}\n    from: {alias.source}")
    return 0

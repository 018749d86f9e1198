"""``tunesmith compare RECIPE... --out DIR``: train several recipes and compare gain, forgetting and cost."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(commands) -> None:
    compare = commands.add_parser(
        "compare", help="Train several recipes on the same data; one table and plot of task gain, forgetting, "
        "trainable parameters, time and memory.")
    compare.add_argument("recipes", nargs="+", help="Recipe files (add `retain: {}` to measure forgetting).")
    compare.add_argument("--out", required=True, help="Folder for the runs and comparison.md/.json/.png.")
    compare.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="Override applied to every recipe, e.g. --set data.train=task.jsonl (repeatable).")
    compare.add_argument("--overwrite", action="store_true",
                         help="Replace earlier runs in OUT/<recipe>/ (only folders that are tunesmith runs).")
    compare.add_argument("--no-progress", action="store_true", help="No progress bars.")
    compare.set_defaults(handler=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from tunesmith.config import load_recipe
    from tunesmith.workflows.compare import compare

    for recipe in args.recipes:
        load_recipe(recipe, args.overrides)  # fail on a bad recipe before any training starts
    compare(args.recipes, Path(args.out), args.overrides, progress=not args.no_progress, overwrite=args.overwrite)
    return 0

"""``tunesmith plan RECIPE [--methods recipe|all] [--json]``: memory, time, data and a recommendation, before training."""

from __future__ import annotations

import argparse
import json


def register(commands) -> None:
    plan = commands.add_parser("plan", help="Estimate memory and time per method, judge the data, and recommend.")
    plan.add_argument("recipe", help="YAML recipe file.")
    plan.add_argument("overrides", nargs="*", help="Dotted overrides such as train.batch_size=4.")
    plan.add_argument("--methods", default="recipe", choices=["recipe", "all"],
                      help="The recipe's method only, or every method.")
    plan.add_argument("--no-calibration", action="store_true", help="Skip the few timed steps (no time estimate).")
    plan.add_argument("--json", action="store_true", help="Print the plan as JSON.")
    plan.set_defaults(handler=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    import sys

    from tunesmith.config import load_recipe
    from tunesmith.plan import describe, plan_recipe

    recipe = load_recipe(args.recipe, list(args.overrides))
    say = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    plan = plan_recipe(recipe, args.methods, calibrate=not args.no_calibration, say=say)
    print(json.dumps(plan.as_dict(), indent=2) if args.json else describe(plan))
    return 0
